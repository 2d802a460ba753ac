//! Everything the runtime hands the plugin: the `CNI_*` environment (read
//! from a map, so tests never touch the process environment), `CNI_ARGS`,
//! and the network configuration on stdin with our keys and their defaults.

use std::collections::HashMap;
use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

use ipnet::IpNet;
use serde::Deserialize;
use serde_json::Value;

use crate::error::{code, CniError};

/// The CNI version this plugin implements.
pub const CURRENT_VERSION: &str = "1.1.0";
/// Versions accepted in `cniVersion`, oldest first.
pub const SUPPORTED_VERSIONS: [&str; 4] = ["0.3.1", "0.4.0", "1.0.0", "1.1.0"];
/// Default `timeout_ms`: how long ADD waits for the daemon to confirm the
/// pod's listeners. Long enough for a loaded node, short enough that the
/// kubelet's own ADD deadline is not hit first.
pub const DEFAULT_TIMEOUT_MS: u64 = 10_000;
/// Default `state_dir`: DEL queue and GC bookkeeping.
pub const DEFAULT_STATE_DIR: &str = "/var/lib/nodemesh-cni";
/// Environment variable with a `tracing` filter for the plugin's own logs
/// (default `info`), e.g. `nodemesh_cni=debug`.
pub const ENV_LOG_FILTER: &str = "NODEMESH_CNI_LOG";
/// Default `excluded_namespaces`.
pub const DEFAULT_EXCLUDED_NAMESPACES: [&str; 1] = ["kube-system"];

/// A CNI operation, from `CNI_COMMAND`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    /// Attach: register the pod and install capture rules.
    Add,
    /// Detach: remove the rules and unregister.
    Del,
    /// Verify rules and registration.
    Check,
    /// Report supported versions.
    Version,
    /// Garbage-collect attachments not in the valid list (1.1).
    Gc,
    /// Report readiness (1.1).
    Status,
}

impl Command {
    fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "ADD" => Self::Add,
            "DEL" => Self::Del,
            "CHECK" => Self::Check,
            "VERSION" => Self::Version,
            "GC" => Self::Gc,
            "STATUS" => Self::Status,
            _ => return None,
        })
    }
}

/// The `CNI_*` variables, validated for the command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CniEnv {
    /// `CNI_COMMAND`.
    pub command: Command,
    /// `CNI_CONTAINERID` (empty when not required and absent).
    pub container_id: String,
    /// `CNI_NETNS`, when given and non-empty.
    pub netns: Option<PathBuf>,
    /// `CNI_IFNAME` (empty when not required and absent).
    pub ifname: String,
    /// Parsed `CNI_ARGS`.
    pub args: CniArgs,
}

fn missing(var: &str, cmd: &str) -> CniError {
    CniError::new(
        code::INVALID_ENV,
        format!("required environment variable {var} missing"),
        format!("{var} must be set for CNI_COMMAND={cmd}"),
    )
}

impl CniEnv {
    /// Reads and validates the variables required by `CNI_COMMAND`, as the
    /// reference `skel` does: ADD/CHECK need CNI_CONTAINERID, CNI_NETNS,
    /// CNI_IFNAME, CNI_PATH; DEL the same without CNI_NETNS; GC and STATUS
    /// need CNI_PATH; VERSION nothing.
    pub fn from_vars(vars: &HashMap<String, String>) -> Result<Self, CniError> {
        let get = |k: &str| vars.get(k).map(String::as_str).filter(|v| !v.is_empty());
        let raw_cmd = get("CNI_COMMAND").ok_or_else(|| {
            CniError::new(
                code::INVALID_ENV,
                "required environment variable CNI_COMMAND missing",
                "CNI_COMMAND must be one of ADD, DEL, CHECK, VERSION, GC, STATUS",
            )
        })?;
        let command = Command::parse(raw_cmd).ok_or_else(|| {
            CniError::new(
                code::INVALID_ENV,
                format!("unknown CNI_COMMAND: {raw_cmd}"),
                "CNI_COMMAND must be one of ADD, DEL, CHECK, VERSION, GC, STATUS",
            )
        })?;
        let (need_id, need_netns, need_path) = match command {
            Command::Add | Command::Check => (true, true, true),
            Command::Del => (true, false, true),
            Command::Gc | Command::Status => (false, false, true),
            Command::Version => (false, false, false),
        };
        let require = |k: &str, needed: bool| -> Result<String, CniError> {
            match get(k) {
                Some(v) => Ok(v.to_owned()),
                None if needed => Err(missing(k, raw_cmd)),
                None => Ok(String::new()),
            }
        };
        let container_id = require("CNI_CONTAINERID", need_id)?;
        if !container_id.is_empty() && !valid_container_id(&container_id) {
            return Err(CniError::new(
                code::INVALID_ENV,
                format!("invalid CNI_CONTAINERID: {container_id:?}"),
                "the container ID must be alphanumeric with '_', '.', '-' only",
            ));
        }
        let netns = require("CNI_NETNS", need_netns)?;
        let ifname = require("CNI_IFNAME", need_id)?;
        if !ifname.is_empty() && !valid_ifname(&ifname) {
            return Err(CniError::new(
                code::INVALID_ENV,
                format!("invalid CNI_IFNAME: {ifname:?}"),
                "an interface name is 1-15 characters without '/', ':' or whitespace, and not '.' or '..'",
            ));
        }
        require("CNI_PATH", need_path)?;
        let args = CniArgs::parse(get("CNI_ARGS").unwrap_or(""))?;
        Ok(Self {
            command,
            container_id,
            netns: (!netns.is_empty()).then(|| PathBuf::from(netns)),
            ifname,
            args,
        })
    }
}

