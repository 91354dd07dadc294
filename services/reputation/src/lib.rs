//! The deepnode reputation service, runnable in-process ([`run`]): it owns node membership
//! (`cmd.node.register` / `cmd.node.deregister`), ingests outside execution reports from JetStream
//! into the log, turns attempt and report outcomes into penalty decisions (jail, slash, tombstone,
//! phase-out, probation promotion — decided by `deepnode_domain::penalties`), watches heartbeats to
//! move nodes offline and back, and hosts the SQL projection of node reputation.
//!
//! Every decision is taken against a [`view::View`] folded live from the log and appended with
//! `ExpectedVersion::Exact` on the node's stream and deterministic event ids, so several copies of
//! the service can run side by side without taking one decision twice. The wall clock is read here
//! (jail releases, liveness), never in the domain. This crate does not publish events to the bus:
//! the relay (`deepnode_runtime::relay`) does, from the log.

mod commands;
mod decide;
mod ingest;
mod liveness;
mod outcomes;
pub mod tlog;
pub mod view;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use deepnode_domain::config::PolicyConfig;
use deepnode_projections::tree::TreeProjection;
use deepnode_projections::BookProjection;
use deepnode_runtime::{ServiceContext, Shutdown};
use deepnode_store::{FollowerHandle, Paired, ProjectionRunner};
use tokio::task::JoinSet;

use crate::view::View;

/// How long the SQL projection lets a batch gather commits before writing it: one transaction per
/// interval instead of one per commit, for rows at most this much later.
const PROJECTION_LINGER: std::time::Duration = std::time::Duration::from_millis(50);

/// Advisory lock key of the projection lease ("book" in ASCII): whoever holds it writes the SQL
/// projection.
pub const PROJECTION_LOCK_KEY: i64 = 0x626f_6f6b;

pub use outcomes::{OUTCOMES_CHECKPOINT, OUTCOMES_LOCK_KEY};

/// The queue group the command handlers share across copies.
pub const QUEUE_GROUP: &str = "deepnode-reputation";

