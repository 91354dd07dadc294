//! A service's settings (CONTRACT §1 and the README's tables), declared once as a clap parser
//! ([`ServiceArgs`]): each is an environment variable and a flag of the same meaning
//! (`DATABASE_URL` / `--database-url`…), so `deepnode-scheduler --help` lists them all. An empty
//! variable counts as unset (docker-compose passes `${VAR:-}`), here and in the `deepnode` CLI
//! ([`empty_env_is_unset`]). Binaries read them once at start.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{CommandFactory, FromArgMatches, Parser, ValueEnum};
use deepnode_bus::jetstream::Retention;
use deepnode_bus::subjects::Subjects;
use deepnode_domain::config::PolicyConfig;
use deepnode_domain::note::NoteSigner;

use crate::observability::{ObservabilityOptions, DEFAULT_METRICS_ADDR, DEFAULT_READY_MAX_LAG};

/// Names the root of every subject and stream (default `deepnode`).
pub const SUBJECT_PREFIX_ENV: &str = "DEEPNODE_SUBJECT_PREFIX";
/// How often, in milliseconds, a standby relay tries to take the lease (default 1000).
pub const RELAY_LEASE_RETRY_ENV: &str = "DEEPNODE_RELAY_LEASE_RETRY_MS";

/// How long, in seconds, the events stream keeps the log's publications (default a day; 0: for good).
pub const EVENTS_RETENTION_ENV: &str = "DEEPNODE_EVENTS_RETENTION_SECS";
/// How long, in seconds, the ingest stream keeps execution reports (default a week; 0: for good).
pub const INGEST_RETENTION_ENV: &str = "DEEPNODE_INGEST_RETENTION_SECS";

/// Default `NATS_URL` (CONTRACT §1).
pub const DEFAULT_NATS_URL: &str = "nats://127.0.0.1:4222";

/// What a service binary reads at start, from its flags or (the usual way) its environment.
#[derive(Debug, Clone, Parser)]
#[command(
    version,
    about = "A deepnode service; every setting is also an environment variable."
)]
pub struct ServiceArgs {
    /// PostgreSQL holding the event log and projections.
    #[arg(long, env = "DATABASE_URL", default_value = deepnode_store::DEFAULT_DATABASE_URL)]
    pub database_url: String,
    /// NATS server with JetStream.
    #[arg(long, env = "NATS_URL", default_value = DEFAULT_NATS_URL)]
    pub nats_url: String,
    /// A TOML file overriding the policy defaults (POLICY.md); unknown keys are refused.
    #[arg(long, env = "DEEPNODE_CONFIG")]
    pub config: Option<PathBuf>,
    /// The root of every subject and JetStream stream name.
    #[arg(long, env = SUBJECT_PREFIX_ENV, default_value = "deepnode", value_parser = subjects)]
    pub subject_prefix: Subjects,
    /// How often, in milliseconds, a standby relay tries to take the lease (default 1000).
    #[arg(long, env = RELAY_LEASE_RETRY_ENV, value_name = "MS")]
    pub relay_lease_retry_ms: Option<u64>,
    /// How long, in seconds, the JetStream events stream keeps each published event (0: for good).
    /// The log in PostgreSQL is the record; a subscriber further behind reads it there.
    #[arg(long, env = EVENTS_RETENTION_ENV, value_name = "SECS", default_value = "86400", value_parser = kept_for)]
    pub events_retention_secs: KeptFor,
    /// How long, in seconds, the JetStream ingest stream keeps each execution report (0: for good).
    #[arg(long, env = INGEST_RETENTION_ENV, value_name = "SECS", default_value = "604800", value_parser = kept_for)]
    pub ingest_retention_secs: KeptFor,
    /// The file holding the log's Ed25519 key (`deepnode keygen --out`): the reputation service
    /// signs checkpoints with it, the scheduler receipts. Unset: unsigned.
    #[arg(long, env = "DEEPNODE_LOG_KEY")]
    pub log_key: Option<PathBuf>,
    /// The `/metrics`, `/healthz`, `/readyz` listener's host:port, or `off`.
    #[arg(long, env = crate::observability::METRICS_ADDR_ENV, default_value = DEFAULT_METRICS_ADDR, value_parser = listen_addr)]
    pub metrics_addr: Listen,
    /// Events a gated checkpoint may lag the log's head before `/readyz` fails.
    #[arg(long, env = crate::observability::READY_MAX_LAG_ENV, default_value_t = DEFAULT_READY_MAX_LAG, value_parser = clap::value_parser!(i64).range(0..))]
    pub ready_max_lag: i64,
    /// `on`: follow the log from the bus (the relay's publications) instead of reading the
    /// database per commit (ARCHITECTURE.md, "Who reads the log").
    #[arg(
        long,
        env = "DEEPNODE_LOG_TAIL",
        default_value = "off",
        ignore_case = true
    )]
    pub log_tail: Switch,
    /// Log lines as text or JSON.
    #[arg(
        long,
        env = "DEEPNODE_LOG_FORMAT",
        default_value = "text",
        ignore_case = true
    )]
    pub log_format: LogFormat,
}

