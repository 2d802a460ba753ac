//! A mini container runtime: executes a CNI conflist as libcni does.
//!
//! ADD calls each plugin in order with the network's `cniVersion` and `name`
//! injected in its config and, from the second plugin on, `prevResult` set to
//! the previous plugin's output; DEL calls them in reverse order, each with
//! the final ADD result as `prevResult`. Plugins are found in `CNI_PATH` and
//! run inside the node's namespace (`ip netns exec`), so that what they build
//! on the "host" side (bridge, veth, IPAM state) lands in the node.

use std::net::{Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::{json, Value};

use crate::error::LabError;
use crate::exec::Cmd;
use crate::netns::netns_path;

/// CNI spec version the lab speaks.
pub const CNI_VERSION: &str = "1.0.0";
/// Network name of the lab conflist.
pub const NETWORK_NAME: &str = "nodemesh-lab";
/// Directory of the Debian reference plugins.
pub const SYSTEM_PLUGIN_DIR: &str = "/usr/lib/cni";
/// Deadline of one plugin invocation.
pub const PLUGIN_TIMEOUT: Duration = Duration::from_secs(30);

/// The `bridge` plugin entry, with `host-local` IPAM over `subnet`.
pub fn bridge_plugin(subnet: &str, ipam_dir: &Path) -> Value {
    json!({
        "type": "bridge",
        "bridge": "cni0",
        "isGateway": true,
        "ipMasq": false,
        "ipam": {
            "type": "host-local",
            "subnet": subnet,
            "dataDir": ipam_dir,
            // The pod's default route via the bridge (the node), as
            // Kubernetes bridge configs have it.
            "routes": [{"dst": "0.0.0.0/0"}],
        },
    })
}

/// `plugin` (a [`bridge_plugin`] entry) made dual-stack when `subnet6` is
/// given: host-local allocates one address from each of two ranges (IPv4
/// first, so IPv4 stays the first address of the result, as in a
/// Kubernetes dual-stack cluster with IPv4 primary), and the pod gets an
/// IPv6 default route via the bridge too.
pub fn with_ipv6(mut plugin: Value, subnet6: Option<&str>) -> Value {
    let Some(subnet6) = subnet6 else {
        return plugin;
    };
    if let Some(ipam) = plugin.get_mut("ipam").and_then(Value::as_object_mut) {
        if let Some(subnet) = ipam.remove("subnet") {
            ipam.insert(
                "ranges".into(),
                json!([[{"subnet": subnet}], [{"subnet": subnet6}]]),
            );
        }
        ipam.insert(
            "routes".into(),
            json!([{"dst": "0.0.0.0/0"}, {"dst": "::/0"}]),
        );
    }
    plugin
}

/// `plugin` (a `bridge` entry) with its `mtu` set, when one is given: the
/// bridge plugin applies it to the pod's veth and the node's bridge.
pub fn with_mtu(mut plugin: Value, mtu: Option<u32>) -> Value {
    if let (Some(mtu), Some(obj)) = (mtu, plugin.as_object_mut()) {
        obj.insert("mtu".into(), json!(mtu));
    }
    plugin
}

/// The `nodemesh-cni` entry.
pub fn nodemesh_plugin(daemon_socket: &Path, log_file: &Path, state_dir: &Path) -> Value {
    json!({
        "type": "nodemesh-cni",
        "daemon_socket": daemon_socket,
        "log_file": log_file,
        "state_dir": state_dir,
        "timeout_ms": 10000,
    })
}

/// A conflist of `plugins`.
pub fn conflist(plugins: Vec<Value>) -> Value {
    json!({
        "cniVersion": CNI_VERSION,
        "name": NETWORK_NAME,
        "plugins": plugins,
    })
}

fn plugins_of(conflist: &Value) -> Result<&Vec<Value>, LabError> {
    conflist
        .get("plugins")
        .and_then(Value::as_array)
        .filter(|p| !p.is_empty())
        .ok_or_else(|| LabError::CniFormat {
            what: "conflist".into(),
            problem: "`plugins` is missing or empty".into(),
        })
}

fn plugin_type(plugin: &Value) -> Result<&str, LabError> {
    plugin
        .get("type")
        .and_then(Value::as_str)
        .ok_or_else(|| LabError::CniFormat {
            what: "conflist".into(),
            problem: format!("plugin entry without a string `type`: {plugin}"),
        })
}

/// The stdin of plugin `index` of `conflist`: its entry plus `cniVersion`,
/// `name` and, if given, `prevResult` — as libcni builds it.
pub fn plugin_stdin(
    conflist: &Value,
    index: usize,
    prev_result: Option<&Value>,
) -> Result<Value, LabError> {
    let plugins = plugins_of(conflist)?;
    let entry = plugins.get(index).ok_or_else(|| LabError::CniFormat {
        what: "conflist".into(),
        problem: format!("no plugin at index {index}"),
    })?;
    let mut conf = entry
        .as_object()
        .cloned()
        .ok_or_else(|| LabError::CniFormat {
            what: "conflist".into(),
            problem: format!("plugin {index} is not an object"),
        })?;
    for key in ["cniVersion", "name"] {
        let value = conflist
            .get(key)
            .cloned()
            .ok_or_else(|| LabError::CniFormat {
                what: "conflist".into(),
                problem: format!("`{key}` is missing"),
            })?;
        conf.insert(key.to_owned(), value);
    }
    if let Some(prev) = prev_result {
        conf.insert("prevResult".to_owned(), prev.clone());
    }
    Ok(Value::Object(conf))
}

/// One pod's runtime parameters for a CNI call.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Invocation {
    /// Container id (`CNI_CONTAINERID`).
    pub container_id: String,
    /// Pod namespace name under `/run/netns`.
    pub netns: String,
    /// Interface inside the pod (`CNI_IFNAME`).
    pub ifname: String,
    /// Kubernetes namespace of the pod.
    pub pod_namespace: String,
    /// Kubernetes name of the pod.
    pub pod_name: String,
    /// Kubernetes UID of the pod.
    pub pod_uid: String,
}

