//! The cluster model every discovery source produces.
//!
//! Owns the plain data types of nodes, pods, namespaces (mesh mode) and
//! authorization policies, as read from a source, and their validation.
//! Policies have the shape of the `authorizationpolicies.nodemesh.io/v1alpha1`
//! CRD spec (camelCase field names), plus the object's `name` and `namespace`. The live, concurrently-read view is `registry`; sources
//! (`discovery::file`) build a [`ClusterModel`] and hand it over whole.

use std::collections::{BTreeMap, HashSet};
use std::net::IpAddr;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use crate::config::is_dns_subdomain;

/// Everything discovery knows about the cluster at one moment.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterModel {
    /// Nodes running a nodemesh daemon.
    #[serde(default)]
    pub nodes: Vec<Node>,
    /// Pods, meshed or not.
    #[serde(default)]
    pub pods: Vec<Pod>,
    /// Namespaces with a mesh mode; a namespace not listed is `permissive`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub namespaces: Vec<Namespace>,
    /// Authorization policies, enforced at the destination node.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub policies: Vec<AuthorizationPolicy>,
    /// Services and their endpoints (ClusterIP:port → endpoints).
    #[serde(default)]
    pub services: Vec<Service>,
}

/// A namespace's mesh settings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Namespace {
    /// Namespace name.
    pub name: String,
    /// Whether plaintext inbound is admitted.
    #[serde(default)]
    pub mode: Mode,
}

/// Per-namespace mode for plaintext inbound (the in-pod `:15006` path).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Plaintext admitted (and labelled `tls="false"`), still subject to policy.
    #[default]
    Permissive,
    /// Plaintext refused: the client's connection is reset.
    Strict,
}

impl Mode {
    /// Label/log value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Permissive => "permissive",
            Self::Strict => "strict",
        }
    }
}

/// An `AuthorizationPolicy` (`nodemesh.io/v1alpha1`): its name and namespace
/// and the fields of its spec.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct AuthorizationPolicy {
    /// Policy name.
    pub name: String,
    /// Namespace of the policy and of the workloads it selects.
    pub namespace: String,
    /// Which pods of the namespace it applies to; empty = all.
    #[serde(default)]
    pub selector: Selector,
    /// ALLOW or DENY.
    pub action: Action,
    /// Connections matched: any rule may match; none = matches nothing.
    #[serde(default)]
    pub rules: Vec<Rule>,
}

/// A label selector.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Selector {
    /// Labels a pod must all carry; empty selects every pod.
    #[serde(default)]
    pub match_labels: BTreeMap<String, String>,
}

/// What a policy does to the connections it matches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Action {
    /// Let matching connections through; makes selected workloads default-deny.
    Allow,
    /// Refuse matching connections; wins over any ALLOW.
    Deny,
}

impl Action {
    /// As written in the spec.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Allow => "ALLOW",
            Self::Deny => "DENY",
        }
    }
}

/// One rule: matches when any `from` entry and any `to` entry match; an
/// empty list matches every connection.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rule {
    /// Sources; any entry may match.
    #[serde(default)]
    pub from: Vec<Source>,
    /// Destinations; any entry may match.
    #[serde(default)]
    pub to: Vec<Destination>,
}

/// A source: every non-empty field must match (one of its values).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Source {
    /// Source identities `spiffe://<td>/ns/<ns>/sa/<sa>`, exact, or a prefix
    /// ending in `*`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub principals: Vec<String>,
    /// Namespaces of the (authenticated) source pod.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub namespaces: Vec<String>,
    /// Service accounts of the (authenticated) source pod, `<namespace>/<name>`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub service_accounts: Vec<String>,
    /// Source address ranges (CIDR, no host bits).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ip_blocks: Vec<String>,
}

/// A destination on the selected workloads.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Destination {
    /// Destination TCP ports of the pod (1..=65535); empty = any.
    #[serde(default)]
    pub ports: Vec<u16>,
}

/// A node and where its daemon is reached.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Node {
    /// Kubernetes node name; also the node's identity
    /// `spiffe://<trust-domain>/nodemesh/node/<name>`.
    pub name: String,
    /// Address of the node's tunnel endpoint.
    pub address: IpAddr,
    /// Pod CIDRs allocated to the node: addresses in them route to it.
    #[serde(default)]
    pub pod_cidrs: Vec<IpNet>,
}

/// A pod.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Pod {
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
    /// Service account. Default `default`.
    #[serde(default = "default_sa")]
    pub service_account: String,
    /// Node the pod is scheduled on.
    pub node: String,
    /// The pod's addresses; empty while the pod is pending (as at CNI ADD).
    #[serde(default)]
    pub ips: Vec<IpAddr>,
    /// Labels (used by policy selectors).
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Annotations; `nodemesh.io/inject: disabled` opts the pod out of the mesh.
    #[serde(default)]
    pub annotations: BTreeMap<String, String>,
}

/// The annotation that opts a pod out of the mesh when set to `disabled`.
pub const INJECT_ANNOTATION: &str = "nodemesh.io/inject";

