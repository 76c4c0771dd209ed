//! The real `eddy` binary as a child process: a `plugins.toml` for it, start, SIGINT, and
//! its `/healthz` read over plain TCP.

use super::wasm;
use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A port that is free now and that nothing else in this run will be handed.
///
/// Not the kernel's port 0: that picks from the ephemeral range (32768-60999 here), the
/// same range outgoing connections take their local ports from, so between our probe and
/// the child's bind, a Kafka client's connection could take it (CI saw exactly that:
/// "Address already in use" for a host's /metrics). Ports below that range are never
/// handed out implicitly; a per-process counter (started from the pid, so test binaries
/// run one after another do not retry the same ports) keeps concurrent tests apart.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    const FIRST: u32 = 20_000;
    const SPAN: u32 = 12_000; // below 32768, the start of Linux's default ephemeral range
    static NEXT: AtomicU32 = AtomicU32::new(u32::MAX);
    let _ = NEXT.compare_exchange(
        u32::MAX,
        std::process::id().wrapping_mul(7919) % SPAN,
        Ordering::SeqCst,
        Ordering::SeqCst,
    );
    for _ in 0..SPAN {
        let port = (FIRST + NEXT.fetch_add(1, Ordering::SeqCst) % SPAN) as u16;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free port in {FIRST}..{}", FIRST + SPAN);
}

/// A `plugins.toml` in `dir` for `plugins` against `bootstrap`, with metrics on `port`.
pub fn write_config(dir: &Path, bootstrap: &str, port: u16, plugins: &str) {
    let text = format!(
        "[kafka]\nbrokers = \"{bootstrap}\"\n[kafka.settings]\n\"session.timeout.ms\" = \"3000\"\n\
         \"heartbeat.interval.ms\" = \"500\"\n\"fetch.wait.max.ms\" = \"20\"\n\
         \"max.poll.interval.ms\" = \"10000\"\n{debug}\
         [http]\naddress = \"127.0.0.1:{port}\"\n[reload]\nwatch = false\n{plugins}",
        // librdkafka's own trace, when chasing a problem: EDDY_TEST_RDKAFKA_DEBUG=consumer,cgrp,fetch
        debug = std::env::var("EDDY_TEST_RDKAFKA_DEBUG")
            .map(|d| format!("\"debug\" = \"{d}\"\n"))
            .unwrap_or_default(),
    );
    std::fs::write(dir.join("plugins.toml"), text).unwrap();
}

pub fn analytics(name: &str) -> String {
    format!(
        "\n[[plugin]]\nname = \"{name}\"\npath = \"{}\"\nmax_batch = 100\ntick_interval_ms = 0\n\
         [plugin.outputs]\nsnapshots = \"discard\"\n[plugin.config]\nsnapshot_every = 1000000\n",
        wasm("eddy_analytics")
    )
}

/// A running `eddy` process, killed when dropped: a test that fails half-way must not leave
/// hosts running (holding ports and CPU) after it.
pub struct HostProcess(Child);

impl std::ops::Deref for HostProcess {
    type Target = Child;
    fn deref(&self) -> &Child {
        &self.0
    }
}

impl std::ops::DerefMut for HostProcess {
    fn deref_mut(&mut self) -> &mut Child {
        &mut self.0
    }
}

impl Drop for HostProcess {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// How many runs of the host in `dir` have started consuming (its log's "consuming" lines).
pub fn runs_consuming(dir: &Path) -> usize {
    std::fs::read_to_string(dir.join("host.log"))
        .unwrap_or_default()
        .matches("consuming")
        .count()
}

/// Starts `eddy run` in `dir` (its `plugins.toml`), logging to `dir/host.log`.
pub fn start(dir: &Path) -> HostProcess {
    let child = Command::new(env!("CARGO_BIN_EXE_eddy"))
        .arg("run")
        .current_dir(dir)
        .env(
            "EDDY_LOG",
            std::env::var("EDDY_TEST_LOG")
                .unwrap_or_else(|_| "info,librdkafka=warn,rdkafka=warn".into()),
        )
        .stdout(Stdio::null())
        .stderr(
            std::fs::File::options()
                .create(true)
                .append(true)
                .open(dir.join("host.log"))
                .unwrap(),
        )
        .spawn()
        .unwrap();
    HostProcess(child)
}

/// The raw `/healthz` response of the host on `port` (status line, headers, body), if it
/// answers.
pub fn metrics(port: u16) -> Option<String> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.write_all(b"GET /healthz HTTP/1.1\r\nhost: 127.0.0.1\r\nconnection: close\r\n\r\n")
        .ok()?;
    let mut body = String::new();
    s.read_to_string(&mut body).ok()?;
    Some(body)
}

/// Waits until every plugin of the host on `port` is up with no lag.
pub fn wait_caught_up(dir: &Path, port: u16, plugins: &[&str], timeout: Duration) {
    let deadline = Instant::now() + timeout;
    loop {
        let health: Option<serde_json::Value> = metrics(port).and_then(|h| {
            h.split_once("\r\n\r\n")
                .and_then(|(_, b)| serde_json::from_str(b).ok())
        });
        if let Some(h) = health
            && plugins
                .iter()
                .all(|p| h["plugins"][p]["up"] == true && h["plugins"][p]["consumer_lag"] == 0)
        {
            return;
        }
        if Instant::now() > deadline {
            let log = std::fs::read_to_string(dir.join("host.log")).unwrap_or_default();
            panic!(
                "not caught up after {timeout:?}: {:?}\nhost log:\n{log}",
                metrics(port)
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Stops the host as Ctrl-C would, and checks that it exited cleanly.
pub fn stop(mut child: HostProcess) {
    Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(child.wait().unwrap().success());
}

/// The host's `/healthz` body, parsed, if it answers.
pub fn health(port: u16) -> Option<serde_json::Value> {
    metrics(port).and_then(|h| {
        h.split_once("\r\n\r\n")
            .and_then(|(_, b)| serde_json::from_str(b).ok())
    })
}

/// A number in `plugin`'s durable state (the host must be stopped: it locks the files).
pub fn state_value(dir: &Path, plugin: &str, key: &str) -> Option<i64> {
    let config = eddy::config::Config::load(&dir.join("plugins.toml")).unwrap();
    eddy::ops::get(&config, plugin, key)
        .unwrap()
        .map(|v| String::from_utf8(v).unwrap().parse().unwrap())
}

/// How many events of each `event_type` there are in `events`.
pub fn by_type(events: &[eddy::generator::Generated]) -> BTreeMap<String, i64> {
    let mut m = BTreeMap::new();
    for g in events {
        let v: serde_json::Value = serde_json::from_slice(&g.payload).unwrap();
        *m.entry(v["event_type"].as_str().unwrap().to_string())
            .or_default() += 1;
    }
    m
}
