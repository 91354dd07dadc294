//! What an operator scrapes and probes: one small HTTP listener per service (on
//! `DEEPNODE_METRICS_ADDR`) serving `/metrics` (Prometheus text), `/healthz` (the process is alive)
//! and `/readyz` (Postgres answers, NATS is connected, the database is at the newest migration this
//! binary knows, and the checkpoints the service depends on lag the log's head by less than a bound).
//!
//! Metrics are recorded anywhere in the process through the `metrics` facade (the store, the bus
//! consumers and the services call `metrics::counter!` & co.); this module installs the Prometheus
//! recorder once per process ([`metrics_handle`]) when the listener is on, and renders it on request.
//! A background task keeps the lag gauges (`deepnode_projection_lag_events{projection}`,
//! `deepnode_relay_lag_events`) fresh and drains histogram samples into their buckets; with the
//! listener off no recorder is installed and the `metrics` macros do nothing.
//!
//! It deliberately does not decide what to count: each component names its own metrics
//! (`deepnode_*_total` counters, `deepnode_*_seconds` histograms), listed in [`describe`].

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use deepnode_store::EventStore;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use serde_json::{json, Value};
use tokio::net::TcpListener;

use crate::relay::RELAY_CHECKPOINT;
use crate::{ServiceContext, Shutdown};

/// The environment variable naming the listener's address.
pub const METRICS_ADDR_ENV: &str = "DEEPNODE_METRICS_ADDR";
/// Default listener address: an ephemeral loopback port (logged at start), so that tests and several
/// local copies never collide. Deployments set a fixed port (docker-compose: 9101–9103).
pub const DEFAULT_METRICS_ADDR: &str = "127.0.0.1:0";
/// The environment variable bounding the checkpoint lag `/readyz` accepts (events).
pub const READY_MAX_LAG_ENV: &str = "DEEPNODE_READY_MAX_LAG";
/// Default lag bound of `/readyz`, in events behind the log's head.
pub const DEFAULT_READY_MAX_LAG: i64 = 10_000;

/// Histogram buckets of every `*_seconds` metric (1 ms … 30 s).
const SECONDS_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];
/// Buckets of the group-commit batch size (events per commit).
const BATCH_BUCKETS: &[f64] = &[
    1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 2000.0,
];
/// Longest a readiness probe waits for one dependency.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// Why the listener could not be configured or started.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("binding the metrics listener on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// Where to listen and what readiness requires.
#[derive(Debug, Clone)]
pub struct ObservabilityOptions {
    /// The listener's address; `None` turns the listener (and the lag refresher) off.
    pub addr: Option<SocketAddr>,
    /// Largest accepted `head − checkpoint` of the gated checkpoints.
    pub max_lag: i64,
    /// Checkpoints (`projection_checkpoints.projection`) whose lag gates `/readyz`.
    pub gate_on: Vec<String>,
    /// How often the lag gauges are refreshed.
    pub refresh: Duration,
}

impl ObservabilityOptions {
    /// A listener on `addr`, readiness gated on `gate_on`, default bound and refresh.
    pub fn on(addr: SocketAddr, gate_on: &[&str]) -> ObservabilityOptions {
        ObservabilityOptions {
            addr: Some(addr),
            max_lag: DEFAULT_READY_MAX_LAG,
            gate_on: gate_on.iter().map(|s| (*s).to_owned()).collect(),
            refresh: Duration::from_secs(5),
        }
    }
}

/// The process-wide Prometheus recorder, installed on first use. If another recorder was installed
/// first (not done anywhere in deepnode), the handle renders nothing and a warning is logged.
pub fn metrics_handle() -> &'static PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE.get_or_init(|| {
        let builder = PrometheusBuilder::new()
            .set_buckets_for_metric(Matcher::Suffix("_seconds".to_owned()), SECONDS_BUCKETS)
            .and_then(|b| {
                b.set_buckets_for_metric(
                    Matcher::Full("deepnode_store_append_batch_events".to_owned()),
                    BATCH_BUCKETS,
                )
            })
            // Only fails on empty bucket lists, which the constants are not.
            .unwrap_or_else(|_| PrometheusBuilder::new());
        let recorder = builder.build_recorder();
        let handle = recorder.handle();
        if let Err(e) = metrics::set_global_recorder(recorder) {
            tracing::warn!(error = %e, "a metrics recorder was already installed; /metrics stays empty");
        } else {
            describe();
        }
        handle
    })
}

