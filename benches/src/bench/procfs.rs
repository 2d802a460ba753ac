//! Reading a process's CPU time and resident memory from `/proc`.
//!
//! CPU is `utime + stime` of `/proc/<pid>/stat` (all threads, in clock
//! ticks), memory is `VmRSS` of `/proc/<pid>/status`. The parsers are pure
//! functions of the file text so they are unit-tested.

use std::path::PathBuf;

use super::BenchError;

/// `utime + stime` in clock ticks from the text of `/proc/<pid>/stat`.
///
/// The command name (field 2) may hold spaces and parentheses, so fields are
/// counted after the last `)`: there field 3 (state) is index 0, utime
/// (field 14) index 11 and stime (field 15) index 12.
pub fn parse_stat_ticks(stat: &str) -> Option<u64> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(utime + stime)
}

/// `VmRSS` in KiB from the text of `/proc/<pid>/status`.
pub fn parse_status_rss_kib(status: &str) -> Option<u64> {
    parse_status_kib(status, "VmRSS:")
}

/// The KiB value of the `/proc/<pid>/status` line starting with `key`
/// (e.g. `RssAnon:`, `RssFile:`).
pub fn parse_status_kib(status: &str, key: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with(key))?;
    let mut parts = line[key.len()..].split_whitespace();
    let value: u64 = parts.next()?.parse().ok()?;
    match parts.next() {
        Some("kB") | None => Some(value),
        Some(_) => None,
    }
}

fn read(pid: u32, file: &str) -> Result<String, BenchError> {
    let path = PathBuf::from(format!("/proc/{pid}/{file}"));
    std::fs::read_to_string(&path).map_err(|source| BenchError::Io {
        what: format!("reading {}", path.display()),
        source,
    })
}

/// Clock ticks per second (`getconf CLK_TCK`; 100, Linux's fixed USER_HZ, if unavailable).
pub fn clock_ticks() -> f64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse::<f64>().ok())
        .filter(|t| *t > 0.0)
        .unwrap_or(100.0)
}

/// CPU seconds (user + system, all threads) used so far by `pid`.
pub fn cpu_seconds(pid: u32, ticks_per_second: f64) -> Result<f64, BenchError> {
    let text = read(pid, "stat")?;
    let ticks = parse_stat_ticks(&text).ok_or_else(|| BenchError::Measure {
        what: format!("/proc/{pid}/stat"),
        problem: "no utime/stime fields".into(),
    })?;
    Ok(ticks as f64 / ticks_per_second)
}

/// Sum of [`cpu_seconds`] over `pids`.
pub fn cpu_seconds_sum(pids: &[u32], ticks_per_second: f64) -> Result<f64, BenchError> {
    pids.iter().map(|p| cpu_seconds(*p, ticks_per_second)).sum()
}

/// Resident memory of `pid`, in KiB.
pub fn rss_kib(pid: u32) -> Result<u64, BenchError> {
    let text = read(pid, "status")?;
    parse_status_rss_kib(&text).ok_or_else(|| BenchError::Measure {
        what: format!("/proc/{pid}/status"),
        problem: "no VmRSS line".into(),
    })
}

/// Resident memory of `pid` split as (anonymous, file-backed, shared
/// memory) KiB: `RssAnon`, `RssFile`, `RssShmem`.
pub fn rss_split_kib(pid: u32) -> Result<[u64; 3], BenchError> {
    let text = read(pid, "status")?;
    let get = |k: &str| {
        parse_status_kib(&text, k).ok_or_else(|| BenchError::Measure {
            what: format!("/proc/{pid}/status"),
            problem: format!("no {k} line"),
        })
    };
    Ok([get("RssAnon:")?, get("RssFile:")?, get("RssShmem:")?])
}

/// Sum of [`rss_kib`] over `pids`.
pub fn rss_kib_sum(pids: &[u32]) -> Result<u64, BenchError> {
    pids.iter().map(|p| rss_kib(*p)).sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_ticks_skip_a_command_name_with_spaces_and_parens() {
        let stat = "1234 (node mesh) (x)) S 1 1234 1234 0 -1 4194560 100 0 0 0 250 75 0 0 20 0 4 0 100 1000000 500 18446744073709551615";
        assert_eq!(parse_stat_ticks(stat), Some(325));
        assert_eq!(parse_stat_ticks("1 (x) S 1"), None);
        assert_eq!(parse_stat_ticks("garbage"), None);
    }

    #[test]
    fn status_rss() {
        let status = "Name:\tnodemesh\nVmPeak:\t  100 kB\nVmRSS:\t    7424 kB\nThreads:\t3\n";
        assert_eq!(parse_status_rss_kib(status), Some(7424));
        let split = "RssAnon:\t    2048 kB\nRssFile:\t    5376 kB\nRssShmem:\t       0 kB\n";
        assert_eq!(parse_status_kib(split, "RssFile:"), Some(5376));
        assert_eq!(parse_status_kib(split, "RssAnon:"), Some(2048));
        assert_eq!(parse_status_rss_kib("Name:\tx\n"), None);
        assert_eq!(parse_status_rss_kib("VmRSS:\t 12 MB\n"), None);
    }

    #[test]
    fn reads_this_process() {
        let me = std::process::id();
        assert!(rss_kib(me).expect("rss") > 0);
        assert!(cpu_seconds(me, clock_ticks()).expect("cpu") >= 0.0);
    }
}
