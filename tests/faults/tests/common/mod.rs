//! Harness of the fault tests: private Postgres clusters and NATS servers on free ports (torn down on
//! drop), the shipped service binaries as child processes (killed with SIGKILL), a traffic
//! driver that records what every caller saw, and [`verify`], the checks every fault test ends with.
//!
//! It deliberately never touches the shared servers beyond a per-test database (dropped) and a
//! per-test subject prefix whose two JetStream streams are deleted at the end.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_nats::jetstream::context::Publish;
use deepnode_bus::envelope::ErrorCode;
use deepnode_bus::{rpc, Subjects};
use deepnode_domain::config::PolicyConfig;
use deepnode_sim::{Behaviour, Latency, Sim, SimConfig, SimHandle, SimNode};
use deepnode_store::EventStore;
use deepnode_testkit::TestDb;
pub use deepnode_testkit::{eventually, PrivateNats};
use serde_json::{json, Value};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use uuid::Uuid;

/// The shipped binary of `service` (`deepnode-<service>`), from the directory the workspace's test
/// build puts binaries in (the parent of this test's `deps/`).
pub fn service_binary(service: &str) -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("a test executable lives in target/<profile>/deps");
    let bin = dir.join(format!("deepnode-{service}"));
    assert!(
        bin.is_file(),
        "{} is not built; `cargo build --bins` (a workspace test run builds it)",
        bin.display()
    );
    bin
}
/// Per-attempt timeout the traffic asks for.
pub const EXEC_TIMEOUT_MS: u64 = 1_000;
/// How long a caller waits for any reply.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(4);

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

// ---------------------------------------------------------------------------------------------
// Private servers

/// A throwaway PostgreSQL cluster (run as the `postgres` OS user) on a free port.
pub struct PrivatePg {
    pub dir: PathBuf,
    pub port: u16,
}

