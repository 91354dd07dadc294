//! `deepnode up` (CONTRACT §6), the live demo and the README's first command. In order: reach
//! Postgres (migrating it) and NATS — or exit 2 telling the user to run `scripts/dev-services.sh up`;
//! start `deepnode-reputation`, `deepnode-rotation` and `deepnode-scheduler` as child processes (from
//! the directory of this executable, logs under `--log-dir/<run>/`) and wait until each answers on
//! its command subject; start a simulated fleet in this process (three nodes deliberately bad: one
//! never answers, one answers garbage, one errors often) registered through `cmd.node.register`;
//! deploy `--models` models through `cmd.model.deploy`; then drive `cmd.exec` traffic at `--rate`,
//! ask for a rotation round every `--rotation-every`, and show the live view until Ctrl-C or
//! `--duration`. Stopping is ordered: traffic, the projection catching up, the fleet, SIGTERM to the
//! services (bounded wait, then kill); then a summary and the SQL an admin would run next.
//!
//! Running it twice against the same database is fine: the nodes' registrations and the models'
//! deployments answer `conflict` the second time and are reused; request ids carry the run's
//! timestamp. It does not start Postgres or NATS itself (that is `scripts/dev-services.sh`).

mod children;
mod decisions;
mod traffic;
mod view;

use std::io::IsTerminal as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context as _};
use deepnode_bus::async_nats::Client;
use deepnode_bus::envelope::{ErrorCode, Reply};
use deepnode_bus::{rpc, Subjects};
use deepnode_domain::ids::NodeId;
use deepnode_domain::note::NoteSigner;
use deepnode_runtime::Shutdown;
use deepnode_sim::{Behaviour, Latency, Sim, SimConfig, SimNode};
use deepnode_store::EventStore;
use serde_json::{json, Value};
use sqlx::PgPool;
use tokio::time::Instant;

use super::Outcome;
use crate::cli::{Cli, UpArgs};
use crate::context;
use children::Services;
use traffic::SharedStats;
use view::{Frame, Labels};

/// How long the services get to answer on their subjects after start (the scheduler first catches
/// up with the whole log).
const SERVICES_READY_WITHIN: Duration = Duration::from_secs(90);
/// How long the services get to drain after SIGTERM before they are killed.
const STOP_GRACE: Duration = Duration::from_secs(20);
/// Names of the demo's models; more than these are `model-<n>`.
const MODEL_NAMES: [&str; 6] = [
    "llama-3-8b",
    "mistral-7b",
    "phi-3-mini",
    "qwen-2-7b",
    "gemma-2-9b",
    "whisper-small",
];
/// The demo's domain.
const DOMAIN: &str = "text";
/// A small second domain served only by two flaky nodes, so the demo also shows requests whose
/// primary and backup both fail: answered `all_replicas_failed` and not charged.
const EDGE_DOMAIN: &str = "edge";
/// The model deployed on the edge pair.
const EDGE_MODEL: &str = "edge-asr";

