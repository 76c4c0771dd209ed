//! Filling a batch: after its first event, take what the consumer already holds without
//! arming a timer per event, and wait for more only up to `batch_linger_ms`; cut the batch
//! at `max_batch` events or `max_batch_bytes`, or when the supervisor sends a swap or a
//! removal (the new version should not wait for a batch of the old one).

use super::control::Control;
use crate::config::PluginConfig;
use crate::event::Event;
use crate::kafka::consumer::{Callbacks, to_event};
use rdkafka::consumer::StreamConsumer;
use std::time::Duration;
use tokio::sync::mpsc;
use tracing::warn;

/// A filled batch, and the control message that cut it, if one did: `Some(None)` means the
/// control channel closed (the plugin was removed).
pub(super) struct Filled {
    pub events: Vec<Event>,
    pub control: Option<Option<Control>>,
}

/// Fills a batch that starts with `first`.
pub(super) async fn fill(
    first: Event,
    consumer: &StreamConsumer<Callbacks>,
    control: &mut mpsc::Receiver<Control>,
    plugin: &PluginConfig,
) -> Filled {
    let mut bytes = first.size();
    let mut events = Vec::with_capacity(plugin.max_batch);
    events.push(first);
    // A batch is copied into the plugin's memory: cut it by size too, so a run of big
    // payloads does not hit the memory cap just by being many.
    let max_bytes = plugin.max_batch_bytes();
    let deadline = tokio::time::Instant::now() + Duration::from_millis(plugin.batch_linger_ms);
    let mut cut_by = None;
    while events.len() < plugin.max_batch && bytes < max_bytes {
        // Take what librdkafka already holds without arming a timer per event; wait (up to
        // the linger deadline) only when it has nothing.
        let next = match ready_now(consumer.recv()) {
            Some(m) => Ok(m),
            None => tokio::select! {
                biased;
                c = control.recv() => {
                    cut_by = Some(c);
                    break;
                }
                next = tokio::time::timeout_at(deadline, consumer.recv()) => next,
            },
        };
        match next {
            Ok(Ok(m)) => {
                let e = to_event(&m);
                bytes += e.size();
                events.push(e);
            }
            Ok(Err(e)) => {
                warn!("consume error: {e}");
                break;
            }
            Err(_) => break,
        }
    }
    Filled {
        events,
        control: cut_by,
    }
}

/// `future`'s output if it is ready at the first poll.
fn ready_now<F: std::future::Future>(future: F) -> Option<F::Output> {
    let mut future = std::pin::pin!(future);
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    match future.as_mut().poll(&mut cx) {
        std::task::Poll::Ready(output) => Some(output),
        std::task::Poll::Pending => None,
    }
}