/// How long a stream keeps a message; `None`: for good.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeptFor(pub Option<Duration>);

fn kept_for(raw: &str) -> Result<KeptFor, String> {
    let secs: u64 = raw
        .trim()
        .parse()
        .map_err(|_| "not a number of seconds".to_owned())?;
    Retention::from_secs(secs).map(KeptFor)
}

/// A listener address, or none.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Listen(pub Option<SocketAddr>);

/// `on` or `off`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Switch {
    On,
    Off,
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

fn subjects(prefix: &str) -> Result<Subjects, String> {
    Subjects::with_prefix(prefix).map_err(|e| e.to_string())
}

fn listen_addr(raw: &str) -> Result<Listen, String> {
    let raw = raw.trim();
    if raw.eq_ignore_ascii_case("off") {
        return Ok(Listen(None));
    }
    raw.parse()
        .map(|addr| Listen(Some(addr)))
        .map_err(|_| "not host:port (or \"off\")".to_owned())
}

impl ServiceArgs {
    /// Parses the process's flags and environment for `binary`. `--help` and `--version` come back
    /// as an error that does not `use_stderr`, as clap has it.
    pub fn from_process(binary: &'static str, signs: bool) -> Result<ServiceArgs, clap::Error> {
        let command = ServiceArgs::command_for(binary, signs);
        ServiceArgs::from_arg_matches(&command.try_get_matches()?)
    }

    /// The command line of `binary`. A service that signs nothing still accepts `--log-key` (one
    /// environment may serve every service), but its `--help` does not offer it.
    pub fn command_for(binary: &'static str, signs: bool) -> clap::Command {
        let command = empty_env_is_unset(ServiceArgs::command().name(binary));
        command.mut_arg("log_key", |arg| arg.hide(!signs))
    }

    /// Parses `args` (the first is the binary's name) with the process's environment.
    pub fn try_from_args<I, T>(args: I) -> Result<ServiceArgs, clap::Error>
    where
        I: IntoIterator<Item = T>,
        T: Into<std::ffi::OsString> + Clone,
    {
        let matches = empty_env_is_unset(ServiceArgs::command()).try_get_matches_from(args)?;
        ServiceArgs::from_arg_matches(&matches)
    }

    /// Where the store and the bus are, and the policy in force (the policy file loaded).
    pub fn settings(&self) -> Result<Settings, SettingsError> {
        let mut settings = Settings::new(
            self.database_url.clone(),
            self.nats_url.clone(),
            self.config.clone(),
        )?;
        settings.subjects = self.subject_prefix.clone();
        settings.relay_lease_retry = self.relay_lease_retry_ms.map(Duration::from_millis);
        settings.retention = Retention {
            events: self.events_retention_secs.0,
            ingest: self.ingest_retention_secs.0,
        };
        Ok(settings)
    }

    /// The metrics listener's options, readiness gated on `gate_on`.
    pub fn observability(&self, gate_on: &[&str]) -> ObservabilityOptions {
        let mut options = ObservabilityOptions::on(SocketAddr::from(([127, 0, 0, 1], 0)), gate_on);
        options.addr = self.metrics_addr.0;
        options.max_lag = self.ready_max_lag;
        options
    }

