//! `AuthorizationPolicy` evaluation.
//!
//! Owns the semantics of DESIGN §6 as pure functions: a [`PolicyIndex`] is
//! compiled once from the (validated) policies of a snapshot, grouped by
//! namespace, and [`PolicyIndex::evaluate`] decides one connection without
//! allocating:
//!
//! 1. policies of the destination pod's namespace whose selector matches the
//!    pod's labels apply (an empty selector selects every pod);
//! 2. if any applying DENY policy matches the connection → deny;
//! 3. else if any applying ALLOW policy matches → allow;
//! 4. else if any ALLOW policy applies → deny (default-deny);
//! 5. else → allow.
//!
//! A policy matches when any of its rules does; a rule matches when any
//! `from` entry and any `to` entry match (absent list = any); a `from` entry
//! matches when every field it sets matches one of its values. For a
//! plaintext client (no verified identity) `principals`, `namespaces` and
//! `serviceAccounts` never match: only `ipBlocks` can.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::sync::Arc;

use ipnet::IpNet;

use crate::discovery::model::{Action, AuthorizationPolicy, Source};

/// The destination of a connection.
#[derive(Debug, Clone, Copy)]
pub struct Target<'a> {
    /// Namespace of the destination pod.
    pub namespace: &'a str,
    /// Its labels.
    pub labels: &'a BTreeMap<String, String>,
    /// Destination port on the pod.
    pub port: u16,
}

/// A verified source workload identity.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Peer<'a> {
    /// `spiffe://<td>/ns/<ns>/sa/<sa>`.
    pub principal: &'a str,
    /// Source namespace.
    pub namespace: &'a str,
    /// Source service account (name only).
    pub service_account: &'a str,
}

/// The source of a connection.
#[derive(Debug, Clone, Copy)]
pub struct Client<'a> {
    /// Verified identity; `None` for plaintext.
    pub identity: Option<Peer<'a>>,
    /// Source address (verified pod address for tunnel streams, peer address
    /// for plaintext).
    pub ip: IpAddr,
}

/// Why a connection is refused by policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DenyReason {
    /// A DENY policy matched.
    DenyMatched,
    /// ALLOW policies apply to the workload and none matched.
    NoAllowMatched,
}

impl DenyReason {
    /// Log value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::DenyMatched => "deny_policy_matched",
            Self::NoAllowMatched => "no_allow_policy_matched",
        }
    }
}

/// The outcome of evaluation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Let it through.
    Allow,
    /// Refuse it.
    Deny {
        /// Why.
        reason: DenyReason,
        /// `<namespace>/<name>` of the DENY policy that matched, or of the
        /// first ALLOW policy that applies (default-deny).
        policy: Arc<str>,
    },
}

impl Decision {
    /// Whether the connection is allowed.
    pub fn is_allow(&self) -> bool {
        matches!(self, Self::Allow)
    }
}

/// Policies compiled for evaluation, per namespace.
#[derive(Debug, Default)]
pub struct PolicyIndex {
    by_namespace: HashMap<String, NamespacePolicies>,
    count: usize,
}

#[derive(Debug, Default)]
struct NamespacePolicies {
    deny: Vec<Compiled>,
    allow: Vec<Compiled>,
}

#[derive(Debug)]
struct Compiled {
    name: Arc<str>,
    selector: Vec<(String, String)>,
    rules: Vec<CompiledRule>,
}

#[derive(Debug)]
struct CompiledRule {
    /// Empty = any source.
    from: Vec<CompiledSource>,
    /// Sorted union of the `to` entries' ports; empty = any port.
    ports: Vec<u16>,
}

#[derive(Debug, Default)]
struct CompiledSource {
    principals: Option<Principals>,
    namespaces: Option<Vec<String>>,
    /// `(namespace, name)`.
    service_accounts: Option<Vec<(String, String)>>,
    ip_blocks: Option<Vec<IpNet>>,
}

#[derive(Debug, Default)]
struct Principals {
    exact: Vec<String>,
    prefixes: Vec<String>,
}

fn set<T>(v: Vec<T>) -> Option<Vec<T>> {
    (!v.is_empty()).then_some(v)
}

