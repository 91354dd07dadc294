//! What every subcommand needs from the environment: a migrated, connected event store (CONTRACT §1:
//! every binary applies pending migrations at start) and the effective policy config.

use anyhow::Context as _;
use deepnode_bus::async_nats;
use deepnode_bus::ConnectPolicy;
use deepnode_domain::config::PolicyConfig;
use deepnode_projections::{ExportDir, LogSource};
use deepnode_store::EventStore;

use crate::cli::Cli;

/// Connects to `DATABASE_URL`, creating and migrating the database if needed.
pub async fn connect(cli: &Cli) -> anyhow::Result<EventStore> {
    EventStore::connect(&cli.database_url, 6)
        .await
        .with_context(|| {
            format!(
                "connecting to the database at {}",
                redact(&cli.database_url)
            )
        })
}

/// The log a command reads: the database, or an export (`--from DIR`).
pub enum Log {
    Store(EventStore),
    Export(ExportDir),
}

impl Log {
    /// Where to read its events.
    pub fn source(&self) -> LogSource<'_> {
        match self {
            Log::Store(store) => LogSource::Store(store),
            Log::Export(dir) => LogSource::Export(dir),
        }
    }
}

/// Opens the export `from` names, else connects to the database.
pub async fn open_log(cli: &Cli, from: Option<&std::path::Path>) -> anyhow::Result<Log> {
    match from {
        Some(dir) => {
            Ok(Log::Export(ExportDir::open(dir).with_context(|| {
                format!("opening the export {}", dir.display())
            })?))
        }
        None => Ok(Log::Store(connect(cli).await?)),
    }
}

/// Connects to `NATS_URL`, giving up after a few seconds (a wrong URL must not hang the CLI).
pub async fn connect_nats(cli: &Cli, name: &str) -> anyhow::Result<async_nats::Client> {
    let policy = ConnectPolicy {
        deadline: std::time::Duration::from_secs(5),
        ..ConnectPolicy::default()
    };
    deepnode_bus::connect_with(&cli.nats_url, name, policy)
        .await
        .with_context(|| format!("connecting to NATS at {}", cli.nats_url))
}

/// The policy: defaults, overridden by the TOML file named by `DEEPNODE_CONFIG` if set.
pub fn load_config(cli: &Cli) -> anyhow::Result<PolicyConfig> {
    let Some(path) = &cli.config else {
        return Ok(PolicyConfig::default());
    };
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading DEEPNODE_CONFIG {}", path.display()))?;
    PolicyConfig::from_toml_str(&text)
        .with_context(|| format!("parsing DEEPNODE_CONFIG {}", path.display()))
}

/// The URL without its password, for messages.
pub fn redact(url: &str) -> String {
    match url.split_once("://") {
        Some((scheme, rest)) => match rest.split_once('@') {
            Some((user, host)) => {
                let user = user.split(':').next().unwrap_or(user);
                format!("{scheme}://{user}@{host}")
            }
            None => url.to_owned(),
        },
        None => url.to_owned(),
    }
}
