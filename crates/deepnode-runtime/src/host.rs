//! The life of a service binary, written once: read its settings ([`ServiceArgs`]), connect (migrating the
//! database), start the metrics/health listener and the outbox relay, run the service until
//! SIGINT/SIGTERM, then stop the relay, drain NATS and close the pool.
//!
//! Exit codes: 0 after a clean stop, 2 when start-up fails (one line: what was being done and the
//! root cause), 1 when the service itself stops with an error.

use std::fmt::Display;
use std::future::Future;
use std::process::ExitCode;

use deepnode_domain::note::NoteSigner;

use crate::observability;
use crate::relay::{self, RelayOptions, RELAY_CHECKPOINT};
use crate::settings::{ServiceArgs, Switch};
use crate::{tail, telemetry, ServiceContext, Shutdown};

/// How long the process's shared log reader lets commits gather after one notifies it before it
/// reads them all (a `wait_for` cuts it short): events reach the process's view, projection and
/// relay at most this much after their commit. 100 ms rather than the in-process views' 50: at 100
/// executions a second it took the database from 1.8 to 1.5 transactions per execution and the
/// deployment's CPU by ~5 % (docs/BENCHMARKS-system.md, "One reader per process").
const SHARED_READER_LINGER: std::time::Duration = std::time::Duration::from_millis(100);

/// How often the process's shared log reader reads without a notification (the safety net for a
/// lost one).
const SHARED_READER_POLL: std::time::Duration = std::time::Duration::from_secs(1);

/// Events the shared reader's tail keeps for the process's slower readers (the projection writes
/// between reads): five of its reads at 1,000 executions a second, two or three at saturation; a
/// reader further behind reads the database. Each held event is a few KiB of decoded JSON: 4,096
/// of them added ~25 MiB to every service (docs/BENCHMARKS-system.md, "One reader per process").
const SHARED_READER_CAPACITY: usize = 1_024;

/// What distinguishes one service binary from another.
pub struct ServiceSpec {
    /// The binary's name (e.g. `deepnode-scheduler`): prefixed to its error lines, and the
    /// `metadata.producer` of every event it appends — one convention for every service.
    pub binary: &'static str,
    /// Checkpoints besides the relay's whose lag gates `/readyz`.
    pub gated_checkpoints: &'static [&'static str],
    /// Whether the service signs with the log's key: only then is `DEEPNODE_LOG_KEY` read.
    pub signs: bool,
}

/// Runs a service binary's whole life; `service` is the library's `run`, given the context, the
/// log's signing key (when the service signs and one is set) and the shutdown signal.
pub async fn run_service<F, Fut, E>(spec: ServiceSpec, service: F) -> ExitCode
where
    F: FnOnce(ServiceContext, Option<NoteSigner>, Shutdown) -> Fut,
    Fut: Future<Output = Result<(), E>>,
    E: Display,
{
    let args = match ServiceArgs::from_process(spec.binary, spec.signs) {
        Ok(args) => args,
        Err(e) if !e.use_stderr() => {
            // --help and --version: print them whole and succeed.
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            let reason = e.to_string();
            let reason = reason.lines().next().unwrap_or_default();
            eprintln!("{}: reading the settings: {reason}", spec.binary);
            return ExitCode::from(2);
        }
    };
    telemetry::init(spec.binary, args.log_format);
    let started = async {
        let settings = args
            .settings()
            .map_err(|e| format!("reading the settings: {e}"))?;
        let log_key = match spec.signs {
            true => args.log_key()?,
            false => None,
        };
        let mut gated = vec![RELAY_CHECKPOINT];
        gated.extend_from_slice(spec.gated_checkpoints);
        let observe = args.observability(&gated);
        let ctx = ServiceContext::connect(&settings, spec.binary, settings.subjects.clone())
            .await
            .map_err(|e| format!("starting: {e}"))?;
        Ok::<_, String>((ctx, observe, settings, log_key))
    };
    let (mut ctx, observe, settings, log_key) = match started.await {
        Ok(started) => started,
        Err(line) => {
            eprintln!("{}: {line}", spec.binary);
            return ExitCode::from(2);
        }
    };
    let shutdown = crate::shutdown::on_signals();
    // `DEEPNODE_LOG_TAIL=on`: the process's tail of the log, fed from the bus before anything
    // follows the log, so its followers and projection read no database per commit. Off by default:
    // measured, it cuts the database's transactions per execution by a third more but came with
    // periodic 100-250 ms stalls of the exec p99 at 100/s whose cause is not found yet
    // (docs/BENCHMARKS-system.md).
    let feeder = if args.log_tail == Switch::Off {
        // The default: one reader of the log for the whole process (its view, projection and
        // relay share each read, and one LISTEN connection).
        match ctx
            .store
            .clone()
            .with_shared_reader(
                SHARED_READER_LINGER,
                SHARED_READER_POLL,
                SHARED_READER_CAPACITY,
            )
            .await
        {
            Ok(store) => ctx.store = store,
            Err(e) => {
                eprintln!("{}: starting the log reader: {e}", spec.binary);
                return ExitCode::from(2);
            }
        }
        None
    } else {
        let log_tail = deepnode_store::LogTail::new(tail::TAIL_CAPACITY);
        // Its own connection: the log's traffic never queues ahead of requests and replies.
        let feed_connection = format!("{}-tail", spec.binary);
        let bus = match deepnode_bus::connect::connect(&settings.nats_url, &feed_connection).await {
            Ok(bus) => bus,
            Err(e) => {
                eprintln!("{}: connecting the log tail to NATS: {e}", spec.binary);
                return ExitCode::from(2);
            }
        };
        match tail::feed(&bus, &ctx.subjects, log_tail.clone(), shutdown.clone()).await {
            Ok(feeder) => {
                ctx.store = ctx.store.with_tail(log_tail);
                Some(feeder)
            }
            Err(e) => {
                eprintln!("{}: subscribing to the events subjects: {e}", spec.binary);
                return ExitCode::from(2);
            }
        }
    };
    if let Err(e) = observability::start(&ctx, observe, shutdown.clone()).await {
        eprintln!("{}: starting the metrics listener: {e}", spec.binary);
        return ExitCode::from(2);
    }
    let relay = tokio::spawn(relay::run(
        ctx.store.clone(),
        ctx.js.clone(),
        ctx.subjects.clone(),
        RelayOptions {
            lease_retry: settings
                .relay_lease_retry
                .unwrap_or(RelayOptions::default().lease_retry),
            ..RelayOptions::default()
        },
        shutdown.clone(),
    ));
    let (nats, pool) = (ctx.nats.clone(), ctx.store.pool().clone());
    let result = service(ctx, log_key, shutdown.clone()).await;
    shutdown.cancel();
    if let Some(feeder) = feeder {
        feeder.abort();
    }
    if let Err(e) = relay.await {
        tracing::warn!(error = %e, "relay task failed");
    }
    if let Err(e) = nats.drain().await {
        tracing::warn!(error = %e, "draining NATS failed");
    }
    pool.close().await;
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{}: {e}", spec.binary);
            ExitCode::FAILURE
        }
    }
}