impl CompiledSource {
    fn compile(s: &Source) -> Self {
        let principals = (!s.principals.is_empty()).then(|| {
            let mut p = Principals::default();
            for v in &s.principals {
                match v.strip_suffix('*') {
                    Some(prefix) => p.prefixes.push(prefix.to_owned()),
                    None => p.exact.push(v.clone()),
                }
            }
            p
        });
        let service_accounts = s
            .service_accounts
            .iter()
            .filter_map(|v| v.split_once('/'))
            .map(|(ns, sa)| (ns.to_owned(), sa.to_owned()))
            .collect();
        // Validation refuses unparseable blocks; were one to get here, an
        // entry whose only blocks are unparseable keeps `Some(empty)` and so
        // matches no address.
        let ip_blocks = (!s.ip_blocks.is_empty())
            .then(|| s.ip_blocks.iter().filter_map(|b| b.parse().ok()).collect());
        Self {
            principals,
            namespaces: set(s.namespaces.clone()),
            service_accounts: if s.service_accounts.is_empty() {
                None
            } else {
                Some(service_accounts)
            },
            ip_blocks,
        }
    }

    fn matches(&self, client: &Client<'_>) -> bool {
        if let Some(p) = &self.principals {
            let Some(id) = &client.identity else {
                return false;
            };
            let hit = p.exact.iter().any(|e| e == id.principal)
                || p.prefixes.iter().any(|pre| id.principal.starts_with(pre));
            if !hit {
                return false;
            }
        }
        if let Some(nss) = &self.namespaces {
            let Some(id) = &client.identity else {
                return false;
            };
            if !nss.iter().any(|n| n == id.namespace) {
                return false;
            }
        }
        if let Some(sas) = &self.service_accounts {
            let Some(id) = &client.identity else {
                return false;
            };
            if !sas
                .iter()
                .any(|(ns, sa)| ns == id.namespace && sa == id.service_account)
            {
                return false;
            }
        }
        if let Some(blocks) = &self.ip_blocks {
            if !blocks.iter().any(|b| b.contains(&client.ip)) {
                return false;
            }
        }
        true
    }
}

impl CompiledRule {
    fn matches(&self, client: &Client<'_>, port: u16) -> bool {
        (self.ports.is_empty() || self.ports.binary_search(&port).is_ok())
            && (self.from.is_empty() || self.from.iter().any(|f| f.matches(client)))
    }
}

impl Compiled {
    fn compile(p: &AuthorizationPolicy) -> Self {
        Self {
            name: format!("{}/{}", p.namespace, p.name).into(),
            selector: p
                .selector
                .match_labels
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            rules: p
                .rules
                .iter()
                .map(|r| {
                    let mut ports: Vec<u16> =
                        r.to.iter().flat_map(|t| t.ports.iter().copied()).collect();
                    ports.sort_unstable();
                    ports.dedup();
                    CompiledRule {
                        from: r.from.iter().map(CompiledSource::compile).collect(),
                        ports,
                    }
                })
                .collect(),
        }
    }

    fn selects(&self, labels: &BTreeMap<String, String>) -> bool {
        self.selector
            .iter()
            .all(|(k, v)| labels.get(k).is_some_and(|l| l == v))
    }

    fn matches(&self, client: &Client<'_>, port: u16) -> bool {
        self.rules.iter().any(|r| r.matches(client, port))
    }
}

impl PolicyIndex {
    /// Compiles `policies` (validated by `ClusterModel::validate`).
    pub fn build(policies: &[AuthorizationPolicy]) -> Self {
        let mut by_namespace: HashMap<String, NamespacePolicies> = HashMap::new();
        for p in policies {
            let ns = by_namespace.entry(p.namespace.clone()).or_default();
            let compiled = Compiled::compile(p);
            match p.action {
                Action::Deny => ns.deny.push(compiled),
                Action::Allow => ns.allow.push(compiled),
            }
        }
        Self {
            by_namespace,
            count: policies.len(),
        }
    }

    /// Number of policies.
    pub fn len(&self) -> usize {
        self.count
    }

