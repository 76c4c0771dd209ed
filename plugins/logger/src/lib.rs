//! logger: one structured (JSON) line per event, to the `log` output (stdout by default).
//!
//! Replaces the seed systems' `logger.py`. Sampling is by offset (`offset % sample_every == 0`),
//! so it needs no state and is the same whichever instance handles the event.

use eddy_sdk::{Context, Event, EventType, Plugin, Verdict};
use serde::{Deserialize, Serialize};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Log one event in this many (1 = every event).
    pub sample_every: u32,
    /// The output the lines go to.
    pub output: String,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            sample_every: 1,
            output: "log".into(),
        }
    }
}

pub struct Logger {
    config: Config,
}

/// The line written for one event.
#[derive(Serialize)]
struct Line<'a> {
    partition: i32,
    offset: i64,
    #[serde(skip_serializing_if = "Option::is_none")]
    timestamp: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    user_id: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    event_type: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    page_url: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    product_id: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    amount: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    country: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
}

impl Plugin for Logger {
    type Config = Config;

    fn init(config: Config, _ctx: &mut Context) -> Result<Self, String> {
        if config.sample_every == 0 {
            return Err("sample_every must be at least 1".into());
        }
        if config.output.is_empty() {
            return Err("output must name an output".into());
        }
        Ok(Logger { config })
    }

    fn on_event(&mut self, event: &Event, ctx: &mut Context) -> Verdict {
        let sampled = event.offset.rem_euclid(i64::from(self.config.sample_every)) == 0;
        let activity = event.activity();
        if sampled {
            let mut line = Line {
                partition: event.partition,
                offset: event.offset,
                timestamp: None,
                user_id: None,
                event_type: None,
                page_url: None,
                product_id: None,
                amount: None,
                country: None,
                error: None,
            };
            match activity {
                Ok(a) => {
                    line.timestamp = a.timestamp.as_deref();
                    line.user_id = Some(&a.user_id);
                    line.event_type = Some(a.event_type.as_str());
                    line.page_url = a.page_url.as_deref();
                    line.product_id = a.properties.product_id.as_deref();
                    if matches!(a.event_type, EventType::Purchase | EventType::AddToCart) {
                        line.amount = a.amount();
                    }
                    line.country = a.country();
                }
                Err(e) => line.error = Some(e.to_string()),
            }
            ctx.emit_json(&self.config.output, event.key, &line);
        }
        match activity {
            Ok(_) if sampled => Verdict::Ok,
            Ok(_) => Verdict::Skip,
            Err(e) => Verdict::DeadLetter(e.to_string()),
        }
    }
}

eddy_sdk::plugin!(Logger);

#[cfg(test)]
mod tests {
    use super::*;
    use eddy_sdk::testing::Harness;

    const CLICK: &[u8] =
        br#"{"user_id":"user-1","event_type":"click","page_url":"/","location":{"country":"DE"}}"#;

    #[test]
    fn one_line_per_event() {
        let mut h = Harness::<Logger>::new("{}").unwrap();
        let verdicts = h.run_payloads(&[CLICK, CLICK, CLICK]);
        assert_eq!(verdicts, vec![Verdict::Ok; 3]);
        let lines = h.outputs_json("log");
        assert_eq!(lines.len(), 3);
        assert_eq!(lines[1]["offset"], 1);
        assert_eq!(lines[1]["user_id"], "user-1");
        assert_eq!(lines[1]["event_type"], "click");
        assert_eq!(lines[1]["country"], "DE");
    }

    #[test]
    fn sampling_keeps_one_in_n_and_skips_the_rest() {
        let mut h = Harness::<Logger>::new(r#"{"sample_every": 4, "output": "sampled"}"#).unwrap();
        let verdicts = h.run_payloads(&[CLICK; 8]);
        assert_eq!(h.outputs_json("sampled").len(), 2);
        assert_eq!(verdicts.iter().filter(|v| **v == Verdict::Skip).count(), 6);
    }

    #[test]
    fn malformed_events_are_logged_and_dead_lettered() {
        let mut h = Harness::<Logger>::new("{}").unwrap();
        let verdicts = h.run_payloads(&[&b"{oops"[..]]);
        assert!(
            matches!(&verdicts[0], Verdict::DeadLetter(r) if r.contains("not an activity event"))
        );
        assert!(
            h.outputs_json("log")[0]["error"]
                .as_str()
                .unwrap()
                .contains("line 1")
        );
    }

    #[test]
    fn bad_config_is_rejected_with_the_key() {
        let err = Harness::<Logger>::new(r#"{"sample_evry": 2}"#)
            .err()
            .unwrap();
        assert!(err.contains("sample_evry"), "{err}");
        let err = Harness::<Logger>::new(r#"{"sample_every": 0}"#)
            .err()
            .unwrap();
        assert!(err.contains("sample_every"), "{err}");
    }
}
