//! A failed call into a plugin: its kind (for metrics and isolation) and a message for logs
//! and dead letters, with the guest's panic message when it printed one.

/// A failed call into the plugin: the trap's kind and a message for logs and dead letters.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{} ({message})", kind.label())]
pub struct Trap {
    pub kind: crate::metrics::TrapKind,
    pub message: String,
}

/// The last panic a Rust guest wrote to stderr, as `panicked at FILE:LINE:COL: MESSAGE`.
pub fn panic_message(stderr: &[u8]) -> Option<String> {
    let text = String::from_utf8_lossy(stderr);
    let lines: Vec<&str> = text.lines().collect();
    let start = lines.iter().rposition(|l| l.contains("panicked at"))?;
    let head = lines[start]
        .split_once("panicked at")
        .map_or(lines[start], |(_, rest)| rest)
        .trim();
    let message: Vec<&str> = lines[start + 1..]
        .iter()
        .take_while(|l| !l.starts_with("note: "))
        .map(|l| l.trim())
        .collect();
    Some(
        format!("panicked at {head} {}", message.join(" "))
            .trim()
            .to_string(),
    )
}
