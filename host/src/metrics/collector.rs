//! What the HTTP collector (`POST /v1/events`) counts: events by what became of them,
//! requests by status, and request latency.

use super::plugin::LATENCY_BUCKETS;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

/// Why the collector refused an event for good (the client must not send it again), as
/// counted in `eddy_collector_events_rejected_total{reason=…}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RejectReason {
    /// Not JSON (an NDJSON line or a single body that does not parse).
    Json,
    /// JSON, but not an object.
    NotObject,
    /// An object the SDK does not take as an activity event (a field missing or mistyped).
    Schema,
    /// Kafka refused it for good (larger than the topic takes, say).
    Kafka,
    /// Dated further ahead of the host's clock than `[http] max_clock_skew_ms`.
    Future,
}

impl RejectReason {
    pub const ALL: [RejectReason; 5] = [
        RejectReason::Json,
        RejectReason::NotObject,
        RejectReason::Schema,
        RejectReason::Kafka,
        RejectReason::Future,
    ];

    pub fn label(self) -> &'static str {
        match self {
            RejectReason::Json => "json",
            RejectReason::NotObject => "not_object",
            RejectReason::Schema => "schema",
            RejectReason::Kafka => "kafka",
            RejectReason::Future => "future",
        }
    }
}

/// The statuses `POST /v1/events` answers with, as counted in
/// `eddy_collector_requests_total{code=…}`.
pub const STATUSES: [u16; 6] = [200, 400, 401, 408, 413, 503];

/// Everything counted for the collector.
#[derive(Debug, Default)]
pub struct CollectorMetrics {
    /// Events Kafka acknowledged (durable).
    pub accepted: AtomicU64,
    /// Events whose `event_id` Kafka had acknowledged before: answered ok, not written again.
    pub duplicates: AtomicU64,
    pub(crate) rejected: [AtomicU64; RejectReason::ALL.len()],
    /// Events not acknowledged in time (or not sent: the producer's queue was full): the
    /// client was answered 503 and must send them again.
    pub unacknowledged: AtomicU64,
    /// Posts answered 503 before their body was read: the posts in flight held all of
    /// `[http] ingest_memory_mib`.
    pub busy: AtomicU64,
    /// KiB of `[http] ingest_memory_mib` the posts in flight hold now.
    pub memory_held_kib: AtomicU64,
    pub(crate) requests: [AtomicU64; STATUSES.len()],
    pub(crate) latency_buckets: [AtomicU64; LATENCY_BUCKETS.len()],
    pub(crate) latency_count: AtomicU64,
    pub(crate) latency_nanos: AtomicU64,
}

impl CollectorMetrics {
    pub fn reject(&self, reason: RejectReason) {
        self.rejected[reason as usize].fetch_add(1, Relaxed);
    }

    pub fn rejected(&self, reason: RejectReason) -> u64 {
        self.rejected[reason as usize].load(Relaxed)
    }

    /// Counts one request answered with `status` after `took`.
    pub fn request(&self, status: u16, took: Duration) {
        if let Some(i) = STATUSES.iter().position(|s| *s == status) {
            self.requests[i].fetch_add(1, Relaxed);
        }
        super::plugin::observe_latency(
            &self.latency_buckets,
            &self.latency_count,
            &self.latency_nanos,
            took,
        );
    }

    pub fn requests(&self, status: u16) -> u64 {
        STATUSES
            .iter()
            .position(|s| *s == status)
            .map_or(0, |i| self.requests[i].load(Relaxed))
    }
}
