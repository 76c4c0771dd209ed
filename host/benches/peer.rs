//! Eddy against the Python consumer scripts it replaces, in one run: `make bench-peer` (or
//! `cargo bench -p eddy --bench peer` after `make plugins`).
//!
//! A fixed, seeded set of events (`EDDY_BENCH_EVENTS`, 200,000 by default) is produced to
//! the embedded broker once (over enough partitions that it keeps them all, see
//! `common::partitions_for`). Then, on the same broker and events, alternating, twice:
//! - **python**: `benches/peer/jobs.py`, the four jobs of the shipped plugins written as a
//!   user of the seed systems writes them (confluent-kafka, `json.loads`, dicts and
//!   counters), one process and consumer group per job, each producing its outputs to Kafka;
//! - **eddy**: the host with the four shipped plugins and the shipped settings (durable
//!   state, CPU deadline and memory cap on), each in its own group, outputs produced to Kafka.
//!
//! A job's rate is the events it handled over the time from its first event to its last (its
//! outputs delivered); a set drains at the rate of its slowest job. Also reported: the
//! ceiling, four Python consumers that only count, on the same broker and events.
//!
//! The Python side runs in a venv under `~/.cache/eddy/peer-venv` with confluent-kafka from
//! PyPI, made at the first run. `EDDY_BENCH_ONLY=eddy` runs Eddy's side alone, once (for
//! profiling and quick comparisons).

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const TOPIC: &str = "user-activities";
const JOBS: [&str; 4] = ["logger", "analytics", "alert", "fraud"];
/// The confluent-kafka the peer runs on (its wheel bundles librdkafka).
const CONFLUENT_KAFKA: &str = "confluent-kafka==2.16.1";

/// The venv's python, made (with confluent-kafka) if it is not there yet.
fn python() -> anyhow::Result<PathBuf> {
    let home = std::env::var_os("HOME").ok_or_else(|| anyhow::anyhow!("no HOME"))?;
    let venv = Path::new(&home).join(".cache/eddy/peer-venv");
    let python = venv.join("bin/python3");
    let ready = Command::new(&python)
        .args(["-c", "import confluent_kafka"])
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !ready {
        eprintln!("making {} with {CONFLUENT_KAFKA} (once)", venv.display());
        let ok = Command::new("python3")
            .args(["-m", "venv"])
            .arg(&venv)
            .status()?
            .success()
            && Command::new(&python)
                .args(["-m", "pip", "install", "--quiet", CONFLUENT_KAFKA])
                .status()?
                .success();
        anyhow::ensure!(ok, "cannot make the Python venv at {}", venv.display());
    }
    Ok(python)
}

/// Runs `jobs` as Python processes at once, each in its own group; returns each job's rate.
fn run_python(
    python: &Path,
    bootstrap: &str,
    jobs: &[&str],
    round: usize,
    total: u64,
) -> anyhow::Result<Vec<(String, f64)>> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("benches/peer/jobs.py");
    let children: Vec<_> = jobs
        .iter()
        .enumerate()
        .map(|(i, job)| {
            Command::new(python)
                .arg(&script)
                .arg(job)
                .args(["--bootstrap", bootstrap, "--topic", TOPIC])
                .args(["--events", &total.to_string()])
                .args(["--group", &format!("peer-{job}-{round}-{i}")])
                .stdout(Stdio::piped())
                .spawn()
        })
        .collect::<Result<_, _>>()?;
    let mut rates = Vec::new();
    for (job, child) in jobs.iter().zip(children) {
        let out = child.wait_with_output()?;
        anyhow::ensure!(out.status.success(), "python job {job} failed");
        let line: serde_json::Value = serde_json::from_slice(&out.stdout)?;
        let events = line["events"].as_f64().unwrap_or(0.0);
        let seconds = line["seconds"].as_f64().unwrap_or(f64::INFINITY);
        rates.push((job.to_string(), events / seconds));
    }
    Ok(rates)
}

