//! Harness for deepnode's hostile-input, flood and security tests (issue 5): a [`Stack`] runs the
//! reputation, rotation and scheduler services in-process on a fresh database (`TestDb`) and a random
//! subject prefix, and can tell whether any service task has ended; [`rss_bytes`] reads this
//! process's resident memory; [`NatsServer`] starts a private `nats-server` (its own port, config and
//! store directory) for tests that need a special configuration, and kills it when dropped.
//!
//! It deliberately holds no assertions and never touches the shared NATS or Postgres configuration:
//! the tests in `tests/` say what must hold.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context as _};
use deepnode_bus::{async_nats, rpc, Subjects};
use deepnode_domain::config::PolicyConfig;
use deepnode_reputation::{ReputationOptions, Stats};
use deepnode_rotation::RotationOptions;
use deepnode_runtime::{ServiceContext, Shutdown};
use deepnode_scheduler::SchedulerOptions;
use deepnode_store::EventStore;
use deepnode_testkit::{nats_url, TestDb};
use serde_json::{json, Value};
use tokio::task::JoinHandle;

/// One in-process service.
struct Running {
    name: &'static str,
    shutdown: Shutdown,
    task: JoinHandle<anyhow::Result<()>>,
}

/// The three services on a private database and subject prefix.
pub struct Stack {
    /// The test's database.
    pub db: TestDb,
    /// A store on it, for head positions and assertions.
    pub store: EventStore,
    /// The subjects every part uses.
    pub subjects: Subjects,
    /// The test's own client.
    pub client: async_nats::Client,
    /// The reputation service's counters (ingest terminated, ...).
    pub reputation_stats: Arc<Stats>,
    running: Vec<Running>,
}

impl Stack {
    /// A fresh database and prefix with reputation, rotation and one scheduler running and answering.
    pub async fn start(scheduler: SchedulerOptions) -> anyhow::Result<Stack> {
        let db = TestDb::new().await;
        let store = db.store().await;
        let client = async_nats::connect(nats_url())
            .await
            .context("connecting the test client to NATS")?;
        let mut stack = Stack {
            db,
            store,
            subjects: Subjects::random(),
            client,
            reputation_stats: Arc::default(),
            running: Vec::new(),
        };
        let policy = PolicyConfig::default();

        let ctx = stack.context("reputation", &policy).await?;
        let options = ReputationOptions {
            offline_after: Duration::from_secs(600),
            tick: Duration::from_millis(200),
            nak_delay: Duration::from_millis(200),
            ..ReputationOptions::from_policy(&policy)
        };
        stack.reputation_stats = options.stats.clone();
        stack.spawn("reputation", |stop| async move {
            Ok(deepnode_reputation::run(ctx, options, stop).await?)
        });

        let ctx = stack.context("rotation", &policy).await?;
        let options = RotationOptions {
            periodic: false,
            ..RotationOptions::default()
        };
        stack.spawn("rotation", |stop| async move {
            Ok(deepnode_rotation::run(ctx, options, stop).await?)
        });

        let ctx = stack.context("scheduler", &policy).await?;
        stack.spawn("scheduler", |stop| async move {
            Ok(deepnode_scheduler::run(ctx, scheduler, stop).await?)
        });

        for subject in [
            stack.subjects.cmd_node_deregister(),
            stack.subjects.cmd_model_deploy(),
            stack.subjects.cmd_schedule(),
        ] {
            stack.wait_answering(&subject).await?;
        }
        Ok(stack)
    }

