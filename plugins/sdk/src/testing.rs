//! Run a plugin natively in plain `#[test]`s: same batch logic as inside the host, with
//! state and outputs in memory where the test can look at them.
//!
//! ```ignore
//! let mut h = eddy_sdk::testing::Harness::<MyPlugin>::new(r#"{"threshold": 5}"#).unwrap();
//! let verdicts = h.run(&[h.event(br#"{"user_id":"u","event_type":"click"}"#)]);
//! assert_eq!(h.state_json::<i64>("count"), Some(1));
//! ```

use crate::{Backend, Context, Event, Level, OutputRecord, Plugin, Verdict};
use std::cell::RefCell;
use std::collections::BTreeMap;
use std::rc::Rc;

/// What a plugin left behind: its state, its outputs, its log lines.
#[derive(Debug, Default)]
pub struct Recorded {
    pub state: BTreeMap<String, Vec<u8>>,
    pub outputs: Vec<OutputRecord>,
    pub logs: Vec<(Level, String)>,
    /// Host calls made, to check that plugins stay coarse.
    pub host_calls: usize,
    /// Keys [`Harness::expire`] deleted that the plugin has not been told of yet.
    pub expired_unseen: Vec<String>,
    /// The prefixes `scan_prefix` was called with, in order.
    pub scans: Vec<String>,
}

#[derive(Clone, Default)]
struct Memory(Rc<RefCell<Recorded>>);

impl Backend for Memory {
    fn get_many(&mut self, keys: &[String]) -> Vec<Option<Vec<u8>>> {
        let mut r = self.0.borrow_mut();
        r.host_calls += 1;
        keys.iter().map(|k| r.state.get(k).cloned()).collect()
    }
    fn set_many(&mut self, entries: &[(String, Vec<u8>)]) -> Result<(), String> {
        let mut r = self.0.borrow_mut();
        r.host_calls += 1;
        for (k, v) in entries {
            r.state.insert(k.clone(), v.clone());
        }
        Ok(())
    }
    fn delete_many(&mut self, keys: &[String]) {
        let mut r = self.0.borrow_mut();
        r.host_calls += 1;
        for k in keys {
            r.state.remove(k);
        }
    }
    fn scan_prefix(&mut self, prefix: &str, limit: u32) -> Vec<(String, Vec<u8>)> {
        let mut r = self.0.borrow_mut();
        r.host_calls += 1;
        r.scans.push(prefix.to_string());
        r.state
            .range(prefix.to_string()..)
            .take_while(|(k, _)| k.starts_with(prefix))
            .take(limit as usize)
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }
    fn take_expired(&mut self) -> Option<Vec<String>> {
        let mut r = self.0.borrow_mut();
        r.host_calls += 1;
        Some(std::mem::take(&mut r.expired_unseen))
    }
    fn emit(&mut self, records: Vec<OutputRecord>) -> Result<(), String> {
        let mut r = self.0.borrow_mut();
        r.host_calls += 1;
        r.outputs.extend(records);
        Ok(())
    }
    fn log(&mut self, level: Level, message: &str) {
        let mut r = self.0.borrow_mut();
        r.host_calls += 1;
        r.logs.push((level, message.to_string()));
    }
}

/// A plugin instance running natively on in-memory state.
pub struct Harness<P: Plugin> {
    plugin: P,
    ctx: Context,
    memory: Memory,
    next_offset: i64,
    /// The fake host clock [`Harness::advance`] moves and ticks with.
    now_ms: i64,
}

impl<P: Plugin> Harness<P> {
    /// Initialises the plugin with `config` given as JSON (what the host passes from
    /// `plugins.toml`).
    pub fn new(config_json: &str) -> Result<Self, String> {
        let memory = Memory::default();
        let mut ctx = Context::new(Box::new(memory.clone()));
        let plugin = crate::init_plugin::<P>(config_json, &mut ctx)?;
        Ok(Harness {
            plugin,
            ctx,
            memory,
            next_offset: 0,
            now_ms: 0,
        })
    }

