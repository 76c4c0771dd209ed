//! reducer: the second stage of global figures over partitions (issue 28). It reads the
//! absolute *partials* another plugin emits per source (analytics' `partials` output), keeps
//! the latest partial of each source, and emits their sums on the `totals` output.
//!
//! Input, one record per partial (the record's key is not used):
//! `{"source":"user-activities/3","offset":1234,"figures":{"total":100,"revenue_total":12.5}}`
//! where `source` is `<topic>/<partition>`, or `<topic>/*` for figures over a whole topic (one
//! instance that handled every partition), `offset` orders the partials of one source (a later
//! partial has a larger one), and `figures` are JSON numbers. A partial whose offset is not
//! above the one kept for its source is skipped, so a partial delivered twice or late changes
//! nothing, and the sums are exact whichever host emitted which partial. Anything else is
//! dead-lettered with the reason.
//!
//! A `<topic>/*` partial and per-partition partials of the same topic count the same events
//! twice over: of the two kinds, only the one of the topic's partial accepted last is summed,
//! and a warning says so when that changes while the other kind is kept.
//!
//! Output, at the end of each batch that changed a sum:
//! `{"sources":2,"figures":{"revenue_total":20.5,"total":250}}`: how many partials the sums
//! count, and each figure summed over them (an integer while every partial has it as an
//! integer; a sum of decimals is rounded to the most decimals of its terms, so that float
//! noise does not show).
//!
//! State keys: `partial:<source>` (the latest partial of the source, as received),
//! `latest:<topic>` (the source of the topic's partial accepted last: its kind is the one
//! summed), `sum:<figure>` (each sum, a JSON number).

use eddy_sdk::{Context, Event, Level, Plugin, Verdict};
use serde::{Deserialize, Serialize};
use serde_json::{Number, Value};
use std::collections::BTreeMap;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// The output totals go to.
    pub output: String,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            output: "totals".into(),
        }
    }
}

/// One partial, as received and as kept under `partial:<source>`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Partial {
    pub source: String,
    pub offset: i64,
    pub figures: BTreeMap<String, Number>,
}

/// The record on the `totals` output.
#[derive(Debug, PartialEq, Serialize, Deserialize)]
pub struct Totals {
    /// How many partials the sums count.
    pub sources: usize,
    pub figures: BTreeMap<String, Number>,
}

/// A source's topic and whether it stands for the whole topic (`<topic>/*`).
fn parse_source(source: &str) -> Result<(&str, bool), String> {
    let Some((topic, partition)) = source.rsplit_once('/') else {
        return Err(format!(
            "`source` `{source}` is not `<topic>/<partition>` nor `<topic>/*`"
        ));
    };
    let topic_ok = !topic.is_empty()
        && topic.len() <= 249
        && topic
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if !topic_ok {
        return Err(format!(
            "`source` `{source}`: `{topic}` is not a Kafka topic name"
        ));
    }
    if partition == "*" {
        return Ok((topic, true));
    }
    match partition.parse::<i32>() {
        Ok(p) if p >= 0 && partition.bytes().all(|b| b.is_ascii_digit()) => Ok((topic, false)),
        _ => Err(format!(
            "`source` `{source}`: `{partition}` is not a partition number nor `*`"
        )),
    }
}

