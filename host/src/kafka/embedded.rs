//! The embedded broker, used when `plugins.toml` says `brokers = "embedded"`.
//!
//! It is librdkafka's mock cluster: a real Kafka-protocol server on a loopback port, in this
//! process, so `eddy run` works with no Kafka installed and any Kafka client can connect to
//! it. It keeps everything in memory: topics and committed offsets are gone when the host
//! exits. For tests it can also misbehave on demand: refuse produce requests, answer late,
//! and (with several brokers) put a group's coordinator or a partition's leader on the
//! broker that answers late.

use rdkafka::mocking::{MockCluster, MockCoordinator};
use rdkafka::producer::DefaultProducerContext;
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::Duration;

type Cluster = MockCluster<'static, DefaultProducerContext>;

/// Something to do on the broker's thread; `None` stops it.
type Command = Option<Box<dyn FnOnce(&Cluster) + Send>>;

/// An in-process Kafka-protocol broker. Dropping it stops the broker.
///
/// The mock cluster is not `Send` (it holds raw librdkafka handles), so it lives on a thread
/// of its own and is driven through a channel.
pub struct EmbeddedBroker {
    bootstrap: String,
    commands: mpsc::Sender<Command>,
    thread: Option<JoinHandle<()>>,
}

impl EmbeddedBroker {
    /// Starts a one-node cluster listening on a free loopback port.
    pub fn start() -> anyhow::Result<EmbeddedBroker> {
        EmbeddedBroker::start_with_brokers(1)
    }

    /// Starts a cluster of `brokers` nodes (ids 1 to `brokers`), each on a free loopback
    /// port: with more than one, tests can slow one broker down and place a group's
    /// coordinator or a partition's leader on it.
    pub fn start_with_brokers(brokers: i32) -> anyhow::Result<EmbeddedBroker> {
        let (ready_tx, ready_rx) = mpsc::channel();
        let (commands, rx) = mpsc::channel::<Command>();
        let thread = std::thread::Builder::new()
            .name("eddy-broker".into())
            .spawn(move || {
                let cluster = match MockCluster::new(brokers) {
                    Ok(c) => c,
                    Err(e) => {
                        let _ = ready_tx.send(Err(e.to_string()));
                        return;
                    }
                };
                let _ = ready_tx.send(Ok(cluster.bootstrap_servers()));
                while let Ok(Some(command)) = rx.recv() {
                    command(&cluster);
                }
            })?;
        let bootstrap = ready_rx
            .recv()
            .map_err(|_| anyhow::anyhow!("the embedded broker thread died while starting"))?
            .map_err(|e| anyhow::anyhow!("cannot start the embedded broker: {e}"))?;
        Ok(EmbeddedBroker {
            bootstrap,
            commands,
            thread: Some(thread),
        })
    }

    /// The `bootstrap.servers` address any Kafka client can use.
    pub fn bootstrap_servers(&self) -> &str {
        &self.bootstrap
    }

    /// Runs `f` on the cluster, on the broker's thread, and returns what it returns.
    fn on_cluster<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Cluster) -> T + Send + 'static,
    ) -> anyhow::Result<T> {
        let stopped = || anyhow::anyhow!("the embedded broker has stopped");
        let (reply, rx) = mpsc::channel();
        self.commands
            .send(Some(Box::new(move |cluster: &Cluster| {
                let _ = reply.send(f(cluster));
            })))
            .map_err(|_| stopped())?;
        rx.recv().map_err(|_| stopped())
    }

    /// Runs the mock cluster's operation `f` on the broker's thread; an error says `what`
    /// could not be done, and why.
    fn mock_op(
        &self,
        what: String,
        f: impl FnOnce(&Cluster) -> rdkafka::error::KafkaResult<()> + Send + 'static,
    ) -> anyhow::Result<()> {
        self.on_cluster(move |c| f(c).map_err(|e| e.to_string()))?
            .map_err(|e| anyhow::anyhow!("{what}: {e}"))
    }

    /// Makes the next `requests` produce requests fail (an unknown broker error, which the
    /// host retries), to test what the host does when it cannot deliver for a while.
    pub fn fail_next_produce_requests(&self, requests: usize) -> anyhow::Result<()> {
        use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};
        // Not retried by librdkafka, so the producer reports it at once; and not an error
        // that is for good (see `sinks::is_permanent`), so the host retries.
        let errors = vec![RDKafkaRespErr::RD_KAFKA_RESP_ERR_UNKNOWN; requests];
        self.on_cluster(move |c| c.request_errors(RDKafkaApiKey::Produce, &errors))
    }

    /// Delays every answer of every broker by `delay` (zero: no delay). The broker still
    /// handles each request when it arrives, so a client that gives up waiting may have
    /// written what it believes lost: a stalled broker, for tests.
    pub fn set_round_trip_time(&self, delay: Duration) -> anyhow::Result<()> {
        self.set_broker_round_trip_time(-1, delay)
    }

    /// [`EmbeddedBroker::set_round_trip_time`] for broker `broker` only (-1: all).
    pub fn set_broker_round_trip_time(&self, broker: i32, delay: Duration) -> anyhow::Result<()> {
        self.mock_op("cannot delay the embedded broker".into(), move |c| {
            c.broker_round_trip_time(broker, delay)
        })
    }

    /// Takes broker `broker` down (`false`: it closes its connections and refuses new
    /// ones) or brings it back up (`true`): a broker that is unreachable for a while.
    pub fn set_broker_up(&self, broker: i32, up: bool) -> anyhow::Result<()> {
        self.mock_op(
            format!("cannot take broker {broker} up or down"),
            move |c| {
                if up {
                    c.broker_up(broker)
                } else {
                    c.broker_down(broker)
                }
            },
        )
    }

    /// Makes broker `broker` the coordinator of consumer group `group` (by default a hash of
    /// the name picks it).
    pub fn set_group_coordinator(&self, group: &str, broker: i32) -> anyhow::Result<()> {
        let group = group.to_string();
        self.mock_op(format!("cannot move group `{group}`"), move |c| {
            c.coordinator(MockCoordinator::Group(group), broker)
        })
    }

    /// Makes broker `broker` the leader of `topic`'s partition `partition`.
    pub fn set_partition_leader(
        &self,
        topic: &str,
        partition: i32,
        broker: i32,
    ) -> anyhow::Result<()> {
        let topic = topic.to_string();
        self.mock_op(format!("cannot move `{topic}` [{partition}]"), move |c| {
            c.partition_leader(&topic, partition, Some(broker))
        })
    }

    /// Creates `name` with `partitions` partitions (the embedded broker does not implement
    /// the admin API; topics that are only written to are auto-created with 4 partitions).
    pub fn create_topic(&self, name: &str, partitions: i32) -> anyhow::Result<()> {
        let topic = name.to_string();
        self.mock_op(format!("cannot create topic `{name}`"), move |c| {
            c.create_topic(&topic, partitions, 1)
        })
    }
}

impl Drop for EmbeddedBroker {
    fn drop(&mut self) {
        let _ = self.commands.send(None);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
