//! Filling a batch: after its first events, take what the consumer and the shared fetch
//! already hold without arming a timer per event, and wait for more only up to
//! `batch_linger_ms`; cut the batch at `max_batch` events or `max_batch_bytes`, or when the
//! supervisor sends a swap or a removal (the new version should not wait for a batch of
//! the old one).

use super::control::Control;
use super::source::{Batch, Source};
use crate::config::PluginConfig;
use crate::event::Event;
use std::time::Duration;
use tokio::sync::mpsc;
use tracing::warn;

/// A filled batch, and the control message that cut it, if one did: `Some(None)` means the
/// control channel closed (the plugin was removed).
pub(super) struct Filled {
    pub events: Vec<Event>,
    pub control: Option<Option<Control>>,
}

/// Fills `batch`, which holds its first events.
pub(super) async fn fill(
    mut batch: Batch,
    source: &mut Source,
    control: &mut mpsc::Receiver<Control>,
    plugin: &PluginConfig,
) -> Filled {
    let deadline = tokio::time::Instant::now() + Duration::from_millis(plugin.batch_linger_ms);
    let mut cut_by = None;
    while !batch.is_full() {
        // Take what is there without arming a timer; wait (up to the linger deadline) only
        // when nothing is.
        source.ready(&mut batch);
        if batch.is_full() {
            break;
        }
        tokio::select! {
            biased;
            c = control.recv() => {
                cut_by = Some(c);
                break;
            }
            next = tokio::time::timeout_at(deadline, source.recv(&mut batch)) => match next {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    warn!("consume error: {e}");
                    break;
                }
                Err(_) => break,
            },
        }
    }
    Filled {
        events: batch.events,
        control: cut_by,
    }
}