/// The partial in `payload`, or why it is not one.
pub fn parse_partial(payload: &[u8]) -> Result<Partial, String> {
    let value: Value = serde_json::from_slice(payload).map_err(|e| format!("not JSON: {e}"))?;
    let Value::Object(mut record) = value else {
        return Err(r#"not a JSON object {"source", "offset", "figures"}"#.into());
    };
    let source = match record.remove("source") {
        Some(Value::String(s)) => s,
        Some(_) => return Err("`source` is not a string".into()),
        None => return Err("no `source`".into()),
    };
    parse_source(&source)?;
    let offset = match record.get("offset") {
        Some(v) => v
            .as_i64()
            .filter(|o| *o >= 0)
            .ok_or_else(|| format!("`offset` {v} is not a whole number ≥ 0"))?,
        None => return Err("no `offset`".into()),
    };
    let figures = match record.remove("figures") {
        Some(Value::Object(figures)) => figures,
        Some(_) => return Err("`figures` is not an object".into()),
        None => return Err("no `figures`".into()),
    };
    let figures = figures
        .into_iter()
        .map(|(name, v)| match v {
            Value::Number(n) if !name.is_empty() => Ok((name, n)),
            Value::Number(_) => Err("a figure with an empty name".to_string()),
            other => Err(format!("figure `{name}` is {other}, not a number")),
        })
        .collect::<Result<_, _>>()?;
    Ok(Partial {
        source,
        offset,
        figures,
    })
}

/// One figure summed over partials.
#[derive(Default)]
struct Sum {
    /// The exact sum while every term is an integer.
    int: Option<i128>,
    float: f64,
    /// Whether a term was not an integer (then the sum is `float`).
    any_float: bool,
    /// The most decimals of a term, to round `float` to.
    decimals: usize,
}

impl Sum {
    fn add(&mut self, n: &Number) {
        match n.as_i64() {
            Some(i) => {
                self.int = Some(self.int.unwrap_or(0) + i128::from(i));
                self.float += i as f64;
            }
            None => {
                let x = n.as_f64().unwrap_or(0.0);
                self.any_float = true;
                self.float += x;
                self.decimals = self.decimals.max(decimals(x));
            }
        }
    }

    fn value(&self) -> Option<Number> {
        if !self.any_float
            && let Some(i) = self.int.and_then(|i| i64::try_from(i).ok())
        {
            return Some(i.into());
        }
        let x = if self.decimals <= 12 {
            let scale = 10f64.powi(self.decimals as i32);
            let scaled = (self.float * scale).round();
            // Rounding only helps while the scaled sum is exact in an f64.
            if scaled.abs() < 9e15 {
                scaled / scale
            } else {
                self.float
            }
        } else {
            self.float
        };
        Number::from_f64(x)
    }
}

/// Decimals of `x` as written shortest (`12.5`: 1).
fn decimals(x: f64) -> usize {
    let text = x.to_string();
    text.split_once('.').map_or(0, |(_, d)| d.len())
}

pub struct Reducer {
    config: Config,
    /// Whether the current batch accepted a partial.
    changed: bool,
    /// Per topic of a partial accepted in the current batch: whether the kind summed
    /// changed (per partition ↔ whole topic) in this batch.
    switched: BTreeMap<String, bool>,
}

impl Plugin for Reducer {
    type Config = Config;

    fn init(config: Config, _ctx: &mut Context) -> Result<Self, String> {
        if config.output.is_empty() {
            return Err("output must name an output".into());
        }
        Ok(Reducer {
            config,
            changed: false,
            switched: BTreeMap::new(),
        })
    }

    fn on_event(&mut self, event: &Event, ctx: &mut Context) -> Verdict {
        let partial = match parse_partial(event.payload) {
            Ok(p) => p,
            Err(why) => return Verdict::DeadLetter(format!("not a partial: {why}")),
        };
        let s = &mut ctx.state;
        let key = ("partial:", partial.source.as_str());
        if let Some(kept) = s.get_json::<Partial>(key)
            && kept.offset >= partial.offset
        {
            // Delivered again, or overtaken by a later one: the kept one already says more.
            return Verdict::Skip;
        }
        s.set_json(key, &partial);
        let (topic, whole) = parse_source(&partial.source).expect("checked by parse_partial");
        let latest: Option<String> = s.get_json(("latest:", topic));
        let switched = latest
            .as_deref()
            .and_then(|l| parse_source(l).ok())
            .is_some_and(|(_, was_whole)| was_whole != whole);
        s.set_json(("latest:", topic), &partial.source);
        *self.switched.entry(topic.to_string()).or_default() |= switched;
        self.changed = true;
        Verdict::Ok
    }

    fn on_batch_end(&mut self, ctx: &mut Context) {
        let switched = std::mem::take(&mut self.switched);
        if !std::mem::take(&mut self.changed) {
            return;
        }
        let s = &mut ctx.state;
        let partials: Vec<Partial> = s
            .scan_prefix("partial:", u32::MAX)
            .into_iter()
            .filter_map(|(_, v)| serde_json::from_slice(&v).ok())
            .collect();
        // Per topic, whether its whole-topic partial is the kind summed.
        let mut whole_summed: BTreeMap<&str, bool> = BTreeMap::new();
        let mut sums: BTreeMap<&str, Sum> = BTreeMap::new();
        let mut sources = 0;
        let mut ignored: BTreeMap<&str, usize> = BTreeMap::new();
        for p in &partials {
            let Ok((topic, whole)) = parse_source(&p.source) else {
                continue;
            };
            let summed = *whole_summed.entry(topic).or_insert_with(|| {
                s.get_json::<String>(("latest:", topic))
                    .and_then(|l| parse_source(&l).ok().map(|(_, w)| w))
                    .unwrap_or(whole)
            });
            if summed != whole {
                *ignored.entry(topic).or_default() += 1;
                continue;
            }
            sources += 1;
            for (name, n) in &p.figures {
                sums.entry(name).or_default().add(n);
            }
        }
        for (topic, _) in switched.iter().filter(|(_, s)| **s) {
            if let Some(n) = ignored.get(topic.as_str()) {
                let (used, other) = if whole_summed.get(topic.as_str()) == Some(&true) {
                    (format!("`{topic}/*` (the whole topic)"), "per-partition")
                } else {
                    ("its per-partition partials".to_string(), "whole-topic")
                };
                ctx.log(
                    Level::Warn,
                    &format!(
                        "topic `{topic}` has partials of both kinds, which count the same \
                         events twice: summing {used}, updated last, and ignoring {n} \
                         {other} partial(s) (left from before a change of deployment?)"
                    ),
                );
            }
        }
        let figures: BTreeMap<String, Number> = sums
            .into_iter()
            .filter_map(|(name, sum)| Some((name.to_string(), sum.value()?)))
            .collect();
        let s = &mut ctx.state;
        let mut old: BTreeMap<String, Vec<u8>> =
            s.scan_prefix("sum:", u32::MAX).into_iter().collect();
        let mut changed = false;
        for (name, n) in &figures {
            let key = format!("sum:{name}");
            let bytes = serde_json::to_vec(n).expect("a number serializes");
            if old.remove(&key).as_ref() != Some(&bytes) {
                s.set(key.as_str(), bytes);
                changed = true;
            }
        }
        for key in old.into_keys() {
            s.delete(key.as_str());
            changed = true;
        }
        if changed {
            ctx.emit_json(&self.config.output, None, &Totals { sources, figures });
        }
    }
}

eddy_sdk::plugin!(Reducer);

#[cfg(test)]
mod tests {
    use super::*;
    use eddy_sdk::testing::Harness;
    use serde_json::json;

    fn partial(source: &str, offset: i64, figures: Value) -> Vec<u8> {
        serde_json::to_vec(&json!({"source": source, "offset": offset, "figures": figures}))
            .unwrap()
    }

    fn last_totals(h: &Harness<Reducer>) -> Value {
        h.outputs_json("totals").pop().expect("a totals record")
    }

    #[test]
    fn sums_the_latest_partial_of_each_source_exactly() {
        let mut h = Harness::<Reducer>::new("{}").unwrap();
        let v = h.run_payloads(&[
            partial(
                "user-activities/0",
                10,
                json!({"total": 10, "type:click": 4, "revenue_total": 0.1}),
            ),
            partial(
                "user-activities/1",
                7,
                json!({"total": 7, "type:click": 1, "revenue_total": 0.2}),
            ),
        ]);
        assert_eq!(v, [Verdict::Ok, Verdict::Ok]);
        assert_eq!(h.outputs_json("totals").len(), 1, "one record per batch");
        assert_eq!(
            last_totals(&h),
            json!({"sources": 2, "figures": {"total": 17, "type:click": 5, "revenue_total": 0.3}})
        );
        assert_eq!(h.state_json::<i64>("sum:total"), Some(17));
        assert_eq!(h.state_json::<f64>("sum:revenue_total"), Some(0.3));

        // An old partial of source 0 delivered again, and a late one: nothing changes.
        let old = partial(
            "user-activities/0",
            10,
            json!({"total": 10, "type:click": 4, "revenue_total": 0.1}),
        );
        let older = partial("user-activities/0", 3, json!({"total": 3}));
        let v = h.run_payloads(&[old, older]);
        assert_eq!(v, [Verdict::Skip, Verdict::Skip]);
        assert_eq!(h.outputs_json("totals").len(), 1, "no sum changed");

        // A newer one replaces it (a figure it lacks is no longer summed from it), across a
        // restart of the instance.
        h.restart("{}").unwrap();
        let v = h.run_payloads(&[partial(
            "user-activities/0",
            25,
            json!({"total": 25, "type:click": 9, "type:purchase": 2, "revenue_total": 1.25}),
        )]);
        assert_eq!(v, [Verdict::Ok]);
        assert_eq!(
            last_totals(&h),
            json!({"sources": 2, "figures": {
                "total": 32, "type:click": 10, "type:purchase": 2, "revenue_total": 1.45
            }})
        );
        let kept: Partial = h.state_json("partial:user-activities/0").unwrap();
        assert_eq!(kept.offset, 25);

        // A figure that no partial has any more is dropped from the sums.
        h.run_payloads(&[partial("user-activities/0", 26, json!({"total": 26}))]);
        assert_eq!(
            last_totals(&h),
            json!({"sources": 2, "figures": {"total": 33, "type:click": 1, "revenue_total": 0.2}})
        );
        assert_eq!(h.state_json::<i64>("sum:type:purchase"), None);
    }

    #[test]
    fn reordered_and_redelivered_partials_give_the_same_sums() {
        let stream: Vec<Vec<u8>> = (1..=30)
            .map(|i| {
                let source = format!("t/{}", i % 3);
                partial(
                    &source,
                    i,
                    json!({"total": i, "revenue_total": i as f64 / 10.0}),
                )
            })
            .collect();
        let mut straight = Harness::<Reducer>::new("{}").unwrap();
        straight.run_payloads(&stream);
        let mut shuffled = Harness::<Reducer>::new("{}").unwrap();
        let mut again: Vec<Vec<u8>> = stream.iter().rev().cloned().collect();
        again.extend(stream.iter().step_by(4).cloned());
        for chunk in again.chunks(7) {
            shuffled.run_payloads(chunk);
        }
        // The latest of t/0, t/1, t/2 are offsets 30, 28, 29.
        let expected = json!({"sources": 3, "figures": {"total": 87, "revenue_total": 8.7}});
        assert_eq!(last_totals(&straight), expected);
        assert_eq!(last_totals(&shuffled), expected);
    }

    #[test]
    fn whole_topic_and_per_partition_partials_are_not_summed_together() {
        let mut h = Harness::<Reducer>::new(r#"{"output": "sums"}"#).unwrap();
        h.run_payloads(&[partial("t/*", 100, json!({"total": 100}))]);
        assert_eq!(
            h.outputs_json("sums").pop().unwrap(),
            json!({"sources": 1, "figures": {"total": 100}})
        );
        assert!(h.recorded().logs.is_empty());
        // Scaled out: per-partition partials come now; the whole-topic one is left.
        h.run_payloads(&[
            partial("t/0", 5, json!({"total": 5})),
            partial("t/1", 6, json!({"total": 6})),
        ]);
        assert_eq!(
            h.outputs_json("sums").pop().unwrap(),
            json!({"sources": 2, "figures": {"total": 11}})
        );
        {
            let r = h.recorded();
            assert_eq!(r.logs.len(), 1, "{:?}", r.logs);
            assert_eq!(r.logs[0].0, Level::Warn);
            assert!(
                r.logs[0].1.contains("ignoring 1 whole-topic"),
                "{}",
                r.logs[0].1
            );
        }
        // No new warning while the kind summed stays.
        h.run_payloads(&[partial("t/0", 8, json!({"total": 8}))]);
        assert_eq!(h.recorded().logs.len(), 1);
        assert_eq!(
            h.outputs_json("sums").pop().unwrap(),
            json!({"sources": 2, "figures": {"total": 14}})
        );
        // Another topic's partials are summed beside them.
        h.run_payloads(&[partial("u/*", 1, json!({"total": 1}))]);
        assert_eq!(
            h.outputs_json("sums").pop().unwrap(),
            json!({"sources": 3, "figures": {"total": 15}})
        );
    }

    #[test]
    fn what_is_not_a_partial_is_dead_lettered_with_the_reason() {
        let mut h = Harness::<Reducer>::new("{}").unwrap();
        let cases: [(&[u8], &str); 11] = [
            (b"nope", "not JSON"),
            (b"[1]", "not a JSON object"),
            (br#"{"offset":1,"figures":{}}"#, "no `source`"),
            (
                br#"{"source":3,"offset":1,"figures":{}}"#,
                "`source` is not a string",
            ),
            (
                br#"{"source":"t","offset":1,"figures":{}}"#,
                "is not `<topic>/<partition>`",
            ),
            (
                br#"{"source":"t/x","offset":1,"figures":{}}"#,
                "not a partition number",
            ),
            (
                br#"{"source":"a b/1","offset":1,"figures":{}}"#,
                "not a Kafka topic name",
            ),
            (br#"{"source":"t/1","figures":{}}"#, "no `offset`"),
            (
                br#"{"source":"t/1","offset":-1,"figures":{}}"#,
                "not a whole number",
            ),
            (
                br#"{"source":"t/1","offset":1,"figures":[]}"#,
                "`figures` is not an object",
            ),
            (
                br#"{"source":"t/1","offset":1,"figures":{"x":"1"}}"#,
                "figure `x` is \"1\"",
            ),
        ];
        for (payload, reason) in cases {
            let v = h.run_payloads(&[payload]);
            match &v[0] {
                Verdict::DeadLetter(why) => {
                    assert!(why.starts_with("not a partial: "), "{why}");
                    assert!(why.contains(reason), "{why} (expected: {reason})");
                }
                other => panic!("{other:?} for {}", String::from_utf8_lossy(payload)),
            }
        }
        assert!(h.outputs_json("totals").is_empty());
        assert!(h.recorded().state.keys().all(|k| k.starts_with("__eddy.")));
    }

    #[test]
    fn integers_stay_integers_and_huge_sums_do_not_overflow() {
        let mut h = Harness::<Reducer>::new("{}").unwrap();
        h.run_payloads(&[
            partial("t/0", 1, json!({"n": i64::MAX, "x": 1.0, "m": 2})),
            partial("t/1", 1, json!({"n": 1, "x": 2, "m": 0.5})),
        ]);
        let totals = last_totals(&h);
        assert_eq!(totals["figures"]["n"], json!(i64::MAX as f64 + 1.0));
        assert_eq!(totals["figures"]["x"], json!(3.0));
        assert!(
            totals["figures"]["x"].is_f64(),
            "a decimal term: a decimal sum"
        );
        assert_eq!(totals["figures"]["m"], json!(2.5));
    }

    #[test]
    fn the_output_must_be_named() {
        assert!(Harness::<Reducer>::new(r#"{"output": ""}"#).is_err());
        assert!(Harness::<Reducer>::new(r#"{"outputs": "x"}"#).is_err());
    }
}
