//! JetStream setup and deduplicated publishing: [`ensure_streams`] creates or updates the events
//! and ingest streams with their [`Retention`] (idempotent, safe for every service copy to call at
//! start),
//! [`ensure_pull_consumer`] does the same for durable pull consumers, and [`publish_with_id`]
//! publishes with a `Nats-Msg-Id` and waits for the stream's ack.
//!
//! It deliberately does not decide *what* is published or when (the outbox relay and the ingest
//! producers do), and does not consume: services pull from the consumers they ensured.

use std::time::Duration;

use async_nats::jetstream::consumer::{pull, AckPolicy, DeliverPolicy, PullConsumer};
use async_nats::jetstream::context::Publish;
use async_nats::jetstream::stream::{Config, DiscardPolicy, RetentionPolicy, StorageType};
use async_nats::jetstream::Context;
use bytes::Bytes;

use crate::subjects::Subjects;

/// How long JetStream remembers a `Nats-Msg-Id` to drop duplicates.
pub const DUPLICATE_WINDOW: Duration = Duration::from_secs(10 * 60);

/// How long the events stream keeps the log's publications by default: a day to catch up. The log
/// in PostgreSQL is the record; the stream is its live feed, and kept for good it would copy the whole
/// log onto the NATS server's disk (4.4 KB per execution measured, ~380 GB a day at 1,000 exec/s).
pub const DEFAULT_EVENTS_RETENTION: Duration = Duration::from_secs(24 * 60 * 60);

/// How long the ingest stream keeps execution reports by default: a week, so a report survives any
/// outage of the ingest consumer an operator would let run, while acknowledged ones do not pile up.
pub const DEFAULT_INGEST_RETENTION: Duration = Duration::from_secs(7 * 24 * 60 * 60);

/// How long the events and ingest streams keep a message (JetStream's `max_age`; the oldest go
/// first). `None` keeps them for good. The checkpoints stream always keeps everything.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retention {
    /// `DEEPNODE_EVENTS`: the relay's publications of committed events.
    pub events: Option<Duration>,
    /// `DEEPNODE_INGEST`: execution reports from outside, before they are logged.
    pub ingest: Option<Duration>,
}

impl Default for Retention {
    fn default() -> Self {
        Retention {
            events: Some(DEFAULT_EVENTS_RETENTION),
            ingest: Some(DEFAULT_INGEST_RETENTION),
        }
    }
}

impl Retention {
    /// Keeps every message for good (the streams as they were before retention was set).
    pub const FOR_GOOD: Retention = Retention {
        events: None,
        ingest: None,
    };

    /// A retention from seconds, `0` meaning for good. JetStream refuses a stream whose messages
    /// expire before its [`DUPLICATE_WINDOW`], so a shorter one is refused here, by name.
    pub fn from_secs(secs: u64) -> Result<Option<Duration>, String> {
        match secs {
            0 => Ok(None),
            s if Duration::from_secs(s) < DUPLICATE_WINDOW => Err(format!(
                "{s} s is shorter than the streams' duplicate window ({} s); use 0 to keep for good",
                DUPLICATE_WINDOW.as_secs()
            )),
            s => Ok(Some(Duration::from_secs(s))),
        }
    }
}

/// What went wrong talking to JetStream.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Creating or updating a stream failed.
    #[error("ensuring stream {stream}: {source}")]
    Stream {
        /// The stream's name.
        stream: String,
        /// The server's or client's error.
        #[source]
        source: async_nats::jetstream::context::CreateStreamError,
    },
    /// Creating or updating a consumer failed.
    #[error("ensuring consumer {consumer} on {stream}: {source}")]
    Consumer {
        /// The stream's name.
        stream: String,
        /// The consumer's durable name.
        consumer: String,
        /// The server's or client's error.
        #[source]
        source: async_nats::jetstream::stream::ConsumerError,
    },
    /// A stream could not be looked up (it does not exist, or the server did not answer).
    #[error("looking up stream {stream}: {source}")]
    Lookup {
        /// The stream's name.
        stream: String,
        /// The server's or client's error.
        #[source]
        source: async_nats::jetstream::context::GetStreamError,
    },
    /// A consumer config without a durable name was passed where a durable one is required.
    #[error("consumer config on {stream} has no durable_name")]
    NotDurable {
        /// The stream's name.
        stream: String,
    },
    /// Publishing or awaiting the ack failed (no stream, timeout, broken connection).
    #[error("publishing to {subject}: {source}")]
    Publish {
        /// The subject published to.
        subject: String,
        /// The client's error.
        #[source]
        source: async_nats::jetstream::context::PublishError,
    },
}

/// The events stream's config: `<prefix>.events.>`, file storage, [`DUPLICATE_WINDOW`], kept for
/// `retention`.
pub fn events_stream_config(subjects: &Subjects, retention: Option<Duration>) -> Config {
    Config {
        name: subjects.events_stream(),
        description: Some("deepnode committed events, published from the log".to_owned()),
        subjects: vec![subjects.events_wildcard()],
        storage: StorageType::File,
        retention: RetentionPolicy::Limits,
        discard: DiscardPolicy::Old,
        max_age: retention.unwrap_or(Duration::ZERO),
        duplicate_window: DUPLICATE_WINDOW,
        ..Default::default()
    }
}

