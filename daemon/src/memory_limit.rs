//! The container's memory limit, read from the daemon's cgroup at start, and
//! the check that what the configuration lets the daemon hold fits in it:
//! the relay buffer budget (`limits.relay_buffer_memory_mib`) plus the
//! state of `limits.max_connections` open connections.
//!
//! The budget bounds the 64 KiB buffers lent to connections moving data;
//! each open connection also costs the daemon ~4 KiB while idle
//! ([`CONNECTION_STATE_BYTES`], measured in docs/benchmarks.md). Both at
//! their limits must fit in half of the memory limit: the other half is for
//! the runtime, the binary, the kernel's socket memory charged to the
//! container and headroom. A configuration that does not fit would get the
//! daemon killed for memory before its limits protect it, so the daemon
//! refuses to start with it (exit 64, like any bad setting).
//!
//! Where the limit is: `/proc/self/cgroup` names the daemon's cgroup, on the
//! unified hierarchy (cgroup v2, line `0::<path>`, file `memory.max`) or the
//! v1 memory hierarchy (line `N:...memory...:<path>`, file
//! `memory.limit_in_bytes`). The limit in force is the lowest one set on the
//! cgroup and its ancestors (Kubernetes sets one on the pod's cgroup and one
//! on the container's). Inside a container the hierarchy is often mounted at
//! the container's own cgroup, so the path `/proc/self/cgroup` gives may not
//! exist below the mount: its ancestors, down to the mount's root, are read
//! as well. No cgroup file, or none with a limit: no check.
//!
//! The files are read through [`HostFiles`], so the logic is tested
//! without a cgroup.

use std::path::{Path, PathBuf};

use crate::config::{Config, ConfigError};
use crate::host_files::HostFiles;

/// Where the cgroup hierarchies are mounted.
const CGROUP_ROOT: &str = "/sys/fs/cgroup";

/// A v1 limit at or above this is "no limit" (the kernel reports its
/// maximum, 2^63 rounded down to a page, rather than a word).
const UNLIMITED_V1: u64 = 1 << 62;

/// A memory limit and the file that set it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemoryLimit {
    /// The limit in bytes.
    pub bytes: u64,
    /// The cgroup file it was read from.
    pub file: PathBuf,
}

impl MemoryLimit {
    /// The limit in MiB, rounded down.
    pub fn mib(&self) -> u64 {
        self.bytes >> 20
    }
}

/// The lowest memory limit set on the daemon's cgroup or its ancestors, on
/// either hierarchy; `None` when none is set or none can be read.
pub fn container_limit(files: &impl HostFiles) -> Option<MemoryLimit> {
    let own = files.read(Path::new("/proc/self/cgroup"))?;
    let mut candidates = Vec::new();
    for line in own.lines() {
        let mut fields = line.splitn(3, ':');
        let (Some(id), Some(controllers), Some(path)) =
            (fields.next(), fields.next(), fields.next())
        else {
            continue;
        };
        if id == "0" && controllers.is_empty() {
            candidates.extend(
                ancestors(path).map(|dir| Path::new(CGROUP_ROOT).join(dir).join("memory.max")),
            );
        } else if controllers.split(',').any(|c| c == "memory") {
            candidates.extend(ancestors(path).map(|dir| {
                Path::new(CGROUP_ROOT)
                    .join("memory")
                    .join(dir)
                    .join("memory.limit_in_bytes")
            }));
        }
    }
    candidates
        .into_iter()
        .filter_map(|file| {
            let bytes = parse_limit(&files.read(&file)?)?;
            Some(MemoryLimit { bytes, file })
        })
        .min_by_key(|l| l.bytes)
}

/// `/a/b` → `a/b`, `a`, `` (relative to a hierarchy's mount point).
fn ancestors(path: &str) -> impl Iterator<Item = &str> {
    let path = path.trim().trim_matches('/');
    let mut next = Some(path);
    std::iter::from_fn(move || {
        let here = next?;
        next = if here.is_empty() {
            None
        } else {
            Some(here.rsplit_once('/').map_or("", |(parent, _)| parent))
        };
        Some(here)
    })
}

/// A limit file's value: bytes, or `None` for "max" / no limit / not a
/// number.
fn parse_limit(text: &str) -> Option<u64> {
    let text = text.trim();
    if text == "max" {
        return None;
    }
    text.parse::<u64>().ok().filter(|&b| b < UNLIMITED_V1)
}

