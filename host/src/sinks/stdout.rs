//! `"stdout"`: one line per record on the host's standard output, `[plugin/output] payload`.
//!
//! Writing waits for whoever reads standard output (a pipe to a slow reader, a terminal
//! paused with Ctrl-S), so it happens on a blocking thread, never on the async runtime's.

use super::{Delivery, Sink, SinkError};
use crate::wasm::OutputRecord;
use std::io::Write;

pub struct Stdout {
    plugin: String,
}

impl Stdout {
    pub fn new(plugin: &str) -> Stdout {
        Stdout {
            plugin: plugin.to_string(),
        }
    }
}

impl Sink for Stdout {
    fn send(&self, output: &str, records: &[&OutputRecord]) -> Result<Delivery, SinkError> {
        let mut lines = String::new();
        for r in records {
            let payload = String::from_utf8_lossy(&r.payload);
            lines.push_str(&format!("[{}/{output}] {payload}\n", self.plugin));
        }
        let output = output.to_string();
        Ok(Box::pin(async move {
            tokio::task::spawn_blocking(move || {
                // One write per call, so lines of different plugins do not interleave.
                let mut out = std::io::stdout().lock();
                out.write_all(lines.as_bytes()).and_then(|()| out.flush())
            })
            .await
            .unwrap_or_else(|e| Err(std::io::Error::other(e)))
            .map_err(|source| SinkError::Stdout { output, source })?;
            Ok(Vec::new())
        }))
    }
}
