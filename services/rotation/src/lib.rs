//! The deepnode rotation service: places models (`cmd.model.deploy`) and runs rotation rounds —
//! every period and on demand (`cmd.rotation.run`) — that move replicas make-before-break, phase out
//! persistently poor nodes and record each epoch with `RotationCompleted`.
//!
//! Every decision is a pure domain function (`placement::place`, `rotation::plan`) of a snapshot of
//! the [`view::RotationView`] folded from the log; this crate only builds snapshots, appends the
//! resulting events with optimistic concurrency and answers on the bus. Several copies may run: the
//! commands are served in one queue group, deploys are guarded by `ExpectedVersion::NoStream`, and
//! rounds by an advisory lock plus the exact version of the `rotation` stream. It does not score
//! reputation, route requests or publish to the bus directly (the relay publishes from the log).

pub mod deploy;
pub mod error;
pub mod round;
pub mod snapshot;
pub mod view;

use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use deepnode_bus::envelope::{ErrorBody, ErrorCode, Reply};
use deepnode_bus::rpc::serve;
use deepnode_domain::config::PolicyConfig;
use deepnode_runtime::{ServiceContext, Shutdown};
use deepnode_store::FollowerHandle;
use uuid::Uuid;

pub use deepnode_domain::rotation::Trigger;
pub use error::Error;
pub use round::{run_round, RoundOutcome, RoundReport};
pub use view::RotationView;

/// The queue group every copy of the service serves its subjects in.
pub const QUEUE_GROUP: &str = "deepnode-rotation";

/// Namespace of the service's deterministic (UUID v5) event ids.
pub const ID_NAMESPACE: Uuid = Uuid::from_u128(0x6465_6570_6e6f_6465_726f_7461_7469_6f6e);

/// Tunables of the service (policy numbers live in the `PolicyConfig` of the context).
#[derive(Debug, Clone)]
pub struct RotationOptions {
    /// Length of an epoch, overriding the policy's `rotation.epoch_secs` (tests run sub-second
    /// epochs); `None` in production.
    pub period: Option<Duration>,
    /// Whether to run periodic rounds at all (on-demand rounds are always served).
    pub periodic: bool,
    /// Seed of the placement draw and rotation tie-breaks.
    pub seed: u64,
    /// How long to wait for the local view to reach the log's head before deciding.
    pub catch_up_timeout: Duration,
}

impl Default for RotationOptions {
    fn default() -> Self {
        RotationOptions {
            period: None,
            periodic: true,
            seed: 0x5eed,
            catch_up_timeout: Duration::from_secs(10),
        }
    }
}

impl RotationOptions {
    /// The length of an epoch: the override, else the policy's `rotation.epoch_secs`.
    pub fn epoch(&self, policy: &PolicyConfig) -> Duration {
        self.period
            .unwrap_or(Duration::from_secs(policy.rotation.epoch_secs))
    }
}

/// Starts the live view the service decides from (the book plus the rotation fold).
pub fn start_view(ctx: &ServiceContext) -> FollowerHandle<RotationView> {
    ctx.follow(RotationView::new(&ctx.policy), |v, e| v.evolve(e))
}

/// Runs the service until `shutdown` fires: serves `cmd.model.deploy` and `cmd.rotation.run` in
/// [`QUEUE_GROUP`] and, if enabled, runs a round at every period boundary. On shutdown it stops taking
/// requests, finishes the ones in flight and the round in progress, then returns.
pub async fn run(
    ctx: ServiceContext,
    options: RotationOptions,
    shutdown: Shutdown,
) -> Result<(), Error> {
    let view = start_view(&ctx);
    let shared = Arc::new((ctx.clone(), view.clone(), options.clone()));

    let (deploy_subject, run_subject) = (
        ctx.subjects.cmd_model_deploy(),
        ctx.subjects.cmd_rotation_run(),
    );
    let deploy_state = shared.clone();
    let deploy = serve(
        &ctx.nats,
        &deploy_subject,
        QUEUE_GROUP,
        move |request| {
            let state = deploy_state.clone();
            async move {
                let (ctx, view, options) = &*state;
                deploy::handle(ctx, view, options, &request).await
            }
        },
        shutdown.cancelled(),
    );

    let round_state = shared.clone();
    let rounds = serve(
        &ctx.nats,
        &run_subject,
        QUEUE_GROUP,
        move |_request| {
            let state = round_state.clone();
            async move {
                let (ctx, view, options) = &*state;
                match run_round(ctx, view, options, Trigger::OnDemand).await {
                    Ok(report) if report.outcome == RoundOutcome::Busy => {
                        Reply::err(ErrorBody::new(
                            ErrorCode::Conflict,
                            "a rotation round is already running on another copy",
                        ))
                    }
                    Ok(report) => Reply::ok(&report),
                    Err(e) => {
                        tracing::error!(error = %e, "on-demand rotation round failed");
                        Reply::err(e.to_body())
                    }
                }
            }
        },
        shutdown.cancelled(),
    );

    let periodic = periodic_rounds(&ctx, &view, &options, &shutdown);
    let ((deploy, rounds), ()) = tokio::join!(async { tokio::join!(deploy, rounds) }, periodic);
    view.stop();
    deploy?;
    rounds?;
    Ok(())
}

/// Sleeps to each period boundary and runs a periodic round, until shutdown.
async fn periodic_rounds(
    ctx: &ServiceContext,
    view: &FollowerHandle<RotationView>,
    options: &RotationOptions,
    shutdown: &Shutdown,
) {
    if !options.periodic {
        shutdown.cancelled().await;
        return;
    }
    let period_ms = u64::try_from(options.epoch(&ctx.policy).as_millis())
        .unwrap_or(u64::MAX)
        .max(1);
    loop {
        let now_ms = u64::try_from(Utc::now().timestamp_millis()).unwrap_or(0);
        let wait = Duration::from_millis(period_ms - now_ms % period_ms);
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(wait) => {}
        }
        match run_round(ctx, view, options, Trigger::Periodic).await {
            Ok(report) => {
                tracing::debug!(outcome = ?report.outcome, epoch = report.epoch, "periodic round")
            }
            Err(e) => {
                tracing::warn!(error = %e, "periodic rotation round failed; retrying next period")
            }
        }
    }
}
