//! Request/reply over NATS: [`serve`] runs an async handler for every request on a subject in a
//! queue group, with bounded concurrency and a graceful stop; [`request_json`] / [`request_bytes`]
//! are the client side.
//!
//! A correlation id travels in the [`CORRELATION_HEADER`] header: the server reads it (or makes a
//! new one), hands it to the handler, puts it on the handler's tracing span and echoes it on the
//! reply. This module deliberately knows no command shapes and does no parsing beyond that: handlers
//! call [`crate::envelope::parse_command`] themselves and return a [`Reply`].

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Duration;

use async_nats::{Client, HeaderMap, Subject};
use bytes::Bytes;
use futures::{FutureExt, StreamExt};
use serde::Serialize;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tracing::Instrument;

use crate::envelope::{ErrorBody, Reply};

/// The NATS header carrying the correlation id.
pub const CORRELATION_HEADER: &str = "Deepnode-Correlation-Id";

/// Default bound on requests handled at once by one [`serve`] call.
pub const DEFAULT_MAX_IN_FLIGHT: usize = 256;

/// While draining, how often the connection is flushed so the drained subscription can end.
const DRAIN_NUDGE: Duration = Duration::from_millis(100);

/// Upper bound on waiting for the subscription's buffered messages once shutdown began.
const DRAIN_LIMIT: Duration = Duration::from_secs(30);

/// What went wrong serving or requesting.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Subscribing to the served subject failed.
    #[error("subscribing to {subject}: {source}")]
    Subscribe {
        /// The subject.
        subject: String,
        /// The client's error.
        #[source]
        source: async_nats::SubscribeError,
    },
    /// Nobody answered in time.
    #[error("no reply on {subject} within {timeout:?}")]
    Timeout {
        /// The subject.
        subject: String,
        /// The timeout used.
        timeout: Duration,
    },
    /// Nobody subscribes to the subject.
    #[error("no responders on {subject}")]
    NoResponders {
        /// The subject.
        subject: String,
    },
    /// Another request failure (connection closed, ...).
    #[error("request on {subject}: {source}")]
    Request {
        /// The subject.
        subject: String,
        /// The client's error.
        #[source]
        source: async_nats::RequestError,
    },
    /// The request body could not be serialized.
    #[error("serializing the request: {0}")]
    Serialize(#[source] serde_json::Error),
    /// The reply is not JSON.
    #[error("reply on {subject} is not JSON: {source}")]
    Decode {
        /// The subject.
        subject: String,
        /// The parse error.
        #[source]
        source: serde_json::Error,
    },
}

/// One incoming request, as handed to a [`serve`] handler.
#[derive(Debug, Clone)]
pub struct Request {
    /// The subject it arrived on.
    pub subject: Subject,
    /// The raw body (parse with [`crate::envelope::parse_command`]).
    pub payload: Bytes,
    /// The request's headers, if any.
    pub headers: Option<HeaderMap>,
    /// From the [`CORRELATION_HEADER`] header, or freshly generated.
    pub correlation_id: String,
    /// Where the reply goes, if anywhere.
    pub reply: Option<Subject>,
}

impl Request {
    /// Who asked, as far as the bus can tell: the reply subject without its last token. A NATS
    /// client answers every request of its connection on one inbox prefix (`_INBOX.<id>.<token>`),
    /// so this names the caller's connection. `None` without a reply subject.
    pub fn caller(&self) -> Option<&str> {
        let reply = self.reply.as_deref()?;
        Some(reply.rsplit_once('.').map_or(reply, |(prefix, _)| prefix))
    }
}

/// The correlation id in `headers`, or a fresh UUID if absent, empty or implausibly long.
pub fn correlation_id(headers: Option<&HeaderMap>) -> String {
    headers
        .and_then(|h| h.get(CORRELATION_HEADER))
        .map(|v| v.as_str().trim())
        .filter(|v| !v.is_empty() && v.len() <= 128)
        .map_or_else(|| uuid::Uuid::new_v4().to_string(), str::to_owned)
}

/// Serves `subject` in `queue_group` with at most [`DEFAULT_MAX_IN_FLIGHT`] requests at once;
/// see [`serve_with_limit`].
pub async fn serve<H, Fut, S>(
    client: &Client,
    subject: &str,
    queue_group: &str,
    handler: H,
    shutdown: S,
) -> Result<(), Error>
where
    H: Fn(Request) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Reply> + Send + 'static,
    S: Future<Output = ()>,
{
    serve_with_limit(
        client,
        subject,
        queue_group,
        DEFAULT_MAX_IN_FLIGHT,
        handler,
        shutdown,
    )
    .await
}

