//! Plugins that panic, loop forever or eat memory on one poison event, run beside the real
//! analytics plugin: the others are unaffected, the bad plugins' good events are handled once,
//! the poison events are dead-lettered with the reason, and no offset passes an unaccounted
//! event.

mod common;

use common::*;
use eddy::Host;
use eddy::metrics::{Outcome, TrapKind};
use rdkafka::Message;
use std::collections::BTreeSet;
use std::time::Duration;

const GOOD: usize = 400;
const PARTITIONS: i32 = 3;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plugin_that_traps_loops_or_eats_memory_hurts_nothing_else() {
    let broker = broker(PARTITIONS);
    let bootstrap = broker.bootstrap_servers().to_string();

    // Good events with three poison events among them. A poison event is a valid activity
    // event (analytics counts it) that carries the fixtures' marker.
    let mut records: Vec<(Option<Vec<u8>>, Vec<u8>)> = generate(GOOD, &generator_options(11, 0))
        .into_iter()
        .map(|g| (Some(g.key.into_bytes()), g.payload))
        .collect();
    let poison_keys = ["poison-a", "poison-b", "poison-c"];
    for (i, key) in poison_keys.iter().enumerate() {
        let payload = format!(r#"{{"user_id":"{key}","event_type":"click","note":"POISON"}}"#);
        records.insert(
            100 + i * 120,
            (Some(key.as_bytes().to_vec()), payload.into_bytes()),
        );
    }
    produce(&bootstrap, TOPIC, &records);
    let total = records.len();

    let fixture = wasm("eddy_fixture_misbehave");
    let plugins = format!(
        r#"
[[plugin]]
name = "analytics"
path = "{analytics}"
tick_interval_ms = 0
[plugin.outputs]
snapshots = "discard"

[[plugin]]
name = "panics"
path = "{fixture}"
[plugin.config]
mode = "panic"

[[plugin]]
name = "loops"
path = "{fixture}"
[plugin.limits]
cpu_ms = 100
[plugin.config]
mode = "loop"

[[plugin]]
name = "grows"
path = "{fixture}"
[plugin.limits]
memory_mib = 16
[plugin.config]
mode = "grow"
"#,
        analytics = wasm("eddy_analytics"),
    );
    let host = Host::start(config(&config_text(&bootstrap, PARTITIONS, &plugins)))
        .await
        .expect("host starts");
    let metrics = host.metrics().clone();
    let names = ["analytics", "panics", "loops", "grows"];
    tokio::task::spawn_blocking(move || {
        wait_for(
            Duration::from_secs(120),
            "every plugin to account for every event",
            || {
                names
                    .iter()
                    .all(|n| metrics.plugin(n).events_handled() >= total as u64)
            },
        )
    })
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;

    let analytics = host.metrics().plugin("analytics");
    assert_eq!(
        analytics.events(Outcome::Ok),
        total as u64,
        "the good plugin handled everything"
    );
    assert_eq!(
        analytics.traps(TrapKind::Trap) + analytics.traps(TrapKind::Deadline),
        0
    );

    for (name, kind) in [
        ("panics", TrapKind::Trap),
        ("loops", TrapKind::Deadline),
        ("grows", TrapKind::Memory),
    ] {
        let m = host.metrics().plugin(name);
        assert_eq!(
            m.events(Outcome::Ok),
            GOOD as u64,
            "{name}: every good event once"
        );
        assert_eq!(
            m.events(Outcome::DeadLetter),
            poison_keys.len() as u64,
            "{name}: every poison event dead-lettered"
        );
        assert!(
            m.traps(kind) >= poison_keys.len() as u64,
            "{name}: traps of kind {kind:?} counted"
        );
    }
    host.stop().await.expect("clean stop");

    for name in names {
        assert_eq!(
            committed_total(&bootstrap, &format!("eddy-{name}"), PARTITIONS),
            total as i64,
            "group of {name}"
        );
    }

    // The dead letters: original key and payload, and headers that say where from and why.
    for (name, why) in [
        ("panics", "poison event at offset"),
        ("loops", "limits.cpu_ms = 100"),
        ("grows", "limits.memory_mib = 16"),
    ] {
        let dlq = read_topic(&bootstrap, &format!("{name}-dlq"), poison_keys.len());
        assert_eq!(dlq.len(), poison_keys.len(), "{name}-dlq");
        let keys: BTreeSet<String> = dlq
            .iter()
            .map(|m| String::from_utf8(m.key().unwrap().to_vec()).unwrap())
            .collect();
        assert_eq!(keys, poison_keys.iter().map(|k| k.to_string()).collect());
        for m in &dlq {
            assert!(
                std::str::from_utf8(m.payload().unwrap())
                    .unwrap()
                    .contains("POISON")
            );
            let reason = header(m, "eddy.reason").unwrap();
            assert!(
                reason.contains(why),
                "{name}: reason `{reason}` should mention `{why}`"
            );
            assert_eq!(header(m, "eddy.plugin").as_deref(), Some(name));
            assert_eq!(header(m, "eddy.source.topic").as_deref(), Some(TOPIC));
            assert!(
                header(m, "eddy.source.offset")
                    .unwrap()
                    .parse::<i64>()
                    .is_ok()
            );
            assert!(
                header(m, "eddy.source.partition")
                    .unwrap()
                    .parse::<i32>()
                    .is_ok()
            );
        }
    }
}
