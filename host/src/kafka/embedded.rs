//! The embedded broker, used when `plugins.toml` says `brokers = "embedded"`.
//!
//! It is librdkafka's mock cluster: a real Kafka-protocol server on a loopback port, in this
//! process, so `eddy run` works with no Kafka installed and any Kafka client can connect to
//! it. It keeps everything in memory: topics and committed offsets are gone when the host
//! exits.

use rdkafka::mocking::MockCluster;
use std::sync::mpsc;
use std::thread::JoinHandle;

enum Command {
    CreateTopic {
        name: String,
        partitions: i32,
        reply: mpsc::Sender<Result<(), String>>,
    },
    FailProduce {
        requests: usize,
        reply: mpsc::Sender<()>,
    },
    RoundTripTime {
        delay: std::time::Duration,
        reply: mpsc::Sender<Result<(), String>>,
    },
    Stop,
}

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
        let (ready_tx, ready_rx) = mpsc::channel();
        let (commands, rx) = mpsc::channel::<Command>();
        let thread = std::thread::Builder::new()
            .name("eddy-broker".into())
            .spawn(move || {
                let cluster = match MockCluster::new(1) {
                    Ok(c) => c,
                    Err(e) => {
                        let _ = ready_tx.send(Err(e.to_string()));
                        return;
                    }
                };
                let _ = ready_tx.send(Ok(cluster.bootstrap_servers()));
                for command in rx {
                    match command {
                        Command::CreateTopic {
                            name,
                            partitions,
                            reply,
                        } => {
                            let _ = reply.send(
                                cluster
                                    .create_topic(&name, partitions, 1)
                                    .map_err(|e| e.to_string()),
                            );
                        }
                        Command::FailProduce { requests, reply } => {
                            use rdkafka::types::RDKafkaApiKey;
                            use rdkafka::types::RDKafkaRespErr;
                            // Not retried by librdkafka, so the producer reports it at once; and
                            // not an error that is for good (see `sinks::is_permanent`), so the
                            // host retries: a broker refusing for a while.
                            let errors = vec![RDKafkaRespErr::RD_KAFKA_RESP_ERR_UNKNOWN; requests];
                            cluster.request_errors(RDKafkaApiKey::Produce, &errors);
                            let _ = reply.send(());
                        }
                        Command::RoundTripTime { delay, reply } => {
                            let _ = reply.send(
                                cluster
                                    .broker_round_trip_time(-1, delay)
                                    .map_err(|e| e.to_string()),
                            );
                        }
                        Command::Stop => break,
                    }
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

    /// Creates `name` with `partitions` partitions (the embedded broker does not implement
    /// the admin API; topics that are only written to are auto-created with 4 partitions).
    /// Makes the next `requests` produce requests fail (an unknown broker error, which the
    /// host retries), to test what the host does when it cannot deliver for a while.
    pub fn fail_next_produce_requests(&self, requests: usize) -> anyhow::Result<()> {
        let (reply, rx) = mpsc::channel();
        self.commands
            .send(Command::FailProduce { requests, reply })
            .map_err(|_| anyhow::anyhow!("the embedded broker has stopped"))?;
        rx.recv()
            .map_err(|_| anyhow::anyhow!("the embedded broker has stopped"))
    }

    /// Delays every answer of the broker by `delay` (zero: no delay). The broker still
    /// handles each request when it arrives, so a client that gives up waiting may have
    /// written what it believes lost: a stalled broker, for tests.
    pub fn set_round_trip_time(&self, delay: std::time::Duration) -> anyhow::Result<()> {
        let (reply, rx) = mpsc::channel();
        self.commands
            .send(Command::RoundTripTime { delay, reply })
            .map_err(|_| anyhow::anyhow!("the embedded broker has stopped"))?;
        rx.recv()
            .map_err(|_| anyhow::anyhow!("the embedded broker has stopped"))?
            .map_err(|e| anyhow::anyhow!("cannot delay the embedded broker: {e}"))
    }

    pub fn create_topic(&self, name: &str, partitions: i32) -> anyhow::Result<()> {
        let (reply, rx) = mpsc::channel();
        self.commands
            .send(Command::CreateTopic {
                name: name.to_string(),
                partitions,
                reply,
            })
            .map_err(|_| anyhow::anyhow!("the embedded broker has stopped"))?;
        rx.recv()
            .map_err(|_| anyhow::anyhow!("the embedded broker has stopped"))?
            .map_err(|e| anyhow::anyhow!("cannot create topic `{name}`: {e}"))
    }
}

impl Drop for EmbeddedBroker {
    fn drop(&mut self) {
        let _ = self.commands.send(Command::Stop);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