    /// Whether there is no policy at all.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Decides one connection (see the module doc for the order).
    pub fn evaluate(&self, target: &Target<'_>, client: &Client<'_>) -> Decision {
        let Some(ns) = self.by_namespace.get(target.namespace) else {
            return Decision::Allow;
        };
        for p in &ns.deny {
            if p.selects(target.labels) && p.matches(client, target.port) {
                return Decision::Deny {
                    reason: DenyReason::DenyMatched,
                    policy: p.name.clone(),
                };
            }
        }
        let mut applying: Option<&Arc<str>> = None;
        for p in &ns.allow {
            if p.selects(target.labels) {
                if p.matches(client, target.port) {
                    return Decision::Allow;
                }
                applying.get_or_insert(&p.name);
            }
        }
        match applying {
            Some(name) => Decision::Deny {
                reason: DenyReason::NoAllowMatched,
                policy: name.clone(),
            },
            None => Decision::Allow,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::discovery::model::{Destination, Rule, Selector};
    use proptest::prelude::*;

    /// The specification, written as directly as possible over the model
    /// types: the oracle the compiled index must agree with.
    fn reference(policies: &[AuthorizationPolicy], t: &Target<'_>, c: &Client<'_>) -> Decision {
        let selects = |p: &AuthorizationPolicy| {
            p.namespace == t.namespace
                && p.selector
                    .match_labels
                    .iter()
                    .all(|(k, v)| t.labels.get(k) == Some(v))
        };
        let source_matches = |s: &Source| {
            let id = c.identity.as_ref();
            (s.principals.is_empty()
                || id.is_some_and(|id| {
                    s.principals.iter().any(|p| match p.strip_suffix('*') {
                        Some(pre) => id.principal.starts_with(pre),
                        None => p == id.principal,
                    })
                }))
                && (s.namespaces.is_empty()
                    || id.is_some_and(|id| s.namespaces.iter().any(|n| n == id.namespace)))
                && (s.service_accounts.is_empty()
                    || id.is_some_and(|id| {
                        s.service_accounts
                            .iter()
                            .any(|sa| *sa == format!("{}/{}", id.namespace, id.service_account))
                    }))
                && (s.ip_blocks.is_empty()
                    || s.ip_blocks.iter().any(|b| {
                        b.parse::<IpNet>()
                            .map(|n| n.contains(&c.ip))
                            .unwrap_or(false)
                    }))
        };
        let matches = |p: &AuthorizationPolicy| {
            p.rules.iter().any(|r| {
                (r.from.is_empty() || r.from.iter().any(source_matches))
                    && (r.to.is_empty() || r.to.iter().any(|d| d.ports.contains(&t.port)))
            })
        };
        let name =
            |p: &AuthorizationPolicy| -> Arc<str> { format!("{}/{}", p.namespace, p.name).into() };
        if let Some(p) = policies
            .iter()
            .find(|p| p.action == Action::Deny && selects(p) && matches(p))
        {
            return Decision::Deny {
                reason: DenyReason::DenyMatched,
                policy: name(p),
            };
        }
        let allows: Vec<_> = policies
            .iter()
            .filter(|p| p.action == Action::Allow && selects(p))
            .collect();
        if allows.is_empty() || allows.iter().any(|p| matches(p)) {
            Decision::Allow
        } else {
            Decision::Deny {
                reason: DenyReason::NoAllowMatched,
                policy: name(allows[0]),
            }
        }
    }

    // Small alphabets so that generated policies and requests collide often.
    const NAMESPACES: [&str; 3] = ["a", "b", "c"];
    const SAS: [&str; 2] = ["web", "db"];
    const PORTS: [u16; 3] = [80, 443, 8080];

    fn principal(ns: &str, sa: &str) -> String {
        format!("spiffe://cluster.local/ns/{ns}/sa/{sa}")
    }

    fn arb_labels() -> impl Strategy<Value = BTreeMap<String, String>> {
        proptest::collection::btree_map(
            prop::sample::select(vec!["app".to_owned(), "tier".to_owned()]),
            prop::sample::select(vec!["x".to_owned(), "y".to_owned()]),
            0..=2,
        )
    }

    fn arb_ip() -> impl Strategy<Value = IpAddr> {
        (0u8..4, 0u8..4).prop_map(|(a, b)| IpAddr::from([10, 0, a, b]))
    }

    fn arb_block() -> impl Strategy<Value = String> {
        (arb_ip(), prop::sample::select(vec![16u8, 24, 30, 32])).prop_map(|(ip, len)| {
            IpNet::new(ip, len)
                .map(|n| n.trunc().to_string())
                .unwrap_or_default()
        })
    }

    fn arb_source() -> impl Strategy<Value = Source> {
        let ns = prop::sample::select(NAMESPACES.to_vec()).prop_map(str::to_owned);
        let sa = prop::sample::select(SAS.to_vec()).prop_map(str::to_owned);
        let princ = prop_oneof![
            (ns.clone(), sa.clone()).prop_map(|(n, s)| principal(&n, &s)),
            ns.clone()
                .prop_map(|n| format!("spiffe://cluster.local/ns/{n}/*")),
        ];
        (
            proptest::collection::vec(princ, 0..=2),
            proptest::collection::vec(ns.clone(), 0..=2),
            proptest::collection::vec((ns, sa).prop_map(|(n, s)| format!("{n}/{s}")), 0..=2),
            proptest::collection::vec(arb_block(), 0..=2),
        )
            .prop_map(
                |(principals, namespaces, service_accounts, ip_blocks)| Source {
                    principals,
                    namespaces,
                    service_accounts,
                    ip_blocks,
                },
            )
            .prop_filter("an entry sets a field", |s| {
                !(s.principals.is_empty()
                    && s.namespaces.is_empty()
                    && s.service_accounts.is_empty()
                    && s.ip_blocks.is_empty())
            })
    }

    fn arb_rule() -> impl Strategy<Value = Rule> {
        (
            proptest::collection::vec(arb_source(), 0..=2),
            proptest::collection::vec(
                proptest::collection::vec(prop::sample::select(PORTS.to_vec()), 1..=2)
                    .prop_map(|ports| Destination { ports }),
                0..=2,
            ),
        )
            .prop_map(|(from, to)| Rule { from, to })
    }

    fn arb_policy() -> impl Strategy<Value = AuthorizationPolicy> {
        (
            prop::sample::select(NAMESPACES.to_vec()),
            arb_labels(),
            prop_oneof![Just(Action::Allow), Just(Action::Deny)],
            proptest::collection::vec(arb_rule(), 0..=2),
        )
            .prop_map(|(ns, match_labels, action, rules)| AuthorizationPolicy {
                name: "p".into(),
                namespace: ns.to_owned(),
                selector: Selector { match_labels },
                action,
                rules,
            })
    }

    fn arb_policies() -> impl Strategy<Value = Vec<AuthorizationPolicy>> {
        proptest::collection::vec(arb_policy(), 0..=5).prop_map(|mut ps| {
            for (i, p) in ps.iter_mut().enumerate() {
                p.name = format!("p{i}");
            }
            ps
        })
    }

    #[derive(Debug, Clone)]
    struct Request {
        namespace: &'static str,
        labels: BTreeMap<String, String>,
        port: u16,
        identity: Option<(String, &'static str, &'static str)>,
        ip: IpAddr,
    }

    impl Request {
        fn target(&self) -> Target<'_> {
            Target {
                namespace: self.namespace,
                labels: &self.labels,
                port: self.port,
            }
        }
        fn client(&self) -> Client<'_> {
            Client {
                identity: self.identity.as_ref().map(|(p, ns, sa)| Peer {
                    principal: p,
                    namespace: ns,
                    service_account: sa,
                }),
                ip: self.ip,
            }
        }
    }

