//! Harness for deepnode's hostile-input, flood and security tests (issue 5), beside the services
//! themselves, which the tests run in-process with the end-to-end package's
//! [`deepnode_e2e::Cluster`] (a fresh database and a random subject prefix); [`rss_bytes`] reads this
//! process's resident memory; [`NatsServer`] starts a private `nats-server` (its own port, config and
//! store directory) for tests that need a special configuration, and kills it when dropped.
//!
//! It deliberately holds no assertions and never touches the shared NATS or Postgres configuration:
//! the tests in `tests/` say what must hold.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context as _};

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
