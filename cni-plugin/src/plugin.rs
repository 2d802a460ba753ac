//! The CNI commands: ADD, DEL, CHECK, VERSION, GC, STATUS. Pure decision
//! logic over [`NetnsOps`], [`DaemonClient`] and the [`StateDir`]; `main`
//! only gathers the environment and stdin and prints the outcome.

use std::path::Path;

use serde_json::Value;
use tracing::{info, warn};

use crate::config::{
    peek_version, prev_ips, version_at_least, CniEnv, Command, NetConf, CURRENT_VERSION,
    SUPPORTED_VERSIONS,
};
use crate::error::{code, CniError};
use crate::os::{DaemonClient, DaemonError, NetnsError, NetnsKind, NetnsOps};
use crate::proto::{ErrorCode, PodRegistration, Request, Response};
use crate::rules::{apply_script, compare_listing, host_net, CaptureSpec, DELETE_SCRIPT};
use crate::state::{Attachment, Capture, StateDir, StateError};

/// The OS edges a command runs against.
#[derive(Clone, Copy)]
pub struct Edges<'a> {
    /// Netns inspection and nft.
    pub netns: &'a dyn NetnsOps,
    /// The daemon's socket.
    pub daemon: &'a dyn DaemonClient,
}

impl std::fmt::Debug for Edges<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Edges")
    }
}

/// Runs one CNI command. `Ok(Some(json))` is printed on stdout, `Ok(None)`
/// prints nothing; `Err` is printed as CNI error JSON with a non-zero exit.
pub fn run(env: &CniEnv, stdin: &[u8], edges: Edges<'_>) -> Result<Option<String>, CniError> {
    if env.command == Command::Version {
        return Ok(Some(version_json()));
    }
    let conf = NetConf::parse(stdin)?;
    let v = conf.cni_version.clone();
    let need = |min: &str, what: &str| {
        if version_at_least(&v, min) {
            Ok(())
        } else {
            Err(CniError::new(
                code::INCOMPATIBLE_VERSION,
                format!("config version {v} does not allow {what}"),
                format!("{what} needs cniVersion {min} or later"),
            ))
        }
    };
    let result = match env.command {
        Command::Add => add(env, &conf, edges),
        Command::Del => del(env, &conf, edges).map(|()| None),
        Command::Check => {
            need("0.4.0", "CHECK").and_then(|()| check(env, &conf, edges).map(|()| None))
        }
        Command::Gc => need("1.1.0", "GC").and_then(|()| gc(&conf, edges).map(|()| None)),
        Command::Status => {
            need("1.1.0", "STATUS").and_then(|()| status(&conf, edges).map(|()| None))
        }
        Command::Version => Ok(Some(version_json())),
    };
    result.map_err(|e| e.at_version(&v))
}

/// The version to report an error at when the config could not be parsed.
pub fn error_version(stdin: &[u8]) -> String {
    peek_version(stdin).unwrap_or_else(|| CURRENT_VERSION.to_owned())
}

/// The VERSION answer.
pub fn version_json() -> String {
    serde_json::json!({
        "cniVersion": CURRENT_VERSION,
        "supportedVersions": SUPPORTED_VERSIONS,
    })
    .to_string()
}

/// `prevResult` unchanged except for `cniVersion`, set to the request's.
fn pass_through(prev: &Value, version: &str) -> Result<Option<String>, CniError> {
    let mut out = prev.clone();
    if let Some(obj) = out.as_object_mut() {
        obj.insert("cniVersion".into(), Value::String(version.to_owned()));
    }
    serde_json::to_string(&out)
        .map(Some)
        .map_err(|e| CniError::new(code::IO, "cannot encode result", e.to_string()))
}

const DAEMON_HINT: &str = "check that the nodemesh daemon is running on this node \
     (kubectl -n nodemesh get pods -o wide), that daemon_socket points at its registration socket, \
     and the daemon's logs; the pod is not started unmeshed";

