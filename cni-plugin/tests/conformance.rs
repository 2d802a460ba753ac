//! CNI conformance of the built `nodemesh-cni` binary, run exactly as a
//! container runtime does (environment + stdin, stdout + exit status),
//! against a fake daemon on a temp socket and real network namespaces.
//! Needs root (netns, nft).

mod support;

use serde_json::{json, Value};
use support::{run_plugin, up_mode, FakeDaemon, Mode, Netns};

use nodemesh_cni::proto::Request;

struct Pod {
    netns: Netns,
    state: tempfile::TempDir,
    id: String,
}

impl Pod {
    fn new() -> Self {
        let netns = Netns::new("pod");
        Self {
            id: format!("ctr-{}", support::unique()),
            netns,
            state: tempfile::tempdir().expect("tmp"),
        }
    }

    fn prev(&self) -> Value {
        json!({
            "cniVersion": "1.0.0",
            "interfaces": [{"name": "eth0", "mac": "aa:bb:cc:dd:ee:ff", "sandbox": self.netns.path()}],
            "ips": [{"address": "10.77.0.5/24", "gateway": "10.77.0.1", "interface": 0}],
            "routes": [{"dst": "0.0.0.0/0"}],
            "dns": {}
        })
    }

    fn conf(&self, version: &str, daemon: &str, extra: Value) -> String {
        let mut c = json!({
            "cniVersion": version,
            "name": "podnet",
            "type": "nodemesh-cni",
            "daemon_socket": daemon,
            "state_dir": self.state.path(),
            "timeout_ms": 2000,
            "prevResult": self.prev(),
        });
        if let (Some(c), Some(extra)) = (c.as_object_mut(), extra.as_object()) {
            c.extend(extra.clone());
        }
        c.to_string()
    }

    fn run(&self, cmd: &str, namespace: &str, conf: &str) -> support::Outcome {
        let netns = self.netns.path();
        let args = format!(
            "IgnoreUnknown=1;K8S_POD_NAMESPACE={namespace};K8S_POD_NAME=web-0;K8S_POD_UID=uid-1"
        );
        run_plugin(
            &[
                ("CNI_COMMAND", cmd),
                ("CNI_CONTAINERID", &self.id),
                ("CNI_NETNS", netns.to_str().expect("utf8")),
                ("CNI_IFNAME", "eth0"),
                ("CNI_PATH", "/usr/lib/cni"),
                ("CNI_ARGS", &args),
            ],
            conf,
        )
    }

    fn queue_file(&self) -> std::path::PathBuf {
        self.state
            .path()
            .join("queue")
            .join(format!("{}.json", self.id))
    }
}

fn sock(d: &FakeDaemon) -> &str {
    d.path.to_str().expect("utf8")
}

fn with_version(prev: &Value, v: &str) -> Value {
    let mut p = prev.clone();
    p["cniVersion"] = json!(v);
    p
}

