//! [`ServiceContext`]: the connections every service holds — the event store (migrated on connect),
//! the NATS client and its JetStream context, the subject names and the policy in force.

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream;
use deepnode_bus::subjects::Subjects;
use deepnode_domain::config::PolicyConfig;
use deepnode_store::{EventStore, Follower, FollowerHandle, RecordedEvent};

use crate::Settings;

/// Why a service could not start.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("connecting to the event store: {0}")]
    Store(#[from] deepnode_store::Error),
    #[error("connecting to NATS: {0}")]
    Nats(#[from] deepnode_bus::connect::Error),
    #[error("setting up JetStream: {0}")]
    JetStream(#[from] deepnode_bus::jetstream::Error),
}

/// What a running service is connected to.
#[derive(Clone)]
pub struct ServiceContext {
    pub store: EventStore,
    pub nats: async_nats::Client,
    pub js: jetstream::Context,
    pub subjects: Subjects,
    pub policy: Arc<PolicyConfig>,
    /// This process's name, recorded as `metadata.producer` on the events it appends.
    pub producer: String,
}

impl ServiceContext {
    /// Connects (migrating the database first, CONTRACT §1) and makes sure the JetStream streams exist.
    pub async fn connect(
        settings: &Settings,
        producer: &str,
        subjects: Subjects,
    ) -> Result<ServiceContext, ConnectError> {
        let store = EventStore::connect(&settings.database_url, 16).await?;
        let nats = deepnode_bus::connect::connect(&settings.nats_url, producer).await?;
        let ctx = ServiceContext::new(store, nats, subjects, settings.policy.clone(), producer);
        deepnode_bus::jetstream::ensure_streams(&ctx.js, &ctx.subjects, &settings.retention)
            .await?;
        Ok(ctx)
    }

    /// A context over connections made elsewhere (tests, a service on its own credentials); the
    /// JetStream streams are not ensured.
    pub fn new(
        store: EventStore,
        nats: async_nats::Client,
        subjects: Subjects,
        policy: PolicyConfig,
        producer: &str,
    ) -> ServiceContext {
        ServiceContext {
            store,
            js: jetstream::new(nats.clone()),
            nats,
            subjects,
            policy: Arc::new(policy),
            producer: producer.to_owned(),
        }
    }

    /// The service's live view of the log: `state` folded by `fold` from position 0, then every
    /// commit, gathered for up to [`ServiceContext::VIEW_LINGER`] so one read carries all the commits
    /// of that interval. `wait_for` (read-your-writes) never waits for the linger.
    pub fn follow<S, F, E>(&self, state: S, fold: F) -> FollowerHandle<S>
    where
        S: Send + Sync + 'static,
        F: FnMut(&mut S, &RecordedEvent) -> Result<(), E> + Send + 'static,
        E: std::fmt::Display,
    {
        Follower::start_lingering(&self.store, state, Self::VIEW_LINGER, fold)
    }

    /// How much later than its commit a service's view may fold an event nobody is waiting for:
    /// at 100 commits a second this turns five reads (and wake-ups) of every service into one.
    pub const VIEW_LINGER: Duration = Duration::from_millis(50);
}