/// Subscribes to `subject` in `queue_group` (so several copies share the requests, each handled
/// once) and runs `handler` on each request, at most `max_in_flight` at a time (further requests
/// wait in the subscription's buffer). The handler's [`Reply`] is published to the request's reply
/// subject with the correlation id header; a panicking handler yields an `internal` error reply.
/// Requests without a reply subject are handled and their reply is dropped.
///
/// When `shutdown` completes: unsubscribe (other copies take new requests), handle the requests
/// already delivered to this subscription, wait for in-flight handlers, then return `Ok`. The
/// caller then drains or drops the client.
pub async fn serve_with_limit<H, Fut, S>(
    client: &Client,
    subject: &str,
    queue_group: &str,
    max_in_flight: usize,
    handler: H,
    shutdown: S,
) -> Result<(), Error>
where
    H: Fn(Request) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Reply> + Send + 'static,
    S: Future<Output = ()>,
{
    listen(client, subject, queue_group)
        .await?
        .serve(client, max_in_flight, handler, shutdown)
        .await
}

/// A subscription to a command subject in a queue group, not yet served: [`listen`] then
/// [`Listener::serve`] lets a service do something between the two that must come after the
/// subscription (a publish on the same connection reaches the server after the subscription).
#[derive(Debug)]
pub struct Listener {
    sub: async_nats::Subscriber,
    subject: String,
}

/// Subscribes to `subject` in `queue_group`; see [`serve_with_limit`].
pub async fn listen(client: &Client, subject: &str, queue_group: &str) -> Result<Listener, Error> {
    let sub = client
        .queue_subscribe(subject.to_owned(), queue_group.to_owned())
        .await
        .map_err(|source| Error::Subscribe {
            subject: subject.to_owned(),
            source,
        })?;
    tracing::info!(subject, queue_group, "listening");
    Ok(Listener {
        sub,
        subject: subject.to_owned(),
    })
}

impl Listener {
    /// Serves the subscription as [`serve_with_limit`] does.
    pub async fn serve<H, Fut, S>(
        self,
        client: &Client,
        max_in_flight: usize,
        handler: H,
        shutdown: S,
    ) -> Result<(), Error>
    where
        H: Fn(Request) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Reply> + Send + 'static,
        S: Future<Output = ()>,
    {
        let Listener { mut sub, subject } = self;
        let subject = subject.as_str();
        tracing::info!(subject, max_in_flight, "serving");
        let handler = Arc::new(handler);
        let limit = Arc::new(Semaphore::new(max_in_flight.max(1)));
        let mut tasks = JoinSet::new();
        tokio::pin!(shutdown);

        let mut draining = false;
        // Armed (reset to now + DRAIN_LIMIT) when shutdown begins; far in the future until then.
        let drain_deadline = tokio::time::sleep(Duration::from_secs(86_400 * 365));
        tokio::pin!(drain_deadline);
        loop {
            // Wait for a free slot before taking the next message, so the backlog stays in NATS's
            // buffer and a stop never abandons a message we already took.
            let permit = tokio::select! {
                () = &mut shutdown, if !draining => {
                    draining = start_drain(&mut sub, subject, drain_deadline.as_mut()).await;
                    continue;
                }
                permit = limit.clone().acquire_owned() => match permit {
                    Ok(p) => p,
                    // Only closed if we close it, which we never do.
                    Err(_) => break,
                },
            };
            let msg = tokio::select! {
                () = &mut shutdown, if !draining => {
                    draining = start_drain(&mut sub, subject, drain_deadline.as_mut()).await;
                    continue;
                }
                () = &mut drain_deadline, if draining => {
                    tracing::warn!(subject, "gave up waiting for buffered requests after shutdown");
                    break;
                }
                () = tokio::time::sleep(DRAIN_NUDGE), if draining => {
                    // A drained subscription ends only when the client's connection task next wakes
                    // (a command or a server message); on an idle connection that can be the next ping,
                    // minutes away. A flush is such a wake-up.
                    if let Err(e) = client.flush().await {
                        tracing::debug!(subject, error = %e, "flush while draining failed");
                    }
                    continue;
                }
                msg = sub.next() => match msg {
                    Some(msg) => msg,
                    None => break,
                },
            };
            while let Some(done) = tasks.try_join_next() {
                log_join(done);
            }
            let client = client.clone();
            let handler = handler.clone();
            tasks.spawn(async move {
                let _permit = permit;
                handle_one(&client, msg, handler.as_ref()).await;
            });
        }
        while let Some(done) = tasks.join_next().await {
            log_join(done);
        }
        tracing::info!(subject, "stopped serving");
        Ok(())
    }
}