#[test]
fn version_prints_supported_versions() {
    let out = run_plugin(&[("CNI_COMMAND", "VERSION")], r#"{"cniVersion":"1.1.0"}"#);
    out.expect_ok();
    assert_eq!(
        out.json(),
        json!({"cniVersion": "1.1.0", "supportedVersions": ["0.3.1", "0.4.0", "1.0.0", "1.1.0"]})
    );
}

#[test]
fn add_check_del_lifecycle() {
    let pod = Pod::new();
    let daemon = FakeDaemon::start(up_mode());
    let conf = pod.conf(
        "1.1.0",
        sock(&daemon),
        json!({"exclude_outbound_ports": [22]}),
    );

    let add = pod.run("ADD", "default", &conf);
    add.expect_ok();
    assert_eq!(
        add.json(),
        with_version(&pod.prev(), "1.1.0"),
        "prevResult unchanged"
    );
    let table = pod.netns.nodemesh_table().expect("table installed");
    assert!(table.contains("meta mark 0x00004e4d return"), "{table}");
    assert!(table.contains("tcp dport 22 return"), "{table}");
    assert!(table.contains("ip saddr 10.77.0.1 return"), "{table}");
    assert!(
        table.contains("redirect to :15001") && table.contains("redirect to :15006"),
        "{table}"
    );
    let reqs = daemon.requests();
    let [Request::Register(reg)] = reqs.as_slice() else {
        panic!("expected one register: {reqs:?}");
    };
    assert_eq!(
        (reg.namespace.as_str(), reg.name.as_str()),
        ("default", "web-0")
    );
    assert_eq!(reg.pod_uid.as_deref(), Some("uid-1"));
    assert_eq!(reg.netns, pod.netns.path());
    assert_eq!(
        reg.ips,
        vec!["10.77.0.5".parse::<std::net::IpAddr>().expect("ip")]
    );

    // Re-applying is idempotent.
    pod.run("ADD", "default", &conf).expect_ok();
    assert_eq!(pod.netns.nodemesh_table().as_deref(), Some(table.as_str()));

    let check = pod.run("CHECK", "default", &conf);
    check.expect_ok();
    assert_eq!(check.stdout, "", "CHECK prints nothing on success");

    // Someone removes the table: CHECK fails.
    pod.netns
        .exec(&["nft", "delete", "table", "inet", "nodemesh"]);
    pod.run("CHECK", "default", &conf).expect_error(102);
    pod.run("ADD", "default", &conf).expect_ok();

    let del = pod.run("DEL", "default", &conf);
    del.expect_ok();
    assert_eq!(del.stdout, "");
    assert!(pod.netns.nodemesh_table().is_none(), "table removed");
    assert!(
        matches!(daemon.requests().last(), Some(Request::Unregister { container_id }) if *container_id == pod.id)
    );
    pod.run("DEL", "default", &conf).expect_ok();
    assert!(!pod.queue_file().exists());
}

#[test]
fn add_with_daemon_down_fails_closed() {
    let pod = Pod::new();
    let dir = tempfile::tempdir().expect("tmp");
    let missing = dir.path().join("nobody.sock");
    let conf = pod.conf("1.0.0", missing.to_str().expect("utf8"), json!({}));
    let out = pod.run("ADD", "default", &conf);
    let err = out.expect_error(11);
    assert_eq!(err["cniVersion"], "1.0.0");
    let msg = err["msg"].as_str().expect("msg");
    assert!(
        msg.contains("nodemesh daemon unreachable") && msg.contains("nobody.sock"),
        "{msg}"
    );
    assert!(
        err["details"]
            .as_str()
            .expect("details")
            .contains("daemon is running"),
        "{err}"
    );
    assert!(
        pod.netns.nodemesh_table().is_none(),
        "no rules after a failed ADD"
    );
    // DEL after the failed ADD succeeds (and queues the unregister).
    pod.run("DEL", "default", &conf).expect_ok();
}

#[test]
fn add_times_out_when_daemon_does_not_confirm() {
    let pod = Pod::new();
    let daemon = FakeDaemon::start(Mode::Silent);
    let conf = pod.conf("1.1.0", sock(&daemon), json!({"timeout_ms": 300}));
    let err = pod.run("ADD", "default", &conf).expect_error(11);
    assert!(
        err["msg"]
            .as_str()
            .expect("msg")
            .contains("did not answer within"),
        "{err}"
    );
    assert!(pod.netns.nodemesh_table().is_none());
}

#[test]
fn del_with_missing_or_empty_netns_succeeds() {
    let daemon = FakeDaemon::start(up_mode());
    let state = tempfile::tempdir().expect("tmp");
    let conf = json!({"cniVersion": "1.1.0", "name": "podnet", "type": "nodemesh-cni",
        "daemon_socket": sock(&daemon), "state_dir": state.path()})
    .to_string();
    for netns in ["/run/netns/helper-cni-never-existed", ""] {
        for _ in 0..2 {
            run_plugin(
                &[
                    ("CNI_COMMAND", "DEL"),
                    ("CNI_CONTAINERID", "gone-1"),
                    ("CNI_NETNS", netns),
                    ("CNI_IFNAME", "eth0"),
                    ("CNI_PATH", "/usr/lib/cni"),
                ],
                &conf,
            )
            .expect_ok();
        }
    }
    assert_eq!(daemon.requests().len(), 4, "each DEL unregisters");
}

#[test]
fn del_with_daemon_down_removes_rules_and_queues_unregister() {
    let pod = Pod::new();
    let daemon = FakeDaemon::start(up_mode());
    let socket = daemon.path.clone();
    let conf = pod.conf("1.1.0", socket.to_str().expect("utf8"), json!({}));
    pod.run("ADD", "default", &conf).expect_ok();
    assert!(pod.netns.nodemesh_table().is_some());
    drop(daemon);
    pod.run("DEL", "default", &conf).expect_ok();
    assert!(
        pod.netns.nodemesh_table().is_none(),
        "rules removed without the daemon"
    );
    let queued = std::fs::read_to_string(pod.queue_file()).expect("queued unregister");
    assert_eq!(
        queued,
        format!(
            "{{\"op\":\"unregister\",\"container_id\":\"{}\"}}\n",
            pod.id
        )
    );
}

#[test]
fn gc_unregisters_attachments_not_in_valid_list() {
    let pod = Pod::new();
    let daemon = FakeDaemon::start(up_mode());
    let conf = pod.conf("1.1.0", sock(&daemon), json!({}));
    pod.run("ADD", "default", &conf).expect_ok();
    let keep = pod.conf(
        "1.1.0",
        sock(&daemon),
        json!({"cni.dev/valid-attachments": [{"containerID": pod.id, "ifname": "eth0"}]}),
    );
    pod.run("GC", "default", &keep).expect_ok();
    assert_eq!(daemon.requests().len(), 1, "valid attachment kept");
    let gc = pod.conf(
        "1.1.0",
        sock(&daemon),
        json!({"cni.dev/valid-attachments": [{"containerID": "someone-else", "ifname": "eth0"}]}),
    );
    pod.run("GC", "default", &gc).expect_ok();
    assert!(
        matches!(daemon.requests().last(), Some(Request::Unregister { container_id }) if *container_id == pod.id)
    );
    let records = pod
        .state
        .path()
        .join("attachments")
        .read_dir()
        .expect("dir")
        .count();
    assert_eq!(records, 0, "bookkeeping removed");
    // GC needs 1.1.0.
    let old = pod.conf(
        "1.0.0",
        sock(&daemon),
        json!({"cni.dev/valid-attachments": []}),
    );
    pod.run("GC", "default", &old).expect_error(1);
}

#[test]
fn status_reports_daemon_readiness() {
    let pod = Pod::new();
    let ready = FakeDaemon::start(up_mode());
    let status = |d: &str| {
        run_plugin(
            &[("CNI_COMMAND", "STATUS"), ("CNI_PATH", "/usr/lib/cni")],
            &pod.conf("1.1.0", d, json!({})),
        )
    };
    let ok = status(sock(&ready));
    ok.expect_ok();
    assert_eq!(ok.stdout, "");
    let busy = FakeDaemon::start(Mode::NotReady);
    let err = status(sock(&busy)).expect_error(50);
    assert!(
        err["msg"]
            .as_str()
            .expect("msg")
            .contains("discovery not loaded"),
        "{err}"
    );
    let err = status("/run/helper-cni-no-such.sock").expect_error(50);
    assert!(
        err["msg"].as_str().expect("msg").contains("unreachable"),
        "{err}"
    );
}

#[test]
fn malformed_config_is_code_6() {
    let pod = Pod::new();
    let out = pod.run("ADD", "default", "{\"cniVersion\": \"1.0.0\", ");
    out.expect_error(6);
    assert!(pod.netns.nodemesh_table().is_none());
}

#[test]
fn invalid_config_is_code_7() {
    let pod = Pod::new();
    let conf = pod.conf("1.0.0", "/x", json!({"timeout_ms": "soon"}));
    let err = pod.run("ADD", "default", &conf).expect_error(7);
    assert_eq!(err["cniVersion"], "1.0.0");
    let no_prev = json!({"cniVersion": "1.0.0", "name": "n", "type": "nodemesh-cni"}).to_string();
    pod.run("ADD", "default", &no_prev).expect_error(7);
}

#[test]
fn unknown_version_is_code_1() {
    let pod = Pod::new();
    let err = pod
        .run("ADD", "default", &pod.conf("2.0.0", "/x", json!({})))
        .expect_error(1);
    assert!(err["msg"].as_str().expect("msg").contains("2.0.0"), "{err}");
    pod.run("CHECK", "default", &pod.conf("0.3.1", "/x", json!({})))
        .expect_error(1);
}

#[test]
fn missing_env_vars_are_code_4_naming_the_variable() {
    let conf = r#"{"cniVersion":"1.0.0","name":"n","type":"nodemesh-cni","prevResult":{}}"#;
    let full = [
        ("CNI_COMMAND", "ADD"),
        ("CNI_CONTAINERID", "c1"),
        ("CNI_NETNS", "/run/netns/x"),
        ("CNI_IFNAME", "eth0"),
        ("CNI_PATH", "/usr/lib/cni"),
    ];
    for skip in [
        "CNI_COMMAND",
        "CNI_CONTAINERID",
        "CNI_NETNS",
        "CNI_IFNAME",
        "CNI_PATH",
    ] {
        let env: Vec<_> = full.iter().copied().filter(|(k, _)| *k != skip).collect();
        let err = run_plugin(&env, conf).expect_error(4);
        assert!(
            err["msg"].as_str().expect("msg").contains(skip),
            "{skip}: {err}"
        );
    }
    let err = run_plugin(&[("CNI_COMMAND", "FROB")], conf).expect_error(4);
    assert!(err["msg"].as_str().expect("msg").contains("FROB"));
    let err = run_plugin(&[("CNI_COMMAND", "STATUS")], conf).expect_error(4);
    assert!(err["msg"].as_str().expect("msg").contains("CNI_PATH"));
}

#[test]
fn excluded_namespace_passes_through_without_daemon() {
    let pod = Pod::new();
    let daemon = FakeDaemon::start(up_mode());
    let conf = pod.conf("1.0.0", sock(&daemon), json!({}));
    let out = pod.run("ADD", "kube-system", &conf);
    out.expect_ok();
    assert_eq!(out.json(), with_version(&pod.prev(), "1.0.0"));
    assert!(daemon.requests().is_empty(), "no daemon contact");
    assert!(pod.netns.nodemesh_table().is_none());
    pod.run("DEL", "kube-system", &conf).expect_ok();
    assert!(
        daemon.requests().is_empty(),
        "DEL of an excluded pod stays away from the daemon"
    );
}

#[test]
fn skipped_pod_passes_through_untouched() {
    let pod = Pod::new();
    let daemon = FakeDaemon::start(Mode::Skip);
    let conf = pod.conf("1.1.0", sock(&daemon), json!({}));
    let out = pod.run("ADD", "default", &conf);
    out.expect_ok();
    assert_eq!(out.json(), with_version(&pod.prev(), "1.1.0"));
    assert_eq!(daemon.requests().len(), 1);
    assert!(pod.netns.nodemesh_table().is_none());
    pod.run("CHECK", "default", &conf).expect_ok();
}

#[test]
fn host_network_pod_passes_through() {
    let daemon = FakeDaemon::start(up_mode());
    let state = tempfile::tempdir().expect("tmp");
    let prev = json!({"cniVersion": "1.0.0", "ips": [{"address": "10.1.1.1/24"}]});
    let conf = json!({"cniVersion": "1.0.0", "name": "podnet", "type": "nodemesh-cni",
        "daemon_socket": sock(&daemon), "state_dir": state.path(), "prevResult": prev})
    .to_string();
    let out = run_plugin(
        &[
            ("CNI_COMMAND", "ADD"),
            ("CNI_CONTAINERID", "host-1"),
            // The plugin's own netns: a host-network pod.
            ("CNI_NETNS", "/proc/self/ns/net"),
            ("CNI_IFNAME", "eth0"),
            ("CNI_PATH", "/usr/lib/cni"),
            ("CNI_ARGS", "K8S_POD_NAMESPACE=default;K8S_POD_NAME=h"),
        ],
        &conf,
    );
    out.expect_ok();
    assert_eq!(out.json(), prev);
    assert!(daemon.requests().is_empty());
}

#[test]
fn logs_go_to_log_file_not_stdout() {
    let pod = Pod::new();
    let daemon = FakeDaemon::start(up_mode());
    let log = pod.state.path().join("plugin.log");
    let conf = pod.conf("1.1.0", sock(&daemon), json!({"log_file": log}));
    let out = pod.run("ADD", "default", &conf);
    out.expect_ok();
    out.json();
    let text = std::fs::read_to_string(&log).expect("log file");
    assert!(text.contains("pod meshed"), "{text}");
    pod.run("DEL", "default", &conf).expect_ok();
}

#[test]
fn check_accepts_the_listing_of_a_full_ruleset() {
    let pod = Pod::new();
    let daemon = FakeDaemon::start(up_mode());
    let conf = pod.conf(
        "1.1.0",
        sock(&daemon),
        json!({
            "exclude_outbound_ports": [53, 22, 23, 24],
            "exclude_inbound_ports": [8080, 9090],
            "exclude_outbound_cidrs": ["10.0.0.0/25", "10.0.0.128/25", "192.168.1.7/32", "fd00::/8", "fe80::1/128"],
            "probe_source_cidrs": ["172.16.0.0/12", "fd01::1/128"]
        }),
    );
    pod.run("ADD", "default", &conf).expect_ok();
    let table = pod.netns.nodemesh_table().expect("table");
    assert!(
        table.contains("ip daddr { 10.0.0.0/24, 192.168.1.7 } return"),
        "{table}"
    );
    pod.run("CHECK", "default", &conf).expect_ok();
    pod.run("DEL", "default", &conf).expect_ok();
}
