//! Soak: `make soak` (or `cargo bench -p eddy --bench soak` after `make plugins`).
//!
//! Runs the `eddy` binary (release build) with the shipped `plugins.toml` (its four plugins
//! and their `[plugin.expire]` rules) on the embedded broker, its generator drawing from
//! 5,000,000 users, two events a session (a new user about every other event), stamping each record with its event time, 100 ms of event time apart:
//! at 20,000 events/s that is ~33 minutes of traffic per second, a day in ~45 s. Every
//! 15 s it reads each plugin's state size from `/metrics` and the process's resident memory.
//!
//! Without expiry, analytics' `user:`/`journey:` keys and fraud's `recent:` keys grow with
//! every new user; with it they level off once event time has passed the longest rule (a
//! day). The run fails if state or memory in its second half peaks more than `GROWTH_ALLOWED`
//! above their peak in the first half. `EDDY_SOAK_SECONDS` (default 240) and `EDDY_SOAK_RATE` (default 20000)
//! change the run.

mod common;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const SAMPLE_EVERY: Duration = Duration::from_secs(15);
/// Most growth allowed from the first half's peak to the second half's.
const GROWTH_ALLOWED: f64 = 0.10;
const SPACING_MS: u64 = 100;
const USERS: u64 = 5_000_000;
/// Two events a session: about a new user every other event.
const SESSION_EVENTS: u64 = 2;

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// The shipped `plugins.toml`, with this run's generator, an ephemeral HTTP port and the
/// plugins' absolute paths.
fn config_text(rate: u64) -> String {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf();
    let shipped = std::fs::read_to_string(root.join("plugins.toml")).expect("plugins.toml");
    let plugins = common::plugins_dir();
    let plugins_section = &shipped[shipped.find("[[plugin]]").expect("plugins")..];
    // Event time runs hours ahead of the host's clock here on purpose (hours of traffic in
    // minutes): let the plugins believe it.
    let plugins_section = plugins_section
        .replace(
            "target/wasm32-wasip2/plugin/",
            &format!("{}/", plugins.display()),
        )
        .replace("[[plugin]]\n", "[[plugin]]\nmax_ahead = \"365d\"\n");
    format!(
        "[kafka]\nbrokers = \"embedded\"\ntopic = \"user-activities\"\npartitions = 6\n\
         [http]\naddress = \"127.0.0.1:0\"\n[reload]\nwatch = false\n\
         [generator]\nrate = {rate}\nseed = 42\nfraud_every = 500\nusers = {USERS}\nsession_events = {SESSION_EVENTS}\n\
         spacing_ms = {SPACING_MS}\nevent_timestamps = true\n\n{plugins_section}"
    )
}

/// `GET /metrics` from `addr`.
fn metrics(addr: &str) -> anyhow::Result<String> {
    let mut stream = std::net::TcpStream::connect(addr)?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(
        stream,
        "GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut body = String::new();
    stream.read_to_string(&mut body)?;
    Ok(body)
}

/// The value of each sample of `family` per `plugin` label.
fn per_plugin(text: &str, family: &str) -> BTreeMap<String, f64> {
    let mut out = BTreeMap::new();
    for line in text.lines() {
        let Some(rest) = line.strip_prefix(family) else {
            continue;
        };
        let Some(rest) = rest.strip_prefix("{plugin=\"") else {
            continue;
        };
        let Some((plugin, rest)) = rest.split_once('"') else {
            continue;
        };
        if let Some(value) = rest.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()) {
            out.insert(plugin.to_string(), value);
        }
    }
    out
}

fn resident_mib(pid: u32) -> anyhow::Result<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse::<f64>().ok())
        .map(|kib| kib / 1024.0)
        .ok_or_else(|| anyhow::anyhow!("no VmRSS in /proc/{pid}/status"))
}

struct Sample {
    at: Duration,
    handled: f64,
    state_mib: BTreeMap<String, f64>,
    keys: BTreeMap<String, f64>,
    resident_mib: f64,
}

