//! Helpers for the host's integration tests: build the real plugins, run a real broker,
//! produce, read topics back, and look at committed offsets.
#![allow(dead_code)]

pub mod host_process;
pub mod misbehaving;
pub mod postgres;
pub mod tansu;

use eddy::generator::{Generated, Generator, GeneratorOptions};
use eddy::kafka::EmbeddedBroker;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message, OwnedMessage};
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

pub const TOPIC: &str = "user-activities";

/// The workspace root.
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// Builds every plugin (and fixture) for wasm32-wasip2 once per test binary, and returns the
/// directory of the `.wasm` files. Uses its own target directory so it never waits on the
/// lock of the `cargo test` that runs us.
pub fn plugins_dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        // Under CARGO_TARGET_DIR when it is set (CI keeps it outside the clone).
        let target = match std::env::var_os("CARGO_TARGET_DIR") {
            Some(dir) => root().join(dir),
            None => root().join("target"),
        }
        .join("test-plugins");
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let status = Command::new(cargo)
            .current_dir(root())
            .args(["build", "--profile", "plugin", "--target", "wasm32-wasip2"])
            .args([
                "-p",
                "eddy-logger",
                "-p",
                "eddy-analytics",
                "-p",
                "eddy-alert",
                "-p",
                "eddy-fraud",
                "-p",
                "eddy-dashboard",
                "-p",
                "eddy-behaviour",
                "-p",
                "eddy-warehouse",
                "-p",
                "eddy-reducer",
            ])
            .args([
                "-p",
                "eddy-fixture-misbehave",
                "-p",
                "eddy-fixture-wrong-world",
                "-p",
                "eddy-fixture-old-contract",
                "-p",
                "eddy-fixture-echo",
                "-p",
                "eddy-fixture-noop",
            ])
            .arg("--target-dir")
            .arg(&target)
            .status()
            .expect("run cargo to build the plugins");
        assert!(
            status.success(),
            "building the plugins failed (is the wasm32-wasip2 target installed? `make target`)"
        );
        target.join("wasm32-wasip2").join("plugin")
    })
}

pub fn wasm(name: &str) -> String {
    plugins_dir()
        .join(format!("{name}.wasm"))
        .display()
        .to_string()
}

/// An embedded broker with the input topic created.
pub fn broker(partitions: i32) -> EmbeddedBroker {
    let broker = EmbeddedBroker::start().expect("start the embedded broker");
    broker
        .create_topic(TOPIC, partitions)
        .expect("create the topic");
    broker
}

pub fn generator_options(seed: u64, fraud_every: u64) -> GeneratorOptions {
    GeneratorOptions {
        seed,
        fraud_every,
        start_ms: 1_705_314_600_000,
        spacing_ms: 250,
        ..Default::default()
    }
}

/// The first `n` events the generator makes with these options.
pub fn generate(n: usize, opts: &GeneratorOptions) -> Vec<Generated> {
    Generator::new(opts.clone()).take(n).collect()
}

/// Produces records (key, payload) and waits until all are delivered.
pub fn produce(bootstrap: &str, topic: &str, records: &[(Option<Vec<u8>>, Vec<u8>)]) {
    let records = records
        .iter()
        .map(|(key, payload)| (key.as_deref(), payload.as_slice(), None));
    produce_with_times(bootstrap, topic, records);
}

/// Produces generated events with their event time as Kafka timestamp (as `eddy produce
/// --event-timestamps` does), and waits until all are delivered.
pub fn produce_timestamped(bootstrap: &str, events: &[Generated]) {
    let records = events.iter().map(|g| {
        (
            Some(g.key.as_bytes()),
            g.payload.as_slice(),
            Some(g.time_ms),
        )
    });
    produce_with_times(bootstrap, TOPIC, records);
}

/// Produces (key, payload, Kafka timestamp) records and waits until all are delivered.
fn produce_with_times<'a>(
    bootstrap: &str,
    topic: &str,
    records: impl Iterator<Item = (Option<&'a [u8]>, &'a [u8], Option<i64>)>,
) {
    let producer: BaseProducer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("linger.ms", "5")
        .create()
        .expect("producer");
    for (key, payload, time_ms) in records {
        let mut r = BaseRecord::<[u8], [u8]>::to(topic).payload(payload);
        if let Some(k) = key {
            r = r.key(k);
        }
        if let Some(t) = time_ms {
            r = r.timestamp(t);
        }
        loop {
            match producer.send(r) {
                Ok(()) => break,
                Err((_, back)) => {
                    r = back;
                    producer.poll(Duration::from_millis(10));
                }
            }
        }
        producer.poll(Duration::ZERO);
    }
    producer.flush(Duration::from_secs(30)).expect("flush");
}

