//! The `eddy` binary as a user meets it: the errors for a bad `plugins.toml` or a bad plugin
//! name the file, the key or plugin, and the cause, and exit non-zero.

mod common;

use std::path::Path;
use std::process::{Command, Output};

fn eddy(args: &[&str], dir: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_eddy"))
        .args(args)
        .current_dir(dir)
        .output()
        .expect("run eddy")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// A directory with a `plugins.toml` of `text` and the real logger plugin next to it.
fn setup(text: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(common::wasm("eddy_logger"), dir.path().join("logger.wasm")).unwrap();
    std::fs::copy(common::wasm("eddy_alert"), dir.path().join("alert.wasm")).unwrap();
    std::fs::write(dir.path().join("plugins.toml"), text).unwrap();
    dir
}

const GOOD: &str = r#"
[kafka]
brokers = "embedded"

[http]
address = "127.0.0.1:0"

[[plugin]]
name = "logger"
path = "logger.wasm"
"#;

#[test]
fn check_accepts_a_good_file() {
    let dir = setup(GOOD);
    let out = eddy(&["check"], dir.path());
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout)
            .contains("ok (1 plugins compiled and initialised with their config)")
    );
}

#[test]
fn config_mistakes_name_the_file_the_key_and_the_fix() {
    let cases: &[(&str, &[&str])] = &[
        // A typo in a key: toml names it, with line and column.
        (
            &GOOD.replace("path =", "pth ="),
            &["plugins.toml", "pth", "line 10"],
        ),
        // A value out of range.
        (
            &format!("{GOOD}[plugin.limits]\nmemory_mib = 0\n"),
            &["plugin[0].limits.memory_mib", "1 to 4096"],
        ),
        // A missing plugin file.
        (
            &GOOD.replace("logger.wasm", "nope.wasm"),
            &["plugin[0].path", "nope.wasm", "make plugins"],
        ),
        // A bad output mapping.
        (
            &format!("{GOOD}[plugin.outputs]\nlog = \"kafka\"\n"),
            &["log", r#"{ topic = "name" }"#],
        ),
        // Not TOML at all.
        ("[kafka\nbrokers=", &["plugins.toml", "line 1"]),
        // Impossible limits.
        (
            &format!("{GOOD}[plugin.breaker]\nfailures = 20\nwindow = 10\n"),
            &["plugin[0].breaker.failures", "can never happen"],
        ),
        (
            &format!("{GOOD}[plugin.breaker]\nmax_pause_ms = 600000\n"),
            &["plugin[0].breaker.max_pause_ms", "at most 240000"],
        ),
        (
            &format!("{GOOD}[plugin.limits]\ncpu_ms = 0\n"),
            &["plugin[0].limits.cpu_ms", "1 to 600000"],
        ),
        // A topic Kafka would refuse.
        (
            &format!("{GOOD}[plugin.outputs]\nlog = {{ topic = \"my alerts\" }}\n"),
            &[
                "plugin[0].outputs.log",
                "`my alerts` is not a Kafka topic name",
            ],
        ),
    ];
    for (text, needles) in cases {
        let dir = setup(text);
        let out = eddy(&["check"], dir.path());
        assert!(!out.status.success(), "accepted:\n{text}");
        let err = stderr(&out);
        for needle in *needles {
            assert!(
                err.contains(needle),
                "error for\n{text}\nshould mention `{needle}`:\n{err}"
            );
        }
    }
    let dir = tempfile::tempdir().unwrap();
    let out = eddy(&["check"], dir.path());
    assert!(
        stderr(&out).contains("cannot read plugins.toml"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn bad_plugins_are_refused_at_start_and_by_check_with_the_cause() {
    // Not a component at all; a core module instead of a component; a component of some
    // other contract (wrong exports); a plugin built against an older contract version; a
    // plugin whose init rejects its config. All are reported together, by `eddy check` and
    // by `eddy run`, which then exits.
    let text = format!(
        "{GOOD}\n[[plugin]]\nname = \"garbage\"\npath = \"garbage.wasm\"\n\
         \n[[plugin]]\nname = \"core\"\npath = \"core.wasm\"\n\
         \n[[plugin]]\nname = \"wrong\"\npath = \"wrong.wasm\"\n\
         \n[[plugin]]\nname = \"old\"\npath = \"old.wasm\"\n\
         \n[[plugin]]\nname = \"alert\"\npath = \"alert.wasm\"\n[plugin.config]\nrules = []\n"
    );
    let dir = setup(&text);
    std::fs::write(dir.path().join("garbage.wasm"), b"this is not wasm").unwrap();
    std::fs::write(dir.path().join("core.wasm"), b"\0asm\x01\0\0\0").unwrap();
    std::fs::copy(
        common::wasm("eddy_fixture_wrong_world"),
        dir.path().join("wrong.wasm"),
    )
    .unwrap();
    std::fs::copy(
        common::wasm("eddy_fixture_old_contract"),
        dir.path().join("old.wasm"),
    )
    .unwrap();
    for command in ["check", "run"] {
        let out = eddy(&[command], dir.path());
        assert!(!out.status.success(), "{command} accepted bad plugins");
        check_bad_plugins_error(&stderr(&out));
    }
}

fn check_bad_plugins_error(err: &str) {
    assert!(err.contains("5 plugins failed to load"), "{err}");
    assert!(
        err.contains("plugin `old`")
            && err.contains("built against eddy:plugin@0.1.0")
            && err.contains("eddy:plugin@0.5.0: rebuild it"),
        "an older contract version is named: {err}"
    );
    assert!(
        err.contains("plugin `wrong`")
            && err.contains("does not implement the eddy:plugin world")
            && err.contains("on-batch"),
        "the wrong export is named: {err}"
    );
    assert!(
        err.contains("plugin `garbage`") && err.contains("not a valid WebAssembly component"),
        "{err}"
    );
    assert!(err.contains("plugin `core`"), "{err}");
    assert!(
        err.contains("plugin `alert`")
            && err.contains("init failed")
            && err.contains("at least one"),
        "{err}"
    );
    assert!(
        !err.contains("plugin `logger`"),
        "the good plugin is not blamed: {err}"
    );
}

#[test]
fn an_unreachable_cluster_is_named_at_start() {
    let text = GOOD.replace("\"embedded\"", "\"127.0.0.1:1\"\nconnect_timeout_ms = 1500");
    let dir = setup(&text);
    let out = eddy(&["run"], dir.path());
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(
        err.contains("cannot reach Kafka at 127.0.0.1:1 within 1.5s")
            && err.contains("check kafka.brokers in plugins.toml"),
        "{err}"
    );
}

#[cfg(unix)]
#[test]
fn sighup_reloads_plugins_toml_when_watching_is_off() {
    use std::io::Read;
    use std::time::{Duration, Instant};
    let text = GOOD.replace("[http]", "[reload]\nwatch = false\n\n[http]")
        + "[plugin.outputs]\nlog = \"discard\"\n[plugin.config]\nsample_every = 5\n";
    let dir = setup(&text);
    let mut child = Command::new(env!("CARGO_BIN_EXE_eddy"))
        .arg("run")
        .current_dir(dir.path())
        .env("EDDY_LOG", "info")
        .stderr(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut stderr = child.stderr.take().unwrap();
    let log = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
    let sink = log.clone();
    let reader = std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n) = stderr.read(&mut buf) {
            if n == 0 {
                break;
            }
            sink.lock()
                .unwrap()
                .push_str(&String::from_utf8_lossy(&buf[..n]));
        }
    });
    let wait_for_log = |needle: &str| {
        let deadline = Instant::now() + Duration::from_secs(60);
        while !log.lock().unwrap().contains(needle) {
            assert!(
                Instant::now() < deadline,
                "no `{needle}` in the log:\n{}",
                log.lock().unwrap()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    wait_for_log("consuming");
    std::fs::write(
        dir.path().join("plugins.toml"),
        text.replace("sample_every = 5", "sample_every = 2"),
    )
    .unwrap();
    let hup = |pid: u32| {
        Command::new("kill")
            .args(["-HUP", &pid.to_string()])
            .status()
            .unwrap()
    };
    assert!(hup(child.id()).success());
    wait_for_log("applied new settings");
    // A typo: refused, and the plugin keeps running.
    std::fs::write(
        dir.path().join("plugins.toml"),
        text.replace("sample_every = 5", "sample_evry = 2"),
    )
    .unwrap();
    assert!(hup(child.id()).success());
    wait_for_log("change refused");
    assert!(log.lock().unwrap().contains("unknown field `sample_evry`"));
    Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    let status = child.wait().unwrap();
    reader.join().unwrap();
    assert!(
        status.success(),
        "exit on Ctrl-C is clean:\n{}",
        log.lock().unwrap()
    );
    assert!(
        log.lock().unwrap().contains("stopped;"),
        "the worker stopped cleanly"
    );
}

#[test]
fn a_bad_replay_time_is_a_one_line_error_and_impossible_dates_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    for bad in [
        "2024-01-15T10:30:45+0é00",
        "2024-02-31T00:00:00Z",
        "2023-02-29T12:00:00Z",
        "yesterday",
    ] {
        let out = eddy(&["replay", "analytics", "--from", bad], dir.path());
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(2), "{bad}: {err}");
        assert!(!err.contains("panicked"), "{bad}: {err}");
        assert!(!err.contains("backtrace"), "{bad}: {err}");
        let first = err.lines().next().unwrap_or_default();
        assert!(
            first.starts_with("error: invalid value") && first.contains(bad),
            "{bad}: the first line should say what is wrong:\n{err}"
        );
        assert!(first.contains("RFC 3339"), "{bad}: {err}");
    }
}
