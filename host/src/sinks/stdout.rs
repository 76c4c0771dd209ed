//! `"stdout"`: one line per record on the host's standard output, `[plugin/output] payload`.

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
        // One write per call, so lines of different plugins do not interleave.
        let mut out = std::io::stdout().lock();
        out.write_all(lines.as_bytes())
            .and_then(|()| out.flush())
            .map_err(|source| SinkError::Stdout {
                output: output.to_string(),
                source,
            })?;
        Ok(Box::pin(async { Ok(Vec::new()) }))
    }
}
