//! Unit tests of the command logic against fake OS edges.

use std::cell::RefCell;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::*;
use crate::os::{DaemonError, NetnsError};

struct FakeNetns {
    kind: NetnsKind,
    fail_apply: bool,
    applied: RefCell<Vec<String>>,
}

impl FakeNetns {
    fn new(kind: NetnsKind) -> Self {
        Self {
            kind,
            fail_apply: false,
            applied: RefCell::default(),
        }
    }
}

impl NetnsOps for FakeNetns {
    fn classify(&self, _: &Path) -> Result<NetnsKind, NetnsError> {
        Ok(self.kind)
    }
    fn nft_apply(&self, netns: &Path, script: &str) -> Result<(), NetnsError> {
        if self.fail_apply && script != DELETE_SCRIPT {
            return Err(NetnsError::Nft {
                path: netns.to_owned(),
                status: "exit status: 1".into(),
                stderr: "Error: no fib".into(),
            });
        }
        self.applied.borrow_mut().push(script.to_owned());
        Ok(())
    }
    fn list_table(&self, _: &Path) -> Result<Option<String>, NetnsError> {
        // The last applied script minus its create/delete prefix.
        Ok(self
            .applied
            .borrow()
            .last()
            .and_then(|s| s.strip_prefix(DELETE_SCRIPT))
            .filter(|s| !s.is_empty())
            .map(str::to_owned))
    }
}

type Answer = Box<dyn Fn(&Request) -> Result<Response, DaemonError>>;

struct FakeDaemon {
    answer: Answer,
    seen: RefCell<Vec<Request>>,
}

impl FakeDaemon {
    fn new(answer: impl Fn(&Request) -> Result<Response, DaemonError> + 'static) -> Self {
        Self {
            answer: Box::new(answer),
            seen: RefCell::default(),
        }
    }
    fn up() -> Self {
        Self::new(|req| {
            Ok(match req {
                Request::Register(_) | Request::Check { .. } => Response::Registered {
                    outbound_port: 15001,
                    inbound_port: 15006,
                    mark: 0x4e4d,
                },
                Request::Unregister { .. } => Response::Unregistered,
                Request::Status => Response::Ready {
                    ready: true,
                    reason: None,
                },
            })
        })
    }
    fn down() -> Self {
        Self::new(|_| {
            Err(DaemonError::Connect {
                path: "/run/nodemesh/cni.sock".into(),
                source: std::io::Error::from(std::io::ErrorKind::NotFound),
            })
        })
    }
}

impl DaemonClient for FakeDaemon {
    fn call(&self, _: &Path, req: &Request, _: Duration) -> Result<Response, DaemonError> {
        self.seen.borrow_mut().push(req.clone());
        (self.answer)(req)
    }
}

struct Case {
    state: tempfile::TempDir,
    namespace: &'static str,
}