fn daemon_unreachable(e: &DaemonError) -> CniError {
    CniError::new(
        code::TRY_AGAIN_LATER,
        format!("nodemesh daemon unreachable: {e}"),
        DAEMON_HINT,
    )
}

fn daemon_refused(what: &str, code_: ErrorCode, message: &str) -> CniError {
    let c = if code_ == ErrorCode::Unavailable {
        code::TRY_AGAIN_LATER
    } else {
        code::DAEMON_REFUSED
    };
    // The hint depends on why: a bad request is the runtime's input, not the daemon.
    let hint = match code_ {
        ErrorCode::BadRequest => {
            "the registration was malformed: check that the runtime passes K8S_POD_NAMESPACE and \
             K8S_POD_NAME in CNI_ARGS (the kubelet does; podman passes only K8S_POD_NAME unless \
             CNI_ARGS is set in its environment) and that prevResult has the pod's IPs; the pod is \
             not started unmeshed"
        }
        ErrorCode::Netns => {
            "the daemon could not open the pod's network namespace: check that CNI_NETNS is visible \
             to the daemon (its /run/netns or /proc mount, HostToContainer propagation)"
        }
        ErrorCode::Listen => {
            "the daemon could not listen inside the pod: check that the pod's loopback is up \
             (the runtime's loopback plugin) and that nothing else uses the capture ports"
        }
        _ => DAEMON_HINT,
    };
    CniError::new(
        c,
        format!("nodemesh daemon refused {what}: {code_:?}: {message}"),
        hint,
    )
}

fn unexpected(what: &str, r: &Response) -> CniError {
    CniError::new(
        code::DAEMON_REFUSED,
        format!("unexpected answer from the nodemesh daemon to {what}: {r:?}"),
        "the plugin and the daemon may be different versions; check both images",
    )
}

fn state_err(e: &StateError) -> CniError {
    CniError::new(
        code::STATE,
        format!("nodemesh-cni state: {e}"),
        "check that state_dir exists, is writable by the runtime and the disk is not full",
    )
}

fn nft_err(e: &NetnsError) -> CniError {
    let c = match e {
        NetnsError::Inspect { .. } | NetnsError::Enter { .. } | NetnsError::Restore(_) => {
            code::NETNS
        }
        NetnsError::Spawn { .. } | NetnsError::Nft { .. } => code::NFT,
    };
    CniError::new(
        c,
        format!("capture rules: {e}"),
        "check that nft is installed on the node and the kernel has nf_tables, nft_redirect, nft_fib",
    )
}

fn namespace(env: &CniEnv) -> String {
    env.args.pod_namespace.clone().unwrap_or_default()
}

fn excluded(env: &CniEnv, conf: &NetConf) -> bool {
    let ns = namespace(env);
    conf.plugin.excluded_namespaces.contains(&ns)
}

fn spec_for(conf: &NetConf, capture: Capture, gateways: &[std::net::IpAddr]) -> CaptureSpec {
    let p = &conf.plugin;
    let mut probe_sources: Vec<_> = gateways.iter().copied().map(host_net).collect();
    probe_sources.extend(p.probe_source_cidrs.iter().copied());
    CaptureSpec {
        outbound_port: capture.outbound_port,
        inbound_port: capture.inbound_port,
        mark: capture.mark,
        exclude_outbound_ports: p.exclude_outbound_ports.clone(),
        exclude_outbound_cidrs: p.exclude_outbound_cidrs.clone(),
        exclude_inbound_ports: p.exclude_inbound_ports.clone(),
        probe_sources,
    }
}

fn netns_path(env: &CniEnv) -> Result<&Path, CniError> {
    env.netns.as_deref().ok_or_else(|| {
        CniError::new(
            code::INVALID_ENV,
            "required environment variable CNI_NETNS missing",
            "CNI_NETNS must be set for this command",
        )
    })
}

