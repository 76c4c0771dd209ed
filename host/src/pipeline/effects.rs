//! A batch's effects leaving the host: its outputs and dead letters delivered, then its state
//! committed with the offsets it advanced. Each is retried on the host's backoff policy until
//! it goes through, or until the host shuts down (the batch is then dropped, and its events
//! are consumed again at the next start). Offsets are held back meanwhile, so nothing is
//! skipped.

use super::worker::Worker;
use crate::event::Event;
use crate::kafka::Offsets;
use crate::retry::{Policy, sleep_unless_stopping};
use crate::sinks::DeadLetter;
use crate::wasm::OutputRecord;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Instant;
use tracing::error;

impl Worker {
    /// Delivers outputs and dead letters. False if the host is stopping before they are
    /// through.
    pub(super) async fn deliver(
        &mut self,
        outputs: &[OutputRecord],
        events: &[Event],
        letters: &[DeadLetter],
        version: &str,
    ) -> bool {
        let mut backoff = Policy::DELIVERY.backoff();
        // Once the outputs are through, a retry only re-sends the dead letters.
        let mut outputs_delivered = outputs.is_empty();
        loop {
            let result: anyhow::Result<()> = async {
                if !outputs_delivered {
                    self.outputs.deliver(outputs).await?;
                    outputs_delivered = true;
                }
                self.outputs.dead_letter(events, letters, version).await?;
                Ok(())
            }
            .await;
            match result {
                Ok(()) => return true,
                Err(e) => {
                    self.metrics.output_failures.fetch_add(1, Relaxed);
                    let delay = backoff.next_delay();
                    error!(
                        "delivery failed, retrying in {delay:?} (offsets are held back meanwhile): {e:#}"
                    );
                    if sleep_unless_stopping(delay, &mut self.shutdown)
                        .await
                        .is_err()
                    {
                        return false;
                    }
                }
            }
        }
    }

    /// Commits the batch's state with `offsets` (one transaction when state is durable).
    /// False if the host is stopping before it went through: the batch is then dropped.
    pub(super) async fn commit(&mut self, offsets: &Offsets) -> bool {
        let mut backoff = Policy::DELIVERY.backoff();
        loop {
            let started = Instant::now();
            // On the blocking pool: a durable commit waits for the disk (fsync).
            let batch_offsets = offsets.clone();
            let (_, result) = self
                .in_sandbox(Vec::new(), move |sandbox, _, _, _| {
                    sandbox.commit_batch(&batch_offsets)
                })
                .await;
            match result {
                Ok(()) => {
                    self.metrics.observe_commit(started.elapsed());
                    if let Some(saved) = &self.saved {
                        saved
                            .lock()
                            .expect("offsets lock")
                            .extend(offsets.iter().map(|(k, v)| (k.clone(), *v)));
                    }
                    return true;
                }
                Err(e) => {
                    self.metrics.output_failures.fetch_add(1, Relaxed);
                    let delay = backoff.next_delay();
                    error!(
                        "cannot commit state, retrying in {delay:?} (offsets are held back meanwhile): {e}"
                    );
                    if sleep_unless_stopping(delay, &mut self.shutdown)
                        .await
                        .is_err()
                    {
                        self.sandbox().abort_batch();
                        return false;
                    }
                }
            }
        }
    }
}
