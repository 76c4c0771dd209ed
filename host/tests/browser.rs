//! The web dashboard in a real browser (issue 18): Debian's headless Chromium, driven over
//! WebDriver (chromedriver, from `chromium-driver`), against a running host with its
//! generator on. Figures appear and change, an alert reaches the feed, and the page says the
//! host is unreachable while it is down and recovers by itself when it is back.
//!
//! Needs `chromium` and `chromedriver` on PATH (`make test` installs Debian's packages when
//! run as root, as CI does; else `sudo apt-get install chromium chromium-driver`).

mod common;

use common::*;
use eddy::Host;
use serde_json::{Value, json};
use std::process::{Child, Command, Stdio};
use std::str::FromStr;
use std::time::{Duration, Instant};

/// A chromedriver process and one headless Chromium session of it.
struct Browser {
    driver: Child,
    base: String,
    session: String,
}

impl Browser {
    fn start() -> Browser {
        let port = free_port();
        let driver = Command::new("chromedriver")
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect(
                "chromedriver runs (the browser test needs Debian's chromium and chromium-driver: \
                 apt-get install chromium chromium-driver)",
            );
        let base = format!("http://127.0.0.1:{port}");
        wait_for(Duration::from_secs(30), "chromedriver to answer", || {
            ureq::get(&format!("{base}/status"))
                .call()
                .ok()
                .and_then(|r| r.into_body().read_json::<Value>().ok())
                .is_some_and(|v| v["value"]["ready"] == true)
        });
        let chromium = std::env::var("EDDY_CHROMIUM").unwrap_or_else(|_| "chromium".into());
        let chromium = which(&chromium);
        let created: Value = ureq::post(&format!("{base}/session"))
            .send_json(json!({
                "capabilities": { "alwaysMatch": {
                    "browserName": "chrome",
                    "goog:chromeOptions": {
                        "binary": chromium,
                        "args": ["--headless=new", "--no-sandbox", "--disable-gpu",
                                 "--disable-dev-shm-usage", "--window-size=1280,1000"],
                    },
                }},
            }))
            .expect("a Chromium session starts")
            .into_body()
            .read_json()
            .unwrap();
        let session = created["value"]["sessionId"]
            .as_str()
            .unwrap_or_else(|| panic!("no session: {created}"))
            .to_string();
        Browser {
            driver,
            base,
            session,
        }
    }

    fn open(&self, url: &str) {
        ureq::post(&format!("{}/session/{}/url", self.base, self.session))
            .send_json(json!({ "url": url }))
            .expect("the page opens");
    }

    /// Runs `script` in the page and returns what it returns.
    fn eval(&self, script: &str) -> Value {
        let answer: Value = ureq::post(&format!(
            "{}/session/{}/execute/sync",
            self.base, self.session
        ))
        .send_json(json!({ "script": script, "args": [] }))
        .expect("the script runs")
        .into_body()
        .read_json()
        .unwrap();
        answer["value"].clone()
    }

    /// Clicks the `index`th element matching `css`, as a user would (a trusted click).
    fn click(&self, css: &str, index: usize) {
        let found: Value = ureq::post(&format!("{}/session/{}/elements", self.base, self.session))
            .send_json(json!({ "using": "css selector", "value": css }))
            .expect("elements found")
            .into_body()
            .read_json()
            .unwrap();
        let element = found["value"][index]
            .as_object()
            .and_then(|e| e.values().next())
            .and_then(Value::as_str)
            .unwrap_or_else(|| panic!("no element {index} of `{css}`: {found}"))
            .to_string();
        ureq::post(&format!(
            "{}/session/{}/element/{element}/click",
            self.base, self.session
        ))
        .send_json(json!({}))
        .expect("the click goes through");
    }

