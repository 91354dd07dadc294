//! Node answers, demultiplexed: one wildcard subscription per scheduler process on its own inbox
//! prefix, and a table of attempts still waiting. An answer for a waiting attempt is handed to it;
//! one that arrives after its attempt timed out, or a second answer to the same attempt, finds no
//! one waiting — it is ignored and counted (`deepnode_exec_late_answers_total`), never classified.
//!
//! (async-nats' own `request` does the same demultiplexing but drops such answers silently.)

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::{Client, HeaderMap, Message, StatusCode};
use bytes::Bytes;
use futures::StreamExt;
use tokio::sync::oneshot;

type Waiting = Arc<Mutex<HashMap<u64, oneshot::Sender<Message>>>>;

/// How one request to a node ended, before its answer is classified.
pub(crate) enum Answer {
    Message(Message),
    TimedOut,
    NoResponders,
    Broken(String),
}

/// The process's reply inbox.
pub(crate) struct Replies {
    client: Client,
    prefix: String,
    waiting: Waiting,
    next: AtomicU64,
    task: tokio::task::JoinHandle<()>,
}

impl Replies {
    /// Subscribes to a fresh inbox prefix and starts handing answers out.
    pub(crate) async fn start(client: &Client) -> Result<Replies, async_nats::SubscribeError> {
        let prefix = client.new_inbox();
        let mut answers = client.subscribe(format!("{prefix}.*")).await?;
        let waiting: Waiting = Arc::default();
        let task = tokio::spawn({
            let waiting = waiting.clone();
            async move {
                while let Some(answer) = answers.next().await {
                    let id = answer
                        .subject
                        .rsplit('.')
                        .next()
                        .and_then(|t| t.parse::<u64>().ok());
                    let waiter = id.and_then(|id| lock(&waiting).remove(&id));
                    match waiter {
                        // The attempt may have timed out just now; then the answer is late too.
                        Some(waiter) => {
                            if waiter.send(answer).is_err() {
                                count_late();
                            }
                        }
                        None => count_late(),
                    }
                }
            }
        });
        Ok(Replies {
            client: client.clone(),
            prefix,
            waiting,
            next: AtomicU64::new(0),
            task,
        })
    }

    /// Sends `body` to `subject` and waits at most `timeout` for the answer.
    pub(crate) async fn request(
        &self,
        subject: String,
        headers: HeaderMap,
        body: Bytes,
        timeout: Duration,
    ) -> Answer {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        lock(&self.waiting).insert(id, tx);
        // Leave the table when this attempt ends, however it ends (an aborted attempt included).
        let _waiting = Unregister {
            waiting: &self.waiting,
            id,
        };
        let reply_to = format!("{}.{id}", self.prefix);
        let answer = match self
            .client
            .publish_with_reply_and_headers(subject, reply_to, headers, body)
            .await
        {
            Err(e) => Answer::Broken(e.to_string()),
            Ok(()) => match tokio::time::timeout(timeout, rx).await {
                Ok(Ok(msg)) if msg.status == Some(StatusCode::NO_RESPONDERS) => {
                    Answer::NoResponders
                }
                Ok(Ok(msg)) => Answer::Message(msg),
                Ok(Err(_)) => Answer::Broken("the reply inbox closed".to_owned()),
                Err(_) => Answer::TimedOut,
            },
        };
        answer
    }
}

/// Removes an attempt from the waiting table when dropped.
struct Unregister<'a> {
    waiting: &'a Waiting,
    id: u64,
}

impl Drop for Unregister<'_> {
    fn drop(&mut self) {
        lock(self.waiting).remove(&self.id);
    }
}

impl Drop for Replies {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn count_late() {
    metrics::counter!("deepnode_exec_late_answers_total").increment(1);
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A poisoned lock means a holder panicked mid-insert/remove; the map is still usable.
    m.lock().unwrap_or_else(|p| p.into_inner())
}
