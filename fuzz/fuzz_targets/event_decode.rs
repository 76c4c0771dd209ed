//! Arbitrary bytes as a Kafka record's payload: the SDK's typed parse and each of the four
//! shipped plugins (natively, through `eddy_sdk::testing::Harness`) must never panic, and must
//! hold to the contract the corpus in `corpus/malformed/` documents:
//!
//! - `Activity::from_json` returns an activity or an error with a message, and
//!   `Event::activity()` says the same;
//! - a parsed activity has a non-empty `user_id` and `event_type`, and a finite amount;
//! - a payload the parser refuses is dead-lettered by every plugin, with the parser's message
//!   as the reason; any dead letter or retry carries a reason.
//!
//! Each input runs as one batch of four events with the same payload and different Kafka
//! record timestamps (none, an ordinary one, and both extremes), on fresh plugin instances, so
//! a crash reproduces from its input alone.

#![no_main]

use eddy_sdk::testing::Harness;
use eddy_sdk::{Activity, Event, Plugin, Verdict};
use libfuzzer_sys::fuzz_target;

const KAFKA_TIMESTAMPS: [Option<i64>; 4] = [
    None,
    Some(1_705_314_645_000),
    Some(i64::MIN),
    Some(i64::MAX),
];

fuzz_target!(|data: &[u8]| {
    let parsed = Activity::from_json(data);
    match &parsed {
        Ok(a) => {
            assert!(!a.user_id.is_empty());
            assert!(!a.event_type.as_str().is_empty());
            assert!(a.amount().is_none_or(f64::is_finite), "{a:?}");
            let _ = (a.time_ms(), a.hour(), a.country());
        }
        Err(e) => assert!(!e.0.trim().is_empty()),
    }
    let event = Event::new("user-activities", 0, 0, None, data);
    assert_eq!(
        event.activity().map_err(Clone::clone),
        parsed.as_ref().map_err(Clone::clone)
    );
    let _ = (event.time_ms(), event.payload_str());
    // The timestamp parser and the event-type mapping get text straight from the fuzzer too:
    // inside JSON, most byte strings would need escaping to reach them.
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = eddy_sdk::activity::parse_rfc3339_ms(text);
        let _ = eddy_sdk::EventType::parse(text);
    }

    let reason = parsed.as_ref().err().map(|e| e.0.as_str());
    run::<eddy_logger::Logger>(r#"{"sample_every": 2}"#, data, reason);
    run::<eddy_analytics::Analytics>(r#"{"snapshot_every": 1, "top_n": 3}"#, data, reason);
    run::<eddy_alert::Alerter>(
        r#"{"rules": [
            {"name": "high-value-purchase", "event_type": "purchase", "min_amount": 500.0},
            {"name": "quiz-completed", "event_type": "quiz_submission"},
            {"name": "from-de", "country": "DE", "page_prefix": "/checkout"}]}"#,
        data,
        reason,
    );
    run::<eddy_fraud::Fraud>(r#"{"alert_score": 30, "max_tracked": 3}"#, data, reason);
});

/// Runs `payload` through a fresh `P`; `parse_error` is the parser's message if it refused it.
fn run<P: Plugin>(config: &str, payload: &[u8], parse_error: Option<&str>) {
    let mut h = Harness::<P>::new(config).expect("a valid config");
    let events: Vec<Event> = KAFKA_TIMESTAMPS
        .iter()
        .map(|t| {
            // A host clock in 2025 with max_ahead 5 min: times past it are refused.
            let mut e = h.event(payload).with_host_time(1_765_000_000_000, 300_000);
            e.timestamp_ms = *t;
            e
        })
        .collect();
    let verdicts = h.run(&events);
    assert_eq!(verdicts.len(), events.len());
    for v in &verdicts {
        match (v, parse_error) {
            (Verdict::DeadLetter(r), Some(e)) => assert_eq!(r, e),
            (v, Some(e)) => panic!("{v:?} for a payload the parser refused: {e}"),
            (Verdict::DeadLetter(r) | Verdict::Retry(r), None) => assert!(!r.trim().is_empty()),
            (Verdict::Ok | Verdict::Skip, None) => {}
        }
    }
    h.tick(0);
}