    /// Makes an event on partition 0 with the next offset.
    pub fn event<'p>(&mut self, payload: &'p [u8]) -> Event<'p> {
        self.next_offset += 1;
        Event::new("user-activities", 0, self.next_offset - 1, None, payload)
    }

    /// Runs one batch, as the host would.
    pub fn run(&mut self, events: &[Event]) -> Vec<Verdict> {
        crate::run_batch(&mut self.plugin, events, &mut self.ctx)
            .expect("in-memory outputs accept everything")
    }

    /// Runs each payload as an event of one batch.
    pub fn run_payloads<B: AsRef<[u8]>>(&mut self, payloads: &[B]) -> Vec<Verdict> {
        let events: Vec<Event> = payloads.iter().map(|p| self.event(p.as_ref())).collect();
        self.run(&events)
    }

    /// The fake host clock (Unix ms; 0 until set).
    pub fn now(&self) -> i64 {
        self.now_ms
    }

    /// Sets the fake host clock, without a tick.
    pub fn set_time(&mut self, now_ms: i64) {
        self.now_ms = now_ms;
    }

    /// Moves the fake host clock on by `ms` and ticks once at the new time, as the host does
    /// every `tick_interval_ms`.
    pub fn advance(&mut self, ms: i64) {
        self.now_ms += ms;
        self.tick(self.now_ms);
    }

    /// Calls `on-tick` at `now_ms` (the fake clock is not moved).
    pub fn tick(&mut self, now_ms: i64) {
        self.ctx.state.forget_expired();
        self.plugin.on_tick(now_ms, &mut self.ctx);
        self.ctx
            .finish()
            .expect("in-memory outputs accept everything");
    }

    /// Deletes `key` as the host does when it expires under a `[plugin.expire]` rule: the
    /// plugin's next call is told, as inside the host.
    pub fn expire(&mut self, key: &str) {
        let mut r = self.memory.0.borrow_mut();
        if r.state.remove(key).is_some() {
            r.expired_unseen.push(key.to_string());
        }
    }

    /// Simulates the host recreating the instance (after a trap or a hot swap): the plugin
    /// value is rebuilt by `init`, the state stays.
    pub fn restart(&mut self, config_json: &str) -> Result<(), String> {
        let mut ctx = Context::new(Box::new(self.memory.clone()));
        self.plugin = crate::init_plugin::<P>(config_json, &mut ctx)?;
        self.ctx = ctx;
        Ok(())
    }

    pub fn recorded(&self) -> std::cell::Ref<'_, Recorded> {
        self.memory.0.borrow()
    }

    /// The state value at `key` parsed as JSON.
    pub fn state_json<T: serde::de::DeserializeOwned>(&self, key: &str) -> Option<T> {
        self.recorded()
            .state
            .get(key)
            .and_then(|v| serde_json::from_slice(v).ok())
    }

    /// Payloads emitted to `output`, parsed as JSON.
    pub fn outputs_json(&self, output: &str) -> Vec<serde_json::Value> {
        self.recorded()
            .outputs
            .iter()
            .filter(|r| r.output == output)
            .map(|r| serde_json::from_slice(&r.payload).expect("JSON output"))
            .collect()
    }

    /// Simulates a hot swap to a new build of `Q` (e.g. a version with a newer
    /// `STATE_VERSION`): `init` then the state migration, on the state this harness holds.
    pub fn swap<Q: Plugin>(self, config_json: &str) -> Result<Harness<Q>, String> {
        let mut ctx = Context::new(Box::new(self.memory.clone()));
        let plugin = crate::init_plugin::<Q>(config_json, &mut ctx)?;
        Ok(Harness {
            plugin,
            ctx,
            memory: self.memory,
            next_offset: self.next_offset,
            now_ms: self.now_ms,
        })
    }

    /// Forgets which prefixes were scanned so far.
    pub fn clear_scans(&mut self) {
        self.memory.0.borrow_mut().scans.clear();
    }

    /// Writes `value` under `key` as if a plugin had (e.g. state an older version left);
    /// restart the instance afterwards so that its cache does not hide it.
    pub fn put_state(&mut self, key: &str, value: &[u8]) {
        self.memory
            .0
            .borrow_mut()
            .state
            .insert(key.to_string(), value.to_vec());
    }

    /// Forgets recorded outputs and logs (state stays).
    pub fn clear_outputs(&mut self) {
        let mut r = self.memory.0.borrow_mut();
        r.outputs.clear();
        r.logs.clear();
    }
}