impl Pod {
    /// Whether the pod opted out of the mesh.
    pub fn injection_disabled(&self) -> bool {
        self.annotations.get(INJECT_ANNOTATION).map(String::as_str) == Some("disabled")
    }
}

fn default_sa() -> String {
    "default".to_owned()
}

/// A model that cannot be used, naming the entry and the problem.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ModelError {
    /// Two nodes share a name.
    #[error("nodes[{index}]: node name {name:?} appears twice; node names must be unique")]
    DuplicateNode {
        /// Position in `nodes`.
        index: usize,
        /// The name.
        name: String,
    },
    /// A node name is not a DNS subdomain.
    #[error("nodes[{index}].name: {name:?} is not a valid node name (lowercase DNS subdomain)")]
    BadNodeName {
        /// Position in `nodes`.
        index: usize,
        /// The name.
        name: String,
    },
    /// A pod names a node that is not in `nodes`.
    #[error("pods[{index}] ({namespace}/{name}): node {node:?} is not listed under nodes")]
    UnknownNode {
        /// Position in `pods`.
        index: usize,
        /// Pod namespace.
        namespace: String,
        /// Pod name.
        name: String,
        /// The node it names.
        node: String,
    },
    /// Two pods claim the same IP.
    #[error("pods[{index}] ({namespace}/{name}): IP {ip} already belongs to another pod")]
    DuplicatePodIp {
        /// Position in `pods`.
        index: usize,
        /// Pod namespace.
        namespace: String,
        /// Pod name.
        name: String,
        /// The IP.
        ip: IpAddr,
    },
    /// A namespace entry's name is not a DNS label.
    #[error(
        "namespaces[{index}].name: {name:?} is not a valid namespace name (lowercase DNS label)"
    )]
    BadNamespaceName {
        /// Position in `namespaces`.
        index: usize,
        /// The name.
        name: String,
    },
    /// A namespace is listed twice.
    #[error("namespaces[{index}]: namespace {name:?} appears twice; list each namespace once")]
    DuplicateNamespace {
        /// Position in `namespaces`.
        index: usize,
        /// The name.
        name: String,
    },
    /// Two policies share namespace and name.
    #[error("policies[{index}]: policy {namespace}/{name} appears twice; policy names must be unique in a namespace")]
    DuplicatePolicy {
        /// Position in `policies`.
        index: usize,
        /// Namespace.
        namespace: String,
        /// Name.
        name: String,
    },
    /// A policy field holds a value that cannot be used.
    #[error("policies[{index}] ({policy}): {field}: {value:?} {problem}")]
    BadPolicyField {
        /// Position in `policies`.
        index: usize,
        /// `<namespace>/<name>` of the policy.
        policy: String,
        /// Path of the field inside the policy, e.g. `rules[0].from[1].ipBlocks[0]`.
        field: String,
        /// The offending value.
        value: String,
        /// What is wrong and how to fix it.
        problem: String,
    },
    /// A service entry is inconsistent.
    #[error(transparent)]
    Service(#[from] ServiceError),
}

impl ClusterModel {
    /// Checks cross-references; the first problem found is returned.
    pub fn validate(&self) -> Result<(), ModelError> {
        let mut names = HashSet::new();
        for (index, n) in self.nodes.iter().enumerate() {
            if !is_dns_subdomain(&n.name) {
                return Err(ModelError::BadNodeName {
                    index,
                    name: n.name.clone(),
                });
            }
            if !names.insert(n.name.as_str()) {
                return Err(ModelError::DuplicateNode {
                    index,
                    name: n.name.clone(),
                });
            }
        }
        let mut ips = HashSet::new();
        for (index, p) in self.pods.iter().enumerate() {
            if !names.contains(p.node.as_str()) {
                return Err(ModelError::UnknownNode {
                    index,
                    namespace: p.namespace.clone(),
                    name: p.name.clone(),
                    node: p.node.clone(),
                });
            }
            for ip in &p.ips {
                if !ips.insert(*ip) {
                    return Err(ModelError::DuplicatePodIp {
                        index,
                        namespace: p.namespace.clone(),
                        name: p.name.clone(),
                        ip: *ip,
                    });
                }
            }
        }
        self.validate_namespaces()?;
        self.validate_policies()
    }

    fn validate_namespaces(&self) -> Result<(), ModelError> {
        let mut seen = HashSet::new();
        for (index, ns) in self.namespaces.iter().enumerate() {
            if !is_dns_label(&ns.name) {
                return Err(ModelError::BadNamespaceName {
                    index,
                    name: ns.name.clone(),
                });
            }
            if !seen.insert(ns.name.as_str()) {
                return Err(ModelError::DuplicateNamespace {
                    index,
                    name: ns.name.clone(),
                });
            }
        }
        self.validate_services()?;
        Ok(())
    }

