//! Group commit for the profile stores: upserts that arrive while another group is being
//! written wait, and are then written together.
//!
//! The consumer hands over a batch of messages at once. One write per profile made them
//! queue one by one behind each other: SQLite has one writer and syncs each commit to
//! disk, and a document store answers a round trip per write. Written together they
//! cost one commit (SQLite) or one `insert` of many documents (MongoDB).

use std::future::Future;
use std::sync::{Mutex, MutexGuard, PoisonError};

use tokio::sync::oneshot;

use super::domain::Write;
use super::store::StoreError;

pub(super) struct GroupCommit<T> {
    waiting: Mutex<Vec<Pending<T>>>,
    /// Held by whoever writes the waiting group.
    writer: tokio::sync::Mutex<()>,
}

/// One write of a group, and where its outcome goes.
pub(super) struct Pending<T> {
    pub item: T,
    answer: oneshot::Sender<Result<Write, StoreError>>,
}

impl<T> Pending<T> {
    /// Hands the outcome to the waiting caller (who may have given up on it).
    pub fn answer(self, outcome: Result<Write, StoreError>) {
        let _ = self.answer.send(outcome);
    }
}

impl<T> Default for GroupCommit<T> {
    fn default() -> Self {
        Self {
            waiting: Mutex::new(Vec::new()),
            writer: tokio::sync::Mutex::new(()),
        }
    }
}

impl<T> GroupCommit<T> {
    fn waiting(&self) -> MutexGuard<'_, Vec<Pending<T>>> {
        self.waiting.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Writes `item` with whatever else is waiting, once the group before it is done.
    /// `write_group` must answer every `Pending` it is given. If it is cancelled half
    /// way (its caller timed out), those it did not answer get an error and their
    /// messages are retried.
    pub async fn submit<F, Fut>(&self, item: T, write_group: F) -> Result<Write, StoreError>
    where
        F: FnOnce(Vec<Pending<T>>) -> Fut,
        Fut: Future<Output = ()>,
    {
        use tokio::sync::oneshot::error::TryRecvError;
        let (answer, mut answered) = oneshot::channel();
        self.waiting().push(Pending { item, answer });
        let _writer = self.writer.lock().await;
        // The writer before us may have written ours with its group.
        match answered.try_recv() {
            Ok(result) => return result,
            Err(TryRecvError::Closed) => return Err(abandoned()),
            Err(TryRecvError::Empty) => {}
        }
        let group = std::mem::take(&mut *self.waiting());
        write_group(group).await;
        answered.try_recv().unwrap_or_else(|_| Err(abandoned()))
    }
}

/// The answer of a waiting write whose group write was cancelled half-way.
fn abandoned() -> StoreError {
    StoreError::Backend("the group write holding this profile was abandoned".into())
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    #[tokio::test]
    async fn writes_that_wait_together_are_written_together() {
        let group = Arc::new(GroupCommit::<u32>::default());
        let sizes = Arc::new(Mutex::new(Vec::new()));
        // Hold the writer so that the next submissions queue up behind it.
        let held = group.writer.lock().await;
        let mut tasks = Vec::new();
        for item in 0..5 {
            let (group, sizes) = (group.clone(), sizes.clone());
            tasks.push(tokio::spawn(async move {
                group
                    .submit(item, |pending| async move {
                        sizes.lock().unwrap().push(pending.len());
                        for p in pending {
                            let outcome = if p.item % 2 == 0 {
                                Ok(Write::Applied)
                            } else {
                                Ok(Write::Stale)
                            };
                            p.answer(outcome);
                        }
                    })
                    .await
            }));
        }
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(5);
        while group.waiting().len() < 5 {
            assert!(
                tokio::time::Instant::now() < deadline,
                "submissions never queued"
            );
            tokio::task::yield_now().await;
        }
        drop(held);
        let mut outcomes = Vec::new();
        for task in tasks {
            outcomes.push(task.await.unwrap().unwrap());
        }
        assert_eq!(*sizes.lock().unwrap(), vec![5]);
        assert_eq!(
            outcomes,
            [
                Write::Applied,
                Write::Stale,
                Write::Applied,
                Write::Stale,
                Write::Applied
            ]
        );
    }

    #[tokio::test]
    async fn an_unanswered_write_is_an_error_not_a_hang() {
        let group = GroupCommit::<u32>::default();
        let outcome = group
            .submit(1, |pending| async move { drop(pending) })
            .await;
        assert!(matches!(outcome, Err(StoreError::Backend(_))));
    }
}