fn main() -> anyhow::Result<()> {
    let seconds = env_or("EDDY_SOAK_SECONDS", 240);
    let rate = env_or("EDDY_SOAK_RATE", 20_000);
    let work = tempfile::tempdir()?;
    std::fs::write(work.path().join("plugins.toml"), config_text(rate))?;
    let mut child = Command::new(env!("CARGO_BIN_EXE_eddy"))
        .args(["run", "--config", "plugins.toml"])
        .current_dir(work.path())
        .env("EDDY_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()?;
    // The metrics address, from the host's first lines.
    let stderr = child.stderr.take().expect("piped");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if let Some(rest) = line.split("metrics at http://").nth(1) {
                let addr = rest.split('/').next().unwrap_or_default().to_string();
                let _ = tx.send(addr);
            }
        }
    });
    let result = (|| -> anyhow::Result<Vec<Sample>> {
        let addr = rx
            .recv_timeout(Duration::from_secs(120))
            .map_err(|_| anyhow::anyhow!("the host did not start in 120 s"))?;
        let started = Instant::now();
        let mut samples = Vec::new();
        println!(
            "soak: {rate} events/s for {seconds} s, sessions of {SESSION_EVENTS} events from {USERS} users, {SPACING_MS} ms of event time apart"
        );
        println!(
            "{:>6} {:>10} {:>9} | state MiB (keys): analytics, fraud, alert, logger | resident",
            "time", "events", "evt time"
        );
        while started.elapsed() < Duration::from_secs(seconds) {
            std::thread::sleep(SAMPLE_EVERY);
            let text = metrics(&addr)?;
            // Summed over outcomes (ok, skipped, dead-lettered).
            let handled: f64 = text
                .lines()
                .filter(|l| l.starts_with("eddy_events_total{plugin=\"analytics\""))
                .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
                .sum();
            let sample = Sample {
                at: started.elapsed(),
                handled,
                state_mib: per_plugin(&text, "eddy_plugin_state_bytes")
                    .into_iter()
                    .map(|(p, b)| (p, b / (1 << 20) as f64))
                    .collect(),
                keys: per_plugin(&text, "eddy_plugin_state_keys"),
                resident_mib: resident_mib(child.id())?,
            };
            let cell = |p: &str| {
                format!(
                    "{:.1} ({:.0})",
                    sample.state_mib.get(p).copied().unwrap_or(0.0),
                    sample.keys.get(p).copied().unwrap_or(0.0)
                )
            };
            println!(
                "{:>5.0}s {:>10.0} {:>8.1}h | {:>16} {:>12} {:>8} {:>8} | {:>6.1} MiB",
                sample.at.as_secs_f64(),
                sample.handled,
                sample.handled * SPACING_MS as f64 / 3_600_000.0,
                cell("analytics"),
                cell("fraud"),
                cell("alert"),
                cell("logger"),
                sample.resident_mib
            );
            samples.push(sample);
        }
        Ok(samples)
    })();
    let _ = child.kill();
    let _ = child.wait();
    let samples = result?;
    anyhow::ensure!(samples.len() >= 4, "too few samples: run longer");
    // The peak of the second half against the peak of the first: state rises and falls as
    // keys expire in waves (the event clock is the latest timestamp over all partitions), so
    // levelled off means no new highs.
    let half = samples.len() / 2;
    let (mid, end) = (&samples[half], &samples[samples.len() - 1]);
    let total = |s: &Sample| s.state_mib.values().sum::<f64>();
    let peak =
        |samples: &[Sample], f: &dyn Fn(&Sample) -> f64| samples.iter().map(f).fold(0.0, f64::max);
    let (first, second) = samples.split_at(half);
    let state_peaks = (peak(first, &total), peak(second, &total));
    let memory_peaks = (
        peak(first, &|s: &Sample| s.resident_mib),
        peak(second, &|s: &Sample| s.resident_mib),
    );
    let state_growth = state_peaks.1 / state_peaks.0.max(f64::MIN_POSITIVE) - 1.0;
    let memory_growth = memory_peaks.1 / memory_peaks.0 - 1.0;
    println!(
        "about {:.1} million distinct users in {:.1} million events",
        end.handled / SESSION_EVENTS as f64 / 1e6,
        end.handled / 1e6
    );
    println!(
        "peak of the first half against the second ({:.0} -> {:.0} events): state {:.1} -> {:.1} MiB ({:+.1}%), resident {:.1} -> {:.1} MiB ({:+.1}%)",
        mid.handled,
        end.handled,
        state_peaks.0,
        state_peaks.1,
        state_growth * 100.0,
        memory_peaks.0,
        memory_peaks.1,
        memory_growth * 100.0
    );
    anyhow::ensure!(
        end.handled > mid.handled * 1.2,
        "the plugins barely progressed in the second half: the host cannot keep up with {rate} events/s here (set EDDY_SOAK_RATE lower)"
    );
    anyhow::ensure!(
        state_growth <= GROWTH_ALLOWED && memory_growth <= GROWTH_ALLOWED,
        "state or memory still grows by more than {:.0}% in the second half",
        GROWTH_ALLOWED * 100.0
    );
    println!("levelled off: both within {:.0}%", GROWTH_ALLOWED * 100.0);
    Ok(())
}
