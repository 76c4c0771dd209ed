//! The plugins of the fault-isolation tests: the four real ones, and the `misbehave`
//! fixture configured to fail in each way it can.

use super::*;
use eddy::Host;

pub const REAL: [&str; 4] = ["logger", "analytics", "alert", "fraud"];

/// The four shipped plugins, their outputs discarded.
pub fn real_plugins() -> String {
    let mut text = String::new();
    for (name, outputs, config) in [
        ("logger", "log", ""),
        ("analytics", "snapshots", ""),
        (
            "alert",
            "alerts",
            "[[plugin.config.rules]]\nname = \"big\"\nevent_type = \"purchase\"\nmin_amount = 500.0\n",
        ),
        ("fraud", "alerts", ""),
    ] {
        text += &format!(
            "[[plugin]]\nname = \"{name}\"\npath = \"{}\"\ntick_interval_ms = 0\n[plugin.outputs]\n{outputs} = \"discard\"\n{config}\n",
            wasm(&format!("eddy_{name}"))
        );
    }
    text
}

/// One misbehaving fixture per way of failing, each on events carrying `marker`.
pub fn bad_plugins(marker: &str) -> String {
    let fixture = wasm("eddy_fixture_misbehave");
    format!(
        r#"
[[plugin]]
name = "panics"
path = "{fixture}"
[plugin.config]
mode = "panic"
marker = "{marker}"

[[plugin]]
name = "loops"
path = "{fixture}"
[plugin.limits]
cpu_ms = 150
[plugin.config]
mode = "loop"
marker = "{marker}"

[[plugin]]
name = "grows"
path = "{fixture}"
[plugin.limits]
memory_mib = 16
[plugin.config]
mode = "grow"
marker = "{marker}"

[[plugin]]
name = "retries"
path = "{fixture}"
[plugin.limits]
max_retries = 2
retry_backoff_ms = 10
[plugin.config]
mode = "retry"
marker = "{marker}"
"#
    )
}

pub const POISON_KEYS: [&str; 3] = ["poison-a", "poison-b", "poison-c"];

/// `good` generated events with the three poison events among them. A poison event is a
/// valid activity event (the real plugins handle it) that carries the fixtures' marker.
pub fn records_with_poison(good: usize, seed: u64) -> Vec<(Option<Vec<u8>>, Vec<u8>)> {
    let mut records: Vec<(Option<Vec<u8>>, Vec<u8>)> = generate(good, &generator_options(seed, 0))
        .into_iter()
        .map(|g| (Some(g.key.into_bytes()), g.payload))
        .collect();
    for (i, key) in POISON_KEYS.iter().enumerate() {
        let payload = format!(r#"{{"user_id":"{key}","event_type":"click","note":"POISON"}}"#);
        records.insert(
            (i + 1) * good / 4,
            (Some(key.as_bytes().to_vec()), payload.into_bytes()),
        );
    }
    records
}

pub async fn wait_handled(host: &Host, names: &[&str], total: u64) {
    let metrics = host.metrics().clone();
    let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
    wait_async(
        Duration::from_secs(180),
        "every plugin to account for every event",
        move || {
            names
                .iter()
                .all(|n| metrics.plugin(n).events_handled() >= total)
        },
    )
    .await;
}
