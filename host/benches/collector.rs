//! The HTTP collector's cost: `cargo bench -p eddy --bench collector`.
//!
//! `POST /v1/events` into the embedded broker, from 4 concurrent clients (blocking HTTP/1.1
//! keep-alive clients, one thread each), in batches of 100 events and of 1: events per
//! second, and the 50th and 99th percentile of a request's latency (sent to answered, the
//! answer coming once Kafka has acknowledged every event). The baseline, in the same run on
//! the same broker: the same events, in the same batches, from 4 concurrent tasks producing
//! directly with the collector's own producer (same settings) and waiting for every
//! acknowledgement of a batch, as the collector does. The ratio is what HTTP costs: reading
//! and checking the body (the SDK's parser on every event), building the answer, and the
//! client's side of it, all on the same 2 cores.
//!
//! Only the collector runs (no plugins consuming meanwhile). Every event has its own
//! `event_id`, so none is taken for a duplicate. `EDDY_BENCH_SECONDS` (default 5) sets how
//! long each figure is measured.

use eddy::config::Config;
use eddy::generator::{Generator, GeneratorOptions};
use eddy::http::collector;
use eddy::kafka::EmbeddedBroker;
use eddy::metrics::Metrics;
use rdkafka::producer::{FutureProducer, FutureRecord};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

const TOPIC: &str = "user-activities";
const CLIENTS: usize = 4;
const BATCHES: [usize; 2] = [100, 1];

/// One figure: events per second and request (or batch) latency percentiles.
struct Figure {
    events_per_s: f64,
    p50: Duration,
    p99: Duration,
}

fn figure(events: usize, took: Duration, mut latencies: Vec<Duration>) -> Figure {
    latencies.sort();
    let at = |q: f64| latencies[((latencies.len() as f64 * q) as usize).min(latencies.len() - 1)];
    Figure {
        events_per_s: events as f64 / took.as_secs_f64(),
        p50: at(0.50),
        p99: at(0.99),
    }
}

/// `total` distinct events (payload, key), each with its own `event_id`.
fn events(total: usize) -> Vec<(String, String)> {
    Generator::new(GeneratorOptions {
        seed: 11,
        fraud_every: 0,
        start_ms: 1_705_314_600_000,
        spacing_ms: 10,
        ..Default::default()
    })
    .take(total)
    .enumerate()
    .map(|(i, g)| {
        let mut v: serde_json::Value = serde_json::from_slice(&g.payload).unwrap();
        v["event_id"] = serde_json::json!(format!("bench-{i}"));
        (v.to_string(), g.key)
    })
    .collect()
}

