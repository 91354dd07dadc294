//! Test support shared by every crate's integration tests: a fresh, migrated PostgreSQL database per
//! test (dropped again when the test ends), unique NATS subject prefixes, event builders, the
//! waits every test uses ([`eventually`], [`log_until`]): a polled condition with a deadline, never
//! a fixed sleep — the facts a test starts from ([`given`]) and the services it runs in-process
//! ([`Services`], ready when [`answering`]).
//!
//! Tests run against the real servers named by `DATABASE_URL` and `NATS_URL`; nothing here mocks them.
//! Each test owns its database, so tests run in parallel and never see each other's rows.

use std::future::Future;
use std::str::FromStr;
use std::time::{Duration, Instant};

use chrono::{DateTime, TimeZone, Utc};
use deepnode_domain::log::{NewEvent, RecordedEvent};
use deepnode_store::EventStore;
use serde_json::Value;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{ConnectOptions, Connection, PgPool};
use uuid::Uuid;

mod given;
mod services;
pub use given::{given, node_id, Given};
pub use services::{answering, copies_counted, Services};

/// The server tests use: `DATABASE_URL` (its database name is replaced per test).
pub fn base_database_url() -> String {
    std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| deepnode_store::DEFAULT_DATABASE_URL.to_owned())
}

/// The NATS server tests use: `NATS_URL`.
pub fn nats_url() -> String {
    std::env::var("NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".to_owned())
}

/// Polls `check` every 20 ms until it holds and returns how long that took; panics naming `what`
/// once `limit` has passed.
pub async fn eventually<F, Fut>(what: &str, limit: Duration, mut check: F) -> Duration
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let started = Instant::now();
    until_some(what, limit, || {
        let holds = check();
        async move { holds.await.then_some(()) }
    })
    .await;
    started.elapsed()
}

/// Polls `check` every 20 ms until it yields a value and returns it; panics naming `what` once
/// `limit` has passed.
pub async fn until_some<T, F, Fut>(what: &str, limit: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let started = Instant::now();
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(
            started.elapsed() < limit,
            "timed out after {limit:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Reads the whole log until `check` holds of it and returns that read; panics naming `what` once
/// `limit` has passed.
pub async fn log_until<F>(
    store: &EventStore,
    what: &str,
    limit: Duration,
    check: F,
) -> Vec<RecordedEvent>
where
    F: Fn(&[RecordedEvent]) -> bool,
{
    until_some(what, limit, || async {
        let events = store.read_all(0, i64::MAX).await.expect("reading the log");
        check(&events).then_some(events)
    })
    .await
}

/// A short random token, for database names, subject prefixes and stream names.
pub fn unique_token() -> String {
    Uuid::new_v4().simple().to_string()[..12].to_owned()
}

/// A fresh, migrated database that is dropped when this value is dropped.
pub struct TestDb {
    name: String,
    url: String,
    admin: PgConnectOptions,
}

impl TestDb {
    /// Creates and migrates a database named `deepnode_test_<random>`.
    pub async fn new() -> TestDb {
        let base = PgConnectOptions::from_str(&base_database_url()).expect("DATABASE_URL parses");
        let name = format!("deepnode_test_{}", unique_token());
        let url = with_database(&base_database_url(), &name);
        deepnode_store::migrate(&url)
            .await
            .expect("test database migrates");
        TestDb {
            name,
            url,
            admin: base.database("postgres"),
        }
    }

    /// A name for a database that does not exist yet (dropped, if created, when this value drops).
    pub fn unmigrated() -> TestDb {
        let base = PgConnectOptions::from_str(&base_database_url()).expect("DATABASE_URL parses");
        let name = format!("deepnode_test_{}", unique_token());
        let url = with_database(&base_database_url(), &name);
        TestDb {
            name,
            url,
            admin: base.database("postgres"),
        }
    }

    /// Terminates every other connection to this database (a simulated crash or network cut).
    pub async fn kill_connections(&self) -> u64 {
        let mut conn = self.admin.connect().await.expect("admin connection");
        let killed: Vec<bool> = sqlx::query_scalar(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1 AND pid <> pg_backend_pid()",
        )
        .bind(&self.name)
        .fetch_all(&mut conn)
        .await
        .expect("terminate backends");
        killed.into_iter().filter(|k| *k).count() as u64
    }

    /// The database's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// A `DATABASE_URL` for this database (to hand to child processes).
    pub fn url(&self) -> &str {
        &self.url
    }

    /// A new pool on this database.
    pub async fn pool(&self) -> PgPool {
        PgPoolOptions::new()
            .max_connections(20)
            .connect(&self.url)
            .await
            .expect("connect to test database")
    }

    /// An event store on this database.
    pub async fn store(&self) -> EventStore {
        EventStore::from_pool(self.pool().await)
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let name = self.name.clone();
        let admin = self.admin.clone();
        // Drop runs outside async context guarantees; use a private runtime on a plain thread.
        let dropped = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .ok()?;
            runtime.block_on(async move {
                let mut conn = admin.connect().await.ok()?;
                let sql = format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)");
                sqlx::query(&sql).execute(&mut conn).await.ok()?;
                conn.close().await.ok()
            })
        });
        let _ = dropped.join();
    }
}