    fn validate_policies(&self) -> Result<(), ModelError> {
        let mut seen = HashSet::new();
        for (index, p) in self.policies.iter().enumerate() {
            let policy = format!("{}/{}", p.namespace, p.name);
            let bad = |field: String, value: &str, problem: &str| ModelError::BadPolicyField {
                index,
                policy: policy.clone(),
                field,
                value: value.to_owned(),
                problem: problem.to_owned(),
            };
            if !is_dns_subdomain(&p.name) {
                return Err(bad(
                    "name".into(),
                    &p.name,
                    "is not a valid policy name; use a lowercase DNS subdomain",
                ));
            }
            if !is_dns_label(&p.namespace) {
                return Err(bad(
                    "namespace".into(),
                    &p.namespace,
                    "is not a valid namespace name; use a lowercase DNS label",
                ));
            }
            if !seen.insert((p.namespace.as_str(), p.name.as_str())) {
                return Err(ModelError::DuplicatePolicy {
                    index,
                    namespace: p.namespace.clone(),
                    name: p.name.clone(),
                });
            }
            for (r, rule) in p.rules.iter().enumerate() {
                for (f, from) in rule.from.iter().enumerate() {
                    let at = |field: &str, i: usize| format!("rules[{r}].from[{f}].{field}[{i}]");
                    if from.principals.is_empty()
                        && from.namespaces.is_empty()
                        && from.service_accounts.is_empty()
                        && from.ip_blocks.is_empty()
                    {
                        return Err(bad(
                            format!("rules[{r}].from[{f}]"),
                            "{}",
                            "sets no field; set principals, namespaces, serviceAccounts or ipBlocks, or remove the entry (an absent `from` matches every source)",
                        ));
                    }
                    for (i, v) in from.principals.iter().enumerate() {
                        if let Err(problem) = check_principal(v) {
                            return Err(bad(at("principals", i), v, problem));
                        }
                    }
                    for (i, v) in from.namespaces.iter().enumerate() {
                        if !is_dns_label(v) {
                            return Err(bad(
                                at("namespaces", i),
                                v,
                                "is not a namespace name (lowercase DNS label)",
                            ));
                        }
                    }
                    for (i, v) in from.service_accounts.iter().enumerate() {
                        let ok = v
                            .split_once('/')
                            .is_some_and(|(ns, sa)| is_dns_label(ns) && is_dns_subdomain(sa));
                        if !ok {
                            return Err(bad(
                                at("serviceAccounts", i),
                                v,
                                "is not <namespace>/<service-account>, e.g. shop/web",
                            ));
                        }
                    }
                    for (i, v) in from.ip_blocks.iter().enumerate() {
                        if let Err(problem) = check_ip_block(v) {
                            return Err(bad(at("ipBlocks", i), v, &problem));
                        }
                    }
                }
                for (t, to) in rule.to.iter().enumerate() {
                    if to.ports.is_empty() {
                        return Err(bad(
                            format!("rules[{r}].to[{t}].ports"),
                            "[]",
                            "is empty; list at least one port, or remove the entry (an absent `to` matches every port)",
                        ));
                    }
                    for (i, port) in to.ports.iter().enumerate() {
                        if *port == 0 {
                            return Err(bad(
                                format!("rules[{r}].to[{t}].ports[{i}]"),
                                "0",
                                "is not a port; use 1..=65535",
                            ));
                        }
                    }
                }
            }
        }
        Ok(())
    }

    /// The mode of namespace `name` (`permissive` unless listed otherwise).
    pub fn mode_of(&self, name: &str) -> Mode {
        self.namespaces
            .iter()
            .find(|n| n.name == name)
            .map_or(Mode::Permissive, |n| n.mode)
    }
}

/// A Kubernetes namespace name: a DNS label (RFC 1123), at most 63 characters.
pub fn is_dns_label(s: &str) -> bool {
    !s.contains('.') && s.len() <= 63 && is_dns_subdomain(s)
}

/// Checks a principal: `spiffe://<td>/ns/<ns>/sa/<sa>`, or a prefix of one
/// ending in a single `*`.
fn check_principal(v: &str) -> Result<(), &'static str> {
    const FIX: &str = "is not a principal; write spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>, or a prefix of one ending in `*` (e.g. spiffe://cluster.local/ns/shop/*)";
    let Some(rest) = v.strip_prefix("spiffe://") else {
        return Err(FIX);
    };
    if let Some(prefix) = rest.strip_suffix('*') {
        if prefix.contains('*') {
            return Err("has a `*` that is not the last character; only a trailing `*` (prefix match) is supported");
        }
        return Ok(());
    }
    let ok = rest.split_once("/ns/").is_some_and(|(td, tail)| {
        is_dns_subdomain(td)
            && tail
                .split_once("/sa/")
                .is_some_and(|(ns, sa)| is_dns_label(ns) && is_dns_subdomain(sa))
    });
    if ok {
        Ok(())
    } else {
        Err(FIX)
    }
}

