//! The real plugins' pace beside misbehaving ones: `make bench-isolation` (or `cargo bench -p
//! eddy --bench isolation` after `make plugins`).
//!
//! The four shipped plugins drain 12,000 events twice per round: beside the four `misbehave`
//! fixtures configured to match nothing, and beside the same fixtures panicking, looping,
//! eating memory and retrying forever on three poison events each. Both runs do the same
//! work on the same events; the ratio of the best rates is what a misbehaving plugin costs
//! the others. That every count stays exact is a test (`tests/fault_isolation.rs`); this is
//! only the pace, which a 2-core machine shared with other work cannot time reliably enough
//! for a pass/fail test.

#[path = "../tests/common/mod.rs"]
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
    // Every plugin of the config, not `metrics.plugin_names()`: a worker registers its
    // metrics when it starts, which may be after `Host::start` returns.
    let names: Vec<String> = REAL
        .iter()
        .chain(&["panics", "loops", "grows", "retries"])
        .map(|n| n.to_string())
        .collect();
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

/// Rounds of (behaving, misbehaving), alternating so that drift in the machine's load hits
/// both sides alike; the best of each side is compared.
const ROUNDS: usize = 3;

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a tokio runtime");
    runtime.block_on(async {
        let records = records_with_poison(12_000, 21);
        let (mut behaving, mut misbehaving) = (0f64, 0f64);
        for round in 1..=ROUNDS {
            let b = real_plugins_rate(&records, &bad_plugins("NOTHING-MATCHES")).await;
            let m = real_plugins_rate(&records, &bad_plugins("POISON")).await;
            println!("round {round}: {b:.0} events/s beside behaving fixtures, {m:.0} beside misbehaving ones");
            behaving = behaving.max(b);
            misbehaving = misbehaving.max(m);
        }
        println!(
            "best: {behaving:.0} vs {misbehaving:.0} events/s: misbehaving neighbours leave the real plugins {:.2}x their pace",
            misbehaving / behaving
        );
    });
}