/// Unsubscribes so the server stops delivering; already buffered messages are still yielded by
/// the subscriber, which then ends. Returns `true` (now draining).
async fn start_drain(
    sub: &mut async_nats::Subscriber,
    subject: &str,
    deadline: std::pin::Pin<&mut tokio::time::Sleep>,
) -> bool {
    tracing::info!(
        subject,
        "shutdown: no new requests, finishing in-flight ones"
    );
    deadline.reset(tokio::time::Instant::now() + DRAIN_LIMIT);
    if let Err(e) = sub.drain().await {
        // The connection is gone; the subscriber will end by itself.
        tracing::warn!(subject, error = %e, "could not drain subscription");
    }
    true
}

fn log_join(done: Result<(), tokio::task::JoinError>) {
    if let Err(e) = done {
        tracing::error!(error = %e, "request task failed");
    }
}

async fn handle_one<H, Fut>(client: &Client, msg: async_nats::Message, handler: &H)
where
    H: Fn(Request) -> Fut,
    Fut: Future<Output = Reply>,
{
    let correlation_id = correlation_id(msg.headers.as_ref());
    let span = tracing::info_span!(
        "rpc",
        subject = %msg.subject,
        correlation_id = %correlation_id,
        ok = tracing::field::Empty,
    );
    async move {
        let reply_to = msg.reply.clone();
        let request = Request {
            subject: msg.subject,
            payload: msg.payload,
            headers: msg.headers,
            correlation_id: correlation_id.clone(),
            reply: msg.reply,
        };
        let reply = match AssertUnwindSafe(handler(request)).catch_unwind().await {
            Ok(reply) => reply,
            Err(_) => {
                tracing::error!("handler panicked");
                Reply::err(ErrorBody::internal("the handler failed unexpectedly"))
            }
        };
        tracing::Span::current().record("ok", reply.is_ok());
        if let Some(err) = reply.error() {
            tracing::debug!(code = %err.code, message = %err.message, "request refused");
        }
        let Some(reply_to) = reply_to else {
            tracing::debug!("request without reply subject; reply dropped");
            return;
        };
        let mut headers = HeaderMap::new();
        headers.insert(CORRELATION_HEADER, correlation_id.as_str());
        if let Err(e) = client
            .publish_with_headers(reply_to, headers, reply.to_bytes())
            .await
        {
            tracing::warn!(error = %e, "could not publish reply");
        }
    }
    .instrument(span)
    .await;
}

/// Sends `payload` to `subject` with a fresh correlation id and returns the raw reply body.
pub async fn request_bytes(
    client: &Client,
    subject: &str,
    payload: Bytes,
    timeout: Duration,
) -> Result<Bytes, Error> {
    let mut headers = HeaderMap::new();
    headers.insert(CORRELATION_HEADER, uuid::Uuid::new_v4().to_string());
    let request = async_nats::Request::new()
        .payload(payload)
        .headers(headers)
        .timeout(Some(timeout));
    match client.send_request(subject.to_owned(), request).await {
        Ok(msg) => Ok(msg.payload),
        Err(source) => Err(match source.kind() {
            async_nats::RequestErrorKind::TimedOut => Error::Timeout {
                subject: subject.to_owned(),
                timeout,
            },
            async_nats::RequestErrorKind::NoResponders => Error::NoResponders {
                subject: subject.to_owned(),
            },
            async_nats::RequestErrorKind::Other => Error::Request {
                subject: subject.to_owned(),
                source,
            },
        }),
    }
}

/// Sends `body` as JSON to `subject` and returns the reply parsed as JSON (decode the envelope
/// with [`Reply::from_value`] if wanted).
pub async fn request_json<T: Serialize + ?Sized>(
    client: &Client,
    subject: &str,
    body: &T,
    timeout: Duration,
) -> Result<serde_json::Value, Error> {
    let payload = serde_json::to_vec(body).map_err(Error::Serialize)?;
    let reply = request_bytes(client, subject, Bytes::from(payload), timeout).await?;
    serde_json::from_slice(&reply).map_err(|source| Error::Decode {
        subject: subject.to_owned(),
        source,
    })
}
