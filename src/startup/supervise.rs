//! Keeping the process's background tasks alive, and the signals that stop it.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use crate::app::ProcessState;
use crate::resilience::Backoff;

/// A task that ran this long before ending is restarted as if it had never failed.
const STABLE_AFTER: Duration = Duration::from_secs(60);

/// Runs the background task `name` (a fresh `run()` each time) until `stop`: when it
/// ends or panics before that, it is logged, reported down to readiness, and started
/// again after an exponential backoff (1 s, doubling, at most a minute). A task cut
/// short by a bug must not leave a process that looks alive but relays or consumes
/// nothing.
pub async fn supervise<F, Fut>(
    name: &'static str,
    process: Arc<ProcessState>,
    stop: CancellationToken,
    mut run: F,
) where
    F: FnMut() -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let backoff = Backoff::new(Duration::from_secs(1), Duration::from_secs(60));
    let mut failures = 0;
    loop {
        let started = Instant::now();
        let outcome = tokio::spawn(run()).await;
        if stop.is_cancelled() {
            break;
        }
        match outcome {
            Ok(()) => tracing::error!(task = name, "background task ended; restarting it"),
            Err(error) => {
                tracing::error!(task = name, %error, "background task panicked; restarting it");
            }
        }
        process.set_task_running(name, false);
        if started.elapsed() >= STABLE_AFTER {
            failures = 0;
        }
        failures += 1;
        let wait = backoff.delay(failures);
        tokio::select! {
            () = stop.cancelled() => break,
            () = tokio::time::sleep(wait) => {}
        }
        process.set_task_running(name, true);
    }
    process.set_task_running(name, true);
}

/// SIGINT or SIGTERM.
pub(super) async fn shutdown_signal() {
    let interrupt = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut terminate) => {
                tokio::select! {
                    _ = interrupt => {}
                    _ = terminate.recv() => {}
                }
            }
            Err(error) => {
                tracing::warn!(%error, "cannot listen for SIGTERM; only SIGINT stops userhub");
                let _ = interrupt.await;
            }
        }
    }
    #[cfg(not(unix))]
    let _ = interrupt.await;
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU32, Ordering};

    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_task_that_panics_or_ends_is_restarted_until_stopped() {
        let process = Arc::new(ProcessState::default());
        let stop = CancellationToken::new();
        let runs = Arc::new(AtomicU32::new(0));
        let supervisor = tokio::spawn(supervise("relay", process.clone(), stop.clone(), {
            let (runs, stop) = (runs.clone(), stop.clone());
            move || {
                let (runs, stop) = (runs.clone(), stop.clone());
                async move {
                    match runs.fetch_add(1, Ordering::SeqCst) {
                        0 => panic!("a bug in the relay (test)"),
                        1 => {} // ended by itself
                        _ => stop.cancelled().await,
                    }
                }
            }
        }));
        // Paused time: the backoff sleeps pass at once, in order.
        while runs.load(Ordering::SeqCst) < 3 {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(process.tasks_down().is_empty(), "running again");
        stop.cancel();
        supervisor.await.unwrap();
        assert_eq!(runs.load(Ordering::SeqCst), 3);
    }

    #[tokio::test(start_paused = true)]
    async fn readiness_sees_the_task_down_while_it_waits_to_restart() {
        let process = Arc::new(ProcessState::default());
        let stop = CancellationToken::new();
        let supervisor = tokio::spawn(supervise(
            "consumer",
            process.clone(),
            stop.clone(),
            || async {},
        ));
        while process.tasks_down().is_empty() {
            tokio::task::yield_now().await;
        }
        assert_eq!(process.tasks_down(), ["consumer"]);
        stop.cancel();
        supervisor.await.unwrap();
        assert!(process.tasks_down().is_empty());
    }
}
