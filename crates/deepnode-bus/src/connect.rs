//! Connecting to NATS with a bounded retry and backoff, a connection name, and logged connection
//! events.
//!
//! It deliberately does not use `retry_on_initial_connect`: that returns a client before any server
//! answered, so a wrong `NATS_URL` would hang forever instead of failing with exit code 2. Instead we
//! retry up to a deadline, and once connected the client reconnects on its own indefinitely.
//!
//! Credentials come from the environment only (see `deploy/nats.conf`), never from code:
//! `NATS_CREDS` (a `.creds` file), else `NATS_USER` + `NATS_PASSWORD`, else `NATS_TOKEN`; none set
//! means an anonymous connection, as before.

use backon::{BackoffBuilder, ExponentialBuilder};
use std::time::Duration;

use async_nats::{Client, ConnectOptions, Event};

/// Why no connection could be made.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Every attempt failed until the deadline; the last error is kept.
    #[error("connecting to NATS at {url} failed after {attempts} attempts: {source}")]
    Connect {
        /// The URL tried.
        url: String,
        /// How many attempts were made.
        attempts: u32,
        /// The last attempt's error.
        #[source]
        source: async_nats::ConnectError,
    },
    /// The `NATS_CREDS` file could not be read.
    #[error("reading NATS credentials file {path}: {source}")]
    Credentials {
        /// The file named by `NATS_CREDS`.
        path: String,
        /// Why it could not be read.
        #[source]
        source: std::io::Error,
    },
}

/// How to authenticate, from `NATS_CREDS`, `NATS_USER` + `NATS_PASSWORD` or `NATS_TOKEN`.
#[derive(Clone, PartialEq, Eq)]
pub enum Auth {
    /// No credentials.
    Anonymous,
    /// A `.creds` file (JWT + NKey seed).
    CredsFile(String),
    /// User and password.
    UserPassword(String, String),
    /// A token.
    Token(String),
}

impl std::fmt::Debug for Auth {
    // Never print secrets.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Anonymous => f.write_str("Anonymous"),
            Self::CredsFile(path) => write!(f, "CredsFile({path})"),
            Self::UserPassword(user, _) => write!(f, "UserPassword({user}, ***)"),
            Self::Token(_) => f.write_str("Token(***)"),
        }
    }
}

impl Auth {
    /// Reads the credential variables; empty values count as unset.
    pub fn from_env() -> Auth {
        let var = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
        if let Some(path) = var("NATS_CREDS") {
            Auth::CredsFile(path)
        } else if let (Some(user), Some(password)) = (var("NATS_USER"), var("NATS_PASSWORD")) {
            Auth::UserPassword(user, password)
        } else if let Some(token) = var("NATS_TOKEN") {
            Auth::Token(token)
        } else {
            Auth::Anonymous
        }
    }

    async fn apply(&self, options: ConnectOptions) -> Result<ConnectOptions, Error> {
        Ok(match self {
            Auth::Anonymous => options,
            Auth::CredsFile(path) => {
                options
                    .credentials_file(path)
                    .await
                    .map_err(|source| Error::Credentials {
                        path: path.clone(),
                        source,
                    })?
            }
            Auth::UserPassword(user, password) => {
                options.user_and_password(user.clone(), password.clone())
            }
            Auth::Token(token) => options.token(token.clone()),
        })
    }
}

/// How long and how fast to retry the first connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnectPolicy {
    /// Give up once this much time has passed since the first attempt.
    pub deadline: Duration,
    /// Wait before the second attempt; doubled after each failure up to `max_backoff`.
    pub initial_backoff: Duration,
    /// Longest wait between attempts.
    pub max_backoff: Duration,
    /// Timeout of one connection attempt.
    pub attempt_timeout: Duration,
}

impl Default for ConnectPolicy {
    fn default() -> Self {
        Self {
            deadline: Duration::from_secs(15),
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(2),
            attempt_timeout: Duration::from_secs(3),
        }
    }
}

/// Connects to `url` as connection `name` (shown by the server's monitoring), with the credentials
/// of [`Auth::from_env`], retrying with the default [`ConnectPolicy`].
pub async fn connect(url: &str, name: &str) -> Result<Client, Error> {
    connect_with(url, name, ConnectPolicy::default()).await
}

/// Connects like [`connect`] with an explicit retry policy (credentials from the environment).
pub async fn connect_with(url: &str, name: &str, policy: ConnectPolicy) -> Result<Client, Error> {
    connect_with_auth(url, name, policy, &Auth::from_env()).await
}

/// Connects like [`connect_with`] with explicit credentials.
pub async fn connect_with_auth(
    url: &str,
    name: &str,
    policy: ConnectPolicy,
    auth: &Auth,
) -> Result<Client, Error> {
    let started = tokio::time::Instant::now();
    let mut delays = ExponentialBuilder::new()
        .with_min_delay(policy.initial_backoff)
        .with_max_delay(policy.max_backoff)
        .without_max_times()
        .build();
    let mut attempts = 0u32;
    loop {
        attempts += 1;
        let conn_name = name.to_owned();
        let options = ConnectOptions::new()
            .name(name)
            .connection_timeout(policy.attempt_timeout)
            .max_reconnects(None)
            .event_callback(move |event| {
                let conn_name = conn_name.clone();
                async move { log_event(&conn_name, event) }
            });
        let options = auth.apply(options).await?;
        match options.connect(url).await {
            Ok(client) => {
                tracing::info!(url, name, attempts, "connected to NATS");
                return Ok(client);
            }
            Err(source) => {
                let backoff = delays.next().unwrap_or(policy.max_backoff);
                if started.elapsed() + backoff >= policy.deadline {
                    return Err(Error::Connect {
                        url: url.to_owned(),
                        attempts,
                        source,
                    });
                }
                tracing::warn!(url, name, attempts, error = %source, ?backoff, "NATS not reachable yet; retrying");
                tokio::time::sleep(backoff).await;
            }
        }
    }
}

fn log_event(name: &str, event: Event) {
    match event {
        Event::Connected => tracing::info!(name, "NATS connection (re)established"),
        Event::Disconnected => tracing::warn!(name, "NATS connection lost; reconnecting"),
        Event::LameDuckMode => tracing::warn!(name, "NATS server entering lame duck mode"),
        Event::SlowConsumer(sid) => tracing::warn!(name, sid, "slow consumer: messages dropped"),
        // e.g. a permissions violation: the account does not allow what this service tried.
        Event::ServerError(e) => tracing::warn!(name, error = %e, "NATS server error"),
        other => tracing::debug!(name, event = %other, "NATS event"),
    }
}
