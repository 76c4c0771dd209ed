//! `eddy:plugin/output`: records for the outputs `plugins.toml` maps for the plugin, queued
//! until the batch's delivery.

use super::HostState;
use crate::wasm::bindings::eddy::plugin::output;
use crate::wasm::bindings::eddy::plugin::types::OutputRecord;

impl output::Host for HostState {
    fn emit(&mut self, records: Vec<OutputRecord>) -> Result<(), String> {
        if let Some(r) = records
            .iter()
            .find(|r| !self.output_names.contains(&r.output))
        {
            let mapped: Vec<&str> = self.output_names.iter().map(String::as_str).collect();
            return Err(format!(
                "output `{}` is not mapped for plugin `{}` in plugins.toml (mapped: {})",
                r.output,
                self.plugin,
                if mapped.is_empty() {
                    "none".to_string()
                } else {
                    mapped.join(", ")
                }
            ));
        }
        self.outputs.extend(records);
        Ok(())
    }
}
