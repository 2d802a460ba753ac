//! End-to-end tests of the lab itself, without the mesh: topology, pods
//! through the real CNI chain (bridge + host-local), TCP across and within
//! nodes, and complete cleanup (after `down`, after a panicking test body,
//! and by prefix with or without recorded state). Privileged: run as root.

use std::net::Ipv4Addr;
use std::process::{Command, Stdio};
use std::time::Duration;

use nodemesh::config::Config;
use nodemesh::discovery::model::ClusterModel;
use nodemesh_lab::lab::{self, Lab, LabOptions, LabState};
use nodemesh_lab::{metrics, netns, LabError};

const MIB: u64 = 1 << 20;

fn assert_clean(prefix: &str) {
    let left = lab::wait_clean(prefix, Duration::from_secs(10)).expect("leftovers");
    assert!(left.is_clean(), "lab {prefix} left {left:?}");
}

fn in_pod_cidr(ip: Ipv4Addr, node: usize) -> bool {
    let o = ip.octets();
    o[0] == 10 && o[1] == 78 && usize::from(o[2]) == node && o[3] > 1
}

#[test]
fn no_mesh_2x2_moves_8_mib_each_way_across_and_within_nodes_then_down_leaves_nothing() {
    let lab = Lab::up(LabOptions::for_test(2, 2).no_mesh()).expect("lab up");
    let prefix = lab.prefix().to_owned();

    let pods = lab.pods();
    assert_eq!(pods.len(), 4);
    for p in &pods {
        assert!(in_pod_cidr(p.ip, p.node), "{} has {}", p.name, p.ip);
        assert!(netns::netns_path(&p.netns).exists(), "{}", p.netns);
    }
    let state = LabState::load(&prefix).expect("state").expect("recorded");
    assert_eq!(state.pods.len(), 4);
    assert!(state.pods.iter().all(|p| p.result.is_some()));

    // A second lab with the same prefix is refused, and does not harm the first.
    let again = Lab::up(LabOptions::new(prefix.clone(), 1, 0).no_mesh());
    assert!(
        matches!(again, Err(LabError::LabExists { .. })),
        "{again:?}"
    );

    let client = lab.pod(1, 1).expect("n1-p1");
    for (server, what) in [
        (lab.pod(2, 1).expect("n2-p1"), "across nodes"),
        (lab.pod(1, 2).expect("n1-p2"), "within a node"),
    ] {
        let report = lab
            .transfer(&client, &server, 8080, 8 * MIB)
            .unwrap_or_else(|e| panic!("{what}: {e}"));
        assert_eq!(report.sent_bytes, 8 * MIB, "{what}");
        assert_eq!(report.received_bytes, 8 * MIB, "{what}");
        assert_eq!(report.server_hash, report.sent_hash, "{what}");
    }

    // Many concurrent connections between two pods all complete intact.
    let reports = lab
        .transfer_many(
            &lab.pod(2, 2).expect("n2-p2"),
            &lab.pod(1, 2).expect("n1-p2"),
            0,
            50,
            64 * 1024,
        )
        .expect("concurrent transfers");
    assert_eq!(reports.len(), 50);

    let problems = lab.down();
    assert!(problems.is_empty(), "{problems:?}");
    assert_clean(&prefix);
}

#[test]
fn cli_up_status_down_without_mesh() {
    let prefix = lab::test_prefix();
    let cli = env!("CARGO_BIN_EXE_nodemesh-lab");
    let run = |args: &[&str]| {
        let out = Command::new(cli)
            .args(["--prefix", &prefix])
            .args(args)
            .output()
            .expect("run nodemesh-lab");
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success(),
            "{args:?}: {text}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        text
    };
    // Remove the lab even if an assertion below fails.
    struct Down(String);
    impl Drop for Down {
        fn drop(&mut self) {
            lab::teardown_prefix(&self.0);
        }
    }
    let _guard = Down(prefix.clone());

    let up = run(&["up", "--no-mesh", "--nodes", "2", "--pods-per-node", "1"]);
    assert!(up.contains("[1/5] creating underlay"), "{up}");
    assert!(up.contains(&format!("{prefix}-n2-p1")), "{up}");
    let status = run(&["status"]);
    assert!(status.contains("10.78.2.2"), "{status}");
    run(&["down"]);
    assert_clean(&prefix);
    let status = run(&["status"]);
    assert!(status.contains("no lab"), "{status}");

    let demo = run(&["demo", "--no-mesh", "--mib", "1"]);
    assert_eq!(demo.matches("hashes equal").count(), 3, "{demo}");
    assert!(demo.contains(&format!("lab {prefix} removed")), "{demo}");
    assert_clean(&prefix);
}

