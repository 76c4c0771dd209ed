//! The Eddy guest SDK: write a plugin as a plain Rust type, the SDK does the WebAssembly glue.
//!
//! ```ignore
//! use eddy_sdk::{Context, Event, Plugin, Verdict};
//!
//! #[derive(Default)]
//! struct Counter;
//!
//! impl Plugin for Counter {
//!     type Config = eddy_sdk::NoConfig;
//!     fn init(_: Self::Config, _: &mut Context) -> Result<Self, String> { Ok(Counter) }
//!     fn on_event(&mut self, event: &Event, ctx: &mut Context) -> Verdict {
//!         match event.activity() {
//!             Ok(a) => { ctx.state.incr(("type:", a.event_type.as_str()), 1); Verdict::Ok }
//!             Err(e) => Verdict::DeadLetter(e.to_string()),
//!         }
//!     }
//! }
//!
//! eddy_sdk::plugin!(Counter);
//! ```
//!
//! # Layout
//! - [`activity`]: the typed user-activity event and its tolerant parser.
//! - [`Event`], [`Verdict`]: what a plugin gets and what it answers.
//! - [`State`]: the plugin's key/value state, cached for the life of the instance (less the
//!   keys the host says expired) so a
//!   batch costs one `set-many` and, for keys not seen before, one `get-many` (a few single
//!   reads once the cache is warm and the SDK stops asking for keys ahead) however many
//!   events touch it. A [`Key`] is a string or a prefix and a name joined without a
//!   `format!` per event.
//! - [`Context`]: state, outputs and logging, handed to every callback.
//! - [`window`]: event-time windows (tumbling, hopping, session) in state that close on
//!   time, also on a quiet stream; [`window::first_seen`] to deduplicate by id.
//! - [`testing`]: run a plugin natively, with in-memory state and a fake clock, in plain
//!   `#[test]`s.
//!
//! Plugins must keep anything that should outlive a batch in [`State`], not in fields of the
//! plugin type: the host may recreate the instance at any time (after a trap, on hot swap),
//! and then only `init` runs again.

pub use eddy_activity as activity;
mod backend;
pub mod testing;
pub mod window;

pub use activity::{Activity, EventType, ParseError};
pub use backend::Backend;
pub use window::{Added, Closed, Windows};
// Links the word-at-a-time `memcmp` into every plugin (see that crate).
use eddy_guest_mem as _;

use serde::Serialize;
use serde::de::DeserializeOwned;
use std::cell::OnceCell;
use std::collections::HashMap;

#[doc(hidden)]
// The generated export glue takes a packed batch as flattened core-wasm arguments.
#[allow(clippy::too_many_arguments)]
pub mod bindings {
    wit_bindgen::generate!({
        path: "../../wit",
        world: "migratable-plugin",
        default_bindings_module: "eddy_sdk::bindings",
        pub_export_macro: true,
        export_macro_name: "export_plugin",
    });
}

/// A plugin: a plain Rust type. Implement this and call [`plugin!`] once.
pub trait Plugin: Sized + 'static {
    /// The plugin's `config` table from `plugins.toml`. Use `#[serde(deny_unknown_fields)]`
    /// so a typo in the config is an error the user sees at load time.
    type Config: DeserializeOwned;

    /// Builds the plugin from its config. The error is shown to the user as is.
    fn init(config: Self::Config, ctx: &mut Context) -> Result<Self, String>;

    /// Names the state keys `event` will touch, so the SDK can load them for the whole batch
    /// with one host call before the first `on_event`. Optional: keys not named here are
    /// loaded one host call each on first use. Asked only while the cache is still filling
    /// (the first batch, and after a batch that read more than a few keys from the host):
    /// once the keys an event touches are cached, naming them would be wasted work.
    fn state_keys(&self, _event: &Event, _keys: &mut Vec<String>) {}

    /// Handles one event. Events of a partition arrive in order.
    fn on_event(&mut self, event: &Event, ctx: &mut Context) -> Verdict;

    /// Called after the last event of each batch, before state is written back.
    fn on_batch_end(&mut self, _ctx: &mut Context) {}

    /// Called periodically with the host's wall-clock time.
    fn on_tick(&mut self, _now_ms: i64, _ctx: &mut Context) {}

    /// The version of the layout of this plugin's state. Bump it when a new version of the
    /// plugin stores state differently, and upgrade old state in [`Plugin::migrate`].
    const STATE_VERSION: u32 = 1;

    /// Upgrades state written with layout `from_version` (older than
    /// [`Plugin::STATE_VERSION`]). Runs once, after `init`, when this version first meets
    /// older state: on a hot swap or on a start. An error refuses the new version.
    fn migrate(&mut self, _from_version: u32, _ctx: &mut Context) -> Result<(), String> {
        Ok(())
    }
}

/// The state key where the SDK records [`Plugin::STATE_VERSION`]. Keys starting with
/// `__eddy.` are the SDK's.
pub const STATE_VERSION_KEY: &str = "__eddy.state_version";

/// Runs [`Plugin::migrate`] if the state was written with an older layout, then records the
/// current one. State with no recorded version is version 1 (or new, if empty).
fn migrate_state<P: Plugin>(plugin: &mut P, ctx: &mut Context) -> Result<(), String> {
    let stored: Option<u32> = ctx.state.get_json(STATE_VERSION_KEY);
    match stored {
        Some(v) if v == P::STATE_VERSION => return Ok(()),
        Some(v) if v > P::STATE_VERSION => {
            return Err(format!(
                "the state was written with layout version {v}, newer than this plugin's {}: \
                 refusing to run an older version on it",
                P::STATE_VERSION
            ));
        }
        Some(v) => plugin.migrate(v, ctx)?,
        None if P::STATE_VERSION > 1 && !ctx.state.scan_prefix("", 1).is_empty() => {
            plugin.migrate(1, ctx)?
        }
        None => {}
    }
    ctx.state.set_json(STATE_VERSION_KEY, &P::STATE_VERSION);
    Ok(())
}

