//! Harness for deepnode's cross-service end-to-end tests: a [`Cluster`] is a fresh database
//! (`TestDb`), a random subject prefix (`Subjects::random()`, so parallel tests and a running
//! `deepnode up` never share subjects or streams), the outbox relay, and the reputation, rotation and
//! scheduler services run in-process through their libraries' `run(ctx, options, shutdown)`, as
//! `deepnode_testkit::Services` (the fault suite runs the shipped binaries instead).
//!
//! It deliberately holds no assertions: the tests in `tests/` say what must hold.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context as _};
use deepnode_bus::{async_nats, rpc, Subjects};
use deepnode_domain::config::PolicyConfig;
use deepnode_reputation::ReputationOptions;
use deepnode_rotation::RotationOptions;
use deepnode_runtime::relay::{self, RelayOptions};
use deepnode_runtime::ServiceContext;
use deepnode_scheduler::SchedulerOptions;
use deepnode_store::EventStore;
use deepnode_testkit::{answering, copies_counted, nats_url, Services, TestDb};
use serde_json::Value;

/// How long a started service may take to answer.
const READY_LIMIT: Duration = Duration::from_secs(15);

/// A whole deepnode on a private database and subject prefix.
pub struct Cluster {
    /// The test's database.
    pub db: TestDb,
    /// A store on it, for assertions.
    pub store: EventStore,
    /// The subjects every part uses.
    pub subjects: Subjects,
    /// A client for the test itself.
    pub client: async_nats::Client,
    /// The policy every service runs with.
    pub policy: PolicyConfig,
    /// Counters of the most recently started reputation service.
    pub reputation_stats: Arc<deepnode_reputation::Stats>,
    /// The clock every scheduler copy runs by (ejections, retry budget): a test moves it ahead
    /// instead of sleeping through a window.
    pub clock: deepnode_runtime::Clock,
    /// Whether a reputation service has been started.
    reputation: bool,
    services: Services,
    /// Scheduler copies started.
    schedulers: u64,
}

impl Cluster {
    /// A fresh database and prefix with the relay and the three services running (one scheduler
    /// copy, producer `scheduler`).
    pub async fn with_services(policy: PolicyConfig) -> anyhow::Result<Cluster> {
        let mut cluster = Cluster::new(policy).await?;
        cluster.start_reputation().await?;
        cluster.start_rotation().await?;
        cluster.start_scheduler("scheduler").await?;
        Ok(cluster)
    }

    /// A fresh database and prefix, with the relay running and no service yet.
    pub async fn new(policy: PolicyConfig) -> anyhow::Result<Cluster> {
        let db = TestDb::new().await;
        let store = db.store().await;
        let client = async_nats::connect(nats_url())
            .await
            .context("connecting the test client to NATS")?;
        let mut cluster = Cluster {
            db,
            store,
            subjects: Subjects::random(),
            client,
            policy,
            reputation_stats: Arc::default(),
            clock: deepnode_runtime::Clock::adjustable(),
            reputation: false,
            services: Services::default(),
            schedulers: 0,
        };
        let ctx = cluster.context("relay").await?;
        let options = RelayOptions {
            lease_retry: Duration::from_millis(100),
            poll: Duration::from_millis(50),
            ..RelayOptions::default()
        };
        cluster.services.start("relay", |stop| async move {
            relay::run(ctx.store, ctx.js, ctx.subjects, options, stop).await;
            Ok::<(), std::convert::Infallible>(())
        });
        Ok(cluster)
    }

    /// A service context of its own (store pool and NATS connection) on the cluster's database and
    /// subjects, with the JetStream streams ensured.
    pub async fn context(&self, producer: &str) -> anyhow::Result<ServiceContext> {
        let nats = async_nats::connect(nats_url())
            .await
            .context("connecting to NATS")?;
        let store = self.db.store().await;
        let ctx = ServiceContext::new(
            store,
            nats,
            self.subjects.clone(),
            self.policy.clone(),
            producer,
        );
        deepnode_bus::jetstream::ensure_streams(&ctx.js, &ctx.subjects, &Default::default())
            .await
            .context("creating the JetStream streams")?;
        Ok(ctx)
    }

    /// Starts a reputation service (fast ticks, offline detection effectively off) and waits
    /// until it answers.
    pub async fn start_reputation(&mut self) -> anyhow::Result<()> {
        self.start_reputation_signing(None).await
    }

    /// [`Cluster::start_reputation`], signing the log's checkpoints with `log_key`.
    pub async fn start_reputation_signing(
        &mut self,
        log_key: Option<deepnode_domain::note::NoteSigner>,
    ) -> anyhow::Result<()> {
        let ctx = self.context("reputation").await?;
        let options = ReputationOptions {
            offline_after: Duration::from_secs(600),
            tick: Duration::from_millis(100),
            nak_delay: Duration::from_millis(200),
            log_key,
            ..ReputationOptions::from_policy(&self.policy)
        };
        self.reputation_stats = options.stats.clone();
        self.reputation = true;
        self.services.start("reputation", |stop| {
            deepnode_reputation::run(ctx, options, stop)
        });
        answering(
            &self.client,
            &self.subjects.cmd_node_deregister(),
            READY_LIMIT,
        )
        .await;
        Ok(())
    }

