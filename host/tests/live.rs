//! The live stream (`/v1/stream`, `/v1/ws`) in the real host (issue 18): a watcher sees each
//! committed record once and none before its commit is on the disk; a client that stops
//! reading is disconnected and slows neither the plugin nor another client; the client limit.

mod common;

use common::*;
use eddy::Host;
use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex};
use std::time::Duration;

const PARTITIONS: i32 = 2;

/// A Server-Sent Events client on its own thread: every `(event, data)` it receives.
struct Sse {
    events: Arc<Mutex<Vec<(String, String)>>>,
}

impl Sse {
    fn connect(url: String) -> Sse {
        let events = Arc::new(Mutex::new(Vec::new()));
        let received = events.clone();
        std::thread::spawn(move || {
            let response = match ureq::get(&url).call() {
                Ok(r) => r,
                Err(e) => panic!("{url}: {e}"),
            };
            assert_eq!(
                response.headers().get("content-type").unwrap(),
                "text/event-stream"
            );
            let reader = BufReader::new(response.into_body().into_reader());
            let (mut event, mut data) = (String::new(), String::new());
            for line in reader.lines() {
                let Ok(line) = line else { return };
                if line.is_empty() {
                    if !data.is_empty() {
                        let e = std::mem::take(&mut event);
                        received
                            .lock()
                            .unwrap()
                            .push((e, std::mem::take(&mut data)));
                    }
                } else if let Some(v) = line.strip_prefix("event: ") {
                    event = v.to_string();
                } else if let Some(v) = line.strip_prefix("data: ") {
                    data.push_str(v);
                }
            }
        });
        Sse { events }
    }

    fn count(&self, event: &str) -> usize {
        self.events
            .lock()
            .unwrap()
            .iter()
            .filter(|(e, _)| e == event)
            .count()
    }

    fn data(&self, event: &str) -> Vec<serde_json::Value> {
        self.events
            .lock()
            .unwrap()
            .iter()
            .filter(|(e, _)| e == event)
            .map(|(_, d)| serde_json::from_str(d).expect("data is JSON"))
            .collect()
    }

    async fn wait_for(&self, what: &'static str, n: usize, event: &'static str) {
        let events = self.events.clone();
        wait_async(Duration::from_secs(60), what, move || {
            events
                .lock()
                .unwrap()
                .iter()
                .filter(|(e, _)| e == event)
                .count()
                >= n
        })
        .await;
    }
}

/// `n` small JSON events, spread over the partitions by key.
fn events(n: usize, padding: usize) -> Vec<(Option<Vec<u8>>, Vec<u8>)> {
    (0..n)
        .map(|i| {
            let payload = format!(
                r#"{{"user_id":"u{}","event_type":"page_view","n":{i},"pad":"{}"}}"#,
                i % 50,
                "x".repeat(padding)
            );
            (
                Some(format!("u{}", i % 50).into_bytes()),
                payload.into_bytes(),
            )
        })
        .collect()
}

fn echo_plugin() -> String {
    format!(
        "[[plugin]]\nname = \"echo\"\npath = \"{}\"\n[plugin.outputs]\nseen = {{ topic = \"echo-out\" }}\n",
        wasm("eddy_fixture_echo")
    )
}

/// A host running the echo plugin on an embedded broker of its own, with `http` added to
/// `[http]` and `more` at the end of `plugins.toml`; the broker and its address.
async fn echo_host(http: &str, more: &str) -> (eddy::kafka::EmbeddedBroker, String, Host) {
    init_logs();
    let broker = broker(PARTITIONS);
    let bootstrap = broker.bootstrap_servers().to_string();
    let text = config_text(&bootstrap, PARTITIONS, &echo_plugin())
        .replace("[http]\n", &format!("[http]\n{http}"))
        + more;
    let host = Host::start(config(&text)).await.expect("host starts");
    (broker, bootstrap, host)
}

