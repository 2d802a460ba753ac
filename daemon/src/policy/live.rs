//! The connections L2 has admitted and is relaying.
//!
//! Owns the table that lets a policy change reach open connections: each
//! admitted connection registers what it was admitted as (destination pod
//! address and port, verified source identity or none, source address,
//! whether it is mTLS) with a cancellation token, and holds a [`LiveGuard`]
//! that removes it when the connection ends. After a discovery snapshot is
//! applied, [`LiveConns::revoke`] re-evaluates every entry and cancels the
//! ones now refused; the relay then resets both sides.

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use dashmap::DashMap;
use tokio_util::sync::CancellationToken;

use super::authz::{Client, Peer};

/// A verified source identity, owned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OwnedPeer {
    /// `spiffe://<td>/ns/<ns>/sa/<sa>`.
    pub principal: String,
    /// Namespace.
    pub namespace: String,
    /// Service account.
    pub service_account: String,
}

/// One admitted connection.
#[derive(Debug, Clone)]
pub struct LiveConn {
    /// Destination pod address and port.
    pub dst: SocketAddr,
    /// Destination namespace as registered by the CNI (used when discovery
    /// does not know the pod).
    pub dst_namespace: String,
    /// Verified source identity; `None` for plaintext.
    pub identity: Option<OwnedPeer>,
    /// Source address.
    pub src_ip: IpAddr,
    /// The tunnel peer node it came from; `None` for plaintext and same-node.
    pub peer_node: Option<Arc<str>>,
    /// Cancelled to close the connection.
    pub cancel: CancellationToken,
}

impl LiveConn {
    /// The policy view of its source.
    pub fn client(&self) -> Client<'_> {
        Client {
            identity: self.identity.as_ref().map(|p| Peer {
                principal: &p.principal,
                namespace: &p.namespace,
                service_account: &p.service_account,
            }),
            ip: self.src_ip,
        }
    }

    /// Whether it came in as plaintext.
    pub fn is_plaintext(&self) -> bool {
        self.identity.is_none()
    }
}

/// The table of admitted connections. Cheap to clone (shared).
#[derive(Debug, Clone, Default)]
pub struct LiveConns {
    conns: Arc<DashMap<u64, LiveConn>>,
    next: Arc<AtomicU64>,
}

/// Keeps a connection in the table; removes it on drop.
#[derive(Debug)]
pub struct LiveGuard {
    conns: LiveConns,
    id: u64,
    cancel: CancellationToken,
}

impl LiveGuard {
    /// The token cancelled when the connection must close.
    pub fn token(&self) -> &CancellationToken {
        &self.cancel
    }
}

impl Drop for LiveGuard {
    fn drop(&mut self) {
        self.conns.conns.remove(&self.id);
    }
}

impl LiveConns {
    /// Registers an admitted connection.
    pub fn register(&self, conn: LiveConn) -> LiveGuard {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let cancel = conn.cancel.clone();
        self.conns.insert(id, conn);
        LiveGuard {
            conns: self.clone(),
            id,
            cancel,
        }
    }

    /// Number of connections in the table.
    pub fn len(&self) -> usize {
        self.conns.len()
    }

    /// Whether the table is empty.
    pub fn is_empty(&self) -> bool {
        self.conns.is_empty()
    }

    /// Cancels every connection for which `refuse` returns a reason, and
    /// returns them with their reasons. Tokens are cancelled after the scan,
    /// so no table lock is held while connections wake up.
    pub fn revoke<R>(&self, mut refuse: impl FnMut(&LiveConn) -> Option<R>) -> Vec<(LiveConn, R)> {
        let doomed: Vec<(LiveConn, R)> = self
            .conns
            .iter()
            .filter(|e| !e.value().cancel.is_cancelled())
            .filter_map(|e| refuse(e.value()).map(|why| (e.value().clone(), why)))
            .collect();
        for (c, _) in &doomed {
            c.cancel.cancel();
        }
        doomed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conn(port: u16) -> LiveConn {
        LiveConn {
            dst: SocketAddr::from(([10, 0, 0, 1], port)),
            dst_namespace: "a".into(),
            identity: None,
            src_ip: IpAddr::from([10, 0, 0, 2]),
            peer_node: None,
            cancel: CancellationToken::new(),
        }
    }

    #[test]
    fn revoke_cancels_only_refused_and_guards_unregister() {
        let t = LiveConns::default();
        let g80 = t.register(conn(80));
        let g443 = t.register(conn(443));
        assert_eq!(t.len(), 2);
        let revoked = t.revoke(|c| (c.dst.port() == 80).then(|| "no".to_owned()));
        assert_eq!(revoked.len(), 1);
        assert!(g80.token().is_cancelled());
        assert!(!g443.token().is_cancelled());
        // Already cancelled: not reported again.
        assert_eq!(t.revoke(|_| Some("no")).len(), 1);
        drop(g80);
        drop(g443);
        assert!(t.is_empty());
    }
}