#[test]
fn a_panicking_test_body_still_removes_its_lab() {
    let prefix = lab::test_prefix();
    let inner = prefix.clone();
    let outcome = std::panic::catch_unwind(move || {
        let _lab = Lab::up(LabOptions::new(inner.clone(), 2, 1).no_mesh()).expect("lab up");
        assert!(!lab::leftovers(&inner).expect("leftovers").is_clean());
        panic!("test body fails with the lab up");
    });
    assert!(outcome.is_err(), "the body should have panicked");
    assert_clean(&prefix);
}

/// A process left running inside a pod namespace, reaped by the test.
struct Stray(std::process::Child);

impl Drop for Stray {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn stray_in(netns_name: &str) -> Stray {
    Stray(
        Command::new("ip")
            .args(["netns", "exec", netns_name, "sleep", "300"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn stray"),
    )
}

#[test]
fn down_by_prefix_removes_a_detached_lab_and_stray_processes_and_namespaces() {
    let lab = Lab::up(LabOptions::for_test(2, 1).no_mesh()).expect("lab up");
    let prefix = lab.prefix().to_owned();
    let pod = lab.pod(2, 1).expect("pod");
    let state = lab.detach();
    assert_eq!(state.pods.len(), 2);
    assert!(!lab::leftovers(&prefix).expect("leftovers").is_clean());

    let mut stray = stray_in(&pod.netns);
    netns::add_netns(&format!("{prefix}-n9-p1")).expect("extra netns");
    let problems = lab::teardown_prefix(&prefix);
    assert!(problems.is_empty(), "{problems:?}");
    let status = stray.0.wait().expect("stray reaped");
    assert!(!status.success(), "the stray was killed: {status}");
    assert_clean(&prefix);
}

#[test]
fn down_by_prefix_works_without_state() {
    let lab = Lab::up(LabOptions::for_test(2, 1).no_mesh()).expect("lab up");
    let prefix = lab.prefix().to_owned();
    let state = lab.detach();
    std::fs::remove_file(state.path()).expect("remove state");
    assert!(LabState::load(&prefix).expect("load").is_none());

    let problems = lab::teardown_prefix(&prefix);
    assert!(problems.is_empty(), "{problems:?}");
    assert_clean(&prefix);
}

/// A directory where the test-support fake answers as `nodemesh` and `nodemesh-cni`.
fn fake_bins() -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("tempdir");
    let fake = env!("CARGO_BIN_EXE_nodemesh-lab-fake");
    for name in ["nodemesh", "nodemesh-cni"] {
        std::os::unix::fs::symlink(fake, dir.path().join(name)).expect("symlink");
    }
    dir
}

fn meshed_with_fakes(bins: &tempfile::TempDir, nodes: usize, pods: usize) -> LabOptions {
    let mut opts = LabOptions::for_test(nodes, pods);
    opts.bin_dir = Some(bins.path().to_path_buf());
    opts
}

#[test]
fn meshed_lab_starts_restarts_and_stops_daemons_with_fake_binaries() {
    let bins = fake_bins();
    let mut lab = Lab::up(meshed_with_fakes(&bins, 2, 1)).expect("lab up");
    let prefix = lab.prefix().to_owned();

    // Discovery lists every node and every pod with its CNI-assigned IP.
    let text = std::fs::read_to_string(lab.state().discovery_file()).expect("discovery");
    let model: ClusterModel = serde_yaml::from_str(&text).expect("discovery yaml");
    model.validate().expect("valid model");
    assert_eq!(model.nodes.len(), 2);
    assert_eq!(model.pods.len(), 2);
    for pod in lab.pods() {
        let listed = model
            .pods
            .iter()
            .find(|p| p.name == pod.name)
            .expect("pod listed");
        assert_eq!(listed.ips, vec![std::net::IpAddr::V4(pod.ip)]);
        assert_eq!(listed.node, format!("n{}", pod.node));
    }
    // Each node's config is a valid daemon config.
    for node in lab.nodes() {
        let paths = node.daemon.as_ref().expect("meshed");
        let config = Config::from_file(&paths.config).expect("config");
        config.validate().expect("valid config");
        assert_eq!(config.node_name, node.name);
        assert_eq!(config.cni_socket, paths.cni_socket);
    }

    assert_eq!(lab.admin_get(2, "/ready").expect("ready").status, 200);
    let samples = lab.metrics(1).expect("metrics");
    assert_eq!(samples.len(), 1);
    assert_eq!(
        metrics::sum(&samples, "nodemesh_tunnels_open", &[("peer", "n1")]),
        0.0
    );

    let first = lab.daemon_pid(1).expect("daemon 1");
    let status = lab.restart_daemon(1).expect("restart");
    assert!(status.success(), "SIGTERM exits 0: {status}");
    let second = lab.daemon_pid(1).expect("daemon 1 again");
    assert_ne!(first, second);
    assert!(!std::path::Path::new(&format!("/proc/{first}")).exists());

    lab.update_config(2, |c| c.connect_timeout_ms = 1234)
        .expect("update config");
    assert!(lab.stop_daemon(2).expect("stop").success());
    assert!(lab.daemon_pid(2).is_none());
    assert!(
        lab.admin_get(2, "/ready").is_err(),
        "stopped daemon answers"
    );
    lab.start_daemon(2).expect("start again");
    let third = lab.daemon_pid(2).expect("daemon 2");
    let paths = lab.node(2).expect("n2").daemon.clone().expect("meshed");
    assert_eq!(
        Config::from_file(&paths.config)
            .expect("config")
            .connect_timeout_ms,
        1234
    );
    // A UDP socket can be made in a node namespace (test QUIC peers).
    let udp = netns::udp_bind(
        &lab.node(1).expect("n1").netns,
        "10.77.0.1:0".parse().expect("addr"),
    )
    .expect("udp in node");
    assert_eq!(
        udp.local_addr().expect("addr").ip().to_string(),
        "10.77.0.1"
    );

    // The fake plugin captures nothing: pods still talk directly.
    let report = lab
        .transfer(
            &lab.pod(1, 1).expect("pod"),
            &lab.pod(2, 1).expect("pod"),
            8080,
            MIB,
        )
        .expect("transfer");
    assert_eq!(report.server_hash, report.sent_hash);

    let problems = lab.down();
    assert!(problems.is_empty(), "{problems:?}");
    assert_clean(&prefix);
    for pid in [second, third] {
        assert!(
            !std::path::Path::new(&format!("/proc/{pid}")).exists(),
            "{pid}"
        );
    }
}

#[test]
fn a_daemon_dying_at_start_fails_up_with_its_log_and_leaves_nothing() {
    let bins = fake_bins();
    let mut opts = meshed_with_fakes(&bins, 2, 1);
    opts.log_level = "info,fake_die=trace".into();
    let prefix = opts.prefix.clone();
    match Lab::up(opts) {
        Err(LabError::DaemonDied { node, tail, .. }) => {
            assert_eq!(node, "n1");
            assert!(tail.contains("told to die"), "{tail}");
        }
        other => panic!("expected DaemonDied, got {other:?}"),
    }
    assert_clean(&prefix);
}

#[test]
fn missing_binaries_fail_before_anything_is_built() {
    let empty = tempfile::tempdir().expect("tempdir");
    let mut opts = LabOptions::for_test(1, 1);
    opts.bin_dir = Some(empty.path().to_path_buf());
    let prefix = opts.prefix.clone();
    let err = Lab::up(opts).expect_err("no binaries");
    assert!(matches!(err, LabError::BinaryMissing { .. }), "{err}");
    assert!(
        err.to_string().contains("cargo build --workspace --bins"),
        "{err}"
    );
    assert_clean(&prefix);
}