impl Case {
    fn new() -> Self {
        Self {
            state: tempfile::tempdir().expect("tmp"),
            namespace: "default",
        }
    }
    fn env(&self, cmd: &str) -> CniEnv {
        let vars: HashMap<String, String> = [
            ("CNI_COMMAND", cmd.to_owned()),
            ("CNI_CONTAINERID", "c1".to_owned()),
            ("CNI_NETNS", "/run/netns/pod".to_owned()),
            ("CNI_IFNAME", "eth0".to_owned()),
            ("CNI_PATH", "/opt/cni/bin".to_owned()),
            (
                "CNI_ARGS",
                format!(
                    "IgnoreUnknown=1;K8S_POD_NAMESPACE={};K8S_POD_NAME=web-0;K8S_POD_UID=u1",
                    self.namespace
                ),
            ),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect();
        CniEnv::from_vars(&vars).expect("env")
    }
    fn conf(&self, version: &str) -> Vec<u8> {
        serde_json::json!({
            "cniVersion": version,
            "name": "podnet",
            "type": "nodemesh-cni",
            "state_dir": self.state.path(),
            "exclude_inbound_ports": [9090],
            "prevResult": {
                "cniVersion": "1.0.0",
                "interfaces": [{"name": "eth0", "sandbox": "/run/netns/pod"}],
                "ips": [{"address": "10.22.0.5/16", "gateway": "10.22.0.1", "interface": 0}],
                "dns": {}
            },
            "cni.dev/valid-attachments": [{"containerID": "other", "ifname": "eth0"}]
        })
        .to_string()
        .into_bytes()
    }
    fn run(
        &self,
        cmd: &str,
        netns: &FakeNetns,
        daemon: &FakeDaemon,
    ) -> Result<Option<String>, CniError> {
        run(&self.env(cmd), &self.conf("1.1.0"), Edges { netns, daemon })
    }
    fn state(&self) -> StateDir {
        StateDir::new(self.state.path())
    }
}

fn prev_at(version: &str) -> Value {
    serde_json::json!({
        "cniVersion": version,
        "interfaces": [{"name": "eth0", "sandbox": "/run/netns/pod"}],
        "ips": [{"address": "10.22.0.5/16", "gateway": "10.22.0.1", "interface": 0}],
        "dns": {}
    })
}

#[test]
fn add_registers_then_installs_rules_and_passes_prev_result() {
    let case = Case::new();
    let (netns, daemon) = (FakeNetns::new(NetnsKind::Pod), FakeDaemon::up());
    let out = case
        .run("ADD", &netns, &daemon)
        .expect("add")
        .expect("output");
    let printed: Value = serde_json::from_str(&out).expect("json");
    assert_eq!(printed, prev_at("1.1.0"));
    let seen = daemon.seen.borrow();
    let [Request::Register(reg)] = seen.as_slice() else {
        panic!("expected one register, got {seen:?}");
    };
    assert_eq!(reg.container_id, "c1");
    assert_eq!(reg.namespace, "default");
    assert_eq!(reg.name, "web-0");
    assert_eq!(reg.pod_uid.as_deref(), Some("u1"));
    assert_eq!(reg.netns, PathBuf::from("/run/netns/pod"));
    assert_eq!(
        reg.ips,
        vec!["10.22.0.5".parse::<std::net::IpAddr>().expect("ip")]
    );
    let applied = netns.applied.borrow();
    assert_eq!(applied.len(), 1);
    assert!(applied[0].starts_with(DELETE_SCRIPT));
    assert!(applied[0].contains("ip saddr 10.22.0.1 return"));
    assert!(applied[0].contains("tcp dport 9090 return"));
    assert!(applied[0].contains("redirect to :15001"));
    let rec = case.state().attachment("c1").expect("record");
    assert_eq!(rec.capture.map(|c| c.inbound_port), Some(15006));
}

#[test]
fn add_in_excluded_namespace_touches_nothing() {
    let mut case = Case::new();
    case.namespace = "kube-system";
    let (netns, daemon) = (FakeNetns::new(NetnsKind::Pod), FakeDaemon::up());
    let out = case.run("ADD", &netns, &daemon).expect("add").expect("out");
    assert_eq!(
        serde_json::from_str::<Value>(&out).expect("json"),
        prev_at("1.1.0")
    );
    assert!(daemon.seen.borrow().is_empty());
    assert!(netns.applied.borrow().is_empty());
}

#[test]
fn add_host_network_pod_touches_nothing() {
    let case = Case::new();
    let (netns, daemon) = (FakeNetns::new(NetnsKind::Host), FakeDaemon::up());
    case.run("ADD", &netns, &daemon).expect("add");
    assert!(daemon.seen.borrow().is_empty());
    assert!(netns.applied.borrow().is_empty());
}

#[test]
fn add_with_daemon_down_fails_closed() {
    let case = Case::new();
    let (netns, daemon) = (FakeNetns::new(NetnsKind::Pod), FakeDaemon::down());
    let err = case.run("ADD", &netns, &daemon).expect_err("closed");
    assert_eq!(err.code, code::TRY_AGAIN_LATER);
    assert!(err.msg.contains("/run/nodemesh/cni.sock"), "{err:?}");
    assert!(err.details.contains("daemon is running"), "{err:?}");
    assert_eq!(err.cni_version, "1.1.0");
    assert!(netns.applied.borrow().is_empty());
}

#[test]
fn add_skipped_by_daemon_passes_through() {
    let case = Case::new();
    let netns = FakeNetns::new(NetnsKind::Pod);
    let daemon = FakeDaemon::new(|_| {
        Ok(Response::Skipped {
            reason: "annotated nodemesh.io/inject: disabled".into(),
        })
    });
    let out = case.run("ADD", &netns, &daemon).expect("add").expect("out");
    assert_eq!(
        serde_json::from_str::<Value>(&out).expect("json"),
        prev_at("1.1.0")
    );
    assert!(netns.applied.borrow().is_empty());
    // CHECK of a skipped pod is fine without asking the daemon again.
    case.run("CHECK", &netns, &daemon).expect("check");
    assert_eq!(daemon.seen.borrow().len(), 1);
}

#[test]
fn add_rolls_back_when_rules_fail() {
    let case = Case::new();
    let mut netns = FakeNetns::new(NetnsKind::Pod);
    netns.fail_apply = true;
    let daemon = FakeDaemon::up();
    let err = case.run("ADD", &netns, &daemon).expect_err("nft fails");
    assert_eq!(err.code, code::NFT);
    assert!(matches!(
        daemon.seen.borrow().as_slice(),
        [Request::Register(_), Request::Unregister { .. }]
    ));
    assert_eq!(
        netns.applied.borrow().as_slice(),
        [DELETE_SCRIPT.to_owned()]
    );
    assert_eq!(case.state().attachment("c1"), None);
}

#[test]
fn add_refused_by_daemon_is_an_error() {
    let case = Case::new();
    let netns = FakeNetns::new(NetnsKind::Pod);
    let daemon = FakeDaemon::new(|_| {
        Ok(Response::Error {
            code: ErrorCode::Listen,
            message: "bind 15001: address in use".into(),
        })
    });
    let err = case.run("ADD", &netns, &daemon).expect_err("refused");
    assert_eq!(err.code, code::DAEMON_REFUSED);
    assert!(err.msg.contains("address in use"));
}

#[test]
fn add_requires_prev_result() {
    let case = Case::new();
    let conf = br#"{"cniVersion":"1.0.0","name":"n","type":"nodemesh-cni"}"#;
    let (netns, daemon) = (FakeNetns::new(NetnsKind::Pod), FakeDaemon::up());
    let err = run(
        &case.env("ADD"),
        conf,
        Edges {
            netns: &netns,
            daemon: &daemon,
        },
    )
    .expect_err("no prev");
    assert_eq!(
        (err.code, err.cni_version.as_str()),
        (code::INVALID_CONFIG, "1.0.0")
    );
}

#[test]
fn add_at_old_version_keeps_prev_result_shape() {
    let case = Case::new();
    let (netns, daemon) = (FakeNetns::new(NetnsKind::Pod), FakeDaemon::up());
    let out = run(
        &case.env("ADD"),
        &case.conf("0.4.0"),
        Edges {
            netns: &netns,
            daemon: &daemon,
        },
    )
    .expect("add")
    .expect("out");
    assert_eq!(
        serde_json::from_str::<Value>(&out).expect("json"),
        prev_at("0.4.0")
    );
}

#[test]
fn del_with_daemon_down_removes_rules_and_queues() {
    let case = Case::new();
    let netns = FakeNetns::new(NetnsKind::Pod);
    case.run("ADD", &netns, &FakeDaemon::up()).expect("add");
    case.run("DEL", &netns, &FakeDaemon::down()).expect("del");
    assert_eq!(
        netns.applied.borrow().last().map(String::as_str),
        Some(DELETE_SCRIPT)
    );
    assert_eq!(
        case.state().queued().expect("queued"),
        vec!["c1".to_owned()]
    );
    assert_eq!(case.state().attachment("c1"), None);
    // Second DEL, daemon back: delivered, queue drained.
    let daemon = FakeDaemon::up();
    case.run("DEL", &netns, &daemon).expect("del again");
    assert!(case.state().queued().expect("queued").is_empty());
    // A new ADD with the same ID drops any stale queued unregister.
    case.state().queue_unregister("c1").expect("queue");
    case.run("ADD", &netns, &daemon).expect("re-add");
    assert!(case.state().queued().expect("queued").is_empty());
}

#[test]
fn del_with_missing_netns_still_unregisters() {
    let case = Case::new();
    let (netns, daemon) = (FakeNetns::new(NetnsKind::Missing), FakeDaemon::up());
    case.run("DEL", &netns, &daemon).expect("del");
    case.run("DEL", &netns, &daemon).expect("del twice");
    assert!(netns.applied.borrow().is_empty());
    assert_eq!(daemon.seen.borrow().len(), 2);
}

#[test]
fn check_compares_rules_and_registration() {
    let case = Case::new();
    let (netns, daemon) = (FakeNetns::new(NetnsKind::Pod), FakeDaemon::up());
    case.run("ADD", &netns, &daemon).expect("add");
    case.run("CHECK", &netns, &daemon).expect("check ok");
    // Rules gone.
    netns.applied.borrow_mut().push(DELETE_SCRIPT.to_owned());
    let err = case.run("CHECK", &netns, &daemon).expect_err("missing");
    assert_eq!(err.code, code::RULES_MISMATCH);
    // Daemon lost the pod.
    let lost = FakeDaemon::new(|_| {
        Ok(Response::Error {
            code: ErrorCode::NotRegistered,
            message: "unknown".into(),
        })
    });
    assert_eq!(
        case.run("CHECK", &netns, &lost).expect_err("lost").code,
        code::NOT_REGISTERED
    );
    // Daemon with other ports than installed.
    case.run("ADD", &netns, &daemon).expect("add");
    let moved = FakeDaemon::new(|_| {
        Ok(Response::Registered {
            outbound_port: 1,
            inbound_port: 2,
            mark: 3,
        })
    });
    assert_eq!(
        case.run("CHECK", &netns, &moved).expect_err("moved").code,
        code::RULES_MISMATCH
    );
}

#[test]
fn check_needs_version_0_4() {
    let case = Case::new();
    let (netns, daemon) = (FakeNetns::new(NetnsKind::Pod), FakeDaemon::up());
    let err = run(
        &case.env("CHECK"),
        &case.conf("0.3.1"),
        Edges {
            netns: &netns,
            daemon: &daemon,
        },
    )
    .expect_err("old");
    assert_eq!(
        (err.code, err.cni_version.as_str()),
        (code::INCOMPATIBLE_VERSION, "0.3.1")
    );
}

#[test]
fn gc_forgets_and_unregisters_invalid_attachments() {
    let case = Case::new();
    let (netns, daemon) = (FakeNetns::new(NetnsKind::Pod), FakeDaemon::up());
    case.run("ADD", &netns, &daemon).expect("add");
    case.state().queue_unregister("gone").expect("queue");
    case.state().queue_unregister("other").expect("queue");
    let daemon = FakeDaemon::up();
    case.run("GC", &netns, &daemon).expect("gc");
    assert_eq!(case.state().attachment("c1"), None);
    assert_eq!(
        case.state().queued().expect("queued"),
        vec!["other".to_owned()]
    );
    let unregistered: Vec<_> = daemon
        .seen
        .borrow()
        .iter()
        .filter_map(|r| match r {
            Request::Unregister { container_id } => Some(container_id.clone()),
            _ => None,
        })
        .collect();
    assert_eq!(unregistered, vec!["c1".to_owned(), "gone".to_owned()]);
}

#[test]
fn status_reports_readiness() {
    let case = Case::new();
    let netns = FakeNetns::new(NetnsKind::Pod);
    assert_eq!(
        case.run("STATUS", &netns, &FakeDaemon::up())
            .expect("ready"),
        None
    );
    let busy = FakeDaemon::new(|_| {
        Ok(Response::Ready {
            ready: false,
            reason: Some("loading discovery".into()),
        })
    });
    let err = case.run("STATUS", &netns, &busy).expect_err("not ready");
    assert_eq!(err.code, code::NOT_AVAILABLE);
    assert!(err.msg.contains("loading discovery"));
    assert_eq!(
        case.run("STATUS", &netns, &FakeDaemon::down())
            .expect_err("down")
            .code,
        50
    );
}

#[test]
fn version_lists_supported_versions() {
    let case = Case::new();
    let out = case
        .run(
            "VERSION",
            &FakeNetns::new(NetnsKind::Pod),
            &FakeDaemon::down(),
        )
        .expect("version")
        .expect("out");
    assert_eq!(
        out,
        r#"{"cniVersion":"1.1.0","supportedVersions":["0.3.1","0.4.0","1.0.0","1.1.0"]}"#
    );
}
