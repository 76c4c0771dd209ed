//! `eddy:plugin/output`: records for the outputs `plugins.toml` maps for the plugin, queued
//! until the batch's delivery, within what one call may emit ([`OutputBudget`]).
//!
//! The bound is the host's own: the bindings are public, so a plugin can call `emit` in a
//! loop with small lists that never grow its memory, while every record lands in the host's.
//! Past `limits.output_records` or `limits.output_mib` in one call, `emit` traps: the call
//! fails like any trap, its effects are dropped and its events isolated.

use super::HostState;
use crate::config::Limits;
use crate::wasm::bindings::eddy::plugin::output;
use crate::wasm::bindings::eddy::plugin::types::OutputRecord;

/// What one call may still emit, and whether it already went past.
#[derive(Debug, Clone)]
pub(crate) struct OutputBudget {
    max_records: u64,
    max_bytes: u64,
    records: u64,
    bytes: u64,
    /// Set when a call went past the limit; taken by the trap's classification.
    pub(crate) exceeded: Option<String>,
}

impl OutputBudget {
    pub(crate) fn new(limits: &Limits) -> OutputBudget {
        OutputBudget {
            max_records: limits.output_records,
            max_bytes: limits.output_mib << 20,
            records: 0,
            bytes: 0,
            exceeded: None,
        }
    }

    pub(crate) fn refill(&mut self) {
        self.records = 0;
        self.bytes = 0;
        self.exceeded = None;
    }

    /// Takes `records` out of the budget, or says which limit they go past.
    fn take(&mut self, records: &[OutputRecord]) -> Result<(), String> {
        let bytes: u64 = records
            .iter()
            .map(|r| (r.output.len() + r.key.as_ref().map_or(0, Vec::len) + r.payload.len()) as u64)
            .sum();
        self.records += records.len() as u64;
        self.bytes += bytes;
        if self.records > self.max_records {
            return Err(format!(
                "emitted more than limits.output_records = {} records in one call",
                self.max_records
            ));
        }
        if self.bytes > self.max_bytes {
            return Err(format!(
                "emitted more than limits.output_mib = {} MiB in one call",
                self.max_bytes >> 20
            ));
        }
        Ok(())
    }
}

impl output::Host for HostState {
    fn emit(&mut self, records: Vec<OutputRecord>) -> wasmtime::Result<Result<(), String>> {
        if let Some(r) = records
            .iter()
            .find(|r| !self.output_names.contains(&r.output))
        {
            let mapped: Vec<&str> = self.output_names.iter().map(String::as_str).collect();
            return Ok(Err(format!(
                "output `{}` is not mapped for plugin `{}` in plugins.toml (mapped: {})",
                r.output,
                self.plugin,
                if mapped.is_empty() {
                    "none".to_string()
                } else {
                    mapped.join(", ")
                }
            )));
        }
        if let Err(limit) = self.output_budget.take(&records) {
            self.output_budget.exceeded = Some(limit.clone());
            wasmtime::bail!("{limit}");
        }
        self.outputs.extend(records);
        Ok(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(payload: usize) -> OutputRecord {
        OutputRecord {
            output: "out".into(),
            key: Some(vec![0; 10]),
            payload: vec![0; payload],
        }
    }

    #[test]
    fn a_call_may_emit_up_to_its_limits_and_no_more() {
        let limits = Limits {
            output_records: 3,
            output_mib: 1,
            ..Limits::default()
        };
        let mut budget = OutputBudget::new(&limits);
        assert!(budget.take(&[record(1), record(1)]).is_ok());
        assert!(budget.take(&[record(1)]).is_ok());
        let e = budget.take(&[record(1)]).unwrap_err();
        assert!(e.contains("limits.output_records = 3"), "{e}");
        // The next call starts again.
        budget.refill();
        assert!(budget.take(&[record(1 << 19)]).is_ok());
        let e = budget.take(&[record(1 << 19)]).unwrap_err();
        assert!(e.contains("limits.output_mib = 1 MiB"), "{e}");
    }
}