fn as_postgres(args: &[&str]) -> std::process::Output {
    Command::new("runuser")
        .args(["-u", "postgres", "--"])
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

const PG_BIN: &str = "/usr/lib/postgresql/15/bin";

impl PrivatePg {
    pub fn start() -> PrivatePg {
        let port = free_port();
        let dir =
            std::env::temp_dir().join(format!("deepnode-fault-pg-{}", Uuid::new_v4().simple()));
        std::fs::create_dir(&dir).unwrap();
        let d = dir.to_str().unwrap().to_owned();
        assert!(Command::new("chown")
            .args(["postgres:postgres", &d])
            .status()
            .unwrap()
            .success());
        let initdb = as_postgres(&[
            &format!("{PG_BIN}/initdb"),
            "-D",
            &d,
            "-U",
            "postgres",
            "--auth=trust",
            "--no-locale",
            "-E",
            "UTF8",
        ]);
        assert!(
            initdb.status.success(),
            "initdb: {}",
            String::from_utf8_lossy(&initdb.stderr)
        );
        let conf = format!(
            "listen_addresses = '127.0.0.1'\nport = {port}\nunix_socket_directories = '{d}'\nmax_connections = 200\nfsync = off\nsynchronous_commit = off\n"
        );
        let mut existing = std::fs::read_to_string(dir.join("postgresql.conf")).unwrap();
        existing.push_str(&conf);
        std::fs::write(dir.join("postgresql.conf"), existing).unwrap();
        let pg = PrivatePg { dir, port };
        let out = as_postgres(&[
            &format!("{PG_BIN}/pg_ctl"),
            "-D",
            &d,
            "-l",
            &format!("{d}/server.log"),
            "-w",
            "-t",
            "60",
            "start",
        ]);
        assert!(
            out.status.success(),
            "pg_ctl start: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        pg
    }

    pub fn url(&self, db: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{db}", self.port)
    }

    /// `pg_ctl restart -m fast`, waiting until it accepts connections again.
    pub async fn restart(&self) -> Duration {
        let d = self.dir.to_str().unwrap().to_owned();
        let started = Instant::now();
        let out = tokio::process::Command::new("runuser")
            .args(["-u", "postgres", "--"])
            .arg(format!("{PG_BIN}/pg_ctl"))
            .args([
                "-D",
                &d,
                "-l",
                &format!("{d}/server.log"),
                "-m",
                "fast",
                "-w",
                "-t",
                "60",
                "restart",
            ])
            .stdin(Stdio::null())
            .output()
            .await
            .unwrap();
        assert!(
            out.status.success(),
            "pg_ctl restart: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        started.elapsed()
    }
}

impl Drop for PrivatePg {
    fn drop(&mut self) {
        let d = self.dir.to_str().unwrap_or_default().to_owned();
        let _ = as_postgres(&[
            &format!("{PG_BIN}/pg_ctl"),
            "-D",
            &d,
            "-m",
            "immediate",
            "-w",
            "-t",
            "30",
            "stop",
        ]);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

// ---------------------------------------------------------------------------------------------
// Services as child processes

/// One shipped service binary as a child process; SIGKILLed on drop.
pub struct ServiceProc {
    pub service: &'static str,
    child: Child,
}

impl ServiceProc {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// `kill -9`, then reap.
    pub fn kill9(mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }

    /// Still running?
    pub fn alive(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }
}

impl Drop for ServiceProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// ---------------------------------------------------------------------------------------------
// The cluster under test

pub struct Cluster {
    pub db_url: String,
    pub nats_url: String,
    pub subjects: Subjects,
    pub client: async_nats::Client,
    pub store: EventStore,
    pub logs: PathBuf,
    _db: Option<TestDb>,
    spawned: usize,
}

impl Cluster {
    /// A cluster on a fresh database of the shared Postgres, or of `pg_url` if given (created and
    /// migrated), and on `nats_url` (the shared NATS if `None`).
    pub async fn new(pg_url: Option<String>, nats_url: Option<String>) -> Cluster {
        let (db, db_url) = match pg_url {
            Some(url) => (None, url),
            None => {
                let db = TestDb::new().await;
                let url = db.url().to_owned();
                (Some(db), url)
            }
        };
        let store = EventStore::connect(&db_url, 8).await.unwrap();
        let nats_url = nats_url.unwrap_or_else(deepnode_testkit::nats_url);
        let client = deepnode_bus::connect::connect(&nats_url, "fault-test")
            .await
            .unwrap();
        let subjects = Subjects::random();
        let js = async_nats::jetstream::new(client.clone());
        deepnode_bus::jetstream::ensure_streams(&js, &subjects, &Default::default())
            .await
            .unwrap();
        let logs = std::env::temp_dir().join(format!("deepnode-fault-{}", subjects.prefix()));
        std::fs::create_dir_all(&logs).unwrap();
        Cluster {
            db_url,
            nats_url,
            subjects,
            client,
            store,
            logs,
            _db: db,
            spawned: 0,
        }
    }

    /// Starts one service child; its stderr goes to `<logs>/<service>-<n>.log`.
    pub fn spawn(&mut self, service: &'static str) -> ServiceProc {
        self.spawned += 1;
        let log = std::fs::File::create(self.logs.join(format!("{service}-{}.log", self.spawned)))
            .unwrap();
        // The real binary, told by its environment what a test needs: this cluster's subject
        // prefix, a quick relay lease retry (so takeovers are quick to observe), no metrics port.
        let child = Command::new(service_binary(service))
            .env("DATABASE_URL", &self.db_url)
            .env("NATS_URL", &self.nats_url)
            .env("DEEPNODE_SUBJECT_PREFIX", self.subjects.prefix())
            .env("DEEPNODE_RELAY_LEASE_RETRY_MS", "250")
            .env("DEEPNODE_METRICS_ADDR", "off")
            .env(
                "RUST_LOG",
                std::env::var("FAULT_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        ServiceProc { service, child }
    }

    /// Waits until some copy of `service` answers its command subject (any reply counts).
    pub async fn wait_answers(&self, service: &str) {
        let subject = match service {
            "scheduler" => self.subjects.cmd_schedule(),
            "reputation" => self.subjects.cmd_node_register(),
            _ => self.subjects.cmd_model_deploy(),
        };
        let client = self.client.clone();
        eventually(
            &format!("{service} to answer"),
            Duration::from_secs(30),
            || {
                let (client, subject) = (client.clone(), subject.clone());
                async move {
                    rpc::request_json(&client, &subject, &json!({}), Duration::from_millis(500))
                        .await
                        .is_ok()
                }
            },
        )
        .await;
    }

    /// Simulated healthy nodes `n-0..n-{count}`, registered through `cmd.node.register`.
    pub async fn start_fleet(&self, count: usize) -> SimHandle {
        let healthy = Behaviour::healthy(Latency::Uniform {
            min: Duration::from_millis(2),
            max: Duration::from_millis(6),
        });
        self.start_fleet_of(count, healthy).await
    }

    /// [`Cluster::start_fleet`] with every node behaving as `behaviour`.
    pub async fn start_fleet_of(&self, count: usize, behaviour: Behaviour) -> SimHandle {
        let mut config = SimConfig::fleet(count, "n", "text", behaviour, 5).unwrap();
        for node in &mut config.nodes {
            node.capacity = 64;
        }
        config.register = true;
        config.register_timeout = Duration::from_secs(20);
        config.heartbeat_interval = Duration::from_secs(1);
        Sim::start(self.client.clone(), self.subjects.clone(), config)
            .await
            .unwrap()
    }

    /// Starts arbitrary simulated nodes without registering them.
    pub async fn start_nodes(&self, nodes: Vec<SimNode>) -> SimHandle {
        let config = SimConfig {
            nodes,
            seed: 9,
            heartbeat_interval: Duration::from_secs(1),
            ..SimConfig::default()
        };
        Sim::start(self.client.clone(), self.subjects.clone(), config)
            .await
            .unwrap()
    }

    /// Deploys `model` with 2 replicas through `cmd.model.deploy` and waits until an exec of it
    /// succeeds (the scheduler has seen the placement).
    pub async fn deploy(&self, model: &str) {
        let (client, subject) = (self.client.clone(), self.subjects.cmd_model_deploy());
        eventually("model deployment", Duration::from_secs(30), || {
            let (client, subject) = (client.clone(), subject.clone());
            let body = json!({"model_id": model, "domain": "text", "replicas": 2});
            async move {
                match rpc::request_json(&client, &subject, &body, Duration::from_secs(3)).await {
                    Ok(v) => v["ok"] == json!(true) || v["error"]["code"] == json!("conflict"),
                    Err(_) => false,
                }
            }
        })
        .await;
        let (client, subject) = (self.client.clone(), self.subjects.cmd_exec());
        eventually("first exec to succeed", Duration::from_secs(30), || {
            let (client, subject) = (client.clone(), subject.clone());
            let body = json!({"request_id": format!("warmup-{}", Uuid::new_v4().simple()), "model_id": model, "input": "warm"});
            async move {
                matches!(rpc::request_json(&client, &subject, &body, Duration::from_secs(3)).await,
                    Ok(v) if v["ok"] == json!(true))
            }
        })
        .await;
    }

    pub async fn head(&self) -> i64 {
        self.store.head_position().await.unwrap()
    }

    /// The stored position `name` (-1 while the database does not answer).
    pub async fn checkpoint(&self, name: &str) -> i64 {
        self.store.checkpoint(name).await.unwrap_or(-1)
    }

    /// The backend pid holding the relay's advisory lock, if any.
    pub async fn relay_holder(&self) -> Option<i32> {
        // RELAY_LOCK_KEY = 0x72_656c_6179: classid = high 32 bits, objid = low 32 bits.
        sqlx::query_scalar::<_, i32>(
            "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND classid = 114
               AND objid = 1701601657 AND granted AND database = (SELECT oid FROM pg_database WHERE datname = current_database())",
        )
        .fetch_optional(self.store.pool())
        .await
        .ok()
        .flatten()
    }

    /// How many times a child's log says `needle` (children log at `warn` unless `FAULT_LOG` is set).
    pub fn log_count(&self, needle: &str) -> usize {
        std::fs::read_dir(&self.logs)
            .unwrap()
            .filter_map(|e| std::fs::read_to_string(e.ok()?.path()).ok())
            .map(|text| text.matches(needle).count())
            .sum()
    }

    /// Deletes this test's JetStream streams (the shared server keeps nothing of ours).
    pub async fn cleanup(&self) {
        let js = async_nats::jetstream::new(self.client.clone());
        let _ = js.delete_stream(self.subjects.events_stream()).await;
        let _ = js.delete_stream(self.subjects.ingest_stream()).await;
        let _ = js.delete_stream(self.subjects.checkpoints_stream()).await;
        let _ = std::fs::remove_dir_all(&self.logs);
    }
}

// ---------------------------------------------------------------------------------------------
// Traffic

/// What one caller saw.
#[derive(Debug, Clone)]
pub enum Seen {
    /// A reply; `ok` or not.
    Reply(Value),
    /// No reply in time.
    Timeout,
    /// No scheduler subscribed (or another transport error).
    Transport(String),
}

#[derive(Debug, Clone)]
pub struct Call {
    pub request_id: String,
    pub model_id: String,
    pub at: Instant,
    pub took: Duration,
    pub seen: Seen,
}

impl Call {
    /// A final answer the caller may rely on: success, or a recorded failure (`all_replicas_failed`).
    pub fn acknowledged(&self) -> Option<&Value> {
        match &self.seen {
            Seen::Reply(v) if v["ok"] == json!(true) => Some(v),
            Seen::Reply(v) if v["error"]["code"] == json!("all_replicas_failed") => Some(v),
            _ => None,
        }
    }

    pub fn code(&self) -> Option<String> {
        match &self.seen {
            Seen::Reply(v) => v["error"]["code"].as_str().map(str::to_owned),
            _ => None,
        }
    }
}

#[derive(Default)]
pub struct Record {
    pub calls: Vec<Call>,
    /// Ingest reports sent (event id → node), and those JetStream acked.
    pub reports_sent: BTreeMap<Uuid, String>,
    pub reports_acked: BTreeSet<Uuid>,
    /// Acks of deliberate re-publishes that JetStream flagged as duplicates.
    pub ingest_duplicate_acks: u64,
}

/// Steady exec traffic from `workers` callers (one request each `pace`), plus one ingest report
/// publisher (every 50 ms) when `ingest_nodes` is not empty.
pub struct Traffic {
    stop: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
    pub record: Arc<Mutex<Record>>,
}

impl Traffic {
    pub fn start(
        c: &Cluster,
        models: &[&str],
        workers: usize,
        pace: Duration,
        ingest_nodes: &[&str],
    ) -> Traffic {
        let (stop, rx) = watch::channel(false);
        let record = Arc::new(Mutex::new(Record::default()));
        let mut tasks = Vec::new();
        for w in 0..workers {
            let (client, subject, record, rx) = (
                c.client.clone(),
                c.subjects.cmd_exec(),
                record.clone(),
                rx.clone(),
            );
            let models: Vec<String> = models.iter().map(|m| (*m).to_owned()).collect();
            tasks.push(tokio::spawn(async move {
                let mut tick = tokio::time::interval(pace);
                for i in 0usize.. {
                    tick.tick().await;
                    if *rx.borrow() {
                        return;
                    }
                    let model = models[i % models.len()].clone();
                    let request_id = format!("r-{w}-{i}");
                    let call = exec(&client, &subject, &request_id, &model).await;
                    record.lock().unwrap().calls.push(call);
                }
            }));
        }
        if !ingest_nodes.is_empty() {
            let (js, subject, record, rx) = (
                async_nats::jetstream::new(c.client.clone()),
                c.subjects.ingest_execution(),
                record.clone(),
                rx.clone(),
            );
            let nodes: Vec<String> = ingest_nodes.iter().map(|n| (*n).to_owned()).collect();
            tasks.push(tokio::spawn(async move {
                let mut tick = tokio::time::interval(Duration::from_millis(50));
                for i in 0usize.. {
                    tick.tick().await;
                    if *rx.borrow() {
                        return;
                    }
                    let node = nodes[i % nodes.len()].clone();
                    let event_id = Uuid::new_v4();
                    let body = json!({
                        "event_id": event_id, "request_id": format!("ext-{i}"), "model_id": "m-ext",
                        "node_id": node, "outcome": if i % 7 == 0 { "error" } else { "success" },
                        "latency_ms": 12, "occurred_at": chrono::Utc::now(),
                    });
                    record.lock().unwrap().reports_sent.insert(event_id, node);
                    // Publish (and every 5th report, publish again): a publisher retrying.
                    let copies = if i % 5 == 0 { 2 } else { 1 };
                    for _ in 0..copies {
                        let publish = Publish::build()
                            .message_id(event_id.to_string())
                            .payload(body.to_string().into());
                        let acked = tokio::time::timeout(Duration::from_secs(2), async {
                            js.send_publish(subject.clone(), publish)
                                .await
                                .ok()?
                                .await
                                .ok()
                        })
                        .await
                        .ok()
                        .flatten();
                        if let Some(ack) = acked {
                            let mut r = record.lock().unwrap();
                            if ack.duplicate {
                                r.ingest_duplicate_acks += 1;
                            }
                            r.reports_acked.insert(event_id);
                        }
                    }
                }
            }));
        }
        Traffic {
            stop,
            tasks,
            record,
        }
    }

    pub fn calls(&self) -> Vec<Call> {
        self.record.lock().unwrap().calls.clone()
    }

    pub fn ok_count(&self) -> usize {
        self.record
            .lock()
            .unwrap()
            .calls
            .iter()
            .filter(|c| matches!(&c.seen, Seen::Reply(v) if v["ok"] == json!(true)))
            .count()
    }

    /// Waits until `n` more successful calls than now have been recorded.
    pub async fn wait_more_ok(&self, n: usize, what: &str) -> Duration {
        let target = self.ok_count() + n;
        eventually(what, Duration::from_secs(60), || async move {
            self.ok_count() >= target
        })
        .await
    }

    /// Waits until a call sent after `since` succeeded; returns when it was received.
    pub async fn wait_ok_after(&self, since: Instant, what: &str) -> Instant {
        eventually(what, Duration::from_secs(60), || async move {
            self.record.lock().unwrap().calls.iter().any(|c| {
                c.at >= since && matches!(&c.seen, Seen::Reply(v) if v["ok"] == json!(true))
            })
        })
        .await;
        self.record
            .lock()
            .unwrap()
            .calls
            .iter()
            .filter(|c| {
                c.at >= since && matches!(&c.seen, Seen::Reply(v) if v["ok"] == json!(true))
            })
            .map(|c| c.at + c.took)
            .min()
            .unwrap()
    }

    /// Stops every worker (each finishes its current call) and returns the record.
    pub async fn stop(self) -> Record {
        let _ = self.stop.send(true);
        for task in self.tasks {
            tokio::time::timeout(Duration::from_secs(15), task)
                .await
                .expect("traffic worker stops")
                .unwrap();
        }
        Arc::try_unwrap(self.record)
            .ok()
            .unwrap()
            .into_inner()
            .unwrap()
    }
}

/// One `cmd.exec` call with [`CALL_TIMEOUT`].
pub async fn exec(
    client: &async_nats::Client,
    subject: &str,
    request_id: &str,
    model: &str,
) -> Call {
    exec_within(client, subject, request_id, model, CALL_TIMEOUT).await
}

/// One `cmd.exec` call waiting at most `limit` (a repeated id of an execution cut short is only
/// answered `conflict` after `2 × timeout_ms + 2 s`).
pub async fn exec_within(
    client: &async_nats::Client,
    subject: &str,
    request_id: &str,
    model: &str,
    limit: Duration,
) -> Call {
    let body = json!({"request_id": request_id, "model_id": model, "input": {"q": request_id}, "timeout_ms": EXEC_TIMEOUT_MS});
    let at = Instant::now();
    let seen = match rpc::request_json(client, subject, &body, limit).await {
        Ok(v) => Seen::Reply(v),
        Err(rpc::Error::Timeout { .. }) => Seen::Timeout,
        Err(e) => Seen::Transport(e.to_string()),
    };
    Call {
        request_id: request_id.to_owned(),
        model_id: model.to_owned(),
        at,
        took: at.elapsed(),
        seen,
    }
}

// ---------------------------------------------------------------------------------------------
// The checks

/// The figures a fault test reports.
#[derive(Debug, Default)]
pub struct Figures {
    pub calls: usize,
    pub acknowledged: usize,
    pub unavailable: usize,
    pub timeouts: usize,
    pub transport_errors: usize,
    pub other_errors: BTreeMap<String, usize>,
    pub longest_call_ms: u128,
    pub events: i64,
    pub exec_streams: usize,
    pub orphans: usize,
    pub reports_sent: usize,
    pub reports_acked: usize,
    pub reports_logged: usize,
    pub ingest_duplicates_dropped: u64,
    pub relay_republished_duplicates: u64,
}

/// Everything a fault test checks after its fault, once the system is quiet:
/// acknowledged calls are recorded with the same outcome; no stream ends twice; every dispatch is
/// classified at most once (exactly once in finished streams); the log holds only requests and
/// reports the test sent, every acked report exactly once; the audit (chain + projections) is
/// clean; the events stream holds every event exactly once (count == head, and republishing the
/// whole log is dropped as duplicates in full).
pub async fn verify(c: &Cluster, record: &Record, projection_hosted: bool) -> Figures {
    let pool = c.store.pool();
    // Quiet: the relay (and the projection, if a reputation copy hosts it) reached the head, and
    // every acked report is in the log.
    let acked: Vec<Uuid> = record.reports_acked.iter().copied().collect();
    eventually(
        "relay and projection to reach the head",
        Duration::from_secs(60),
        || async {
            let head = c.head().await;
            let relay = c.checkpoint("relay").await;
            let book = c.checkpoint("deepnode_book").await;
            let reports: i64 =
                sqlx::query_scalar("SELECT count(*) FROM events WHERE event_id = ANY($1)")
                    .bind(&acked)
                    .fetch_one(pool)
                    .await
                    .unwrap_or(-1);
            relay == head
                && (!projection_hosted || book == head)
                && reports == i64::try_from(acked.len()).unwrap()
                && c.head().await == head
        },
    )
    .await;

    let mut f = Figures {
        calls: record.calls.len(),
        events: c.head().await,
        reports_sent: record.reports_sent.len(),
        reports_acked: record.reports_acked.len(),
        ingest_duplicates_dropped: record.ingest_duplicate_acks,
        ..Figures::default()
    };
    let sent_ids: BTreeSet<&str> = record.calls.iter().map(|c| c.request_id.as_str()).collect();
    for call in &record.calls {
        f.longest_call_ms = f.longest_call_ms.max(call.took.as_millis());
        match (&call.seen, call.code()) {
            (Seen::Timeout, _) => f.timeouts += 1,
            (Seen::Transport(_), _) => f.transport_errors += 1,
            (Seen::Reply(_), Some(code)) if code == "unavailable" => f.unavailable += 1,
            _ if call.acknowledged().is_some() => {}
            (Seen::Reply(_), Some(code)) => *f.other_errors.entry(code).or_default() += 1,
            (Seen::Reply(v), None) => panic!("reply without ok nor error: {v}"),
        }
        assert!(
            call.took <= CALL_TIMEOUT + Duration::from_secs(1),
            "call {} took {:?}",
            call.request_id,
            call.took
        );
    }

    // 1. Acknowledged calls are in `executions` with the same outcome.
    let rows: Vec<(String, String, Option<String>, bool)> =
        sqlx::query_as("SELECT request_id, status, node_id, charged FROM executions")
            .fetch_all(pool)
            .await
            .unwrap();
    let rows: BTreeMap<String, (String, Option<String>, bool)> = rows
        .into_iter()
        .map(|(r, s, n, ch)| (r, (s, n, ch)))
        .collect();
    let ends: Vec<(String, String, Value)> = sqlx::query_as(
        "SELECT stream_id, event_type, payload FROM events WHERE event_type IN ('ExecutionCompleted','ExecutionFailed')",
    )
    .fetch_all(pool)
    .await
    .unwrap();
    let mut end_of: BTreeMap<String, Vec<(String, Value)>> = BTreeMap::new();
    for (stream, ty, payload) in ends {
        end_of.entry(stream).or_default().push((ty, payload));
    }
    for call in &record.calls {
        let Some(reply) = call.acknowledged() else {
            continue;
        };
        f.acknowledged += 1;
        let stream = format!("exec-{}", call.request_id);
        let ends = end_of
            .get(&stream)
            .unwrap_or_else(|| panic!("acknowledged {} has no end in the log", call.request_id));
        let ok = reply["ok"] == json!(true);
        assert_eq!(
            ends[0].0,
            if ok {
                "ExecutionCompleted"
            } else {
                "ExecutionFailed"
            },
            "{}",
            call.request_id
        );
        if projection_hosted {
            let (status, node, charged) = rows
                .get(&call.request_id)
                .unwrap_or_else(|| panic!("{} not in executions", call.request_id));
            assert_eq!(
                status,
                if ok { "succeeded" } else { "failed" },
                "{}",
                call.request_id
            );
            assert_eq!(*charged, ok, "{}", call.request_id);
            if ok {
                assert_eq!(
                    node.as_deref(),
                    reply["node_id"].as_str(),
                    "{}",
                    call.request_id
                );
            }
        }
        if ok {
            assert_eq!(
                ends[0].1["node_id"], reply["node_id"],
                "{}",
                call.request_id
            );
        }
    }
    // 2. No request recorded (or charged) twice.
    for (stream, ends) in &end_of {
        assert_eq!(ends.len(), 1, "{stream} ended {} times", ends.len());
    }
    // 3. Every dispatch classified at most once; exactly once in finished streams.
    let per_stream: Vec<(String, i64, i64, i64, bool)> = sqlx::query_as(
        "SELECT stream_id,
                count(*) FILTER (WHERE event_type = 'AttemptDispatched'),
                count(*) FILTER (WHERE event_type IN ('AttemptSucceeded','AttemptFailed')),
                count(*) FILTER (WHERE event_type IN ('ExecutionCompleted','ExecutionFailed')),
                bool_or(event_type = 'ExecutionFailed' AND payload->>'error_code' = 'unavailable')
           FROM events WHERE stream_id LIKE 'exec-%' GROUP BY stream_id",
    )
    .fetch_all(pool)
    .await
    .unwrap();
    f.exec_streams = per_stream.len();
    for (stream, dispatched, settled, ended, unavailable) in &per_stream {
        let request = stream.trim_start_matches("exec-");
        assert!(
            sent_ids.contains(request)
                || request.starts_with("warmup-")
                || request.starts_with("retry-"),
            "{stream} was never sent by the test"
        );
        assert!(
            settled <= dispatched,
            "{stream}: {settled} classifications for {dispatched} dispatches"
        );
        if *unavailable {
            // Closed by a scheduler's sweeper after its own scheduler died, or ended when our own
            // bus was lost during its last attempt: that attempt's outcome is unknown and
            // deliberately left unclassified.
            f.orphans += 1;
        } else if *ended == 1 {
            assert_eq!(
                settled, dispatched,
                "{stream}: finished with an unclassified dispatch"
            );
        } else {
            f.orphans += 1;
        }
    }
    // 4. Ingest: every acked report once; nothing the test did not send.
    let reported: Vec<Uuid> =
        sqlx::query_scalar("SELECT event_id FROM events WHERE event_type = 'ExecutionReported'")
            .fetch_all(pool)
            .await
            .unwrap();
    f.reports_logged = reported.len();
    let reported_set: BTreeSet<Uuid> = reported.iter().copied().collect();
    assert_eq!(reported_set.len(), reported.len(), "a report logged twice");
    for id in &record.reports_acked {
        assert!(
            reported_set.contains(id),
            "acked report {id} missing from the log"
        );
    }
    for id in &reported_set {
        assert!(
            record.reports_sent.contains_key(id),
            "report {id} was never sent"
        );
    }
    // 5. The audit: chain intact, projections equal the fold.
    let report = deepnode_projections::audit(&c.store, &PolicyConfig::default(), |_| {})
        .await
        .unwrap();
    assert!(report.is_clean(), "audit found differences: {report:?}");
    // 6. The relay published every event exactly once.
    f.relay_republished_duplicates = check_events_stream(c).await;
    f
}

/// `stream messages == head`, and republishing every logged event with its id is dropped in full
/// as duplicates (so every event id is in the stream: with `head` messages, each exactly once).
async fn check_events_stream(c: &Cluster) -> u64 {
    let js = async_nats::jetstream::new(c.client.clone());
    let head = c.head().await;
    let messages = || async {
        let mut stream = js.get_stream(c.subjects.events_stream()).await.unwrap();
        stream.info().await.unwrap().state.messages
    };
    assert_eq!(
        messages().await,
        u64::try_from(head).unwrap(),
        "events stream count != log head"
    );
    // Only the events up to that head: one appended since (a late decision of a live service) may
    // not be relayed yet, and publishing it here first would be no duplicate.
    let mut duplicates = 0u64;
    let mut after = 0;
    while after < head {
        let page = c.store.read_all(after, 500).await.unwrap();
        let page: Vec<_> = page
            .into_iter()
            .filter(|e| e.global_position <= head)
            .collect();
        let Some(last) = page.last() else { break };
        after = last.global_position;
        let mut acks = Vec::new();
        for event in &page {
            let publish = Publish::build()
                .message_id(event.event_id.to_string())
                .payload(bytes::Bytes::from_static(b"{}"));
            acks.push(
                js.send_publish(c.subjects.events(&event.event_type), publish)
                    .await
                    .unwrap(),
            );
        }
        for ack in acks {
            let ack = ack.await.unwrap();
            assert!(
                ack.duplicate,
                "an event id the stream did not have: seq {}",
                ack.sequence
            );
            duplicates += 1;
        }
    }
    // Every one of the `head` ids was already there (a duplicate adds no message).
    assert_eq!(duplicates, u64::try_from(head).unwrap());
    duplicates
}

/// Ingest node ids of the default fleet.
pub const FLEET_NODES: [&str; 4] = ["n-0", "n-1", "n-2", "n-3"];

/// Every error code the traffic may legitimately see while a fault is on.
pub fn transient(code: &str) -> bool {
    [
        ErrorCode::Unavailable,
        ErrorCode::NoEligibleNodes,
        ErrorCode::Overloaded,
    ]
    .iter()
    .any(|c| c.as_str() == code)
}

/// Writes `figures` for the RELIABILITY report to stderr (shown with `--nocapture`).
pub fn report(name: &str, extra: &str, f: &Figures) {
    eprintln!("FAULT {name}: {extra}; {f:?}");
}

pub fn path_str(p: &Path) -> String {
    p.display().to_string()
}