    /// What the page shows now.
    fn page(&self) -> Value {
        self.eval(
            r#"const t = (id) => document.getElementById(id).textContent;
            const plugins = {};
            for (const tr of document.querySelectorAll('#plugins tr[data-plugin]')) {
              plugins[tr.dataset.plugin] = {
                events: Number(tr.querySelector('.events').textContent.replace(/,/g, '')),
                breaker: tr.querySelector('.breaker').textContent,
              };
            }
            return {
              connection: t('connection'),
              unreachable: document.getElementById('unreachable').classList.contains('shown'),
              active_users: t('active-users'),
              events_per_sec: t('events-per-sec'),
              conversion: t('conversion'),
              trending_pages: document.querySelectorAll('#trending-pages li:not(.empty)').length,
              alerts: [...document.querySelectorAll('#alerts li:not(.empty) .what')].map(e => e.textContent),
              alert_entries: [...document.querySelectorAll('#alerts li:not(.empty)')]
                .map(li => [li.dataset.id || '', li.textContent]),
              alert_count: Number((t('alert-count').match(/[0-9,]+/) || ['0'])[0].replace(/,/g, '')),
              last_status_ms: Math.max(0, ...[...history.values()].map(h => h[h.length - 1][0])),
              plugins,
            };"#,
        )
    }

