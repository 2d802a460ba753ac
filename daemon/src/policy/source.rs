//! Source verification at L2.
//!
//! Owns the rule that makes a node speak only for its own pods: a stream
//! header's source address and SPIFFE identity are believed only if
//! discovery says that address is a pod scheduled on the peer node named by
//! the tunnel certificate, running as the service account the identity names.
//! Checked in this order, each failure with its reason string:
//!
//! 1. the source address is a pod in discovery, else `unknown_source`;
//! 2. that pod is scheduled on the peer node, else `source_not_on_peer`;
//! 3. `spiffe://<td>/ns/<pod namespace>/sa/<pod service account>` equals the
//!    claimed identity, else `identity_mismatch`.

use std::net::IpAddr;
use std::sync::Arc;

use super::{REASON_IDENTITY_MISMATCH, REASON_SOURCE_NOT_ON_PEER, REASON_UNKNOWN_SOURCE};
use crate::registry::{PodInfo, Snapshot};

/// Why a claimed source was not believed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SourceRefusal {
    /// The source address is no pod discovery knows.
    #[error("source address {ip} is not a pod known to discovery")]
    UnknownSource {
        /// The claimed source address.
        ip: IpAddr,
    },
    /// The source pod runs on another node than the peer.
    #[error(
        "source pod {pod} ({ip}) is scheduled on node {node:?}, not on the peer node {peer:?}"
    )]
    SourceNotOnPeer {
        /// The claimed source address.
        ip: IpAddr,
        /// `<namespace>/<name>` of the pod at that address.
        pod: String,
        /// The node discovery puts it on.
        node: String,
        /// The authenticated peer node.
        peer: String,
    },
    /// The claimed identity is not the pod's.
    #[error("source pod {pod} ({ip}) runs as {expected}, not as the claimed {claimed}")]
    IdentityMismatch {
        /// The claimed source address.
        ip: IpAddr,
        /// `<namespace>/<name>` of the pod at that address.
        pod: String,
        /// The pod's identity according to discovery.
        expected: String,
        /// The identity in the header.
        claimed: String,
    },
}

impl SourceRefusal {
    /// The reason string of the `DENIED` status and of metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::UnknownSource { .. } => REASON_UNKNOWN_SOURCE,
            Self::SourceNotOnPeer { .. } => REASON_SOURCE_NOT_ON_PEER,
            Self::IdentityMismatch { .. } => REASON_IDENTITY_MISMATCH,
        }
    }
}

/// `(namespace, service account)` of `spiffe://<td>/ns/<ns>/sa/<sa>` in
/// trust domain `td`, if `id` is exactly that shape.
pub fn parse_workload_identity<'a>(td: &str, id: &'a str) -> Option<(&'a str, &'a str)> {
    let rest = id
        .strip_prefix("spiffe://")?
        .strip_prefix(td)?
        .strip_prefix("/ns/")?;
    let (ns, sa) = rest.split_once("/sa/")?;
    let ok = |s: &str| !s.is_empty() && !s.contains('/');
    (ok(ns) && ok(sa)).then_some((ns, sa))
}

/// Verifies a stream's claimed source against `snapshot`; returns the source
/// pod. `peer` is the node name from the tunnel certificate.
pub fn verify_source<'s>(
    snapshot: &'s Snapshot,
    trust_domain: &str,
    peer: &str,
    src: IpAddr,
    claimed: &str,
) -> Result<&'s Arc<PodInfo>, SourceRefusal> {
    let pod = snapshot
        .pod(src)
        .ok_or(SourceRefusal::UnknownSource { ip: src })?;
    if pod.node != peer {
        return Err(SourceRefusal::SourceNotOnPeer {
            ip: src,
            pod: format!("{}/{}", pod.namespace, pod.name),
            node: pod.node.clone(),
            peer: peer.to_owned(),
        });
    }
    match parse_workload_identity(trust_domain, claimed) {
        Some((ns, sa)) if ns == pod.namespace && sa == pod.service_account => Ok(pod),
        _ => Err(SourceRefusal::IdentityMismatch {
            ip: src,
            pod: format!("{}/{}", pod.namespace, pod.name),
            expected: crate::identity::workload_spiffe_id(
                trust_domain,
                &pod.namespace,
                &pod.service_account,
            ),
            claimed: claimed.to_owned(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::discovery::model::ClusterModel;

    fn snapshot() -> Snapshot {
        let m: ClusterModel = serde_yaml::from_str(
            r#"
nodes:
  - {name: n1, address: 10.77.0.1}
  - {name: n2, address: 10.77.0.2}
pods:
  - {namespace: shop, name: web, service_account: web, node: n1, ips: [10.78.1.2]}
"#,
        )
        .expect("model");
        Snapshot::from_model(&m, 1)
    }

    const WEB: &str = "spiffe://cluster.local/ns/shop/sa/web";

    #[test]
    fn accepts_only_the_peer_speaking_for_its_own_pod() {
        let s = snapshot();
        let ip: IpAddr = "10.78.1.2".parse().expect("ip");
        let pod = verify_source(&s, "cluster.local", "n1", ip, WEB).expect("verified");
        assert_eq!(pod.name, "web");

        let e = verify_source(&s, "cluster.local", "n2", ip, WEB).expect_err("other node");
        assert_eq!(e.reason(), "source_not_on_peer");
        assert!(e.to_string().contains("\"n1\""), "{e}");

        for claimed in [
            "spiffe://cluster.local/ns/shop/sa/admin",
            "spiffe://cluster.local/ns/other/sa/web",
            "spiffe://evil.local/ns/shop/sa/web",
            "spiffe://cluster.local/ns/shop/sa/web/extra",
            "",
        ] {
            let e = verify_source(&s, "cluster.local", "n1", ip, claimed).expect_err(claimed);
            assert_eq!(e.reason(), "identity_mismatch", "{claimed}");
        }

        let e = verify_source(
            &s,
            "cluster.local",
            "n1",
            "10.78.1.9".parse().expect("ip"),
            WEB,
        )
        .expect_err("unknown");
        assert_eq!(e.reason(), "unknown_source");
    }

    #[test]
    fn parses_workload_identities_strictly() {
        assert_eq!(
            parse_workload_identity("cluster.local", WEB),
            Some(("shop", "web"))
        );
        for bad in [
            "spiffe://cluster.local/ns//sa/web",
            "spiffe://cluster.local/ns/shop/sa/",
            "spiffe://cluster.localx/ns/shop/sa/web",
            "spiffe://cluster.local/nodemesh/node/n1",
        ] {
            assert_eq!(parse_workload_identity("cluster.local", bad), None, "{bad}");
        }
    }
}
