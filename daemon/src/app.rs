//! The daemon's lifecycle: start every component, run until a signal, drain.
//!
//! Owns the start order (hand-over hello → credentials → registry and
//! discovery → tunnel → restored pods → CNI socket → admin → take-over →
//! hand-over socket) and graceful shutdown: on SIGTERM or SIGINT the daemon
//! becomes not-ready, stops accepting (pod listeners, CNI socket, new tunnel
//! streams get `UNAVAILABLE`/`draining`), waits for open connections up to
//! `drain_timeout_ms`, closes its tunnels and returns. Registrations stay on
//! disk, so a restarted daemon serves the same pods.
//!
//! When another daemon already runs on the node (a rolling upgrade), this one
//! starts beside it and takes over without a refused connection; the steps
//! and who does what are in `handover`. [`Node`] is what a hand-over acts on
//! when this daemon is the one handing over.
//!
//! An expired node certificate does not stop the start: the daemon serves,
//! reports itself not ready with the reason, and its peers refuse it until
//! valid files appear (the certificate reloader, `identity::reload`, installs
//! them). Unreadable or otherwise invalid files at start are fatal.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use std::path::PathBuf;

use metrics_exporter_prometheus::PrometheusHandle;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::admin::{self, AdminState, Readiness};
use crate::cni_server::{self, CniServer};
use crate::config::Config;
use crate::discovery;
use crate::handover::{self, Phase, PredecessorLink, SocketFile};
use crate::identity::reload::{self, Reloader};
use crate::identity::{self, KnownNodes};
use crate::inbound;
use crate::netns::{NetnsWorker, SocketFactory};
use crate::pods::PodManager;
use crate::proxy::{ConnTracker, Proxy};
use crate::registry::Registry;
use crate::tunnel::cid::Tag;
use crate::tunnel::{Steering, Tunnels};

/// Why the daemon could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// Node credentials are unusable.
    #[error("node credentials: {0}")]
    Credentials(#[from] identity::IdentityError),
    /// The tunnel could not be set up.
    #[error(transparent)]
    Tunnel(#[from] crate::tunnel::TunnelError),
    /// A socket or thread could not be created.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// Why it failed.
        source: std::io::Error,
    },
    /// The config asks for a discovery source this build was compiled without.
    #[error(
        "discovery.source: `{0}` is not in this build (compiled without the `{0}` cargo feature); \
         use a release binary or the container image, or set discovery.source: file"
    )]
    SourceNotBuilt(&'static str),
}