/// Each record's (partition, offset), from echo's `seen` payloads, in the order received.
fn coordinates(records: &[serde_json::Value]) -> Vec<(i64, i64)> {
    records
        .iter()
        .map(|r| {
            assert_eq!(r["plugin"], "echo");
            assert_eq!(r["output"], "seen");
            let v = &r["value"];
            (
                v["partition"].as_i64().unwrap(),
                v["offset"].as_i64().unwrap(),
            )
        })
        .collect()
}

/// Commits reach the disk once a minute here: until then a crash would take the batches
/// back, so the stream must hold their records, although the output topic has them
/// already. They come when the host stops (its final commit), each once, then `closed`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watcher_sees_each_committed_record_once_and_none_before_its_commit_is_on_disk() {
    const N: usize = 300;
    let (_broker, bootstrap, host) = echo_host("", "\n[state]\ncommit_interval_ms = 60000\n").await;
    let addr = host.http_addr();
    let stream = Sse::connect(format!(
        "http://{addr}/v1/stream?output=echo/seen&status=off"
    ));
    stream.wait_for("hello", 1, "hello").await;
    let hello = &stream.data("hello")[0];
    assert_eq!(hello["outputs"], serde_json::json!(["echo/seen"]));

    let started = std::time::Instant::now();
    let b = bootstrap.clone();
    tokio::task::spawn_blocking(move || produce(&b, TOPIC, &events(N, 0)))
        .await
        .unwrap();
    // Delivered to the output topic and handled: committed, but not on the disk yet.
    let b = bootstrap.clone();
    let delivered = tokio::task::spawn_blocking(move || read_topic(&b, "echo-out", N).len())
        .await
        .unwrap();
    assert_eq!(delivered, N);
    let m = host.metrics().plugin("echo");
    wait_async(Duration::from_secs(30), "every event handled", move || {
        m.events_handled() == N as u64
    })
    .await;
    assert!(
        started.elapsed() < Duration::from_secs(55),
        "too slow to tell: the deferred sync may have come"
    );
    assert_eq!(
        stream.count("record"),
        0,
        "records went out before their commit was on the disk"
    );

    let metrics = host.metrics().clone();
    host.stop().await.expect("clean stop");
    stream.wait_for("the end of the stream", 1, "closed").await;
    assert_eq!(metrics.stream_records.load(Relaxed), N as u64);
    let records = stream.data("record");
    let seen = coordinates(&records);
    assert_eq!(seen.len(), N, "each record once, after the final commit");
    let mut by_partition: BTreeMap<i64, Vec<i64>> = BTreeMap::new();
    for (p, o) in seen {
        by_partition.entry(p).or_default().push(o);
    }
    for (p, offsets) in &by_partition {
        let expected: Vec<i64> = (0..offsets.len() as i64).collect();
        assert_eq!(
            offsets, &expected,
            "partition {p}: every offset once, in order"
        );
    }
    let closed = &stream.data("closed")[0];
    assert_eq!(closed["reason"], "the host is stopping");
}