    /// The log's signing key from the `--log-key` file, if one is named.
    pub fn log_key(&self) -> Result<Option<NoteSigner>, String> {
        let Some(path) = &self.log_key else {
            return Ok(None);
        };
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("reading DEEPNODE_LOG_KEY file {}: {e}", path.display()))?;
        NoteSigner::decode(&text)
            .map(Some)
            .map_err(|e| format!("DEEPNODE_LOG_KEY file {}: {e}", path.display()))
    }
}

/// `command` with every argument whose environment variable is set but empty treated as if the
/// variable were unset (its default, or absent): clap alone would take the empty value literally.
/// Applies to subcommands' arguments too.
pub fn empty_env_is_unset(command: clap::Command) -> clap::Command {
    let subcommands: Vec<String> = command
        .get_subcommands()
        .map(|c| c.get_name().to_owned())
        .collect();
    let command = command.mut_args(|arg| {
        let empty = arg
            .get_env()
            .and_then(std::env::var_os)
            .is_some_and(|value| value.is_empty());
        if empty {
            arg.env(None::<&'static str>)
        } else {
            arg
        }
    });
    subcommands.iter().fold(command, |command, name| {
        command.mut_subcommand(name, empty_env_is_unset)
    })
}

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
    /// The root of every subject and stream name (`DEEPNODE_SUBJECT_PREFIX`, default `deepnode`).
    pub subjects: Subjects,
    /// How often a standby relay tries to take the lease (`DEEPNODE_RELAY_LEASE_RETRY_MS`).
    pub relay_lease_retry: Option<Duration>,
    /// How long the events and ingest streams keep a message (`DEEPNODE_EVENTS_RETENTION_SECS`,
    /// `DEEPNODE_INGEST_RETENTION_SECS`).
    pub retention: Retention,
}

impl Settings {
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
            retention: Retention::default(),
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

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    // nextest runs each test in its own process, so setting the environment here touches no other.
    fn clear(names: &[&str]) {
        for name in names {
            std::env::remove_var(name);
        }
    }

    const NAMES: &[&str] = &[
        "DATABASE_URL",
        "NATS_URL",
        "DEEPNODE_CONFIG",
        SUBJECT_PREFIX_ENV,
        RELAY_LEASE_RETRY_ENV,
        EVENTS_RETENTION_ENV,
        INGEST_RETENTION_ENV,
        "DEEPNODE_LOG_KEY",
        crate::observability::METRICS_ADDR_ENV,
        crate::observability::READY_MAX_LAG_ENV,
        "DEEPNODE_LOG_TAIL",
        "DEEPNODE_LOG_FORMAT",
    ];

    #[test]
    fn only_a_service_that_signs_offers_the_log_key() {
        for (signs, offered) in [(true, true), (false, false)] {
            let help = ServiceArgs::command_for("svc", signs)
                .render_help()
                .to_string();
            assert_eq!(help.contains("--log-key"), offered, "{help}");
        }
        let accepted = ServiceArgs::command_for("svc", false)
            .try_get_matches_from(["svc", "--log-key", "/k"])
            .unwrap();
        let args = ServiceArgs::from_arg_matches(&accepted).unwrap();
        assert_eq!(args.log_key, Some(PathBuf::from("/k")));
    }

    #[test]
    fn every_setting_is_a_flag_and_a_variable_of_the_same_meaning() {
        clear(NAMES);
        let flags = ServiceArgs::try_from_args([
            "svc",
            "--database-url",
            "postgres://db/x",
            "--subject-prefix",
            "t1.run",
            "--relay-lease-retry-ms",
            "50",
            "--events-retention-secs",
            "3600",
            "--ingest-retention-secs",
            "0",
            "--metrics-addr",
            "off",
            "--log-tail",
            "ON",
        ])
        .unwrap();
        std::env::set_var("DATABASE_URL", "postgres://db/x");
        std::env::set_var(SUBJECT_PREFIX_ENV, "t1.run");
        std::env::set_var(RELAY_LEASE_RETRY_ENV, "50");
        std::env::set_var(EVENTS_RETENTION_ENV, "3600");
        std::env::set_var(INGEST_RETENTION_ENV, "0");
        std::env::set_var(crate::observability::METRICS_ADDR_ENV, "off");
        std::env::set_var("DEEPNODE_LOG_TAIL", "ON");
        let vars = ServiceArgs::try_from_args(["svc"]).unwrap();
        for args in [flags, vars] {
            let settings = args.settings().unwrap();
            assert_eq!(settings.database_url, "postgres://db/x");
            assert_eq!(settings.nats_url, DEFAULT_NATS_URL);
            assert_eq!(settings.subjects, Subjects::with_prefix("t1.run").unwrap());
            assert_eq!(settings.relay_lease_retry, Some(Duration::from_millis(50)));
            let hour = Some(Duration::from_secs(3600));
            assert_eq!(
                settings.retention,
                Retention {
                    events: hour,
                    ingest: None
                }
            );
            assert_eq!(args.observability(&["relay"]).addr, None);
            assert_eq!(args.log_tail, Switch::On);
            assert_eq!(args.log_format, LogFormat::Text);
        }
    }

