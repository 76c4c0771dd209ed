//! The real plugins' pace beside misbehaving ones. On its own in this test binary: cargo runs
//! test binaries one after another, so no other test shares the two cores with it.

mod common;

use common::misbehaving::*;
use common::*;
use eddy::Host;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

const PARTITIONS: i32 = 3;

/// Events per second for the four real plugins to drain `records`, produced after every
/// plugin joined its group, with `extra` plugins running beside them.
async fn real_plugins_rate(records: &[(Option<Vec<u8>>, Vec<u8>)], extra: &str) -> f64 {
    let broker = broker(PARTITIONS);
    let bootstrap = broker.bootstrap_servers().to_string();
    let text = config_text(&bootstrap, PARTITIONS, &(real_plugins() + extra));
    let host = Host::start(config(&text)).await.expect("host starts");
    let metrics = host.metrics().clone();
    let names: Vec<String> = metrics.plugin_names();
    // Joined: lag is known once the consumer has its partitions.
    let m = metrics.clone();
    wait_async(Duration::from_secs(60), "every plugin to join", move || {
        names
            .iter()
            .all(|n| m.plugin(n).consumer_lag.load(Relaxed) >= 0)
    })
    .await;
    let started = Instant::now();
    let records = Arc::new(records.to_vec());
    let (b, r) = (bootstrap.clone(), records.clone());
    tokio::task::spawn_blocking(move || produce(&b, TOPIC, &r))
        .await
        .unwrap();
    let total = records.len() as u64;
    wait_handled(&host, &REAL, total).await;
    let rate = total as f64 / started.elapsed().as_secs_f64();
    for name in REAL {
        assert_eq!(metrics.plugin(name).events_handled(), total, "{name}");
    }
    host.stop().await.unwrap();
    rate
}

/// The claim: a misbehaving plugin costs the others no more than the same plugin behaving.
/// Both runs have the same plugins doing the same work on the same events; in one, the
/// fixtures panic, loop, eat memory and retry on the poison events (three in 12,000, for
/// each of four bad plugins). The machine is small and shared, so each is run twice and
/// the best runs are compared; the margin (0.75) is stated in the README.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_real_plugins_keep_their_pace_beside_misbehaving_ones() {
    init_logs();
    let records = records_with_poison(12_000, 21);
    let (mut behaving, mut misbehaving) = (0f64, 0f64);
    for _ in 0..2 {
        behaving = behaving.max(real_plugins_rate(&records, &bad_plugins("NOTHING-MATCHES")).await);
        misbehaving = misbehaving.max(real_plugins_rate(&records, &bad_plugins("POISON")).await);
    }
    let ratio = misbehaving / behaving;
    println!(
        "real plugins: {behaving:.0} events/s beside behaving fixtures, {misbehaving:.0} beside misbehaving ones: {ratio:.2}x"
    );
    assert!(
        ratio >= 0.75,
        "the real plugins slowed to {ratio:.2}x beside misbehaving plugins ({misbehaving:.0} vs {behaving:.0} events/s)"
    );
}