fn main() -> anyhow::Result<()> {
    let seconds: u64 = std::env::var("EDDY_BENCH_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(5);
    let window = Duration::from_secs(seconds);
    let broker = EmbeddedBroker::start()?;
    broker.create_topic(TOPIC, 6)?;
    let text = format!(
        "[kafka]\nbrokers = \"{}\"\n[http]\naddress = \"127.0.0.1:0\"\n[[plugin]]\nname = \"none\"\npath = \"none.wasm\"\n",
        broker.bootstrap_servers()
    );
    let config = Config::parse(&text, std::path::Path::new("plugins.toml"))?;
    let client = eddy::kafka::client_config(&config.kafka, broker.bootstrap_servers());
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let addr = rt.block_on(async {
        let listener = eddy::http::bind(config.http.address).await?;
        let addr = listener.local_addr()?;
        let metrics = Arc::new(Metrics::default());
        let c = collector::Collector::new(&config, &client, metrics.clone())?;
        let http = config.http.clone();
        tokio::spawn(async move {
            eddy::http::serve(
                listener,
                collector::router(c, &[]),
                &http,
                &metrics,
                stopped,
            )
            .await
        });
        anyhow::Ok(addr)
    })?;
    let url = format!("http://{addr}/v1/events");
    // Enough distinct events for the fastest figure; the pool is reused across figures by
    // an offset that never repeats an `event_id` within the collector's memory.
    let pool = Arc::new(events(400_000));
    let next = Arc::new(AtomicUsize::new(0));
    let producer = collector::producer(&config, &client)?;

    println!(
        "collector: POST /v1/events into the embedded broker, {CLIENTS} clients, {seconds} s per figure"
    );
    println!(
        "  batch | HTTP events/s   p50 ms   p99 ms | direct events/s   p50 ms   p99 ms | HTTP/direct"
    );
    let warm_up = Duration::from_millis(500);
    for batch in BATCHES {
        // Warm up, then measure.
        measure(batch, warm_up, &pool, &next, || http_client(&url));
        let http = measure(batch, window, &pool, &next, || http_client(&url));
        let direct_client = || direct_client(&producer, rt.handle());
        measure(batch, warm_up, &pool, &next, direct_client);
        let direct = measure(batch, window, &pool, &next, direct_client);
        println!(
            "  {batch:>5} | {:>13.0} {:>8.2} {:>8.2} | {:>15.0} {:>8.2} {:>8.2} | {:>10.2}",
            http.events_per_s,
            ms(http.p50),
            ms(http.p99),
            direct.events_per_s,
            ms(direct.p50),
            ms(direct.p99),
            http.events_per_s / direct.events_per_s,
        );
    }
    let _ = stop.send(true);
    Ok(())
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// The next `batch` events of the pool (wrapping around).
fn take(pool: &[(String, String)], next: &AtomicUsize, batch: usize) -> Vec<(String, String)> {
    let start = next.fetch_add(batch, Ordering::Relaxed);
    (start..start + batch)
        .map(|i| pool[i % pool.len()].clone())
        .collect()
}

/// Runs `CLIENTS` client threads for `window`, each taking the next `batch` events and
/// handing them to its own client (made by `new_client`), which returns once they are
/// acknowledged; the events per second and each call's latency.
fn measure<C: FnMut(&[(String, String)]) + Send + 'static>(
    batch: usize,
    window: Duration,
    pool: &Arc<Vec<(String, String)>>,
    next: &Arc<AtomicUsize>,
    new_client: impl Fn() -> C,
) -> Figure {
    let started = Instant::now();
    let threads: Vec<_> = (0..CLIENTS)
        .map(|_| {
            let (pool, next, mut client) = (pool.clone(), next.clone(), new_client());
            std::thread::spawn(move || {
                let mut latencies = Vec::new();
                while started.elapsed() < window {
                    let events = take(&pool, &next, batch);
                    let t = Instant::now();
                    client(&events);
                    latencies.push(t.elapsed());
                }
                latencies
            })
        })
        .collect();
    let latencies: Vec<Duration> = threads
        .into_iter()
        .flat_map(|t| t.join().unwrap())
        .collect();
    figure(latencies.len() * batch, started.elapsed(), latencies)
}

/// A client posting events to `url` (one event alone, more as an array).
fn http_client(url: &str) -> impl FnMut(&[(String, String)]) + Send + 'static {
    let url = url.to_string();
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .build()
        .into();
    move |events| {
        let body = if events.len() == 1 {
            events[0].0.clone()
        } else {
            let payloads: Vec<&str> = events.iter().map(|e| e.0.as_str()).collect();
            format!("[{}]", payloads.join(","))
        };
        let mut r = agent
            .post(&url)
            .header("content-type", "application/json")
            .send(&body)
            .expect("POST");
        let answer = r.body_mut().read_to_string().unwrap();
        assert_eq!(r.status(), 200, "{answer}");
    }
}

/// A client producing events directly with `producer`, waiting for every acknowledgement.
fn direct_client(
    producer: &FutureProducer,
    rt: &tokio::runtime::Handle,
) -> impl FnMut(&[(String, String)]) + Send + 'static {
    let (producer, rt) = (producer.clone(), rt.clone());
    move |events| {
        let pending: Vec<_> = events
            .iter()
            .map(|(payload, key)| {
                producer
                    .send_result(FutureRecord::to(TOPIC).key(key).payload(payload))
                    .map_err(|(e, _)| e)
                    .expect("queued")
            })
            .collect();
        rt.block_on(async {
            for delivery in pending {
                delivery.await.expect("delivered").expect("acknowledged");
            }
        });
    }
}