/// For plugins that take no configuration (accepts an empty or missing table only).
#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NoConfig {}

/// What the plugin decided for one event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Handled.
    Ok,
    /// Deliberately ignored; counted as skipped.
    Skip,
    /// Transient failure: the host hands the event again, then dead-letters it.
    Retry(String),
    /// Can never be handled: goes to the dead-letter output with this reason.
    DeadLetter(String),
}

/// One Kafka record as consumed by the host, with its payload parsed on demand (once).
///
/// It borrows its bytes from the batch the host handed over (one buffer for the whole
/// batch), so making the events of a batch copies nothing.
#[derive(Debug)]
pub struct Event<'a> {
    pub topic: &'a str,
    pub partition: i32,
    pub offset: i64,
    pub timestamp_ms: Option<i64>,
    pub key: Option<&'a [u8]>,
    pub headers: &'a [(String, Option<Vec<u8>>)],
    pub payload: &'a [u8],
    /// The latest time the host believes an event may have: its clock plus `max_ahead`
    /// (`i64::MAX`: no bound, as for an event made with [`Event::new`]).
    pub latest_believable_ms: i64,
    /// How far ahead of its clock the host believes an event's time (for the reason).
    max_ahead_ms: i64,
    parsed: OnceCell<Result<Activity<'a>, ParseError>>,
}

/// Why an event has no time a plugin should use (see [`Event::time`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NoTime {
    /// Neither its payload nor its Kafka record has a timestamp.
    Missing,
    /// It is dated further ahead of the host's clock than the host believes (`max_ahead`
    /// in `plugins.toml`): a wrong clock, or a forged time.
    Ahead { by_ms: i64, max_ahead_ms: i64 },
}

impl std::fmt::Display for NoTime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            NoTime::Missing => write!(f, "no usable timestamp"),
            NoTime::Ahead {
                by_ms,
                max_ahead_ms,
            } => write!(
                f,
                "dated {} s ahead of the host's clock, more than max_ahead ({} s) allows",
                by_ms / 1000,
                max_ahead_ms / 1000
            ),
        }
    }
}

impl<'a> Event<'a> {
    /// An event with these coordinates and payload (mainly for tests).
    pub fn new(
        topic: &'a str,
        partition: i32,
        offset: i64,
        key: Option<&'a [u8]>,
        payload: &'a [u8],
    ) -> Event<'a> {
        Event {
            topic,
            partition,
            offset,
            timestamp_ms: None,
            key,
            headers: &[],
            payload,
            latest_believable_ms: i64::MAX,
            max_ahead_ms: 0,
            parsed: OnceCell::new(),
        }
    }

    /// The payload as a typed activity event. Parsed the first time it is asked for.
    pub fn activity(&self) -> Result<&Activity<'a>, &ParseError> {
        self.parsed
            .get_or_init(|| Activity::from_json(self.payload))
            .as_ref()
    }

    /// The payload as text, if it is UTF-8.
    pub fn payload_str(&self) -> Option<&str> {
        std::str::from_utf8(self.payload).ok()
    }

    /// The event's time: the activity's own timestamp, else Kafka's record timestamp; an
    /// error if it has none, or one further ahead of the host's clock than the host believes
    /// (a plugin that needs the time dead-letters such an event with the error as reason,
    /// so that it moves none of its windows or clocks).
    pub fn time(&self) -> Result<i64, NoTime> {
        let t = self
            .activity()
            .ok()
            .and_then(Activity::time_ms)
            .or(self.timestamp_ms)
            .ok_or(NoTime::Missing)?;
        if t > self.latest_believable_ms {
            return Err(NoTime::Ahead {
                by_ms: t.saturating_sub(self.latest_believable_ms - self.max_ahead_ms),
                max_ahead_ms: self.max_ahead_ms,
            });
        }
        Ok(t)
    }

    /// [`Event::time`], if there is one to use.
    pub fn time_ms(&self) -> Option<i64> {
        self.time().ok()
    }

    /// This event as if the host's clock read `host_time_ms` and believed times up to
    /// `max_ahead_ms` ahead of it (what the host says with every batch; for tests).
    pub fn with_host_time(mut self, host_time_ms: i64, max_ahead_ms: i64) -> Event<'a> {
        self.latest_believable_ms = host_time_ms.saturating_add(max_ahead_ms);
        self.max_ahead_ms = max_ahead_ms;
        self
    }
}

/// Log levels for [`Context::log`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Level {
    Trace,
    Debug,
    Info,
    Warn,
    Error,
}

/// A record queued for an output.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutputRecord {
    pub output: String,
    pub key: Option<Vec<u8>>,
    pub payload: Vec<u8>,
}

/// The plugin's key/value state, visible to this plugin only.
///
/// Reads go through a cache that lives as long as the instance, and writes are buffered: the
/// SDK writes every change back with one host call at the end of each batch. This is sound
/// because an instance is the only writer of its plugin's state, and the host recreates the
/// instance (so the cache starts cold) whenever it drops writes the instance made: after a
/// trap, on a hot swap, when a batch is abandoned. The cache is bounded (see
/// [`CACHE_MAX_ENTRIES`], [`CACHE_MAX_BYTES`]): past that it is emptied at the end of a batch
/// and fills again from the host.
///
/// Values are bytes; the `*_json` and [`State::incr`] helpers store human-readable JSON,
/// which `eddy state` can show. [`State::json_mut`] (and so `incr` and `add_f64`) keeps a
/// value decoded across batches and encodes it once per batch that changed it.
pub struct State {
    backend: Box<dyn Backend>,
    /// Values read or written (`None`: known to be absent), and whether they were written
    /// since the last write-back. foldhash rather than std's SipHash: the cache is hashed
    /// several times per event, and SipHash is slow in WebAssembly.
    cache: HashMap<String, Slot, foldhash::fast::RandomState>,
    /// Bytes of the keys and values in `cache`, to bound it.
    cache_bytes: usize,
    /// Keys written or deleted since the last write-back, in the order first written.
    dirty: Vec<String>,
    /// Values decoded by [`State::json_mut`]; they take precedence over `cache`.
    decoded: HashMap<String, DecodedSlot, foldhash::fast::RandomState>,
    /// How many values of `decoded` were handed out by `json_mut` since the last write-back
    /// (each is flagged `touched`).
    touched: usize,
    /// Keys read from the host so far (prefetched or one by one).
    loaded: usize,
    /// Whether the next batch should ask the plugin for its keys ([`Plugin::state_keys`])
    /// and prefetch them. Once the cache holds what the events touch, naming every key of
    /// every event costs more than the few reads it would save.
    prefetch_next: bool,
    /// Where keys given in parts are joined (see [`Key`]).
    key_buf: String,
}

