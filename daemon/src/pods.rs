//! Local pod registrations: their in-pod listeners, and their persistence.
//!
//! Owns [`PodManager`]: `register` enters the pod's netns (through the
//! [`SocketFactory`]), creates the outbound (`127.0.0.1:<outbound>`) and inbound
//! plaintext (`0.0.0.0:<inbound>`) listeners there, starts their accept loops
//! and only then answers; `unregister` closes them and every connection of the
//! pod. Registrations are written to `state_dir/<container_id>.json` so a
//! restarted daemon re-creates the listeners without the CNI being called.
//! Listeners use `SO_REUSEPORT`: during a hand-over the successor listens
//! beside this daemon, which then hands them over
//! ([`PodManager::hand_off_listeners`]); the successor picks up what this one
//! registered meanwhile with [`PodManager::resync`].

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use nodemesh_cni::proto::{PodRegistration, Request};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Mutex;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::field::Empty;
use tracing::{debug, info, info_span, warn, Instrument};

use crate::config::ClientAddressConfig;
use crate::limits::{PodConns, Refusal};
use crate::metrics as m;
use crate::netns::{listen_in, original_dst, return_path_sysctls, NetSysctl, Netns, SocketFactory};
use crate::proxy::{Proxy, Workload};
use crate::relay::reset_tcp;
use crate::rtnl::ReturnPath;
use crate::{access_log, handover, inbound, outbound, reuseport};

/// A pod registered on this node.
#[derive(Debug)]
pub struct LocalPod {
    /// Registration key (CNI container id).
    pub container_id: String,
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
    /// Service account as registered (discovery may know better).
    pub service_account: Option<String>,
    /// The pod's IPs.
    pub ips: Vec<IpAddr>,
    /// Its network namespace.
    pub netns: Netns,
    /// The return path (`config.client_address`) is installed in the pod's
    /// namespace: the daemon connects into it from the client's address.
    /// False when the setting is off, or installing failed (then the daemon
    /// connects from the pod's own address).
    pub client_address: bool,
    /// Cancelled on unregister: closes listeners and connections.
    pub cancel: CancellationToken,
    /// The registration as received.
    pub registration: PodRegistration,
    /// Its connections open through its outbound listener, against
    /// `limits.max_connections_per_pod`.
    pub conns: Arc<PodConns>,
}

