//! `deepnode-bench system`: the whole control plane as a user deploys it, measured from outside.
//!
//! For each `--copies` value it builds a fresh deployment: its own `nats-server -js` (a throwaway
//! store directory), a fresh database on the Postgres server of `DATABASE_URL`, that many copies of
//! each release binary (`deepnode-reputation`, `deepnode-rotation`, `deepnode-scheduler`) as
//! separate processes, and `deepnode sim` (the simulated nodes, answering at once) as another. This
//! process is the outside client: it deploys one model through `cmd.model.deploy` and then drives
//! `cmd.exec`:
//!
//! 1. direct NATS requests to one node at the highest `--rates` value (the floor under every exec);
//! 2. each rate of `--rates`, open loop: added p50/p99 (exec minus direct), CPU of every process per
//!    execution (services, postgres, nats-server, from `/proc`), database transactions per execution
//!    (`pg_stat_database`);
//! 3. saturation: `--clients` closed-loop clients; executions per second, all answered `ok`, each
//!    durable before its reply (the scheduler appends before it answers);
//!    with `--overload F`, then open loop at F × that rate: what flow control does with the excess
//!    (served rate, the served requests' p99 against their deadline, `overloaded` refusals and how
//!    fast they come) — with `--node-capacity` and `--node-latency-ms` making the nodes, not the
//!    control plane, the bottleneck, so the scheduler's queue is what takes the overload;
//! 4. how long the relay and the SQL projection take to reach the log's head after the load stops;
//! 5. the RSS of every service before and after, then (with `--soak N`) after N executions;
//! 6. the charged executions in `executions` against the `ok` replies, and `deepnode audit`'s exit.
//!
//! Nothing here is in-process: the figures are those of the binaries a user runs.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::Args;
use deepnode_bus::async_nats::Client;
use deepnode_bus::{rpc, Subjects};
use hdrhistogram::Histogram;
use serde_json::{json, Value};
use tokio::process::{Child, Command};
use tokio::time::Instant;

use crate::db::BenchDb;
use crate::procs;

/// The service binaries, in start order.
const SERVICES: [&str; 3] = [
    "deepnode-reputation",
    "deepnode-rotation",
    "deepnode-scheduler",
];
/// The one model the load goes to.
const MODEL: &str = "bench-model";
/// How long a started deployment gets to serve its first `ok` exec.
const READY_WITHIN: Duration = Duration::from_secs(60);

/// Options of `system`.
#[derive(Args, Debug, Clone)]
pub struct SystemArgs {
    /// Measured seconds of each phase.
    #[arg(long, default_value_t = 10.0)]
    pub seconds: f64,
    /// Give the services a (throwaway) log key, so checkpoints and every exec reply's receipt are
    /// signed.
    #[arg(long)]
    pub log_key: bool,
    /// Open-loop rates (exec/s), each its own phase; the last is also the direct-request rate.
    #[arg(long, value_delimiter = ',', default_value = "100,1000")]
    pub rates: Vec<u32>,
    /// Closed-loop clients of the saturation phase (0 skips it).
    #[arg(long, default_value_t = 64)]
    pub clients: usize,
    /// Copies of each service, one deployment per value.
    #[arg(long, value_delimiter = ',', default_value = "1,2")]
    pub copies: Vec<usize>,
    /// Simulated nodes.
    #[arg(long, default_value_t = 6)]
    pub nodes: usize,
    /// Each node's registered capacity (the default never binds).
    #[arg(long, default_value_t = 100_000)]
    pub node_capacity: u32,
    /// The nodes' typical answer time, in milliseconds (log-normal around it; 0: at once).
    #[arg(long, default_value_t = 0)]
    pub node_latency_ms: u64,
    /// After the saturation phase, offer this many times its rate, open loop (0: skip).
    #[arg(long, default_value_t = 0.0)]
    pub overload: f64,
    /// The `nats-server` executable to start for each deployment.
    #[arg(long, default_value = "nats-server")]
    pub nats_server: String,
    /// Where the service binaries and `deepnode` are (default: next to this executable).
    #[arg(long)]
    pub bin_dir: Option<PathBuf>,
    /// After the phases, keep saturating until this many executions in all, printing every
    /// service's RSS at 10,000 and at each power of ten up to it (0: no soak).
    #[arg(long, default_value_t = 0)]
    pub soak: u64,
    /// Where service logs go (default: a fresh directory under the system's temp dir).
    #[arg(long)]
    pub log_dir: Option<PathBuf>,
    /// Diagnostics: write every request of each measured phase, one line each — when it was sent
    /// (µs since the phase began) and its round trip (µs) — to `<DIR>/<copies>-<phase>.txt`, to
    /// see when the slow ones happen (clustered in time or spread out).
    #[arg(long, value_name = "DIR")]
    pub latency_trace: Option<PathBuf>,
}