/// One client reads nothing: its connection is closed once the host could send it nothing
/// for `send_timeout_ms`, while the plugin handles every event and the other client gets
/// every record once. A third client past `stream_max_clients` is refused with 503.
///
/// The reading client is a debug-build thread of this test: on a slow machine it may read
/// slower than a burst arrives, and a reader that falls `stream_buffer` behind is told what it
/// missed (another test). So the events come in rounds of a quarter of the buffer, each round
/// once the reader has every record of the one before: the verdict does not depend on how
/// fast this machine reads. The stalled client gets no such care: it has taken nothing since
/// its request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_reading_is_disconnected_without_slowing_the_plugin_or_others() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    // ~1.3 KB records: 26 MB in all, far more than the socket buffers hold.
    const N: usize = 20_000;
    const BUFFER: usize = 4096;
    const ROUND: usize = BUFFER / 4;
    let http =
        format!("stream_max_clients = 2\nstream_buffer = {BUFFER}\nsend_timeout_ms = 1000\n");
    let (_broker, bootstrap, host) = echo_host(&http, "").await;
    let addr = host.http_addr();

    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let mut stalled = socket.connect(addr).await.unwrap();
    stalled
        .write_all(b"GET /v1/stream?output=echo&status=off HTTP/1.1\r\nhost: 127.0.0.1\r\n\r\n")
        .await
        .unwrap();
    let reader = Sse::connect(format!("http://{addr}/v1/stream?output=echo/seen"));
    reader.wait_for("hello", 1, "hello").await;
    let metrics = host.metrics().clone();
    wait_async(Duration::from_secs(10), "two clients", move || {
        metrics.stream_clients.load(Relaxed) == 2
    })
    .await;
    let third = ureq::get(&format!("http://{addr}/v1/stream"))
        .config()
        .http_status_as_error(false)
        .build()
        .call()
        .unwrap();
    assert_eq!(third.status(), 503);
    assert_eq!(third.headers().get("retry-after").unwrap(), "5");
    let body = third.into_body().read_to_string().unwrap();
    assert!(body.contains("stream_max_clients"), "{body}");

    let all = events(N, 250);
    for (i, round) in all.chunks(ROUND).enumerate() {
        let (b, round) = (bootstrap.clone(), round.to_vec());
        tokio::task::spawn_blocking(move || produce(&b, TOPIC, &round))
            .await
            .unwrap();
        let sent = ((i + 1) * ROUND).min(N);
        reader.wait_for("every record so far", sent, "record").await;
    }
    wait_settled(&bootstrap, &["echo"], PARTITIONS, N as u64).await;
    assert_eq!(
        reader.count("missed"),
        0,
        "the paced reader never fell behind"
    );
    let records = reader.data("record");
    assert_eq!(records.len(), N, "the reading client got every record");
    let mut seen = coordinates(&records);
    seen.sort();
    seen.dedup();
    assert_eq!(seen.len(), N, "the reading client got every record once");

    let metrics = host.metrics().clone();
    wait_async(
        Duration::from_secs(30),
        "the stalled client to be disconnected",
        move || {
            metrics.stream_clients.load(Relaxed) == 1
                && metrics.http_send_timeouts.load(Relaxed) >= 1
        },
    )
    .await;
    // Its connection is closed: reading what it was sent ends.
    let mut sink = vec![0u8; 1 << 16];
    let ended = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            match stalled.read(&mut sink).await {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
        }
    })
    .await;
    assert!(
        ended.is_ok(),
        "the stalled client's connection is still open"
    );
    let text = host.metrics().render();
    assert!(text.contains("eddy_stream_clients 1"), "{text}");
    host.stop().await.expect("clean stop");
}