/// Why a registration failed.
#[derive(Debug, thiserror::Error)]
pub enum RegisterError {
    /// The request is not usable.
    #[error("invalid registration: {0}")]
    Invalid(String),
    /// The netns path could not be opened.
    #[error("cannot open network namespace {path}: {source}; is the pod sandbox still running?")]
    Netns {
        /// The path.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// A listener could not be created in the pod.
    #[error("cannot listen on {addr} inside {path}: {source}")]
    Listen {
        /// The address.
        addr: SocketAddr,
        /// The netns path.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// The daemon is shutting down.
    #[error("the daemon is shutting down")]
    ShuttingDown,
}

/// Installs the return path, `tcp_fwmark_accept` and `fwmark_reflect` (per
/// family of the path) in a pod's namespace; whether all hold. A failure is
/// logged and counted, and the pod is meshed all the same, reached from its
/// own address. A rule or route left
/// by a half-way failure matches only the return path's mark, which the
/// daemon then never sets in this pod: inert.
async fn install_return_path(
    factory: &dyn SocketFactory,
    netns: &Netns,
    path: ReturnPath,
    pod: &str,
) -> bool {
    let res = match factory.install_return_path(netns, path).await {
        Ok(true) => {
            async {
                for sysctl in return_path_sysctls(&path) {
                    factory.set_sysctl(netns, sysctl).await?;
                }
                Ok(true)
            }
            .await
        }
        other => other,
    };
    match res {
        Ok(installed) => {
            debug!(netns = %netns.path().display(), installed, "pod return path");
            installed
        }
        Err(e) => {
            metrics::counter!(m::POD_RETURN_PATH_FAILURES).increment(1);
            warn!(
                pod,
                netns = %netns.path().display(),
                mark = %format_args!("{:#x}", path.mark),
                table = path.table,
                error = %e,
                "cannot install the return path in the pod's namespace; the mesh connects into \
                 this pod from its own address, not the client's"
            );
            false
        }
    }
}

/// Registers and unregisters local pods.
#[derive(Debug)]
pub struct PodManager {
    proxy: Arc<Proxy>,
    state_dir: PathBuf,
    outbound_port: u16,
    inbound_port: u16,
    /// Serializes register/unregister so a pod's state is never half-applied.
    lock: Mutex<()>,
    /// Cancelled when a successor daemon takes over: every listener is
    /// handed to it and closed (open connections carry on).
    hand_off: CancellationToken,
    /// The accept loops, so a hand-off can wait for every listener to close.
    listeners: TaskTracker,
    /// Set in every pod's namespace once its listeners are up.
    sysctls: Vec<NetSysctl>,
    /// The return path installed in every pod's namespace after the
    /// sysctls. None: connect into pods from their own address.
    client_address: Option<ClientAddressConfig>,
}

impl PodManager {
    /// A manager persisting under `state_dir`.
    pub fn new(proxy: Arc<Proxy>, state_dir: &Path, outbound_port: u16, inbound_port: u16) -> Self {
        Self {
            proxy,
            state_dir: state_dir.to_owned(),
            outbound_port,
            inbound_port,
            lock: Mutex::new(()),
            hand_off: CancellationToken::new(),
            listeners: TaskTracker::new(),
            sysctls: Vec::new(),
            client_address: None,
        }
    }

    /// With `config.preserve`, installs the return path (`config`'s mark,
    /// routing table and rule priority) in every pod's namespace at
    /// registration (and restore), so the daemon connects into the pod from
    /// the client's address; off by default.
    pub fn with_client_address(mut self, config: &ClientAddressConfig) -> Self {
        self.client_address = config.preserve.then(|| config.clone());
        self
    }

    /// Sysctls set in every pod's namespace at registration (and restore);
    /// none by default.
    pub fn with_pod_sysctls(mut self, sysctls: Vec<NetSysctl>) -> Self {
        self.sysctls = sysctls;
        self
    }

    /// Hands every pod's listeners to the successor daemon (which listens
    /// beside them): new connections are steered to its sockets, these
    /// linger briefly, serve what is queued, and close. Returns once all are
    /// closed; registering is refused from then on. Open connections go on.
    pub async fn hand_off_listeners(&self) {
        let _g = self.lock.lock().await;
        self.hand_off.cancel();
        self.listeners.close();
        self.listeners.wait().await;
        info!(
            pods = self.proxy.registry.local_count(),
            "in-pod listeners handed over and closed"
        );
    }

    /// Brings the registrations in line with `state_dir` after another
    /// daemon served the CNI socket for a while (hand-over): registers what
    /// is there and not here, forgets what is here and no longer there.
    /// Returns (registered, forgotten).
    pub async fn resync(&self) -> (usize, usize) {
        let mut forgotten = 0;
        for pod in self.proxy.registry.locals() {
            if !self.state_path(&pod.container_id).exists()
                && self.unregister(&pod.container_id).await
            {
                forgotten += 1;
            }
        }
        let before = self.proxy.registry.local_count();
        self.restore().await;
        let registered = self.proxy.registry.local_count().saturating_sub(before);
        (registered, forgotten)
    }

    /// Ports and mark the capture rules must use.
    pub fn capture_params(&self) -> (u16, u16, u32) {
        (self.outbound_port, self.inbound_port, self.proxy.mark)
    }

    /// Why discovery says this pod must not be meshed, if it does.
    pub fn opt_out_reason(&self, reg: &PodRegistration) -> Option<String> {
        self.proxy
            .registry
            .snapshot()
            .injection_disabled(&reg.namespace, &reg.name)
            .then(|| {
                format!(
                    "pod {}/{} is annotated nodemesh.io/inject: disabled",
                    reg.namespace, reg.name
                )
            })
    }

    /// Registers a pod: listeners up, accept loops running, state persisted.
    pub async fn register(&self, reg: PodRegistration) -> Result<(), RegisterError> {
        validate(&reg)?;
        let _g = self.lock.lock().await;
        if self.proxy.shutdown.is_cancelled() || self.hand_off.is_cancelled() {
            return Err(RegisterError::ShuttingDown);
        }
        if let Some(existing) = self.proxy.registry.local(&reg.container_id) {
            if existing.registration == reg && !existing.cancel.is_cancelled() {
                return Ok(());
            }
            self.close(&reg.container_id);
        }
        let pod = self.start(reg.clone()).await?;
        if let Err(e) = self.persist(&reg) {
            // Serving without persistence would lose the pod on restart: undo.
            pod.cancel.cancel();
            self.proxy.registry.remove_local(&reg.container_id);
            return Err(RegisterError::Invalid(format!(
                "cannot persist registration in {}: {e}",
                self.state_dir.display()
            )));
        }
        metrics::gauge!(m::PODS_REGISTERED).set(self.proxy.registry.local_count() as f64);
        info!(
            container_id = %reg.container_id,
            pod = %format_args!("{}/{}", reg.namespace, reg.name),
            ips = ?reg.ips,
            "pod registered"
        );
        Ok(())
    }

    async fn start(&self, reg: PodRegistration) -> Result<Arc<LocalPod>, RegisterError> {
        let netns = Netns::open(&reg.netns).map_err(|source| RegisterError::Netns {
            path: reg.netns.clone(),
            source,
        })?;
        let factory = self.proxy.sockets.as_ref();
        // IPv4 always; IPv6 too when the pod has an IPv6 address (the capture
        // rules redirect IPv6 TCP to `[::1]:<outbound>` and `:<inbound>`).
        let mut outbound_addrs = vec![SocketAddr::from((Ipv4Addr::LOCALHOST, self.outbound_port))];
        let mut inbound_addrs = vec![SocketAddr::from((Ipv4Addr::UNSPECIFIED, self.inbound_port))];
        if reg.ips.iter().any(IpAddr::is_ipv6) {
            outbound_addrs.push(SocketAddr::from((Ipv6Addr::LOCALHOST, self.outbound_port)));
            inbound_addrs.push(SocketAddr::from((Ipv6Addr::UNSPECIFIED, self.inbound_port)));
        }
        let mut outs = Vec::new();
        for addr in outbound_addrs {
            let l = listen_in(factory, &netns, addr).await.map_err(|e| {
                let e = if e.kind() == io::ErrorKind::AddrNotAvailable {
                    // Loopback missing: the runtime has not brought `lo` up
                    // (its `loopback` plugin runs before the pod network).
                    io::Error::new(
                        e.kind(),
                        format!("{e}; is the pod's loopback interface up?"),
                    )
                } else {
                    e
                };
                RegisterError::Listen {
                    addr,
                    path: reg.netns.clone(),
                    source: e,
                }
            })?;
            outs.push(l);
        }
        let mut ins = Vec::new();
        for addr in inbound_addrs {
            let l =
                listen_in(factory, &netns, addr)
                    .await
                    .map_err(|source| RegisterError::Listen {
                        addr,
                        path: reg.netns.clone(),
                        source,
                    })?;
            ins.push(l);
        }
        // After the listeners, so a pod refused here (namespace, listeners)
        // keeps its namespace as it was. If persisting then fails, the value
        // stays set: harmless, it only lets the pod's connects reuse old
        // TIME_WAITs. A sysctl that cannot be set does not fail the
        // registration: the pod is meshed, only less well tuned.
        for sysctl in &self.sysctls {
            match factory.set_sysctl(&netns, *sysctl).await {
                Ok(changed) => {
                    debug!(netns = %reg.netns.display(), sysctl = sysctl.name, value = sysctl.value, changed, "pod sysctl")
                }
                Err(e) => {
                    metrics::counter!(m::POD_SYSCTL_FAILURES, "sysctl" => sysctl.name).increment(1);
                    warn!(
                        pod = %format_args!("{}/{}", reg.namespace, reg.name),
                        netns = %reg.netns.display(),
                        sysctl = sysctl.name,
                        value = sysctl.value,
                        error = %e,
                        "cannot set a sysctl in the pod's namespace; the pod is meshed without it"
                    );
                }
            }
        }
        let client_address = match &self.client_address {
            Some(c) => {
                let path = ReturnPath::for_ips(c.mark, c.table, c.rule_priority, &reg.ips);
                let pod = format!("{}/{}", reg.namespace, reg.name);
                install_return_path(factory, &netns, path, &pod).await
            }
            None => false,
        };
        let pod = Arc::new(LocalPod {
            container_id: reg.container_id.clone(),
            namespace: reg.namespace.clone(),
            name: reg.name.clone(),
            service_account: reg.service_account.clone(),
            ips: reg.ips.clone(),
            netns,
            client_address,
            cancel: CancellationToken::new(),
            registration: reg,
            conns: Arc::default(),
        });
        let listeners = outs
            .into_iter()
            .map(|l| (l, Listener::Outbound))
            .chain(ins.into_iter().map(|l| (l, Listener::Plaintext)));
        for (l, kind) in listeners {
            self.listeners.spawn(serve_listener(
                self.proxy.clone(),
                pod.clone(),
                l,
                kind,
                self.hand_off.clone(),
            ));
        }
        self.proxy.registry.insert_local(pod.clone());
        Ok(pod)
    }

    /// Unregisters a pod; returns whether it was registered. Idempotent.
    pub async fn unregister(&self, container_id: &str) -> bool {
        let _g = self.lock.lock().await;
        let was = self.close(container_id);
        if is_safe_id(container_id) {
            let path = self.state_path(container_id);
            if let Err(e) = std::fs::remove_file(&path) {
                if e.kind() != io::ErrorKind::NotFound {
                    warn!(path = %path.display(), error = %e, "cannot remove registration state");
                }
            }
        }
        metrics::gauge!(m::PODS_REGISTERED).set(self.proxy.registry.local_count() as f64);
        if was {
            info!(%container_id, "pod unregistered");
        }
        was
    }

    fn close(&self, container_id: &str) -> bool {
        match self.proxy.registry.remove_local(container_id) {
            Some(pod) => {
                pod.cancel.cancel();
                true
            }
            None => false,
        }
    }

    /// Whether a pod is registered with live listeners.
    pub fn is_registered(&self, container_id: &str) -> bool {
        self.proxy
            .registry
            .local(container_id)
            .is_some_and(|p| !p.cancel.is_cancelled())
    }

    /// Re-creates the persisted registrations; returns how many came back.
    /// Registrations whose netns is gone are dropped with a log line.
    pub async fn restore(&self) -> usize {
        let entries = match std::fs::read_dir(&self.state_dir) {
            Ok(e) => e,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return 0,
            Err(e) => {
                warn!(dir = %self.state_dir.display(), error = %e, "cannot read registration state");
                return 0;
            }
        };
        let mut restored = 0;
        for entry in entries.flatten() {
            let path = entry.path();
            if path.extension().and_then(|e| e.to_str()) != Some("json") {
                continue;
            }
            let reg = match std::fs::read(&path)
                .map_err(|e| e.to_string())
                .and_then(|b| {
                    serde_json::from_slice::<PodRegistration>(&b).map_err(|e| e.to_string())
                }) {
                Ok(r) => r,
                Err(e) => {
                    warn!(path = %path.display(), error = %e, "skipping unreadable registration state");
                    continue;
                }
            };
            let id = reg.container_id.clone();
            match self.register(reg).await {
                Ok(()) => restored += 1,
                Err(RegisterError::Netns { path: ns, source }) => {
                    warn!(container_id = %id, netns = %ns.display(), error = %source,
                        "pod netns is gone; forgetting its registration");
                    let _ = std::fs::remove_file(&path);
                }
                Err(e) => warn!(container_id = %id, error = %e, "cannot restore registration"),
            }
        }
        restored
    }

    /// Delivers the unregisters the CNI plugin queued while this daemon was
    /// down (`<queue_dir>/<container_id>.json`, one request line each), then
    /// deletes them. Run before [`PodManager::restore`], so a pod deleted
    /// while the daemon was down does not come back. Returns how many.
    pub async fn drain_cni_queue(&self, queue_dir: &Path) -> usize {
        let entries = match std::fs::read_dir(queue_dir) {
            Ok(e) => e,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return 0,
            Err(e) => {
                warn!(dir = %queue_dir.display(), error = %e, "cannot read the CNI unregister queue");
                return 0;
            }
        };
        let mut drained = 0;
        for entry in entries.flatten() {
            let path = entry.path();
            if path.extension().and_then(|e| e.to_str()) != Some("json") {
                continue;
            }
            let req = std::fs::read(&path)
                .map_err(|e| e.to_string())
                .and_then(|b| {
                    nodemesh_cni::proto::decode_line::<Request>(&b).map_err(|e| e.to_string())
                });
            match req {
                Ok(Request::Unregister { container_id }) => {
                    self.unregister(&container_id).await;
                    drained += 1;
                }
                Ok(other) => {
                    warn!(path = %path.display(), request = ?other, "queued request is not an unregister; dropping it")
                }
                Err(e) => {
                    warn!(path = %path.display(), error = %e, "unreadable queued unregister; dropping it")
                }
            }
            if let Err(e) = std::fs::remove_file(&path) {
                warn!(path = %path.display(), error = %e, "cannot remove a queued unregister");
            }
        }
        drained
    }

    fn state_path(&self, container_id: &str) -> PathBuf {
        self.state_dir.join(format!("{container_id}.json"))
    }

    fn persist(&self, reg: &PodRegistration) -> io::Result<()> {
        std::fs::create_dir_all(&self.state_dir)?;
        let path = self.state_path(&reg.container_id);
        let tmp = path.with_extension("json.tmp");
        std::fs::write(
            &tmp,
            serde_json::to_vec_pretty(reg).map_err(io::Error::other)?,
        )?;
        std::fs::rename(&tmp, &path)
    }
}

/// The two kinds of in-pod listener.
#[derive(Debug, Clone, Copy)]
enum Listener {
    /// `127.0.0.1:<outbound>`: the pod's own outbound traffic (L1).
    Outbound,
    /// `:<inbound>`: plaintext from outside the mesh into the pod.
    Plaintext,
}

/// Accepts on one of a pod's listeners until the pod is unregistered or the
/// daemon stops accepting. Each connection runs in its own task and span, and
/// is closed when the pod is unregistered; a failed accept is logged and the
/// loop goes on. On `hand_off` the listener is handed to the successor daemon
/// (`reuseport::hand_off`) and closed.
async fn serve_listener(
    proxy: Arc<Proxy>,
    pod: Arc<LocalPod>,
    listener: TcpListener,
    kind: Listener,
    hand_off: CancellationToken,
) {
    loop {
        let accepted = tokio::select! {
            _ = pod.cancel.cancelled() => return,
            _ = proxy.shutdown.cancelled() => return,
            _ = hand_off.cancelled() => break,
            a = listener.accept() => a,
        };
        match accepted {
            Ok((tcp, client)) => spawn_connection(&proxy, &pod, tcp, client, kind),
            Err(e) => {
                warn!(pod = %pod.name, listener = ?kind, error = %e, "accept failed");
                // EMFILE and friends: give the system a moment rather than spin.
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            }
        }
    }
    reuseport::hand_off(listener, handover::LISTENER_LINGER, |tcp, client| {
        spawn_connection(&proxy, &pod, tcp, client, kind)
    })
    .await;
    debug!(pod = %pod.name, listener = ?kind, "listener handed over and closed");
}

/// Serves one accepted connection in its own task and span, if the
/// admission limits let it in (`limits`): a connection from the pod counts
/// against the pod's and the daemon's limit, a plaintext one from outside
/// against the daemon's. A refused connection is reset at once.
fn spawn_connection(
    proxy: &Arc<Proxy>,
    pod: &Arc<LocalPod>,
    tcp: TcpStream,
    client: SocketAddr,
    kind: Listener,
) {
    let permit = match kind {
        Listener::Outbound => proxy.limits.admit(Some(&pod.conns)),
        Listener::Plaintext => proxy.limits.admit(None),
    };
    let permit = match permit {
        Ok(p) => p,
        Err(refusal) => return refuse(proxy, pod, tcp, client, kind, refusal),
    };
    let name = format_args!("{}/{}", pod.namespace, pod.name);
    let span = match kind {
        Listener::Outbound => {
            info_span!("outbound", pod = %name, client.addr = %client, server.addr = Empty)
        }
        Listener::Plaintext => {
            info_span!("inbound_plaintext", pod = %name, client.addr = %client, server.addr = Empty)
        }
    };
    let (proxy, pod) = (proxy.clone(), pod.clone());
    tokio::spawn(
        async move {
            let _permit = permit;
            let cancel = pod.cancel.clone();
            // Boxed per kind: the task holds the future of the path taken,
            // not the larger of the two.
            let serve: futures::future::BoxFuture<'_, ()> = match kind {
                Listener::Outbound => Box::pin(outbound::handle(&proxy, &pod, tcp, client)),
                Listener::Plaintext => Box::pin(inbound::plaintext(&proxy, &pod, tcp, client)),
            };
            tokio::select! {
                _ = cancel.cancelled() => debug!("pod unregistered; connection closed"),
                _ = serve => {}
            }
        }
        .instrument(span),
    );
}

/// Resets a connection an admission limit refused, and reports the refusal
/// ([`Refusal::report`]) in a span naming the pod and the client.
fn refuse(
    proxy: &Proxy,
    pod: &LocalPod,
    tcp: TcpStream,
    client: SocketAddr,
    kind: Listener,
    refusal: Refusal,
) {
    let w = proxy.workload_of(pod);
    let edge = access_log::enabled()
        .then(|| refused_edge(proxy, &w, &tcp, client, kind))
        .flatten();
    reset_tcp(tcp);
    let listener = match kind {
        Listener::Outbound => "outbound",
        Listener::Plaintext => "plaintext",
    };
    let pod = format_args!("{}/{}", pod.namespace, pod.name);
    let _span = info_span!("refused", %pod, client.addr = %client).entered();
    refusal.report(listener, w.namespace, w.workload);
    if let Some(edge) = edge {
        access_log::record(
            &edge,
            access_log::Outcome::Failed {
                reason: inbound::REASON_CONNECTION_LIMIT,
            },
        );
    }
}

/// The labels of a connection of the local pod of workload `pod_w` refused
/// at accept, for its access log line: those its handler would have given
/// it, as far as they are known before an endpoint is picked. `None` when
/// the original destination cannot be read.
fn refused_edge(
    proxy: &Proxy,
    pod_w: &Workload,
    tcp: &TcpStream,
    client: SocketAddr,
    kind: Listener,
) -> Option<m::Edge> {
    let dst = original_dst(tcp).ok()?;
    Some(match kind {
        Listener::Outbound => match proxy.registry.services().lookup(dst) {
            Some(service) => crate::outbound_service::edge_to(pod_w, &service),
            None => outbound::edge_to(proxy, pod_w, dst, &proxy.registry.resolve(dst.ip())),
        },
        Listener::Plaintext => inbound::plaintext_edge(proxy, pod_w, client),
    })
}

/// Container ids become file names: keep them to a safe alphabet.
fn is_safe_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 256
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
        && !id.starts_with('.')
}