fn io_err(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> StartError {
    let what = what.into();
    move |source| StartError::Io { what, source }
}

/// A running daemon, for embedding and tests.
#[derive(Debug)]
pub struct Daemon {
    /// Cancel to begin graceful shutdown.
    pub shutdown: CancellationToken,
    /// Where the admin server listens.
    pub admin_addr: SocketAddr,
    /// Where the tunnel listens.
    pub tunnel_addr: SocketAddr,
    proxy: Arc<Proxy>,
    ready: Arc<Readiness>,
    drain_timeout: Duration,
    stopped: CancellationToken,
    node: Arc<Node>,
    handover_file: SocketFile,
}

/// The parts of a running daemon a hand-over acts on, when this daemon is
/// the predecessor.
#[derive(Debug)]
struct Node {
    ready: Arc<Readiness>,
    proxy: Arc<Proxy>,
    pods: Arc<PodManager>,
    cni: CniServer,
    cni_socket: PathBuf,
    admin_hand_off: CancellationToken,
    admin: tokio::sync::Mutex<Option<JoinHandle<()>>>,
}

impl handover::Predecessor for Node {
    async fn successor_starting(&self, pid: u32) {
        self.ready
            .set_handover(Some(format!("successor starting (pid {pid})")));
    }

    async fn stop_cni(&self) {
        self.cni.stop().await;
    }

    async fn take_over(&self, successor: u32) {
        self.ready
            .set_handover(Some(format!("handed over to pid {successor}")));
        // Peers move their new streams to a new tunnel, which reaches the
        // successor (its steering program sends new connections there).
        self.proxy.handed_over.cancel();
        self.admin_hand_off.cancel();
        let admin = self.admin.lock().await.take();
        tokio::join!(self.pods.hand_off_listeners(), self.cni.stop(), async {
            if let Some(task) = admin {
                let _ = task.await;
            }
        });
    }

    async fn revert(&self, cni_stopped: bool) {
        // The successor may also have renamed its socket over cni.sock and
        // died before asking us to stop: then the path is dead too.
        if cni_stopped || !self.cni.serves_the_path().await {
            match cni_server::bind(&self.cni_socket) {
                Ok((listener, file)) => {
                    self.cni.start(listener, file).await;
                    let (registered, forgotten) = self.pods.resync().await;
                    info!(
                        cni_socket = %self.cni_socket.display(),
                        registered,
                        forgotten,
                        "hand-over reverted: serving the CNI socket again"
                    );
                }
                Err(e) => warn!(
                    cni_socket = %self.cni_socket.display(),
                    error = %e,
                    "hand-over reverted, but the CNI socket cannot be bound again"
                ),
            }
        }
        self.ready.set_handover(None);
    }
}

impl Daemon {
    /// Starts every component; returns once the daemon is serving.
    pub async fn start(config: Config, metrics: PrometheusHandle) -> Result<Self, StartError> {
        let ready = Arc::new(Readiness::default());
        let shutdown = CancellationToken::new();
        let stopped = CancellationToken::new();

        // Another daemon on this node? Say so first: it reports not ready
        // from now on, so readiness probes that reach it (hostNetwork: the
        // same port) cannot mark this daemon's pod ready early.
        let handover_path = config.handover_socket();
        let mut predecessor = match handover::join(&handover_path).await {
            Ok(Some(link)) => {
                info!(
                    predecessor.pid = link.pid,
                    predecessor.cid_tag = link.tag.get(),
                    socket = %handover_path.display(),
                    "hand-over: predecessor found; starting beside it"
                );
                Some(link)
            }
            Ok(None) => None,
            Err(e) => {
                warn!(
                    socket = %handover_path.display(),
                    error = %e,
                    "hand-over: the running daemon refused; starting alone"
                );
                handover::count_successor("refused");
                None
            }
        };
        let predecessor_tag = predecessor.as_ref().map(|p| p.tag);
        let tag = Tag::random_except(predecessor_tag);
        let status = Arc::new(handover::Status::new(std::process::id(), tag));
        if let Some(p) = &predecessor {
            status.set(Phase::Joining, Some(p.pid));
        }

        let (tls_files, creds) =
            reload::load_initial(&config.tls, &config.trust_domain, &config.node_name)?;
        info!(node = %creds.node, not_after = ?creds.not_after, "node credentials loaded");
        let registry = Arc::new(Registry::new(&config.node_name, config.ports.tunnel));

        if config.discovery.source == crate::config::DiscoverySource::Kubernetes {
            // Readiness waits for the first full list of every watched kind.
            #[cfg(feature = "kubernetes")]
            tokio::spawn(discovery::kubernetes::run_inferred(
                config.node_ip(),
                registry.clone(),
                ready.clone(),
                shutdown.clone(),
            ));
            #[cfg(not(feature = "kubernetes"))]
            return Err(StartError::SourceNotBuilt("kubernetes"));
        } else {
            // First discovery load before anything dials or accepts, so peers are known.
            let mut last = None;
            discovery::file::poll_once(&config.discovery.file, &mut last, &registry, &ready);
            tokio::spawn(discovery::file::watch(
                config.discovery.file.clone(),
                Duration::from_millis(config.discovery.poll_interval_ms),
                last,
                registry.clone(),
                ready.clone(),
                shutdown.clone(),
            ));
        }

        let known: Arc<dyn KnownNodes> = registry.clone();
        let server_tls = identity::server_config(&creds, &config.trust_domain, known.clone())?;
        let client_tls = identity::client_config(&creds, &config.trust_domain)?;
        let tunnel_addr = SocketAddr::new(config.node_ip(), config.ports.tunnel);
        let tunnels = Arc::new(Tunnels::bind(
            tunnel_addr,
            &config.node_name,
            &config.tunnel,
            server_tls,
            client_tls,
            Steering {
                tag,
                predecessor: predecessor_tag,
            },
        )?);
        let tunnel_addr = tunnels
            .endpoint()
            .local_addr()
            .map_err(io_err("tunnel address"))?;
        let mut reloader = Reloader::new(
            config.tls.clone(),
            &config.trust_domain,
            &config.node_name,
            known,
            tunnels.clone(),
            ready.clone(),
            tls_files,
            creds,
        );
        reloader.report(SystemTime::now());
        tokio::spawn(reload::watch(
            reloader,
            Duration::from_millis(config.tls.reload_interval_ms),
            shutdown.clone(),
        ));
        ready.mark_tunnel();

        let sockets: Arc<dyn SocketFactory> =
            Arc::new(NetnsWorker::start().map_err(io_err("starting the netns worker thread"))?);
        let proxy = Arc::new(Proxy {
            registry: registry.clone(),
            sockets,
            tunnels,
            trust_domain: config.trust_domain.clone(),
            mark: config.socket_mark,
            client_mark: config.client_address.mark,
            outbound_port: config.ports.outbound,
            connect_timeout: config.connect_timeout(),
            tracker: ConnTracker::default(),
            limits: Arc::new(crate::limits::Limits::new(
                config.limits.max_connections_per_pod,
                config.limits.max_connections,
            )),
            shutdown: shutdown.clone(),
            handed_over: CancellationToken::new(),
        });

        let pod_sysctls = if config.pod_tcp_tw_reuse {
            vec![crate::netns::TCP_TW_REUSE]
        } else {
            Vec::new()
        };
        let pods = Arc::new(
            PodManager::new(
                proxy.clone(),
                &config.state_dir,
                config.ports.outbound,
                config.ports.inbound,
            )
            .with_pod_sysctls(pod_sysctls)
            .with_client_address(&config.client_address),
        );
        if predecessor.is_some() {
            // Listeners made from here on share the pods' connections with the
            // predecessor's at once: know the cluster before serving any.
            info!("hand-over: waiting for the first discovery sync");
            ready.discovery_synced_wait().await;
        }
        let dequeued = pods.drain_cni_queue(&config.cni_queue_dir).await;
        if dequeued > 0 {
            info!(dequeued, "queued CNI unregisters delivered");
        }
        let restored = pods.restore().await;
        if restored > 0 {
            info!(
                restored,
                "pod registrations restored from {}",
                config.state_dir.display()
            );
        }
        // Peers' streams are served only now that every local pod is known
        // again. A pod restored early may already have dialled a peer, and
        // that peer sends its own streams for this node on the new tunnel
        // (it is the preferred one when this node's name sorts lower); served
        // earlier, a stream for a pod not yet restored would be refused as
        // not meshed here. Until now those streams, and incoming tunnels,
        // wait in quinn's queues.
        tokio::spawn(inbound::serve_tunnels(proxy.clone()));
        let cni = CniServer::new(pods.clone(), ready.clone(), shutdown.clone());
        let (cni_listener, cni_file) = cni_server::bind(&config.cni_socket).map_err(io_err(
            format!("binding the CNI socket {}", config.cni_socket.display()),
        ))?;
        cni.start(cni_listener, cni_file).await;
        if let Some(link) = predecessor.as_mut() {
            // The path is ours now; registrations the predecessor took until
            // it stopped are in state_dir.
            let pid = link.pid;
            match link.stop_cni().await {
                Ok(()) => {
                    let (registered, forgotten) = pods.resync().await;
                    info!(
                        registered,
                        forgotten,
                        "hand-over: predecessor stopped serving CNI; registrations re-read"
                    );
                }
                Err(e) => predecessor = lost(pid, &e),
            }
        }
        ready.mark_cni();

        if predecessor.is_some() {
            // The admin listener is bound only once ready: every probe that
            // reaches it from now on may see this daemon as it will serve.
            wait_ready(&ready).await;
        }
        let admin_listener = admin::bind(config.admin_addr).map_err(io_err(format!(
            "binding the admin server on {}",
            config.admin_addr
        )))?;
        let admin_addr = admin_listener
            .local_addr()
            .map_err(io_err("admin address"))?;
        let admin_hand_off = CancellationToken::new();
        let admin_task = tokio::spawn(admin::serve(
            admin_listener,
            AdminState {
                metrics: metrics.clone(),
                ready: ready.clone(),
                registry,
                tunnels: proxy.tunnels.clone(),
                handover: status.clone(),
                limits: proxy.limits.clone(),
            },
            stopped.clone(),
            admin_hand_off.clone(),
        ));
        tokio::spawn({
            let stopped = stopped.clone();
            async move {
                loop {
                    tokio::select! {
                        _ = stopped.cancelled() => return,
                        _ = tokio::time::sleep(Duration::from_secs(5)) => metrics.run_upkeep(),
                    }
                }
            }
        });
        let node = Arc::new(Node {
            ready: ready.clone(),
            proxy: proxy.clone(),
            pods,
            cni,
            cni_socket: config.cni_socket.clone(),
            admin_hand_off,
            admin: tokio::sync::Mutex::new(Some(admin_task)),
        });

        // New tunnel connections come to this daemon from now on (it was
        // bound beside a predecessor; nothing to do otherwise).
        if let Err(e) = proxy.tunnels.steer_new_connections_here() {
            warn!(error = %e, "hand-over: cannot steer new tunnel connections here; the kernel spreads them");
        }
        if let Some(link) = predecessor.take() {
            let pid = link.pid;
            status.set(Phase::TakingOver, Some(pid));
            info!(predecessor.pid = pid, "hand-over: ready; taking over");
            match link.take_over().await {
                Ok(()) => {
                    handover::count_successor("ok");
                    info!(
                        predecessor.pid = pid,
                        "hand-over: complete; the predecessor drains its open connections"
                    );
                }
                Err(e) => {
                    lost(pid, &e);
                }
            }
        }
        status.set(Phase::Serving, None);
        // Ready for the next upgrade: the successor will find us here.
        let (handover_listener, handover_file) =
            handover::bind_replacing(&handover_path).map_err(io_err(format!(
                "binding the hand-over socket {}",
                handover_path.display()
            )))?;
        tokio::spawn(handover::serve(
            handover_listener,
            node.clone(),
            status,
            stopped.clone(),
        ));

        info!(
            node = %config.node_name,
            tunnel = %tunnel_addr,
            admin = %admin_addr,
            cni_socket = %config.cni_socket.display(),
            "nodemesh serving"
        );
        Ok(Self {
            shutdown,
            admin_addr,
            tunnel_addr,
            proxy,
            ready,
            drain_timeout: config.drain_timeout(),
            stopped,
            node,
            handover_file,
        })
    }

    /// Stops accepting, drains open connections up to the deadline, closes tunnels.
    pub async fn stop(self) {
        self.ready.mark_draining();
        self.shutdown.cancel();
        let active = self.proxy.tracker.active();
        info!(active, deadline = ?self.drain_timeout, "draining connections");
        if tokio::time::timeout(self.drain_timeout, self.proxy.tracker.drained())
            .await
            .is_err()
        {
            warn!(
                remaining = self.proxy.tracker.active(),
                "drain deadline passed; closing remaining connections"
            );
        }
        let endpoint = self.proxy.tunnels.endpoint();
        endpoint.close(quinn::VarInt::from_u32(0), b"shutdown");
        let _ = tokio::time::timeout(Duration::from_secs(1), endpoint.wait_idle()).await;
        // Only our own socket files: a successor's renamed over them stay.
        self.node.cni.remove_socket_file().await;
        self.handover_file.remove_if_still_ours();
        self.stopped.cancel();
        info!("nodemesh stopped");
    }
}

/// The predecessor went away mid-hand-over (or broke the protocol): serve
/// alone. Its sockets, if it still runs, are closed when it exits.
fn lost(pid: u32, e: &handover::proto::ProtoError) -> Option<PredecessorLink> {
    warn!(
        predecessor.pid = pid,
        error = %e,
        "hand-over: predecessor lost; serving alone"
    );
    handover::count_successor("predecessor_lost");
    None
}

/// Waits until nothing keeps the daemon from being ready, logging what it
/// waits for now and then.
async fn wait_ready(ready: &Readiness) {
    let mut logged = tokio::time::Instant::now();
    loop {
        let reasons = ready.not_ready_reasons();
        if reasons.is_empty() {
            return;
        }
        if logged.elapsed() >= Duration::from_secs(10) {
            info!(waiting_for = ?reasons, "hand-over: not ready to take over yet");
            logged = tokio::time::Instant::now();
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Runs the daemon until SIGTERM or SIGINT, then drains and returns. A
/// signal during the start (a successor may wait long to be ready) ends it
/// at once; a predecessor it was talking to then serves on.
pub async fn run(config: Config, metrics: PrometheusHandle) -> Result<(), StartError> {
    let mut signals = Signals::install().map_err(io_err("installing signal handlers"))?;
    let daemon = tokio::select! {
        d = Daemon::start(config, metrics) => d?,
        () = signals.recv() => {
            info!("stopping before the start completed");
            return Ok(());
        }
    };
    signals.recv().await;
    daemon.stop().await;
    Ok(())
}

struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
}

impl Signals {
    fn install() -> std::io::Result<Self> {
        use tokio::signal::unix::{signal, SignalKind};
        Ok(Self {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
        })
    }

    async fn recv(&mut self) {
        tokio::select! {
            _ = self.term.recv() => info!("SIGTERM received"),
            _ = self.int.recv() => info!("SIGINT received"),
        }
    }
}
