//! `/metrics`: everything [`Metrics`] counts, in the Prometheus text format (0.0.4), which
//! `promtool check metrics` accepts. The `prometheus` crate writes the format (escaping label
//! values, ordering histogram buckets); this module only reads the atomics at scrape time,
//! so a removed plugin's series are simply not there.

use super::{DeadLetterReason, Metrics, Outcome, PluginMetrics, ReloadOutcome, TrapKind};
use prometheus::proto::{
    Bucket, Counter, Gauge, Histogram, LabelPair, Metric, MetricFamily, MetricType, Summary,
};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

/// The `Content-Type` of [`render`]'s text.
pub const CONTENT_TYPE: &str = prometheus::TEXT_FORMAT;

/// The text exposition of everything.
pub fn render(metrics: &Metrics) -> String {
    let families = families(metrics);
    let mut out = String::new();
    if let Err(e) = prometheus::TextEncoder::new().encode_utf8(&families, &mut out) {
        // Only an invalid family can fail, and every one is built here.
        tracing::error!("cannot render /metrics: {e}");
    }
    out
}

fn label(name: &str, value: &str) -> LabelPair {
    let mut l = LabelPair::default();
    l.set_name(name.to_string());
    l.set_value(value.to_string());
    l
}

fn labelled(labels: &[(&str, &str)]) -> Metric {
    let mut m = Metric::default();
    m.set_label(labels.iter().map(|(k, v)| label(k, v)).collect());
    m
}

fn counter(labels: &[(&str, &str)], value: u64) -> Metric {
    let mut m = labelled(labels);
    let mut c = Counter::default();
    c.set_value(value as f64);
    m.set_counter(c);
    m
}

fn gauge(labels: &[(&str, &str)], value: f64) -> Metric {
    let mut m = labelled(labels);
    let mut g = Gauge::default();
    g.set_value(value);
    m.set_gauge(g);
    m
}

fn family(name: &str, help: &str, kind: MetricType, metrics: Vec<Metric>) -> MetricFamily {
    let mut f = MetricFamily::default();
    f.set_name(name.to_string());
    f.set_help(help.to_string());
    f.set_field_type(kind);
    f.set_metric(metrics);
    f
}

type Plugins = [(String, Arc<PluginMetrics>)];

/// One counter sample per plugin.
fn per_plugin_counter(
    plugins: &Plugins,
    name: &str,
    help: &str,
    value: impl Fn(&PluginMetrics) -> &AtomicU64,
) -> MetricFamily {
    let metrics = plugins
        .iter()
        .map(|(p, m)| counter(&[("plugin", p)], value(m).load(Relaxed)))
        .collect();
    family(name, help, MetricType::COUNTER, metrics)
}

/// One gauge sample per plugin.
fn per_plugin_gauge(
    plugins: &Plugins,
    name: &str,
    help: &str,
    value: impl Fn(&PluginMetrics) -> f64,
) -> MetricFamily {
    let metrics = plugins
        .iter()
        .map(|(p, m)| gauge(&[("plugin", p)], value(m)))
        .collect();
    family(name, help, MetricType::GAUGE, metrics)
}

