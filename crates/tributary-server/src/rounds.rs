//! Many callers' writes made as one: callers [`Rounds::submit`] items and wait; one task takes
//! whatever waits (up to a round's most items), writes it in one go (one transaction, one
//! append) and answers each caller with the round's outcome.
//!
//! Under load one write carries many callers' items, so the commits a store makes stay near what
//! it can do instead of one per caller (SQLite lets one writer in at a time, and each commit
//! writes its pages again); a caller alone waits for its own write only.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};

use crate::ApiError;

/// How often the task, with nothing waiting, looks at its stop flag.
pub const ROUNDS_IDLE_CHECK: Duration = Duration::from_millis(250);

/// A caller's items and where its answer goes.
type Waiting<T> = (Vec<T>, oneshot::Sender<Result<(), ApiError>>);

/// The callers' side of a round writer (cheap to clone).
pub struct Rounds<T> {
    sender: mpsc::UnboundedSender<Waiting<T>>,
    name: &'static str,
}

impl<T> Clone for Rounds<T> {
    fn clone(&self) -> Self {
        Rounds { sender: self.sender.clone(), name: self.name }
    }
}

impl<T: Send + 'static> Rounds<T> {
    /// Starts the task that writes rounds with `write`. A round holds whole submissions, and
    /// no more once it reaches `items_max` items (a larger submission is a round of its own).
    /// The task leaves once `stopping` is set and nothing has waited for [`ROUNDS_IDLE_CHECK`],
    /// so the submissions of callers finishing their work are still written.
    pub fn start<W, F>(name: &'static str, items_max: usize, stopping: Arc<AtomicBool>, write: W) -> (Rounds<T>, tokio::task::JoinHandle<()>)
    where
        W: Fn(Vec<T>) -> F + Send + 'static,
        F: Future<Output = Result<(), ApiError>> + Send,
    {
        let (sender, mut receiver) = mpsc::unbounded_channel::<Waiting<T>>();
        let task = tokio::spawn(async move {
            loop {
                let first = tokio::select! {
                    first = receiver.recv() => first,
                    () = tokio::time::sleep(ROUNDS_IDLE_CHECK) => {
                        if stopping.load(Ordering::Acquire) {
                            return;
                        }
                        continue;
                    }
                };
                let Some((mut items, answer)) = first else { return };
                let mut answers = vec![answer];
                while items.len() < items_max
                    && let Ok((more, answer)) = receiver.try_recv()
                {
                    items.extend(more);
                    answers.push(answer);
                }
                let result = write(items).await;
                for answer in answers {
                    let _ = answer.send(result.clone());
                }
            }
        });
        (Rounds { sender, name }, task)
    }

    /// Hands `items` to the next round and waits for it to be written: its outcome.
    pub async fn submit(&self, items: Vec<T>) -> Result<(), ApiError> {
        let stopped = || ApiError::internal(format!("the {} stopped", self.name));
        let (answer, answered) = oneshot::channel();
        self.sender.send((items, answer)).map_err(|_| stopped())?;
        answered.await.map_err(|_| stopped())?
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn waiting_submissions_are_written_together_and_each_caller_gets_the_outcome() {
        let stopping = Arc::new(AtomicBool::new(false));
        let (written, mut rounds_seen) = mpsc::unbounded_channel::<Vec<u32>>();
        let (rounds, task) = Rounds::start("test writer", 5, stopping.clone(), move |items: Vec<u32>| {
            let written = written.clone();
            async move {
                tokio::time::sleep(Duration::from_millis(20)).await;
                if items.contains(&99) {
                    return Err(ApiError::internal("refused"));
                }
                let _ = written.send(items);
                Ok(())
            }
        });
        // The first is written alone; the next four wait for it and go out as one round
        // (the fifth does not fit: the round is full at 5 items).
        let submit = |items: Vec<u32>| {
            let rounds = rounds.clone();
            tokio::spawn(async move { rounds.submit(items).await })
        };
        let first = submit(vec![1]);
        tokio::time::sleep(Duration::from_millis(5)).await;
        let waiting: Vec<_> = [vec![2, 3], vec![4], vec![5, 6], vec![7]].into_iter().map(submit).collect();
        first.await.unwrap().unwrap();
        for result in futures_util::future::join_all(waiting).await {
            result.unwrap().unwrap();
        }
        let mut seen = Vec::new();
        while let Ok(round) = rounds_seen.try_recv() {
            seen.push(round);
        }
        assert_eq!(seen, vec![vec![1], vec![2, 3, 4, 5, 6], vec![7]]);
        // A round that fails fails for every caller in it.
        let error = rounds.submit(vec![99]).await.unwrap_err();
        assert_eq!(error.message, "refused");
        // Once stopping, the task leaves when idle; later submissions are refused by name.
        stopping.store(true, Ordering::Release);
        task.await.unwrap();
        let error = rounds.submit(vec![1]).await.unwrap_err();
        assert!(error.message.contains("test writer stopped"), "{}", error.message);
    }
}
