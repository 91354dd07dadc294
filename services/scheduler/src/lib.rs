//! The scheduler service: answers `cmd.schedule` (which replica would serve a model, with every
//! factor and score) and `cmd.exec` (run one inference request with failover), as a NATS queue group
//! so several copies share the load. Decisions are the pure `deepnode_domain::scoring::route` over a
//! snapshot of the log-folded `NodeBook` plus this process's live in-flight counts and ejections;
//! every step of an execution is recorded in the log (stream `exec-<request_id>`) before the reply.
//!
//! It does not register nodes, place models or compute reputation (the reputation and rotation
//! services do); it only reads their events. It does not publish events to the bus itself: the
//! outbox relay (`deepnode_runtime::relay`, started by the binary) does that after commit.

mod admission;
mod budget;
mod bus;
mod copies;
mod emergency;
mod exec;
mod live;
mod queue;
mod replies;
mod route;
mod sweep;

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use deepnode_bus::envelope::{parse_command, ErrorBody, Reply};
use deepnode_bus::rpc::{self, Request};
use deepnode_domain::book::NodeBook;
use deepnode_domain::ids::{ModelId, RequestId};
use deepnode_domain::scoring::RouteDecision;
use deepnode_runtime::{ServiceContext, Shutdown};
use deepnode_store::FollowerHandle;
use serde::Deserialize;

pub use budget::RetryBudget;

use live::Live;
use queue::Queues;
use route::{NoRoute, SnapshotParams};

/// The NATS queue group every scheduler copy joins.
pub const QUEUE_GROUP: &str = "deepnode-scheduler";

/// Tunables of one scheduler process (the policy numbers come from `ServiceContext::policy`).
#[derive(Debug, Clone)]
pub struct SchedulerOptions {
    /// Requests handled at once per subject; further ones wait in NATS.
    pub max_in_flight: usize,
    /// Seed of routing tie-break hashes.
    pub seed: u64,
    /// Largest accepted `timeout_ms` of an exec request.
    pub max_timeout_ms: u64,
    /// How long to wait for the local view to catch up with the log at start.
    pub catch_up_timeout: Duration,
    /// A repeated `request_id` still in flight is awaited for `2 × its attempt timeout` plus this.
    pub duplicate_grace: Duration,
    /// An execution still open `2 × its attempt timeout` plus this after it was requested was
    /// abandoned by a stopped scheduler of an older build (current builds leave nothing open), and
    /// is closed (not charged) by the sweeper.
    pub abandon_grace: Duration,
    /// How often this copy looks for abandoned executions.
    pub sweep_interval: Duration,
    /// How often this copy tells the other copies it is here (they share each node's capacity).
    pub presence_interval: Duration,
    /// How long a starting copy listens for the other copies before it admits a request.
    pub presence_settle: Duration,
    /// For this long after our NATS connection is re-established, an attempt that got no answer
    /// is not held against its node (the nodes reconnect on their own schedule).
    pub reconnect_grace: Duration,
    /// The log's key (`DEEPNODE_LOG_KEY`), signing each recorded exec reply's receipt; none:
    /// receipts carry no signature.
    pub log_key: Option<deepnode_domain::note::NoteSigner>,
    /// The time ejections, probes and the retry budget run by (the system's, or a test's).
    pub clock: deepnode_runtime::Clock,
}

impl Default for SchedulerOptions {
    fn default() -> Self {
        SchedulerOptions {
            max_in_flight: 1_024,
            seed: 0,
            max_timeout_ms: 120_000,
            catch_up_timeout: Duration::from_secs(60),
            duplicate_grace: Duration::from_secs(2),
            abandon_grace: Duration::from_secs(10),
            sweep_interval: Duration::from_secs(5),
            presence_interval: Duration::from_secs(1),
            presence_settle: Duration::from_millis(250),
            reconnect_grace: Duration::from_secs(5),
            log_key: None,
            clock: deepnode_runtime::Clock::system(),
        }
    }
}