/// HELP lines for deepnode's metrics (what each one counts).
fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
    describe_counter!(
        "deepnode_exec_requests_total",
        "cmd.exec requests by outcome: charged, not_charged (recorded executions), replayed (a repeated request_id), or the error code"
    );
    describe_counter!(
        "deepnode_exec_attempts_total",
        "attempts dispatched to nodes, by node_id and outcome (success, error, timeout, invalid_output)"
    );
    describe_counter!(
        "deepnode_exec_fallbacks_total",
        "executions retried on the backup replica"
    );
    describe_counter!(
        "deepnode_exec_not_charged_total",
        "executions recorded as failed and not charged (ExecutionFailed)"
    );
    describe_histogram!(
        "deepnode_exec_latency_seconds",
        Unit::Seconds,
        "cmd.exec handling time, request to reply, by outcome"
    );
    describe_histogram!(
        "deepnode_store_append_seconds",
        Unit::Seconds,
        "one group-commit transaction of the event store, BEGIN to COMMIT"
    );
    describe_histogram!(
        "deepnode_store_append_batch_events",
        "events written by one group-commit transaction"
    );
    describe_counter!(
        "deepnode_store_appends_total",
        "append requests answered by the group-commit writer, by result (ok, rejected, failed)"
    );
    describe_gauge!(
        "deepnode_projection_lag_events",
        "log head position minus the projection's checkpoint"
    );
    describe_gauge!(
        "deepnode_relay_lag_events",
        "log head position minus the last position the relay published and had acked"
    );
    describe_gauge!(
        "deepnode_log_head_position",
        "position of the last committed event"
    );
    describe_counter!(
        "deepnode_jetstream_redeliveries_total",
        "JetStream messages delivered more than once, by consumer"
    );
    describe_counter!(
        "deepnode_rotation_moves_total",
        "replica moves applied by rotation rounds"
    );
    describe_counter!(
        "deepnode_rotation_phase_outs_total",
        "nodes phased out by rotation rounds"
    );
    describe_counter!(
        "deepnode_ejections_total",
        "nodes ejected by a scheduler's outlier detection, by node_id"
    );
}

/// The dependency checks behind `/readyz`.
#[derive(Clone)]
pub struct Readiness {
    store: EventStore,
    nats: async_nats::Client,
    max_lag: i64,
    gate_on: Vec<String>,
}

/// The answer of one readiness check.
#[derive(Debug, Clone)]
pub struct ReadyReport {
    /// True only if every check passed.
    pub ready: bool,
    /// The first failed check, in words (empty when ready).
    pub reason: String,
    /// Every check's result, as served by `/readyz`.
    pub body: Value,
}

impl Readiness {
    /// Checks over `ctx`'s pool and NATS client.
    pub fn new(ctx: &ServiceContext, max_lag: i64, gate_on: Vec<String>) -> Readiness {
        Readiness {
            store: ctx.store.clone(),
            nats: ctx.nats.clone(),
            max_lag,
            gate_on,
        }
    }

    /// Runs every check (Postgres, NATS, migrations, lag), each bounded by a short timeout.
    pub async fn check(&self) -> ReadyReport {
        let mut failures: Vec<String> = Vec::new();
        let mut checks = serde_json::Map::new();

        let postgres = bounded(self.store.ping()).await;
        checks.insert(
            "postgres".into(),
            verdict(&postgres, &mut failures, "postgres"),
        );

        let state = self.nats.connection_state();
        let nats = if state == async_nats::connection::State::Connected {
            Ok(())
        } else {
            Err(format!("NATS connection is {state:?}"))
        };
        checks.insert("nats".into(), verdict(&nats, &mut failures, "nats"));

        let latest = deepnode_store::latest_known_version();
        let migrations =
            match postgres {
                Err(_) => Err("not checked: Postgres is unreachable".to_owned()),
                Ok(()) => bounded(self.store.applied_migration())
                    .await
                    .and_then(|applied| match applied {
                        v if v == latest => Ok(()),
                        v => Err(format!(
                            "database at migration V{v}, this binary expects V{latest}"
                        )),
                    }),
            };
        checks.insert(
            "migrations".into(),
            verdict(&migrations, &mut failures, "migrations"),
        );

        let lag = match (&postgres, self.gate_on.is_empty()) {
            (_, true) => Ok(BTreeMap::new()),
            (Err(_), false) => Err("not checked: Postgres is unreachable".to_owned()),
            (Ok(_), false) => bounded(self.store.lags()).await.and_then(|(head, all)| {
                let gated: BTreeMap<String, i64> = self
                    .gate_on
                    .iter()
                    .map(|name| {
                        // A checkpoint that has never been written is as far behind as the log.
                        (name.clone(), all.get(name).copied().unwrap_or(head))
                    })
                    .collect();
                match gated.iter().find(|(_, lag)| **lag > self.max_lag) {
                    Some((name, lag)) => Err(format!(
                        "{name} is {lag} events behind the log (bound {})",
                        self.max_lag
                    )),
                    None => Ok(gated),
                }
            }),
        };
        let lag_value = match &lag {
            Ok(gated) => json!({"ok": true, "lag": gated, "max_lag": self.max_lag}),
            Err(e) => json!({"ok": false, "error": e, "max_lag": self.max_lag}),
        };
        if let Err(e) = &lag {
            failures.push(format!("lag: {e}"));
        }
        checks.insert("lag".into(), lag_value);

        let ready = failures.is_empty();
        let reason = failures.join("; ");
        let body = if ready {
            json!({"ready": true, "checks": checks})
        } else {
            json!({"ready": false, "reason": reason, "checks": checks})
        };
        ReadyReport {
            ready,
            reason,
            body,
        }
    }
}

