//! Conformance of the SDK's parser and of the four shipped plugins with the malformed-event
//! corpus in `corpus/malformed/`: the tests are in `tests/`; this library loads the corpus and
//! the answers its `README.md` documents, and runs a payload through a plugin natively.
//!
//! Run with `cargo test -p eddy-conformance`.

use eddy_sdk::testing::Harness;
use eddy_sdk::{Plugin, Verdict};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::PathBuf;

/// The shipped plugins, in the order [`Expected::Accepted`] lists their answers.
pub const PLUGINS: [&str; 4] = ["logger", "analytics", "alert", "fraud"];

/// The plugins' `[plugin.config]` tables of the shipped `plugins.toml`, as the JSON the host
/// hands to `init` (the logger logs every event rather than one in ten, so its answer does not
/// depend on the offset).
pub const LOGGER_CONFIG: &str = r#"{"sample_every": 1}"#;
pub const ANALYTICS_CONFIG: &str = r#"{"snapshot_every": 200, "top_n": 3}"#;
pub const ALERT_CONFIG: &str = r#"{"rules": [
    {"name": "high-value-purchase", "event_type": "purchase", "min_amount": 500.0, "severity": "high"},
    {"name": "quiz-completed", "event_type": "quiz_submission"}]}"#;
pub const FRAUD_CONFIG: &str = r#"{"window_secs": 60, "high_value": 1000.0, "alert_score": 70}"#;

/// The Kafka record timestamp given to every event, as the host does (2024-01-15T10:30:45Z).
pub const KAFKA_TIMESTAMP_MS: i64 = 1_705_314_645_000;

/// A plugin's answer, without the reason.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Answer {
    Ok,
    Skip,
    Retry,
    DeadLetter,
}

impl Answer {
    pub fn of(v: &Verdict) -> Answer {
        match v {
            Verdict::Ok => Answer::Ok,
            Verdict::Skip => Answer::Skip,
            Verdict::Retry(_) => Answer::Retry,
            Verdict::DeadLetter(_) => Answer::DeadLetter,
        }
    }

    fn parse(s: &str) -> Option<Answer> {
        match s {
            "ok" => Some(Answer::Ok),
            "skip" => Some(Answer::Skip),
            "dead-letter" => Some(Answer::DeadLetter),
            _ => None,
        }
    }
}

/// What the corpus README documents for one file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Expected {
    /// The parser refuses it; every plugin dead-letters it with the parser's message.
    DeadLetter,
    /// The parser accepts it; each plugin's answer, in [`PLUGINS`] order.
    Accepted([Answer; 4]),
}

/// One file of the corpus.
#[derive(Debug, Clone)]
pub struct Case {
    pub name: String,
    pub payload: Vec<u8>,
    pub expected: Expected,
}

pub fn corpus_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../corpus/malformed")
}

/// Every payload of the corpus with its documented answer, sorted by name. Panics, naming
/// the file, if a payload has no line in the README, a line names no payload, or a line
/// cannot be read.
pub fn load_corpus() -> Vec<Case> {
    let dir = corpus_dir();
    let readme =
        std::fs::read_to_string(dir.join("README.md")).expect("corpus/malformed/README.md");
    let mut documented = std::collections::BTreeMap::new();
    // The entries are under the `##` headings; the introduction above them is prose.
    let entries = readme.lines().skip_while(|l| !l.starts_with("## "));
    for line in entries {
        let Some(rest) = line.strip_prefix("- `") else {
            continue;
        };
        let (name, rest) = rest
            .split_once('`')
            .unwrap_or_else(|| panic!("README line without a closing backtick: {line}"));
        let (_, expected) = rest
            .rsplit_once('→')
            .unwrap_or_else(|| panic!("README line for {name} has no `→ expected`"));
        let expected = parse_expected(expected.trim())
            .unwrap_or_else(|e| panic!("README line for {name}: {e}"));
        if documented.insert(name.to_string(), expected).is_some() {
            panic!("README documents {name} twice");
        }
    }
    let mut cases = Vec::new();
    for entry in std::fs::read_dir(&dir).expect("corpus/malformed/") {
        let path = entry.expect("corpus/malformed/ entry").path();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        if name == "README.md" {
            continue;
        }
        let expected = documented
            .remove(&name)
            .unwrap_or_else(|| panic!("corpus/malformed/{name} has no line in README.md"));
        let payload = std::fs::read(&path).unwrap_or_else(|e| panic!("{name}: {e}"));
        cases.push(Case {
            name,
            payload,
            expected,
        });
    }
    if let Some(name) = documented.keys().next() {
        panic!("README.md documents {name}, which is not in corpus/malformed/");
    }
    cases.sort_by(|a, b| a.name.cmp(&b.name));
    cases
}

/// `dead-letter`, or `logger ok, analytics ok, alert skip, fraud dead-letter`.
fn parse_expected(s: &str) -> Result<Expected, String> {
    if s == "dead-letter" {
        return Ok(Expected::DeadLetter);
    }
    let mut answers = [None; 4];
    for part in s.split(',') {
        let (plugin, answer) = part
            .trim()
            .split_once(' ')
            .ok_or_else(|| format!("`{part}` is not `<plugin> <answer>`"))?;
        let i = PLUGINS
            .iter()
            .position(|p| *p == plugin)
            .ok_or_else(|| format!("unknown plugin `{plugin}`"))?;
        answers[i] =
            Some(Answer::parse(answer).ok_or_else(|| format!("unknown answer `{answer}`"))?);
    }
    match answers {
        [Some(a), Some(b), Some(c), Some(d)] => Ok(Expected::Accepted([a, b, c, d])),
        _ => Err(format!(
            "`{s}` does not give an answer for each of {PLUGINS:?}"
        )),
    }
}

/// Runs `payloads` as one batch through a fresh instance of `P` configured with `config`,
/// each event with the Kafka record timestamp [`KAFKA_TIMESTAMP_MS`]. A panic is returned as
/// an error holding its message, so a test can report every failing file at once.
pub fn run_batch<P: Plugin>(config: &str, payloads: &[&[u8]]) -> Result<Vec<Verdict>, String> {
    catch_unwind(AssertUnwindSafe(|| {
        let mut h = Harness::<P>::new(config).expect("the shipped config is valid");
        let events: Vec<_> = payloads
            .iter()
            .map(|p| {
                let mut e = h.event(p);
                e.timestamp_ms = Some(KAFKA_TIMESTAMP_MS);
                e
            })
            .collect();
        h.run(&events)
    }))
    .map_err(|panic| {
        panic
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_else(|| "a panic".into())
    })
}

/// Runs `payloads` as one batch through the named shipped plugin with its shipped config.
pub fn run_plugin(plugin: &str, payloads: &[&[u8]]) -> Result<Vec<Verdict>, String> {
    match plugin {
        "logger" => run_batch::<eddy_logger::Logger>(LOGGER_CONFIG, payloads),
        "analytics" => run_batch::<eddy_analytics::Analytics>(ANALYTICS_CONFIG, payloads),
        "alert" => run_batch::<eddy_alert::Alerter>(ALERT_CONFIG, payloads),
        "fraud" => run_batch::<eddy_fraud::Fraud>(FRAUD_CONFIG, payloads),
        other => panic!("no shipped plugin named {other}"),
    }
}