/// Why the scheduler stopped.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The log could not be read up to its head at start.
    #[error("catching up with the event log: {0}")]
    CatchUp(#[source] deepnode_store::Error),
    /// Subscribing to a command subject failed.
    #[error("serving commands: {0}")]
    Serve(#[from] rpc::Error),
}

/// Shared state of one scheduler process.
pub(crate) struct Scheduler {
    ctx: ServiceContext,
    book: FollowerHandle<NodeBook>,
    live: Live,
    replies: Arc<replies::Replies>,
    params: SnapshotParams,
    options: SchedulerOptions,
    emergencies: emergency::Emergencies,
    /// Held while a request routes and takes its primary's slot, so two requests never both take
    /// a node's last slot.
    admission: std::sync::Mutex<()>,
    /// Requests waiting for a slot, per model, in the order they may take one.
    queues: Queues,
    /// Our own connection's history, so our outages are not held against nodes.
    bus: Arc<bus::BusWatch>,
}

/// `cmd.schedule` body.
#[derive(Debug, Deserialize)]
struct ScheduleCommand {
    model_id: ModelId,
    /// Optional: the request whose seeded traffic share to preview (default `schedule`).
    #[serde(default)]
    request_id: Option<RequestId>,
}

/// Runs the scheduler until `shutdown` fires: follows the log into a `NodeBook`, waits until it has
/// caught up with the head, then serves `cmd.schedule` and `cmd.exec` in queue group
/// [`QUEUE_GROUP`]. On shutdown it stops taking requests, finishes those in flight and returns.
pub async fn run(
    ctx: ServiceContext,
    options: SchedulerOptions,
    shutdown: Shutdown,
) -> Result<(), Error> {
    let book = ctx.follow(NodeBook::new(&ctx.policy), |book, event| {
        book.evolve(event).map(|_| ())
    });
    let head = ctx.store.head_position().await.map_err(Error::CatchUp)?;
    book.wait_for(head, options.catch_up_timeout)
        .await
        .map_err(Error::CatchUp)?;
    tracing::info!(position = head, "scheduler caught up with the log");
    let nats = ctx.nats.clone();
    let subjects = ctx.subjects.clone();
    let exec = rpc::listen(&nats, &subjects.cmd_exec(), QUEUE_GROUP).await?;
    let schedule = rpc::listen(&nats, &subjects.cmd_schedule(), QUEUE_GROUP).await?;
    // After the subscriptions, so a copy that hears this one's hello knows it serves.
    let timing = copies::Timing {
        interval: options.presence_interval,
        settle: options.presence_settle,
    };
    let (copies, presence) =
        copies::start(&nats, subjects.scheduler_presence(), &ctx.producer, timing)
            .await
            .map_err(|source| {
                Error::Serve(rpc::Error::Subscribe {
                    subject: subjects.scheduler_presence(),
                    source,
                })
            })?;
    let exec_policy = &ctx.policy.exec;
    let live = Live::new(
        ctx.policy.ejection.clone(),
        RetryBudget::new(
            exec_policy.retry_budget_ratio.raw(),
            exec_policy.retry_budget_per_sec,
        ),
        copies,
    );
    let queues = Queues::new(live.freed());
    let params = SnapshotParams {
        seed: options.seed,
        config_hash: ctx.policy.config_hash(),
        stake_domains: ctx.policy.routing.stake_domains.clone(),
    };
    let limit = options.max_in_flight;
    let replies = replies::Replies::start(&ctx.nats).await.map_err(|source| {
        Error::Serve(rpc::Error::Subscribe {
            subject: "reply inbox".to_owned(),
            source,
        })
    })?;
    let bus = Arc::new(bus::BusWatch::new(nats.clone(), options.reconnect_grace));
    let scheduler = Arc::new(Scheduler {
        ctx,
        book: book.clone(),
        live,
        replies: Arc::new(replies),
        params,
        options,
        emergencies: emergency::Emergencies::default(),
        admission: std::sync::Mutex::default(),
        queues,
        bus,
    });
    let sweeper = tokio::spawn(sweep::run(
        scheduler.clone(),
        scheduler.options.sweep_interval,
        shutdown.clone(),
    ));
    let on_exec = scheduler.clone();
    let on_schedule = scheduler;
    let stop_exec = shutdown.clone();
    let stop_schedule = shutdown;
    let served = tokio::try_join!(
        exec.serve(
            &nats,
            limit,
            move |request| exec::handle(on_exec.clone(), request),
            async move { stop_exec.cancelled().await },
        ),
        schedule.serve(
            &nats,
            limit,
            move |request| {
                let scheduler = on_schedule.clone();
                async move { scheduler.schedule(request).await }
            },
            async move { stop_schedule.cancelled().await },
        ),
    );
    // Every request has ended: the other copies may take this one's share.
    presence.leave().await;
    sweeper.abort();
    book.stop();
    served.map(|_| ()).map_err(Error::from)
}

impl Scheduler {
    /// Routes one request against the current local view.
    fn route_now(
        &self,
        model_id: &ModelId,
        request_id: &RequestId,
        now: DateTime<Utc>,
    ) -> Result<RouteDecision, NoRoute> {
        let input = {
            let book = self.book.read();
            route::snapshot(&book, &self.live, &self.params, model_id, request_id, now)?
        };
        route::decide(&input, &self.ctx.policy.routing)
    }

    /// Routes one request; an unknown model is retried once after catching up with the log's head
    /// (read-your-writes for a model deployed just before the request).
    async fn route(
        &self,
        model_id: &ModelId,
        request_id: &RequestId,
        now: DateTime<Utc>,
    ) -> Result<RouteDecision, NoRoute> {
        match self.route_now(model_id, request_id, now) {
            Err(NoRoute::UnknownModel) => {
                self.catch_up().await;
                self.route_now(model_id, request_id, now)
            }
            other => other,
        }
    }

    /// Waits (at most 2 s) until the view has folded the log's current head.
    async fn catch_up(&self) {
        if let Ok(head) = self.ctx.store.head_position().await {
            let _ = self.book.wait_for(head, Duration::from_secs(2)).await;
        }
    }

    async fn schedule(&self, request: Request) -> Reply {
        let cmd: ScheduleCommand = match parse_command(&request.payload) {
            Ok(cmd) => cmd,
            Err(e) => return Reply::err(e),
        };
        let request_id = match cmd.request_id {
            Some(id) => id,
            None => match RequestId::parse("schedule") {
                Ok(id) => id,
                Err(e) => return Reply::err(ErrorBody::internal(e.to_string())),
            },
        };
        match self
            .route(&cmd.model_id, &request_id, self.options.clock.now())
            .await
        {
            Ok(decision) => Reply::ok(&route::schedule_reply(&decision)),
            Err(why) => self.refusal(why, &cmd.model_id),
        }
    }
}