/// The limit for a log line or `nodemesh run --check`: its size and file, or
/// that none was found.
pub fn describe(limit: Option<&MemoryLimit>) -> String {
    limit.map_or_else(
        || "no container memory limit found".to_owned(),
        |l| {
            format!(
                "container memory limit {} MiB ({})",
                l.mib(),
                l.file.display()
            )
        },
    )
}

/// Daemon memory one open, idle connection costs, counted by [`check`]: the
/// issue's 4 KiB budget. Measured at 3.1–3.4 KiB per daemon since the
/// sixteenth pass of docs/benchmarks/notes.md (3.8–4.3 KiB before); the
/// budget is kept, not the measurement, so that the check has margin for the
/// run-to-run spread and for connections that carried more than one chunk.
pub const CONNECTION_STATE_BYTES: u64 = 4096;

/// Refuses a configuration whose relay buffer budget plus the state of
/// `limits.max_connections` connections is above half of `limit`.
pub fn check(config: &Config, limit: Option<&MemoryLimit>) -> Result<(), ConfigError> {
    let Some(limit) = limit else {
        return Ok(());
    };
    let budget = config.limits.relay_buffer_memory_mib as u64;
    let connections = config.limits.max_connections as u64;
    let connections_mib = (connections.saturating_mul(CONNECTION_STATE_BYTES)).div_ceil(1 << 20);
    let half = (limit.bytes / 2) >> 20;
    if budget.saturating_add(connections_mib) <= half {
        return Ok(());
    }
    Err(ConfigError::MemoryLimitsOverContainerLimit {
        budget_mib: budget,
        connections,
        connections_mib,
        limit_mib: limit.mib(),
        file: limit.file.clone(),
        fix: fix(budget, connections_mib, half),
    })
}