/// Checks an `ipBlocks` entry: a CIDR whose host bits are zero.
fn check_ip_block(v: &str) -> Result<(), String> {
    let net: IpNet = v.parse().map_err(|_| {
        "is not a CIDR; write e.g. 10.0.0.0/8, fd00::/8, or 10.1.2.3/32 for one address".to_owned()
    })?;
    if net.trunc() != net {
        return Err(format!(
            "has host bits set; write {} (or /{} for a single address)",
            net.trunc(),
            net.max_prefix_len()
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXAMPLE: &str = r#"
nodes:
  - name: n1
    address: 10.77.0.1
    pod_cidrs: [10.78.1.0/24]
  - name: n2
    address: 10.77.0.2
pods:
  - namespace: default
    name: client
    node: n1
    ips: [10.78.1.2]
    labels: {app: client}
  - namespace: shop
    name: web
    service_account: web
    node: n2
    ips: [10.78.2.2]
"#;

    #[test]
    fn example_parses_and_validates() {
        let m: ClusterModel = serde_yaml::from_str(EXAMPLE).expect("parse");
        m.validate().expect("valid");
        assert_eq!(m.pods[0].service_account, "default");
        assert_eq!(m.nodes[0].pod_cidrs[0].to_string(), "10.78.1.0/24");
    }

    #[test]
    fn bad_references_are_named() {
        let mut m: ClusterModel = serde_yaml::from_str(EXAMPLE).expect("parse");
        m.pods[1].node = "n9".into();
        assert!(m
            .validate()
            .expect_err("unknown node")
            .to_string()
            .contains("pods[1] (shop/web)"));
        let mut m: ClusterModel = serde_yaml::from_str(EXAMPLE).expect("parse");
        m.pods[1].ips = m.pods[0].ips.clone();
        assert!(matches!(
            m.validate(),
            Err(ModelError::DuplicatePodIp { index: 1, .. })
        ));
        let mut m: ClusterModel = serde_yaml::from_str(EXAMPLE).expect("parse");
        m.nodes[1].name = "n1".into();
        assert!(matches!(
            m.validate(),
            Err(ModelError::DuplicateNode { index: 1, .. })
        ));
    }

    const POLICIES: &str = r#"
nodes: [{name: n1, address: 10.77.0.1}]
namespaces:
  - {name: shop, mode: strict}
  - {name: default}
policies:
  - name: deny-batch
    namespace: shop
    selector: {matchLabels: {app: web}}
    action: DENY
    rules:
      - from: [{namespaces: [batch]}]
  - name: allow-frontend
    namespace: shop
    action: ALLOW
    rules:
      - from:
          - principals: ["spiffe://cluster.local/ns/front/sa/web", "spiffe://cluster.local/ns/ops/*"]
          - serviceAccounts: [front/web]
            ipBlocks: [10.78.0.0/16, "fd00::/8"]
        to: [{ports: [8080, 443]}]
"#;

    #[test]
    fn namespaces_and_policies_parse_in_the_crd_shape() {
        let m: ClusterModel = serde_yaml::from_str(POLICIES).expect("parse");
        m.validate().expect("valid");
        assert_eq!(m.mode_of("shop"), Mode::Strict);
        assert_eq!(m.mode_of("default"), Mode::Permissive);
        assert_eq!(m.mode_of("unlisted"), Mode::Permissive);
        assert_eq!(m.policies[0].action, Action::Deny);
        assert_eq!(m.policies[1].selector, Selector::default());
        assert_eq!(m.policies[1].rules[0].from[1].ip_blocks[1], "fd00::/8");
        // Round trip (the lab writes models with serde).
        let again: ClusterModel =
            serde_yaml::from_str(&serde_yaml::to_string(&m).expect("yaml")).expect("parse");
        assert_eq!(again, m);
    }

    #[test]
    fn bad_policies_name_policy_field_value_and_fix() {
        let cases: [(&str, &str, &str); 8] = [
            ("[10.78.0.0/16, \"fd00::/8\"]", "[10.78.0.1/16]", "rules[0].from[1].ipBlocks[0]: \"10.78.0.1/16\" has host bits set; write 10.78.0.0/16"),
            ("[10.78.0.0/16, \"fd00::/8\"]", "[nope]", "ipBlocks[0]: \"nope\" is not a CIDR"),
            ("[8080, 443]", "[0]", "rules[0].to[0].ports[0]: \"0\" is not a port"),
            ("[front/web]", "[web]", "serviceAccounts[0]: \"web\" is not <namespace>/<service-account>"),
            ("\"spiffe://cluster.local/ns/ops/*\"", "\"spiffe://*/ns/ops/*\"", "principals[1]: \"spiffe://*/ns/ops/*\" has a `*`"),
            ("\"spiffe://cluster.local/ns/ops/*\"", "\"ops\"", "principals[1]: \"ops\" is not a principal"),
            ("[{namespaces: [batch]}]", "[{}]", "rules[0].from[0]: \"{}\" sets no field"),
            ("name: deny-batch", "name: Deny_Batch", "policies[0] (shop/Deny_Batch): name"),
        ];
        for (from, to, want) in cases {
            assert!(POLICIES.contains(from), "{from}");
            let text = POLICIES.replacen(from, to, 1);
            let m: ClusterModel = serde_yaml::from_str(&text).expect(to);
            let msg = m.validate().expect_err(to).to_string();
            assert!(msg.contains(want), "{to}: {msg}");
            assert!(msg.contains("policies["), "{msg}");
        }
        let dup = POLICIES.replacen("name: allow-frontend", "name: deny-batch", 1);
        let m: ClusterModel = serde_yaml::from_str(&dup).expect("parse");
        assert!(matches!(
            m.validate(),
            Err(ModelError::DuplicatePolicy { index: 1, .. })
        ));
        let dup_ns = POLICIES.replacen("{name: default}", "{name: shop}", 1);
        let m: ClusterModel = serde_yaml::from_str(&dup_ns).expect("parse");
        assert!(matches!(
            m.validate(),
            Err(ModelError::DuplicateNamespace { index: 1, .. })
        ));
        // Unknown fields and actions are refused by the parser.
        for bad in ["action: DENY", "mode: strict"] {
            let text = POLICIES.replacen(bad, &format!("{bad}x"), 1);
            assert!(
                serde_yaml::from_str::<ClusterModel>(&text).is_err(),
                "{bad}"
            );
        }
    }
}

// ---------------------------------------------------------------------------
// Services: the file source's shape of what Services + EndpointSlices give.
// ---------------------------------------------------------------------------

/// A Service: virtual addresses and ports, and the endpoints behind them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Service {
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
    /// Cluster IPs (one per family); empty for a headless service, which is
    /// then not balanced by nodemesh (clients connect to pod IPs directly).
    #[serde(default)]
    pub cluster_ips: Vec<IpAddr>,
    /// Ports.
    pub ports: Vec<ServicePort>,
    /// Endpoints (what the EndpointSlices of the service list).
    #[serde(default)]
    pub endpoints: Vec<Endpoint>,
    /// Weighted split of new connections between groups of endpoints (a
    /// canary); absent: every ready endpoint is equal.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub split: Option<TrafficSplit>,
}

/// One port of a service.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServicePort {
    /// Port name (required by Kubernetes when a service has several ports).
    #[serde(default)]
    pub name: Option<String>,
    /// The port on the cluster IPs.
    pub port: u16,
    /// The port on the endpoints (already resolved if it was named).
    pub target_port: u16,
    /// Protocol. Only TCP is proxied. Default `TCP`.
    #[serde(default)]
    pub protocol: Protocol,
}

/// A service port's protocol.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Protocol {
    /// TCP: balanced by nodemesh.
    #[default]
    #[serde(rename = "TCP")]
    Tcp,
    /// UDP: not proxied.
    #[serde(rename = "UDP")]
    Udp,
    /// SCTP: not proxied.
    #[serde(rename = "SCTP")]
    Sctp,
}