/// A batch that read more keys than this from the host has the next one prefetch.
const PREFETCH_WHEN_LOADED: usize = 4;

/// A state key: a string (`"total"`, `&String`), or a prefix and a name that make the key
/// together (`("user:", &a.user_id)` is the key `user:<id>`), joined in a buffer the state
/// keeps rather than in a new `String` per call as `format!` would make.
pub trait Key {
    /// The key as a prefix and the rest; the key is the two joined.
    fn parts(&self) -> (&str, &str);
}

impl Key for str {
    fn parts(&self) -> (&str, &str) {
        ("", self)
    }
}

impl Key for String {
    fn parts(&self) -> (&str, &str) {
        ("", self)
    }
}

impl<K: Key + ?Sized> Key for &K {
    fn parts(&self) -> (&str, &str) {
        (**self).parts()
    }
}

impl<A: AsRef<str>, B: AsRef<str>> Key for (A, B) {
    fn parts(&self) -> (&str, &str) {
        (self.0.as_ref(), self.1.as_ref())
    }
}

/// `key` as one string: borrowed from it if it is one, else joined in `buf`.
fn joined<'k>(key: &'k impl Key, buf: &'k mut String) -> &'k str {
    match key.parts() {
        ("", whole) => whole,
        (prefix, rest) => {
            buf.clear();
            buf.push_str(prefix);
            buf.push_str(rest);
            buf
        }
    }
}

/// How many keys the state cache holds before it is emptied (at the end of a batch).
pub const CACHE_MAX_ENTRIES: usize = 50_000;
/// How many bytes of keys and values the state cache holds before it is emptied.
pub const CACHE_MAX_BYTES: usize = 8 << 20;

/// A value [`State::json_mut`] handed out, kept decoded.
trait Decoded: std::any::Any {
    fn encode(&self) -> Vec<u8>;
    fn as_any_mut(&mut self) -> &mut dyn std::any::Any;
}

impl<T: Serialize + 'static> Decoded for T {
    fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("state values serialize to JSON")
    }
    fn as_any_mut(&mut self) -> &mut dyn std::any::Any {
        self
    }
}

struct DecodedSlot {
    value: Box<dyn Decoded>,
    /// Handed out by `json_mut` since the last write-back: written back at the next.
    touched: bool,
}

/// One cached key.
struct Slot {
    value: Option<Vec<u8>>,
    dirty: bool,
}

fn slot_bytes(key: &str, value: &Option<Vec<u8>>) -> usize {
    key.len() + value.as_ref().map_or(0, Vec::len)
}

impl State {
    fn new(backend: Box<dyn Backend>) -> State {
        State {
            backend,
            cache: HashMap::default(),
            cache_bytes: 0,
            dirty: Vec::new(),
            decoded: HashMap::default(),
            touched: 0,
            loaded: 0,
            prefetch_next: true,
            key_buf: String::new(),
        }
    }

    /// Remembers `value` for `key`, a key not in the cache, as the host holds it.
    fn remember(&mut self, key: String, value: Option<Vec<u8>>) {
        debug_assert!(!self.cache.contains_key(&key));
        self.cache_bytes += slot_bytes(&key, &value);
        self.cache.insert(
            key,
            Slot {
                value,
                dirty: false,
            },
        );
    }

    /// Loads these keys with one host call (those not cached yet), so later `get`s of them
    /// are free.
    pub fn prefetch<S: AsRef<str>>(&mut self, keys: &[S]) {
        let missing: Vec<String> = keys
            .iter()
            .map(AsRef::as_ref)
            .filter(|k| !self.cache.contains_key(*k) && !self.decoded.contains_key(*k))
            .map(str::to_string)
            .collect();
        if missing.is_empty() {
            return;
        }
        let values = self.backend.get_many(&missing);
        self.loaded += missing.len();
        for (k, value) in missing.into_iter().zip(values) {
            self.remember(k, value);
        }
    }

    pub fn get(&mut self, key: impl Key) -> Option<&[u8]> {
        let mut buf = std::mem::take(&mut self.key_buf);
        self.load(joined(&key, &mut buf));
        self.key_buf = buf;
        let key = match key.parts() {
            ("", whole) => whole,
            _ => self.key_buf.as_str(),
        };
        self.cache.get(key).and_then(|s| s.value.as_deref())
    }

    /// Puts `key` in the byte cache as the plugin sees it now.
    fn load(&mut self, key: &str) {
        self.encode_decoded(key);
        if !self.cache.contains_key(key) {
            let value = self.backend.get_many(&[key.to_string()]).pop().flatten();
            self.loaded += 1;
            self.remember(key.to_string(), value);
        }
    }

    pub fn set(&mut self, key: impl Key, value: Vec<u8>) {
        self.with_key(key, |s, key| {
            s.forget_decoded(key);
            s.write(key, Some(value));
        })
    }

    pub fn delete(&mut self, key: impl Key) {
        self.with_key(key, |s, key| {
            s.forget_decoded(key);
            s.write(key, None);
        })
    }

