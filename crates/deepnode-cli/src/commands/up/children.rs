//! The three service binaries as child processes of `deepnode up`: found next to the running
//! `deepnode` executable, started with CONTRACT §1's environment, each in its own process group (so
//! a terminal's Ctrl-C reaches only `deepnode up`, which then stops them in order), with stdout and
//! stderr going to `<run dir>/<binary>.log`. Stopping sends SIGTERM and waits, bounded, then kills.
//!
//! It does not restart a crashed service: `up` notices (see [`Services::exited`]) and stops the run.

use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use anyhow::{bail, Context as _};
use tokio::process::{Child, Command};

/// The service binaries `up` starts, in start order.
pub const BINARIES: [&str; 3] = [
    "deepnode-reputation",
    "deepnode-rotation",
    "deepnode-scheduler",
];

/// One running service.
pub struct Service {
    /// Binary name.
    pub name: &'static str,
    /// Its log file.
    pub log: PathBuf,
    child: Child,
}

/// The running services.
pub struct Services {
    list: Vec<Service>,
}

/// The directory holding the service binaries: the one of the running `deepnode` executable. Fails
/// with a build hint if any binary is missing there.
pub fn locate() -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe().context("finding the running deepnode executable")?;
    let dir = exe
        .parent()
        .map(Path::to_path_buf)
        .context("the deepnode executable has no parent directory")?;
    let missing: Vec<&str> = BINARIES
        .iter()
        .copied()
        .filter(|b| !dir.join(b).is_file())
        .collect();
    if !missing.is_empty() {
        bail!(
            "{} not found next to {}; build every binary first with `cargo build --release` (or run scripts/run.sh)",
            missing.join(", "),
            exe.display()
        );
    }
    Ok(dir)
}

/// Starts every binary of [`BINARIES`] from `bin_dir` with `env` added to the inherited
/// environment, and `own` (binary, variable, value) to that binary's only, logging to `run_dir`.
/// On failure, the ones already started are stopped.
pub async fn start(
    bin_dir: &Path,
    run_dir: &Path,
    env: &[(&str, String)],
    own: &[(&str, &str, String)],
) -> anyhow::Result<Services> {
    let mut services = Services { list: Vec::new() };
    for name in BINARIES {
        let mut env = env.to_vec();
        env.extend(
            own.iter()
                .filter(|(binary, _, _)| *binary == name)
                .map(|(_, key, value)| (*key, value.clone())),
        );
        match spawn(bin_dir, run_dir, name, &env) {
            Ok(service) => services.list.push(service),
            Err(e) => {
                services.stop(Duration::from_secs(10)).await;
                return Err(e);
            }
        }
    }
    Ok(services)
}

fn spawn(
    bin_dir: &Path,
    run_dir: &Path,
    name: &'static str,
    env: &[(&str, String)],
) -> anyhow::Result<Service> {
    let log = run_dir.join(format!("{name}.log"));
    let out = std::fs::File::create(&log).with_context(|| format!("creating {}", log.display()))?;
    let err = out
        .try_clone()
        .with_context(|| format!("opening {} twice", log.display()))?;
    let mut command = Command::new(bin_dir.join(name));
    command
        .stdin(Stdio::null())
        .stdout(Stdio::from(out))
        .stderr(Stdio::from(err))
        .kill_on_drop(true);
    // Its own process group: a terminal's Ctrl-C goes to `up` only, which stops traffic first.
    #[cfg(unix)]
    command.process_group(0);
    for (key, value) in env {
        command.env(key, value);
    }
    if std::env::var_os("RUST_LOG").is_none() {
        command.env("RUST_LOG", "info");
    }
    let child = command
        .spawn()
        .with_context(|| format!("starting {}", bin_dir.join(name).display()))?;
    Ok(Service { name, log, child })
}

impl Services {
    /// The first service that has exited, with its status and the tail of its log.
    pub fn exited(&mut self) -> Option<String> {
        for service in &mut self.list {
            if let Ok(Some(status)) = service.child.try_wait() {
                return Some(format!(
                    "{} exited ({}); last log line: {} (full log: {})",
                    service.name,
                    describe(status),
                    last_line(&service.log),
                    service.log.display()
                ));
            }
        }
        None
    }

    /// SIGTERMs every service, waits up to `grace` for all of them, kills those still running, and
    /// returns one `name: how it ended` line per service.
    pub async fn stop(&mut self, grace: Duration) -> Vec<String> {
        for service in &self.list {
            if let Some(pid) = service.child.id() {
                terminate(pid);
            }
        }
        let deadline = tokio::time::Instant::now() + grace;
        let mut report = Vec::new();
        for service in &mut self.list {
            let ended = tokio::time::timeout_at(deadline, service.child.wait()).await;
            let line = match ended {
                Ok(Ok(status)) => describe(status),
                Ok(Err(e)) => format!("could not be waited for: {e}"),
                Err(_) => {
                    let killed = service.child.kill().await;
                    match killed {
                        Ok(()) => format!("did not stop within {}s; killed", grace.as_secs()),
                        Err(e) => format!("did not stop and could not be killed: {e}"),
                    }
                }
            };
            report.push(format!("{}: {line}", service.name));
        }
        report
    }
}

/// Sends SIGTERM (through `kill(1)`: the workspace forbids `unsafe`, and no signal crate is a
/// dependency). A failure only means the process is already gone.
fn terminate(pid: u32) {
    let sent = std::process::Command::new("kill")
        .arg("-TERM")
        .arg(pid.to_string())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
    if let Err(e) = sent {
        eprintln!("deepnode: sending SIGTERM to {pid}: {e}");
    }
}

fn describe(status: ExitStatus) -> String {
    match status.code() {
        Some(0) => "exited 0".to_owned(),
        Some(code) => format!("exited {code}"),
        None => format!("ended by a signal ({status})"),
    }
}

/// The last non-empty line of a log file, or a placeholder.
pub fn last_line(path: &Path) -> String {
    std::fs::read_to_string(path)
        .ok()
        .and_then(|text| {
            text.lines()
                .rev()
                .find(|l| !l.trim().is_empty())
                .map(str::to_owned)
        })
        .unwrap_or_else(|| "(empty)".to_owned())
}
