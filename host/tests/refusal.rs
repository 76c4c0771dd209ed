//! A `.wasm` that is not WebAssembly at all, swapped in for a running plugin: the host
//! refuses it once, clearly, and logs nothing suggesting it might still load (no "the
//! baseline compiler cannot compile it … compiling optimized code instead").
//!
//! A test binary of its own: it captures the host's log with a global subscriber.

mod common;

use common::*;
use eddy::Host;
use eddy::metrics::ReloadOutcome;
use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Everything the host logs, as text.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Captured {
    fn lines(&self) -> Vec<String> {
        String::from_utf8_lossy(&self.0.lock().unwrap())
            .lines()
            .map(str::to_string)
            .collect()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_bytes_are_refused_once_and_clearly() {
    let log = Captured::default();
    let writer = log.clone();
    tracing_subscriber::fmt()
        .with_env_filter("info,librdkafka=warn,rdkafka=warn")
        .with_ansi(false)
        .with_writer(move || writer.clone())
        .init();
    let broker = broker(1);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("logger.wasm");
    std::fs::copy(wasm("eddy_logger"), &path).unwrap();
    let plugin = format!(
        "[[plugin]]\nname = \"logger\"\npath = \"{}\"\n[plugin.outputs]\nlog = \"discard\"\n",
        path.display()
    );
    let text = config_text(broker.bootstrap_servers(), 1, &plugin)
        + &format!(
            "\n[state]\ndir = \"{}\"\n",
            dir.path().join("state").display()
        );
    replace_file(&dir.path().join("plugins.toml"), text.as_bytes());
    let host = Host::start(eddy::config::Config::load(&dir.path().join("plugins.toml")).unwrap())
        .await
        .unwrap();
    let m = host.metrics().plugin("logger");

    // Random bytes (a fixed pseudo-random sequence), no WebAssembly magic number.
    let mut x = 0x9E37_79B9_7F4A_7C15u64;
    let garbage: Vec<u8> = (0..4096)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    replace_file(&path, &garbage);
    // The file watcher or this reload, whichever comes first, tries it; the other then
    // finds the same refused bytes and leaves them be.
    host.reload().await.unwrap();
    let m2 = m.clone();
    wait_async(
        Duration::from_secs(30),
        "the change to be refused",
        move || m2.reloads(ReloadOutcome::Failed) == 1,
    )
    .await;
    // Asked again, nothing more is tried or said.
    let again = host.reload().await.unwrap();
    assert!(again.failed.is_empty(), "{:?}", again.failed);
    assert_eq!(m.reloads(ReloadOutcome::Failed), 1);
    assert_eq!(
        m.up.load(std::sync::atomic::Ordering::Relaxed),
        1,
        "still runs"
    );
    host.stop().await.unwrap();

    let lines = log.lines();
    let about: Vec<&String> = lines.iter().filter(|l| l.contains("logger.wasm")).collect();
    let refusals: Vec<&&String> = about
        .iter()
        .filter(|l| l.contains("ERROR") && l.contains("not a valid WebAssembly component"))
        .collect();
    assert_eq!(
        refusals.len(),
        1,
        "one clear refusal:\n{}",
        lines.join("\n")
    );
    for l in &lines {
        assert!(
            !l.contains("baseline compiler") && !l.contains("optimized code instead"),
            "a misleading line: {l}"
        );
    }
    assert!(
        !about.iter().any(|l| l.contains("WARN")),
        "no warning about the file besides the refusal:\n{}",
        lines.join("\n")
    );
}