/// Runs the demo.
pub async fn run(cli: &Cli, args: &UpArgs) -> anyhow::Result<Outcome> {
    let hint = "is it running? start it with `scripts/dev-services.sh up`";
    let store = context::connect(cli)
        .await
        .with_context(|| format!("Postgres unreachable ({hint})"))?;
    let client = context::connect_nats(cli, "deepnode-up")
        .await
        .with_context(|| format!("NATS unreachable ({hint})"))?;
    let bin_dir = children::locate()?;

    let run_id = chrono::Utc::now().format("%Y%m%dT%H%M%S").to_string();
    let run_dir = args.log_dir.join(&run_id);
    std::fs::create_dir_all(&run_dir)
        .with_context(|| format!("creating the run directory {}", run_dir.display()))?;
    let start_position = store
        .head_position()
        .await
        .context("reading the log's head")?;
    let shutdown = deepnode_runtime::shutdown::on_signals();

    say(&format!(
        "deepnode up: database {}, NATS {}, service logs in {}/",
        context::redact(&cli.database_url),
        cli.nats_url,
        run_dir.display()
    ));
    let mut env = vec![
        ("DATABASE_URL", cli.database_url.clone()),
        ("NATS_URL", cli.nats_url.clone()),
    ];
    let policy = match &cli.config {
        Some(config) => std::fs::canonicalize(config)
            .with_context(|| format!("DEEPNODE_CONFIG {}", config.display()))?,
        None => {
            // The demo policy: the same rules, time compressed (deploy/demo.toml).
            let path = std::fs::canonicalize(&run_dir)?.join("demo.toml");
            std::fs::write(&path, DEMO_POLICY)
                .with_context(|| format!("writing {}", path.display()))?;
            path
        }
    };
    say(&format!("deepnode up: policy {}", policy.display()));
    env.push(("DEEPNODE_CONFIG", policy.display().to_string()));
    let log_key = demo_log_key(&args.log_dir, &mut env)?;
    // The scheduler's metrics on a port we know, for the live view's queue figures.
    let scheduler_metrics =
        free_local_addr().context("finding a free port for the scheduler's metrics")?;
    let own = [(
        "deepnode-scheduler",
        deepnode_runtime::observability::METRICS_ADDR_ENV,
        scheduler_metrics.to_string(),
    )];
    let mut services = children::start(&bin_dir, &run_dir, &env, &own).await?;
    let demo = Demo {
        cli,
        args,
        store,
        client,
        subjects: Subjects::new(),
        run_id,
        run_dir,
        start_position,
        scheduler_metrics,
        policy,
        log_key,
        shutdown,
    };
    let result = demo.run(&mut services).await;
    if result.is_err() {
        // The run failed before its own orderly stop: stop the services all the same.
        for line in services.stop(STOP_GRACE).await {
            say(&format!("  {line}"));
        }
    }
    result
}

/// Everything one run needs.
struct Demo<'a> {
    cli: &'a Cli,
    args: &'a UpArgs,
    store: EventStore,
    client: Client,
    subjects: Subjects,
    run_id: String,
    run_dir: PathBuf,
    start_position: i64,
    /// Where the scheduler serves `/metrics`.
    scheduler_metrics: std::net::SocketAddr,
    /// The policy file the services run on (for the summary's `audit`).
    policy: PathBuf,
    /// The public key the services sign with (for the summary's `verify`).
    log_key: String,
    shutdown: Shutdown,
}

/// What happened, gathered for the summary.
struct Ending {
    stats: traffic::Stats,
    ran_for: Duration,
    reason: &'static str,
    nodes: Vec<deepnode_domain::book::NodeRow>,
    executions: Vec<(bool, String, i64)>,
    rotations: i64,
    rounds_asked: u64,
    moves: u64,
    /// The run's decisions, from the log.
    tally: decisions::Tally,
    services: Vec<String>,
}