fn add(env: &CniEnv, conf: &NetConf, edges: Edges<'_>) -> Result<Option<String>, CniError> {
    let prev = conf.prev_result.as_ref().ok_or_else(|| {
        CniError::new(
            code::INVALID_CONFIG,
            "prevResult missing",
            "nodemesh-cni is a chained plugin: list it after the primary CNI plugin in the conflist",
        )
    })?;
    let cid = env.container_id.as_str();
    let netns = netns_path(env)?;
    let ns = namespace(env);
    if excluded(env, conf) {
        info!(container.id = cid, pod.namespace = %ns, "namespace excluded: pod passed through unmeshed");
        return pass_through(prev, &conf.cni_version);
    }
    match edges.netns.classify(netns).map_err(|e| nft_err(&e))? {
        NetnsKind::Host => {
            info!(container.id = cid, netns = %netns.display(), "host-network pod: passed through unmeshed");
            return pass_through(prev, &conf.cni_version);
        }
        NetnsKind::Missing => {
            return Err(CniError::new(
                code::NETNS,
                format!("netns {} does not exist", netns.display()),
                "the runtime passed a CNI_NETNS that is not a network namespace",
            ))
        }
        NetnsKind::Pod => {}
    }
    let ips = prev_ips(prev)?;
    let state = StateDir::new(&conf.plugin.state_dir);
    // A stale queued unregister for this ID must not undo the new pod.
    state.dequeue(cid).map_err(|e| state_err(&e))?;
    let socket = &conf.plugin.daemon_socket;
    let req = Request::Register(PodRegistration {
        container_id: cid.to_owned(),
        pod_uid: env.args.pod_uid.clone(),
        namespace: ns.clone(),
        name: env.args.pod_name.clone().unwrap_or_default(),
        service_account: None,
        netns: netns.to_owned(),
        ips: ips.addresses.clone(),
    });
    let mut record = Attachment {
        container_id: cid.to_owned(),
        ifname: env.ifname.clone(),
        network: conf.name.clone(),
        netns: netns.to_owned(),
        capture: None,
    };
    let capture = match edges.daemon.call(socket, &req, conf.plugin.timeout) {
        Err(e) => {
            warn!(container.id = cid, error = %e, "daemon unreachable: failing ADD closed");
            return Err(daemon_unreachable(&e));
        }
        Ok(Response::Skipped { reason }) => {
            info!(container.id = cid, pod.namespace = %ns, %reason, "daemon skipped pod: passed through unmeshed");
            state.save_attachment(&record).map_err(|e| state_err(&e))?;
            return pass_through(prev, &conf.cni_version);
        }
        Ok(Response::Registered {
            outbound_port,
            inbound_port,
            mark,
        }) => Capture {
            outbound_port,
            inbound_port,
            mark,
        },
        Ok(Response::Error { code, message }) => {
            return Err(daemon_refused("the pod", code, &message))
        }
        Ok(other) => return Err(unexpected("register", &other)),
    };
    let spec = spec_for(conf, capture, &ips.gateways);
    record.capture = Some(capture);
    let installed = edges
        .netns
        .nft_apply(netns, &apply_script(&spec))
        .map_err(|e| nft_err(&e))
        .and_then(|()| state.save_attachment(&record).map_err(|e| state_err(&e)));
    if let Err(err) = installed {
        warn!(container.id = cid, error = %err.msg, "capture failed after register: rolling back");
        if let Err(e) = edges.netns.nft_apply(netns, DELETE_SCRIPT) {
            warn!(container.id = cid, error = %e, "rollback: removing the table failed");
        }
        let unreg = Request::Unregister {
            container_id: cid.to_owned(),
        };
        if let Err(e) = edges.daemon.call(socket, &unreg, conf.plugin.timeout) {
            warn!(container.id = cid, error = %e, "rollback: unregister failed; queued");
            if let Err(e) = state.queue_unregister(cid) {
                warn!(container.id = cid, error = %e, "rollback: queueing the unregister failed");
            }
        }
        return Err(err);
    }
    info!(
        container.id = cid,
        pod.namespace = %ns,
        outbound_port = capture.outbound_port,
        inbound_port = capture.inbound_port,
        mark = capture.mark,
        "pod meshed"
    );
    pass_through(prev, &conf.cni_version)
}