pub fn produce_generated(bootstrap: &str, events: &[Generated]) {
    let records: Vec<_> = events
        .iter()
        .map(|g| (Some(g.key.clone().into_bytes()), g.payload.clone()))
        .collect();
    produce(bootstrap, TOPIC, &records);
}

/// Reads every record of `topic` (all partitions, from the start) until `expected` records
/// were read or nothing new arrived for two seconds.
pub fn read_topic(bootstrap: &str, topic: &str, expected: usize) -> Vec<OwnedMessage> {
    read_topic_for(bootstrap, topic, expected, Duration::from_secs(2))
}

/// [`read_topic`] for a count that must be there: reads until `expected` records were read
/// or 60 s went by, however long a partition takes to answer on a loaded machine (two
/// seconds without a record is not "nothing more" then).
pub fn read_exactly(bootstrap: &str, topic: &str, expected: usize) -> Vec<OwnedMessage> {
    read_topic_for(bootstrap, topic, expected, Duration::from_secs(60))
}

/// Reads `topic` from the start until `expected` records were read or nothing new arrived
/// for `idle`.
fn read_topic_for(
    bootstrap: &str,
    topic: &str,
    expected: usize,
    idle: Duration,
) -> Vec<OwnedMessage> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", "eddy-test-reader")
        .set("enable.auto.commit", "false")
        .create()
        .expect("consumer");
    let deadline = Instant::now() + Duration::from_secs(20);
    let metadata = loop {
        let md = consumer
            .fetch_metadata(Some(topic), Duration::from_secs(5))
            .expect("metadata");
        if md
            .topics()
            .first()
            .is_some_and(|t| !t.partitions().is_empty())
            || Instant::now() > deadline
        {
            break md;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let mut tpl = TopicPartitionList::new();
    for p in metadata.topics()[0].partitions() {
        tpl.add_partition_offset(topic, p.id(), Offset::Beginning)
            .unwrap();
    }
    drop(metadata);
    consumer.assign(&tpl).expect("assign");
    let mut out = Vec::new();
    let mut idle_since = Instant::now();
    while out.len() < expected && idle_since.elapsed() < idle {
        match consumer.poll(Duration::from_millis(100)) {
            Some(Ok(m)) => {
                out.push(m.detach());
                idle_since = Instant::now();
            }
            Some(Err(e)) => panic!("reading {topic}: {e}"),
            None => {}
        }
    }
    out
}

/// The offsets `group` has committed on the input topic, summed over partitions.
pub fn committed_total(bootstrap: &str, group: &str, partitions: i32) -> i64 {
    committed_total_on(bootstrap, TOPIC, group, partitions)
}

/// The offsets `group` has committed on `topic`, summed over partitions.
pub fn committed_total_on(bootstrap: &str, topic: &str, group: &str, partitions: i32) -> i64 {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", group)
        .create()
        .expect("consumer");
    let mut tpl = TopicPartitionList::new();
    for p in 0..partitions {
        tpl.add_partition(topic, p);
    }
    let total = {
        let committed = consumer
            .committed_offsets(tpl, Duration::from_secs(10))
            .expect("committed offsets");
        let sum = committed
            .elements()
            .iter()
            .map(|e| e.offset().to_raw().unwrap_or(0).max(0))
            .sum();
        // The list must be gone before the consumer (librdkafka 2.12 hangs on drop otherwise).
        drop(committed);
        sum
    };
    drop(consumer);
    total
}

/// Waits until each of `groups` has committed offsets on the input topic summing to `end`
/// (the topic's `end` records all consumed and their effects delivered), seen on two checks
/// in a row, or panics after `timeout`. After that no event of the topic is left to arrive,
/// so what the plugins handled can be counted exactly, with no fixed wait.
pub fn wait_committed(
    bootstrap: &str,
    groups: &[&str],
    partitions: i32,
    end: i64,
    timeout: Duration,
) {
    let mut in_a_row = 0;
    wait_for(
        timeout,
        "every group to commit to the end of the topic",
        || {
            let done = groups
                .iter()
                .all(|g| committed_total(bootstrap, g, partitions) == end);
            in_a_row = if done { in_a_row + 1 } else { 0 };
            in_a_row >= 2
        },
    );
}

/// [`wait_committed`] for the default groups (`eddy-<name>`) of `names`, from async code.
pub async fn wait_settled(bootstrap: &str, names: &[&str], partitions: i32, end: u64) {
    let bootstrap = bootstrap.to_string();
    let groups: Vec<String> = names.iter().map(|n| format!("eddy-{n}")).collect();
    tokio::task::spawn_blocking(move || {
        let groups: Vec<&str> = groups.iter().map(String::as_str).collect();
        wait_committed(
            &bootstrap,
            &groups,
            partitions,
            end as i64,
            Duration::from_secs(60),
        )
    })
    .await
    .unwrap();
}

/// Waits until `f` is true, or panics with `what` after `timeout`.
pub fn wait_for(timeout: Duration, what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !f() {
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// [`wait_for`] from async code, off the runtime's threads.
pub async fn wait_async(
    timeout: Duration,
    what: &'static str,
    f: impl FnMut() -> bool + Send + 'static,
) {
    tokio::task::spawn_blocking(move || wait_for(timeout, what, f))
        .await
        .unwrap();
}

pub fn header(m: &OwnedMessage, key: &str) -> Option<String> {
    let h = m.headers()?;
    h.iter()
        .find(|h| h.key == key)
        .and_then(|h| h.value)
        .map(|v| String::from_utf8_lossy(v).into_owned())
}

/// A plain-HTTP GET against the host's metrics server.
pub async fn http_get(addr: std::net::SocketAddr, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
    s.write_all(
        format!("GET {path} HTTP/1.1\r\nhost: 127.0.0.1\r\nconnection: close\r\n\r\n").as_bytes(),
    )
    .await
    .unwrap();
    let mut body = String::new();
    s.read_to_string(&mut body).await.unwrap();
    body
}

/// `plugins.toml` text for a test: the given broker, an ephemeral metrics port, no
/// generator, and the given `[[plugin]]` entries.
pub fn config_text(bootstrap: &str, partitions: i32, plugins: &str) -> String {
    format!(
        "[kafka]\nbrokers = \"{bootstrap}\"\ntopic = \"{TOPIC}\"\npartitions = {partitions}\n\
         [kafka.settings]\n\"session.timeout.ms\" = \"6000\"\n\"fetch.wait.max.ms\" = \"20\"\n\n[http]\naddress = \"127.0.0.1:0\"\n\n{plugins}"
    )
}

/// A parsed test config, with its state in a directory of its own (never the repo's).
pub fn config(text: &str) -> eddy::config::Config {
    let mut config =
        eddy::config::Config::parse(text, &root().join("plugins.toml")).expect("valid test config");
    config.state.dir = tempfile::tempdir().expect("state dir").keep();
    config
}

/// `wasm` with a custom section appended: a new version (new digest) that behaves the same.
pub fn with_custom_section(wasm: &[u8], name: &str, payload: &[u8]) -> Vec<u8> {
    fn leb(mut n: usize, out: &mut Vec<u8>) {
        loop {
            let byte = (n & 0x7f) as u8;
            n >>= 7;
            if n == 0 {
                out.push(byte);
                return;
            }
            out.push(byte | 0x80);
        }
    }
    let mut body = Vec::new();
    leb(name.len(), &mut body);
    body.extend_from_slice(name.as_bytes());
    body.extend_from_slice(payload);
    let mut out = wasm.to_vec();
    out.push(0); // custom section id
    leb(body.len(), &mut out);
    out.extend_from_slice(&body);
    out
}

/// Replaces `path` the way a build does: write a new file, rename it over the old one.
pub fn replace_file(path: &Path, bytes: &[u8]) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, bytes).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// Produces generated events in the background at about `per_second` until `stop` is set;
/// the thread returns the events it produced (all delivered).
pub fn produce_until(
    bootstrap: String,
    opts: GeneratorOptions,
    per_second: u64,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> std::thread::JoinHandle<Vec<Generated>> {
    std::thread::spawn(move || {
        let started = Instant::now();
        let mut produced = Vec::new();
        let mut generator = Generator::new(opts);
        while !stop.load(std::sync::atomic::Ordering::Relaxed) {
            let due = started + Duration::from_secs_f64(produced.len() as f64 / per_second as f64);
            if let Some(wait) = due.checked_duration_since(Instant::now()) {
                std::thread::sleep(wait);
            }
            let chunk: Vec<Generated> = generator.by_ref().take(20).collect();
            produce_generated(&bootstrap, &chunk);
            produced.extend(chunk);
        }
        produced
    })
}

/// Sends the host's log to the test output (shown for failing tests), filtered by `EDDY_LOG`
/// (default: info).
pub fn init_logs() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let filter = tracing_subscriber::EnvFilter::try_from_env("EDDY_LOG").unwrap_or_else(|_| {
            tracing_subscriber::EnvFilter::new("info,librdkafka=warn,rdkafka=warn")
        });
        let _ = tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_test_writer()
            .try_init();
    });
}
