//! The clean-up of what holds personal data once it has served: sent outbox rows, dead
//! letters and expired idempotency keys, each after its `[retention]` period. Runs in
//! the process with the relay role (one per deployment is enough; several only share
//! the work), in batches, so it never holds a long lock.

use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use tokio_util::sync::CancellationToken;

use crate::bus::EventBus;
use crate::config::RetentionSettings;
use crate::db::Database;
use crate::metrics::Metrics;
use crate::outbox;
use crate::users::Users;

pub struct Retention {
    pub db: Database,
    pub bus: Arc<dyn EventBus>,
    pub users: Users,
    pub metrics: Arc<Metrics>,
    pub settings: RetentionSettings,
}

/// Whole hours or days as a duration of chrono's, saturating.
fn hours(n: u64) -> chrono::TimeDelta {
    chrono::TimeDelta::try_hours(i64::try_from(n).unwrap_or(i64::MAX))
        .unwrap_or(chrono::TimeDelta::MAX)
}

impl Retention {
    /// One pass over everything retention covers; returns how many rows of each kind
    /// were deleted. A failure of one kind does not stop the others.
    pub async fn run_once(&self) -> Vec<(&'static str, Result<u64, String>)> {
        let now = Utc::now();
        let batch = self.settings.batch_size;
        let outbox = outbox::purge_sent(&self.db, now - hours(self.settings.outbox_hours), batch)
            .await
            .map_err(|e| e.to_string());
        let dead_letters = self
            .bus
            .purge_dead_letters(
                now - hours(self.settings.dead_letter_days.saturating_mul(24)),
                batch,
            )
            .await
            .map_err(|e| e.to_string());
        let keys = self
            .users
            .purge_expired_idempotency_keys(batch)
            .await
            .map_err(|e| e.to_string());
        let done = vec![
            ("outbox", outbox),
            ("dead_letters", dead_letters),
            ("idempotency_keys", keys),
        ];
        for (what, result) in &done {
            match result {
                Ok(0) => {}
                Ok(deleted) => {
                    self.metrics.count_retention_deleted(what, *deleted);
                    tracing::info!(what, deleted, "retention: deleted what had served");
                }
                Err(error) => {
                    tracing::warn!(what, %error, "retention: clean-up failed; next pass retries")
                }
            }
        }
        done
    }

    /// A pass every `interval_secs` until `shutdown`.
    pub async fn run(&self, shutdown: CancellationToken) {
        let interval = Duration::from_secs(self.settings.interval_secs.max(1));
        tracing::info!(interval_secs = interval.as_secs(), "retention started");
        loop {
            self.run_once().await;
            tokio::select! {
                () = shutdown.cancelled() => break,
                () = tokio::time::sleep(interval) => {}
            }
        }
        tracing::info!("retention stopped");
    }
}
