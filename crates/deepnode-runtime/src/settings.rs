//! Process settings from the environment (CONTRACT §1): `DATABASE_URL`, `NATS_URL`, and the optional
//! `DEEPNODE_CONFIG` TOML file of policy overrides. Binaries read these once at start.

use std::path::PathBuf;

use deepnode_domain::config::PolicyConfig;

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
}

/// Where the store and the bus are, and the policy in force.
#[derive(Debug, Clone)]
pub struct Settings {
    pub database_url: String,
    pub nats_url: String,
    pub config_path: Option<PathBuf>,
    pub policy: PolicyConfig,
}

impl Settings {
    /// Reads `DATABASE_URL`, `NATS_URL` and `DEEPNODE_CONFIG` (defaults per CONTRACT §1).
    pub fn from_env() -> Result<Settings, SettingsError> {
        let var = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
        Settings::new(
            var("DATABASE_URL").unwrap_or_else(|| deepnode_store::DEFAULT_DATABASE_URL.to_owned()),
            var("NATS_URL").unwrap_or_else(|| DEFAULT_NATS_URL.to_owned()),
            var("DEEPNODE_CONFIG").map(PathBuf::from),
        )
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