fn verdict<T>(result: &Result<T, String>, failures: &mut Vec<String>, name: &str) -> Value {
    match result {
        Ok(_) => json!({"ok": true}),
        Err(e) => {
            failures.push(format!("{name}: {e}"));
            json!({"ok": false, "error": e})
        }
    }
}

async fn bounded<T, E: std::fmt::Display>(
    fut: impl std::future::Future<Output = Result<T, E>>,
) -> Result<T, String> {
    match tokio::time::timeout(PROBE_TIMEOUT, fut).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err(format!("no answer within {PROBE_TIMEOUT:?}")),
    }
}

/// A running listener.
#[derive(Debug, Clone, Copy)]
pub struct Observability {
    /// The bound address (`None` when turned off).
    pub local_addr: Option<SocketAddr>,
}

/// Unless `options.addr` is `None`, installs the recorder, serves `/metrics`, `/healthz` and
/// `/readyz` on that address and refreshes the lag gauges (draining histogram samples), until
/// `shutdown` fires.
///
/// With the listener off nothing is recorded: a recorder that no one renders or upkeeps would keep
/// every histogram sample — one per execution and one per commit, for the life of the process.
pub async fn start(
    ctx: &ServiceContext,
    options: ObservabilityOptions,
    shutdown: Shutdown,
) -> Result<Observability, Error> {
    let Some(addr) = options.addr else {
        tracing::info!("metrics listener off ({METRICS_ADDR_ENV}=off): nothing is recorded");
        return Ok(Observability { local_addr: None });
    };
    let handle = metrics_handle();
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|source| Error::Bind { addr, source })?;
    let local = listener
        .local_addr()
        .map_err(|source| Error::Bind { addr, source })?;
    tracing::info!(addr = %local, "serving /metrics, /healthz and /readyz");

    tokio::spawn(refresh_lag(
        ctx.store.clone(),
        handle.clone(),
        options.refresh,
        shutdown.clone(),
    ));
    let state = Arc::new(State {
        handle: handle.clone(),
        readiness: Readiness::new(ctx, options.max_lag, options.gate_on),
    });
    tokio::spawn(accept(listener, state, shutdown));
    Ok(Observability {
        local_addr: Some(local),
    })
}

struct State {
    handle: PrometheusHandle,
    readiness: Readiness,
}

async fn accept(listener: TcpListener, state: Arc<State>, shutdown: Shutdown) {
    loop {
        let stream = tokio::select! {
            () = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!(error = %e, "metrics listener accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let state = state.clone();
        tokio::spawn(async move {
            let service = service_fn(move |request| {
                let state = state.clone();
                async move { Ok::<_, Infallible>(route(&state, request).await) }
            });
            if let Err(e) = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await
            {
                tracing::debug!(error = %e, "metrics connection ended with an error");
            }
        });
    }
}

async fn route(state: &State, request: Request<Incoming>) -> Response<Full<Bytes>> {
    if request.method() != Method::GET {
        return respond(StatusCode::METHOD_NOT_ALLOWED, "text/plain", "GET only\n");
    }
    match request.uri().path() {
        "/metrics" => respond(
            StatusCode::OK,
            "text/plain; version=0.0.4; charset=utf-8",
            state.handle.render(),
        ),
        "/healthz" => respond(
            StatusCode::OK,
            "application/json",
            json!({"alive": true}).to_string(),
        ),
        "/readyz" => {
            let report = state.readiness.check().await;
            if !report.ready {
                tracing::debug!(reason = %report.reason, "not ready");
            }
            let status = if report.ready {
                StatusCode::OK
            } else {
                StatusCode::SERVICE_UNAVAILABLE
            };
            respond(status, "application/json", report.body.to_string())
        }
        _ => respond(
            StatusCode::NOT_FOUND,
            "text/plain",
            "not found: try /metrics, /healthz or /readyz\n",
        ),
    }
}

fn respond(
    status: StatusCode,
    content_type: &str,
    body: impl Into<Bytes>,
) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(body.into()));
    *response.status_mut() = status;
    if let Ok(value) = hyper::header::HeaderValue::from_str(content_type) {
        response
            .headers_mut()
            .insert(hyper::header::CONTENT_TYPE, value);
    }
    response
}

/// Refreshes the lag gauges (and drains histogram buffers) every `every`, until shutdown.
async fn refresh_lag(
    store: EventStore,
    handle: PrometheusHandle,
    every: Duration,
    shutdown: Shutdown,
) {
    loop {
        match bounded(store.lags()).await {
            Ok((head, all)) => {
                metrics::gauge!("deepnode_log_head_position").set(head as f64);
                for (name, lag) in all {
                    if name == RELAY_CHECKPOINT {
                        metrics::gauge!("deepnode_relay_lag_events").set(lag as f64);
                    } else {
                        metrics::gauge!("deepnode_projection_lag_events", "projection" => name)
                            .set(lag as f64);
                    }
                }
            }
            Err(e) => tracing::debug!(error = %e, "could not read checkpoint lag"),
        }
        handle.run_upkeep();
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(every) => {}
        }
    }
}