/// Container IDs become file names in `state_dir`: the spec's character set
/// only (alphanumeric, `_`, `.`, `-`; not starting with `.` or `-`).
pub fn valid_container_id(id: &str) -> bool {
    !id.starts_with(['.', '-'])
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
}

/// Linux interface name rules (as the reference `skel` checks them).
pub fn valid_ifname(name: &str) -> bool {
    name.len() <= 15
        && name != "."
        && name != ".."
        && !name
            .chars()
            .any(|c| c == '/' || c == ':' || c.is_whitespace())
}

/// Pod identity from `CNI_ARGS` (`K=V;K=V`); other keys are ignored.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CniArgs {
    /// `K8S_POD_NAMESPACE`.
    pub pod_namespace: Option<String>,
    /// `K8S_POD_NAME`.
    pub pod_name: Option<String>,
    /// `K8S_POD_UID`.
    pub pod_uid: Option<String>,
}

impl CniArgs {
    /// Parses `CNI_ARGS`; a pair without `=` is an error (code 4).
    pub fn parse(raw: &str) -> Result<Self, CniError> {
        let mut out = Self::default();
        for pair in raw.split(';').filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once('=').ok_or_else(|| {
                CniError::new(
                    code::INVALID_ENV,
                    format!("invalid CNI_ARGS pair {pair:?}"),
                    "CNI_ARGS must be KEY=VALUE pairs separated by ';'",
                )
            })?;
            let v = (!v.is_empty()).then(|| v.to_owned());
            match k {
                "K8S_POD_NAMESPACE" => out.pod_namespace = v,
                "K8S_POD_NAME" => out.pod_name = v,
                "K8S_POD_UID" => out.pod_uid = v,
                _ => {}
            }
        }
        Ok(out)
    }
}

/// One entry of `cni.dev/valid-attachments` (GC).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct ValidAttachment {
    /// Container ID of a live attachment.
    #[serde(rename = "containerID")]
    pub container_id: String,
    /// Its interface name.
    #[serde(rename = "ifname", default)]
    pub ifname: String,
}

/// Our keys in the network configuration, with defaults applied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PluginConfig {
    /// `daemon_socket`: the daemon's registration socket.
    pub daemon_socket: PathBuf,
    /// `timeout_ms`: bound on each daemon exchange.
    pub timeout: Duration,
    /// `excluded_namespaces`: pods here are passed through untouched.
    pub excluded_namespaces: Vec<String>,
    /// `exclude_outbound_ports`: destination ports never captured.
    pub exclude_outbound_ports: Vec<u16>,
    /// `exclude_inbound_ports`: local ports never captured inbound.
    pub exclude_inbound_ports: Vec<u16>,
    /// `exclude_outbound_cidrs`: destinations never captured.
    pub exclude_outbound_cidrs: Vec<IpNet>,
    /// `probe_source_cidrs`: extra sources of kubelet probes (besides the
    /// pod's gateways), never captured inbound.
    pub probe_source_cidrs: Vec<IpNet>,
    /// `log_file`: append logs here instead of stderr.
    pub log_file: Option<PathBuf>,
    /// `state_dir`: DEL queue and GC bookkeeping.
    pub state_dir: PathBuf,
}

