//! Resident memory: `make bench-memory` (or `cargo bench -p eddy --bench memory` after
//! `make plugins`).
//!
//! Runs the `eddy` binary itself (release build), as a user would, with the embedded broker
//! and the generator at 200 events/s: once with the four shipped plugins, once with the four
//! plus `EXTRA` more copies of analytics (each its own plugin: instance, state file, consumer
//! group). After the plugins have been consuming for a while, it reads the process's resident
//! memory (`VmRSS`). The difference divided by `EXTRA` is the cost of one more plugin.
//!
//! Each configuration runs twice in the same directory: a first start, which compiles the
//! plugins, and a restart, which loads their machine code from the compile cache the first
//! start left (what every later start and every unchanged plugin at a hot swap does).

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const EXTRA: usize = 8;
const SETTLE: Duration = Duration::from_secs(8);

fn plugins(extra: usize) -> String {
    let dir = common::plugins_dir();
    let wasm = |name: &str| dir.join(format!("eddy_{name}.wasm")).display().to_string();
    let mut text = String::new();
    for (name, output, config) in [
        ("logger", "log", "sample_every = 10\n"),
        ("analytics", "snapshots", "snapshot_every = 200\n"),
        (
            "alert",
            "alerts",
            "[[plugin.config.rules]]\nname = \"big\"\nevent_type = \"purchase\"\nmin_amount = 500.0\n",
        ),
        ("fraud", "alerts", ""),
    ] {
        text += &format!(
            "[[plugin]]\nname = \"{name}\"\npath = \"{}\"\n[plugin.outputs]\n{output} = \"discard\"\n[plugin.config]\n{config}\n",
            wasm(name)
        );
    }
    for i in 0..extra {
        text += &format!(
            "[[plugin]]\nname = \"analytics-{i}\"\npath = \"{}\"\n[plugin.outputs]\nsnapshots = \"discard\"\n\n",
            wasm("analytics")
        );
    }
    text
}

/// Resident memory of the host with `extra` more plugins, in MiB: at a first start
/// (compiling) and at a restart (loading the compiled code from the cache).
fn resident_mib(extra: usize) -> anyhow::Result<(f64, f64)> {
    let work = tempfile::tempdir()?;
    std::fs::write(
        work.path().join("plugins.toml"),
        format!(
            "[kafka]\nbrokers = \"embedded\"\n[http]\naddress = \"127.0.0.1:0\"\n\
             [generator]\nrate = 200\n[reload]\nwatch = false\n\n{}",
            plugins(extra)
        ),
    )?;
    let first = run_and_measure(work.path(), extra)?;
    let restart = run_and_measure(work.path(), extra)?;
    Ok((first, restart))
}

/// Runs `eddy run` in `dir` until every plugin consumed for a while, and returns its
/// resident memory in MiB.
fn run_and_measure(dir: &std::path::Path, extra: usize) -> anyhow::Result<f64> {
    let mut child = Command::new(env!("CARGO_BIN_EXE_eddy"))
        .args(["run", "--config", "plugins.toml"])
        .current_dir(dir)
        .env("EDDY_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()?;
    // Wait until every plugin logs that it is consuming.
    let stderr = child.stderr.take().expect("piped");
    let want = 4 + extra;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut consuming = 0;
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if line.contains("consuming") {
                consuming += 1;
                if consuming == want {
                    let _ = tx.send(());
                }
            }
        }
    });
    let started = Instant::now();
    let joined = rx.recv_timeout(Duration::from_secs(120));
    let result = (|| {
        joined.map_err(|_| anyhow::anyhow!("{want} plugins did not all start in 120 s"))?;
        std::thread::sleep(SETTLE);
        let status = std::fs::read_to_string(format!("/proc/{}/status", child.id()))?;
        let kib: f64 = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| anyhow::anyhow!("no VmRSS in /proc/<pid>/status"))?;
        eprintln!(
            "  {want} plugins: {:.1} MiB after {:.0} s",
            kib / 1024.0,
            started.elapsed().as_secs_f64()
        );
        Ok(kib / 1024.0)
    })();
    let _ = child.kill();
    let _ = child.wait();
    result
}

fn main() -> anyhow::Result<()> {
    // [first start, restart] for the four plugins and for the four plus EXTRA.
    let mut base = [f64::MAX; 2];
    let mut more = [f64::MAX; 2];
    // Twice each, alternating; the smaller reading is the less disturbed one.
    for _ in 0..2 {
        let (first, restart) = resident_mib(0)?;
        base = [base[0].min(first), base[1].min(restart)];
        let (first, restart) = resident_mib(EXTRA)?;
        more = [more[0].min(first), more[1].min(restart)];
    }
    println!("resident memory of the eddy process (embedded broker and generator included):");
    println!("                                first start (compiles)   restart (compile cache)");
    println!(
        "  four shipped plugins          {:>7.1} MiB              {:>7.1} MiB",
        base[0], base[1]
    );
    println!(
        "  four + {EXTRA} more analytics     {:>7.1} MiB              {:>7.1} MiB",
        more[0], more[1]
    );
    println!(
        "  per additional plugin         {:>7.1} MiB              {:>7.1} MiB",
        (more[0] - base[0]) / EXTRA as f64,
        (more[1] - base[1]) / EXTRA as f64
    );
    Ok(())
}
