//! The daemon's lifecycle: start every component, run until a signal, drain.
//!
//! Owns the start order (credentials → registry and discovery → tunnel →
//! restored pods → CNI socket → admin → ready) and graceful shutdown: on
//! SIGTERM or SIGINT the daemon becomes not-ready, stops accepting (pod
//! listeners, CNI socket, new tunnel streams get `UNAVAILABLE`), waits for open
//! connections up to `drain_timeout_ms`, closes its tunnels and returns.
//! Registrations stay on disk, so a restarted daemon serves the same pods.
//!
//! An expired node certificate does not stop the start: the daemon serves,
//! reports itself not ready with the reason, and its peers refuse it until
//! valid files appear (the certificate reloader, `identity::reload`, installs
//! them). Unreadable or otherwise invalid files at start are fatal.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use metrics_exporter_prometheus::PrometheusHandle;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::admin::{self, AdminState, Readiness};
use crate::cni_server;
use crate::config::Config;
use crate::discovery;
use crate::identity::reload::{self, Reloader};
use crate::identity::{self, KnownNodes};
use crate::inbound;
use crate::netns::{NetnsWorker, SocketFactory};
use crate::pods::PodManager;
use crate::proxy::{ConnTracker, Proxy};
use crate::registry::Registry;
use crate::tunnel::Tunnels;

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
}

impl Daemon {
    /// Starts every component; returns once the daemon is serving.
    pub async fn start(config: Config, metrics: PrometheusHandle) -> Result<Self, StartError> {
        let ready = Arc::new(Readiness::default());
        let shutdown = CancellationToken::new();
        let stopped = CancellationToken::new();

        let (tls_files, creds) =
            reload::load_initial(&config.tls, &config.trust_domain, &config.node_name)?;
        info!(node = %creds.node, not_after = ?creds.not_after, "node credentials loaded");
        let registry = Arc::new(Registry::new(&config.node_name, config.ports.tunnel));

        if config.discovery.source == crate::config::DiscoverySource::Kubernetes {
            // Readiness waits for the first full list of every watched kind.
            tokio::spawn(discovery::kubernetes::run_inferred(
                registry.clone(),
                ready.clone(),
                shutdown.clone(),
            ));
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
            outbound_port: config.ports.outbound,
            connect_timeout: config.connect_timeout(),
            tracker: ConnTracker::default(),
            shutdown: shutdown.clone(),
        });
        tokio::spawn(inbound::serve_tunnels(proxy.clone()));

        let pods = Arc::new(PodManager::new(
            proxy.clone(),
            &config.state_dir,
            config.ports.outbound,
            config.ports.inbound,
        ));
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
        let cni = cni_server::bind(&config.cni_socket).map_err(io_err(format!(
            "binding the CNI socket {}",
            config.cni_socket.display()
        )))?;
        tokio::spawn(cni_server::serve(
            cni,
            pods,
            ready.clone(),
            shutdown.clone(),
        ));
        ready.mark_cni();

        let admin_listener = admin::bind(config.admin_addr)
            .await
            .map_err(io_err(format!(
                "binding the admin server on {}",
                config.admin_addr
            )))?;
        let admin_addr = admin_listener
            .local_addr()
            .map_err(io_err("admin address"))?;
        tokio::spawn(admin::serve(
            admin_listener,
            AdminState {
                metrics: metrics.clone(),
                ready: ready.clone(),
                registry,
                tunnels: proxy.tunnels.clone(),
            },
            stopped.clone(),
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
        self.stopped.cancel();
        info!("nodemesh stopped");
    }
}

/// Runs the daemon until SIGTERM or SIGINT, then drains and returns.
pub async fn run(config: Config, metrics: PrometheusHandle) -> Result<(), StartError> {
    let daemon = Daemon::start(config, metrics).await?;
    wait_for_signal()
        .await
        .map_err(io_err("installing signal handlers"))?;
    daemon.stop().await;
    Ok(())
}

async fn wait_for_signal() -> std::io::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    tokio::select! {
        _ = term.recv() => info!("SIGTERM received"),
        _ = int.recv() => info!("SIGINT received"),
    }
    Ok(())
}