/// Runs the benchmark and prints its Markdown report.
/// Runs the benchmark for each `--copies` value; `keep` keeps each deployment's database, and
/// `log_statements` makes its server log every statement's duration (set before any service
/// connects, so their sessions have it).
pub async fn run(
    database_url: &str,
    keep: bool,
    log_statements: bool,
    args: &SystemArgs,
) -> Result<()> {
    let bin_dir = match &args.bin_dir {
        Some(dir) => dir.clone(),
        None => std::env::current_exe()?
            .parent()
            .context("the benchmark executable has no directory")?
            .to_path_buf(),
    };
    for binary in SERVICES.iter().chain(&["deepnode"]) {
        if !bin_dir.join(binary).is_file() {
            bail!(
                "{binary} not found in {}: build it first (`cargo build --release`)",
                bin_dir.display()
            );
        }
    }
    let log_root = match &args.log_dir {
        Some(dir) => dir.clone(),
        None => std::env::temp_dir().join(format!(
            "deepnode-sysbench-{}",
            chrono::Utc::now().format("%Y%m%dT%H%M%S")
        )),
    };
    println!("# deepnode-bench system\n");
    println!(
        "{} · {} s per phase, rates {:?} exec/s, {} closed-loop clients, {} nodes of capacity {} answering in ~{} ms · {} · logs in {}\n",
        machine_line(),
        args.seconds,
        args.rates,
        args.clients,
        args.nodes,
        args.node_capacity,
        args.node_latency_ms,
        if args.log_key {
            "signed checkpoints and receipts (a log key)"
        } else {
            "no log key"
        },
        log_root.display()
    );
    for &copies in &args.copies {
        let dir = log_root.join(format!("copies-{copies}"));
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let mut deployment =
            Deployment::start(database_url, log_statements, &bin_dir, &dir, copies, args).await?;
        let result = measure(&mut deployment, args).await;
        deployment.stop(keep).await;
        result?;
    }
    Ok(())
}

/// One running deployment: its NATS server, database, service copies and nodes.
struct Deployment {
    copies: usize,
    db: BenchDb,
    nats: Child,
    nats_dir: PathBuf,
    services: Vec<(String, Child)>,
    sim: Child,
    client: Client,
    subjects: Subjects,
    bin_dir: PathBuf,
    log_dir: PathBuf,
    /// The deployment's own NATS (`audit` reads its checkpoints stream there).
    nats_url: String,
    nodes: Vec<String>,
    /// `ok` exec replies over the whole run (every one must be a charged execution in the log).
    ok_replies: u64,
}

impl Deployment {
    async fn start(
        database_url: &str,
        log_statements: bool,
        bin_dir: &Path,
        log_dir: &Path,
        copies: usize,
        args: &SystemArgs,
    ) -> Result<Deployment> {
        let port = free_port()?;
        let nats_dir = log_dir.join("nats-store");
        let nats_url = format!("nats://127.0.0.1:{port}");
        let nats = spawn(
            Command::new(&args.nats_server).args([
                "-js",
                "-a",
                "127.0.0.1",
                "-p",
                &port.to_string(),
                "-sd",
                &nats_dir.display().to_string(),
            ]),
            &log_dir.join("nats-server.log"),
        )
        .with_context(|| format!("starting {}", args.nats_server))?;
        let client = connect_nats(&nats_url).await?;
        let db = BenchDb::create(database_url).await?;
        if log_statements {
            db.log_statements().await?;
        }
        let mut env = vec![
            ("DATABASE_URL", db.url.clone()),
            ("NATS_URL", nats_url.clone()),
            // As deployed: each service serves /metrics (on a free loopback port), so its histograms
            // are recorded and drained as in production.
            ("DEEPNODE_METRICS_ADDR", "127.0.0.1:0".to_owned()),
            (
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".to_owned()),
            ),
        ];
        if args.log_key {
            // A throwaway key: checkpoints and receipts are signed, as in a deployment that has one.
            let key = deepnode_domain::note::NoteSigner::from_seed(
                "deepnode.bench/log",
                rand::random::<[u8; 32]>(),
            )?;
            let path = log_dir.join("log.key");
            std::fs::write(&path, key.encode() + "\n")
                .with_context(|| format!("writing {}", path.display()))?;
            env.push(("DEEPNODE_LOG_KEY", path.display().to_string()));
        }
        let mut services = Vec::new();
        for copy in 1..=copies {
            for name in SERVICES {
                let label = format!("{name}#{copy}");
                let mut command = Command::new(bin_dir.join(name));
                command.envs(env.iter().map(|(k, v)| (*k, v.as_str())));
                let child = spawn(&mut command, &log_dir.join(format!("{label}.log")))?;
                services.push((label, child));
            }
        }
        let subjects = Subjects::new();
        let commands = [
            subjects.cmd_node_deregister(),
            subjects.cmd_model_deploy(),
            subjects.cmd_exec(),
        ];
        for subject in &commands {
            wait_serving(&client, subject).await?;
        }
        let mut sim_command = Command::new(bin_dir.join("deepnode"));
        sim_command
            .env("DATABASE_URL", &db.url)
            .env("NATS_URL", &nats_url)
            .env("RUST_LOG", "warn")
            .args(["sim", "--prefix", "bench", "--latency-ms"])
            .arg(args.node_latency_ms.to_string())
            .arg("--capacity")
            .arg(args.node_capacity.to_string())
            .arg("--nodes")
            .arg(args.nodes.to_string());
        let sim = spawn(&mut sim_command, &log_dir.join("sim.log"))?;
        let mut deployment = Deployment {
            copies,
            db,
            nats,
            nats_dir,
            services,
            sim,
            client,
            subjects,
            bin_dir: bin_dir.to_path_buf(),
            log_dir: log_dir.to_path_buf(),
            nats_url,
            nodes: Vec::new(),
            ok_replies: 0,
        };
        deployment.nodes = deployment.deploy_model().await?;
        deployment.wait_first_exec().await?;
        Ok(deployment)
    }