impl Default for PluginConfig {
    fn default() -> Self {
        Self {
            daemon_socket: PathBuf::from(crate::proto::DEFAULT_SOCKET_PATH),
            timeout: Duration::from_millis(DEFAULT_TIMEOUT_MS),
            excluded_namespaces: DEFAULT_EXCLUDED_NAMESPACES.map(String::from).to_vec(),
            exclude_outbound_ports: Vec::new(),
            exclude_inbound_ports: Vec::new(),
            exclude_outbound_cidrs: Vec::new(),
            probe_source_cidrs: Vec::new(),
            log_file: None,
            state_dir: PathBuf::from(DEFAULT_STATE_DIR),
        }
    }
}

#[derive(Deserialize)]
struct RawConf {
    name: String,
    #[serde(rename = "type")]
    plugin_type: String,
    #[serde(rename = "prevResult", default)]
    prev_result: Option<Value>,
    #[serde(rename = "cni.dev/valid-attachments", default)]
    valid_attachments: Option<Vec<ValidAttachment>>,
    daemon_socket: Option<PathBuf>,
    timeout_ms: Option<u64>,
    excluded_namespaces: Option<Vec<String>>,
    #[serde(default)]
    exclude_outbound_ports: Vec<u16>,
    #[serde(default)]
    exclude_inbound_ports: Vec<u16>,
    #[serde(default)]
    exclude_outbound_cidrs: Vec<IpNet>,
    #[serde(default)]
    probe_source_cidrs: Vec<IpNet>,
    log_file: Option<PathBuf>,
    state_dir: Option<PathBuf>,
}

/// The network configuration on stdin.
#[derive(Debug, Clone, PartialEq)]
pub struct NetConf {
    /// `cniVersion`, one of [`SUPPORTED_VERSIONS`].
    pub cni_version: String,
    /// `name` of the network.
    pub name: String,
    /// `type` (our binary name).
    pub plugin_type: String,
    /// `prevResult`, kept as JSON to be printed back unchanged.
    pub prev_result: Option<Value>,
    /// `cni.dev/valid-attachments` (GC only).
    pub valid_attachments: Option<Vec<ValidAttachment>>,
    /// Our keys.
    pub plugin: PluginConfig,
}

/// Reads `cniVersion` if the input is a JSON object that has one; used to
/// report errors at the requested version even when the rest is invalid.
pub fn peek_version(stdin: &[u8]) -> Option<String> {
    let v: Value = serde_json::from_slice(stdin).ok()?;
    let ver = v.get("cniVersion")?.as_str()?;
    SUPPORTED_VERSIONS.contains(&ver).then(|| ver.to_owned())
}

/// Whether `version` is at least `min` (both dotted triples).
pub fn version_at_least(version: &str, min: &str) -> bool {
    fn triple(s: &str) -> Vec<u64> {
        s.split('.').map(|p| p.parse().unwrap_or(0)).collect()
    }
    triple(version) >= triple(min)
}

