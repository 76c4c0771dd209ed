//! A real Kafka-protocol broker for the integration tests: tansu, as its own process on
//! 127.0.0.1, storing in SQLite (never its `memory://` engine, which loses messages: see
//! `../shared/notes/kafka-brokers.md`). Unlike the embedded broker it keeps topics and
//! committed offsets on disk, so it can be stopped and started again under a running host.
//!
//! The binary is `$EDDY_TANSU`, else `tansu` in the place `make tansu` installs it. A test
//! that needs it and cannot find it fails, saying how to get it: a real-broker test that
//! did not run must never look like one that passed.

use super::TOPIC;
use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Where `make tansu` installs the binary (kept in step with the Makefile).
pub fn default_binary() -> PathBuf {
    let home = std::env::var_os("HOME").map_or_else(|| PathBuf::from("/root"), PathBuf::from);
    home.join(".cache/eddy/tansu-0.6.0/bin/tansu")
}

fn binary() -> PathBuf {
    let path = std::env::var_os("EDDY_TANSU").map_or_else(default_binary, PathBuf::from);
    assert!(
        path.is_file(),
        "the real-broker tests need tansu, and {} does not exist: run `make tansu` once \
         (builds it, ~25 min on 2 cores) or set EDDY_TANSU to a tansu 0.6 binary built with \
         `--features libsql,dynostore`",
        path.display()
    );
    path
}

/// A running tansu broker with its own port and SQLite file; stopped when dropped.
pub struct Tansu {
    child: Option<Child>,
    port: u16,
    dir: tempfile::TempDir,
}

impl Tansu {
    /// Starts a broker with empty storage and waits until it answers.
    pub fn start() -> Tansu {
        let mut t = Tansu {
            child: None,
            port: super::host_process::free_port(),
            dir: tempfile::tempdir().unwrap(),
        };
        t.restart();
        t
    }

    pub fn bootstrap(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Starts the broker process again on the same port and storage (after [`Tansu::kill`]),
    /// and waits until it answers.
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "already running");
        let url = format!("tcp://127.0.0.1:{}", self.port);
        let log = std::fs::File::options()
            .create(true)
            .append(true)
            .open(self.dir.path().join("tansu.log"))
            .unwrap();
        // tansu takes the path of a `sqlite://` URL as relative to its working directory
        // (`sqlite:///tmp/x.db` opens `./tmp/x.db`): run it in the broker's directory.
        let child = Command::new(binary())
            .current_dir(self.dir.path())
            .arg("broker")
            .args(["--listener-url", &url, "--advertised-listener-url", &url])
            .args(["--storage-engine", "sqlite://tansu.db"])
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start tansu");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "tansu did not listen on {} within 30 s; its log:\n{}",
                self.port,
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Stops the broker abruptly (SIGKILL), as a crash or a lost machine would.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Creates the input topic with `partitions` partitions.
    pub fn create_topic(&self, partitions: i32) {
        self.create_named_topic(TOPIC, partitions);
    }

    /// Creates topic `name` with `partitions` partitions.
    #[allow(dead_code)]
    pub fn create_named_topic(&self, name: &str, partitions: i32) {
        let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
            .set("bootstrap.servers", self.bootstrap())
            .create()
            .expect("admin client");
        let topic = NewTopic::new(name, partitions, TopicReplication::Fixed(1));
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let results = runtime
            .block_on(admin.create_topics(
                [&topic],
                &AdminOptions::new().operation_timeout(Some(Duration::from_secs(20))),
            ))
            .expect("create topics");
        for r in results {
            r.unwrap_or_else(|(t, e)| panic!("creating {t}: {e}; tansu log:\n{}", self.log()));
        }
    }

    /// What the broker logged, for a failure message.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("tansu.log")).unwrap_or_default()
    }
}

impl Drop for Tansu {
    fn drop(&mut self) {
        self.kill();
    }
}