/// One endpoint of a service.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Endpoint {
    /// Address of the endpoint (a pod IP).
    pub ip: IpAddr,
    /// Node the endpoint runs on, if known; must be listed under `nodes`.
    #[serde(default)]
    pub node: Option<String>,
    /// Whether it may receive new connections. Default true.
    #[serde(default = "default_true")]
    pub ready: bool,
    /// Name of the pod behind it (`targetRef`), if any.
    #[serde(default)]
    pub target_ref: Option<String>,
}

fn default_true() -> bool {
    true
}

/// Largest weight of a [`TrafficSplit`] group: 10 000, so weights can be
/// written as percentages (`90`/`10`) or basis points (`9900`/`100`) and the
/// sum of a split's weights stays far below any integer limit.
pub const MAX_SPLIT_WEIGHT: u32 = 10_000;

/// A weighted split of a service's new connections between groups of its
/// endpoints, the groups being the values of one pod label (the canary shape:
/// label `track`, `stable: 90`, `canary: 10`). What the balancer does with it
/// is described in `balancer`; in short, a group gets new connections in
/// proportion to its weight among the groups that have a usable endpoint.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrafficSplit {
    /// The pod label whose value names an endpoint's group, e.g. `track`.
    pub label: String,
    /// Weight of each label value, `0..=`[`MAX_SPLIT_WEIGHT`], in the order
    /// written. Written as a map (`{stable: 90, canary: 10}`); kept as a list
    /// so that a value written twice is reported rather than silently lost.
    #[serde(with = "split_weights")]
    pub weights: Vec<(String, u32)>,
}

impl TrafficSplit {
    /// Checks the split on its own: a label, at least one weight, weights in
    /// range, not all zero, each value once.
    pub fn check(&self) -> Result<(), SplitError> {
        if self.label.trim().is_empty() {
            return Err(SplitError::EmptyLabel);
        }
        if self.weights.is_empty() {
            return Err(SplitError::NoWeights {
                label: self.label.clone(),
            });
        }
        let mut seen = HashSet::new();
        for (value, weight) in &self.weights {
            if *weight > MAX_SPLIT_WEIGHT {
                return Err(SplitError::WeightTooLarge {
                    value: value.clone(),
                    weight: *weight,
                });
            }
            if !seen.insert(value.as_str()) {
                return Err(SplitError::DuplicateValue {
                    value: value.clone(),
                });
            }
        }
        if self.weights.iter().all(|(_, w)| *w == 0) {
            return Err(SplitError::AllZero);
        }
        Ok(())
    }

    /// The weight of label value `value`, if the split lists it.
    pub fn weight_of(&self, value: &str) -> Option<u32> {
        self.weights
            .iter()
            .find(|(v, _)| v == value)
            .map(|(_, w)| *w)
    }
}