impl NetConf {
    /// Parses stdin: not JSON → code 6; no or unsupported `cniVersion` →
    /// code 1 (missing: 7); wrong shapes or values of keys → code 7.
    pub fn parse(stdin: &[u8]) -> Result<Self, CniError> {
        let value: Value = serde_json::from_slice(stdin).map_err(|e| {
            CniError::new(
                code::DECODE,
                "failed to decode network configuration",
                format!("stdin is not valid JSON: {e}"),
            )
        })?;
        let invalid =
            |msg: String| CniError::new(code::INVALID_CONFIG, "invalid network configuration", msg);
        if !value.is_object() {
            return Err(invalid(
                "the network configuration must be a JSON object".into(),
            ));
        }
        let version = match value.get("cniVersion") {
            Some(Value::String(v)) => v.clone(),
            Some(other) => {
                return Err(invalid(format!("cniVersion must be a string, got {other}")))
            }
            None => return Err(invalid("cniVersion is missing".into())),
        };
        if !SUPPORTED_VERSIONS.contains(&version.as_str()) {
            return Err(CniError::new(
                code::INCOMPATIBLE_VERSION,
                format!("incompatible CNI version {version}"),
                format!("this plugin supports {}", SUPPORTED_VERSIONS.join(", ")),
            ));
        }
        let raw: RawConf = serde_json::from_value(value)
            .map_err(|e| invalid(e.to_string()).at_version(&version))?;
        if raw.timeout_ms == Some(0) {
            return Err(invalid("timeout_ms must be greater than 0".into()).at_version(&version));
        }
        if raw.exclude_inbound_ports.contains(&0) || raw.exclude_outbound_ports.contains(&0) {
            return Err(invalid("port 0 cannot be excluded".into()).at_version(&version));
        }
        if raw.name.is_empty() {
            return Err(invalid("missing network name".into()).at_version(&version));
        }
        let defaults = PluginConfig::default();
        Ok(Self {
            cni_version: version,
            name: raw.name,
            plugin_type: raw.plugin_type,
            prev_result: raw.prev_result.filter(|v| !v.is_null()),
            valid_attachments: raw.valid_attachments,
            plugin: PluginConfig {
                daemon_socket: raw.daemon_socket.unwrap_or(defaults.daemon_socket),
                timeout: raw
                    .timeout_ms
                    .map(Duration::from_millis)
                    .unwrap_or(defaults.timeout),
                excluded_namespaces: raw
                    .excluded_namespaces
                    .unwrap_or(defaults.excluded_namespaces),
                exclude_outbound_ports: raw.exclude_outbound_ports,
                exclude_inbound_ports: raw.exclude_inbound_ports,
                exclude_outbound_cidrs: raw.exclude_outbound_cidrs,
                probe_source_cidrs: raw.probe_source_cidrs,
                log_file: raw.log_file,
                state_dir: raw.state_dir.unwrap_or(defaults.state_dir),
            },
        })
    }
}

/// Addresses and gateways of `prevResult.ips` (prefix lengths stripped).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PrevIps {
    /// The pod's addresses.
    pub addresses: Vec<IpAddr>,
    /// Their gateways (the node side: kubelet probes come from there).
    pub gateways: Vec<IpAddr>,
}