fn del(env: &CniEnv, conf: &NetConf, edges: Edges<'_>) -> Result<(), CniError> {
    let cid = env.container_id.as_str();
    let state = StateDir::new(&conf.plugin.state_dir);
    let record = state.attachment(cid);
    if let Some(netns) = env.netns.as_deref() {
        match edges.netns.classify(netns) {
            Ok(NetnsKind::Pod) => match edges.netns.nft_apply(netns, DELETE_SCRIPT) {
                Ok(()) => {}
                // The namespace vanished between the check and the setns.
                Err(e @ NetnsError::Enter { .. }) => {
                    info!(container.id = cid, error = %e, "netns gone: nothing to remove");
                }
                // Without nft no ADD could have installed rules: nothing to remove.
                Err(NetnsError::Spawn { ref source, .. })
                    if source.kind() == std::io::ErrorKind::NotFound =>
                {
                    warn!(
                        container.id = cid,
                        "nft not found: no capture rules can exist"
                    );
                }
                Err(e) => return Err(nft_err(&e)),
            },
            Ok(NetnsKind::Host) => {}
            Ok(NetnsKind::Missing) => {
                info!(container.id = cid, netns = %netns.display(), "netns gone: no rules to remove")
            }
            Err(e) => {
                warn!(container.id = cid, error = %e, "cannot inspect netns: assuming it is gone")
            }
        }
    }
    let registered = match &record {
        Some(r) => r.capture.is_some(),
        None => !excluded(env, conf),
    };
    if registered {
        let req = Request::Unregister {
            container_id: cid.to_owned(),
        };
        match edges
            .daemon
            .call(&conf.plugin.daemon_socket, &req, conf.plugin.timeout)
        {
            Ok(Response::Unregistered) => {
                state.dequeue(cid).map_err(|e| state_err(&e))?;
            }
            outcome => {
                let why = match outcome {
                    Err(e) => e.to_string(),
                    Ok(r) => format!("{r:?}"),
                };
                let path = state.queue_unregister(cid).map_err(|e| state_err(&e))?;
                warn!(container.id = cid, %why, queue = %path.display(), "daemon did not take the unregister: queued");
            }
        }
    }
    state.remove_attachment(cid).map_err(|e| state_err(&e))?;
    Ok(())
}

fn check(env: &CniEnv, conf: &NetConf, edges: Edges<'_>) -> Result<(), CniError> {
    let prev = conf.prev_result.as_ref().ok_or_else(|| {
        CniError::new(
            code::INVALID_CONFIG,
            "prevResult missing",
            "CHECK needs the prevResult of the chain",
        )
    })?;
    let cid = env.container_id.as_str();
    let netns = netns_path(env)?;
    if excluded(env, conf) {
        return Ok(());
    }
    match edges.netns.classify(netns).map_err(|e| nft_err(&e))? {
        NetnsKind::Host => return Ok(()),
        NetnsKind::Missing => {
            return Err(CniError::new(
                code::NETNS,
                format!("netns {} does not exist", netns.display()),
                "the pod's network namespace is gone",
            ))
        }
        NetnsKind::Pod => {}
    }
    let state = StateDir::new(&conf.plugin.state_dir);
    if state.attachment(cid).is_some_and(|r| r.capture.is_none()) {
        return Ok(()); // The daemon skipped this pod at ADD.
    }
    let ips = prev_ips(prev)?;
    let req = Request::Check {
        container_id: cid.to_owned(),
    };
    let capture = match edges
        .daemon
        .call(&conf.plugin.daemon_socket, &req, conf.plugin.timeout)
    {
        Err(e) => return Err(daemon_unreachable(&e)),
        Ok(Response::Registered {
            outbound_port,
            inbound_port,
            mark,
        }) => Capture {
            outbound_port,
            inbound_port,
            mark,
        },
        Ok(Response::Error {
            code: ErrorCode::NotRegistered,
            message,
        }) => {
            return Err(CniError::new(
                code::NOT_REGISTERED,
                format!("the nodemesh daemon does not know container {cid}: {message}"),
                "the pod's listeners are gone; recreate the pod or check the daemon's logs",
            ))
        }
        Ok(Response::Error { code, message }) => {
            return Err(daemon_refused("the check", code, &message))
        }
        Ok(other) => return Err(unexpected("check", &other)),
    };
    let spec = spec_for(conf, capture, &ips.gateways);
    let listing = edges.netns.list_table(netns).map_err(|e| nft_err(&e))?;
    let Some(listing) = listing else {
        return Err(CniError::new(
            code::RULES_MISMATCH,
            format!(
                "nftables table inet nodemesh missing in {}",
                netns.display()
            ),
            "the pod's traffic is not captured; recreate the pod",
        ));
    };
    compare_listing(&spec, &listing).map_err(|e| {
        CniError::new(
            code::RULES_MISMATCH,
            format!(
                "nftables table inet nodemesh in {} differs: {e}",
                netns.display()
            ),
            "something else changed the capture rules; recreate the pod",
        )
    })
}