/// A client that reads slower than a burst arrives is told how many records it missed and
/// stays connected; once it keeps up again it gets the records that follow. The client here
/// reads nothing while the burst passes (it holds its socket, the kernel's buffers fill),
/// then reads on: the burst is far larger than the ring and the socket buffers together,
/// whatever this machine's speed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reader_slower_than_a_burst_is_told_what_it_missed_and_goes_on() {
    const BURST: usize = 6_000;
    // A send timeout longer than the test: the client is only slow, never cut off.
    let (_broker, bootstrap, host) =
        echo_host("stream_buffer = 64\nsend_timeout_ms = 600000\n", "").await;
    let addr = host.http_addr();
    let url = format!("ws://{addr}/v1/ws?output=echo/seen&status=off");
    let (b, metrics) = (bootstrap.clone(), host.metrics().clone());
    let messages = tokio::task::spawn_blocking(move || {
        let (mut socket, _) = tungstenite::connect(url).expect("the websocket opens");
        if let tungstenite::stream::MaybeTlsStream::Plain(tcp) = socket.get_ref() {
            tcp.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
        }
        let mut messages: Vec<serde_json::Value> = Vec::new();
        let mut next = || match socket.read().expect("a message within 60 s") {
            tungstenite::Message::Text(t) => Some(serde_json::from_str(t.as_str()).unwrap()),
            _ => None,
        };
        messages.extend(next()); // hello
        // Echo's records carry the payload as an array of numbers: ~4.4 KB each, 26 MB in
        // all, far past what the ring (64 records) and the socket buffers hold.
        produce(&b, TOPIC, &events(BURST, 1000));
        wait_for(Duration::from_secs(120), "the burst handled", || {
            metrics.stream_records.load(Relaxed) >= BURST as u64
        });
        // Reading again: once told it missed records, one more event comes, which it gets.
        let late = (
            Some(b"late".to_vec()),
            br#"{"user_id":"late","event_type":"page_view"}"#.to_vec(),
        );
        let (mut told, mut records, mut produced_late) = (0, 0, false);
        while told + records < BURST as u64 + 1 {
            let Some(message) = next() else { continue };
            match message["type"].as_str() {
                Some("missed") => told += message["missed"].as_u64().unwrap(),
                Some("record") => records += 1,
                _ => {}
            }
            messages.push(message);
            if told > 0 && !produced_late {
                produce(&b, TOPIC, std::slice::from_ref(&late));
                produced_late = true;
            }
        }
        messages
    })
    .await
    .unwrap();
    assert_eq!(messages[0]["type"], "hello");
    let missed: Vec<_> = messages.iter().filter(|m| m["type"] == "missed").collect();
    assert!(!missed.is_empty(), "the client was told it missed records");
    assert_eq!(missed[0]["buffer"], 64);
    let told: u64 = missed.iter().map(|m| m["missed"].as_u64().unwrap()).sum();
    let records = messages.iter().filter(|m| m["type"] == "record").count() as u64;
    assert_eq!(
        told + records,
        BURST as u64 + 1,
        "every record of the burst was either received or counted as missed, and the late one came"
    );
    let last = messages
        .iter()
        .rev()
        .find(|m| m["type"] == "record")
        .unwrap();
    let late_payload: Vec<u8> = br#"{"user_id":"late","event_type":"page_view"}"#.to_vec();
    assert_eq!(
        last["value"]["payload"],
        serde_json::json!(late_payload),
        "the record after the gap is the late one"
    );
    assert_eq!(host.metrics().stream_missed.load(Relaxed), told);
    assert!(!messages.iter().any(|m| m["type"] == "closed"));
    let text = host.metrics().render();
    assert!(
        text.contains(&format!("eddy_stream_records_missed_total {told}")),
        "{text}"
    );
    host.stop().await.expect("clean stop");
}

/// The WebSocket carries the same messages, typed: hello, records, status.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_websocket_carries_hello_records_and_status() {
    let (_broker, bootstrap, host) = echo_host("", "").await;
    let addr = host.http_addr();
    let url = format!("ws://{addr}/v1/ws?output=echo/seen");
    let b = bootstrap.clone();
    let messages = tokio::task::spawn_blocking(move || {
        let (mut socket, _) = tungstenite::connect(url).expect("the websocket opens");
        let mut messages: Vec<serde_json::Value> = Vec::new();
        let mut produced = false;
        while messages.iter().filter(|m| m["type"] == "record").count() < 10
            || !messages.iter().any(|m| m["type"] == "status")
        {
            let message = socket.read().expect("a message");
            if let tungstenite::Message::Text(t) = message {
                messages.push(serde_json::from_str(t.as_str()).unwrap());
            }
            if !produced {
                produce(&b, TOPIC, &events(10, 0));
                produced = true;
            }
        }
        socket.close(None).unwrap();
        messages
    })
    .await
    .unwrap();
    assert_eq!(messages[0]["type"], "hello");
    let records: Vec<_> = messages.iter().filter(|m| m["type"] == "record").collect();
    assert_eq!(records.len(), 10);
    assert!(records.iter().all(|r| r["output"] == "seen"));
    let status = messages.iter().find(|m| m["type"] == "status").unwrap();
    assert!(status["plugins"]["echo"]["events"].is_u64(), "{status}");

    let refused = tokio::task::spawn_blocking(move || {
        match tungstenite::connect(format!("ws://{addr}/v1/ws?output=nope")) {
            Err(tungstenite::Error::Http(response)) => response.status().as_u16(),
            other => panic!("expected a refusal, got {:?}", other.map(|_| ())),
        }
    })
    .await
    .unwrap();
    assert_eq!(refused, 400);
    host.stop().await.expect("clean stop");
}