    /// The value at `key` as a `T` to change in place (`T::default()` if absent or not a
    /// `T`). It is decoded from JSON once and kept decoded, and written back as JSON once
    /// per batch that asked for it: a batch in which 50 events update one user's record
    /// serializes it once, and the next batch does not parse it again. Counts as a write
    /// even if unchanged, so use [`State::get_json`] to only read.
    pub fn json_mut<T>(&mut self, key: impl Key) -> &mut T
    where
        T: Serialize + DeserializeOwned + Default + 'static,
    {
        let mut buf = std::mem::take(&mut self.key_buf);
        self.decode::<T>(joined(&key, &mut buf));
        self.key_buf = buf;
        let key = match key.parts() {
            ("", whole) => whole,
            _ => self.key_buf.as_str(),
        };
        self.decoded
            .get_mut(key)
            .expect("just decoded")
            .value
            .as_any_mut()
            .downcast_mut::<T>()
            .expect("just decoded as a T")
    }

    /// Makes `decoded` hold `key` as a `T`, marked as written in this batch.
    fn decode<T>(&mut self, key: &str)
    where
        T: Serialize + DeserializeOwned + Default + 'static,
    {
        // Held as a `T` already: one lookup, no allocation.
        if let Some(slot) = self.decoded.get_mut(key)
            && slot.value.as_any_mut().is::<T>()
        {
            if !slot.touched {
                slot.touched = true;
                self.touched += 1;
            }
            return;
        }
        // Held as another type: write that back, then read it as a `T`.
        self.encode_decoded(key);
        let value: T = self.get_json(key).unwrap_or_default();
        self.decoded.insert(
            key.to_string(),
            DecodedSlot {
                value: Box::new(value),
                touched: true,
            },
        );
        self.touched += 1;
    }

    /// The value as JSON of type `T`; `None` if absent or not a `T`.
    pub fn get_json<T: DeserializeOwned>(&mut self, key: impl Key) -> Option<T> {
        self.with_key(key, |s, key| {
            s.get(key).and_then(|b| serde_json::from_slice(b).ok())
        })
    }

    pub fn set_json<T: Serialize + ?Sized>(&mut self, key: impl Key, value: &T) {
        let bytes = serde_json::to_vec(value).expect("state values serialize to JSON");
        self.set(key, bytes);
    }

    /// Adds `by` to the integer counter at `key` (absent counts as 0) and returns the new value.
    pub fn incr(&mut self, key: impl Key, by: i64) -> i64 {
        let n = self.json_mut::<i64>(key);
        *n += by;
        *n
    }

    /// Adds `by` to the float sum at `key` and returns the new value.
    pub fn add_f64(&mut self, key: impl Key, by: f64) -> f64 {
        let n = self.json_mut::<f64>(key);
        *n += by;
        *n
    }

    /// Runs `f` with `key` as one string (joined in the state's buffer if it has parts).
    fn with_key<R>(&mut self, key: impl Key, f: impl FnOnce(&mut State, &str) -> R) -> R {
        let mut buf = std::mem::take(&mut self.key_buf);
        let result = f(self, joined(&key, &mut buf));
        self.key_buf = buf;
        result
    }

    /// Every key starting with `prefix`, in key order, with its value (at most `limit`).
    /// Writes buffered in this batch are written back first, so the scan sees them.
    pub fn scan_prefix(&mut self, prefix: &str, limit: u32) -> Vec<(String, Vec<u8>)> {
        self.flush();
        self.backend.scan_prefix(prefix, limit)
    }

    /// Writes buffered changes back to the host. The SDK calls it at the end of every
    /// batch and tick; plugins rarely need to.
    pub fn flush(&mut self) {
        let mut sets = Vec::new();
        if self.touched > 0 {
            for (key, slot) in self.decoded.iter_mut().filter(|(_, slot)| slot.touched) {
                slot.touched = false;
                sets.push((key.clone(), slot.value.encode()));
            }
            self.touched = 0;
            // In key order, so the write-back does not depend on the hasher's seed.
            sets.sort_unstable_by(|a, b| a.0.cmp(&b.0));
            for (key, _) in &sets {
                // The cached bytes (if any) are stale now: `get` re-encodes from `decoded`.
                if let Some(old) = self.cache.remove(key) {
                    self.cache_bytes -= slot_bytes(key, &old.value);
                    if old.dirty {
                        self.dirty.retain(|k| k != key);
                    }
                }
            }
        }
        let mut deletes = Vec::new();
        for key in self.dirty.drain(..) {
            let Some(slot) = self.cache.get_mut(&key) else {
                continue;
            };
            slot.dirty = false;
            match &slot.value {
                Some(v) => sets.push((key, v.clone())),
                None => deletes.push(key),
            }
        }
        if !deletes.is_empty() {
            self.backend.delete_many(&deletes);
        }
        if !sets.is_empty()
            && let Err(e) = self.backend.set_many(&sets)
        {
            // A refused write must not be silently lost: fail the batch, which the host
            // dead-letters with this message. (A write past the state quota never gets here:
            // the host stops the call itself, with a reason naming the limit.)
            panic!("state write refused: {e}");
        }
    }

    /// Drops from the cache the keys the host deleted itself since the previous call (they
    /// expired under a `[plugin.expire]` rule), or everything when the host had too many to
    /// list: a cached value must never bring an expired key back. First thing in every call.
    pub(crate) fn forget_expired(&mut self) {
        match self.backend.take_expired() {
            Some(keys) => {
                for key in keys {
                    // Everything was written back at the end of the previous call: nothing
                    // cached is dirty.
                    if let Some(slot) = self.cache.remove(&key) {
                        self.cache_bytes -= slot_bytes(&key, &slot.value);
                    }
                    self.forget_decoded(&key);
                }
            }
            None => {
                self.cache.clear();
                self.decoded.clear();
                self.touched = 0;
                self.cache_bytes = 0;
                self.prefetch_next = true;
            }
        }
    }

