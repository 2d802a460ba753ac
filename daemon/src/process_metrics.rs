//! The daemon's own resource use, as the standard Prometheus process
//! metrics, read from `/proc/self` at each scrape, and
//! `nodemesh_build_info`.
//!
//! What one proxy per node costs is the reason to run it, so the daemon
//! reports it with the names every dashboard and alert already knows:
//! `process_cpu_seconds_total`, `process_resident_memory_bytes`,
//! `process_virtual_memory_bytes`, `process_open_fds`, `process_max_fds`,
//! `process_start_time_seconds` and `process_threads`. They are rendered
//! here as text appended to the exposition (the `metrics` crate's counters
//! are integers; CPU seconds are not). A file that cannot be read leaves its
//! metrics out rather than reporting a made-up zero.
//!
//! The files are read through [`HostFiles`], so parsing is tested without a
//! process.

use std::fmt::Write as _;
use std::path::Path;

use crate::host_files::HostFiles;

/// Clock ticks per second of `/proc/<pid>/stat` times: `USER_HZ`, fixed at
/// 100 by the Linux user-space ABI whatever the kernel's `HZ`.
const USER_HZ: f64 = 100.0;

/// One reading of the process.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ProcessSample {
    /// User + system CPU seconds.
    pub cpu_seconds: Option<f64>,
    /// Resident set size, bytes (`VmRSS`).
    pub resident_bytes: Option<u64>,
    /// Virtual memory size, bytes.
    pub virtual_bytes: Option<u64>,
    /// Threads.
    pub threads: Option<u64>,
    /// Start time, seconds since the Unix epoch.
    pub start_time_seconds: Option<f64>,
    /// Open file descriptors (the entries of `/proc/self/fd`, as the
    /// standard collectors count them).
    pub open_fds: Option<u64>,
    /// The soft limit on open file descriptors (`None` when unlimited).
    pub max_fds: Option<u64>,
}

/// Appends this process's metrics to `out`, as [`render`]; the boot time
/// (`/proc/stat`, long on a large machine, and constant) is read once.
pub fn render_host(out: &mut String) {
    static BOOT_TIME: std::sync::OnceLock<Option<u64>> = std::sync::OnceLock::new();
    let files = crate::host_files::Host;
    let boot_time = *BOOT_TIME.get_or_init(|| boot_time(&files));
    render(out, &sample(&files, boot_time));
}

/// The system's boot time, seconds since the epoch (`btime` of `/proc/stat`).
pub fn boot_time(files: &impl HostFiles) -> Option<u64> {
    files
        .read(Path::new("/proc/stat"))
        .and_then(|s| parse_boot_time(&s))
}

/// Reads the process through `files`; its start time is counted from
/// `boot_time` ([`boot_time`]).
pub fn sample(files: &impl HostFiles, boot_time: Option<u64>) -> ProcessSample {
    let stat = files
        .read(Path::new("/proc/self/stat"))
        .and_then(|s| parse_stat(&s));
    ProcessSample {
        cpu_seconds: stat.as_ref().map(|s| s.cpu_ticks as f64 / USER_HZ),
        resident_bytes: files
            .read(Path::new("/proc/self/status"))
            .and_then(|s| parse_vm_rss(&s)),
        virtual_bytes: stat.as_ref().map(|s| s.vsize),
        threads: stat.as_ref().map(|s| s.threads),
        start_time_seconds: stat
            .as_ref()
            .zip(boot_time)
            .map(|(s, boot)| boot as f64 + s.start_ticks as f64 / USER_HZ),
        open_fds: files.count(Path::new("/proc/self/fd")),
        max_fds: files
            .read(Path::new("/proc/self/limits"))
            .and_then(|s| parse_max_open_files(&s)),
    }
}

/// The fields of `/proc/self/stat` used here.
#[derive(Debug, PartialEq)]
struct Stat {
    cpu_ticks: u64,
    threads: u64,
    start_ticks: u64,
    vsize: u64,
}

/// `/proc/<pid>/stat` (proc(5)): the fields after the command name, which
/// is in parentheses and may itself hold spaces and parentheses.
fn parse_stat(text: &str) -> Option<Stat> {
    let (_, rest) = text.rsplit_once(')')?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // `rest` starts at field 3 (state): field n is at index n - 3.
    let field = |n: usize| fields.get(n - 3)?.parse::<u64>().ok();
    Some(Stat {
        cpu_ticks: field(14)?.checked_add(field(15)?)?,
        threads: field(20)?,
        start_ticks: field(22)?,
        vsize: field(23)?,
    })
}

/// `btime` of `/proc/stat`: boot time, seconds since the epoch.
fn parse_boot_time(text: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix("btime "))
        .and_then(|v| v.trim().parse().ok())
}

/// `VmRSS:   1234 kB` of `/proc/self/status`, in bytes.
fn parse_vm_rss(text: &str) -> Option<u64> {
    let v = text.lines().find_map(|l| l.strip_prefix("VmRSS:"))?;
    let kib = v.trim().strip_suffix("kB")?.trim().parse::<u64>().ok()?;
    kib.checked_mul(1024)
}