    #[test]
    fn an_empty_variable_is_unset() {
        clear(NAMES);
        for name in NAMES {
            std::env::set_var(name, "");
        }
        let args = ServiceArgs::try_from_args(["svc"]).unwrap();
        let settings = args.settings().unwrap();
        assert_eq!(settings.database_url, deepnode_store::DEFAULT_DATABASE_URL);
        assert_eq!(settings.nats_url, DEFAULT_NATS_URL);
        assert_eq!(settings.config_path, None);
        assert_eq!(settings.subjects, Subjects::new());
        assert_eq!(settings.relay_lease_retry, None);
        assert_eq!(settings.retention, Retention::default());
        assert_eq!(args.log_key().unwrap().map(|k| k.name().to_owned()), None);
        let observe = args.observability(&[]);
        assert_eq!(observe.addr, Some(DEFAULT_METRICS_ADDR.parse().unwrap()));
        assert_eq!(observe.max_lag, DEFAULT_READY_MAX_LAG);
        assert_eq!(args.log_tail, Switch::Off);

        // …for a subcommand's arguments too (the `deepnode` CLI's shape)
        let command = clap::Command::new("cli").subcommand(
            clap::Command::new("verify").arg(
                clap::Arg::new("keys")
                    .long("keys")
                    .env("DEEPNODE_CONFIG")
                    .default_value("none"),
            ),
        );
        let matches = empty_env_is_unset(command)
            .try_get_matches_from(["cli", "verify"])
            .unwrap();
        let verify = matches.subcommand_matches("verify").unwrap();
        assert_eq!(verify.get_one::<String>("keys").unwrap(), "none");
    }

    #[test]
    fn a_bad_value_is_refused_naming_its_setting() {
        clear(NAMES);
        for (flag, value) in [
            ("--relay-lease-retry-ms", "soon"),
            ("--subject-prefix", "a..b"),
            ("--metrics-addr", "nowhere"),
            ("--ready-max-lag", "-1"),
            ("--log-tail", "maybe"),
            ("--events-retention-secs", "a day"),
            ("--ingest-retention-secs", "-1"),
        ] {
            let e = ServiceArgs::try_from_args(["svc", &format!("{flag}={value}")]).unwrap_err();
            assert!(e.use_stderr());
            assert!(e.to_string().contains(flag), "{flag}: {e}");
        }
        // a variable is named by its flag, which `--help` ties to it
        std::env::set_var(RELAY_LEASE_RETRY_ENV, "soon");
        let e = ServiceArgs::try_from_args(["svc"]).unwrap_err();
        assert!(e.to_string().contains("--relay-lease-retry-ms"), "{e}");
    }

    #[test]
    fn a_retention_shorter_than_the_duplicate_window_is_refused() {
        clear(NAMES);
        std::env::set_var(EVENTS_RETENTION_ENV, "60");
        let e = ServiceArgs::try_from_args(["svc"]).unwrap_err();
        let message = e.to_string();
        assert!(message.contains("--events-retention-secs"), "{message}");
        assert!(message.contains("duplicate window (600 s)"), "{message}");
        std::env::set_var(EVENTS_RETENTION_ENV, "600");
        let args = ServiceArgs::try_from_args(["svc"]).unwrap();
        let events = args.settings().unwrap().retention.events;
        assert_eq!(events, Some(deepnode_bus::jetstream::DUPLICATE_WINDOW));
    }
}