/// Why the service stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Serving a command subject failed (subscribing).
    #[error("serving commands: {0}")]
    Rpc(#[from] deepnode_bus::rpc::Error),
    /// Ensuring a JetStream consumer failed.
    #[error("setting up JetStream: {0}")]
    JetStream(#[from] deepnode_bus::jetstream::Error),
    /// Subscribing to heartbeats failed.
    #[error("subscribing to heartbeats: {0}")]
    Subscribe(#[from] async_nats::SubscribeError),
    /// The event store failed in a way retrying does not fix (e.g. the live view stopped).
    #[error("event store: {0}")]
    Store(#[from] deepnode_store::Error),
    /// A task of the service panicked.
    #[error("a service task failed: {0}")]
    Task(String),
}

/// Tunables of the service. [`ReputationOptions::from_policy`] gives production values; tests
/// shorten the intervals so they run in seconds.
#[derive(Debug, Clone)]
pub struct ReputationOptions {
    /// Silence after which a node is declared offline (policy: 2 × 30 s). Also the grace period every
    /// node gets after this service starts (and after it first sees a node) before that can happen.
    pub offline_after: Duration,
    /// How often liveness and jail releases are checked (jail ends against `clock`).
    pub tick: Duration,
    /// Longest wait for the live view to reach a position before a message is retried (or the
    /// outcome assessment stands by, to resume there).
    pub view_timeout: Duration,
    /// Redelivery delay of a message that failed for a transient reason.
    pub nak_delay: Duration,
    /// Durable consumer name on the ingest stream (shared by every copy).
    pub ingest_consumer: String,
    /// Ingest messages handled at once by one copy.
    pub ingest_concurrency: usize,
    /// Counters, readable while the service runs (clone the `Arc` before passing the options).
    pub stats: Arc<Stats>,
    /// The key checkpoints are signed with (`DEEPNODE_LOG_KEY`); none: checkpoints are unsigned.
    pub log_key: Option<deepnode_domain::note::NoteSigner>,
    /// The wall-clock time jail releases run by (the system's, or a test's).
    pub clock: deepnode_runtime::Clock,
    /// How often a standby copy asks for a lease (the SQL projection's, the outcome assessment's),
    /// and the projection's holder checks it still has it.
    pub lease_retry: Duration,
}

impl ReputationOptions {
    /// Production values: offline after the policy's liveness silence, 1 s ticks.
    pub fn from_policy(policy: &PolicyConfig) -> ReputationOptions {
        let secs = u64::try_from(policy.liveness.offline_after_secs().max(1)).unwrap_or(60);
        ReputationOptions {
            offline_after: Duration::from_secs(secs),
            tick: Duration::from_secs(1),
            view_timeout: Duration::from_secs(10),
            nak_delay: Duration::from_secs(1),
            ingest_consumer: "reputation-ingest".to_owned(),
            ingest_concurrency: 32,
            stats: Arc::new(Stats::default()),
            log_key: None,
            clock: deepnode_runtime::Clock::system(),
            lease_retry: Duration::from_secs(1),
        }
    }
}

impl Default for ReputationOptions {
    fn default() -> Self {
        ReputationOptions::from_policy(&PolicyConfig::default())
    }
}

/// What the service has done, as counters (exported as typed metrics later).
#[derive(Debug, Default)]
pub struct Stats {
    /// Ingest messages appended as new `ExecutionReported` events.
    pub ingested: AtomicU64,
    /// Ingest messages whose event id was already in the log (nothing appended).
    pub ingest_duplicates: AtomicU64,
    /// Ingest messages terminated (malformed, unknown node, id reused with another body).
    pub ingest_terminated: AtomicU64,
    /// Ingest messages handed back for redelivery after a transient failure.
    pub ingest_retried: AtomicU64,
    /// Outcome events assessed for penalties.
    pub outcomes_assessed: AtomicU64,
    /// Penalty events (slashes, status changes) appended by this copy.
    pub penalty_events: AtomicU64,
    /// Nodes this copy declared offline.
    pub went_offline: AtomicU64,
    /// Offline nodes this copy brought back after a heartbeat.
    pub came_back: AtomicU64,
    /// Jails this copy released.
    pub jails_released: AtomicU64,
    /// The log position this copy's view had folded when its latest liveness and jail tick ran:
    /// once it is at the head, every decision a tick could take on what is logged has been taken.
    pub ticked_through: AtomicU64,
}

impl Stats {
    /// Reads one counter.
    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }

    pub(crate) fn bump(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

/// What every task of the service shares.
pub(crate) struct Shared {
    pub ctx: ServiceContext,
    pub options: ReputationOptions,
    pub view: FollowerHandle<View>,
    pub stop: Shutdown,
}

impl Shared {
    pub fn stats(&self) -> &Stats {
        &self.options.stats
    }
}

/// Runs the service until `shutdown` fires: serves the node commands (queue group
/// [`QUEUE_GROUP`]), consumes ingest reports (a durable consumer shared by every copy), assesses
/// outcomes from the log (one copy at a time, under a lease), watches heartbeats (every copy sees
/// every beat), ticks liveness and jail releases, and hosts the SQL projection. On shutdown it stops
/// taking work, finishes what is in flight and returns; the caller drains the NATS client. If one
/// part fails for good, the others are stopped and the error is returned.
pub async fn run(
    ctx: ServiceContext,
    options: ReputationOptions,
    shutdown: Shutdown,
) -> Result<(), Error> {
    let view = ctx.follow(View::new(&ctx.policy), |view, event| view.evolve(event));
    // An internal stop signal, so a failing part can stop its siblings without firing the caller's.
    let stop = shutdown.child_token();
    let shared = Arc::new(Shared {
        ctx,
        options,
        view: view.clone(),
        stop: stop.clone(),
    });

    // Set up everything that can fail at start before taking any work.
    let ingest = ingest::consumer(&shared).await?;
    let heartbeats = liveness::subscribe(&shared).await?;

    let mut tasks: JoinSet<Result<(), Error>> = JoinSet::new();
    let subjects = shared.ctx.subjects.clone();
    tasks.spawn(serve(
        shared.clone(),
        subjects.cmd_node_register(),
        commands::register,
    ));
    tasks.spawn(serve(
        shared.clone(),
        subjects.cmd_node_deregister(),
        commands::deregister,
    ));
    tasks.spawn(serve(
        shared.clone(),
        subjects.cmd_log_checkpoint(),
        tlog::latest,
    ));
    tasks.spawn(serve(shared.clone(), subjects.cmd_log_proof(), tlog::proof));
    tasks.spawn(ingest::run(shared.clone(), ingest));
    tasks.spawn(outcomes::run(shared.clone()));
    tasks.spawn(liveness::run(shared.clone(), heartbeats));
    tasks.spawn(host_projection(shared.clone()));
    tasks.spawn(tlog::checkpoints(shared.clone()));
    tracing::info!(
        prefix = shared.ctx.subjects.prefix(),
        "reputation service running"
    );

    let mut failure = None;
    while let Some(done) = tasks.join_next().await {
        let result = done.unwrap_or_else(|e| Err(Error::Task(e.to_string())));
        if let Err(e) = result {
            tracing::error!(error = %e, "reputation service part failed; stopping the others");
            stop.cancel();
            failure.get_or_insert(e);
        }
    }
    view.stop();
    tracing::info!("reputation service stopped");
    failure.map_or(Ok(()), Err)
}

/// Serves `subject` in [`QUEUE_GROUP`], answering each request with `answer`, until the service
/// stops.
async fn serve<F, Fut>(shared: Arc<Shared>, subject: String, answer: F) -> Result<(), Error>
where
    F: Fn(Arc<Shared>, deepnode_bus::rpc::Request) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = deepnode_bus::envelope::Reply> + Send + 'static,
{
    let (client, stop) = (shared.ctx.nats.clone(), shared.stop.clone());
    let handler = move |request| answer(shared.clone(), request);
    deepnode_bus::serve(&client, &subject, QUEUE_GROUP, handler, async move {
        stop.cancelled().await
    })
    .await?;
    Ok(())
}

/// Hosts the SQL projection of `node_reputation`, `deployments` and `executions`
/// (`deepnode_projections::BookProjection`) and, alongside it in the same read and transaction, the
/// log's Merkle tree (`deepnode_projections::tree::TreeProjection`, see [`tlog`]). One copy at a
/// time writes them, holding the projection lease. The others stand by: every `lease_retry` they
/// fold into memory what the holder has written (no transaction; the events come from the
/// process's tail of the log as it reads them, and from the database only what the tail no longer
/// holds), so the copy that takes the lease over continues from there rather than from the start
/// of the log. (The runner's checkpoint lock keeps the rows right even if two copies ever write at
/// once — a lease lost while its holder still writes.)
async fn host_projection(shared: Arc<Shared>) -> Result<(), Error> {
    let store = &shared.ctx.store;
    let every = shared.options.lease_retry;
    let mut runner = ProjectionRunner::for_store(
        store,
        Paired::new(
            BookProjection::new(&shared.ctx.policy),
            TreeProjection::new(),
        ),
    )
    .with_linger(PROJECTION_LINGER);
    loop {
        let taken = tokio::select! {
            () = shared.stop.cancelled() => return Ok(()),
            taken = store.take_lease(PROJECTION_LOCK_KEY, every) => taken,
            failed = runner.stand_by(every) => return Err(failed.into()),
        };
        let mut lease = match taken {
            Ok(lease) => lease,
            Err(e) => {
                tracing::debug!(error = %e, "projection lease unavailable");
                tokio::select! {
                    () = shared.stop.cancelled() => return Ok(()),
                    () = tokio::time::sleep(every) => continue,
                }
            }
        };
        tracing::info!("projection lease taken; this copy writes the projection");
        let stop = shared.stop.clone();
        let ran = tokio::select! {
            ran = runner.run(async move { stop.cancelled().await }) => ran,
            lost = lease.lost(every) => {
                tracing::warn!(error = %lost, "projection lease lost; standing by");
                // The batch it was writing may be folded in memory and never committed.
                runner.forget();
                continue;
            }
        };
        lease.release().await;
        return ran.map_err(Error::from);
    }
}