impl Invocation {
    /// `CNI_ARGS` as the kubelet passes it.
    pub fn cni_args(&self) -> String {
        format!(
            "IgnoreUnknown=1;K8S_POD_NAMESPACE={};K8S_POD_NAME={};K8S_POD_INFRA_CONTAINER_ID={};K8S_POD_UID={}",
            self.pod_namespace, self.pod_name, self.container_id, self.pod_uid
        )
    }

    /// The CNI environment for `command` (`ADD`, `DEL`) with plugin search path `cni_path`.
    pub fn env(&self, command: &str, cni_path: &[PathBuf]) -> Vec<(String, String)> {
        let path = cni_path
            .iter()
            .map(|p| p.display().to_string())
            .collect::<Vec<_>>()
            .join(":");
        vec![
            ("CNI_COMMAND".into(), command.into()),
            ("CNI_CONTAINERID".into(), self.container_id.clone()),
            (
                "CNI_NETNS".into(),
                netns_path(&self.netns).display().to_string(),
            ),
            ("CNI_IFNAME".into(), self.ifname.clone()),
            ("CNI_ARGS".into(), self.cni_args()),
            ("CNI_PATH".into(), path),
        ]
    }
}

/// Executes a conflist's plugins for pods of one node.
#[derive(Debug, Clone)]
pub struct Runtime {
    /// The conflist.
    pub conflist: Value,
    /// Plugin search path (`CNI_PATH`).
    pub cni_path: Vec<PathBuf>,
    /// Namespace the plugins run in (the node's).
    pub exec_netns: String,
}

impl Runtime {
    fn find_plugin(&self, kind: &str) -> Result<PathBuf, LabError> {
        self.cni_path
            .iter()
            .map(|dir| dir.join(kind))
            .find(|p| p.is_file())
            .ok_or_else(|| LabError::BinaryMissing {
                name: kind.to_owned(),
                searched: self.cni_path.clone(),
            })
    }