    fn arb_request() -> impl Strategy<Value = Request> {
        (
            prop::sample::select(NAMESPACES.to_vec()),
            arb_labels(),
            prop::sample::select(PORTS.to_vec()),
            proptest::option::of((
                prop::sample::select(NAMESPACES.to_vec()),
                prop::sample::select(SAS.to_vec()),
            )),
            arb_ip(),
        )
            .prop_map(|(namespace, labels, port, id, ip)| Request {
                namespace,
                labels,
                port,
                identity: id.map(|(ns, sa)| (principal(ns, sa), ns, sa)),
                ip,
            })
    }

    fn deny_all(ns: &str) -> AuthorizationPolicy {
        AuthorizationPolicy {
            name: "zz-deny-all".into(),
            namespace: ns.into(),
            selector: Selector::default(),
            action: Action::Deny,
            rules: vec![Rule::default()],
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        #[test]
        fn index_agrees_with_the_specification(ps in arb_policies(), r in arb_request()) {
            let index = PolicyIndex::build(&ps);
            prop_assert_eq!(index.evaluate(&r.target(), &r.client()), reference(&ps, &r.target(), &r.client()));
        }

        #[test]
        fn no_policy_allows(r in arb_request()) {
            prop_assert!(PolicyIndex::build(&[]).evaluate(&r.target(), &r.client()).is_allow());
        }

        #[test]
        fn deny_wins_over_any_allow(mut ps in arb_policies(), r in arb_request()) {
            // Whatever ALLOWs exist, a matching DENY decides.
            ps.push(deny_all(r.namespace));
            let d = PolicyIndex::build(&ps).evaluate(&r.target(), &r.client());
            prop_assert!(
                matches!(d, Decision::Deny { reason: DenyReason::DenyMatched, .. }),
                "{:?}", d
            );
        }

        #[test]
        fn any_applying_allow_makes_default_deny(ps in arb_policies(), r in arb_request()) {
            // Only ALLOW policies, all selecting the target.
            let ps: Vec<_> = ps.into_iter().map(|mut p| {
                p.action = Action::Allow;
                p.namespace = r.namespace.to_owned();
                p.selector = Selector::default();
                p
            }).collect();
            let index = PolicyIndex::build(&ps);
            let d = index.evaluate(&r.target(), &r.client());
            let any_matches = ps.iter().any(|p| {
                PolicyIndex::build(std::slice::from_ref(p)).evaluate(&r.target(), &r.client()).is_allow()
            });
            if ps.is_empty() || any_matches {
                prop_assert!(d.is_allow());
            } else {
                prop_assert!(matches!(d, Decision::Deny { reason: DenyReason::NoAllowMatched, .. }), "{:?}", d);
            }
        }

        #[test]
        fn policies_elsewhere_or_unselecting_have_no_effect(mut p in arb_policy(), r in arb_request()) {
            // Another namespace.
            p.namespace = "elsewhere".into();
            prop_assert!(PolicyIndex::build(std::slice::from_ref(&p)).evaluate(&r.target(), &r.client()).is_allow());
            // Same namespace, a label the target does not carry.
            p.namespace = r.namespace.to_owned();
            p.selector.match_labels.insert("absent".into(), "v".into());
            prop_assert!(PolicyIndex::build(std::slice::from_ref(&p)).evaluate(&r.target(), &r.client()).is_allow());
        }

        #[test]
        fn selector_is_a_subset_match(labels in arb_labels(), extra in arb_labels(), r in arb_request()) {
            // A selector that is a subset of the pod's labels selects it.
            let mut pod_labels = extra.clone();
            pod_labels.extend(labels.clone());
            let mut p = deny_all(r.namespace);
            p.selector.match_labels = labels;
            let t = Target { namespace: r.namespace, labels: &pod_labels, port: r.port };
            prop_assert!(!PolicyIndex::build(&[p]).evaluate(&t, &r.client()).is_allow());
        }

        #[test]
        fn ip_blocks_and_ports_match_exactly(block in arb_block(), r in arb_request(), port in prop::sample::select(PORTS.to_vec())) {
            let mut p = deny_all(r.namespace);
            p.rules = vec![Rule {
                from: vec![Source { ip_blocks: vec![block.clone()], ..Source::default() }],
                to: vec![Destination { ports: vec![port] }],
            }];
            let net: IpNet = block.parse().expect("block");
            let denied = !PolicyIndex::build(&[p]).evaluate(&r.target(), &r.client()).is_allow();
            prop_assert_eq!(denied, net.contains(&r.ip) && r.port == port);
        }
    }

    #[test]
    fn plaintext_matches_only_ip_blocks() {
        let labels = BTreeMap::new();
        let t = Target {
            namespace: "a",
            labels: &labels,
            port: 80,
        };
        let plain = Client {
            identity: None,
            ip: "10.0.0.1".parse().expect("ip"),
        };
        let allow = |s: Source| AuthorizationPolicy {
            name: "allow".into(),
            namespace: "a".into(),
            selector: Selector::default(),
            action: Action::Allow,
            rules: vec![Rule {
                from: vec![s],
                to: vec![],
            }],
        };
        for s in [
            Source {
                namespaces: vec!["a".into()],
                ..Source::default()
            },
            Source {
                principals: vec!["spiffe://*".into()],
                ..Source::default()
            },
            Source {
                service_accounts: vec!["a/default".into()],
                ..Source::default()
            },
        ] {
            assert_eq!(
                PolicyIndex::build(&[allow(s)]).evaluate(&t, &plain),
                Decision::Deny {
                    reason: DenyReason::NoAllowMatched,
                    policy: "a/allow".into()
                }
            );
        }
        let by_ip = allow(Source {
            ip_blocks: vec!["10.0.0.0/24".into()],
            ..Source::default()
        });
        assert!(PolicyIndex::build(&[by_ip]).evaluate(&t, &plain).is_allow());
    }

    #[test]
    fn allow_without_rules_denies_everything_it_selects() {
        let labels = BTreeMap::from([("app".to_owned(), "web".to_owned())]);
        let p = AuthorizationPolicy {
            name: "lockdown".into(),
            namespace: "a".into(),
            selector: Selector {
                match_labels: labels.clone(),
            },
            action: Action::Allow,
            rules: vec![],
        };
        let index = PolicyIndex::build(&[p]);
        let client = Client {
            identity: Some(Peer {
                principal: "spiffe://cluster.local/ns/a/sa/x",
                namespace: "a",
                service_account: "x",
            }),
            ip: "10.0.0.1".parse().expect("ip"),
        };
        let t = Target {
            namespace: "a",
            labels: &labels,
            port: 80,
        };
        assert!(!index.evaluate(&t, &client).is_allow());
        let other = BTreeMap::new();
        let t = Target {
            labels: &other,
            ..t
        };
        assert!(index.evaluate(&t, &client).is_allow());
    }
}
