//! What the system benchmark reads of other processes, from `/proc`: CPU time (user + system) and
//! resident memory of one pid, and the pids of every process with a given name (Postgres runs one
//! process per connection plus its background workers; all of them count).

use std::path::Path;

/// Clock ticks per second of `/proc/<pid>/stat` times (`USER_HZ`, 100 on every Linux ABI we run on).
const TICKS_PER_SEC: f64 = 100.0;

/// CPU seconds (user + system) used so far by `pid` and by its children that have exited and been
/// waited for (`cutime`, `cstime`), or `None` if it is gone. Counting the reaped children keeps a
/// difference of two readings right when processes come and go in between: the CPU of a Postgres
/// backend that exits moves into the postmaster's children's time instead of vanishing (without
/// it, every connection closed during a phase took its whole lifetime's CPU off the phase's figure).
pub fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) is in parentheses and may hold spaces: count fields after it.
    let after_name = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    // Fields 14 to 17 (utime, stime, cutime, cstime) of the whole line are 12 to 15 after the name.
    let ticks = fields
        .get(11..15)?
        .iter()
        .map(|f| f.parse::<f64>().ok())
        .sum::<Option<f64>>()?;
    Some(ticks / TICKS_PER_SEC)
}

/// Resident set size of `pid` in MiB, or `None` if it is gone.
pub fn rss_mib(pid: u32) -> Option<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}

/// Every pid whose command name (`/proc/<pid>/comm`) is `name`.
pub fn pids_named(name: &str) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()))
        .filter(|pid| {
            std::fs::read_to_string(Path::new("/proc").join(pid.to_string()).join("comm"))
                .map(|comm| comm.trim_end() == name)
                .unwrap_or(false)
        })
        .collect()
}

/// CPU seconds used so far by every process named `name` that is alive now, with their exited
/// children's (see [`cpu_seconds`]): for Postgres, every backend that ever ran, alive or reaped by
/// the postmaster.
pub fn cpu_seconds_named(name: &str) -> f64 {
    pids_named(name).into_iter().filter_map(cpu_seconds).sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_its_own_process() {
        let me = std::process::id();
        // Burn a little CPU so the figure is not trivially zero on a coarse clock.
        let mut x = 0u64;
        for i in 0..20_000_000u64 {
            x = x.wrapping_mul(31).wrapping_add(i);
        }
        assert!(x != 1);
        assert!(cpu_seconds(me).is_some());
        assert!(rss_mib(me).expect("own RSS") > 0.0);
        assert!(cpu_seconds(u32::MAX).is_none());
    }

    #[test]
    fn counts_the_cpu_of_children_that_exited() {
        // A child that burns CPU and is waited for: its time stays in ours once it has gone.
        let me = std::process::id();
        let before = cpu_seconds(me).expect("own CPU");
        let status = std::process::Command::new("sh")
            .args(["-c", "i=0; while [ $i -lt 300000 ]; do i=$((i+1)); done"])
            .status()
            .expect("sh runs");
        assert!(status.success());
        let after = cpu_seconds(me).expect("own CPU");
        assert!(after - before >= 0.05, "{before} -> {after}");
    }
}