    fn spawn<F, Fut>(&mut self, name: &'static str, body: F)
    where
        F: FnOnce(Shutdown) -> Fut,
        Fut: std::future::Future<Output = anyhow::Result<()>> + Send + 'static,
    {
        let shutdown = Shutdown::new();
        let task = tokio::spawn(body(shutdown.clone()));
        self.running.push(Running {
            name,
            shutdown,
            task,
        });
    }

    /// A service context of its own (pool and NATS connection), with the JetStream streams ensured.
    async fn context(
        &self,
        producer: &str,
        policy: &PolicyConfig,
    ) -> anyhow::Result<ServiceContext> {
        let nats = async_nats::connect(nats_url())
            .await
            .context("connecting to NATS")?;
        let js = async_nats::jetstream::new(nats.clone());
        deepnode_bus::jetstream::ensure_streams(&js, &self.subjects)
            .await
            .context("creating the JetStream streams")?;
        Ok(ServiceContext {
            store: self.db.store().await,
            nats,
            js,
            subjects: self.subjects.clone(),
            policy: Arc::new(policy.clone()),
            producer: producer.to_owned(),
        })
    }

    /// Waits until something answers on `subject` (an empty command is refused, appending nothing).
    async fn wait_answering(&self, subject: &str) -> anyhow::Result<()> {
        for _ in 0..300 {
            let probe = rpc::request_json(
                &self.client,
                subject,
                &json!({}),
                Duration::from_millis(300),
            )
            .await;
            if probe.is_ok() {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        bail!("nothing answers on {subject}")
    }

    /// The names of service tasks that have ended (should be none while the test runs).
    pub fn ended(&self) -> Vec<&'static str> {
        self.running
            .iter()
            .filter(|r| r.task.is_finished())
            .map(|r| r.name)
            .collect()
    }

    /// The log's head position.
    pub async fn head(&self) -> anyhow::Result<i64> {
        Ok(self.store.head_position().await?)
    }

    /// Sends a JSON command and returns the reply.
    pub async fn request(&self, subject: &str, body: &Value) -> anyhow::Result<Value> {
        rpc::request_json(&self.client, subject, body, Duration::from_secs(30))
            .await
            .with_context(|| format!("request on {subject}"))
    }

    /// Stops every service (bounded), then deletes this prefix's JetStream streams.
    pub async fn stop(self) -> anyhow::Result<()> {
        for r in &self.running {
            r.shutdown.trigger();
        }
        for r in self.running {
            match tokio::time::timeout(Duration::from_secs(30), r.task).await {
                Ok(Ok(Ok(()))) => {}
                Ok(Ok(Err(e))) => bail!("{} ended with an error: {e:#}", r.name),
                Ok(Err(e)) => bail!("{} panicked: {e}", r.name),
                Err(_) => bail!("{} did not stop within 30 s", r.name),
            }
        }
        let js = async_nats::jetstream::new(self.client.clone());
        for stream in [self.subjects.events_stream(), self.subjects.ingest_stream()] {
            // Best effort: the prefix is random, a leftover stream harms no one.
            let _ = js.delete_stream(&stream).await;
        }
        Ok(())
    }
}

/// This process's resident set size in bytes (`VmRSS` of `/proc/self/status`), or 0 if unreadable.
pub fn rss_bytes() -> u64 {
    let Ok(status) = std::fs::read_to_string("/proc/self/status") else {
        return 0;
    };
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

/// A TCP port nothing listens on right now (bound and released at once).
pub fn free_port() -> anyhow::Result<u16> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").context("binding port 0")?;
    Ok(listener.local_addr()?.port())
}

/// A private `nats-server` child process, killed (and its directory removed) on drop.
pub struct NatsServer {
    child: Child,
    dir: PathBuf,
    /// Its client port on 127.0.0.1.
    pub port: u16,
}

impl NatsServer {
    /// Starts `nats-server -c <config>` with `-p <free port>`, a private JetStream store directory
    /// (`-sd`) and the given environment (for `$VAR` references in the config), and waits until the
    /// port accepts connections.
    pub async fn start(config: &Path, env: &[(&str, &str)]) -> anyhow::Result<NatsServer> {
        let port = free_port()?;
        let dir = std::env::temp_dir().join(format!("deepnode-sec-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).context("creating the nats-server store directory")?;
        let mut cmd =
            Command::new(std::env::var("NATS_SERVER_BIN").unwrap_or_else(|_| "nats-server".into()));
        cmd.arg("-c")
            .arg(config)
            .arg("-p")
            .arg(port.to_string())
            .arg("-sd")
            .arg(&dir)
            .arg("-a")
            .arg("127.0.0.1")
            .arg("-m")
            .arg("0")
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().context("starting nats-server")?;
        for _ in 0..100 {
            if tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .is_ok()
            {
                return Ok(NatsServer { child, dir, port });
            }
            if let Some(status) = child.try_wait()? {
                let mut err = String::new();
                if let Some(mut e) = child.stderr.take() {
                    use std::io::Read as _;
                    let _ = e.read_to_string(&mut err);
                }
                bail!("nats-server exited with {status}: {err}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let _ = child.kill();
        bail!("nats-server did not listen on port {port}")
    }

    /// `nats://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