fn families(metrics: &Metrics) -> Vec<MetricFamily> {
    let plugins = metrics.plugins();
    let plugins = plugins.as_slice();
    let mut out = Vec::new();

    let events = plugins
        .iter()
        .flat_map(|(p, m)| {
            Outcome::ALL
                .iter()
                .map(move |o| counter(&[("plugin", p), ("verdict", o.label())], m.events(*o)))
        })
        .collect();
    out.push(family(
        "eddy_events_total",
        "Events handled, per plugin and final verdict.",
        MetricType::COUNTER,
        events,
    ));
    let traps = plugins
        .iter()
        .flat_map(|(p, m)| {
            TrapKind::ALL
                .iter()
                .map(move |k| counter(&[("plugin", p), ("kind", k.label())], m.traps(*k)))
        })
        .collect();
    out.push(family(
        "eddy_traps_total",
        "Calls into a plugin that failed, per cause.",
        MetricType::COUNTER,
        traps,
    ));
    let dead_letters = plugins
        .iter()
        .flat_map(|(p, m)| {
            DeadLetterReason::ALL
                .iter()
                .map(move |r| counter(&[("plugin", p), ("reason", r.label())], m.dead_letters(*r)))
        })
        .collect();
    out.push(family(
        "eddy_dead_letters_total",
        "Events written to a plugin's dead-letter topic, per reason.",
        MetricType::COUNTER,
        dead_letters,
    ));
    out.push(per_plugin_gauge(
        plugins,
        "eddy_breaker_state",
        "A plugin's breaker: 0 closed, 1 open (paused after repeated failures), 2 half-open.",
        |m| m.breaker_state.load(Relaxed) as f64,
    ));
    out.push(per_plugin_gauge(
        plugins,
        "eddy_delivery_failing",
        "1 while a plugin's outputs or dead letters cannot be delivered (retried, offsets held back), else 0.",
        |m| m.delivery_failing.load(Relaxed) as f64,
    ));
    out.push(per_plugin_counter(
        plugins,
        "eddy_breaker_trips_total",
        "Times a plugin's breaker opened.",
        |m| &m.breaker_trips,
    ));
    out.push(per_plugin_counter(
        plugins,
        "eddy_retries_total",
        "Retry verdicts received (each attempt).",
        |m| &m.retries,
    ));
    out.push(per_plugin_counter(
        plugins,
        "eddy_instance_restarts_total",
        "Plugin instances recreated after a failure.",
        |m| &m.instance_restarts,
    ));
    out.push(per_plugin_counter(
        plugins,
        "eddy_output_records_total",
        "Records plugins emitted and the host delivered.",
        |m| &m.output_records,
    ));
    out.push(per_plugin_counter(
        plugins,
        "eddy_output_failures_total",
        "Failed deliveries of outputs or dead letters, and failed state commits (all retried).",
        |m| &m.output_failures,
    ));
    out.push(per_plugin_counter(
        plugins,
        "eddy_outputs_undeliverable_total",
        "Output records their destination refused for good, written to the dead-letter topic instead.",
        |m| &m.outputs_undeliverable,
    ));
    out.push(per_plugin_counter(
        plugins,
        "eddy_dead_letters_without_payload_total",
        "Dead letters too large (or otherwise refused whole for good), written without payload.",
        |m| &m.dead_letters_without_payload,
    ));
    out.push(per_plugin_counter(
        plugins,
        "eddy_dead_letters_lost_total",
        "Dead letters refused for good even without payload: logged, not written.",
        |m| &m.dead_letters_lost,
    ));
    out.push(per_plugin_counter(
        plugins,
        "eddy_plugin_log_lines_dropped_total",
        "Plugin log lines dropped by limits.log_lines_per_s.",
        |m| &m.log_lines_dropped,
    ));
    out.push(per_plugin_gauge(
        plugins,
        "eddy_plugin_state_keys",
        "Keys in a plugin's committed state.",
        |m| m.state_keys.load(Relaxed) as f64,
    ));
    out.push(per_plugin_gauge(
        plugins,
        "eddy_plugin_state_bytes",
        "Size of a plugin's committed state (keys + values), what limits.state_mib caps.",
        |m| m.state_bytes.load(Relaxed) as f64,
    ));
    out.push(per_plugin_gauge(
        plugins,
        "eddy_plugin_state_limit_bytes",
        "limits.state_mib, in bytes.",
        |m| m.state_limit_bytes.load(Relaxed) as f64,
    ));
    out.push(per_plugin_gauge(
        plugins,
        "eddy_plugin_state_expiring_keys",
        "Keys of a plugin's state that carry an expiry ([plugin.expire]).",
        |m| m.state_expiring_keys.load(Relaxed) as f64,
    ));
    out.push(per_plugin_counter(
        plugins,
        "eddy_plugin_state_keys_expired_total",
        "State keys deleted because their [plugin.expire] time had passed.",
        |m| &m.state_keys_expired,
    ));
    out.push(per_plugin_counter(
        plugins,
        "eddy_ticks_total",
        "on-tick calls.",
        |m| &m.ticks,
    ));
    out.push(per_plugin_gauge(
        plugins,
        "eddy_consumer_lag",
        "Events not yet handled, summed over partitions (-1: unknown).",
        |m| m.consumer_lag.load(Relaxed) as f64,
    ));
    out.push(per_plugin_gauge(
        plugins,
        "eddy_shared_fetch_partitions",
        "Partitions the plugin reads from the topic's shared fetch; it fetches the others itself.",
        |m| m.shared_partitions.load(Relaxed) as f64,
    ));
    out.push(per_plugin_gauge(
        plugins,
        "eddy_assigned_partitions",
        "Partitions of the topic the plugin's consumer group gave it (0 while the group rebalances).",
        |m| m.assigned_partitions.load(Relaxed) as f64,
    ));
    out.push(per_plugin_counter(
        plugins,
        "eddy_state_restore_records_total",
        "Changelog records replayed into partitions' state (partition-scoped state, [state] shared_group).",
        |m| &m.state_restore_records,
    ));
    out.push(per_plugin_gauge(
        plugins,
        "eddy_state_restoring_partitions",
        "Partitions whose state is being restored from the changelog now; their events wait.",
        |m| m.restoring_now().len() as f64,
    ));
    out.push(per_plugin_gauge(
        plugins,
        "eddy_state_partitions",
        "Partitions with their own instance and state file on this host (partition-scoped state).",
        |m| m.state_lanes.load(Relaxed) as f64,
    ));
    out.push(per_plugin_gauge(
        plugins,
        "eddy_plugin_up",
        "1 while the plugin is loaded and consuming.",
        |m| m.up.load(Relaxed) as f64,
    ));
    out.push(per_plugin_gauge(
        plugins,
        "eddy_kafka_connected",
        "1 while the plugin's consumer is connected to a Kafka broker, 0 while no broker is reachable (-1: not known yet).",
        |m| match m.kafka.load(Relaxed) {
            1 => 1.0,
            2 => 0.0,
            _ => -1.0,
        },
    ));

    let batches = plugins
        .iter()
        .map(|(p, m)| {
            latency_histogram(
                &[("plugin", p)],
                &m.batch_buckets,
                &m.batch_count,
                &m.batch_nanos,
            )
        })
        .collect();
    out.push(family(
        "eddy_batch_duration_seconds",
        "Time to run one batch through a plugin.",
        MetricType::HISTOGRAM,
        batches,
    ));
    let commits = plugins
        .iter()
        .map(|(p, m)| {
            let mut s = Summary::default();
            s.set_sample_count(m.commit_count.load(Relaxed));
            s.set_sample_sum(m.commit_nanos.load(Relaxed) as f64 / 1e9);
            let mut metric = labelled(&[("plugin", p)]);
            metric.set_summary(s);
            metric
        })
        .collect();
    out.push(family(
        "eddy_state_commit_seconds",
        "Time to commit a batch's state and offsets.",
        MetricType::SUMMARY,
        commits,
    ));

    let info = plugins
        .iter()
        .map(|(p, m)| {
            let v = m.version();
            let code = if v.baseline {
                "baseline"
            } else if v.precompiled {
                "precompiled"
            } else {
                "compiled"
            };
            gauge(
                &[
                    ("plugin", p),
                    ("digest", &v.digest),
                    ("path", &v.path),
                    ("code", code),
                ],
                1.0,
            )
        })
        .collect();
    out.push(family(
        "eddy_plugin_info",
        "The running version of each plugin (content digest of its .wasm; code compiled at load, precompiled, or baseline code until the optimized compile is done).",
        MetricType::GAUGE,
        info,
    ));
    out.push(per_plugin_gauge(
        plugins,
        "eddy_plugin_loaded_timestamp_seconds",
        "When the running version started running.",
        |m| m.version().loaded_at,
    ));
    out.push(per_plugin_gauge(
        plugins,
        "eddy_plugin_compile_seconds",
        "How long compiling the running version took.",
        |m| m.version().compile_seconds,
    ));
    let reloads = plugins
        .iter()
        .flat_map(|(p, m)| {
            ReloadOutcome::ALL
                .iter()
                .map(move |o| counter(&[("plugin", p), ("outcome", o.label())], m.reloads(*o)))
        })
        .collect();
    out.push(family(
        "eddy_plugin_reloads_total",
        "Hot reloads of a plugin, per outcome.",
        MetricType::COUNTER,
        reloads,
    ));

    out.push(family(
        "eddy_config_reloads_total",
        "Re-reads of plugins.toml: applied, or refused as invalid.",
        MetricType::COUNTER,
        vec![
            counter(
                &[("outcome", "ok")],
                metrics.config_reloads_ok.load(Relaxed),
            ),
            counter(
                &[("outcome", "error")],
                metrics.config_reloads_failed.load(Relaxed),
            ),
        ],
    ));
    out.push(family(
        "eddy_generated_events_total",
        "Events the in-process generator produced.",
        MetricType::COUNTER,
        vec![counter(&[], metrics.generated.load(Relaxed))],
    ));
    out.push(family(
        "eddy_stream_clients",
        "Clients of the live stream (/v1/stream, /v1/ws) now.",
        MetricType::GAUGE,
        vec![gauge(&[], metrics.stream_clients.load(Relaxed) as f64)],
    ));
    out.push(family(
        "eddy_stream_records_total",
        "Committed output records handed to the live stream (once each, however many clients watch).",
        MetricType::COUNTER,
        vec![counter(&[], metrics.stream_records.load(Relaxed))],
    ));
    out.push(family(
        "eddy_stream_records_missed_total",
        "Records live-stream clients missed by falling more than [http] stream_buffer behind, summed over clients (each was told, and went on).",
        MetricType::COUNTER,
        vec![counter(&[], metrics.stream_missed.load(Relaxed))],
    ));
    out.push(family(
        "eddy_http_send_timeouts_total",
        "Connections closed because the peer took nothing for [http] send_timeout_ms.",
        MetricType::COUNTER,
        vec![counter(&[], metrics.http_send_timeouts.load(Relaxed))],
    ));
    out.push(family(
        "eddy_http_connections_evicted_total",
        "Connections that had sent no whole request, closed to make room for a new one (http.max_connections).",
        MetricType::COUNTER,
        vec![counter(&[], metrics.http_evicted.load(Relaxed))],
    ));
    out.extend(collector_families(&metrics.collector));
    // A family with no samples (no plugins yet) is not written at all.
    out.retain(|f| !f.get_metric().is_empty());
    out
}