/// The ingest stream's config: `<prefix>.ingest.>`, file storage, [`DUPLICATE_WINDOW`], kept for
/// `retention`.
pub fn ingest_stream_config(subjects: &Subjects, retention: Option<Duration>) -> Config {
    Config {
        name: subjects.ingest_stream(),
        description: Some("deepnode execution reports from outside, before logging".to_owned()),
        subjects: vec![subjects.ingest_wildcard()],
        storage: StorageType::File,
        retention: RetentionPolicy::Limits,
        discard: DiscardPolicy::Old,
        max_age: retention.unwrap_or(Duration::ZERO),
        duplicate_window: DUPLICATE_WINDOW,
        ..Default::default()
    }
}

/// The checkpoints stream's config: `<prefix>.checkpoints`, file storage, kept for good (its own
/// retention: no age or size limit, so an operator trimming the events stream or the database does
/// not take the checkpoints with it).
pub fn checkpoints_stream_config(subjects: &Subjects) -> Config {
    Config {
        name: subjects.checkpoints_stream(),
        description: Some("deepnode's signed log checkpoints, outside the database".to_owned()),
        subjects: vec![subjects.checkpoints()],
        storage: StorageType::File,
        retention: RetentionPolicy::Limits,
        discard: DiscardPolicy::New,
        duplicate_window: DUPLICATE_WINDOW,
        deny_delete: true,
        deny_purge: true,
        ..Default::default()
    }
}

/// The latest message of the checkpoints stream (`<prefix>.checkpoints`: the log's own checkpoint or
/// a witness's co-signed copy of it); `Ok(None)` while it holds none.
pub async fn latest_checkpoint(js: &Context, subjects: &Subjects) -> Result<Option<Bytes>, Error> {
    let name = subjects.checkpoints_stream();
    let stream = js.get_stream(&name).await.map_err(|source| Error::Lookup {
        stream: name.clone(),
        source,
    })?;
    Ok(stream
        .get_last_raw_message_by_subject(&subjects.checkpoints())
        .await
        .ok()
        .map(|m| m.payload))
}

/// Creates the events, ingest and checkpoints streams, or updates them to the current config
/// (`retention` included: a stream kept for good before gets its limit, and JetStream drops what is
/// older at once). Idempotent.
pub async fn ensure_streams(
    js: &Context,
    subjects: &Subjects,
    retention: &Retention,
) -> Result<(), Error> {
    for config in [
        events_stream_config(subjects, retention.events),
        ingest_stream_config(subjects, retention.ingest),
        checkpoints_stream_config(subjects),
    ] {
        let stream = config.name.clone();
        js.create_or_update_stream(config)
            .await
            .map_err(|source| Error::Stream {
                stream: stream.clone(),
                source,
            })?;
        tracing::debug!(%stream, "stream ensured");
    }
    Ok(())
}

/// A durable pull consumer config with explicit acks, delivering everything from the start,
/// optionally filtered to one subject (e.g. `subjects.events("AttemptFailed")`).
pub fn durable_pull_config(durable_name: &str, filter_subject: Option<String>) -> pull::Config {
    pull::Config {
        durable_name: Some(durable_name.to_owned()),
        deliver_policy: DeliverPolicy::All,
        ack_policy: AckPolicy::Explicit,
        ack_wait: Duration::from_secs(30),
        filter_subject: filter_subject.unwrap_or_default(),
        ..Default::default()
    }
}

/// Creates the durable pull consumer `config.durable_name` on `stream`, or updates it to `config`.
/// Idempotent; every copy of a service may call it and they then share the consumer's work.
pub async fn ensure_pull_consumer(
    js: &Context,
    stream: &str,
    config: pull::Config,
) -> Result<PullConsumer, Error> {
    let Some(consumer) = config.durable_name.clone() else {
        return Err(Error::NotDurable {
            stream: stream.to_owned(),
        });
    };
    js.create_consumer_on_stream(config, stream)
        .await
        .map_err(|source| Error::Consumer {
            stream: stream.to_owned(),
            consumer,
            source,
        })
}

/// The stream's ack of one publish.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Published {
    /// The stream that stored (or had already stored) the message.
    pub stream: String,
    /// Its sequence in the stream (of the first copy, for a duplicate).
    pub sequence: u64,
    /// True if the stream had already seen this `Nats-Msg-Id` inside its duplicate window.
    pub duplicate: bool,
}

/// Publishes `payload` to `subject` with header `Nats-Msg-Id: msg_id` and waits for the stream's
/// ack, so the message is durable when this returns `Ok`.
pub async fn publish_with_id(
    js: &Context,
    subject: &str,
    msg_id: &str,
    payload: Bytes,
) -> Result<Published, Error> {
    let err = |source| Error::Publish {
        subject: subject.to_owned(),
        source,
    };
    let ack = js
        .send_publish(
            subject.to_owned(),
            Publish::build().payload(payload).message_id(msg_id),
        )
        .await
        .map_err(err)?
        .await
        .map_err(err)?;
    Ok(Published {
        stream: ack.stream,
        sequence: ack.sequence,
        duplicate: ack.duplicate,
    })
}
