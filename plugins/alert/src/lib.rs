//! alert: configurable rules on actions; every match becomes an alert on the `alerts` output.
//!
//! Replaces the seed systems' `alert.py` ("sends alerts for specific actions, e.g. quiz
//! completed"). A rule matches on any combination of event type, minimum amount, page prefix
//! and country; all the conditions a rule names must hold.

use eddy_sdk::{Activity, Context, Event, EventType, Plugin, Verdict};
use serde::{Deserialize, Serialize};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// The output alerts go to.
    #[serde(default = "default_output")]
    pub output: String,
    pub rules: Vec<Rule>,
}

fn default_output() -> String {
    "alerts".into()
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rule {
    /// Shown in the alert and counted in state as `fired:<name>`.
    pub name: String,
    /// `page_view`, `purchase`, `quiz_submission`, …
    #[serde(default)]
    pub event_type: Option<String>,
    /// The event's amount (price × quantity, or cart value) must be at least this.
    #[serde(default)]
    pub min_amount: Option<f64>,
    #[serde(default)]
    pub page_prefix: Option<String>,
    #[serde(default)]
    pub country: Option<String>,
    #[serde(default = "default_severity")]
    pub severity: String,
}

fn default_severity() -> String {
    "info".into()
}

impl Rule {
    fn matches(&self, a: &Activity) -> bool {
        self.event_type
            .as_deref()
            .is_none_or(|t| EventType::parse(t) == a.event_type)
            && self
                .min_amount
                .is_none_or(|min| a.amount().is_some_and(|x| x >= min))
            && self
                .page_prefix
                .as_deref()
                .is_none_or(|p| a.page_url.as_deref().is_some_and(|u| u.starts_with(p)))
            && self
                .country
                .as_deref()
                .is_none_or(|c| a.country() == Some(c))
    }
}

/// The alert record written for one rule match.
#[derive(Serialize)]
struct Alert<'a> {
    kind: &'static str,
    rule: &'a str,
    severity: &'a str,
    user_id: &'a str,
    event_type: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    amount: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    event_id: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    timestamp: Option<&'a str>,
    partition: i32,
    offset: i64,
}

pub struct Alerter {
    config: Config,
}

impl Plugin for Alerter {
    type Config = Config;

    fn init(config: Config, _ctx: &mut Context) -> Result<Self, String> {
        if config.rules.is_empty() {
            return Err("rules: at least one [[rules]] entry is needed".into());
        }
        for (i, rule) in config.rules.iter().enumerate() {
            if rule.name.is_empty() {
                return Err(format!("rules[{i}].name must not be empty"));
            }
            if config.rules[..i].iter().any(|r| r.name == rule.name) {
                return Err(format!("rules[{i}].name: `{}` is used twice", rule.name));
            }
            if rule.event_type.is_none()
                && rule.min_amount.is_none()
                && rule.page_prefix.is_none()
                && rule.country.is_none()
            {
                return Err(format!(
                    "rules[{i}] (`{}`) has no condition and would fire on every event",
                    rule.name
                ));
            }
        }
        Ok(Alerter { config })
    }

    fn on_event(&mut self, event: &Event, ctx: &mut Context) -> Verdict {
        let a = match event.activity() {
            Ok(a) => a,
            Err(e) => return Verdict::DeadLetter(e.to_string()),
        };
        let mut fired = false;
        for rule in self.config.rules.iter().filter(|r| r.matches(a)) {
            fired = true;
            let alert = Alert {
                kind: "rule",
                rule: &rule.name,
                severity: &rule.severity,
                user_id: &a.user_id,
                event_type: a.event_type.as_str(),
                amount: a.amount(),
                event_id: a.event_id.as_deref(),
                timestamp: a.timestamp.as_deref(),
                partition: event.partition,
                offset: event.offset,
            };
            ctx.emit_json(&self.config.output, Some(a.user_id.as_bytes()), &alert);
            ctx.state.incr(("fired:", &rule.name), 1);
        }
        if fired { Verdict::Ok } else { Verdict::Skip }
    }
}

eddy_sdk::plugin!(Alerter);

#[cfg(test)]
mod tests {
    use super::*;
    use eddy_sdk::testing::Harness;

    const CONFIG: &str = r#"{"rules":[
        {"name":"big-purchase","event_type":"purchase","min_amount":500,"severity":"high"},
        {"name":"quiz-completed","event_type":"quiz_submission"}]}"#;

    #[test]
    fn rules_fire_on_matching_events_only() {
        let mut h = Harness::<Alerter>::new(CONFIG).unwrap();
        let verdicts = h.run_payloads(&[
            &br#"{"user_id":"u1","event_type":"purchase","properties":{"price":999.99}}"#[..],
            br#"{"user_id":"u2","event_type":"purchase","properties":{"price":29.99}}"#,
            br#"{"user_id":"s1","event_type":"quiz_submission","properties":{"score":8}}"#,
            br#"{"user_id":"u3","event_type":"page_view"}"#,
        ]);
        assert_eq!(
            verdicts,
            vec![Verdict::Ok, Verdict::Skip, Verdict::Ok, Verdict::Skip]
        );
        let alerts = h.outputs_json("alerts");
        assert_eq!(alerts.len(), 2);
        assert_eq!(alerts[0]["rule"], "big-purchase");
        assert_eq!(alerts[0]["severity"], "high");
        assert_eq!(alerts[0]["user_id"], "u1");
        assert_eq!(alerts[1]["rule"], "quiz-completed");
        assert_eq!(h.state_json::<i64>("fired:big-purchase"), Some(1));
    }

    #[test]
    fn config_mistakes_are_explained() {
        let err = Harness::<Alerter>::new(r#"{"rules":[]}"#).err().unwrap();
        assert!(err.contains("at least one"), "{err}");
        let err = Harness::<Alerter>::new(r#"{"rules":[{"name":"x"}]}"#)
            .err()
            .unwrap();
        assert!(err.contains("no condition"), "{err}");
        let err = Harness::<Alerter>::new(r#"{"rules":[{"name":"x","event_typ":"purchase"}]}"#)
            .err()
            .unwrap();
        assert!(err.contains("event_typ"), "{err}");
        let err = Harness::<Alerter>::new("{}").err().unwrap();
        assert!(err.contains("rules"), "{err}");
    }
}