/// `base` with its database name replaced.
pub fn with_database(base: &str, name: &str) -> String {
    let mut url = url::Url::parse(base).expect("DATABASE_URL is a URL");
    url.set_path(&format!("/{name}"));
    url.to_string()
}

/// A fixed instant plus `seconds`, so tests never depend on the wall clock.
pub fn at(seconds: i64) -> DateTime<Utc> {
    Utc.timestamp_opt(1_767_225_600 + seconds, 0)
        .single()
        .unwrap_or_default()
}

/// A new event with a random id, empty metadata and `occurred_at = at(0)`.
pub fn event(event_type: &str, payload: Value) -> NewEvent {
    NewEvent {
        event_id: Uuid::new_v4(),
        event_type: event_type.to_owned(),
        schema_version: 1,
        payload,
        metadata: serde_json::json!({"correlation_id": "test", "causation_id": null, "producer": "test"}),
        occurred_at: at(0),
    }
}

/// A NATS server of a test's own (`nats-server -js` on a free port with a fresh store directory):
/// for a test that runs something on the default subject prefix (`deepnode up`), which would
/// collide with other runs on the shared server, or that restarts its server (the fault tests).
/// Stopped, and its directory removed, on drop.
pub struct PrivateNats {
    pub port: u16,
    pub store: std::path::PathBuf,
    child: Option<std::process::Child>,
}

impl PrivateNats {
    /// Starts it (`NATS_SERVER_BIN`, default `nats-server` on the PATH) and waits until its port
    /// accepts connections.
    pub async fn start() -> PrivateNats {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let store = std::env::temp_dir().join(format!("deepnode-nats-{}", unique_token()));
        std::fs::create_dir_all(&store).expect("a store directory");
        let mut nats = PrivateNats {
            port,
            store,
            child: None,
        };
        nats.spawn().await;
        nats
    }

    /// `nats://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    async fn spawn(&mut self) {
        let bin = std::env::var("NATS_SERVER_BIN").unwrap_or_else(|_| "nats-server".into());
        let child = std::process::Command::new(bin)
            .args([
                "-js",
                "-a",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-sd",
            ])
            .arg(&self.store)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("starting nats-server");
        self.child = Some(child);
        let port = self.port;
        eventually(
            "the private nats-server to listen",
            Duration::from_secs(20),
            || async move {
                tokio::net::TcpStream::connect(("127.0.0.1", port))
                    .await
                    .is_ok()
            },
        )
        .await;
    }

    /// Stops the server with SIGTERM (waiting for it to exit) and starts it again on the same port
    /// and store directory. Returns how long the server was away.
    pub async fn restart(&mut self) -> Duration {
        let started = Instant::now();
        self.stop().await;
        self.spawn().await;
        started.elapsed()
    }

    /// Starts the server again after [`PrivateNats::stop`].
    pub async fn start_again(&mut self) {
        self.spawn().await;
    }

    /// Stops the server with SIGTERM and waits for it to exit (SIGKILL after 15 s).
    pub async fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let pid = child.id().to_string();
            let _ = std::process::Command::new("kill")
                .args(["-TERM", &pid])
                .status();
            let deadline = Instant::now() + Duration::from_secs(15);
            while child.try_wait().expect("nats-server's status").is_none() {
                if Instant::now() > deadline {
                    let _ = child.kill();
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
}

impl Drop for PrivateNats {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = std::fs::remove_dir_all(&self.store);
    }
}