impl Demo<'_> {
    async fn run(&self, services: &mut Services) -> anyhow::Result<Outcome> {
        self.wait_for_services(services).await?;
        let (fleet, labels) = self.fleet()?;
        say(&format!(
            "starting {} simulated nodes (3 deliberately bad, 2 flaky on the edge) and registering them",
            fleet.nodes.len()
        ));
        let sim = Sim::start(self.client.clone(), self.subjects.clone(), fleet)
            .await
            .context("starting the simulated nodes")?;
        self.wait_for_registrations(&labels).await;
        let models = self.deploy_models().await?;

        let stats = traffic::shared()?;
        let stop_traffic = Shutdown::new();
        let plan = traffic::Plan {
            subject: self.subjects.cmd_exec(),
            models: models.clone(),
            id_prefix: format!("up-{}", self.run_id),
            rate: self.args.rate,
            concurrency: self.args.concurrency,
            timeout_ms: self.args.timeout_ms,
        };
        say(&format!(
            "driving {} exec/s over {} models (at most {} in flight, {} ms per attempt); {}",
            self.args.rate,
            models.len(),
            self.args.concurrency,
            self.args.timeout_ms,
            match self.args.duration {
                Some(d) => format!("stopping after {}s", d.as_secs()),
                None => "Ctrl-C stops".to_owned(),
            }
        ));
        let generator = tokio::spawn(traffic::drive(
            self.client.clone(),
            plan,
            stats.clone(),
            stop_traffic.clone(),
        ));
        let started = Instant::now();
        let (reason, rounds_asked, moves) = self
            .watch(services, &stats, &labels, &models, started)
            .await;
        let ran_for = started.elapsed();

        say(&format!("stopping ({reason}): traffic first"));
        stop_traffic.cancel();
        if let Err(e) = generator.await {
            say(&format!("  the traffic generator failed: {e}"));
        }
        let stats = traffic::snapshot(&stats);
        self.wait_for_projection(&stats).await;
        let pool = self.store.pool();
        let nodes = view::nodes(pool, &labels).await.unwrap_or_default();
        let executions = self.executions(pool).await.unwrap_or_default();
        let rotations = view::rotations(pool, self.start_position)
            .await
            .unwrap_or(0);
        let tally = decisions::Tally::read(pool, self.start_position)
            .await
            .unwrap_or_else(|e| {
                say(&format!("  {e}"));
                decisions::Tally::default()
            });
        say("stopping the simulated nodes");
        sim.stop().await;
        say("stopping the services (SIGTERM, then waiting)");
        let services = services.stop(STOP_GRACE).await;
        if let Err(e) = self.client.drain().await {
            say(&format!("  draining NATS: {e}"));
        }
        let ending = Ending {
            stats,
            ran_for,
            reason,
            nodes,
            executions,
            rotations,
            rounds_asked,
            moves,
            tally,
            services,
        };
        self.summary(&ending, &labels, &models);
        Ok(Outcome::Clean)
    }

    /// Waits until each service answers on one of its subjects (an empty command is refused with
    /// `bad_request` and appends nothing), failing early if a child exits.
    async fn wait_for_services(&self, services: &mut Services) -> anyhow::Result<()> {
        let probes = [
            ("deepnode-reputation", self.subjects.cmd_node_register()),
            ("deepnode-rotation", self.subjects.cmd_model_deploy()),
            ("deepnode-scheduler", self.subjects.cmd_schedule()),
        ];
        let deadline = Instant::now() + SERVICES_READY_WITHIN;
        for (name, subject) in probes {
            loop {
                if let Some(exited) = services.exited() {
                    bail!("{exited}");
                }
                if self.shutdown.is_cancelled() {
                    bail!("interrupted while waiting for {name}");
                }
                let probe =
                    rpc::request_json(&self.client, &subject, &json!({}), Duration::from_secs(1))
                        .await;
                if probe.is_ok() {
                    say(&format!("  {name} answers on {subject}"));
                    break;
                }
                if Instant::now() > deadline {
                    bail!(
                        "{name} did not answer on {subject} within {}s (see its log in {})",
                        SERVICES_READY_WITHIN.as_secs(),
                        self.run_dir.display()
                    );
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
        Ok(())
    }

    /// The fleet: healthy nodes with varied latency and stake, and three bad ones.
    fn fleet(&self) -> anyhow::Result<(SimConfig, Labels)> {
        let count = self.args.nodes;
        let mut nodes = Vec::new();
        let mut labels = Labels::new();
        for i in 1..=count {
            let id = format!("node-{i:02}");
            let node_id = NodeId::parse(&id).context("building a node id")?;
            let (behaviour, label) = match bad_slot(count, i) {
                Some(0) => (Behaviour::always_timeout(), "bad: never answers".to_owned()),
                Some(1) => (
                    Behaviour::always_invalid(),
                    "bad: answers garbage".to_owned(),
                ),
                Some(_) => (
                    Behaviour {
                        error_rate: 0.35,
                        ..Behaviour::healthy(lognormal(20))
                    },
                    "bad: errors 35 %".to_owned(),
                ),
                None => {
                    let median = 5 + u64::from(i * 7 % 30);
                    (
                        Behaviour::healthy(lognormal(median)),
                        format!("healthy, ~{median} ms"),
                    )
                }
            };
            let mut node = SimNode::new(node_id, DOMAIN).with_behaviour(behaviour);
            node.stake = f64::from(50 + 25 * (i % 5));
            node.capacity = 64;
            nodes.push(node);
            labels.insert(id, label);
        }
        for i in 1..=2 {
            let id = format!("edge-{i:02}");
            let behaviour = Behaviour {
                // Often enough that both replicas fail now and then, not so often that the
                // downtime rule (success ratio < 0.5) jails the pair.
                error_rate: 0.3,
                ..Behaviour::healthy(lognormal(15))
            };
            let mut node = SimNode::new(
                NodeId::parse(&id).context("building a node id")?,
                EDGE_DOMAIN,
            )
            .with_behaviour(behaviour);
            node.capacity = 64;
            nodes.push(node);
            labels.insert(id, "flaky edge: errors 30 %".to_owned());
        }
        let config = SimConfig {
            nodes,
            seed: 42,
            register: true,
            ..SimConfig::default()
        };
        Ok((config, labels))
    }

    /// Waits (bounded) until `node_reputation` shows every demo node, so the view has rows.
    async fn wait_for_registrations(&self, labels: &Labels) {
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline {
            match view::nodes(self.store.pool(), labels).await {
                Ok(rows) if rows.len() == labels.len() => {
                    say(&format!(
                        "  {} nodes registered (node_reputation)",
                        rows.len()
                    ));
                    return;
                }
                _ => tokio::time::sleep(Duration::from_millis(200)).await,
            }
        }
        say("  node_reputation does not show every node yet; continuing");
    }

    /// Deploys the demo's models; `conflict` (deployed by an earlier run) means reuse it.
    async fn deploy_models(&self) -> anyhow::Result<Vec<String>> {
        let mut models = Vec::new();
        let main = (0..self.args.models as usize).map(|i| {
            let model = MODEL_NAMES
                .get(i)
                .map(|m| (*m).to_owned())
                .unwrap_or_else(|| format!("model-{}", i + 1));
            (model, DOMAIN, self.args.replicas)
        });
        for (model, domain, replicas) in main.chain([(EDGE_MODEL.to_owned(), EDGE_DOMAIN, 2)]) {
            let body = json!({"model_id": model, "domain": domain, "replicas": replicas});
            let deadline = Instant::now() + Duration::from_secs(20);
            loop {
                let reply = rpc::request_json(
                    &self.client,
                    &self.subjects.cmd_model_deploy(),
                    &body,
                    Duration::from_secs(10),
                )
                .await
                .map(Reply::from_value);
                let retry = match reply {
                    Ok(Ok(Reply::Ok(fields))) => {
                        say(&format!("  deployed {model}: {}", assignments(&fields)));
                        break;
                    }
                    Ok(Ok(Reply::Err { error, .. })) if error.code == ErrorCode::Conflict => {
                        say(&format!("  {model} already deployed; reusing it"));
                        break;
                    }
                    Ok(Ok(Reply::Err { error, .. }))
                        if matches!(
                            error.code,
                            ErrorCode::NoEligibleNodes | ErrorCode::Unavailable
                        ) =>
                    {
                        error.message
                    }
                    Ok(Ok(Reply::Err { error, .. })) => {
                        bail!("deploying {model}: {}: {}", error.code, error.message)
                    }
                    Ok(Err(e)) => bail!("deploying {model}: unreadable reply: {e}"),
                    Err(e) => e.to_string(),
                };
                if Instant::now() > deadline {
                    bail!("deploying {model}: {retry}");
                }
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
            models.push(model);
        }
        Ok(models)
    }

    /// Shows the view until a signal, the duration, or a service exiting; asks for rotation rounds
    /// meanwhile. Returns why it stopped, the rounds asked for and the moves they made.
    async fn watch(
        &self,
        services: &mut Services,
        stats: &SharedStats,
        labels: &Labels,
        models: &[String],
        started: Instant,
    ) -> (&'static str, u64, u64) {
        let live = self.args.duration.is_none() && std::io::stdout().is_terminal();
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut next_round = started + self.args.rotation_every;
        let (mut rounds, mut moves) = (0u64, 0u64);
        let mut last_answered = 0u64;
        let mut last_at = started;
        let mut ticks = 0u64;
        // Headless, each decision is printed once, as it appears in the log.
        let mut printed = self.start_position;
        loop {
            let until = async {
                match self.args.duration {
                    Some(d) => tokio::time::sleep_until(started + d).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                () = self.shutdown.cancelled() => return ("Ctrl-C", rounds, moves),
                () = until => return ("duration reached", rounds, moves),
                _ = tick.tick() => {}
            }
            if let Some(exited) = services.exited() {
                say(&format!("a service stopped unexpectedly: {exited}"));
                return ("a service exited", rounds, moves);
            }
            if Instant::now() >= next_round {
                next_round += self.args.rotation_every;
                rounds += 1;
                moves += self.rotation_round().await;
            }
            let elapsed = started.elapsed();
            let stats = traffic::snapshot(stats);
            let now = Instant::now();
            let answered = stats.answered() + stats.unanswered;
            let per_sec = (answered - last_answered.min(answered)) as f64
                / now.duration_since(last_at).as_secs_f64().max(0.001);
            (last_answered, last_at) = (answered, now);
            ticks += 1;
            let headless_due = ticks.is_multiple_of(5);
            if !live && !headless_due {
                continue;
            }
            let (after, limit) = if live {
                (self.start_position, view::DECISIONS_SHOWN)
            } else {
                (printed, 500)
            };
            let frame = self
                .frame(elapsed, per_sec, stats, labels, models, (after, limit))
                .await;
            if live {
                view::draw(&frame, labels);
            } else {
                say(&view::line(&frame));
                for d in &frame.decisions {
                    say(&format!("  decision  {}", d.line()));
                    printed = d.position;
                }
            }
        }
    }

    async fn frame(
        &self,
        elapsed: Duration,
        answered_per_sec: f64,
        stats: traffic::Stats,
        labels: &Labels,
        models: &[String],
        (decisions_after, decisions_limit): (i64, i64),
    ) -> Frame {
        let pool = self.store.pool();
        let mut notes = Vec::new();
        let decisions = decisions::read(pool, decisions_after, Some(decisions_limit))
            .await
            .unwrap_or_else(|e| {
                notes.push(e);
                Vec::new()
            });
        let nodes = view::nodes(pool, labels).await.unwrap_or_else(|e| {
            notes.push(e);
            Vec::new()
        });
        let rotations = view::rotations(pool, self.start_position)
            .await
            .unwrap_or_else(|e| {
                notes.push(e);
                0
            });
        let deployments = view::deployments(pool, models).await.unwrap_or_else(|e| {
            notes.push(e);
            0
        });
        let queue = view::queue(self.scheduler_metrics)
            .await
            .map_err(|e| notes.push(e))
            .ok();
        Frame {
            elapsed,
            answered_per_sec,
            stats,
            nodes,
            rotations,
            deployments,
            queue,
            decisions,
            note: (!notes.is_empty()).then(|| notes.join("; ")),
        }
    }

    /// Asks for one rotation round; returns the moves it made (0 if refused or busy).
    async fn rotation_round(&self) -> u64 {
        let reply = rpc::request_json(
            &self.client,
            &self.subjects.cmd_rotation_run(),
            &json!({}),
            Duration::from_secs(15),
        )
        .await;
        match reply {
            Ok(value) if value.get("ok").and_then(Value::as_bool) == Some(true) => value
                .get("moves")
                .and_then(Value::as_array)
                .map_or(0, |m| m.len() as u64),
            _ => 0,
        }
    }

    /// Waits (bounded) until the `executions` projection has settled every answered request of
    /// this run, so the summary's SQL figures are complete.
    async fn wait_for_projection(&self, stats: &traffic::Stats) {
        let target = i64::try_from(stats.succeeded + stats.not_charged).unwrap_or(i64::MAX);
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline {
            let settled: Result<i64, _> = sqlx::query_scalar(
                "SELECT count(*) FROM executions WHERE request_id LIKE $1 AND status <> 'in_flight'",
            )
            .bind(format!("up-{}-%", self.run_id))
            .fetch_one(self.store.pool())
            .await;
            match settled {
                Ok(n) if n >= target => return,
                _ => tokio::time::sleep(Duration::from_millis(200)).await,
            }
        }
    }

    /// This run's rows of `executions`, grouped by `(charged, status)`.
    async fn executions(&self, pool: &PgPool) -> Result<Vec<(bool, String, i64)>, sqlx::Error> {
        sqlx::query_as(
            "SELECT charged, status, count(*) FROM executions WHERE request_id LIKE $1 GROUP BY 1, 2 ORDER BY 1 DESC, 2",
        )
        .bind(format!("up-{}-%", self.run_id))
        .fetch_all(pool)
        .await
    }

    fn summary(&self, e: &Ending, labels: &Labels, models: &[String]) {
        let s = &e.stats;
        println!();
        println!(
            "deepnode up: summary ({}, traffic ran {:.1}s)",
            e.reason,
            e.ran_for.as_secs_f64()
        );
        println!(
            "  requests sent          {:>8}   ({:.0}/s; {} shed at the concurrency limit)",
            s.sent,
            s.sent as f64 / e.ran_for.as_secs_f64().max(0.001),
            s.shed
        );
        println!(
            "  answered               {:>8}   (unanswered: {})",
            s.answered(),
            s.unanswered
        );
        println!(
            "  succeeded, charged     {:>8}   ({:.1} %), of which served by the backup: {}",
            s.succeeded,
            view::percent(s.succeeded, s.answered()),
            s.fallbacks
        );
        println!(
            "  failed, not charged    {:>8}   (all_replicas_failed)",
            s.not_charged
        );
        println!(
            "  other errors           {:>8}   ({})",
            s.other_errors.values().sum::<u64>(),
            s.other_errors_text()
        );
        println!(
            "  latency                p50 {:.1} ms, p90 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
            s.quantile_ms(0.5),
            s.quantile_ms(0.9),
            s.quantile_ms(0.99),
            s.quantile_ms(1.0)
        );
        let executions: Vec<String> = e
            .executions
            .iter()
            .map(|(charged, status, n)| {
                format!(
                    "{status} {} {n}",
                    if *charged { "charged" } else { "not charged" }
                )
            })
            .collect();
        println!(
            "  executions table       {}",
            if executions.is_empty() {
                "(no rows for this run)".to_owned()
            } else {
                executions.join(", ")
            }
        );
        println!(
            "  rotation               {} rounds asked for, {} moves; RotationCompleted events this run: {}",
            e.rounds_asked, e.moves, e.rotations
        );
        println!("  nodes (node_reputation, best first):");
        println!(
            "    {:<10} {:>6} {:<12} {:>7} {:>6} {:>8} {:>7}  BEHAVIOUR",
            "NODE", "SCORE", "STATUS", "SUCCESS", "ERRORS", "TIMEOUTS", "INVALID"
        );
        for r in &e.nodes {
            println!(
                "    {:<10} {:>6.3} {:<12} {:>7} {:>6} {:>8} {:>7}  {}",
                r.node_id,
                r.score,
                r.status,
                r.successes,
                r.errors,
                r.timeouts,
                r.invalid_outputs,
                labels.get(&r.node_id).map(String::as_str).unwrap_or("")
            );
        }
        self.decisions_summary(e, labels);
        println!("  services: {}", e.services.join("; "));
        println!("  logs: {}/", self.run_dir.display());
        let url = &self.cli.database_url;
        let run = &self.run_id;
        let model_list = models
            .iter()
            .map(|m| format!("'{m}'"))
            .collect::<Vec<_>>()
            .join(",");
        println!();
        println!("next, as an admin (read-only projections; the log is `events`):");
        println!("  psql '{url}' -c \"SELECT node_id, status, round(score::numeric, 3) AS score, successes, errors, timeouts, invalid_outputs, slashed_amount FROM node_reputation ORDER BY score DESC\"");
        println!("  psql '{url}' -c \"SELECT model_id, node_id, tier, assigned_at FROM deployments WHERE model_id IN ({model_list}) ORDER BY model_id, tier DESC\"");
        println!("  psql '{url}' -c \"SELECT charged, status, attempts, count(*) FROM executions WHERE request_id LIKE 'up-{run}-%' GROUP BY 1, 2, 3 ORDER BY 4 DESC\"");
        println!("  psql '{url}' -c \"SELECT global_position, event_type, payload FROM events WHERE stream_id = (SELECT 'exec-' || request_id FROM executions WHERE request_id LIKE 'up-{run}-%' AND NOT charged LIMIT 1) ORDER BY global_position\"");
        let start = self.start_position;
        let decision_types = decisions::DECISION_EVENTS
            .map(|t| format!("'{t}'"))
            .join(",");
        println!("  psql '{url}' -c \"SELECT global_position, occurred_at, event_type, payload->>'node_id' AS node, payload->>'model_id' AS model, payload->>'reason' AS why FROM events WHERE global_position > {start} AND event_type IN ({decision_types}) ORDER BY 1\"   # every decision of this run, with its reason");
        println!("  psql '{url}' -c \"SELECT s.global_position, s.payload->>'node_id' AS node, s.payload->>'reason' AS why, c.event_type AS caused_by, c.stream_id, c.payload FROM events s JOIN events c ON c.event_id = (s.metadata->>'causation_id')::uuid WHERE s.event_type IN ('NodeSlashed','NodeStatusChanged') AND s.global_position > {start} ORDER BY 1\"   # what caused each slash and status change");
        if let Some(bad) = labels
            .iter()
            .find(|(_, l)| l.starts_with("bad"))
            .map(|(n, _)| n)
        {
            println!("  deepnode events --stream node-{bad}   # one node's whole story");
        }
        // The fold depends on the policy: audit with the one the services ran on.
        println!(
            "  DEEPNODE_CONFIG={} deepnode audit --public-key '{}'   # the hash chain, every projection recomputed, the checkpoints",
            self.policy.display(),
            self.log_key
        );
        println!(
            "  deepnode verify --public-key '{}'   # the log against its signed checkpoints (docs/VERIFY.md)",
            self.log_key
        );
    }
}

impl Demo<'_> {
    /// The summary's decisions: what rotation moved, how each bad node was caught, which new
    /// nodes were given a backup slot and promoted, and whether a healthy node went unused.
    fn decisions_summary(&self, e: &Ending, labels: &Labels) {
        use decisions::Kind;
        let t = &e.tally;
        println!("  decisions (from the log, this run):");
        println!(
            "    rotation moves        {:>5}   ({} for a better challenger, {} growth-slot redraws, {} replacing a node that broke a hard rule)",
            t.count(Kind::Improved) + t.count(Kind::Redrawn) + t.count(Kind::Replaced),
            t.count(Kind::Improved),
            t.count(Kind::Redrawn),
            t.count(Kind::Replaced)
        );
        for kind in [Kind::Ejected, Kind::Jailed, Kind::Slashed, Kind::PhasedOut] {
            println!("    {:<21} {:>5}", kind.label(), t.count(kind));
        }
        let grown: Vec<&str> = t
            .backup_slots
            .keys()
            .filter(|n| t.promoted(n))
            .map(String::as_str)
            .collect();
        println!(
            "    promoted to active    {:>5}   ({} of them after a backup slot: {})",
            t.count(Kind::Promoted),
            grown.len(),
            grown.join(", ")
        );
        let bad: Vec<(&String, &String)> = labels
            .iter()
            .filter(|(_, l)| l.starts_with("bad"))
            .collect();
        let caught = bad.iter().filter(|(n, _)| !t.caught(n).is_empty()).count();
        println!("    bad nodes caught      {caught:>3}/{}", bad.len());
        for (node, label) in &bad {
            let how = t.caught(node);
            println!(
                "      {node:<10} {label:<24} {}",
                if how.is_empty() {
                    "not caught"
                } else {
                    how.as_str()
                }
            );
        }
        let healthy: Vec<&deepnode_domain::book::NodeRow> = e
            .nodes
            .iter()
            .filter(|r| {
                labels
                    .get(&r.node_id)
                    .is_some_and(|l| l.starts_with("healthy"))
            })
            .collect();
        let starved: Vec<&str> = healthy
            .iter()
            .filter(|r| r.successes == 0)
            .map(|r| r.node_id.as_str())
            .collect();
        let least = healthy.iter().map(|r| r.successes).min().unwrap_or(0);
        println!(
            "    healthy nodes unused  {:>3} of {}{}",
            starved.len(),
            healthy.len(),
            if starved.is_empty() {
                format!("   (each served at least {least} requests)")
            } else {
                format!("   ({})", starved.join(", "))
            }
        );
    }
}

/// The policy `deepnode up` runs on unless `DEEPNODE_CONFIG` names one: POLICY.md's rules with time
/// compressed so a two-minute run shows every one of them (`deploy/demo.toml`).
const DEMO_POLICY: &str = include_str!("../../../../deploy/demo.toml");

/// The log key the services sign checkpoints and receipts with: the file `DEEPNODE_LOG_KEY` names
/// if set (the services inherit it), else the demo's own, made on the first run and kept in
/// `log_dir` so every run of the demo signs as the same log. Returns its public key.
fn demo_log_key(log_dir: &Path, env: &mut Vec<(&str, String)>) -> anyhow::Result<String> {
    let path = match std::env::var_os("DEEPNODE_LOG_KEY").filter(|p| !p.is_empty()) {
        Some(path) => PathBuf::from(path),
        None => {
            let path = log_dir.join("log.key");
            if !path.exists() {
                super::keygen::write_new(&path, &super::keygen::new_key("deepnode.local/log")?)?;
            }
            env.push(("DEEPNODE_LOG_KEY", path.display().to_string()));
            path
        }
    };
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("reading the log key {}", path.display()))?;
    let key =
        NoteSigner::decode(&text).with_context(|| format!("the log key {}", path.display()))?;
    Ok(key.verifier().encode())
}

/// Which bad behaviour (0 never answers, 1 garbage, 2 error-prone) node `i` (1-based) of `count`
/// gets, if any. With at least nine nodes they sit at positions 3, 6 and 4: ties in placement are
/// broken towards the first ids, so the first models' primaries are nodes 1–4 — the node that
/// never answers and the error-prone one start as primaries (rotation must replace one for a hard
/// rule, the other for a better challenger) and the garbage one gets a backup slot early.
fn bad_slot(count: u32, i: u32) -> Option<u32> {
    if count >= 9 {
        match i {
            3 => Some(0),
            6 => Some(1),
            4 => Some(2),
            _ => None,
        }
    } else {
        (i + 3 > count).then(|| i + 3 - count - 1)
    }
}

/// Log-normal latency around `median_ms`.
fn lognormal(median_ms: u64) -> Latency {
    Latency::LogNormal {
        median: Duration::from_millis(median_ms),
        sigma: 0.4,
    }
}

/// `node (tier), ...` from a deploy reply.
fn assignments(fields: &serde_json::Map<String, Value>) -> String {
    fields
        .get("assignments")
        .and_then(Value::as_array)
        .map(|list| {
            list.iter()
                .map(|a| {
                    format!(
                        "{} ({})",
                        a.get("node_id").and_then(Value::as_str).unwrap_or("?"),
                        a.get("tier").and_then(Value::as_str).unwrap_or("?")
                    )
                })
                .collect::<Vec<_>>()
                .join(", ")
        })
        .unwrap_or_default()
}

/// Prints one progress line (stdout, so the whole run reads in order).
fn say(line: &str) {
    println!("{line}");
}

/// A loopback address with a port free right now (the OS picks it).
fn free_local_addr() -> std::io::Result<std::net::SocketAddr> {
    std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()
}

#[cfg(test)]
mod tests {
    use super::*;
    use deepnode_domain::config::PolicyConfig;

    /// deploy/demo.toml changes durations and the counts of observations that stand in for time —
    /// nothing else: with those put back, it is the default policy.
    #[test]
    fn the_demo_policy_compresses_time_and_changes_no_rule() {
        let mut demo = PolicyConfig::from_toml_str(DEMO_POLICY).unwrap();
        let d = PolicyConfig::default();
        assert!(demo.rotation.epoch_secs < d.rotation.epoch_secs);
        assert!(demo.placement.probation_min_age_secs < d.placement.probation_min_age_secs);
        let r = &mut demo.rotation;
        r.epoch_secs = d.rotation.epoch_secs;
        r.growth_redraw_every_epochs = d.rotation.growth_redraw_every_epochs;
        r.max_moves_fraction = d.rotation.max_moves_fraction;
        r.no_move_back_epochs = d.rotation.no_move_back_epochs;
        r.phase_out_min_observations = d.rotation.phase_out_min_observations;
        r.immunity_secs = d.rotation.immunity_secs;
        r.immunity_min_scored_requests = d.rotation.immunity_min_scored_requests;
        let p = &mut demo.placement;
        p.top_tier_min_observations = d.placement.top_tier_min_observations;
        p.probation_min_observations = d.placement.probation_min_observations;
        p.probation_min_age_secs = d.placement.probation_min_age_secs;
        demo.ejection.base_ejection_ms = d.ejection.base_ejection_ms;
        demo.ejection.max_ejection_ms = d.ejection.max_ejection_ms;
        let n = &mut demo.penalty;
        n.downtime_min_attempts = d.penalty.downtime_min_attempts;
        n.jail_base_secs = d.penalty.jail_base_secs;
        n.jail_max_secs = d.penalty.jail_max_secs;
        n.invalid_window_secs = d.penalty.invalid_window_secs;
        n.tombstone_window_secs = d.penalty.tombstone_window_secs;
        demo.reputation.half_life_secs = d.reputation.half_life_secs;
        demo.reputation.failure_window_secs = d.reputation.failure_window_secs;
        assert_eq!(demo, d);
    }
}