/// Why a [`TrafficSplit`] cannot be used: what is wrong and how to fix it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SplitError {
    /// The label key is empty.
    #[error("label is empty; set the pod label whose values name the groups, e.g. track")]
    EmptyLabel,
    /// No weight is listed.
    #[error("weights is empty; give each value of label {label:?} a weight, e.g. {{stable: 90, canary: 10}}")]
    NoWeights {
        /// The label.
        label: String,
    },
    /// Every weight is zero: no group could get a connection.
    #[error("every weight is 0; give at least one group a weight above 0 (remove the split to balance over every endpoint)")]
    AllZero,
    /// A weight is above [`MAX_SPLIT_WEIGHT`].
    #[error("weight of {value:?} is {weight}; weights must be 0..={max}", max = MAX_SPLIT_WEIGHT)]
    WeightTooLarge {
        /// The label value.
        value: String,
        /// Its weight.
        weight: u32,
    },
    /// A label value is given two weights.
    #[error("value {value:?} is given a weight twice; list each value once")]
    DuplicateValue {
        /// The label value.
        value: String,
    },
}

/// `weights` of a split: a map in the file, a list of pairs in memory, so
/// that duplicate keys survive parsing and are refused by validation.
mod split_weights {
    use serde::de::{MapAccess, Visitor};
    use serde::ser::SerializeMap;
    use serde::{Deserializer, Serializer};

    pub fn serialize<S: Serializer>(weights: &[(String, u32)], s: S) -> Result<S::Ok, S::Error> {
        let mut map = s.serialize_map(Some(weights.len()))?;
        for (value, weight) in weights {
            map.serialize_entry(value, weight)?;
        }
        map.end()
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<(String, u32)>, D::Error> {
        struct Weights;
        impl<'de> Visitor<'de> for Weights {
            type Value = Vec<(String, u32)>;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a map of label value to weight, e.g. {stable: 90, canary: 10}")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let mut out = Vec::with_capacity(map.size_hint().unwrap_or(0).min(64));
                while let Some(entry) = map.next_entry::<String, u32>()? {
                    out.push(entry);
                }
                Ok(out)
            }
        }
        d.deserialize_map(Weights)
    }
}

/// A service entry that cannot be used, naming the entry and the problem.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ServiceError {
    /// Two services share namespace and name.
    #[error("services[{index}] ({namespace}/{name}): service appears twice")]
    DuplicateService {
        /// Position in `services`.
        index: usize,
        /// Namespace.
        namespace: String,
        /// Name.
        name: String,
    },
    /// A service has no ports.
    #[error("services[{index}] ({namespace}/{name}): ports is empty; list at least one port")]
    NoPorts {
        /// Position in `services`.
        index: usize,
        /// Namespace.
        namespace: String,
        /// Name.
        name: String,
    },
    /// A port or target port is 0.
    #[error(
        "services[{index}] ({namespace}/{name}).ports[{port_index}]: port and target_port must be 1..=65535"
    )]
    ZeroPort {
        /// Position in `services`.
        index: usize,
        /// Namespace.
        namespace: String,
        /// Name.
        name: String,
        /// Position in `ports`.
        port_index: usize,
    },
    /// Two ports of a service share a port number and protocol.
    #[error("services[{index}] ({namespace}/{name}).ports[{port_index}]: port {port}/{protocol:?} appears twice")]
    DuplicatePort {
        /// Position in `services`.
        index: usize,
        /// Namespace.
        namespace: String,
        /// Name.
        name: String,
        /// Position in `ports`.
        port_index: usize,
        /// The port.
        port: u16,
        /// Its protocol.
        protocol: Protocol,
    },
    /// Two services claim the same cluster IP.
    #[error("services[{index}] ({namespace}/{name}): cluster IP {ip} already belongs to another service")]
    DuplicateClusterIp {
        /// Position in `services`.
        index: usize,
        /// Namespace.
        namespace: String,
        /// Name.
        name: String,
        /// The IP.
        ip: IpAddr,
    },
    /// A cluster IP is also a pod's IP.
    #[error("services[{index}] ({namespace}/{name}): cluster IP {ip} is also a pod IP")]
    ClusterIpIsPodIp {
        /// Position in `services`.
        index: usize,
        /// Namespace.
        namespace: String,
        /// Name.
        name: String,
        /// The IP.
        ip: IpAddr,
    },
    /// An endpoint names a node that is not in `nodes`.
    #[error("services[{index}] ({namespace}/{name}).endpoints[{endpoint_index}]: node {node:?} is not listed under nodes")]
    UnknownEndpointNode {
        /// Position in `services`.
        index: usize,
        /// Namespace.
        namespace: String,
        /// Name.
        name: String,
        /// Position in `endpoints`.
        endpoint_index: usize,
        /// The node it names.
        node: String,
    },
    /// An endpoint IP is listed twice in one service.
    #[error(
        "services[{index}] ({namespace}/{name}).endpoints[{endpoint_index}]: IP {ip} appears twice"
    )]
    DuplicateEndpoint {
        /// Position in `services`.
        index: usize,
        /// Namespace.
        namespace: String,
        /// Name.
        name: String,
        /// Position in `endpoints`.
        endpoint_index: usize,
        /// The IP.
        ip: IpAddr,
    },
    /// The service's traffic split cannot be used.
    #[error("services[{index}] ({namespace}/{name}).split: {source}")]
    BadSplit {
        /// Position in `services`.
        index: usize,
        /// Namespace.
        namespace: String,
        /// Name.
        name: String,
        /// What is wrong with it.
        source: SplitError,
    },
}