    /// Writes everything back; empties the cache if it grew past its bounds (and then has
    /// the next batch prefetch again).
    fn end_batch(&mut self) {
        self.flush();
        if self.cache.len() + self.decoded.len() > CACHE_MAX_ENTRIES
            || self.cache_bytes > CACHE_MAX_BYTES
        {
            self.cache.clear();
            self.decoded.clear();
            self.cache_bytes = 0;
            self.prefetch_next = true;
        }
    }

    /// Moves the value [`State::json_mut`] holds for `key`, if any, into the byte cache, as
    /// a write if it was changed since the last write-back.
    fn encode_decoded(&mut self, key: &str) {
        if let Some(slot) = self.decoded.remove(key) {
            let bytes = slot.value.encode();
            if slot.touched {
                self.touched -= 1;
                self.write(key, Some(bytes));
            } else {
                self.remember(key.to_string(), Some(bytes));
            }
        }
    }

    /// Drops the decoded value of `key` (it is being overwritten).
    fn forget_decoded(&mut self, key: &str) {
        if let Some(slot) = self.decoded.remove(key)
            && slot.touched
        {
            self.touched -= 1;
        }
    }

    fn write(&mut self, key: &str, value: Option<Vec<u8>>) {
        let added = slot_bytes(key, &value);
        match self.cache.get_mut(key) {
            Some(slot) => {
                self.cache_bytes -= slot_bytes(key, &slot.value);
                slot.value = value;
                if !slot.dirty {
                    slot.dirty = true;
                    self.dirty.push(key.to_string());
                }
            }
            None => {
                self.cache
                    .insert(key.to_string(), Slot { value, dirty: true });
                self.dirty.push(key.to_string());
            }
        }
        self.cache_bytes += added;
    }
}

/// What every callback gets: the plugin's state, its outputs and the host's log.
pub struct Context {
    pub state: State,
    outputs: Vec<OutputRecord>,
}

impl Context {
    fn new(backend: Box<dyn Backend>) -> Context {
        Context {
            state: State::new(backend),
            outputs: Vec::new(),
        }
    }

    /// Queues a record for the named output (mapped to a topic or stdout in `plugins.toml`).
    pub fn emit(&mut self, output: &str, key: Option<&[u8]>, payload: impl Into<Vec<u8>>) {
        self.outputs.push(OutputRecord {
            output: output.to_string(),
            key: key.map(<[u8]>::to_vec),
            payload: payload.into(),
        });
    }

    /// Queues `value` as JSON for the named output.
    pub fn emit_json<T: Serialize + ?Sized>(
        &mut self,
        output: &str,
        key: Option<&[u8]>,
        value: &T,
    ) {
        let payload = serde_json::to_vec(value).expect("outputs serialize to JSON");
        self.emit(output, key, payload);
    }

    /// Logs through the host, tagged with this plugin's name.
    pub fn log(&mut self, level: Level, message: &str) {
        self.state.backend.log(level, message);
    }

    /// Hands queued outputs and state changes to the host.
    fn finish(&mut self) -> Result<(), String> {
        self.state.end_batch();
        if self.outputs.is_empty() {
            return Ok(());
        }
        let records = std::mem::take(&mut self.outputs);
        self.state.backend.emit(records)
    }
}

/// Runs one batch through a plugin: the logic shared by the wasm export and [`testing`].
fn run_batch<P: Plugin>(
    plugin: &mut P,
    events: &[Event],
    ctx: &mut Context,
) -> Result<Vec<Verdict>, String> {
    ctx.state.forget_expired();
    let loaded_before = ctx.state.loaded;
    if ctx.state.prefetch_next {
        let mut keys = Vec::new();
        for event in events {
            plugin.state_keys(event, &mut keys);
        }
        if !keys.is_empty() {
            keys.sort_unstable();
            keys.dedup();
            ctx.state.prefetch(&keys);
        }
    }
    let verdicts = events.iter().map(|e| plugin.on_event(e, ctx)).collect();
    plugin.on_batch_end(ctx);
    // Still filling if this batch found more than a few keys missing from the cache.
    ctx.state.prefetch_next = ctx.state.loaded - loaded_before > PREFETCH_WHEN_LOADED;
    ctx.finish()?;
    Ok(verdicts)
}

fn init_plugin<P: Plugin>(config_json: &str, ctx: &mut Context) -> Result<P, String> {
    let json = if config_json.trim().is_empty() {
        "{}"
    } else {
        config_json
    };
    let config: P::Config = serde_json::from_str(json).map_err(|e| {
        // The position is in the JSON the host made from `[plugin.config]`: meaningless to
        // the user, who wrote TOML. The message names the key.
        let message = e.to_string();
        let message = message
            .rsplit_once(" at line ")
            .map_or(message.as_str(), |(m, _)| m)
            .to_string();
        format!("invalid [plugin.config]: {message}")
    })?;
    let mut plugin = P::init(config, ctx)?;
    migrate_state(&mut plugin, ctx)?;
    ctx.finish()?;
    Ok(plugin)
}

/// Exports a [`Plugin`] type as the component's implementation of the `eddy:plugin` world.
#[macro_export]
macro_rules! plugin {
    ($plugin:ty) => {
        #[cfg(target_arch = "wasm32")]
        const _: () = {
            type EddyPluginExport = $crate::wasm::Adapter<$plugin>;
    $crate::bindings::export_plugin!(EddyPluginExport with_types_in $crate::bindings);
        };
    };
}

#[doc(hidden)]
pub mod wasm {
    //! The glue between the generated bindings and a [`Plugin`](crate::Plugin).
    use super::*;
    use crate::bindings::eddy::plugin::types as wit;
    use std::any::Any;
    use std::cell::RefCell;
    use std::marker::PhantomData;

    thread_local! {
        /// The plugin instance and its context. A component instance is single-threaded and
        /// holds exactly one plugin, so one slot is enough.
        static SLOT: RefCell<Option<(Box<dyn Any>, Context)>> = const { RefCell::new(None) };
    }

