//! warehouse: seed 004's `user_events`, kept by the host's PostgreSQL outputs (see the
//! README's PostgreSQL section and `migrations/`).
//!
//! - `events` (→ `user_events`, `insert_if_absent` on `event_id`): one record per event:
//!   `event_id` (the event's own, else `<topic>:<partition>:<offset>`, which a replay
//!   reproduces), `user_id`, `event_type`, `timestamp` (the event's own, else its Kafka
//!   record's), `session_id`, `page_url`, `amount` and the whole event as `metadata`.
//!
//! `user_stats` is not the plugin's: the database keeps it from `user_events`
//! (`migrations/002_user_stats_from_events.sql`), where each event is counted once however
//! often it is written. Figures kept in the plugin's state were absolute only for the
//! history that state had seen, so after `eddy replay`, `eddy reset` or a partition moving
//! to another host they overwrote a row with smaller ones. The plugin keeps no state.

use eddy_sdk::{Context, Event, Plugin, Verdict};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// The output of the per-event records (`""`: none).
    pub events_output: String,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            events_output: "events".into(),
        }
    }
}

/// A `user_events` row.
#[derive(Serialize)]
struct EventRow<'a> {
    event_id: &'a str,
    user_id: &'a str,
    event_type: &'a str,
    timestamp: Option<&'a str>,
    session_id: Option<&'a str>,
    page_url: Option<&'a str>,
    amount: Option<f64>,
    metadata: &'a RawValue,
}

pub struct Warehouse {
    config: Config,
}

/// Unix milliseconds as RFC 3339 in UTC (`2024-01-15T10:30:45.123Z`).
fn rfc3339(ms: i64) -> String {
    let (days, ms_of_day) = (ms.div_euclid(86_400_000), ms.rem_euclid(86_400_000));
    // Days since 1970-01-01 to a civil date (Howard Hinnant's `civil_from_days`).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    let s = ms_of_day / 1000;
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        s / 3600,
        s / 60 % 60,
        s % 60,
        ms_of_day % 1000
    )
}

impl Plugin for Warehouse {
    type Config = Config;

    fn init(config: Config, _ctx: &mut Context) -> Result<Self, String> {
        Ok(Warehouse { config })
    }

    fn on_event(&mut self, event: &Event, ctx: &mut Context) -> Verdict {
        let a = match event.activity() {
            Ok(a) => a,
            Err(e) => return Verdict::DeadLetter(e.to_string()),
        };
        let coordinates;
        let event_id = match a.event_id.as_deref() {
            Some(id) => id,
            None => {
                coordinates = format!("{}:{}:{}", event.topic, event.partition, event.offset);
                &coordinates
            }
        };
        // `timestamp` is NOT NULL in `user_events`: an event without one (the README's own
        // example) gets its Kafka record's.
        let record_time;
        let timestamp = match (a.timestamp.as_deref(), event.timestamp_ms) {
            (Some(t), _) => Some(t),
            (None, Some(ms)) => {
                record_time = rfc3339(ms);
                Some(record_time.as_str())
            }
            (None, None) => None,
        };
        if !self.config.events_output.is_empty() {
            // The payload parsed as an activity, so it is one JSON value.
            let Ok(metadata) = serde_json::from_slice::<&RawValue>(event.payload) else {
                return Verdict::DeadLetter("not a single JSON value".into());
            };
            let row = EventRow {
                event_id,
                user_id: &a.user_id,
                event_type: a.event_type.as_str(),
                timestamp,
                session_id: a.session_id.as_deref(),
                page_url: a.page_url.as_deref(),
                amount: a.amount(),
                metadata,
            };
            let key = event_id.as_bytes().to_vec();
            ctx.emit_json(&self.config.events_output, Some(&key), &row);
        }
        Verdict::Ok
    }
}

eddy_sdk::plugin!(Warehouse);

#[cfg(test)]
mod tests {
    use super::*;
    use eddy_sdk::testing::Harness;

    fn event(id: &str, user: &str, kind: &str, ts: &str, price: Option<f64>) -> String {
        let props = price.map_or(String::new(), |p| {
            format!(r#","properties":{{"price":{p},"quantity":2}}"#)
        });
        format!(
            r#"{{"event_id":"{id}","user_id":"{user}","event_type":"{kind}","timestamp":"{ts}"{props}}}"#
        )
    }

    #[test]
    fn one_event_row_each_and_no_stats() {
        let mut h = Harness::<Warehouse>::new("{}").unwrap();
        h.run_payloads(&[
            event("e1", "u1", "page_view", "2024-01-15T10:00:00Z", None),
            event("e2", "u1", "purchase", "2024-01-15T10:05:00Z", Some(10.25)),
            event("e3", "u2", "page_view", "2024-01-15T09:00:00Z", None),
        ]);
        let events = h.outputs_json("events");
        assert_eq!(events.len(), 3);
        assert_eq!(events[1]["event_id"], "e2");
        assert_eq!(events[1]["amount"], 20.5);
        assert_eq!(events[1]["timestamp"], "2024-01-15T10:05:00Z");
        assert_eq!(events[1]["metadata"]["properties"]["quantity"], 2);
        // user_stats is the database's (migrations/002): nothing else is emitted.
        assert!(h.outputs_json("stats").is_empty());
        assert!(
            serde_json::from_str::<Config>(r#"{"stats_output":"stats"}"#).is_err(),
            "a config naming the stats output is refused, not ignored"
        );
    }

    #[test]
    fn an_event_without_an_id_is_named_by_its_coordinates_and_garbage_is_dead_lettered() {
        let mut h = Harness::<Warehouse>::new("{}").unwrap();
        let v = h.run_payloads(&[
            r#"{"user_id":"u","event_type":"click"}"#.to_string(),
            "nope".to_string(),
        ]);
        assert_eq!(v[0], Verdict::Ok);
        assert!(matches!(v[1], Verdict::DeadLetter(_)));
        let events = h.outputs_json("events");
        assert!(
            events[0]["event_id"].as_str().unwrap().contains(':'),
            "{events:?}"
        );
    }

    #[test]
    fn an_event_without_a_timestamp_gets_its_records() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339(1_705_314_645_123), "2024-01-15T10:30:45.123Z");
        assert_eq!(rfc3339(951_782_400_000), "2000-02-29T00:00:00.000Z");
        assert_eq!(rfc3339(-1), "1969-12-31T23:59:59.999Z");
        let mut h = Harness::<Warehouse>::new("{}").unwrap();
        let payload =
            br#"{"event_id":"e-1","user_id":"user-1","event_type":"page_view","page_url":"/"}"#;
        let mut e = Event::new("events", 0, 7, None, payload);
        e.timestamp_ms = Some(1_705_314_645_123);
        assert_eq!(h.run(&[e]), [Verdict::Ok]);
        let events = h.outputs_json("events");
        assert_eq!(events[0]["timestamp"], "2024-01-15T10:30:45.123Z");
    }
}