/// The host reads only control frames and small messages from a watcher: a 1 MiB message
/// ends that connection (tungstenite would have buffered up to 64 MiB of it, to ignore it),
/// a small one is ignored, and the host serves the next watcher.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_websocket_message_larger_than_a_few_kib_ends_the_connection() {
    let (_broker, bootstrap, host) = echo_host("", "").await;
    let url = format!(
        "ws://{}/v1/ws?output=echo/seen&status=off",
        host.http_addr()
    );
    let (b, u) = (bootstrap.clone(), url.clone());
    let ended = tokio::task::spawn_blocking(move || {
        let (mut socket, _) = tungstenite::connect(&u).expect("the websocket opens");
        if let tungstenite::stream::MaybeTlsStream::Plain(tcp) = socket.get_ref() {
            tcp.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        }
        assert!(matches!(socket.read(), Ok(tungstenite::Message::Text(_)))); // hello
        // A small message is read and ignored: records keep coming.
        socket
            .send(tungstenite::Message::Text("hi".into()))
            .unwrap();
        produce(&b, TOPIC, &events(1, 0));
        let record = socket.read().expect("a record after a small message");
        assert!(record.to_text().unwrap().contains(r#""type":"record""#));
        // A large one ends the connection.
        let _ = socket.send(tungstenite::Message::Binary(vec![b'x'; 1 << 20].into()));
        loop {
            match socket.read() {
                Ok(tungstenite::Message::Close(_)) => continue,
                Ok(other) => panic!("the connection goes on after a 1 MiB message: {other:?}"),
                Err(e) => break e,
            }
        }
    })
    .await
    .unwrap();
    assert!(
        !matches!(ended, tungstenite::Error::Io(ref e) if e.kind() == std::io::ErrorKind::WouldBlock || e.kind() == std::io::ErrorKind::TimedOut),
        "the connection was still open 30 s after the large message"
    );
    let again = tokio::task::spawn_blocking(move || tungstenite::connect(&url).is_ok())
        .await
        .unwrap();
    assert!(again, "the next watcher is served");
    host.stop().await.expect("clean stop");
}

/// The head of the answer to `request` (sent as is), read until its blank line.
fn answer_head(addr: std::net::SocketAddr, request: &str) -> String {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    stream.write_all(request.as_bytes()).unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        match stream.read(&mut byte) {
            Ok(1) => head.push(byte[0]),
            _ => break,
        }
    }
    String::from_utf8_lossy(&head).into_owned()
}

