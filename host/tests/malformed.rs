//! The malformed-event corpus (`corpus/malformed/`) and some huge payloads, among valid
//! events, through the real host and the four real plugins: nothing traps, every malformed
//! event is dead-lettered by every plugin with the parser's reason and its original key,
//! payload and headers, and every valid event is handled once.

mod common;

use common::misbehaving::*;
use common::*;
use eddy::Host;
use eddy::metrics::{DeadLetterReason, Outcome, TrapKind};
use rdkafka::ClientConfig;
use rdkafka::message::{Header, Message, OwnedHeaders};
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use std::collections::BTreeMap;
use std::time::Duration;

const PARTITIONS: i32 = 3;
/// Below the producer's default `message.max.bytes` (1 MB), and few enough that the embedded
/// broker's 5 MiB per partition keeps them all.
const HUGE: usize = 900_000;

/// Payloads with a name; `malformed` says whether the parser must refuse them.
struct Case {
    name: String,
    payload: Vec<u8>,
    malformed: bool,
}

fn cases() -> Vec<Case> {
    let dir = root().join("corpus/malformed");
    let mut cases: Vec<Case> = std::fs::read_dir(&dir)
        .expect("corpus/malformed")
        .map(|e| e.unwrap().path())
        .filter(|p| p.file_name().unwrap() != "README.md")
        .map(|p| {
            let name = p.file_name().unwrap().to_string_lossy().into_owned();
            Case {
                malformed: !name.starts_with("accepted-"),
                payload: std::fs::read(&p).unwrap(),
                name,
            }
        })
        .collect();
    assert!(cases.len() >= 30, "the corpus is there");
    let valid_prefix = br#"{"user_id":"huge","event_type":"page_view","padding":""#;
    let mut huge_valid = valid_prefix.to_vec();
    huge_valid.resize(HUGE, b'x');
    huge_valid.extend_from_slice(br#""}"#);
    cases.extend([
        Case {
            name: "huge-garbage".into(),
            payload: vec![b'#'; HUGE],
            malformed: true,
        },
        Case {
            name: "huge-unclosed-array".into(),
            payload: vec![b'['; HUGE],
            malformed: true,
        },
        Case {
            name: "huge-valid".into(),
            payload: huge_valid,
            malformed: false,
        },
    ]);
    cases
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_events_are_dead_lettered_with_the_reason_and_nothing_traps() {
    init_logs();
    let broker = broker(PARTITIONS);
    let bootstrap = broker.bootstrap_servers().to_string();
    let cases = cases();
    let valid = generate(300, &generator_options(17, 0));

    // Valid events with the cases among them, each case with its name as key and header.
    let producer: BaseProducer = ClientConfig::new()
        .set("bootstrap.servers", &bootstrap)
        .create()
        .unwrap();
    let mut cases_iter = cases.iter();
    for (i, g) in valid.iter().enumerate() {
        producer
            .send(
                BaseRecord::to(TOPIC)
                    .key(g.key.as_bytes())
                    .payload(&g.payload),
            )
            .unwrap();
        if i % 7 == 3
            && let Some(c) = cases_iter.next()
        {
            let headers = OwnedHeaders::new().insert(Header {
                key: "corpus-file",
                value: Some(c.name.as_str()),
            });
            producer
                .send(
                    BaseRecord::to(TOPIC)
                        .key(c.name.as_bytes())
                        .payload(&c.payload)
                        .headers(headers),
                )
                .unwrap();
        }
        producer.poll(Duration::ZERO);
    }
    assert!(cases_iter.next().is_none(), "every case was produced");
    producer.flush(Duration::from_secs(30)).unwrap();
    let total = (valid.len() + cases.len()) as u64;
    let malformed: BTreeMap<&str, &Case> = cases
        .iter()
        .filter(|c| c.malformed)
        .map(|c| (c.name.as_str(), c))
        .collect();

    // Analytics with a small memory cap: batches are cut by size, so the huge payloads do
    // not add up to a memory trap.
    let plugins = real_plugins().replace(
        "snapshots = \"discard\"\n",
        "snapshots = \"discard\"\n[plugin.limits]\nmemory_mib = 8\n",
    );
    let host = Host::start(config(&config_text(&bootstrap, PARTITIONS, &plugins)))
        .await
        .expect("host starts");
    wait_handled(&host, &REAL, total).await;
    wait_settled(&bootstrap, &REAL, PARTITIONS, total).await;
    for name in REAL {
        let m = host.metrics().plugin(name);
        assert_eq!(m.events_handled(), total, "{name}: every event once");
        for kind in [TrapKind::Trap, TrapKind::Deadline, TrapKind::Memory] {
            assert_eq!(m.traps(kind), 0, "{name} never failed ({kind:?})");
        }
        assert_eq!(
            m.dead_letters(DeadLetterReason::Verdict),
            malformed.len() as u64,
            "{name}: every malformed event dead-lettered by the plugin's verdict"
        );
        assert_eq!(
            m.events(Outcome::Ok) + m.events(Outcome::Skip),
            total - malformed.len() as u64
        );
    }
    host.stop().await.unwrap();

    for name in REAL {
        let dlq = read_topic(&bootstrap, &format!("{name}-dlq"), malformed.len());
        let mut seen = BTreeMap::new();
        for m in &dlq {
            let key = String::from_utf8(m.key().unwrap().to_vec()).unwrap();
            let case = malformed
                .get(key.as_str())
                .unwrap_or_else(|| panic!("{name} dead-lettered `{key}`, which is not malformed"));
            assert_eq!(
                m.payload().unwrap_or_default(),
                &case.payload[..],
                "{key}: payload as produced"
            );
            assert_eq!(
                header(m, "corpus-file").as_deref(),
                Some(key.as_str()),
                "original headers kept"
            );
            let reason = header(m, "eddy.reason").unwrap();
            assert!(
                reason.contains("not an activity event") || reason.contains("empty payload"),
                "{name}, {key}: the parser's reason, not `{reason}`"
            );
            seen.insert(key, reason);
        }
        assert_eq!(
            seen.len(),
            malformed.len(),
            "{name}: each malformed event dead-lettered once"
        );
        assert_eq!(
            committed_total(&bootstrap, &format!("eddy-{name}"), PARTITIONS),
            total as i64
        );
    }
}
