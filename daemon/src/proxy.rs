//! The data-plane context shared by the outbound and inbound paths.
//!
//! Owns [`Proxy`] (registry, socket factory, tunnels, the few settings the
//! data path needs, the shutdown signal) and [`ConnTracker`], which counts
//! connections in flight so that shutdown can drain them.

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpStream;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::identity::workload_spiffe_id;
use crate::limits::Limits;
use crate::metrics::{self as m, UNKNOWN};
use crate::netns::{connect_in, Netns, Origin, SocketFactory};
use crate::pods::LocalPod;
use crate::registry::Registry;
use crate::tunnel::Tunnels;

/// Everything a proxied connection needs.
#[derive(Debug)]
pub struct Proxy {
    /// The cluster view.
    pub registry: Arc<Registry>,
    /// Makes sockets inside pods.
    pub sockets: Arc<dyn SocketFactory>,
    /// Tunnels to peer nodes.
    pub tunnels: Arc<Tunnels>,
    /// SPIFFE trust domain.
    pub trust_domain: String,
    /// `SO_MARK` on sockets made inside pods.
    pub mark: u32,
    /// `SO_MARK` on connections into pods from the client's address
    /// (`client_address.mark`); used only into pods whose return path is
    /// installed ([`LocalPod::client_address`]).
    pub client_mark: u32,
    /// Outbound listener port (to refuse redirect loops).
    pub outbound_port: u16,
    /// Timeout for connecting to destinations.
    pub connect_timeout: Duration,
    /// Connections in flight.
    pub tracker: ConnTracker,
    /// Admission limits per local pod and per daemon.
    pub limits: Arc<Limits>,
    /// Cancelled when the daemon stops accepting.
    pub shutdown: CancellationToken,
    /// Cancelled when a successor daemon has taken over (`handover`): new
    /// tunnel streams are answered `unavailable`/`draining`, so peers move
    /// to a new tunnel, which reaches the successor.
    pub handed_over: CancellationToken,
}

/// The status reason telling L1 that this tunnel connection takes no new
/// streams (the daemon is shutting down or handed over): L1 retires the
/// connection and retries once on a new one (docs/protocol.md §3).
pub const REASON_DRAINING: &str = "draining";

/// Who a local pod is, for headers and metric labels.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Workload {
    /// Namespace.
    pub namespace: String,
    /// Workload name (metrics).
    pub workload: String,
    /// SPIFFE identity.
    pub identity: String,
}

impl Proxy {
    /// Whether new tunnel streams must be refused with `draining`.
    pub fn is_draining(&self) -> bool {
        self.shutdown.is_cancelled() || self.handed_over.is_cancelled()
    }

    /// The identity of a local pod: discovery's view of it when it has one
    /// (service account, workload labels), else what the CNI registered.
    pub fn workload_of(&self, pod: &LocalPod) -> Workload {
        let snap = self.registry.snapshot();
        let info = pod.ips.iter().find_map(|ip| snap.pod(*ip));
        let (workload, sa) = match info {
            Some(p) => (p.workload.clone(), p.service_account.clone()),
            None => (
                pod.name.clone(),
                pod.service_account
                    .clone()
                    .unwrap_or_else(|| "default".to_owned()),
            ),
        };
        Workload {
            identity: workload_spiffe_id(&self.trust_domain, &pod.namespace, &sa),
            namespace: pod.namespace.clone(),
            workload,
        }
    }

    /// Connects to `dst` from a socket made inside `netns`, from the pod's
    /// own address, marked so the pod's capture rules let it through, within
    /// the connect timeout (passthrough).
    pub async fn connect(&self, netns: &Netns, dst: SocketAddr) -> std::io::Result<TcpStream> {
        self.connect_from(netns, dst, Origin::Pod { mark: self.mark })
            .await
    }

    /// Delivers a connection of `client` into the local pod `pod` (at
    /// `dst`, one of its addresses): from `client`'s address where the pod's
    /// return path is installed and the families match, else from the pod's
    /// own address.
    pub async fn connect_into(
        &self,
        pod: &LocalPod,
        client: IpAddr,
        dst: SocketAddr,
    ) -> std::io::Result<TcpStream> {
        let origin = if pod.client_address && client.is_ipv4() == dst.is_ipv4() {
            Origin::Client {
                addr: client,
                mark: self.client_mark,
            }
        } else {
            Origin::Pod { mark: self.mark }
        };
        self.connect_from(&pod.netns, dst, origin).await
    }

    async fn connect_from(
        &self,
        netns: &Netns,
        dst: SocketAddr,
        origin: Origin,
    ) -> std::io::Result<TcpStream> {
        let sockets = self.sockets.as_ref();
        connect_in(sockets, netns, dst, origin, self.connect_timeout).await
    }

    /// Namespace and workload of any address, from discovery.
    pub fn describe_ip(&self, ip: std::net::IpAddr) -> (String, String) {
        if let Some(p) = self.registry.local_by_ip(ip) {
            let w = self.workload_of(&p);
            return (w.namespace, w.workload);
        }
        match self.registry.snapshot().pod(ip) {
            Some(p) => (p.namespace.clone(), p.workload.clone()),
            None => (UNKNOWN.to_owned(), UNKNOWN.to_owned()),
        }
    }
}

/// Counts connections in flight; [`ConnTracker::drained`] waits for zero.
#[derive(Debug, Clone, Default)]
pub struct ConnTracker {
    inner: Arc<TrackerInner>,
}

#[derive(Debug, Default)]
struct TrackerInner {
    active: AtomicUsize,
    idle: Notify,
}

/// Held for the life of one connection.
#[derive(Debug)]
pub struct ConnGuard {
    inner: Arc<TrackerInner>,
}

impl ConnTracker {
    /// Registers a connection until the guard drops.
    pub fn track(&self) -> ConnGuard {
        self.inner.active.fetch_add(1, Ordering::SeqCst);
        metrics::gauge!(m::CONNECTIONS_ACTIVE).increment(1.0);
        ConnGuard {
            inner: self.inner.clone(),
        }
    }

    /// Connections in flight.
    pub fn active(&self) -> usize {
        self.inner.active.load(Ordering::SeqCst)
    }

    /// Resolves once no connection is in flight.
    pub async fn drained(&self) {
        loop {
            let notified = self.inner.idle.notified();
            if self.active() == 0 {
                return;
            }
            notified.await;
        }
    }
}

impl Drop for ConnGuard {
    fn drop(&mut self) {
        metrics::gauge!(m::CONNECTIONS_ACTIVE).decrement(1.0);
        if self.inner.active.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.inner.idle.notify_waiters();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn drained_waits_for_the_last_guard() {
        let t = ConnTracker::default();
        t.drained().await;
        let g1 = t.track();
        let g2 = t.track();
        let waiter = tokio::spawn({
            let t = t.clone();
            async move { t.drained().await }
        });
        drop(g1);
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished());
        drop(g2);
        tokio::time::timeout(Duration::from_secs(1), waiter)
            .await
            .expect("drained in time")
            .expect("join");
        assert_eq!(t.active(), 0);
    }
}