    fn call(
        &self,
        command: &'static str,
        index: usize,
        inv: &Invocation,
        prev: Option<&Value>,
    ) -> Result<Value, LabError> {
        let plugins = plugins_of(&self.conflist)?;
        let entry = plugins.get(index).ok_or_else(|| LabError::CniFormat {
            what: "conflist".into(),
            problem: format!("no plugin at index {index}"),
        })?;
        let kind = plugin_type(entry)?;
        let binary = self.find_plugin(kind)?;
        let stdin = plugin_stdin(&self.conflist, index, prev)?;
        let mut cmd = Cmd::in_netns(&self.exec_netns, binary.display().to_string())
            .stdin(stdin.to_string().into_bytes())
            .timeout(PLUGIN_TIMEOUT);
        for (k, v) in inv.env(command, &self.cni_path) {
            cmd = cmd.env(k, v);
        }
        tracing::debug!(plugin = kind, command, pod = %inv.netns, "calling CNI plugin");
        let out = cmd.output()?;
        let fail = |message: String| LabError::Cni {
            plugin: kind.to_owned(),
            command,
            pod: inv.netns.clone(),
            message,
        };
        if !out.status.success() {
            let parsed: Option<Value> = serde_json::from_slice(&out.stdout).ok();
            let message = match parsed {
                Some(v) => format!(
                    "code {} {} {}",
                    v.get("code").cloned().unwrap_or(Value::Null),
                    v.get("msg").and_then(Value::as_str).unwrap_or(""),
                    v.get("details").and_then(Value::as_str).unwrap_or("")
                ),
                None => format!("{}: {}", out.status, out.stderr.trim()),
            };
            return Err(fail(message));
        }
        if command == "DEL" || out.stdout.iter().all(u8::is_ascii_whitespace) {
            return Ok(Value::Null);
        }
        serde_json::from_slice(&out.stdout)
            .map_err(|e| fail(format!("result is not JSON ({e}): {}", out.stdout_text())))
    }

    /// ADD: every plugin in order; returns the final result.
    pub fn add(&self, inv: &Invocation) -> Result<Value, LabError> {
        let count = plugins_of(&self.conflist)?.len();
        let mut prev: Option<Value> = None;
        for index in 0..count {
            let result = self.call("ADD", index, inv, prev.as_ref())?;
            prev = Some(result);
        }
        prev.ok_or_else(|| LabError::CniFormat {
            what: "ADD".into(),
            problem: "no result".into(),
        })
    }

    /// DEL: every plugin in reverse order with `result` as prevResult.
    /// Every plugin is called even if one fails; the first error is returned.
    pub fn del(&self, inv: &Invocation, result: Option<&Value>) -> Result<(), LabError> {
        let count = plugins_of(&self.conflist)?.len();
        let mut first_err = None;
        for index in (0..count).rev() {
            if let Err(e) = self.call("DEL", index, inv, result) {
                tracing::warn!(error = %e, pod = %inv.netns, "CNI DEL failed");
                first_err.get_or_insert(e);
            }
        }
        first_err.map_or(Ok(()), Err)
    }
}

/// The first address of type `A` in a CNI result (`ips[].address`,
/// `addr/len`), without its prefix length.
fn result_address<A: std::str::FromStr>(result: &Value) -> Option<A> {
    result
        .get("ips")?
        .as_array()?
        .iter()
        .filter_map(|ip| ip.get("address")?.as_str())
        .find_map(|a| a.split('/').next()?.parse().ok())
}

/// The first IPv4 address of a CNI result.
pub fn result_ipv4(result: &Value) -> Option<Ipv4Addr> {
    result_address(result)
}

