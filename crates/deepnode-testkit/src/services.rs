//! Services a test runs in-process, and how a test knows one is ready: one way for every harness.

use std::collections::HashMap;
use std::fmt::Display;
use std::future::Future;
use std::time::Duration;

use futures::StreamExt;
use serde_json::Value;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::eventually;

/// Services a test started in-process: each a task and the token that stops it.
/// [`Services::stop`] stops them last-started-first and names every one that did not end cleanly.
#[derive(Debug, Default)]
pub struct Services {
    running: Vec<Started>,
}

#[derive(Debug)]
struct Started {
    name: String,
    shutdown: CancellationToken,
    task: JoinHandle<Result<(), String>>,
}

/// How long a stopped service may take to drain before it counts as hung.
const STOP_LIMIT: Duration = Duration::from_secs(30);

impl Services {
    /// Runs `service` (given the token that stops it) as `name`; returns that token.
    pub fn start<F, Fut, E>(&mut self, name: &str, service: F) -> CancellationToken
    where
        F: FnOnce(CancellationToken) -> Fut,
        Fut: Future<Output = Result<(), E>> + Send + 'static,
        E: Display,
    {
        let shutdown = CancellationToken::new();
        let running = service(shutdown.clone());
        let task = tokio::spawn(async move { running.await.map_err(|e| e.to_string()) });
        self.running.push(Started {
            name: name.to_owned(),
            shutdown: shutdown.clone(),
            task,
        });
        shutdown
    }

    /// How many services were started and not stopped.
    pub fn len(&self) -> usize {
        self.running.len()
    }

    /// Whether none is running.
    pub fn is_empty(&self) -> bool {
        self.running.is_empty()
    }

    /// The names of services whose task has ended (none should while a test runs).
    pub fn ended(&self) -> Vec<&str> {
        self.running
            .iter()
            .filter(|s| s.task.is_finished())
            .map(|s| s.name.as_str())
            .collect()
    }

    /// Stops every service, last started first, each within 30 s; the error names each one that
    /// failed, panicked or hung.
    pub async fn stop(&mut self) -> Result<(), String> {
        let mut failures = Vec::new();
        while let Some(service) = self.running.pop() {
            service.shutdown.cancel();
            match tokio::time::timeout(STOP_LIMIT, service.task).await {
                Ok(Ok(Ok(()))) => {}
                Ok(Ok(Err(e))) => failures.push(format!("{}: {e}", service.name)),
                Ok(Err(e)) => failures.push(format!("{}: task failed: {e}", service.name)),
                Err(_) => failures.push(format!("{}: did not stop within 30 s", service.name)),
            }
        }
        match failures.is_empty() {
            true => Ok(()),
            false => Err(failures.join("; ")),
        }
    }
}

/// Waits until something answers a request on `subject` — a service's readiness as its callers
/// see it (send a subject where an empty body is refused without effect); panics after `limit`.
pub async fn answering(client: &async_nats::Client, subject: &str, limit: Duration) {
    let what = format!("an answer on {subject}");
    eventually(&what, limit, || async {
        let request = client.request(subject.to_owned(), "{}".into());
        matches!(
            tokio::time::timeout(Duration::from_millis(500), request).await,
            Ok(Ok(_))
        )
    })
    .await;
}

/// Waits until `copies` scheduler copies each say on the presence subject (`presence`, subscribed
/// before the newest copy started) that they count all `copies`: then every copy has subscribed
/// to its command subjects and knows its share of the nodes' capacity. Panics after `limit`.
pub async fn copies_counted(presence: &mut async_nats::Subscriber, copies: u64, limit: Duration) {
    let mut counted: HashMap<String, u64> = HashMap::new();
    let all_counted = async {
        while let Some(message) = presence.next().await {
            let said: Value = serde_json::from_slice(&message.payload)
                .unwrap_or_else(|e| panic!("a presence announcement that is not JSON: {e}"));
            let copy = said["copy"].as_str().unwrap_or_default().to_owned();
            counted.insert(copy, said["copies"].as_u64().unwrap_or(0));
            if counted.values().filter(|n| **n == copies).count() as u64 == copies {
                return;
            }
        }
        panic!("the presence subscription ended");
    };
    tokio::time::timeout(limit, all_counted)
        .await
        .unwrap_or_else(|_| panic!("{copies} scheduler copies never all counted each other"));
}
