//! `eddy produce` when the broker stalls: the number of events it reports undelivered is
//! exactly the number missing from the topic, and no event is in the topic twice.

mod common;

use common::TOPIC;
use eddy::generator::{ProduceOptions, produce_blocking};
use rdkafka::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

/// How many records `TOPIC` holds: the sum of its partitions' high watermarks (the embedded
/// broker never compacts or deletes).
fn records_in_topic(bootstrap: &str, partitions: i32) -> i64 {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .create()
        .expect("consumer");
    (0..partitions)
        .map(|p| {
            let (low, high) = consumer
                .fetch_watermarks(TOPIC, p, Duration::from_secs(10))
                .expect("watermarks");
            assert_eq!(low, 0);
            high
        })
        .sum()
}

/// The number in "N of M events were not delivered", 0 for a success.
fn reported_undelivered(result: &anyhow::Result<u64>) -> (u64, String) {
    match result {
        Ok(_) => (0, String::new()),
        Err(e) => {
            let text = format!("{e:#}");
            let n = text
                .split_whitespace()
                .next()
                .and_then(|w| w.parse().ok())
                .unwrap_or_else(|| panic!("no count in the error: {text}"));
            (n, text)
        }
    }
}

#[test]
fn a_stalled_broker_gets_an_exact_undelivered_count_and_no_duplicate() {
    common::init_logs();
    const EVENTS: u64 = 4000;
    const PARTITIONS: i32 = 2;
    let broker = common::broker(PARTITIONS);
    let bootstrap = broker.bootstrap_servers().to_string();
    let mut client = ClientConfig::new();
    client
        .set("bootstrap.servers", &bootstrap)
        // Short, so that the stall below outlasts it.
        .set("message.timeout.ms", "1000");
    let opts = ProduceOptions {
        topic: TOPIC.to_string(),
        events: Some(EVENTS),
        rate: 1000,
        generator: common::generator_options(9, 0),
    };
    let produced = AtomicU64::new(0);
    let result = std::thread::scope(|s| {
        s.spawn(|| {
            // A stall in mid-run: the broker writes what it is sent but answers 5 s late,
            // after the producer has given up waiting; then it recovers.
            common::wait_for(Duration::from_secs(30), "500 events sent", || {
                produced.load(Ordering::Relaxed) >= 500
            });
            broker.set_round_trip_time(Duration::from_secs(5)).unwrap();
            common::wait_for(Duration::from_secs(30), "3000 events sent", || {
                produced.load(Ordering::Relaxed) >= 3000
            });
            broker.set_round_trip_time(Duration::ZERO).unwrap();
        });
        produce_blocking(&client, &opts, &AtomicBool::new(false), &produced)
    });
    let (undelivered, message) = reported_undelivered(&result);
    eprintln!("produce: {result:?}");
    let in_topic = records_in_topic(&bootstrap, PARTITIONS);
    assert_eq!(
        in_topic as u64,
        EVENTS - undelivered,
        "the topic holds {in_topic} of {EVENTS} events, and produce said: {message}"
    );
    let generated: HashSet<Vec<u8>> = common::generate(EVENTS as usize, &opts.generator)
        .into_iter()
        .map(|g| g.payload)
        .collect();
    let read = common::read_topic(&bootstrap, TOPIC, in_topic as usize);
    assert_eq!(read.len() as i64, in_topic);
    let mut seen = HashSet::new();
    for m in &read {
        let payload = m.payload().unwrap().to_vec();
        assert!(
            generated.contains(&payload),
            "a record produce did not make"
        );
        assert!(seen.insert(payload), "an event is in the topic twice");
    }
}