/// The first IPv6 address of a CNI result.
pub fn result_ipv6(result: &Value) -> Option<Ipv6Addr> {
    result_address(result)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn list() -> Value {
        conflist(vec![
            bridge_plugin("10.78.1.0/24", Path::new("/run/x/n1/ipam")),
            nodemesh_plugin(
                Path::new("/run/x/n1/cni.sock"),
                Path::new("/run/x/n1/cni.log"),
                Path::new("/run/x/n1/cni"),
            ),
        ])
    }

    #[test]
    fn first_plugin_gets_version_and_name_but_no_prev_result() {
        let conf = plugin_stdin(&list(), 0, None).expect("stdin");
        assert_eq!(conf["cniVersion"], "1.0.0");
        assert_eq!(conf["name"], "nodemesh-lab");
        assert_eq!(conf["type"], "bridge");
        assert_eq!(conf["ipam"]["subnet"], "10.78.1.0/24");
        assert_eq!(conf["ipam"]["dataDir"], "/run/x/n1/ipam");
        assert_eq!(conf["ipam"]["routes"][0]["dst"], "0.0.0.0/0");
        assert!(conf.get("prevResult").is_none());
    }

    #[test]
    fn chained_plugin_gets_prev_result() {
        let prev = json!({"cniVersion": "1.0.0", "ips": [{"address": "10.78.1.2/24"}]});
        let conf = plugin_stdin(&list(), 1, Some(&prev)).expect("stdin");
        assert_eq!(conf["type"], "nodemesh-cni");
        assert_eq!(conf["daemon_socket"], "/run/x/n1/cni.sock");
        assert_eq!(conf["timeout_ms"], 10000);
        assert_eq!(conf["prevResult"], prev);
        assert_eq!(conf["name"], "nodemesh-lab");
        assert!(plugin_stdin(&list(), 2, None).is_err());
    }

    #[test]
    fn env_is_what_a_runtime_sets() {
        let inv = Invocation {
            container_id: "c1".into(),
            netns: "nml-n1-p1".into(),
            ifname: "eth0".into(),
            pod_namespace: "lab".into(),
            pod_name: "n1-p1".into(),
            pod_uid: "u-1".into(),
        };
        let env = inv.env("ADD", &[PathBuf::from("/usr/lib/cni"), PathBuf::from("/t")]);
        let get = |k: &str| {
            env.iter()
                .find(|(key, _)| key == k)
                .map(|(_, v)| v.clone())
                .expect(k)
        };
        assert_eq!(get("CNI_COMMAND"), "ADD");
        assert_eq!(get("CNI_NETNS"), "/run/netns/nml-n1-p1");
        assert_eq!(get("CNI_IFNAME"), "eth0");
        assert_eq!(get("CNI_PATH"), "/usr/lib/cni:/t");
        assert!(get("CNI_ARGS")
            .starts_with("IgnoreUnknown=1;K8S_POD_NAMESPACE=lab;K8S_POD_NAME=n1-p1;"));
        assert!(get("CNI_ARGS").ends_with("K8S_POD_UID=u-1"));
    }

    #[test]
    fn ipv4_from_result() {
        let r = json!({"ips": [{"address": "fd00::2/64"}, {"address": "10.78.1.2/24", "gateway": "10.78.1.1"}]});
        assert_eq!(result_ipv4(&r), Some(Ipv4Addr::new(10, 78, 1, 2)));
        assert_eq!(result_ipv4(&json!({})), None);
        assert_eq!(result_ipv6(&r), "fd00::2".parse().ok());
        assert_eq!(
            result_ipv6(&json!({"ips": [{"address": "10.78.1.2/24"}]})),
            None
        );
    }

    #[test]
    fn dual_stack_bridge_allocates_from_two_ranges_with_two_default_routes() {
        let dir = Path::new("/run/x/n1/ipam");
        let single = bridge_plugin("10.78.1.0/24", dir);
        assert_eq!(with_ipv6(single.clone(), None), single);
        let dual = with_ipv6(single, Some("fd00:78:1::/64"));
        let ipam = &dual["ipam"];
        assert!(ipam.get("subnet").is_none(), "{ipam}");
        assert_eq!(
            ipam["ranges"],
            json!([[{"subnet": "10.78.1.0/24"}], [{"subnet": "fd00:78:1::/64"}]])
        );
        assert_eq!(
            ipam["routes"],
            json!([{"dst": "0.0.0.0/0"}, {"dst": "::/0"}])
        );
        assert_eq!(ipam["dataDir"], "/run/x/n1/ipam");
        assert_eq!(dual["isGateway"], true);
    }
}