/// Runs the host with the four shipped plugins; returns each plugin's rate.
fn run_eddy(
    runtime: &tokio::runtime::Runtime,
    bootstrap: &str,
    round: usize,
    total: u64,
) -> anyhow::Result<Vec<(String, f64)>> {
    let work = tempfile::tempdir()?;
    // The shipped settings, with outputs produced to Kafka (`make run` prints some).
    let plugins = common::shipped_plugins(round, true, true)?;
    let config_path = work.path().join("plugins.toml");
    std::fs::write(
        &config_path,
        format!(
            "{kafka}\n[http]\naddress = \"127.0.0.1:0\"\n[reload]\nwatch = false\n\
             [state]\ndir = \"{state}\"\n\n{plugins}",
            kafka = common::kafka_section(bootstrap),
            state = work.path().join("state").display(),
        ),
    )?;
    let host = common::start_host(runtime, &config_path)?;
    let metrics: Vec<_> = JOBS.iter().map(|j| host.metrics().plugin(j)).collect();
    let mut first: Vec<Option<Instant>> = vec![None; JOBS.len()];
    let mut done: Vec<Option<Instant>> = vec![None; JOBS.len()];
    let started = Instant::now();
    while done.iter().any(Option::is_none) {
        let now = Instant::now();
        for (i, m) in metrics.iter().enumerate() {
            let handled = m.events_handled();
            if handled > 0 && first[i].is_none() {
                first[i] = Some(now);
            }
            if handled >= total && done[i].is_none() {
                done[i] = Some(now);
            }
        }
        anyhow::ensure!(started.elapsed() < Duration::from_secs(1800), "eddy: stuck");
        std::thread::sleep(Duration::from_millis(1));
    }
    runtime.block_on(host.stop())?;
    Ok(JOBS
        .iter()
        .enumerate()
        .map(|(i, j)| {
            let seconds = (done[i].unwrap() - first[i].unwrap()).as_secs_f64();
            (j.to_string(), total as f64 / seconds)
        })
        .collect())
}

fn slowest(rates: &[(String, f64)]) -> f64 {
    rates.iter().map(|(_, r)| *r).fold(f64::INFINITY, f64::min)
}

fn show(rates: &[(String, f64)]) -> String {
    rates
        .iter()
        .map(|(j, r)| format!("{j} {r:.0}"))
        .collect::<Vec<_>>()
        .join(", ")
}

fn main() -> anyhow::Result<()> {
    common::init_logs();
    let total = common::events_to_run(200_000);
    let python = python()?;
    let runtime = tokio::runtime::Runtime::new()?;
    let (_broker, bootstrap, _) = common::seeded_broker(total)?;
    if std::env::var("EDDY_BENCH_ONLY").as_deref() == Ok("eddy") {
        // Eddy's side alone, once: for profiling and quick comparisons.
        let e = run_eddy(&runtime, &bootstrap, 0, total)?;
        println!("eddy: {} (set {:.0} events/s)", show(&e), slowest(&e));
        return Ok(());
    }

    let ceiling = run_python(&python, &bootstrap, &["count"; 4], 0, total)?;
    eprintln!("  ceiling (4 x count): {}", show(&ceiling));
    let (mut py, mut ed) = (Vec::new(), Vec::new());
    for round in 0..2 {
        let p = run_python(&python, &bootstrap, &JOBS, round, total)?;
        eprintln!("  python, round {round}: {}", show(&p));
        py.push(p);
        let e = run_eddy(&runtime, &bootstrap, round, total)?;
        eprintln!("  eddy,   round {round}: {}", show(&e));
        ed.push(e);
    }
    println!("peer benchmark, {total} events, four jobs each in its own consumer group:");
    println!(
        "  ceiling: a consumer that only counts   {:>8.0} events/s (slowest of four)",
        slowest(&ceiling)
    );
    for round in 0..2 {
        let (p, e) = (slowest(&py[round]), slowest(&ed[round]));
        println!(
            "  round {round}: python set {p:>8.0} events/s   eddy set {e:>8.0} events/s   eddy / python {:.2}x",
            e / p
        );
        println!("           python: {}", show(&py[round]));
        println!("           eddy:   {}", show(&ed[round]));
    }
    Ok(())
}