/// Extracts [`PrevIps`] from a `prevResult`; malformed entries are code 7.
pub fn prev_ips(prev: &Value) -> Result<PrevIps, CniError> {
    let invalid = |msg: String| CniError::new(code::INVALID_CONFIG, "invalid prevResult", msg);
    let mut out = PrevIps::default();
    let Some(ips) = prev.get("ips") else {
        return Ok(out);
    };
    let ips = ips
        .as_array()
        .ok_or_else(|| invalid("prevResult.ips must be an array".into()))?;
    for ip in ips {
        let addr = ip
            .get("address")
            .and_then(Value::as_str)
            .ok_or_else(|| invalid(format!("prevResult.ips entry without address: {ip}")))?;
        let host = addr.split_once('/').map_or(addr, |(h, _)| h);
        out.addresses.push(host.parse().map_err(|_| {
            invalid(format!(
                "prevResult.ips address {addr:?} is not an IP/prefix"
            ))
        })?);
        if let Some(gw) = ip.get("gateway").and_then(Value::as_str) {
            out.gateways.push(
                gw.parse()
                    .map_err(|_| invalid(format!("prevResult.ips gateway {gw:?} is not an IP")))?,
            );
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn env_required_per_command() {
        let e = CniEnv::from_vars(&vars(&[("CNI_COMMAND", "ADD"), ("CNI_CONTAINERID", "c1")]))
            .expect_err("netns missing");
        assert_eq!(e.code, 4);
        assert!(e.msg.contains("CNI_NETNS"), "{e:?}");
        let del = CniEnv::from_vars(&vars(&[
            ("CNI_COMMAND", "DEL"),
            ("CNI_CONTAINERID", "c1"),
            ("CNI_IFNAME", "eth0"),
            ("CNI_PATH", "/opt/cni/bin"),
            ("CNI_NETNS", ""),
        ]))
        .expect("DEL without netns");
        assert_eq!(del.netns, None);
        let v = CniEnv::from_vars(&vars(&[("CNI_COMMAND", "VERSION")])).expect("VERSION");
        assert_eq!(v.command, Command::Version);
        let e = CniEnv::from_vars(&vars(&[("CNI_COMMAND", "STATUS")])).expect_err("path");
        assert!(e.msg.contains("CNI_PATH"));
        let e = CniEnv::from_vars(&vars(&[("CNI_COMMAND", "FROB")])).expect_err("unknown");
        assert_eq!(e.code, 4);
        let e = CniEnv::from_vars(&vars(&[])).expect_err("no command");
        assert!(e.msg.contains("CNI_COMMAND"));
    }

    #[test]
    fn ifname_rules() {
        assert!(valid_ifname("eth0"));
        assert!(!valid_ifname("a-very-long-interface"));
        assert!(!valid_ifname("et/h0"));
        assert!(!valid_ifname(".."));
        let e = CniEnv::from_vars(&vars(&[
            ("CNI_COMMAND", "DEL"),
            ("CNI_CONTAINERID", "c1"),
            ("CNI_IFNAME", "bad name"),
            ("CNI_PATH", "/opt/cni/bin"),
        ]))
        .expect_err("bad ifname");
        assert_eq!(e.code, 4);
        assert_eq!(
            NetConf::parse(br#"{"cniVersion":"1.0.0","name":"","type":"t"}"#)
                .expect_err("no name")
                .code,
            7
        );
    }

    #[test]
    fn container_id_charset() {
        assert!(valid_container_id("abc-1.2_3"));
        assert!(!valid_container_id("../etc"));
        assert!(!valid_container_id("a/b"));
        assert!(!valid_container_id("-x"));
    }

    #[test]
    fn cni_args_parsing() {
        let a = CniArgs::parse(
            "IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=web-0;K8S_POD_UID=u-1",
        )
        .expect("args");
        assert_eq!(a.pod_namespace.as_deref(), Some("default"));
        assert_eq!(a.pod_name.as_deref(), Some("web-0"));
        assert_eq!(a.pod_uid.as_deref(), Some("u-1"));
        assert_eq!(CniArgs::parse("").expect("empty"), CniArgs::default());
        assert_eq!(CniArgs::parse("garbage").expect_err("no =").code, 4);
    }

    #[test]
    fn netconf_defaults_and_errors() {
        let c = NetConf::parse(br#"{"cniVersion":"1.0.0","name":"n","type":"nodemesh-cni"}"#)
            .expect("parse");
        assert_eq!(c.plugin, PluginConfig::default());
        assert_eq!(c.prev_result, None);
        assert_eq!(NetConf::parse(b"{nope").expect_err("json").code, 6);
        assert_eq!(
            NetConf::parse(br#"{"cniVersion":"9.9.9","name":"n","type":"t"}"#)
                .expect_err("ver")
                .code,
            1
        );
        let e = NetConf::parse(br#"{"cniVersion":"1.1.0","name":"n","type":"t","timeout_ms":"x"}"#)
            .expect_err("bad type");
        assert_eq!((e.code, e.cni_version.as_str()), (7, "1.1.0"));
        assert_eq!(NetConf::parse(br#"[1]"#).expect_err("array").code, 7);
        let c = NetConf::parse(
            br#"{"cniVersion":"0.4.0","name":"n","type":"t","timeout_ms":5,"exclude_outbound_cidrs":["10.0.0.0/8"],
                "excluded_namespaces":[],"state_dir":"/tmp/x","daemon_socket":"/tmp/s"}"#,
        )
        .expect("custom");
        assert_eq!(c.plugin.timeout, Duration::from_millis(5));
        assert!(c.plugin.excluded_namespaces.is_empty());
        assert_eq!(c.plugin.exclude_outbound_cidrs.len(), 1);
    }

    #[test]
    fn prev_result_ips() {
        let prev: Value = serde_json::from_str(
            r#"{"ips":[{"address":"10.22.0.5/16","gateway":"10.22.0.1"},{"address":"fd00::5/64"}]}"#,
        )
        .expect("json");
        let ips = prev_ips(&prev).expect("ips");
        assert_eq!(
            ips.addresses,
            vec![
                "10.22.0.5".parse::<IpAddr>().expect("ip"),
                "fd00::5".parse().expect("ip")
            ]
        );
        assert_eq!(
            ips.gateways,
            vec!["10.22.0.1".parse::<IpAddr>().expect("ip")]
        );
        assert_eq!(
            prev_ips(&serde_json::json!({"ips":[{"address":"x"}]}))
                .expect_err("bad")
                .code,
            7
        );
    }

    #[test]
    fn versions() {
        assert!(version_at_least("1.1.0", "1.1.0"));
        assert!(version_at_least("1.0.0", "0.4.0"));
        assert!(!version_at_least("0.3.1", "0.4.0"));
        assert_eq!(
            peek_version(br#"{"cniVersion":"1.0.0"}"#).as_deref(),
            Some("1.0.0")
        );
        assert_eq!(peek_version(b"x"), None);
    }
}