impl ClusterModel {
    /// Checks the services: unique names, ports, cluster IPs, known nodes.
    pub fn validate_services(&self) -> Result<(), ServiceError> {
        let nodes: HashSet<&str> = self.nodes.iter().map(|n| n.name.as_str()).collect();
        let pod_ips: HashSet<IpAddr> = self
            .pods
            .iter()
            .flat_map(|p| p.ips.iter().copied())
            .collect();
        let mut names = HashSet::new();
        let mut cluster_ips = HashSet::new();
        for (index, s) in self.services.iter().enumerate() {
            let (namespace, name) = (s.namespace.clone(), s.name.clone());
            if !names.insert((s.namespace.as_str(), s.name.as_str())) {
                return Err(ServiceError::DuplicateService {
                    index,
                    namespace,
                    name,
                });
            }
            if s.ports.is_empty() {
                return Err(ServiceError::NoPorts {
                    index,
                    namespace,
                    name,
                });
            }
            let mut ports = HashSet::new();
            for (port_index, p) in s.ports.iter().enumerate() {
                if p.port == 0 || p.target_port == 0 {
                    return Err(ServiceError::ZeroPort {
                        index,
                        namespace,
                        name,
                        port_index,
                    });
                }
                if !ports.insert((p.port, p.protocol)) {
                    return Err(ServiceError::DuplicatePort {
                        index,
                        namespace,
                        name,
                        port_index,
                        port: p.port,
                        protocol: p.protocol,
                    });
                }
            }
            for ip in &s.cluster_ips {
                if pod_ips.contains(ip) {
                    return Err(ServiceError::ClusterIpIsPodIp {
                        index,
                        namespace,
                        name,
                        ip: *ip,
                    });
                }
                if !cluster_ips.insert(*ip) {
                    return Err(ServiceError::DuplicateClusterIp {
                        index,
                        namespace,
                        name,
                        ip: *ip,
                    });
                }
            }
            let mut endpoint_ips = HashSet::new();
            for (endpoint_index, e) in s.endpoints.iter().enumerate() {
                if let Some(node) = &e.node {
                    if !nodes.contains(node.as_str()) {
                        return Err(ServiceError::UnknownEndpointNode {
                            index,
                            namespace,
                            name,
                            endpoint_index,
                            node: node.clone(),
                        });
                    }
                }
                if !endpoint_ips.insert(e.ip) {
                    return Err(ServiceError::DuplicateEndpoint {
                        index,
                        namespace,
                        name,
                        endpoint_index,
                        ip: e.ip,
                    });
                }
            }
            if let Some(Err(source)) = s.split.as_ref().map(TrafficSplit::check) {
                return Err(ServiceError::BadSplit {
                    index,
                    namespace,
                    name,
                    source,
                });
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod service_tests {
    use super::*;

    const EXAMPLE: &str = r#"
nodes:
  - {name: n1, address: 10.77.0.1}
  - {name: n2, address: 10.77.0.2}
pods:
  - {namespace: shop, name: web-1, node: n1, ips: [10.78.1.2]}
services:
  - namespace: shop
    name: web
    cluster_ips: [10.96.0.10]
    ports: [{name: http, port: 80, target_port: 8080}]
    endpoints:
      - {ip: 10.78.1.2, node: n1, target_ref: web-1}
      - {ip: 10.78.2.2, node: n2, ready: false}
"#;

    fn example() -> ClusterModel {
        serde_yaml::from_str(EXAMPLE).expect("parse")
    }

    #[test]
    fn example_parses_with_defaults() {
        let m = example();
        m.validate().expect("valid");
        let s = &m.services[0];
        assert_eq!(s.ports[0].protocol, Protocol::Tcp);
        assert!(s.endpoints[0].ready);
        assert!(!s.endpoints[1].ready);
        assert_eq!(s.endpoints[0].target_ref.as_deref(), Some("web-1"));
    }

    #[test]
    fn errors_name_the_entry() {
        let mut m = example();
        m.services.push(m.services[0].clone());
        let e = m.validate().expect_err("dup");
        assert!(matches!(
            e,
            ModelError::Service(ServiceError::DuplicateService { index: 1, .. })
        ));
        assert!(e.to_string().contains("services[1] (shop/web)"), "{e}");

        let mut m = example();
        m.services[0].endpoints[1].node = Some("n9".into());
        let e = m.validate().expect_err("node");
        assert!(
            e.to_string().contains("endpoints[1]") && e.to_string().contains("\"n9\""),
            "{e}"
        );

        let mut m = example();
        m.services[0].ports[0].target_port = 0;
        assert!(matches!(
            m.validate(),
            Err(ModelError::Service(ServiceError::ZeroPort {
                port_index: 0,
                ..
            }))
        ));

        let mut m = example();
        let mut other = m.services[0].clone();
        other.name = "other".into();
        m.services.push(other);
        assert!(matches!(
            m.validate(),
            Err(ModelError::Service(ServiceError::DuplicateClusterIp {
                index: 1,
                ..
            }))
        ));

        let mut m = example();
        m.services[0].cluster_ips = vec!["10.78.1.2".parse().expect("ip")];
        assert!(matches!(
            m.validate(),
            Err(ModelError::Service(ServiceError::ClusterIpIsPodIp { .. }))
        ));

        let mut m = example();
        m.services[0].endpoints[1].ip = m.services[0].endpoints[0].ip;
        assert!(matches!(
            m.validate(),
            Err(ModelError::Service(ServiceError::DuplicateEndpoint {
                endpoint_index: 1,
                ..
            }))
        ));

        let mut m = example();
        let p = m.services[0].ports[0].clone();
        m.services[0].ports.push(p);
        assert!(matches!(
            m.validate(),
            Err(ModelError::Service(ServiceError::DuplicatePort {
                port: 80,
                ..
            }))
        ));

        let mut m = example();
        m.services[0].ports.clear();
        assert!(matches!(
            m.validate(),
            Err(ModelError::Service(ServiceError::NoPorts { .. }))
        ));
    }

    const SPLIT: &str = "    split: {label: track, weights: {stable: 90, canary: 10}}\n";

    fn with_split(split: &str) -> String {
        let at = EXAMPLE.find("    endpoints:").expect("endpoints");
        let mut text = EXAMPLE.to_owned();
        text.insert_str(at, split);
        text
    }

    #[test]
    fn a_split_parses_in_order_and_round_trips() {
        let m: ClusterModel = serde_yaml::from_str(&with_split(SPLIT)).expect("parse");
        m.validate().expect("valid");
        let split = m.services[0].split.as_ref().expect("split");
        assert_eq!(split.label, "track");
        assert_eq!(
            split.weights,
            [("stable".to_owned(), 90), ("canary".to_owned(), 10)]
        );
        assert_eq!(split.weight_of("canary"), Some(10));
        assert_eq!(split.weight_of("beta"), None);
        let again: ClusterModel =
            serde_yaml::from_str(&serde_yaml::to_string(&m).expect("yaml")).expect("parse");
        assert_eq!(again, m);
        // The same in JSON (a file may be JSON, which is YAML).
        let json = serde_json::to_string(&m).expect("json");
        assert!(
            json.contains(r#""weights":{"stable":90,"canary":10}"#),
            "{json}"
        );
        assert_eq!(
            serde_json::from_str::<ClusterModel>(&json).expect("json"),
            m
        );
        // No split: not written.
        assert!(!serde_yaml::to_string(&example())
            .expect("yaml")
            .contains("split"));
    }

    #[test]
    fn bad_splits_name_the_service_the_problem_and_the_fix() {
        let cases: [(&str, SplitError, &str); 5] = [
            (
                "    split: {label: '', weights: {stable: 1}}\n",
                SplitError::EmptyLabel,
                "services[0] (shop/web).split: label is empty; set the pod label",
            ),
            (
                "    split: {label: track, weights: {}}\n",
                SplitError::NoWeights {
                    label: "track".into(),
                },
                "services[0] (shop/web).split: weights is empty; give each value of label \"track\" a weight",
            ),
            (
                "    split: {label: track, weights: {stable: 0, canary: 0}}\n",
                SplitError::AllZero,
                "services[0] (shop/web).split: every weight is 0; give at least one group a weight above 0",
            ),
            (
                "    split: {label: track, weights: {stable: 10001}}\n",
                SplitError::WeightTooLarge {
                    value: "stable".into(),
                    weight: 10_001,
                },
                "services[0] (shop/web).split: weight of \"stable\" is 10001; weights must be 0..=10000",
            ),
            (
                "    split: {label: track, weights: {stable: 90, stable: 10}}\n",
                SplitError::DuplicateValue {
                    value: "stable".into(),
                },
                "services[0] (shop/web).split: value \"stable\" is given a weight twice; list each value once",
            ),
        ];
        for (split, want, message) in cases {
            let m: ClusterModel = serde_yaml::from_str(&with_split(split)).expect(split);
            let e = m.validate().expect_err(split);
            assert!(
                matches!(&e, ModelError::Service(ServiceError::BadSplit { index: 0, source, .. }) if *source == want),
                "{split}: {e:?}"
            );
            assert!(e.to_string().contains(message), "{split}: {e}");
        }
        // The bound itself is accepted; a negative weight, an unknown field
        // or a list of weights does not parse.
        let m: ClusterModel = serde_yaml::from_str(&with_split(
            "    split: {label: track, weights: {a: 10000, b: 0}}\n",
        ))
        .expect("parse");
        m.validate().expect("10000 is allowed");
        for bad in [
            "    split: {label: track, weights: {stable: -1}}\n",
            "    split: {label: track, weights: {stable: 1}, mode: x}\n",
            "    split: {label: track, weights: [stable, canary]}\n",
            "    split: {weights: {stable: 1}}\n",
        ] {
            assert!(
                serde_yaml::from_str::<ClusterModel>(&with_split(bad)).is_err(),
                "{bad}"
            );
        }
    }
}