fn validate(reg: &PodRegistration) -> Result<(), RegisterError> {
    if !is_safe_id(&reg.container_id) {
        return Err(RegisterError::Invalid(format!(
            "container_id {:?} must be 1-256 characters of [A-Za-z0-9._-], not starting with '.'",
            reg.container_id
        )));
    }
    if reg.namespace.is_empty() || reg.name.is_empty() {
        return Err(RegisterError::Invalid(
            "namespace and name must be set".into(),
        ));
    }
    if reg.ips.is_empty() {
        return Err(RegisterError::Invalid(
            "ips is empty: the pod needs an address".into(),
        ));
    }
    if !reg.netns.is_absolute() {
        return Err(RegisterError::Invalid(format!(
            "netns {:?} must be an absolute path",
            reg.netns
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    use std::net::SocketAddr;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use metrics::{
        Counter, CounterFn, Gauge, Histogram, Key, KeyName, Metadata, Recorder, SharedString, Unit,
    };

    use crate::netns::{
        CurrentNetns, SocketFuture, SysctlFuture, FWMARK_REFLECT_V4, FWMARK_REFLECT_V6,
        TCP_FWMARK_ACCEPT,
    };

    /// Answers the return path and the sysctl as told, counting the calls.
    #[derive(Debug)]
    struct Scripted {
        path: fn() -> std::io::Result<bool>,
        sysctl: fn() -> std::io::Result<bool>,
        sysctls: AtomicUsize,
    }

    impl SocketFactory for Scripted {
        fn tcp_socket(&self, _ns: &Netns, _family: SocketAddr) -> SocketFuture {
            Box::pin(std::future::ready(Err(io::Error::other("no sockets here"))))
        }
        fn set_sysctl(&self, _ns: &Netns, sysctl: NetSysctl) -> SysctlFuture {
            assert!(
                [TCP_FWMARK_ACCEPT, FWMARK_REFLECT_V4, FWMARK_REFLECT_V6].contains(&sysctl),
                "{sysctl:?}"
            );
            self.sysctls.fetch_add(1, Ordering::SeqCst);
            Box::pin(std::future::ready((self.sysctl)()))
        }
        fn install_return_path(&self, _ns: &Netns, _path: ReturnPath) -> SysctlFuture {
            Box::pin(std::future::ready((self.path)()))
        }
    }

    /// Counts [`m::POD_RETURN_PATH_FAILURES`]; every other metric is a no-op.
    #[derive(Debug, Default)]
    struct Failures(Arc<FailureCount>);

    #[derive(Debug, Default)]
    struct FailureCount(std::sync::atomic::AtomicU64);

    impl CounterFn for FailureCount {
        fn increment(&self, value: u64) {
            self.0.fetch_add(value, Ordering::SeqCst);
        }
        fn absolute(&self, value: u64) {
            self.0.store(value, Ordering::SeqCst);
        }
    }

    impl Recorder for Failures {
        fn describe_counter(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
        fn describe_gauge(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
        fn describe_histogram(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
        fn register_counter(&self, key: &Key, _: &Metadata<'_>) -> Counter {
            if key.name() == m::POD_RETURN_PATH_FAILURES {
                Counter::from_arc(self.0.clone())
            } else {
                Counter::noop()
            }
        }
        fn register_gauge(&self, _: &Key, _: &Metadata<'_>) -> Gauge {
            Gauge::noop()
        }
        fn register_histogram(&self, _: &Key, _: &Metadata<'_>) -> Histogram {
            Histogram::noop()
        }
    }

    /// (installed, failures counted) for one factory.
    fn install_with(factory: &dyn SocketFactory) -> (bool, u64) {
        let recorder = Failures::default();
        let path = ReturnPath::for_ips(0x4e4e, 0x4e4e, 32000, &[Ipv4Addr::LOCALHOST.into()]);
        let installed = metrics::with_local_recorder(&recorder, || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .build()
                .expect("runtime");
            rt.block_on(install_return_path(
                factory,
                &Netns::current(),
                path,
                "ns/pod",
            ))
        });
        (installed, recorder.0 .0.load(Ordering::SeqCst))
    }

    #[test]
    fn return_path_holds_only_with_the_rule_and_every_sysctl() {
        let scripted = |path, sysctl| Scripted {
            path,
            sysctl,
            sysctls: AtomicUsize::new(0),
        };
        let ok = scripted(|| Ok(true), || Ok(false));
        assert_eq!(install_with(&ok), (true, 0));
        // tcp_fwmark_accept, and fwmark_reflect for the path's one family.
        assert_eq!(ok.sysctls.load(Ordering::SeqCst), 2);

        // The rule fails: no sysctl, counted, the pod is reached from its own address.
        let no_rule = scripted(|| Err(io::Error::other("EPERM")), || Ok(true));
        assert_eq!(install_with(&no_rule), (false, 1));
        assert_eq!(no_rule.sysctls.load(Ordering::SeqCst), 0);

        // The rule holds but the sysctl fails: not usable either.
        let no_sysctl = scripted(|| Ok(true), || Err(io::Error::other("EROFS")));
        assert_eq!(install_with(&no_sysctl), (false, 1));

        // The daemon's own namespace: nothing installed, nothing counted.
        assert_eq!(install_with(&CurrentNetns), (false, 0));
    }

    #[test]
    fn container_ids_are_file_safe() {
        assert!(is_safe_id("3f2a-b_c.d"));
        for bad in ["", "../x", "a/b", ".hidden", "a b"] {
            assert!(!is_safe_id(bad), "{bad}");
        }
    }
}
