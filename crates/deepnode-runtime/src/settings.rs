//! Process settings from the environment (CONTRACT §1): `DATABASE_URL`, `NATS_URL`, and the optional
//! `DEEPNODE_CONFIG` TOML file of policy overrides; for running several deployments (or tests) on one
//! NATS server, `DEEPNODE_SUBJECT_PREFIX` (subjects and stream names under another root than
//! `deepnode`) and `DEEPNODE_RELAY_LEASE_RETRY_MS` (how often a standby relay tries the lease).
//! Binaries read these once at start.

use std::path::PathBuf;
use std::time::Duration;

use deepnode_bus::subjects::Subjects;
use deepnode_domain::config::PolicyConfig;

/// Names the root of every subject and stream (default `deepnode`).
pub const SUBJECT_PREFIX_ENV: &str = "DEEPNODE_SUBJECT_PREFIX";
/// How often, in milliseconds, a standby relay tries to take the lease (default 1000).
pub const RELAY_LEASE_RETRY_ENV: &str = "DEEPNODE_RELAY_LEASE_RETRY_MS";

/// Default `NATS_URL` (CONTRACT §1).
pub const DEFAULT_NATS_URL: &str = "nats://127.0.0.1:4222";

/// Why the settings could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum SettingsError {
    #[error("reading DEEPNODE_CONFIG file {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("DEEPNODE_CONFIG file {path} is not a valid policy: {reason}")]
    Policy { path: PathBuf, reason: String },
    #[error("{name}={value:?} is not valid: {reason}")]
    Invalid {
        name: &'static str,
        value: String,
        reason: String,
    },
}

/// Where the store and the bus are, and the policy in force.
#[derive(Debug, Clone)]
pub struct Settings {
    pub database_url: String,
    pub nats_url: String,
    pub config_path: Option<PathBuf>,
    pub policy: PolicyConfig,
    /// The root of every subject and stream name (`DEEPNODE_SUBJECT_PREFIX`, default `deepnode`).
    pub subjects: Subjects,
    /// How often a standby relay tries to take the lease (`DEEPNODE_RELAY_LEASE_RETRY_MS`).
    pub relay_lease_retry: Option<Duration>,
}

impl Settings {
    /// Reads `DATABASE_URL`, `NATS_URL` and `DEEPNODE_CONFIG` (defaults per CONTRACT §1), and
    /// `DEEPNODE_SUBJECT_PREFIX` and `DEEPNODE_RELAY_LEASE_RETRY_MS`; an empty variable is unset.
    pub fn from_env() -> Result<Settings, SettingsError> {
        let var = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
        let mut settings = Settings::new(
            var("DATABASE_URL").unwrap_or_else(|| deepnode_store::DEFAULT_DATABASE_URL.to_owned()),
            var("NATS_URL").unwrap_or_else(|| DEFAULT_NATS_URL.to_owned()),
            var("DEEPNODE_CONFIG").map(PathBuf::from),
        )?;
        if let Some(prefix) = var(SUBJECT_PREFIX_ENV) {
            settings.subjects =
                Subjects::with_prefix(&prefix).map_err(|e| SettingsError::Invalid {
                    name: SUBJECT_PREFIX_ENV,
                    value: prefix.clone(),
                    reason: e.to_string(),
                })?;
        }
        if let Some(ms) = var(RELAY_LEASE_RETRY_ENV) {
            let parsed = ms.parse::<u64>().map_err(|e| SettingsError::Invalid {
                name: RELAY_LEASE_RETRY_ENV,
                value: ms.clone(),
                reason: e.to_string(),
            })?;
            settings.relay_lease_retry = Some(Duration::from_millis(parsed));
        }
        Ok(settings)
    }

    /// Settings from explicit values (tests, CLI flags); loads the policy file if one is named.
    pub fn new(
        database_url: String,
        nats_url: String,
        config_path: Option<PathBuf>,
    ) -> Result<Settings, SettingsError> {
        let policy = match &config_path {
            Some(path) => load_policy(path)?,
            None => PolicyConfig::default(),
        };
        Ok(Settings {
            database_url,
            nats_url,
            config_path,
            policy,
            subjects: Subjects::new(),
            relay_lease_retry: None,
        })
    }
}

/// Loads a TOML policy file; unset values keep POLICY.md's defaults.
pub fn load_policy(path: &std::path::Path) -> Result<PolicyConfig, SettingsError> {
    let text = std::fs::read_to_string(path).map_err(|source| SettingsError::Read {
        path: path.to_owned(),
        source,
    })?;
    PolicyConfig::from_toml_str(&text).map_err(|e| SettingsError::Policy {
        path: path.to_owned(),
        reason: e.to_string(),
    })
}

/// The log's signing key, from the file `DEEPNODE_LOG_KEY` names (CONTRACT §1), if set: the
/// reputation service signs checkpoints with it, the scheduler receipts.
pub fn log_key_from_env() -> Result<Option<deepnode_domain::note::NoteSigner>, String> {
    let Some(path) = std::env::var_os("DEEPNODE_LOG_KEY").filter(|p| !p.is_empty()) else {
        return Ok(None);
    };
    let text = std::fs::read_to_string(&path).map_err(|e| {
        format!(
            "reading DEEPNODE_LOG_KEY file {}: {e}",
            path.to_string_lossy()
        )
    })?;
    deepnode_domain::note::NoteSigner::decode(&text)
        .map(Some)
        .map_err(|e| format!("DEEPNODE_LOG_KEY file {}: {e}", path.to_string_lossy()))
}