    /// Waits until the page satisfies `f`; panics with `what` and the page after `timeout`.
    fn wait(&self, timeout: Duration, what: &str, f: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + timeout;
        loop {
            let page = self.page();
            if f(&page) {
                return page;
            }
            assert!(
                Instant::now() < deadline,
                "timed out after {timeout:?} waiting for {what}; the page shows {page:#}"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = ureq::delete(&format!("{}/session/{}", self.base, self.session)).call();
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The absolute path of `program` (from PATH if it is a bare name).
fn which(program: &str) -> String {
    if program.contains('/') {
        return program.to_string();
    }
    std::env::var("PATH")
        .unwrap_or_default()
        .split(':')
        .map(|dir| std::path::Path::new(dir).join(program))
        .find(|p| p.is_file())
        .unwrap_or_else(|| panic!("{program} is not on PATH (apt-get install chromium)"))
        .display()
        .to_string()
}

/// The demo shop's tracker (`/tracker.js`) in the browser: a page view on load, a click for
/// every button, the shop's add-to-cart and purchase events, batched and posted to the
/// collector: each event reaches the topic once, valid, with one anonymous user, and the
/// plugin handles every one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demo_shops_tracker_posts_what_the_user_does_and_the_plugin_gets_each_event_once() {
    init_logs();
    let text = format!(
        "[kafka]\nbrokers = \"embedded\"\ntopic = \"{TOPIC}\"\npartitions = 2\n\
         [http]\naddress = \"127.0.0.1:0\"\n\n\
         [[plugin]]\nname = \"echo\"\npath = \"{}\"\n[plugin.outputs]\nseen = \"discard\"\n",
        wasm("eddy_fixture_echo")
    );
    let host = Host::start(config(&text)).await.expect("host starts");
    let url = format!("http://{}/demo", host.http_addr());
    let metrics = host.metrics().clone();
    let bootstrap = host.bootstrap_servers().to_string();
    let events = tokio::task::spawn_blocking(move || {
        let browser = Browser::start();
        browser.open(&url);
        // Laptop: add to cart, buy; Mouse: add to cart. Then "Send now".
        for button in [0, 1, 2] {
            browser.click("#products button", button);
        }
        browser.click("#flush", 0);
        // A page view, 4 clicks on buttons, 2 add-to-carts and a purchase.
        wait_for(
            Duration::from_secs(60),
            "the echo plugin to get 8 events",
            || metrics.plugin("echo").events_handled() >= 8,
        );
        let topic = read_topic(&bootstrap, TOPIC, 8);
        drop(browser);
        topic
    })
    .await
    .unwrap();
    assert_eq!(events.len(), 8, "each event once");
    let events: Vec<Value> = events
        .iter()
        .map(|m| {
            use rdkafka::Message;
            let v: Value = serde_json::from_slice(m.payload().unwrap()).unwrap();
            assert_eq!(m.key(), Some(v["user_id"].as_str().unwrap().as_bytes()));
            v
        })
        .collect();
    let count = |t: &str| events.iter().filter(|e| e["event_type"] == t).count();
    assert_eq!(
        (
            count("page_view"),
            count("click"),
            count("add_to_cart"),
            count("purchase")
        ),
        (1, 4, 2, 1),
        "{events:#?}"
    );
    let users: std::collections::BTreeSet<_> =
        events.iter().map(|e| e["user_id"].to_string()).collect();
    assert_eq!(users.len(), 1, "one anonymous user: {users:?}");
    let ids: std::collections::BTreeSet<_> =
        events.iter().map(|e| e["event_id"].to_string()).collect();
    assert_eq!(ids.len(), 8, "an event_id each");
    let purchase = events
        .iter()
        .find(|e| e["event_type"] == "purchase")
        .unwrap();
    assert_eq!(purchase["properties"]["product_name"], "Laptop");
    assert_eq!(purchase["properties"]["price"], 999.99);
    assert!(
        purchase["page_url"].as_str().unwrap().ends_with("/demo"),
        "{purchase}"
    );
    assert!(
        jiff::Timestamp::from_str(purchase["timestamp"].as_str().unwrap()).is_ok(),
        "{purchase}"
    );
    let page = host.metrics().render();
    assert!(
        page.contains("eddy_collector_events_accepted_total 8"),
        "{page}"
    );
    assert_eq!(host.metrics().plugin("echo").events_handled(), 8);
    host.stop().await.expect("clean stop");
}

/// The tracker when the collector cannot reach Kafka: its post is answered 503, it keeps
/// the events and posts them again after `Retry-After`, and once the broker is back each
/// event is in the topic once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_tracker_keeps_its_events_through_a_broker_outage_and_sends_each_once() {
    init_logs();
    let broker = broker(2);
    let bootstrap = broker.bootstrap_servers().to_string();
    let plugins = format!(
        "[[plugin]]\nname = \"echo\"\npath = \"{}\"\n[plugin.outputs]\nseen = \"discard\"\n",
        wasm("eddy_fixture_echo")
    );
    let text = config_text(&bootstrap, 2, &plugins)
        .replace("[http]\n", "[http]\ningest_timeout_ms = 1000\n");
    let host = Host::start(config(&text)).await.expect("host starts");
    let url = format!("http://{}/demo", host.http_addr());
    let metrics = host.metrics().clone();
    let broker = std::sync::Arc::new(broker);
    let outage = broker.clone();
    let b = bootstrap.clone();
    let events = tokio::task::spawn_blocking(move || {
        let browser = Browser::start();
        browser.open(&url);
        browser.click("#flush", 0);
        wait_for(Duration::from_secs(60), "the page view and a click", || {
            metrics.plugin("echo").events_handled() >= 2
        });
        outage.set_broker_up(1, false).unwrap();
        for button in [0, 1, 2] {
            browser.click("#products button", button);
        }
        browser.click("#flush", 0);
        let posts = || browser.eval("return document.getElementById('log').textContent");
        wait_for(Duration::from_secs(30), "a post answered 503", || {
            posts().as_str().is_some_and(|log| log.contains("503"))
        });
        outage.set_broker_up(1, true).unwrap();
        // 2 before; 3 buttons (a click and a shop event each) and "Send now" during.
        wait_for(
            Duration::from_secs(60),
            "the events kept through the outage",
            || metrics.plugin("echo").events_handled() >= 9,
        );
        wait_for(Duration::from_secs(30), "the last post to succeed", || {
            posts().as_str().is_some_and(|log| {
                log.starts_with(|c: char| c.is_ascii_digit())
                    && log.lines().next().is_some_and(|l| l.contains("200"))
            })
        });
        read_topic(&b, TOPIC, 9)
    })
    .await
    .unwrap();
    let ids: std::collections::BTreeSet<String> = events
        .iter()
        .map(|m| {
            use rdkafka::Message;
            let v: Value = serde_json::from_slice(m.payload().unwrap()).unwrap();
            v["event_id"].to_string()
        })
        .collect();
    assert_eq!(
        (events.len(), ids.len()),
        (9, 9),
        "each event once in the topic"
    );
    assert_eq!(host.metrics().plugin("echo").events_handled(), 9);
    assert!(host.metrics().render().contains("code=\"503\""));
    host.stop().await.expect("clean stop");
}

/// The shipped dashboard and alert plugins, with the host's own broker and generator.
fn host_config(port: u16) -> eddy::config::Config {
    let text = format!(
        r#"[kafka]
brokers = "embedded"
topic = "{TOPIC}"
partitions = 2
[kafka.settings]
"session.timeout.ms" = "6000"

[http]
address = "127.0.0.1:{port}"

[generator]
rate = 200
seed = 7
fraud_every = 0

[[plugin]]
name = "dashboard"
path = "{dashboard}"
tick_interval_ms = 500
[plugin.outputs]
summary = "discard"
text = "discard"

[[plugin]]
name = "alert"
path = "{alert}"
[plugin.outputs]
alerts = "discard"
[[plugin.config.rules]]
name = "purchase-watch"
event_type = "purchase"
min_amount = 0.0
severity = "high"
"#,
        dashboard = wasm("eddy_dashboard"),
        alert = wasm("eddy_alert"),
    );
    config(&text)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_shows_live_figures_and_alerts_and_recovers_when_the_host_restarts() {
    init_logs();
    let port = free_port();
    let host = Host::start(host_config(port)).await.expect("host starts");
    let url = format!("http://127.0.0.1:{port}/");

    let (browser, first) = tokio::task::spawn_blocking(move || {
        let browser = Browser::start();
        browser.open(&url);
        let first = browser.wait(
            Duration::from_secs(60),
            "live figures from the dashboard plugin",
            |p| {
                is_live(p)
                    && p["active_users"]
                        .as_str()
                        .is_some_and(|s| s.parse::<u64>().is_ok_and(|n| n > 0))
                    && p["trending_pages"].as_u64() > Some(0)
                    && p["plugins"]["dashboard"]["events"].as_u64() > Some(0)
            },
        );
        (browser, first)
    })
    .await
    .unwrap();
    assert!(!first["unreachable"].as_bool().unwrap(), "{first:#}");
    assert!(
        first["conversion"].as_str().unwrap().ends_with('%'),
        "{first:#}"
    );

    let before = first["plugins"]["dashboard"]["events"].as_u64().unwrap();
    let browser = tokio::task::spawn_blocking(move || {
        browser.wait(Duration::from_secs(30), "figures that change", |p| {
            p["plugins"]["dashboard"]["events"].as_u64() > Some(before)
        });
        let alerted = browser.wait(Duration::from_secs(60), "an alert in the feed", |p| {
            p["alerts"].as_array().is_some_and(|a| !a.is_empty())
        });
        let alert = alerted["alerts"][0].as_str().unwrap();
        assert!(alert.starts_with("purchase-watch: user-"), "{alert}");
        assert!(alert.contains("purchase"), "{alert}");

        // A reconnect (forced here, as after a network blip) shows each alert once: the page
        // asks for the records after the last one it got. (Issue 27: before, the host sent
        // the latest 20 alerts again and the page added them again, counted.)
        for _ in 0..2 {
            let at = browser.eval("scheduleReconnect(); return Date.now();");
            let at = at.as_f64().unwrap();
            let back = browser.wait(
                Duration::from_secs(30),
                "the page to be live again, with a status from after the reconnect",
                // Records come before the first status on a new stream.
                |p| is_live(p) && p["last_status_ms"].as_f64() > Some(at + 500.0),
            );
            // Each alert shown carries its record's id: none twice.
            let entries = back["alert_entries"].as_array().unwrap();
            let mut ids: Vec<&str> = entries.iter().map(|e| e[0].as_str().unwrap()).collect();
            let shown = ids.len();
            ids.sort_unstable();
            ids.dedup();
            assert_eq!(
                ids.len(),
                shown,
                "each alert once after a reconnect: {back:#}"
            );
            assert!(ids.iter().all(|id| !id.is_empty()), "{back:#}");
            if shown < 50 {
                assert_eq!(back["alert_count"].as_u64(), Some(shown as u64), "{back:#}");
            }
        }
        browser
    })
    .await
    .unwrap();

    host.stop().await.expect("clean stop");
    let browser = tokio::task::spawn_blocking(move || {
        browser.wait(
            Duration::from_secs(30),
            "the page to say the host is unreachable",
            |p| p["unreachable"] == true && !is_live(p),
        );
        browser
    })
    .await
    .unwrap();

    // A new host on the same address (its own broker: counts start again from zero).
    let host = Host::start(host_config(port)).await.expect("host restarts");
    let metrics = host.metrics().clone();
    tokio::task::spawn_blocking(move || {
        let back = browser.wait(Duration::from_secs(60), "the page to recover", |p| {
            is_live(p) && p["unreachable"] == false
        });
        // Its figures are the new host's, and they move again.
        let again = back["plugins"]["dashboard"]["events"].as_u64().unwrap_or(0);
        browser.wait(
            Duration::from_secs(30),
            "the new host's figures to change",
            |p| p["plugins"]["dashboard"]["events"].as_u64() > Some(again),
        );
        let now = browser.page()["plugins"]["dashboard"]["events"]
            .as_u64()
            .unwrap();
        assert!(
            now <= metrics.plugin("dashboard").events_handled(),
            "the page shows the new host's count ({now}), not the old one's"
        );
    })
    .await
    .unwrap();
    host.stop().await.expect("clean stop");
}

/// The page says it is live ("live", or "live (skipped N records in bursts)").
fn is_live(page: &Value) -> bool {
    page["connection"]
        .as_str()
        .is_some_and(|c| c.starts_with("live"))
}

/// Issue 26: with `[http] read_token` set, the dashboard page asks for it once: a wrong
/// token is said to be wrong, the right one signs the browser session in (an HttpOnly
/// cookie the page's script cannot read, no token in any URL) and the figures come.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_asks_for_the_read_token_once_and_then_shows_the_figures() {
    init_logs();
    let port = free_port();
    let mut config = host_config(port);
    config.http.read_token = Some("r3ad-only".into());
    let host = Host::start(config).await.expect("host starts");
    let url = format!("http://127.0.0.1:{port}/");
    tokio::task::spawn_blocking(move || {
        let browser = Browser::start();
        browser.open(&url);
        let asked = |b: &Browser| {
            b.eval("return !document.getElementById('signin').hidden") == Value::Bool(true)
        };
        wait_for(
            Duration::from_secs(60),
            "the page to ask for the token",
            || asked(&browser),
        );
        let sign_in = |token: &str| {
            browser.eval(&format!(
                "document.getElementById('signin-token').value = {}; return true",
                Value::from(token)
            ));
            browser.click("#signin button", 0);
        };
        sign_in("wrong");
        wait_for(
            Duration::from_secs(30),
            "the page to say the token is wrong",
            || {
                browser.eval("return document.getElementById('signin-error').textContent")
                    == "wrong token"
            },
        );
        sign_in("r3ad-only");
        let page = browser.wait(
            Duration::from_secs(60),
            "live figures once signed in",
            |p| {
                is_live(p)
                    && p["active_users"]
                        .as_str()
                        .is_some_and(|s| s.parse::<u64>().is_ok_and(|n| n > 0))
            },
        );
        assert!(!asked(&browser), "the form is gone: {page}");
        let seen = browser.eval("return [document.cookie, location.href]");
        assert_eq!(
            seen[0], "",
            "the page's script cannot read the session cookie"
        );
        assert!(
            !seen[1].as_str().unwrap().contains("r3ad-only"),
            "no token in the URL: {seen}"
        );
    })
    .await
    .unwrap();
    host.stop().await.expect("clean stop");
}
