//! The benchmark's own database: a fresh `deepnode_bench_<random>` on the server named by
//! `DATABASE_URL`, migrated with the store's migrations, dropped at the end; plus the machine and
//! server facts printed with every table (nproc, CPU, load, Postgres version and durability settings).
//!
//! It does not tune the server: the figures are for the settings it finds, which it reports.

use std::time::Duration;

use anyhow::{Context, Result};
use rand::Rng;
use sqlx::{Connection, PgConnection};
use url::Url;

/// A database created for one run.
pub struct BenchDb {
    /// Its name, `deepnode_bench_<hex>`.
    pub name: String,
    /// URL of the benchmark database.
    pub url: String,
    /// URL of the server's maintenance database, for CREATE/DROP DATABASE.
    admin_url: String,
}

impl BenchDb {
    /// Creates and migrates a fresh database on the server of `server_url`.
    pub async fn create(server_url: &str) -> Result<BenchDb> {
        let base =
            Url::parse(server_url).with_context(|| format!("parsing DATABASE_URL {server_url}"))?;
        let name = format!("deepnode_bench_{:08x}", rand::thread_rng().gen::<u32>());
        let mut url = base.clone();
        url.set_path(&format!("/{name}"));
        let mut admin = base;
        admin.set_path("/postgres");
        let bench = BenchDb {
            name,
            url: url.to_string(),
            admin_url: admin.to_string(),
        };
        deepnode_store::migrate(&bench.url)
            .await
            .with_context(|| format!("creating and migrating {}", bench.name))?;
        Ok(bench)
    }

    /// Opens one plain connection to the benchmark database.
    pub async fn connect(&self) -> Result<PgConnection> {
        PgConnection::connect(&self.url)
            .await
            .with_context(|| format!("connecting to {}", self.name))
    }

    /// Makes every later session on the benchmark database log each statement with its duration.
    pub async fn log_statements(&self) -> Result<()> {
        let mut admin = PgConnection::connect(&self.admin_url)
            .await
            .context("connecting to the maintenance database `postgres`")?;
        sqlx::query(&format!(
            "ALTER DATABASE \"{}\" SET log_min_duration_statement = 0",
            self.name
        ))
        .execute(&mut admin)
        .await
        .context("setting log_min_duration_statement on the benchmark database")?;
        Ok(())
    }

    /// Drops the database, disconnecting any session still on it.
    pub async fn drop_database(&self, timeout: Duration) -> Result<()> {
        let work = async {
            let mut admin = PgConnection::connect(&self.admin_url)
                .await
                .context("connecting to the maintenance database `postgres`")?;
            // The name is ours and matches [a-z0-9_]+, so quoting it is enough.
            sqlx::query(&format!(
                "DROP DATABASE IF EXISTS \"{}\" WITH (FORCE)",
                self.name
            ))
            .execute(&mut admin)
            .await
            .with_context(|| format!("dropping {}", self.name))?;
            anyhow::Ok(())
        };
        tokio::time::timeout(timeout, work)
            .await
            .context("timed out dropping the database")?
    }
}

/// Facts about the machine and server that the figures depend on.
pub struct Facts {
    pub nproc: usize,
    pub cpu: String,
    pub postgres: String,
    pub synchronous_commit: String,
    pub fsync: String,
    pub wal_sync_method: String,
    pub shared_buffers: String,
}

impl Facts {
    /// Reads the facts from /proc and the server.
    pub async fn gather(conn: &mut PgConnection) -> Result<Facts> {
        let postgres = show(conn, "server_version").await?;
        let synchronous_commit = show(conn, "synchronous_commit").await?;
        let fsync = show(conn, "fsync").await?;
        let wal_sync_method = show(conn, "wal_sync_method").await?;
        let shared_buffers = show(conn, "shared_buffers").await?;
        let cpu = cpu_model();
        Ok(Facts {
            nproc: std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(0),
            cpu,
            postgres,
            synchronous_commit,
            fsync,
            wal_sync_method,
            shared_buffers,
        })
    }

    /// A Markdown bullet list of the facts, with the load averages at `start` and now.
    pub fn markdown(&self, load_start: &str) -> String {
        format!(
            "- machine: nproc {}, {}\n- PostgreSQL {} — synchronous_commit={}, fsync={}, wal_sync_method={}, shared_buffers={}\n- load average (1/5/15 min) at start: {} — at end: {}\n",
            self.nproc,
            self.cpu,
            self.postgres,
            self.synchronous_commit,
            self.fsync,
            self.wal_sync_method,
            self.shared_buffers,
            load_start,
            load_average(),
        )
    }
}

/// The value of one server setting.
async fn show(conn: &mut PgConnection, name: &str) -> Result<String> {
    sqlx::query_scalar(&format!("SHOW {name}"))
        .fetch_one(conn)
        .await
        .with_context(|| format!("SHOW {name}"))
}

/// The CPU's model name from /proc/cpuinfo.
pub fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown".to_owned())
}

/// The 1/5/15-minute load averages from /proc/loadavg.
pub fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "unknown".to_owned())
}
