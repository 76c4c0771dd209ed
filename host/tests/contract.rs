//! The hand-over of a batch across the sandbox boundary, through a real plugin built from
//! `plugins/fixtures/echo` (which emits everything it was given about each event): every
//! field of every event arrives exactly as the host consumed it, whatever the mix of keys,
//! headers, timestamps and payloads in one batch, and nothing of one call leaks into the
//! next (the host reuses its packing buffers between calls).

mod common;

use eddy::event::{Event, Header};
use eddy::wasm::{Sandbox, Verdict};
use serde_json::{Value, json};
use std::path::Path;

fn echo() -> Sandbox {
    let text = format!(
        "[kafka]\nbrokers = \"embedded\"\n[[plugin]]\nname = \"echo\"\npath = \"{}\"\n\
         [plugin.outputs]\nseen = \"stdout\"\n",
        common::wasm("eddy_fixture_echo")
    );
    let config = eddy::config::Config::parse(&text, Path::new("plugins.toml")).unwrap();
    let plugin = &config.plugins[0];
    let engine = eddy::wasm::engine().unwrap();
    let state = eddy::state::PluginState::in_memory(plugin.limits.state_mib << 20);
    Sandbox::load(&engine, plugin, state, None).unwrap()
}

#[allow(clippy::too_many_arguments)]
fn event(
    topic: &str,
    partition: i32,
    offset: i64,
    timestamp_ms: Option<i64>,
    key: Option<&[u8]>,
    headers: &[(&str, Option<&[u8]>)],
    payload: &[u8],
) -> Event {
    Event {
        topic: topic.into(),
        partition,
        offset,
        timestamp_ms,
        key: key.map(|k| k.to_vec().into()),
        headers: headers
            .iter()
            .map(|(k, v)| Header {
                key: (*k).into(),
                value: v.map(<[u8]>::to_vec),
            })
            .collect(),
        payload: payload.to_vec().into(),
    }
}

/// What the echo plugin should report for `e`.
fn expected(e: &Event) -> Value {
    json!({
        "topic": &*e.topic,
        "partition": e.partition,
        "offset": e.offset,
        "timestamp_ms": e.timestamp_ms,
        "has_key": e.key.is_some(),
        "headers": e.headers.iter().map(|h| json!([h.key, h.value])).collect::<Vec<_>>(),
        "payload": &e.payload[..],
    })
}

/// Runs `events` through the plugin as one call and checks every event came through whole.
fn round_trip(sandbox: &mut Sandbox, events: &[Event]) {
    let verdicts = sandbox.call_batch(events).unwrap();
    assert_eq!(verdicts.len(), events.len());
    assert!(verdicts.iter().all(|v| matches!(v, Verdict::Ok)));
    let outputs = sandbox.take_outputs();
    assert_eq!(outputs.len(), events.len(), "one record per event");
    for (i, (out, e)) in outputs.iter().zip(events).enumerate() {
        assert_eq!(out.output, "seen");
        assert_eq!(out.key.as_deref(), e.key.as_deref(), "event {i}: key");
        let seen: Value = serde_json::from_slice(&out.payload).unwrap();
        assert_eq!(seen, expected(e), "event {i}");
    }
    sandbox.abort_batch();
}

#[test]
fn every_field_of_every_event_reaches_the_plugin_as_consumed() {
    let mut sandbox = echo();
    let big: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
    let t = "user-activities";
    let mixed = [
        event(
            t,
            0,
            5,
            Some(1_700_000_000_123),
            Some(b"user-1"),
            &[],
            b"{\"a\":1}",
        ),
        // No key, no timestamp, an empty payload, a header with a null value.
        event(
            t,
            3,
            9,
            None,
            None,
            &[("trace", Some(b"abc")), ("null", None)],
            b"",
        ),
        // An empty key is not "no key"; timestamp 0 is a timestamp; bytes that are not UTF-8.
        event(
            t,
            3,
            10,
            Some(0),
            Some(b""),
            &[("bin", Some(&[0, 255]))],
            &[0xff, 0xfe, 0, 1],
        ),
        event(
            t,
            1,
            1 << 40,
            Some(42),
            Some(&[0xc3, 0x28]),
            &[("", Some(b""))],
            &big,
        ),
        event(t, 2, 0, Some(7), Some(b"k"), &[], b"last"),
    ];
    round_trip(&mut sandbox, &mixed);
    // The next calls reuse the packing buffers: a shorter batch, then single events of
    // each shape, must not see anything of the calls before.
    round_trip(&mut sandbox, &mixed[1..3]);
    for e in &mixed {
        round_trip(&mut sandbox, std::slice::from_ref(e));
    }
    round_trip(&mut sandbox, &mixed);
}

#[test]
fn a_call_with_events_of_two_topics_gives_each_its_own_topic() {
    let mut sandbox = echo();
    let events = [
        event("a", 0, 1, Some(1), Some(b"x"), &[], b"1"),
        event("a", 0, 2, Some(2), None, &[("h", None)], b"2"),
        event("b", 1, 1, None, Some(b"y"), &[], b"3"),
        event("a", 0, 3, Some(3), Some(b""), &[], b"4"),
    ];
    round_trip(&mut sandbox, &events);
}

#[test]
fn an_empty_call_hands_over_nothing() {
    let mut sandbox = echo();
    round_trip(&mut sandbox, &[]);
}