fn gc(conf: &NetConf, edges: Edges<'_>) -> Result<(), CniError> {
    let valid = conf.valid_attachments.as_ref().ok_or_else(|| {
        CniError::new(
            code::INVALID_CONFIG,
            "cni.dev/valid-attachments missing",
            "GC needs the list of valid attachments",
        )
    })?;
    let state = StateDir::new(&conf.plugin.state_dir);
    let socket = &conf.plugin.daemon_socket;
    let unregister = |cid: &str| {
        let req = Request::Unregister {
            container_id: cid.to_owned(),
        };
        matches!(
            edges.daemon.call(socket, &req, conf.plugin.timeout),
            Ok(Response::Unregistered)
        )
    };
    for cid in state.attachments().map_err(|e| state_err(&e))? {
        let Some(rec) = state.attachment(&cid) else {
            // Unreadable record: nothing to compare; forget it.
            state.remove_attachment(&cid).map_err(|e| state_err(&e))?;
            continue;
        };
        if rec.network != conf.name {
            continue;
        }
        let live = valid.iter().any(|v| {
            v.container_id == rec.container_id && (v.ifname.is_empty() || v.ifname == rec.ifname)
        });
        if live {
            continue;
        }
        info!(container.id = %cid, "GC: attachment not valid any more");
        if rec.capture.is_some() && !unregister(&cid) {
            state.queue_unregister(&cid).map_err(|e| state_err(&e))?;
        }
        state.remove_attachment(&cid).map_err(|e| state_err(&e))?;
    }
    for cid in state.queued().map_err(|e| state_err(&e))? {
        if valid.iter().any(|v| v.container_id == cid) {
            continue;
        }
        if unregister(&cid) {
            info!(container.id = %cid, "GC: queued unregister delivered");
            state.dequeue(&cid).map_err(|e| state_err(&e))?;
        }
    }
    Ok(())
}

fn status(conf: &NetConf, edges: Edges<'_>) -> Result<(), CniError> {
    let not_ready = |why: String| CniError::new(code::NOT_AVAILABLE, why, DAEMON_HINT);
    match edges.daemon.call(
        &conf.plugin.daemon_socket,
        &Request::Status,
        conf.plugin.timeout,
    ) {
        Ok(Response::Ready { ready: true, .. }) => Ok(()),
        Ok(Response::Ready {
            ready: false,
            reason,
        }) => Err(not_ready(format!(
            "nodemesh daemon not ready: {}",
            reason.as_deref().unwrap_or("no reason given")
        ))),
        Ok(other) => Err(not_ready(format!(
            "nodemesh daemon not ready: unexpected answer {other:?}"
        ))),
        Err(e) => Err(not_ready(format!("nodemesh daemon unreachable: {e}"))),
    }
}

#[cfg(test)]
mod tests;
