//! The memory the limits allow against a real container memory limit: the
//! `nodemesh` binary started in a memory cgroup the test makes (cgroup v2
//! `memory.max`, or v1 `memory.limit_in_bytes` on a v1 or hybrid host)
//! refuses a relay buffer budget plus `max_connections` × 4 KiB above half
//! of the limit, before it starts anything, and accepts limits that fit.
//! Privileged (root); the cgroup is removed even when a check fails.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const LIMIT_MIB: u64 = 256;

/// A memory cgroup with a limit of [`LIMIT_MIB`], removed on drop.
struct Cgroup {
    dir: PathBuf,
    /// The file the daemon is expected to name.
    limit_file: PathBuf,
}

impl Cgroup {
    fn new() -> Self {
        let name = format!("nodemesh-test-{}", std::process::id());
        let v2_root = Path::new("/sys/fs/cgroup");
        let v2 = std::fs::read_to_string(v2_root.join("cgroup.controllers"))
            .is_ok_and(|c| c.split_whitespace().any(|c| c == "memory"));
        let (dir, file) = if v2 {
            // Under the root: it is exempt from "no processes in inner
            // cgroups", so enabling the controller for children cannot fail
            // because of processes in it.
            std::fs::write(v2_root.join("cgroup.subtree_control"), "+memory")
                .expect("enable the memory controller for the root's children");
            (v2_root.join(&name), "memory.max")
        } else {
            // v1: a child of this process's own memory cgroup.
            let own = std::fs::read_to_string("/proc/self/cgroup").expect("/proc/self/cgroup");
            let parent = own
                .lines()
                .filter_map(|l| l.split_once(':')?.1.split_once(':'))
                .find(|(controllers, _)| controllers.split(',').any(|c| c == "memory"))
                .map(|(_, path)| path.trim_start_matches('/').to_owned())
                .expect("no v2 memory controller and no v1 memory hierarchy");
            (
                Path::new("/sys/fs/cgroup/memory").join(parent).join(&name),
                "memory.limit_in_bytes",
            )
        };
        std::fs::create_dir(&dir).unwrap_or_else(|e| panic!("mkdir {}: {e}", dir.display()));
        let cgroup = Self {
            limit_file: dir.join(file),
            dir,
        };
        std::fs::write(&cgroup.limit_file, (LIMIT_MIB << 20).to_string())
            .unwrap_or_else(|e| panic!("write {}: {e}", cgroup.limit_file.display()));
        cgroup
    }

    /// Runs `nodemesh run --node-name n1 ... --config <file> <extra>` inside the
    /// cgroup (the shell moves itself in, then execs the daemon).
    /// `max_connections` `None` keeps the default (65536: 256 MiB of state).
    fn run_daemon(
        &self,
        relay_buffer_mib: u64,
        max_connections: Option<u64>,
        extra: &[&str],
    ) -> Output {
        let dir = tempfile::tempdir().expect("tempdir");
        let config = dir.path().join("config.yaml");
        std::fs::write(
            &config,
            match max_connections {
                None => format!("limits:\n  relay_buffer_memory_mib: {relay_buffer_mib}\n"),
                Some(n) => format!(
                    "limits:\n  relay_buffer_memory_mib: {relay_buffer_mib}\n  \
                     max_connections: {n}\n  max_connections_per_pod: {n}\n"
                ),
            },
        )
        .expect("config");
        Command::new("sh")
            .arg("-c")
            .arg(r#"echo $$ > "$0/cgroup.procs" && exec "$@""#)
            .arg(&self.dir)
            .arg(env!("CARGO_BIN_EXE_nodemesh"))
            .args([
                "run",
                "--node-name",
                "n1",
                "--node-address",
                "127.0.0.1",
                "--config",
            ])
            .arg(&config)
            .args(extra)
            .output()
            .expect("run nodemesh")
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        // The daemon has exited (`output` waits), so the cgroup is empty.
        if let Err(e) = std::fs::remove_dir(&self.dir) {
            eprintln!("cannot remove {}: {e}", self.dir.display());
        }
    }
}

fn text(o: &Output) -> String {
    format!(
        "status {:?}\nstdout: {}\nstderr: {}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

#[test]
fn limits_that_ask_for_more_than_half_the_containers_memory_limit_are_refused_at_start() {
    assert!(
        // /proc/self belongs to the process's effective user.
        std::os::unix::fs::MetadataExt::uid(&std::fs::metadata("/proc/self").expect("/proc/self"))
            == 0,
        "this test makes a memory cgroup: run it as root (scripts/test does)"
    );
    let cgroup = Cgroup::new();
    let limit_file = cgroup.limit_file.display().to_string();

    // 200 MiB of relay buffers + 2048 connections (8 MiB) of 256 MiB:
    // refused, whether checking or starting, with the numbers, the file and
    // the fix.
    for extra in [&["--check"][..], &[]] {
        let out = cgroup.run_daemon(200, Some(2048), extra);
        let all = text(&out);
        assert_eq!(out.status.code(), Some(64), "{extra:?}: {all}");
        for needle in [
            "limits.relay_buffer_memory_mib` (200 MiB)",
            "`limits.max_connections` (2048, about 8 MiB",
            "208 MiB",
            "256 MiB",
            limit_file.as_str(),
            "set limits.relay_buffer_memory_mib to at most 120",
            "resources.limits.memory",
        ] {
            assert!(all.contains(needle), "{extra:?}: {needle:?} missing: {all}");
        }
    }

    // A small budget, but the default 65536 connections are 256 MiB of
    // state alone: the fix lowers the connection limit.
    let out = cgroup.run_daemon(16, None, &["--check"]);
    let all = text(&out);
    assert_eq!(out.status.code(), Some(64), "{all}");
    assert!(
        all.contains("set limits.max_connections to at most 28672"),
        "{all}"
    );

    // 120 + 8 MiB, half of the limit: accepted, and the check names the
    // limit.
    let out = cgroup.run_daemon(120, Some(2048), &["--check"]);
    let all = text(&out);
    assert_eq!(out.status.code(), Some(0), "{all}");
    assert!(
        all.contains("configuration valid")
            && all.contains(&format!(
                "container memory limit {LIMIT_MIB} MiB ({limit_file})"
            )),
        "{all}"
    );
}
