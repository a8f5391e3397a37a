//! CPU time and memory of the server under test, read from `/proc`, so the
//! generator itself reports what the measured window cost the server.

use serde::{Deserialize, Serialize};

/// `/proc/<pid>/stat` counts CPU time in clock ticks of this length
/// (`USER_HZ`, 100 on every Linux architecture the tools here run on).
const TICKS_PER_SECOND: f64 = 100.0;

/// User plus system CPU seconds of all `pids` (every thread of each).
pub fn cpu_seconds(pids: &[u32]) -> Result<f64, String> {
    let mut ticks = 0u64;
    for pid in pids {
        let path = format!("/proc/{pid}/stat");
        let stat = std::fs::read_to_string(&path).map_err(|err| format!("{path}: {err}"))?;
        ticks += parse_cpu_ticks(&stat).ok_or_else(|| format!("{path}: unexpected format"))?;
    }
    Ok(ticks as f64 / TICKS_PER_SECOND)
}

/// `utime + stime` from a `/proc/<pid>/stat` line.
fn parse_cpu_ticks(stat: &str) -> Option<u64> {
    // The command name (field 2) may hold spaces and parentheses: count
    // fields from the last `)`. utime and stime are fields 14 and 15.
    let after_name = &stat[stat.rfind(')')? + 1..];
    let mut fields = after_name.split_whitespace().skip(11);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some(utime + stime)
}

/// Memory of the watched processes, summed (shared pages count once per
/// process, so a master/worker pair is slightly overstated).
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
pub struct Memory {
    /// Peak resident set (`VmHWM`), KiB.
    pub peak_rss_kib: u64,
    /// Resident set now (`VmRSS`), KiB.
    pub rss_kib: u64,
}

/// `VmHWM` and `VmRSS` of all `pids`, summed.
pub fn memory(pids: &[u32]) -> Result<Memory, String> {
    let mut total = Memory::default();
    for pid in pids {
        let path = format!("/proc/{pid}/status");
        let status = std::fs::read_to_string(&path).map_err(|err| format!("{path}: {err}"))?;
        total.peak_rss_kib += status_kib(&status, "VmHWM:").unwrap_or(0);
        total.rss_kib += status_kib(&status, "VmRSS:").unwrap_or(0);
    }
    Ok(total)
}

/// The value of a `Name:   123 kB` line of `/proc/<pid>/status`.
fn status_kib(status: &str, name: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|line| line.strip_prefix(name))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// What the watched processes spent inside the measurement window.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ProcessUse {
    pub pids: Vec<u32>,
    /// CPU seconds (user + system) during the window.
    pub cpu_seconds: f64,
    /// The same per 10,000 successful requests.
    pub cpu_seconds_per_10k: f64,
    /// Share of one core used during the window.
    pub cpu_cores: f64,
    /// Resident set when the window began, KiB (`rss_kib` is at its end).
    #[serde(default)]
    pub rss_at_start_kib: u64,
    #[serde(flatten)]
    pub memory: Memory,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_ticks_are_read_after_the_command_name() {
        let stat = "4242 (tokio (runtime) x) S 1 4242 4242 0 -1 4194560 900 0 0 0 \
                    123 45 0 0 20 0 3 0 100 1000 200 18446744073709551615";
        assert_eq!(parse_cpu_ticks(stat), Some(168));
        assert_eq!(parse_cpu_ticks("garbage"), None);
    }

    #[test]
    fn this_process_can_be_watched() {
        let me = std::process::id();
        assert!(cpu_seconds(&[me]).unwrap() >= 0.0);
        let memory = memory(&[me]).unwrap();
        assert!(memory.peak_rss_kib >= memory.rss_kib && memory.rss_kib > 0);
        assert_eq!(
            status_kib("VmHWM:\t  2048 kB\nVmRSS:\t 1024 kB\n", "VmRSS:"),
            Some(1024)
        );
    }
}
