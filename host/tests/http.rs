//! The HTTP server as Prometheus, a load balancer and a crowd of clients meet it: `/metrics`
//! passes `promtool check metrics` (Debian's `prometheus` package) even with label values
//! that need escaping; `/healthz` answers 503 while degraded, and forgets a plugin removed
//! from `plugins.toml`; the number of open connections is bounded.

mod common;

use common::*;
use eddy::Host;
use std::io::{Read, Write};
use std::process::{Command, Stdio};
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

const PARTITIONS: i32 = 2;

/// `promtool`, or a failure that says how to get it: a check that did not run must never
/// look like one that passed.
fn promtool() -> &'static str {
    let found = Command::new("promtool")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        found,
        "this test needs promtool: `apt-get install prometheus` (Debian's package; .ci/run installs it)"
    );
    "promtool"
}

fn promtool_check(page: &str) -> (bool, String) {
    let mut child = Command::new(promtool())
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(page.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let said =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (out.status.success(), said)
}

/// The body of an HTTP response.
fn body(response: &str) -> &str {
    response.split_once("\r\n\r\n").map_or("", |(_, b)| b)
}

/// A TOML basic string holding `s`.
fn toml_string(s: &str) -> String {
    toml::Value::String(s.to_string()).to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_pass_promtool_with_label_values_that_need_escaping() {
    let broker = broker(PARTITIONS);
    let bootstrap = broker.bootstrap_servers().to_string();
    produce_generated(&bootstrap, &generate(50, &generator_options(3, 0)));
    // A plugin file whose path (a label of eddy_plugin_info) holds a backslash, quotes and
    // a newline: all three must be escaped in the exposition.
    let dir = tempfile::tempdir().unwrap();
    let odd = dir.path().join("a \\ \"quoted\"\nplace");
    std::fs::create_dir_all(&odd).unwrap();
    let wasm_path = odd.join("logger.wasm");
    std::fs::copy(wasm("eddy_logger"), &wasm_path).unwrap();
    let plugins = format!(
        "[[plugin]]\nname = \"logger\"\npath = {}\n[plugin.outputs]\nlog = \"discard\"\n",
        toml_string(&wasm_path.display().to_string())
    );
    let host = Host::start(config(&config_text(&bootstrap, PARTITIONS, &plugins)))
        .await
        .expect("host starts");
    let m = host.metrics().plugin("logger");
    wait_async(
        Duration::from_secs(60),
        "the logger to handle 50 events",
        move || m.events_handled() >= 50,
    )
    .await;

    let page = http_get(host.http_addr(), "/metrics").await;
    assert!(page.starts_with("HTTP/1.1 200"), "{page}");
    assert!(
        page.to_ascii_lowercase()
            .contains("content-type: text/plain; version=0.0.4"),
        "{page}"
    );
    let text = body(&page);
    assert!(
        text.contains(r#"a \\ \"quoted\"\nplace/logger.wasm""#),
        "the path label is escaped:\n{text}"
    );
    assert!(
        text.contains(r#"eddy_events_total{plugin="logger",verdict="ok"} 50"#),
        "{text}"
    );
    let (ok, said) = promtool_check(text);
    assert!(
        ok,
        "promtool check metrics refused /metrics: {said}\n{text}"
    );
    // And the check can fail: the same page with one escape undone is refused.
    let broken = text.replacen(r#"\"quoted\""#, r#""quoted""#, 1);
    assert!(!promtool_check(&broken).0, "promtool accepts anything?");
    host.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn healthz_is_503_while_degraded_and_forgets_a_removed_plugin() {
    init_logs();
    let broker = broker(PARTITIONS);
    let bootstrap = broker.bootstrap_servers().to_string();
    produce_generated(&bootstrap, &generate(100, &generator_options(4, 0)));
    let logger = format!(
        "[[plugin]]\nname = \"logger\"\npath = \"{}\"\n[plugin.outputs]\nlog = \"discard\"\n",
        wasm("eddy_logger")
    );
    // Panics on every event: its breaker opens and stays open (a long pause).
    let broken = format!(
        "[[plugin]]\nname = \"broken\"\npath = \"{}\"\nmax_batch = 10\n\
         [plugin.breaker]\nfailures = 3\nwindow = 10\npause_ms = 120000\nmax_pause_ms = 240000\n\
         [plugin.config]\nmode = \"panic\"\nmarker = \"\"\n",
        wasm("eddy_fixture_misbehave")
    );
    let dir = tempfile::tempdir().unwrap();
    let write = |plugins: &str| {
        replace_file(
            &dir.path().join("plugins.toml"),
            (config_text(&bootstrap, PARTITIONS, plugins) + "\n[reload]\nwatch = false\n")
                .as_bytes(),
        )
    };
    write(&format!("{logger}\n{broken}"));
    let mut cfg = eddy::config::Config::load(&dir.path().join("plugins.toml")).unwrap();
    cfg.state.dir = dir.path().join("state");
    let host = Host::start(cfg).await.expect("host starts");
    let b = host.metrics().plugin("broken");
    wait_async(Duration::from_secs(60), "the breaker to open", move || {
        b.breaker_state.load(Relaxed) == 1
    })
    .await;

    let health = http_get(host.http_addr(), "/healthz").await;
    assert!(health.starts_with("HTTP/1.1 503"), "{health}");
    let report: serde_json::Value = serde_json::from_str(body(&health)).unwrap();
    assert_eq!(report["status"], "degraded", "{health}");
    assert_eq!(report["plugins"]["broken"]["breaker"], "open", "{health}");

    // Removing the broken plugin removes its entry, its series, and the degradation.
    write(&logger);
    let report = host.reload().await.unwrap();
    assert_eq!(report.removed, ["broken"]);
    let health = http_get(host.http_addr(), "/healthz").await;
    assert!(health.starts_with("HTTP/1.1 200"), "{health}");
    let report: serde_json::Value = serde_json::from_str(body(&health)).unwrap();
    assert_eq!(report["status"], "ok", "{health}");
    assert!(report["plugins"].get("broken").is_none(), "{health}");
    assert_eq!(report["plugins"]["logger"]["up"], true, "{health}");
    let page = http_get(host.http_addr(), "/metrics").await;
    assert!(!page.contains(r#"plugin="broken""#), "{page}");
    assert!(page.contains(r#"plugin="logger""#), "{page}");
    host.stop().await.unwrap();
}

/// The status line of the response on `stream`, or `None` if nothing came within `wait`.
fn status_line(stream: &mut std::net::TcpStream, wait: Duration) -> Option<String> {
    stream.set_read_timeout(Some(wait)).unwrap();
    let mut buf = [0u8; 64];
    match stream.read(&mut buf) {
        Ok(n) if n > 0 => Some(
            String::from_utf8_lossy(&buf[..n])
                .lines()
                .next()
                .unwrap_or_default()
                .to_string(),
        ),
        _ => None,
    }
}

/// A host with the logger plugin and `http` added to `[http]`.
async fn logger_host(broker: &eddy::kafka::EmbeddedBroker, http: &str) -> Host {
    let plugins = format!(
        "[[plugin]]\nname = \"logger\"\npath = \"{}\"\n[plugin.outputs]\nlog = \"discard\"\n",
        wasm("eddy_logger")
    );
    let text = config_text(broker.bootstrap_servers(), PARTITIONS, &plugins)
        .replace("[http]\n", &format!("[http]\n{http}\n"));
    Host::start(config(&text)).await.expect("host starts")
}

/// A request head, and the start of a body it never finishes: a connection busy with a
/// request.
fn slow_post(addr: std::net::SocketAddr) -> std::net::TcpStream {
    let mut stream = std::net::TcpStream::connect(addr).unwrap();
    stream
        .write_all(
            b"POST /v1/events HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\ncontent-length: 1000\r\n\r\n{\"us",
        )
        .unwrap();
    stream
}

/// Whether the host closed `stream` (reading ends) within `wait`.
fn closed_within(stream: &mut std::net::TcpStream, wait: Duration) -> bool {
    let deadline = std::time::Instant::now() + wait;
    let mut buf = [0u8; 1024];
    while std::time::Instant::now() < deadline {
        stream
            .set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        match stream.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => {}
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(_) => return true,
        }
    }
    false
}

/// Issue 26: ~200 silent connections left `/healthz` and `/metrics` unanswered for as long
/// as they stayed open. A new connection now takes the place of the oldest one that has
/// sent no whole request: with every place held by silent connections (and a head timeout
/// of a minute, so none frees itself meanwhile), both answer at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn healthz_and_metrics_answer_while_silent_connections_hold_every_place() {
    let broker = broker(PARTITIONS);
    let host = logger_host(&broker, "max_connections = 4\nhead_timeout_ms = 60000").await;
    let addr = host.http_addr();
    let metrics = host.metrics().clone();
    tokio::task::spawn_blocking(move || {
        let silent: Vec<_> = (0..4)
            .map(|_| std::net::TcpStream::connect(addr).unwrap())
            .collect();
        std::thread::sleep(Duration::from_millis(200)); // accepted, whatever the order
        for path in ["/healthz", "/metrics", "/healthz", "/metrics"] {
            let mut probe = std::net::TcpStream::connect(addr).unwrap();
            write!(
                probe,
                "GET {path} HTTP/1.1\r\nhost: 127.0.0.1\r\nconnection: close\r\n\r\n"
            )
            .unwrap();
            // Far less than the head timeout that would free a place on its own.
            let line = status_line(&mut probe, Duration::from_secs(20));
            assert!(
                line.as_deref().is_some_and(|l| l.starts_with("HTTP/1.1 ")),
                "{path} unanswered while silent connections hold every place: {line:?}"
            );
        }
        // The first probe took a silent one's place; each later one took the place the
        // probe before it left.
        assert!(metrics.http_evicted.load(Relaxed) >= 1);
        drop(silent);
    })
    .await
    .unwrap();
    let page = http_get(host.http_addr(), "/metrics").await;
    assert!(
        page.contains("eddy_http_connections_evicted_total "),
        "{page}"
    );
    host.stop().await.unwrap();
}

/// Connections busy with a request are not evicted: with both places held by posts whose
/// bodies are still coming, a third connection waits until one is freed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn busy_connections_are_bounded_and_a_freed_place_is_used() {
    let broker = broker(PARTITIONS);
    let host = logger_host(&broker, "max_connections = 2").await;
    let addr = host.http_addr();
    tokio::task::spawn_blocking(move || {
        let busy: Vec<_> = (0..2).map(|_| slow_post(addr)).collect();
        std::thread::sleep(Duration::from_millis(200));
        // The kernel accepts a third connection into its backlog, but the host does not
        // serve it while both places are busy, so its request is not answered...
        let mut third = std::net::TcpStream::connect(addr).unwrap();
        third
            .write_all(b"GET /healthz HTTP/1.1\r\nhost: 127.0.0.1\r\nconnection: close\r\n\r\n")
            .unwrap();
        assert_eq!(status_line(&mut third, Duration::from_millis(700)), None);
        // ...until a place is freed.
        drop(busy);
        let line = status_line(&mut third, Duration::from_secs(10));
        assert!(
            line.as_deref().is_some_and(|l| l.starts_with("HTTP/1.1 ")),
            "{line:?}"
        );
    })
    .await
    .unwrap();
    host.stop().await.unwrap();
}

/// Issue 26: a client sending its request head a byte a second was never cut off. Now a
/// connection has `head_timeout_ms` to send a whole head: a silent one, one that dribbles
/// its head, and a kept-alive one idle after its response are closed; a body that does not
/// arrive within `body_timeout_ms` is answered 408 and nothing of it is produced.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_heads_silent_and_idle_connections_and_slow_bodies_are_cut_off() {
    let broker = broker(PARTITIONS);
    let host = logger_host(&broker, "head_timeout_ms = 1000\nbody_timeout_ms = 1000").await;
    let addr = host.http_addr();
    tokio::task::spawn_blocking(move || {
        let mut silent = std::net::TcpStream::connect(addr).unwrap();
        // A head of 120 bytes, one every 250 ms: 30 s to send it whole.
        let mut dribbling = std::net::TcpStream::connect(addr).unwrap();
        let head = format!(
            "GET /healthz HTTP/1.1\r\nhost: 127.0.0.1\r\nx-pad: {}\r\n\r\n",
            "a".repeat(80)
        );
        let mut cut = false;
        for byte in head.as_bytes() {
            if dribbling.write_all(&[*byte]).is_err() {
                cut = true;
                break;
            }
            if closed_within(&mut dribbling, Duration::from_millis(250)) {
                cut = true;
                break;
            }
        }
        assert!(cut, "a head sent a byte at a time was never cut off");
        assert!(
            closed_within(&mut silent, Duration::from_secs(30)),
            "a silent connection stayed open"
        );
        // Kept alive after its answer, then idle: closed.
        let mut idle = std::net::TcpStream::connect(addr).unwrap();
        idle.write_all(b"GET /healthz HTTP/1.1\r\nhost: 127.0.0.1\r\n\r\n")
            .unwrap();
        assert!(status_line(&mut idle, Duration::from_secs(10)).is_some());
        assert!(
            closed_within(&mut idle, Duration::from_secs(30)),
            "an idle keep-alive connection stayed open"
        );
        // A body that stops coming.
        let mut post = slow_post(addr);
        let line = status_line(&mut post, Duration::from_secs(30));
        assert_eq!(line.as_deref(), Some("HTTP/1.1 408 Request Timeout"));
    })
    .await
    .unwrap();
    let page = http_get(host.http_addr(), "/metrics").await;
    assert!(
        page.contains("eddy_collector_requests_total{code=\"408\"} 1"),
        "{page}"
    );
    host.stop().await.unwrap();
}

/// Stopping the host never waits on a slow client: a post whose body is still coming
/// (with timeouts far longer than the test) and a silent connection are dropped within the
/// server's grace.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stopping_the_host_does_not_wait_on_slow_clients() {
    let broker = broker(PARTITIONS);
    let host = logger_host(
        &broker,
        "head_timeout_ms = 600000\nbody_timeout_ms = 600000",
    )
    .await;
    let addr = host.http_addr();
    let clients = tokio::task::spawn_blocking(move || {
        let clients = (slow_post(addr), std::net::TcpStream::connect(addr).unwrap());
        std::thread::sleep(Duration::from_millis(200));
        clients
    })
    .await
    .unwrap();
    let started = std::time::Instant::now();
    let stopped = tokio::time::timeout(Duration::from_secs(60), host.stop()).await;
    assert!(
        stopped.is_ok(),
        "the host was still stopping a minute later"
    );
    assert!(
        started.elapsed() < eddy::http::server::SHUTDOWN_GRACE + Duration::from_secs(15),
        "stopping took {:?}",
        started.elapsed()
    );
    drop(clients);
}