    pub struct Adapter<P>(PhantomData<P>);

    fn with_plugin<P: Plugin, R>(f: impl FnOnce(&mut P, &mut Context) -> R) -> R {
        SLOT.with(|slot| {
            let mut slot = slot.borrow_mut();
            let (plugin, ctx) = slot
                .as_mut()
                .expect("the host calls init before anything else");
            f(
                plugin
                    .downcast_mut::<P>()
                    .expect("one plugin type per component"),
                ctx,
            )
        })
    }

    impl<P: Plugin> crate::bindings::Guest for Adapter<P> {
        fn init(config: String) -> Result<(), String> {
            let mut ctx = Context::new(Box::new(backend::Host));
            let plugin: P = init_plugin(&config, &mut ctx)?;
            SLOT.with(|slot| *slot.borrow_mut() = Some((Box::new(plugin), ctx)));
            Ok(())
        }

        fn on_batch(mut batch: wit::Batch) -> Vec<wit::Verdict> {
            let headers: Vec<(String, Option<Vec<u8>>)> = std::mem::take(&mut batch.headers)
                .into_iter()
                .map(|h| (h.key, h.value))
                .collect();
            let events = unpack(&batch, &headers);
            let verdicts = with_plugin(|plugin: &mut P, ctx| run_batch(plugin, &events, ctx));
            match verdicts {
                Ok(v) => v.into_iter().map(to_wit).collect(),
                // Outputs could not be handed over (e.g. an unmapped output name): the whole
                // batch failed, and the host must not advance past it.
                Err(e) => panic!("{e}"),
            }
        }

        fn migrate(_from_digest: String) -> Result<(), String> {
            // The layout check does not depend on which build wrote the state.
            with_plugin(|plugin: &mut P, ctx| {
                migrate_state(plugin, ctx)?;
                ctx.finish()
            })
        }

        fn on_tick(now_ms: i64) {
            let result = with_plugin(|plugin: &mut P, ctx| {
                ctx.state.forget_expired();
                plugin.on_tick(now_ms, ctx);
                ctx.finish()
            });
            if let Err(e) = result {
                panic!("{e}");
            }
        }
    }

