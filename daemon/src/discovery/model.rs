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
