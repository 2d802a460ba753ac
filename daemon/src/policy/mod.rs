//! Zero trust at L2: who may reach a local pod.
//!
//! Owns the three checks the destination node makes before it relays a
//! connection, each a pure function over one discovery snapshot:
//!
//! - [`source`]: a tunnel stream's claimed source (pod address and SPIFFE
//!   identity in the header) is believed only if discovery puts that pod on
//!   the peer node named by the tunnel certificate and it runs as the claimed
//!   service account;
//! - [`authz`]: `AuthorizationPolicy` evaluation (DENY wins, any ALLOW makes
//!   a workload default-deny) over a [`authz::PolicyIndex`] compiled once per
//!   snapshot;
//! - the namespace mode (`permissive`/`strict`), kept in the snapshot.
//!
//! [`live`] holds the connections admitted so far, so that a snapshot change
//! can re-evaluate them and close the ones no longer allowed.
//!
//! Reason strings (status reasons, metric labels, logs) are the `REASON_*`
//! constants here; `docs/security.md` documents each.

pub mod authz;
pub mod live;
pub mod source;

pub use authz::{Client, Decision, DenyReason, Peer, PolicyIndex, Target};
pub use live::{LiveConn, LiveConns, LiveGuard};
pub use source::{parse_workload_identity, verify_source, SourceRefusal};

/// The header's source address is not a pod discovery knows.
pub const REASON_UNKNOWN_SOURCE: &str = "unknown_source";
/// The source pod is not scheduled on the peer node that sent the stream.
pub const REASON_SOURCE_NOT_ON_PEER: &str = "source_not_on_peer";
/// The source pod does not run as the identity the header claims.
pub const REASON_IDENTITY_MISMATCH: &str = "identity_mismatch";
/// An `AuthorizationPolicy` refuses the connection (DENY match, or no ALLOW
/// match on a workload some ALLOW policy selects).
pub const REASON_POLICY_DENIED: &str = "policy_denied";
/// A connection admitted earlier is closed because policy now refuses it.
pub const REASON_POLICY_REVOKED: &str = "policy_revoked";
/// Plaintext inbound to a pod whose namespace is `strict`.
pub const REASON_PLAINTEXT_REFUSED: &str = "plaintext_refused";

/// Every reason string L2 may send in a `DENIED` status.
pub const DENIAL_REASONS: [&str; 5] = [
    REASON_UNKNOWN_SOURCE,
    REASON_SOURCE_NOT_ON_PEER,
    REASON_IDENTITY_MISMATCH,
    REASON_POLICY_DENIED,
    REASON_PLAINTEXT_REFUSED,
];

/// The static label for a reason received from a peer: one of
/// [`DENIAL_REASONS`], else `"other"` (a peer must not choose label values).
pub fn reason_label(reason: &str) -> &'static str {
    DENIAL_REASONS
        .iter()
        .find(|r| **r == reason)
        .copied()
        .unwrap_or("other")
}