    /// The events of a batch, borrowing their bytes from it (see `batch` in
    /// `wit/eddy.wit`: one list per field, keys and payloads back to back in `data`). The
    /// host packs the lists consistently; should one ever be short or a length out of
    /// range, the event gets empty bytes rather than the instance a panic.
    fn unpack<'a>(
        batch: &'a wit::Batch,
        headers: &'a [(String, Option<Vec<u8>>)],
    ) -> Vec<Event<'a>> {
        let mut data: &[u8] = &batch.data;
        let mut headers = headers;
        let mut take = |len: usize| {
            let (taken, rest) = data.split_at(len.min(data.len()));
            data = rest;
            taken
        };
        let column = |list: &[u32], i: usize| list.get(i).copied().unwrap_or(0) as usize;
        (0..batch.partitions.len())
            .map(|i| {
                let key = match batch.key_lens.get(i) {
                    Some(&len) if len >= 0 => Some(take(len as usize)),
                    _ => None,
                };
                let payload = take(column(&batch.payload_lens, i));
                let (own, rest) =
                    headers.split_at(column(&batch.header_counts, i).min(headers.len()));
                headers = rest;
                Event {
                    topic: &batch.topic,
                    partition: batch.partitions[i],
                    offset: batch.offsets.get(i).copied().unwrap_or(-1),
                    timestamp_ms: batch.timestamps_ms.get(i).copied().filter(|&t| t != -1),
                    key,
                    headers: own,
                    payload,
                    latest_believable_ms: batch.host_time_ms.saturating_add(batch.max_ahead_ms),
                    max_ahead_ms: batch.max_ahead_ms,
                    parsed: OnceCell::new(),
                }
            })
            .collect()
    }

    fn to_wit(v: Verdict) -> wit::Verdict {
        match v {
            Verdict::Ok => wit::Verdict::Ok,
            Verdict::Skip => wit::Verdict::Skip,
            Verdict::Retry(r) => wit::Verdict::Retry(r),
            Verdict::DeadLetter(r) => wit::Verdict::DeadLetter(r),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::Harness;

    #[test]
    fn a_time_further_ahead_of_the_hosts_clock_than_max_ahead_is_refused_with_the_reason() {
        let payload =
            |ts: &str| format!(r#"{{"user_id":"u1","event_type":"page_view","timestamp":"{ts}"}}"#);
        let now = 1_765_000_000_000; // 2025-12-06
        let soon = payload("2025-12-06T05:49:00Z"); // a minute after `now`
        let event = Event::new("t", 0, 0, None, soon.as_bytes()).with_host_time(now, 300_000);
        assert!(event.time().is_ok());
        let far = payload("2999-01-01T00:00:00Z");
        let event = Event::new("t", 0, 0, None, far.as_bytes()).with_host_time(now, 300_000);
        let refused = event.time().unwrap_err();
        assert!(matches!(
            refused,
            NoTime::Ahead {
                max_ahead_ms: 300_000,
                ..
            }
        ));
        assert!(
            refused.to_string().starts_with("dated 30")
                && refused
                    .to_string()
                    .ends_with("s ahead of the host's clock, more than max_ahead (300 s) allows"),
            "{refused}"
        );
        assert_eq!(event.time_ms(), None);
        // Without a payload time, Kafka's record time is held to the same bound.
        let mut untimed = Event::new("t", 0, 0, None, b"{}").with_host_time(now, 300_000);
        untimed.timestamp_ms = Some(now + 400_000);
        assert!(matches!(
            untimed.time(),
            Err(NoTime::Ahead { by_ms: 400_000, .. })
        ));
        let bare = Event::new("t", 0, 0, None, b"{}");
        assert_eq!(bare.time(), Err(NoTime::Missing));
        // An event made for a test, with no host clock: any time goes.
        assert!(Event::new("t", 0, 0, None, far.as_bytes()).time().is_ok());
    }

    /// Version 1 counts events under `n`.
    struct V1;
    impl Plugin for V1 {
        type Config = NoConfig;
        fn init(_: NoConfig, _: &mut Context) -> Result<Self, String> {
            Ok(V1)
        }
        fn on_event(&mut self, _: &Event, ctx: &mut Context) -> Verdict {
            ctx.state.incr("n", 1);
            Verdict::Ok
        }
    }

    /// Version 2 keeps the count under `count` and migrates `n` to it.
    struct V2;
    impl Plugin for V2 {
        type Config = NoConfig;
        const STATE_VERSION: u32 = 2;
        fn init(_: NoConfig, _: &mut Context) -> Result<Self, String> {
            Ok(V2)
        }
        fn on_event(&mut self, _: &Event, ctx: &mut Context) -> Verdict {
            ctx.state.incr("count", 1);
            Verdict::Ok
        }
        fn migrate(&mut self, from: u32, ctx: &mut Context) -> Result<(), String> {
            assert_eq!(from, 1);
            let n: i64 = ctx.state.get_json("n").unwrap_or(0);
            ctx.state.delete("n");
            ctx.state.set_json("count", &n);
            Ok(())
        }
    }

    /// Appends each payload to `log`, keeps a count beside it, and reads both back as bytes
    /// in the middle of the batch (on a payload `check`).
    struct Appender;
    impl Plugin for Appender {
        type Config = NoConfig;
        fn init(_: NoConfig, _: &mut Context) -> Result<Self, String> {
            Ok(Appender)
        }
        fn on_event(&mut self, e: &Event, ctx: &mut Context) -> Verdict {
            if e.payload == b"check" {
                // Bytes-level reads see what `json_mut` holds.
                let log: Vec<String> = ctx.state.get_json("log").unwrap();
                assert_eq!(ctx.state.get_json::<i64>("count"), Some(log.len() as i64));
                // The same key as another type: the old value is written back first.
                let as_value: &mut serde_json::Value = ctx.state.json_mut("log");
                assert_eq!(as_value.as_array().map(Vec::len), Some(log.len()));
                return Verdict::Skip;
            }
            let text = e.payload_str().unwrap_or_default().to_string();
            ctx.state.json_mut::<Vec<String>>("log").push(text);
            ctx.state.incr("count", 1);
            Verdict::Ok
        }
    }

    #[test]
    fn json_mut_values_are_written_back_once_per_batch_and_seen_by_plain_reads() {
        let mut h = Harness::<Appender>::new("{}").unwrap();
        h.run_payloads(&["a", "b", "check", "c"]);
        assert_eq!(
            h.state_json::<Vec<String>>("log"),
            Some(vec!["a".into(), "b".into(), "c".into()])
        );
        assert_eq!(h.state_json::<i64>("count"), Some(3));
        let calls = h.recorded().host_calls;
        // The next batch starts from the stored value; one get-many and one set-many.
        h.run_payloads(&["d", "e"]);
        assert_eq!(h.state_json::<i64>("count"), Some(5));
        assert_eq!(h.state_json::<Vec<String>>("log").unwrap().len(), 5);
        assert!(
            h.recorded().host_calls - calls <= 3,
            "{}",
            h.recorded().host_calls - calls
        );
    }

    #[test]
    fn a_new_state_version_migrates_old_state_once() {
        let mut h = Harness::<V1>::new("{}").unwrap();
        h.run_payloads(&[b"x", b"y"]);
        assert_eq!(h.state_json::<u32>(STATE_VERSION_KEY), Some(1));
        let mut h = h.swap::<V2>("{}").unwrap();
        assert_eq!(h.state_json::<i64>("count"), Some(2));
        assert_eq!(h.state_json::<i64>("n"), None);
        assert_eq!(h.state_json::<u32>(STATE_VERSION_KEY), Some(2));
        h.run_payloads(&[b"z"]);
        // A restart of the same version does not migrate again.
        h.restart("{}").unwrap();
        assert_eq!(h.state_json::<i64>("count"), Some(3));
        // Going back to an older layout is refused rather than corrupting state.
        let err = h.swap::<V1>("{}").err().unwrap();
        assert!(err.contains("newer than this plugin's 1"), "{err}");
    }

    /// Counts every payload under its own key, and all under `n`.
    struct PerKey;
    impl Plugin for PerKey {
        type Config = NoConfig;
        fn init(_: NoConfig, _: &mut Context) -> Result<Self, String> {
            Ok(PerKey)
        }
        fn state_keys(&self, e: &Event, keys: &mut Vec<String>) {
            keys.push(format!("k:{}", e.payload_str().unwrap_or_default()));
        }
        fn on_event(&mut self, e: &Event, ctx: &mut Context) -> Verdict {
            ctx.state
                .incr(("k:", e.payload_str().unwrap_or_default()), 1);
            ctx.state.incr("n", 1);
            Verdict::Ok
        }
    }

    #[test]
    fn the_cache_outlives_the_batch_so_known_keys_cost_no_reads() {
        let mut h = Harness::<PerKey>::new("{}").unwrap();
        h.run_payloads(&["a", "b", "a"]);
        let calls = h.recorded().host_calls;
        // The same keys again: nothing to read; one call to hear of expired keys, one
        // write-back.
        h.run_payloads(&["b", "a"]);
        assert_eq!(h.recorded().host_calls - calls, 2);
        assert_eq!(h.state_json::<i64>("k:a"), Some(3));
        assert_eq!(h.state_json::<i64>("k:b"), Some(2));
        assert_eq!(h.state_json::<i64>("n"), Some(5));
        // A recreated instance starts cold, from what the host holds.
        h.restart("{}").unwrap();
        h.run_payloads(&["a"]);
        assert_eq!(h.state_json::<i64>("k:a"), Some(4));
        assert_eq!(h.state_json::<i64>("n"), Some(6));
    }

    /// Counts under keys given in parts and reads them back as whole strings.
    struct Parts;
    impl Plugin for Parts {
        type Config = NoConfig;
        fn init(_: NoConfig, _: &mut Context) -> Result<Self, String> {
            Ok(Parts)
        }
        fn on_event(&mut self, e: &Event, ctx: &mut Context) -> Verdict {
            let name = e.payload_str().unwrap_or_default();
            let n = ctx.state.incr(("k:", name), 1);
            let owned = format!("k:{name}");
            assert_eq!(ctx.state.get_json::<i64>(&owned), Some(n));
            assert_eq!(
                ctx.state.get(owned.as_str()),
                Some(n.to_string().as_bytes())
            );
            ctx.state.json_mut::<Vec<i64>>(("list:", &owned)).push(n);
            ctx.state.set(("raw:", name), name.as_bytes().to_vec());
            Verdict::Ok
        }
    }

    #[test]
    fn keys_in_parts_are_the_keys_they_join_to() {
        let mut h = Harness::<Parts>::new("{}").unwrap();
        h.run_payloads(&["a", "b", "a"]);
        assert_eq!(h.state_json::<i64>("k:a"), Some(2));
        assert_eq!(h.state_json::<Vec<i64>>("list:k:a"), Some(vec![1, 2]));
        assert_eq!(h.state_json::<Vec<i64>>("list:k:b"), Some(vec![1]));
        assert_eq!(h.recorded().state.get("raw:b"), Some(&b"b".to_vec()));
    }

    /// A key the host expired (`[plugin.expire]`) starts again from nothing, even while the
    /// instance holds it in its cache, as a plain value or one decoded by `json_mut`; keys
    /// that did not expire keep their values. (Before, the cached value came back.)
    #[test]
    fn an_expired_key_comes_back_from_nothing() {
        let mut h = Harness::<Parts>::new("{}").unwrap();
        h.run_payloads(&["a", "b", "a"]);
        h.expire("k:a");
        h.expire("list:k:b");
        h.run_payloads(&["a", "b"]);
        assert_eq!(h.state_json::<i64>("k:a"), Some(1));
        assert_eq!(h.state_json::<i64>("k:b"), Some(2));
        assert_eq!(h.state_json::<Vec<i64>>("list:k:a"), Some(vec![1, 2, 1]));
        assert_eq!(h.state_json::<Vec<i64>>("list:k:b"), Some(vec![2]));
        // A tick is told too.
        h.expire("k:b");
        h.tick(0);
        h.run_payloads(&["b"]);
        assert_eq!(h.state_json::<i64>("k:b"), Some(1));
    }

    /// [`PerKey`] that counts the events it was asked to name keys for.
    struct Counted(PerKey, std::rc::Rc<std::cell::Cell<usize>>);
    thread_local! {
        static ASKED: std::rc::Rc<std::cell::Cell<usize>> = Default::default();
    }
    impl Plugin for Counted {
        type Config = NoConfig;
        fn init(_: NoConfig, _: &mut Context) -> Result<Self, String> {
            Ok(Counted(PerKey, ASKED.with(|a| a.clone())))
        }
        fn state_keys(&self, e: &Event, keys: &mut Vec<String>) {
            self.1.set(self.1.get() + 1);
            self.0.state_keys(e, keys);
        }
        fn on_event(&mut self, e: &Event, ctx: &mut Context) -> Verdict {
            self.0.on_event(e, ctx)
        }
    }

    #[test]
    fn keys_are_named_ahead_only_while_the_cache_fills() {
        let mut h = Harness::<Counted>::new("{}").unwrap();
        let asked = || ASKED.with(|a| a.get());
        let many: Vec<String> = (0..20).map(|i| i.to_string()).collect();
        h.run_payloads(&many);
        assert_eq!(asked(), 20, "a cold cache prefetches");
        // The batch above read 21 keys from the host: the next one prefetches too, and finds
        // everything cached.
        h.run_payloads(&many);
        assert_eq!(asked(), 40);
        let calls = h.recorded().host_calls;
        h.run_payloads(&many);
        assert_eq!(asked(), 40, "a warm cache does not ask");
        assert_eq!(
            h.recorded().host_calls - calls,
            2,
            "one take-expired, one write-back, no reads"
        );
        // New keys: read one by one this batch, prefetched again in the next.
        let new: Vec<String> = (100..120).map(|i| i.to_string()).collect();
        h.run_payloads(&new);
        assert_eq!(asked(), 40);
        let newer: Vec<String> = (200..220).map(|i| i.to_string()).collect();
        let calls = h.recorded().host_calls;
        h.run_payloads(&newer);
        assert_eq!(asked(), 60);
        assert_eq!(
            h.recorded().host_calls - calls,
            3,
            "one take-expired, one get-many, one write-back"
        );
        assert_eq!(h.state_json::<i64>("k:5"), Some(3));
        assert_eq!(h.state_json::<i64>("n"), Some(100));
    }

    #[test]
    fn a_cache_past_its_bound_is_emptied_and_counts_stay_exact() {
        let mut h = Harness::<PerKey>::new("{}").unwrap();
        let keys: Vec<String> = (0..CACHE_MAX_ENTRIES + 10).map(|i| i.to_string()).collect();
        for chunk in keys.chunks(5_000) {
            h.run_payloads(chunk);
        }
        // Emptied after the batch that crossed the bound: these are read again, and counted on.
        let calls = h.recorded().host_calls;
        h.run_payloads(&["0", "1"]);
        assert_eq!(
            h.recorded().host_calls - calls,
            3,
            "one take-expired, one read, one write-back"
        );
        assert_eq!(h.state_json::<i64>("k:0"), Some(2));
        assert_eq!(h.state_json::<i64>("n"), Some(keys.len() as i64 + 2));
    }
}