/// What to change so that `budget + connections_mib <= half`: the budget if
/// the connections leave room for one, else the connection limit as well.
fn fix(budget: u64, connections_mib: u64, half: u64) -> String {
    if connections_mib < half {
        format!(
            "set limits.relay_buffer_memory_mib to at most {}, so that both fit in {half} MiB",
            half - connections_mib
        )
    } else {
        let keep = budget.min(half / 2).max(1);
        let room = half.saturating_sub(keep);
        if room == 0 {
            return format!("no setting fits in {half} MiB");
        }
        format!(
            "set limits.max_connections to at most {} and limits.relay_buffer_memory_mib to at most \
             {keep}, so that both fit in {half} MiB",
            (room << 20) / CONNECTION_STATE_BYTES
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::host_files::Fake as Files;

    const MIB: u64 = 1 << 20;

    #[test]
    fn ancestors_run_from_the_cgroup_to_the_mount_root() {
        assert_eq!(
            ancestors("/a/b/c").collect::<Vec<_>>(),
            ["a/b/c", "a/b", "a", ""]
        );
        assert_eq!(ancestors("/").collect::<Vec<_>>(), [""]);
    }

    #[test]
    fn v2_takes_the_lowest_limit_of_the_container_and_its_pod() {
        let f = Files::new(&[
            ("/proc/self/cgroup", "0::/kubepods/pod1/ctr\n"),
            (
                "/sys/fs/cgroup/kubepods/pod1/ctr/memory.max",
                "1073741824\n",
            ),
            ("/sys/fs/cgroup/kubepods/pod1/memory.max", "536870912\n"),
            ("/sys/fs/cgroup/kubepods/memory.max", "max\n"),
        ]);
        assert_eq!(
            container_limit(&f),
            Some(MemoryLimit {
                bytes: 512 * MIB,
                file: "/sys/fs/cgroup/kubepods/pod1/memory.max".into()
            })
        );
    }

    #[test]
    fn v2_in_a_cgroup_namespace_reads_the_mount_root() {
        let f = Files::new(&[
            ("/proc/self/cgroup", "0::/\n"),
            ("/sys/fs/cgroup/memory.max", "268435456\n"),
        ]);
        assert_eq!(container_limit(&f).map(|l| l.mib()), Some(256));
    }

    #[test]
    fn v1_reads_the_memory_hierarchy_and_ignores_its_unlimited_value() {
        let f = Files::new(&[
            (
                "/proc/self/cgroup",
                "12:cpu,cpuacct:/x\n4:memory:/kubepods/pod1/ctr\n0::/\n",
            ),
            (
                "/sys/fs/cgroup/memory/kubepods/pod1/ctr/memory.limit_in_bytes",
                "9223372036854771712\n",
            ),
            (
                "/sys/fs/cgroup/memory/kubepods/pod1/memory.limit_in_bytes",
                "1073741824\n",
            ),
        ]);
        assert_eq!(container_limit(&f).map(|l| l.mib()), Some(1024));
    }

    #[test]
    fn v1_mounted_at_the_containers_cgroup_falls_back_to_the_mount_root() {
        // /proc/self/cgroup names the host path; only the mount root exists.
        let f = Files::new(&[
            ("/proc/self/cgroup", "4:memory:/kubepods/pod1/ctr\n"),
            ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "209715200"),
        ]);
        assert_eq!(container_limit(&f).map(|l| l.mib()), Some(200));
    }

    #[test]
    fn no_limit_anywhere_or_unreadable_files_mean_no_limit() {
        let unlimited = Files::new(&[
            ("/proc/self/cgroup", "0::/a\n"),
            ("/sys/fs/cgroup/a/memory.max", "max\n"),
        ]);
        assert_eq!(container_limit(&unlimited), None);
        assert_eq!(container_limit(&Files::new(&[])), None);
        let garbage = Files::new(&[
            ("/proc/self/cgroup", "not a cgroup line\n0::/a\n"),
            ("/sys/fs/cgroup/a/memory.max", "lots\n"),
        ]);
        assert_eq!(container_limit(&garbage), None);
    }

    fn err(c: &Config, limit: &MemoryLimit) -> String {
        check(c, Some(limit))
            .expect_err("over half the limit")
            .to_string()
    }

    fn has_all(e: &str, needles: &[&str]) {
        for needle in needles {
            assert!(e.contains(needle), "{needle:?} missing from: {e}");
        }
    }

    #[test]
    fn the_default_limits_fit_the_daemonsets_one_gibibyte() {
        let limit = MemoryLimit {
            bytes: 1024 * MIB,
            file: "/sys/fs/cgroup/memory.max".into(),
        };
        // 256 MiB of relay buffers + 65536 x 4 KiB = 512 MiB, half of 1 GiB.
        assert!(check(&Config::default(), Some(&limit)).is_ok());
        let limit = MemoryLimit {
            bytes: 1023 * MIB,
            ..limit
        };
        assert!(check(&Config::default(), Some(&limit)).is_err());
    }

    #[test]
    fn a_budget_that_with_the_connections_passes_half_the_limit_is_refused_with_the_most_that_fits()
    {
        let limit = MemoryLimit {
            bytes: 300 * MIB,
            file: "/sys/fs/cgroup/memory.max".into(),
        };
        let mut c = Config::default();
        c.limits.max_connections = 2560; // 10 MiB of connection state
        c.limits.max_connections_per_pod = 2560;
        c.limits.relay_buffer_memory_mib = 140;
        assert!(check(&c, Some(&limit)).is_ok());
        c.limits.relay_buffer_memory_mib = 141;
        has_all(
            &err(&c, &limit),
            &[
                "limits.relay_buffer_memory_mib",
                "141 MiB",
                "`limits.max_connections` (2560",
                "10 MiB",
                "151 MiB",
                "300 MiB",
                "/sys/fs/cgroup/memory.max",
                "set limits.relay_buffer_memory_mib to at most 140",
                "resources.limits.memory",
            ],
        );
        assert!(check(&c, None).is_ok(), "no limit, no check");
    }

    #[test]
    fn connections_alone_over_half_the_limit_ask_for_a_lower_connection_limit() {
        let limit = MemoryLimit {
            bytes: 256 * MIB,
            file: "/sys/fs/cgroup/memory.max".into(),
        };
        let mut c = Config::default();
        c.limits.relay_buffer_memory_mib = 16;
        // The default 65536 connections are 256 MiB of state: over 128 alone.
        let e = err(&c, &limit);
        // 128 - 16 = 112 MiB left for connections: 28672 of them.
        has_all(
            &e,
            &[
                "`limits.max_connections` (65536",
                "256 MiB",
                "set limits.max_connections to at most 28672 and limits.relay_buffer_memory_mib to at most 16",
            ],
        );
        c.limits.max_connections = 28672;
        c.limits.max_connections_per_pod = 4096;
        assert!(check(&c, Some(&limit)).is_ok(), "the suggested fix fits");
    }

    #[test]
    fn a_limit_too_small_for_any_setting_says_so() {
        let limit = MemoryLimit {
            bytes: 3 * MIB,
            file: "/sys/fs/cgroup/memory.max".into(),
        };
        let e = err(&Config::default(), &limit);
        has_all(&e, &["no setting fits", "resources.limits.memory"]);
    }
}