/// A [`LATENCY_BUCKETS`](super::plugin::LATENCY_BUCKETS) histogram sample.
fn latency_histogram(
    labels: &[(&str, &str)],
    counts: &[AtomicU64],
    count: &AtomicU64,
    nanos: &AtomicU64,
) -> Metric {
    let mut cumulative = 0;
    let buckets = super::plugin::LATENCY_BUCKETS
        .iter()
        .zip(counts)
        .map(|(bound, n)| {
            cumulative += n.load(Relaxed);
            let mut b = Bucket::default();
            b.set_upper_bound(*bound);
            b.set_cumulative_count(cumulative);
            b
        })
        .collect();
    let mut h = Histogram::default();
    h.set_bucket(buckets);
    h.set_sample_count(count.load(Relaxed));
    h.set_sample_sum(nanos.load(Relaxed) as f64 / 1e9);
    let mut metric = labelled(labels);
    metric.set_histogram(h);
    metric
}

/// The HTTP collector's families (`POST /v1/events`).
fn collector_families(c: &super::CollectorMetrics) -> Vec<MetricFamily> {
    use super::collector::{RejectReason, STATUSES};
    let rejected = RejectReason::ALL
        .iter()
        .map(|r| counter(&[("reason", r.label())], c.rejected(*r)))
        .collect();
    let requests = STATUSES
        .iter()
        .map(|s| counter(&[("code", &s.to_string())], c.requests(*s)))
        .collect();
    vec![
        family(
            "eddy_collector_events_accepted_total",
            "Events POST /v1/events produced to the topic and Kafka acknowledged.",
            MetricType::COUNTER,
            vec![counter(&[], c.accepted.load(Relaxed))],
        ),
        family(
            "eddy_collector_events_duplicate_total",
            "Events POST /v1/events answered ok without writing them: their event_id was acknowledged before.",
            MetricType::COUNTER,
            vec![counter(&[], c.duplicates.load(Relaxed))],
        ),
        family(
            "eddy_collector_events_rejected_total",
            "Events POST /v1/events refused for good, per reason (json, not_object, schema, kafka).",
            MetricType::COUNTER,
            rejected,
        ),
        family(
            "eddy_collector_events_unacknowledged_total",
            "Events Kafka did not acknowledge within http.ingest_timeout_ms (answered 503: the client sends them again).",
            MetricType::COUNTER,
            vec![counter(&[], c.unacknowledged.load(Relaxed))],
        ),
        family(
            "eddy_collector_busy_total",
            "Posts answered 503 unread because the posts in flight held all of http.ingest_memory_mib.",
            MetricType::COUNTER,
            vec![counter(&[], c.busy.load(Relaxed))],
        ),
        family(
            "eddy_collector_memory_held_bytes",
            "Memory the posts in flight hold of http.ingest_memory_mib (4 bytes per body byte, 1 KiB per event).",
            MetricType::GAUGE,
            vec![gauge(&[], (c.memory_held_kib.load(Relaxed) * 1024) as f64)],
        ),
        family(
            "eddy_collector_requests_total",
            "Requests to POST /v1/events, per status code.",
            MetricType::COUNTER,
            requests,
        ),
        family(
            "eddy_collector_request_duration_seconds",
            "Time to answer POST /v1/events (reading, checking, producing, waiting for Kafka's acknowledgement).",
            MetricType::HISTOGRAM,
            vec![latency_histogram(
                &[],
                &c.latency_buckets,
                &c.latency_count,
                &c.latency_nanos,
            )],
        ),
    ]
}
