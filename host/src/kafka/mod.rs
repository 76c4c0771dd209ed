//! Kafka: the client settings every consumer and producer shares, the embedded broker, the
//! consumer's callbacks (where partitions start, lag, connectivity) and what the host knows of
//! the cluster, and the admin questions `eddy replay` asks. Every rdkafka consumer call of
//! the host is here; producers are in the sinks and the generator. `blocking` is how code
//! that may run on an async runtime thread (a consumer callback) waits for a broker.

pub mod admin;
pub mod cluster;
pub mod consumer;
pub mod embedded;
pub mod shared_fetch;

pub use cluster::ClusterView;
pub use embedded::EmbeddedBroker;

use crate::config::KafkaConfig;
use rdkafka::ClientConfig;
use std::collections::BTreeMap;

/// Offsets by (topic, partition): the next offset to consume.
pub type Offsets = BTreeMap<(String, i32), i64>;

/// Runs `f`, which waits on a broker, where that may be done from code that can find itself
/// on an async runtime thread (a consumer callback runs inside the poll of an async task):
/// on the multi-thread runtime the thread's other tasks move to another thread meanwhile
/// (`block_in_place`), so they keep running; anywhere else `f` simply runs.
pub(crate) fn blocking<T>(f: impl FnOnce() -> T) -> T {
    use tokio::runtime::{Handle, RuntimeFlavor};
    match Handle::try_current() {
        Ok(h) if h.runtime_flavor() == RuntimeFlavor::MultiThread => tokio::task::block_in_place(f),
        _ => f(),
    }
}

/// Client settings for `brokers`, with the pass-through `[kafka.settings]` applied.
pub fn client_config(kafka: &KafkaConfig, brokers: &str) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", brokers);
    for (k, v) in &kafka.settings {
        c.set(k, v);
    }
    c
}

/// This host's static group membership id (`group.instance.id`), the same at every start of
/// the same host: its hostname and a digest of its state directory (two hosts cannot share
/// one: each plugin's state file is locked by the host using it). Each plugin's consumer
/// adds its plugin's name ([`consumer::subscribe`]). With it, a restarted host (after a
/// crash or a stop) takes its partitions back at once instead of waiting for the dead
/// member's session to time out.
pub fn host_instance_id(state_dir: &std::path::Path) -> String {
    use sha2::Digest;
    let hostname = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_default();
    // Absolute, not canonical: the same before and after the directory is created.
    let dir = std::path::absolute(state_dir).unwrap_or_else(|_| state_dir.to_path_buf());
    let hash = sha2::Sha256::digest(dir.as_os_str().as_encoded_bytes());
    let hex: String = hash[..6].iter().map(|b| format!("{b:02x}")).collect();
    // Kafka allows letters, digits, `.`, `_` and `-` in the id.
    let host: String = hostname
        .trim()
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '.' || c == '_' || c == '-' {
                c
            } else {
                '_'
            }
        })
        .take(64)
        .collect();
    format!("eddy-{host}-{hex}")
}

/// Waits until the cluster at `client`'s bootstrap servers answers a metadata request, for
/// at most `timeout`. Errors name the brokers and what to check: without this, a typo in
/// `brokers` would leave the host running and consuming nothing, with only librdkafka's
/// connection warnings to go on. Warns if `topic` does not exist (yet). Blocking.
pub fn wait_until_reachable(
    client: &ClientConfig,
    topic: &str,
    timeout: std::time::Duration,
) -> anyhow::Result<()> {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    use std::time::{Duration, Instant};
    let brokers = client.get("bootstrap.servers").unwrap_or("?").to_string();
    let consumer: BaseConsumer = client
        .create()
        .map_err(|e| anyhow::anyhow!("kafka.brokers = \"{brokers}\": {e}"))?;
    let deadline = Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match consumer.fetch_metadata(Some(topic), left.min(Duration::from_secs(5))) {
            Ok(md) => {
                let missing = md.topics().iter().any(|t| {
                    t.name() == topic && (t.error().is_some() || t.partitions().is_empty())
                });
                if missing {
                    tracing::warn!(
                        "topic `{topic}` does not exist on the cluster at {brokers}: the plugins wait until it is \
                         created (create it, or set kafka.topic in plugins.toml)"
                    );
                }
                return Ok(());
            }
            Err(e) if Instant::now() >= deadline => anyhow::bail!(
                "cannot reach Kafka at {brokers} within {timeout:?} ({e}): check kafka.brokers in \
                 plugins.toml and that the cluster is up (for the built-in broker, brokers = \"embedded\"; \
                 to wait longer, kafka.connect_timeout_ms)"
            ),
            Err(e) => {
                tracing::info!("waiting for Kafka at {brokers}: {e}");
                std::thread::sleep(Duration::from_millis(500).min(left));
            }
        }
    }
}

/// `future`'s output if it is ready at the first poll: what a consumer already holds,
/// taken without arming a timer per message.
pub fn ready_now<F: std::future::Future>(future: F) -> Option<F::Output> {
    let mut future = std::pin::pin!(future);
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    match future.as_mut().poll(&mut cx) {
        std::task::Poll::Ready(output) => Some(output),
        std::task::Poll::Pending => None,
    }
}

/// Whether a consumer error only reports lost connectivity (a broker down, unreachable or
/// not resolvable): librdkafka reconnects by itself, and its consumer queue may hold one such
/// error per broker and reconnect attempt, which are stale by the time they are read. Waiting
/// a backoff for each would leave a plugin idle long after the brokers are back.
pub fn is_connectivity_error(e: &rdkafka::error::KafkaError) -> bool {
    use rdkafka::types::RDKafkaErrorCode as C;
    matches!(
        e.rdkafka_error_code(),
        Some(
            C::AllBrokersDown
                | C::BrokerTransportFailure
                | C::Resolve
                | C::BrokerNotAvailable
                | C::NetworkException
                | C::RequestTimedOut
                | C::OperationTimedOut
        )
    )
}