/// The soft limit of `Max open files` in `/proc/self/limits`.
fn parse_max_open_files(text: &str) -> Option<u64> {
    let v = text
        .lines()
        .find_map(|l| l.strip_prefix("Max open files"))?;
    v.split_whitespace().next()?.parse().ok()
}

/// Appends the process metrics and `nodemesh_build_info` to an exposition.
pub fn render(out: &mut String, s: &ProcessSample) {
    let text = |v: Option<u64>| v.map(|v| v.to_string());
    let real = |v: Option<f64>| v.map(|v| v.to_string());
    let metrics = [
        (
            "process_cpu_seconds_total",
            "counter",
            "Total user and system CPU time spent in seconds.",
            real(s.cpu_seconds),
        ),
        (
            "process_resident_memory_bytes",
            "gauge",
            "Resident memory size in bytes.",
            text(s.resident_bytes),
        ),
        (
            "process_virtual_memory_bytes",
            "gauge",
            "Virtual memory size in bytes.",
            text(s.virtual_bytes),
        ),
        (
            "process_threads",
            "gauge",
            "Number of OS threads in the process.",
            text(s.threads),
        ),
        (
            "process_start_time_seconds",
            "gauge",
            "Start time of the process since unix epoch in seconds.",
            real(s.start_time_seconds),
        ),
        (
            "process_open_fds",
            "gauge",
            "Number of open file descriptors.",
            text(s.open_fds),
        ),
        (
            "process_max_fds",
            "gauge",
            "Maximum number of open file descriptors.",
            text(s.max_fds),
        ),
    ];
    for (name, kind, help, value) in metrics {
        if let Some(v) = value {
            let _ = write!(
                out,
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {v}\n"
            );
        }
    }
    let _ = write!(
        out,
        "# HELP nodemesh_build_info The daemon's version, as a label (value 1).\n\
         # TYPE nodemesh_build_info gauge\n\
         nodemesh_build_info{{version=\"{}\"}} 1\n",
        env!("CARGO_PKG_VERSION")
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::host_files::Fake as Files;

    // A real /proc/self/stat line, with a command name holding ") (".
    const STAT: &str = "4242 (node) (mesh) S 1 4242 4242 0 -1 4194560 1795 0 0 0 \
                        250 130 0 0 20 0 3 0 987654 14680064 2100 18446744073709551615 \
                        1 1 0 0 0 0 0 4096 17987 0 0 0 17 1 0 0 0 0 0\n";

    fn files() -> Files {
        let mut files = Files::new(&[
            ("/proc/self/stat", STAT),
            ("/proc/stat", "cpu  1 2 3\nbtime 1790000000\nprocesses 9\n"),
            (
                "/proc/self/status",
                "Name:\tnodemesh\nVmRSS:\t    8704 kB\nThreads:\t3\n",
            ),
            (
                "/proc/self/limits",
                "Limit                     Soft Limit           Hard Limit           Units\n\
                 Max open files            1048576              1048576              files\n",
            ),
        ]);
        files.entries = Some(17);
        files
    }

    #[test]
    fn a_sample_reads_cpu_memory_threads_start_and_descriptors() {
        assert_eq!(
            sample(&files(), boot_time(&files())),
            ProcessSample {
                cpu_seconds: Some(3.8),
                resident_bytes: Some(8704 * 1024),
                virtual_bytes: Some(14_680_064),
                threads: Some(3),
                start_time_seconds: Some(1_790_000_000.0 + 9876.54),
                open_fds: Some(17),
                max_fds: Some(1_048_576),
            }
        );
    }

    #[test]
    fn unreadable_or_malformed_files_leave_their_metrics_out() {
        let mut f = files();
        f.text
            .insert("/proc/self/stat".into(), "4242 (node) S 1 2".into());
        f.text.insert(
            "/proc/self/limits".into(),
            "Max open files  unlimited unlimited files\n".into(),
        );
        f.text.remove(Path::new("/proc/self/status"));
        f.entries = None;
        let s = sample(&f, boot_time(&f));
        assert_eq!(s, ProcessSample::default());
        let mut out = String::new();
        render(&mut out, &s);
        assert!(!out.contains("process_"), "{out}");
        assert!(out.contains("nodemesh_build_info{version=\""), "{out}");
    }

    #[test]
    fn the_rendering_parses_as_prometheus_text_with_the_standard_names() {
        let mut out = String::new();
        render(&mut out, &sample(&files(), boot_time(&files())));
        let page = crate::promtext::parse(&out).expect("parses");
        let value = |name: &str| crate::promtext::sum(&page, name, &[]);
        assert_eq!(value("process_cpu_seconds_total"), 3.8);
        assert_eq!(value("process_resident_memory_bytes"), 8704.0 * 1024.0);
        assert_eq!(value("process_open_fds"), 17.0);
        assert_eq!(value("process_max_fds"), 1_048_576.0);
        assert_eq!(value("process_threads"), 3.0);
        assert_eq!(value("nodemesh_build_info"), 1.0);
        assert!(out.contains("# TYPE process_cpu_seconds_total counter"));
    }
}
