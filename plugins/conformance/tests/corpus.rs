//! Every payload of `corpus/malformed/` gets, from the SDK's parser and from each shipped
//! plugin, the answer its README documents: never a panic, and a dead letter always carries a
//! reason.

use eddy_conformance::{
    ANALYTICS_CONFIG, Answer, Case, Expected, PLUGINS, load_corpus, run_batch, run_plugin,
};
use eddy_sdk::testing::Harness;
use eddy_sdk::{Activity, Event, Verdict};
use std::panic::{AssertUnwindSafe, catch_unwind};

fn expected_answer(case: &Case, plugin: usize) -> Answer {
    match &case.expected {
        Expected::DeadLetter => Answer::DeadLetter,
        Expected::Accepted(answers) => answers[plugin],
    }
}

fn check(failures: Vec<String>) {
    assert!(
        failures.is_empty(),
        "{} failure(s):\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[test]
fn every_file_is_documented_and_small() {
    let cases = load_corpus();
    assert!(cases.len() >= 20, "only {} payloads", cases.len());
    for case in &cases {
        assert!(
            case.payload.len() < 10 * 1024,
            "{} is {} bytes: keep corpus files small, generate huge payloads in the test",
            case.name,
            case.payload.len()
        );
    }
    assert!(cases.iter().any(|c| c.expected == Expected::DeadLetter));
}

#[test]
fn the_parser_refuses_each_malformed_payload_with_a_reason() {
    let mut failures = Vec::new();
    for case in load_corpus() {
        let parsed = catch_unwind(|| Activity::from_json(&case.payload));
        let event = Event::new("user-activities", 0, 0, None, &case.payload);
        let via_event = catch_unwind(AssertUnwindSafe(|| {
            event.activity().map(|_| ()).map_err(|e| e.0.clone())
        }));
        match (&case.expected, parsed, via_event) {
            (_, Err(_), _) | (_, _, Err(_)) => {
                failures.push(format!("{}: the parser panicked", case.name))
            }
            (Expected::DeadLetter, Ok(Ok(a)), _) => {
                failures.push(format!("{}: parsed, as {a:?}", case.name))
            }
            (Expected::DeadLetter, Ok(Err(e)), Ok(via_event)) => {
                if e.0.trim().is_empty() {
                    failures.push(format!("{}: an error with no message", case.name));
                }
                if via_event != Err(e.0.clone()) {
                    failures.push(format!(
                        "{}: Event::activity() said {via_event:?}, from_json {e}",
                        case.name
                    ));
                }
            }
            (Expected::Accepted(_), Ok(Err(e)), _) => failures.push(format!(
                "{}: documented as accepted, refused: {e}",
                case.name
            )),
            (Expected::Accepted(_), Ok(Ok(_)), Ok(via_event)) => {
                if via_event.is_err() {
                    failures.push(format!("{}: Event::activity() refused it", case.name));
                }
            }
        }
    }
    check(failures);
}

#[test]
fn every_plugin_answers_each_file_as_documented() {
    let mut failures = Vec::new();
    for case in load_corpus() {
        let parse_error = Activity::from_json(&case.payload).err();
        for (i, plugin) in PLUGINS.iter().enumerate() {
            let at = format!("{} → {plugin}", case.name);
            let verdicts = match run_plugin(plugin, &[&case.payload]) {
                Ok(v) => v,
                Err(panic) => {
                    failures.push(format!("{at}: panicked: {panic}"));
                    continue;
                }
            };
            let [verdict] = verdicts.as_slice() else {
                failures.push(format!("{at}: {} verdicts for one event", verdicts.len()));
                continue;
            };
            let expected = expected_answer(&case, i);
            if Answer::of(verdict) != expected {
                failures.push(format!("{at}: answered {verdict:?}, expected {expected:?}"));
            }
            match verdict {
                Verdict::DeadLetter(reason) | Verdict::Retry(reason)
                    if reason.trim().is_empty() =>
                {
                    failures.push(format!("{at}: {verdict:?} without a reason"))
                }
                // A malformed event is dead-lettered with the parser's message, which names
                // what is wrong (and where).
                Verdict::DeadLetter(reason) => {
                    if let Some(e) = &parse_error
                        && *reason != e.0
                    {
                        failures.push(format!("{at}: reason `{reason}`, the parser said `{e}`"));
                    }
                }
                _ => {}
            }
        }
    }
    check(failures);
}

#[test]
fn malformed_events_do_not_disturb_the_rest_of_their_batch() {
    let cases = load_corpus();
    let valid: &[u8] = br#"{"user_id":"user-9","event_type":"purchase","timestamp":"2024-01-15T10:30:00Z","properties":{"price":999.99}}"#;
    // Each malformed payload between two valid events, all in one batch.
    let mut batch: Vec<&[u8]> = vec![valid];
    for case in &cases {
        batch.push(&case.payload);
        batch.push(valid);
    }
    let mut failures = Vec::new();
    for (i, plugin) in PLUGINS.iter().enumerate() {
        let alone = run_plugin(plugin, &[valid]).expect("a valid event")[0].clone();
        let verdicts = match run_plugin(plugin, &batch) {
            Ok(v) => v,
            Err(panic) => {
                failures.push(format!("{plugin}: panicked on the whole corpus: {panic}"));
                continue;
            }
        };
        assert_eq!(verdicts.len(), batch.len());
        for (j, case) in cases.iter().enumerate() {
            let got = Answer::of(&verdicts[2 * j + 1]);
            if got != expected_answer(case, i) {
                failures.push(format!(
                    "{} → {plugin} in a batch: answered {got:?}",
                    case.name
                ));
            }
        }
        // The valid events around the malformed ones are answered as if they were alone.
        for (k, v) in verdicts.iter().enumerate().step_by(2) {
            if *v != alone {
                failures.push(format!(
                    "{plugin}: the valid event at {k} answered {v:?}, alone {alone:?}"
                ));
            }
        }
    }
    check(failures);

    // Analytics counts every event and each malformed one.
    let mut h = Harness::<eddy_analytics::Analytics>::new(ANALYTICS_CONFIG).unwrap();
    let payloads: Vec<&[u8]> = cases.iter().map(|c| c.payload.as_slice()).collect();
    h.run_payloads(&payloads);
    let malformed = cases
        .iter()
        .filter(|c| c.expected == Expected::DeadLetter)
        .count() as i64;
    assert_eq!(h.state_json::<i64>("malformed"), Some(malformed));
    assert_eq!(h.state_json::<i64>("total"), Some(cases.len() as i64));
}

#[test]
fn logger_sampling_never_hides_a_malformed_event() {
    for case in load_corpus() {
        if case.expected != Expected::DeadLetter {
            continue;
        }
        let payloads = vec![case.payload.as_slice(); 10];
        let verdicts = run_batch::<eddy_logger::Logger>(r#"{"sample_every": 10}"#, &payloads)
            .unwrap_or_else(|panic| panic!("{}: {panic}", case.name));
        assert!(
            verdicts
                .iter()
                .all(|v| matches!(v, Verdict::DeadLetter(r) if !r.is_empty())),
            "{}: {verdicts:?}",
            case.name
        );
    }
}

#[test]
fn huge_payloads_get_an_answer() {
    const SIZE: usize = 4 << 20;
    let not_json = vec![b'x'; SIZE];
    let open_arrays = vec![b'['; SIZE];
    let open_objects = b"{\"a\":".repeat(SIZE / 5);
    let mut padded =
        br#"{"user_id":"user-1","event_type":"click","timestamp":"2024-01-15T10:30:00Z","pad":""#
            .to_vec();
    padded.resize(SIZE, b'p');
    padded.extend_from_slice(b"\"}");
    let mut long_user = br#"{"event_type":"click","user_id":""#.to_vec();
    long_user.resize(SIZE, b'u');
    long_user.extend_from_slice(b"\"}");

    for (name, payload) in [
        ("4 MiB of x", &not_json),
        ("4 MiB of [", &open_arrays),
        ("4 MiB of {\"a\":", &open_objects),
    ] {
        let err = Activity::from_json(payload).expect_err(name);
        assert!(!err.0.is_empty(), "{name}");
        for plugin in PLUGINS {
            let v = run_plugin(plugin, &[payload]).unwrap_or_else(|p| panic!("{name}: {p}"));
            assert_eq!(
                v,
                vec![Verdict::DeadLetter(err.0.clone())],
                "{name} → {plugin}"
            );
        }
    }
    // Big but valid: a huge unknown field, a huge user id. Plugins handle them like any click
    // (the host's own limits, e.g. on state size, are the host's business).
    for (name, payload) in [("padded", &padded), ("long user_id", &long_user)] {
        Activity::from_json(payload).unwrap_or_else(|e| panic!("{name}: {e}"));
        for (plugin, answer) in
            PLUGINS
                .iter()
                .zip([Answer::Ok, Answer::Ok, Answer::Skip, Answer::Skip])
        {
            let v = run_plugin(plugin, &[payload]).unwrap_or_else(|p| panic!("{name}: {p}"));
            assert_eq!(Answer::of(&v[0]), answer, "{name} → {plugin}: {v:?}");
        }
    }
}