/// Issue 26: `GET /v1/stream` without the token streamed every plugin's output, and the
/// ingest token (public: it sits in web pages) could not guard it anyway. With a read token
/// set, the stream, the WebSocket and the list of outputs need it (as a bearer header, or
/// the session cookie `POST /v1/login` sets for the dashboard page); the ingest token does
/// not open them, and posting events still takes only the ingest token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reading_the_outputs_needs_the_read_token_not_the_ingest_token() {
    let (_broker, _, host) = echo_host("token = \"ingest\"\nread_token = \"r3ad/er+\"\n", "").await;
    let addr = host.http_addr();
    tokio::task::spawn_blocking(move || {
        let get = |path: &str, extra: &str| {
            answer_head(
                addr,
                &format!("GET {path} HTTP/1.1\r\nhost: 127.0.0.1\r\nconnection: close\r\n{extra}\r\n"),
            )
        };
        for path in ["/v1/stream", "/v1/outputs"] {
            for (extra, status) in [
                ("", "401"),
                ("authorization: Bearer ingest\r\n", "401"),
                ("authorization: Bearer r3ad/er+\r\n", "200"),
            ] {
                let head = get(path, extra);
                assert!(
                    head.starts_with(&format!("HTTP/1.1 {status}")),
                    "{path} with {extra:?}: {head}"
                );
            }
        }
        // The WebSocket too.
        let ws = |extra: &str| {
            answer_head(
                addr,
                &format!(
                    "GET /v1/ws HTTP/1.1\r\nhost: 127.0.0.1\r\nconnection: upgrade\r\nupgrade: websocket\r\nsec-websocket-version: 13\r\nsec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\n{extra}\r\n"
                ),
            )
        };
        assert!(ws("").starts_with("HTTP/1.1 401"));
        assert!(ws("authorization: Bearer r3ad/er+\r\n").starts_with("HTTP/1.1 101"));
        // The dashboard page signs in once: an HttpOnly, SameSite=Strict cookie for /v1.
        let wrong = answer_head(
            addr,
            "POST /v1/login HTTP/1.1\r\nhost: 127.0.0.1\r\nauthorization: Bearer ingest\r\ncontent-length: 0\r\nconnection: close\r\n\r\n",
        );
        assert!(wrong.starts_with("HTTP/1.1 401"), "{wrong}");
        let login = answer_head(
            addr,
            "POST /v1/login HTTP/1.1\r\nhost: 127.0.0.1\r\nauthorization: Bearer r3ad/er+\r\ncontent-length: 0\r\nconnection: close\r\n\r\n",
        );
        assert!(login.starts_with("HTTP/1.1 204"), "{login}");
        let cookie = login
            .lines()
            .find_map(|l| l.strip_prefix("set-cookie: "))
            .expect("a cookie");
        assert!(
            cookie.contains("HttpOnly") && cookie.contains("SameSite=Strict") && cookie.contains("Path=/v1"),
            "{cookie}"
        );
        let value = cookie.split(';').next().unwrap();
        assert!(get("/v1/stream", &format!("cookie: {value}\r\n")).starts_with("HTTP/1.1 200"));
        // Posting events takes the ingest token alone.
        let post = answer_head(
            addr,
            "POST /v1/events HTTP/1.1\r\nhost: 127.0.0.1\r\nauthorization: Bearer ingest\r\ncontent-type: application/json\r\ncontent-length: 43\r\nconnection: close\r\n\r\n{\"user_id\":\"u1\",\"event_type\":\"page_view\"}\n\n",
        );
        assert!(post.starts_with("HTTP/1.1 200"), "{post}");
    })
    .await
    .unwrap();
    host.stop().await.expect("clean stop");
}

/// A page of another site cannot open the WebSocket (WebSockets have no CORS: any page a
/// user visits could otherwise read a host on their loopback), and a host bound to loopback
/// does not answer requests naming another host (DNS rebinding).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_websocket_from_another_site_and_a_foreign_host_name_are_refused() {
    let (_broker, _, host) = echo_host("", "").await;
    let addr = host.http_addr();
    tokio::task::spawn_blocking(move || {
        let ws = |host: &str, origin: &str| {
            answer_head(
                addr,
                &format!(
                    "GET /v1/ws HTTP/1.1\r\nhost: {host}\r\norigin: {origin}\r\nconnection: upgrade\r\nupgrade: websocket\r\nsec-websocket-version: 13\r\nsec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
                ),
            )
        };
        let own = format!("127.0.0.1:{}", addr.port());
        let refused = ws(&own, "http://evil.example");
        assert!(refused.starts_with("HTTP/1.1 403"), "{refused}");
        let allowed = ws(&own, &format!("http://{own}"));
        assert!(allowed.starts_with("HTTP/1.1 101"), "{allowed}");
        let rebound = answer_head(
            addr,
            &format!("GET /v1/outputs HTTP/1.1\r\nhost: evil.example:{}\r\nconnection: close\r\n\r\n", addr.port()),
        );
        assert!(rebound.starts_with("HTTP/1.1 403"), "{rebound}");
        let local = answer_head(
            addr,
            &format!("GET /v1/outputs HTTP/1.1\r\nhost: localhost:{}\r\nconnection: close\r\n\r\n", addr.port()),
        );
        assert!(local.starts_with("HTTP/1.1 200"), "{local}");
    })
    .await
    .unwrap();
    host.stop().await.expect("clean stop");
}