    /// Deploys the model once every node is known to rotation; returns the replicas' nodes.
    async fn deploy_model(&self) -> Result<Vec<String>> {
        let started = Instant::now();
        let body = json!({"model_id": MODEL, "domain": "text", "replicas": 2});
        loop {
            let reply = rpc::request_json(
                &self.client,
                &self.subjects.cmd_model_deploy(),
                &body,
                Duration::from_secs(5),
            )
            .await;
            if let Ok(reply) = &reply {
                if reply["ok"] == true {
                    let nodes = reply["assignments"]
                        .as_array()
                        .map(|a| {
                            a.iter()
                                .filter_map(|x| x["node_id"].as_str().map(str::to_owned))
                                .collect::<Vec<_>>()
                        })
                        .unwrap_or_default();
                    return Ok(nodes);
                }
            }
            if started.elapsed() > READY_WITHIN {
                bail!("the model could not be deployed: last reply {reply:?}");
            }
            // Readiness of a deployment under test: the nodes register on their own schedule.
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Waits until an exec is answered `ok` (the scheduler has folded the deployment).
    async fn wait_first_exec(&mut self) -> Result<()> {
        let started = Instant::now();
        let mut n = 0u64;
        loop {
            n += 1;
            let reply = self.exec(&format!("ready-{n}")).await;
            if matches!(&reply, Ok(r) if r["ok"] == true) {
                self.ok_replies += 1;
                return Ok(());
            }
            if started.elapsed() > READY_WITHIN {
                bail!("no exec answered ok within {READY_WITHIN:?}: last reply {reply:?}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn exec(&self, request_id: &str) -> Result<Value, rpc::Error> {
        rpc::request_json(
            &self.client,
            &self.subjects.cmd_exec(),
            &exec_body(request_id),
            Duration::from_secs(10),
        )
        .await
    }

    /// Every process whose CPU counts, by label: each service copy, postgres, nats-server.
    fn cpu(&self) -> BTreeMap<String, f64> {
        let mut cpu = BTreeMap::new();
        for (label, child) in &self.services {
            let service = label.split('#').next().unwrap_or(label);
            let used = child.id().and_then(procs::cpu_seconds).unwrap_or(0.0);
            *cpu.entry(short(service).to_owned()).or_insert(0.0) += used;
        }
        cpu.insert("postgres".to_owned(), procs::cpu_seconds_named("postgres"));
        // Outside the control plane, reported apart: the nodes and this load generator.
        cpu.insert(
            "(sim)".to_owned(),
            self.sim.id().and_then(procs::cpu_seconds).unwrap_or(0.0),
        );
        cpu.insert(
            "(client)".to_owned(),
            procs::cpu_seconds(std::process::id()).unwrap_or(0.0),
        );
        cpu.insert(
            "nats-server".to_owned(),
            self.nats.id().and_then(procs::cpu_seconds).unwrap_or(0.0),
        );
        cpu
    }

    /// Each service copy's RSS in MiB.
    fn rss(&self) -> BTreeMap<String, f64> {
        self.services
            .iter()
            .map(|(label, child)| {
                let rss = child.id().and_then(procs::rss_mib).unwrap_or(0.0);
                (label.clone(), rss)
            })
            .collect()
    }

    /// A service that exited, if any (a crash invalidates the run).
    fn exited(&mut self) -> Option<String> {
        for (label, child) in &mut self.services {
            if let Ok(Some(status)) = child.try_wait() {
                return Some(format!("{label} exited ({status})"));
            }
        }
        None
    }

    async fn transactions(&self) -> Result<i64> {
        let mut conn = self.db.connect().await?;
        let n: i64 = sqlx::query_scalar(
            "SELECT (xact_commit + xact_rollback)::bigint FROM pg_stat_database WHERE datname = $1",
        )
        .bind(&self.db.name)
        .fetch_one(&mut conn)
        .await?;
        Ok(n)
    }

    async fn stop(mut self, keep: bool) {
        for (_, child) in &self.services {
            if let Some(pid) = child.id() {
                terminate(pid);
            }
        }
        for (label, child) in &mut self.services {
            match tokio::time::timeout(Duration::from_secs(20), child.wait()).await {
                Ok(Ok(status)) if status.success() => {}
                Ok(Ok(status)) => eprintln!("system: {label} ended {status}"),
                _ => {
                    eprintln!("system: {label} did not stop within 20 s; killed");
                    let _ = child.kill().await;
                }
            }
        }
        let _ = self.sim.kill().await;
        let _ = self.nats.kill().await;
        let _ = std::fs::remove_dir_all(&self.nats_dir);
        if keep {
            println!("kept database {}", self.db.name);
        } else if let Err(e) = self.db.drop_database(Duration::from_secs(30)).await {
            eprintln!("system: dropping {}: {e:#}", self.db.name);
        }
    }
}

/// What one load phase saw.
struct Phase {
    latency: Histogram<u64>,
    /// Round trips of the `ok` replies alone.
    served: Histogram<u64>,
    /// Round trips of the `overloaded` refusals alone.
    refused: Histogram<u64>,
    ok: u64,
    errors: BTreeMap<String, u64>,
    elapsed: Duration,
    started: Instant,
    /// Every request's send time since `started` and round trip, both in µs.
    trace: Vec<(u64, u64)>,
}

impl Phase {
    fn new() -> Phase {
        Phase {
            // 1 µs .. 10 min, 3 significant digits.
            latency: Histogram::new_with_bounds(1, 600_000_000, 3).expect("valid histogram bounds"),
            served: Histogram::new_with_bounds(1, 600_000_000, 3).expect("valid histogram bounds"),
            refused: Histogram::new_with_bounds(1, 600_000_000, 3).expect("valid histogram bounds"),
            ok: 0,
            errors: BTreeMap::new(),
            elapsed: Duration::ZERO,
            started: Instant::now(),
            trace: Vec::new(),
        }
    }

    fn ms(&self, q: f64) -> f64 {
        self.latency.value_at_quantile(q) as f64 / 1000.0
    }

    fn record(&mut self, reply: &Result<Value, rpc::Error>, sent: Instant, micros: u64) {
        let at = sent.saturating_duration_since(self.started).as_micros();
        self.trace
            .push((u64::try_from(at).unwrap_or(u64::MAX), micros));
        let _ = self.latency.record(micros.max(1));
        match reply {
            Ok(v) if v["ok"] == true || v.get("output").is_some() && v.get("ok").is_none() => {
                let _ = self.served.record(micros.max(1));
                self.ok += 1
            }
            Ok(v) => {
                let code = v
                    .pointer("/error/code")
                    .and_then(Value::as_str)
                    .unwrap_or("malformed_reply");
                if code == "overloaded" {
                    let _ = self.refused.record(micros.max(1));
                }
                *self.errors.entry(code.to_owned()).or_default() += 1;
            }
            Err(e) => *self.errors.entry(bus_error(e)).or_default() += 1,
        }
    }

    fn errors_text(&self) -> String {
        if self.errors.is_empty() {
            return "none".to_owned();
        }
        self.errors
            .iter()
            .map(|(code, n)| format!("{code} {n}"))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

fn bus_error(e: &rpc::Error) -> String {
    match e {
        rpc::Error::Timeout { .. } => "bus_timeout".to_owned(),
        rpc::Error::NoResponders { .. } => "no_responders".to_owned(),
        _ => "bus_error".to_owned(),
    }
}

/// The figures of one measured phase.
struct Row {
    label: String,
    phase: Phase,
    executions: u64,
    cpu: BTreeMap<String, f64>,
    transactions: i64,
}

async fn measure(d: &mut Deployment, args: &SystemArgs) -> Result<()> {
    let seconds = Duration::from_secs_f64(args.seconds);
    let rss_before = d.rss();
    // Warm-up: every connection pool, cache and JIT-free path touched once.
    let warm = open_loop(d, "warm", 200, Duration::from_secs(2), false).await;
    d.ok_replies += warm.ok;

    let direct_rate = args.rates.iter().copied().max().unwrap_or(1000);
    let direct = open_loop(d, "direct", direct_rate, seconds, true).await;

    // What the deployment costs doing nothing (timers, polls, heartbeats), per second.
    let idle = metered(d, "idle", || async {
        tokio::time::sleep(seconds).await;
        let mut phase = Phase::new();
        phase.elapsed = seconds;
        phase
    })
    .await?;

    let mut rows = Vec::new();
    for &rate in &args.rates {
        let tag = format!("r{rate}");
        let row = metered(d, &format!("{rate}/s"), || {
            open_loop(d, &tag, rate, seconds, false)
        })
        .await?;
        d.ok_replies += row.phase.ok;
        rows.push(row);
    }
    let mut saturation = None;
    if args.clients > 0 {
        let row = metered(d, "saturation", || closed_loop(d, args.clients, seconds)).await?;
        d.ok_replies += row.phase.ok;
        saturation = Some(row);
    }
    let mut overload = None;
    if let (Some(sat), true) = (&saturation, args.overload > 0.0) {
        let rate = sat.phase.ok as f64 / sat.phase.elapsed.as_secs_f64() * args.overload;
        let rate = rate.round().max(1.0) as u32;
        let row = metered(d, &format!("overload {:.1}×", args.overload), || {
            open_loop(d, "over", rate, seconds, false)
        })
        .await?;
        d.ok_replies += row.phase.ok;
        overload = Some((rate, row));
    }
    if let Some(dir) = &args.latency_trace {
        let phases = std::iter::once(("direct", &direct))
            .chain(rows.iter().map(|r| (r.label.as_str(), &r.phase)))
            .chain(saturation.iter().map(|r| ("saturation", &r.phase)))
            .chain(overload.iter().map(|(_, r)| ("overload", &r.phase)));
        for (label, phase) in phases {
            let file = dir.join(format!(
                "{}-{}.txt",
                d.copies,
                label.replace("/s", "-per-s")
            ));
            let lines: String = phase
                .trace
                .iter()
                .map(|(at, micros)| format!("{at} {micros}\n"))
                .collect();
            std::fs::write(&file, lines).with_context(|| format!("writing {}", file.display()))?;
        }
    }
    let catch_up = catch_up(d).await?;
    if catch_up.relay.is_none() || catch_up.projection.is_none() {
        bail!(
            "the relay or the projection did not reach the head {} within 60 s (logs in {})",
            catch_up.head,
            d.log_dir.display()
        );
    }
    let rss_after = d.rss();
    if let Some(crash) = d.exited() {
        bail!("{crash} during the run (logs in {})", d.log_dir.display());
    }

    println!(
        "## {} cop{} of each service\n",
        d.copies,
        if d.copies == 1 { "y" } else { "ies" }
    );
    println!(
        "direct NATS request to a node at {direct_rate}/s: p50 {:.3} ms, p99 {:.3} ms ({} answered, errors: {})\n",
        direct.ms(0.5),
        direct.ms(0.99),
        direct.ok,
        direct.errors_text()
    );
    let processes: Vec<String> = rows
        .iter()
        .chain(saturation.as_ref())
        .flat_map(|r| r.cpu.keys().cloned())
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect();
    println!(
        "| phase | exec/s | ok | errors | exec p50 / p99 ms | added p50 / p99 ms | CPU ms per exec (control plane) | {} | DB tx per exec |",
        processes.join(" | ")
    );
    println!(
        "|---|---|---|---|---|---|---|{}---|",
        "---|".repeat(processes.len())
    );
    for row in rows.iter().chain(saturation.as_ref()) {
        let n = row.executions.max(1) as f64;
        let total: f64 = row
            .cpu
            .iter()
            .filter(|(p, _)| !p.starts_with('('))
            .map(|(_, v)| v)
            .sum();
        let per: Vec<String> = processes
            .iter()
            .map(|p| format!("{:.3}", row.cpu.get(p).copied().unwrap_or(0.0) * 1000.0 / n))
            .collect();
        println!(
            "| {} | {:.0} | {} | {} | {:.2} / {:.2} | {:+.2} / {:+.2} | **{:.3}** | {} | {:.2} |",
            row.label,
            row.executions as f64 / row.phase.elapsed.as_secs_f64(),
            row.phase.ok,
            row.phase.errors_text(),
            row.phase.ms(0.5),
            row.phase.ms(0.99),
            row.phase.ms(0.5) - direct.ms(0.5),
            row.phase.ms(0.99) - direct.ms(0.99),
            total * 1000.0 / n,
            per.join(" | "),
            row.transactions as f64 / n,
        );
    }
    println!();
    if let Some((offered, row)) = &overload {
        print_overload(*offered, row);
    }
    let idle_cpu: Vec<String> = processes
        .iter()
        .map(|p| {
            let ms =
                idle.cpu.get(p).copied().unwrap_or(0.0) * 1000.0 / idle.phase.elapsed.as_secs_f64();
            format!("{p} {ms:.1}")
        })
        .collect();
    println!(
        "idle, CPU ms per second: {} · DB transactions per second: {:.1}\n",
        idle_cpu.join(", "),
        idle.transactions as f64 / idle.phase.elapsed.as_secs_f64()
    );
    println!(
        "after the load stopped (head {}): relay at the head in {}, projection `deepnode_book` in {}\n",
        catch_up.head,
        fmt_reach(catch_up.relay),
        fmt_reach(catch_up.projection)
    );
    println!("| service copy | RSS before MiB | RSS after MiB |");
    println!("|---|---|---|");
    for (label, before) in &rss_before {
        println!(
            "| {label} | {before:.1} | {:.1} |",
            rss_after.get(label).copied().unwrap_or(0.0)
        );
    }
    println!();
    if args.soak > 0 {
        soak(d, args).await?;
    }
    check_durable(d).await?;
    audit(d).await?;
    Ok(())
}

/// What flow control did with an overload: the rate served against the rate offered, the served
/// requests' round trips against their deadline, and how fast the excess was refused.
fn print_overload(offered: u32, row: &Row) {
    let p = &row.phase;
    let secs = p.elapsed.as_secs_f64();
    let refused = p.errors.get("overloaded").copied().unwrap_or(0);
    let others: u64 = p.errors.values().sum::<u64>() - refused;
    let ms = |h: &Histogram<u64>, q: f64| h.value_at_quantile(q) as f64 / 1000.0;
    println!(
        "| {} | offered exec/s | served ok/s | ok p50 / p99 ms (deadline {} ms + the attempt) | overloaded | refusal p50 / p99 / max ms | other errors |",
        row.label, EXEC_TIMEOUT_MS
    );
    println!("|---|---|---|---|---|---|---|");
    println!(
        "| | {offered} | {:.0} | {:.1} / {:.1} | {refused} ({:.0} %) | {:.2} / {:.2} / {:.2} | {others} |",
        p.ok as f64 / secs,
        ms(&p.served, 0.5),
        ms(&p.served, 0.99),
        refused as f64 * 100.0 / (p.ok + refused + others).max(1) as f64,
        ms(&p.refused, 0.5),
        ms(&p.refused, 0.99),
        ms(&p.refused, 1.0),
    );
    println!();
}

/// Runs `load`, measuring the CPU of every process and the database transactions around it. The
/// transaction counters are flushed by Postgres backends about once a second, so the closing
/// sample waits for that.
async fn metered<'a, F, Fut>(d: &'a Deployment, label: &str, load: F) -> Result<Row>
where
    F: FnOnce() -> Fut,
    Fut: std::future::Future<Output = Phase> + 'a,
{
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let cpu_before = d.cpu();
    let tx_before = d.transactions().await?;
    let phase = load().await;
    let cpu_after = d.cpu();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let tx_after = d.transactions().await?;
    let cpu = cpu_after
        .iter()
        .map(|(k, after)| {
            let before = cpu_before.get(k).copied().unwrap_or(0.0);
            (k.clone(), (after - before).max(0.0))
        })
        .collect();
    let executions = phase.ok + phase.errors.values().sum::<u64>();
    Ok(Row {
        label: label.to_owned(),
        phase,
        executions,
        cpu,
        // The two samples' own transactions are not the system's.
        transactions: (tx_after - tx_before - 1).max(0),
    })
}

/// Sends at `rate` per second for `duration` without waiting for answers (open loop), then waits
/// for every answer. `direct` asks a node's infer subject instead of `cmd.exec`.
async fn open_loop(
    d: &Deployment,
    tag: &str,
    rate: u32,
    duration: Duration,
    direct: bool,
) -> Phase {
    let phase = Arc::new(Mutex::new(Phase::new()));
    let subject = if direct {
        format!("{}.node.{}.infer", d.subjects.prefix(), d.nodes[0])
    } else {
        d.subjects.cmd_exec()
    };
    let run = chrono::Utc::now().timestamp_micros();
    let started = Instant::now();
    let mut tick = tokio::time::interval(Duration::from_millis(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut issued: u64 = 0;
    let mut tasks = tokio::task::JoinSet::new();
    while started.elapsed() < duration {
        tick.tick().await;
        let due = (started.elapsed().as_secs_f64() * f64::from(rate)) as u64;
        while issued < due {
            issued += 1;
            let body = exec_body(&format!("{tag}-{run}-{issued}"));
            let (client, subject, phase) = (d.client.clone(), subject.clone(), phase.clone());
            tasks.spawn(async move { timed_request(&client, &subject, &body, &phase).await });
        }
    }
    finish(tasks, phase, started).await
}

/// `clients` clients, each sending its next exec as soon as the last is answered, for `duration`.
async fn closed_loop(d: &Deployment, clients: usize, duration: Duration) -> Phase {
    let phase = Arc::new(Mutex::new(Phase::new()));
    let run = chrono::Utc::now().timestamp_micros();
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for c in 0..clients {
        let (client, subject, phase) = (d.client.clone(), d.subjects.cmd_exec(), phase.clone());
        tasks.spawn(async move {
            let mut n = 0u64;
            while started.elapsed() < duration {
                n += 1;
                let body = exec_body(&format!("sat-{run}-{c}-{n}"));
                timed_request(&client, &subject, &body, &phase).await;
            }
        });
    }
    finish(tasks, phase, started).await
}

/// Sends one request and records its answer (or its absence) and round trip in `phase`.
async fn timed_request(client: &Client, subject: &str, body: &Value, phase: &Mutex<Phase>) {
    let sent = Instant::now();
    let reply = rpc::request_json(client, subject, body, Duration::from_secs(10)).await;
    let micros = u64::try_from(sent.elapsed().as_micros()).unwrap_or(u64::MAX);
    lock(phase).record(&reply, sent, micros);
}

/// Waits for every request of a phase to be answered; the phase then ends.
async fn finish(
    mut tasks: tokio::task::JoinSet<()>,
    phase: Arc<Mutex<Phase>>,
    started: Instant,
) -> Phase {
    while tasks.join_next().await.is_some() {}
    let mut phase = Arc::try_unwrap(phase)
        .map(|m| m.into_inner().unwrap_or_else(|p| p.into_inner()))
        .unwrap_or_else(|_| Phase::new());
    phase.elapsed = started.elapsed();
    phase
}

fn lock(phase: &Mutex<Phase>) -> std::sync::MutexGuard<'_, Phase> {
    phase.lock().unwrap_or_else(|p| p.into_inner())
}

/// The `timeout_ms` every exec carries: at most this long in the queue, then per attempt.
const EXEC_TIMEOUT_MS: u64 = 2_000;

fn exec_body(request_id: &str) -> Value {
    json!({
        "request_id": request_id,
        "model_id": MODEL,
        "input": {"prompt": "benchmark"},
        "timeout_ms": EXEC_TIMEOUT_MS,
    })
}

/// When the relay and the projection reached the head the log had when the load stopped.
struct CatchUp {
    head: i64,
    relay: Option<Duration>,
    projection: Option<Duration>,
}

async fn catch_up(d: &Deployment) -> Result<CatchUp> {
    let mut conn = d.db.connect().await?;
    let started = Instant::now();
    let head: i64 = sqlx::query_scalar("SELECT position FROM log_head")
        .fetch_one(&mut conn)
        .await?;
    let (mut relay, mut projection) = (None, None);
    while started.elapsed() < Duration::from_secs(60) && (relay.is_none() || projection.is_none()) {
        let rows: Vec<(String, i64)> = sqlx::query_as(
            "SELECT projection, global_position FROM projection_checkpoints
              WHERE projection IN ('relay', 'deepnode_book')",
        )
        .fetch_all(&mut conn)
        .await?;
        for (name, at) in rows {
            let slot = if name == "relay" {
                &mut relay
            } else {
                &mut projection
            };
            if slot.is_none() && at >= head {
                *slot = Some(started.elapsed());
            }
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    Ok(CatchUp {
        head,
        relay,
        projection,
    })
}

fn fmt_reach(t: Option<Duration>) -> String {
    match t {
        Some(t) => format!("{:.0} ms", t.as_secs_f64() * 1000.0),
        None => "**not within 60 s**".to_owned(),
    }
}

/// Saturates until `--soak` executions in all, printing RSS at 10,000 and each power of ten.
async fn soak(d: &mut Deployment, args: &SystemArgs) -> Result<()> {
    println!(
        "| executions | {} |",
        d.rss().keys().cloned().collect::<Vec<_>>().join(" | ")
    );
    println!("|---|{}", "---|".repeat(d.services.len()));
    let mut mark = 10_000u64;
    while mark <= args.soak {
        while d.ok_replies < mark {
            let phase = closed_loop(d, args.clients.max(16), Duration::from_secs(5)).await;
            if phase.ok == 0 {
                bail!("soak: nothing answered ok ({})", phase.errors_text());
            }
            d.ok_replies += phase.ok;
        }
        let rss = d.rss();
        println!(
            "| {} | {} |",
            d.ok_replies,
            rss.values()
                .map(|r| format!("{r:.1}"))
                .collect::<Vec<_>>()
                .join(" | ")
        );
        if mark == args.soak {
            break;
        }
        mark = (mark * 10).min(args.soak);
    }
    println!();
    Ok(())
}

/// Every `ok` reply is a charged execution in the projection (after the catch-up).
async fn check_durable(d: &Deployment) -> Result<()> {
    let mut conn = d.db.connect().await?;
    let started = Instant::now();
    loop {
        let charged: i64 = sqlx::query_scalar("SELECT count(*) FROM executions WHERE charged")
            .fetch_one(&mut conn)
            .await?;
        let completed: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM events WHERE event_type = 'ExecutionCompleted'",
        )
        .fetch_one(&mut conn)
        .await?;
        if charged as u64 == d.ok_replies && completed as u64 == d.ok_replies {
            println!(
                "durability: {} `ok` replies, {completed} `ExecutionCompleted` in the log, {charged} charged rows: equal\n",
                d.ok_replies
            );
            return Ok(());
        }
        if started.elapsed() > Duration::from_secs(30) {
            bail!(
                "durability: {} ok replies but {completed} ExecutionCompleted and {charged} charged rows",
                d.ok_replies
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// `deepnode audit` over the deployment's database.
async fn audit(d: &Deployment) -> Result<()> {
    let started = Instant::now();
    let out = Command::new(d.bin_dir.join("deepnode"))
        .env("DATABASE_URL", &d.db.url)
        .env("NATS_URL", &d.nats_url)
        .arg("audit")
        .output()
        .await
        .context("running deepnode audit")?;
    let text = String::from_utf8_lossy(&out.stdout);
    let last = text.lines().last().unwrap_or("");
    println!(
        "`deepnode audit`: exit {} in {:.1} s ({last})\n",
        out.status.code().unwrap_or(-1),
        started.elapsed().as_secs_f64()
    );
    if !out.status.success() {
        bail!("deepnode audit failed:\n{text}");
    }
    Ok(())
}

/// Waits until something answers on `subject` (any reply: a bad request proves it is served).
async fn wait_serving(client: &Client, subject: &str) -> Result<()> {
    let started = Instant::now();
    loop {
        match rpc::request_json(client, subject, &json!({}), Duration::from_secs(2)).await {
            Ok(_) => return Ok(()),
            Err(e) if started.elapsed() > READY_WITHIN => {
                bail!("nothing serves {subject} within {READY_WITHIN:?}: {e}")
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

async fn connect_nats(url: &str) -> Result<Client> {
    let started = Instant::now();
    loop {
        match deepnode_bus::async_nats::connect(url).await {
            Ok(client) => return Ok(client),
            Err(e) if started.elapsed() > Duration::from_secs(10) => {
                bail!("connecting to the benchmark's nats-server at {url}: {e}")
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
}

fn spawn(command: &mut Command, log: &Path) -> Result<Child> {
    let out = std::fs::File::create(log).with_context(|| format!("creating {}", log.display()))?;
    let err = out.try_clone()?;
    command
        .stdin(Stdio::null())
        .stdout(Stdio::from(out))
        .stderr(Stdio::from(err))
        .kill_on_drop(true);
    Ok(command.spawn()?)
}

fn terminate(pid: u32) {
    let _ = std::process::Command::new("kill")
        .arg("-TERM")
        .arg(pid.to_string())
        .status();
}

fn free_port() -> Result<u16> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(listener.local_addr()?.port())
}

fn short(service: &str) -> &str {
    service.strip_prefix("deepnode-").unwrap_or(service)
}

/// The machine in one line: cores, CPU model, load average.
fn machine_line() -> String {
    let cpu = crate::db::cpu_model();
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    format!(
        "{cores} cores, {cpu}, load average {}",
        crate::db::load_average()
    )
}