    /// Starts a rotation service without periodic rounds and waits until it answers.
    pub async fn start_rotation(&mut self) -> anyhow::Result<()> {
        let ctx = self.context("rotation").await?;
        let options = RotationOptions {
            periodic: false,
            ..RotationOptions::default()
        };
        self.services.start("rotation", |stop| {
            deepnode_rotation::run(ctx, options, stop)
        });
        answering(&self.client, &self.subjects.cmd_model_deploy(), READY_LIMIT).await;
        Ok(())
    }

    /// Starts one more scheduler copy (queue group) and waits until a schedule request is answered.
    pub async fn start_scheduler(&mut self, producer: &str) -> anyhow::Result<()> {
        self.start_scheduler_signing(producer, None).await
    }

    /// [`Cluster::start_scheduler`], signing every receipt with `log_key`.
    pub async fn start_scheduler_signing(
        &mut self,
        producer: &str,
        log_key: Option<deepnode_domain::note::NoteSigner>,
    ) -> anyhow::Result<()> {
        let ctx = self.context(producer).await?;
        // Every copy says on the presence subject how many copies it counts, once it has
        // subscribed to its command subjects: when each says all of them, all serve.
        let mut presence = self
            .client
            .subscribe(self.subjects.scheduler_presence())
            .await?;
        let options = SchedulerOptions {
            log_key,
            clock: self.clock.clone(),
            ..SchedulerOptions::default()
        };
        self.services
            .start(producer, |stop| deepnode_scheduler::run(ctx, options, stop));
        self.schedulers += 1;
        copies_counted(&mut presence, self.schedulers, Duration::from_secs(30)).await;
        Ok(())
    }

    /// Sends a command and returns its JSON reply.
    pub async fn request(&self, subject: &str, body: &Value) -> anyhow::Result<Value> {
        rpc::request_json(&self.client, subject, body, Duration::from_secs(30))
            .await
            .with_context(|| format!("request on {subject}"))
    }

    /// The log's head position.
    pub async fn head(&self) -> anyhow::Result<i64> {
        Ok(self.store.head_position().await?)
    }

    /// Waits until nothing more follows from what is logged, and returns the head it settled at:
    /// the relay has published up to the head and the SQL projection folded it (the store's
    /// `lags`), and, if a reputation service runs, its outcome assessment has stored the head (a
    /// penalty is appended before the position of its outcome is stored) and its liveness tick has
    /// folded the head — and the head did not move while all of that was checked. (A rotation round
    /// a scheduler asks for on its own is not covered: no test here relies on one during a settle.)
    pub async fn settle(&self, timeout: Duration) -> anyhow::Result<i64> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let (head, lags) = self.store.lags().await?;
            let behind = self.behind(head, &lags);
            if behind.is_empty() && self.head().await? == head {
                return Ok(head);
            }
            if tokio::time::Instant::now() > deadline {
                bail!("not settled at head {head} in time: {}", behind.join(", "));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// What has not yet caught up with `head`, given how far each stored position trails it (see
    /// [`Cluster::settle`]).
    fn behind(&self, head: i64, lags: &BTreeMap<String, i64>) -> Vec<String> {
        let mut checkpoints = vec![
            relay::RELAY_CHECKPOINT,
            deepnode_projections::BOOK_PROJECTION,
        ];
        if self.reputation {
            checkpoints.push(deepnode_reputation::OUTCOMES_CHECKPOINT);
        }
        let mut behind = Vec::new();
        for name in checkpoints {
            // A position not stored yet trails by the whole log.
            let lag = lags.get(name).copied().unwrap_or(head);
            if lag > 0 {
                behind.push(format!("{name} {lag} behind"));
            }
        }
        let ticked = deepnode_reputation::Stats::get(&self.reputation_stats.ticked_through);
        if self.reputation && ticked < head.unsigned_abs() {
            behind.push(format!("the reputation tick at {ticked}"));
        }
        behind
    }

    /// The names of service tasks that have ended (should be none while a test runs).
    pub fn ended(&self) -> Vec<&str> {
        self.services.ended()
    }

    /// Stops every service and the relay (last started first), reports any that failed, then
    /// deletes this prefix's JetStream streams (best effort: the prefix is random).
    pub async fn stop(&mut self) -> anyhow::Result<()> {
        let stopped = self.services.stop().await;
        let js = async_nats::jetstream::new(self.client.clone());
        for stream in [
            self.subjects.events_stream(),
            self.subjects.ingest_stream(),
            self.subjects.checkpoints_stream(),
        ] {
            let _ = js.delete_stream(&stream).await;
        }
        stopped.map_err(anyhow::Error::msg)
    }
}
