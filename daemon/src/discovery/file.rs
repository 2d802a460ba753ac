//! The `file` discovery source: a YAML [`ClusterModel`], reloaded on change.
//!
//! Owns reading, parsing and validating the file, and the poll loop that
//! applies a changed file to the registry. A file that does not parse or
//! validate is refused whole: the registry keeps the last good model, the
//! error is logged with the file and location, and counted
//! (`nodemesh_discovery_reloads_total{result="error"}`). Polling (rather than
//! inotify) also follows Kubernetes ConfigMap updates, which swap symlinks.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::model::{ClusterModel, ModelError};
use crate::admin::Readiness;
use crate::metrics as m;
use crate::registry::Registry;

/// Why a discovery file was refused.
#[derive(Debug, thiserror::Error)]
pub enum DiscoveryError {
    /// The file could not be read.
    #[error("cannot read discovery file {path}: {source}")]
    Unreadable {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// Not YAML of the model's shape.
    #[error("discovery file {path}: {message}")]
    Malformed {
        /// The file.
        path: PathBuf,
        /// Parser message with location.
        message: String,
    },
    /// Parsed but inconsistent.
    #[error("discovery file {path}: {source}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong (boxed: policy errors carry several strings).
        source: Box<ModelError>,
    },
}

/// Parses and validates discovery YAML; `path` is for messages.
pub fn parse(text: &str, path: &Path) -> Result<ClusterModel, DiscoveryError> {
    let model: ClusterModel = if text.trim().is_empty() {
        ClusterModel::default()
    } else {
        serde_yaml::from_str(text).map_err(|e| DiscoveryError::Malformed {
            path: path.to_owned(),
            message: e.to_string(),
        })?
    };
    model.validate().map_err(|source| DiscoveryError::Invalid {
        path: path.to_owned(),
        source: Box::new(source),
    })?;
    Ok(model)
}

/// Reads, parses and validates the file.
pub fn load(path: &Path) -> Result<ClusterModel, DiscoveryError> {
    let text = std::fs::read_to_string(path).map_err(|source| DiscoveryError::Unreadable {
        path: path.to_owned(),
        source,
    })?;
    parse(&text, path)
}

/// Applies the file whenever its content changes, every `interval`, until
/// `shutdown`. `last` is the content already applied (by a first
/// [`poll_once`] at start-up). Marks discovery synced in `ready` after the
/// first good load.
pub async fn watch(
    path: PathBuf,
    interval: Duration,
    mut last: Option<String>,
    registry: Arc<Registry>,
    ready: Arc<Readiness>,
    shutdown: CancellationToken,
) {
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(interval) => {}
        }
        poll_once(&path, &mut last, &registry, &ready);
    }
}

/// One poll: applies the file if its content differs from `last`.
pub fn poll_once(path: &Path, last: &mut Option<String>, registry: &Registry, ready: &Readiness) {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(source) => {
            if last.is_some() || !ready.discovery_synced() {
                let e = DiscoveryError::Unreadable {
                    path: path.to_owned(),
                    source,
                };
                warn!(error = %e, "discovery file unreadable; keeping the last good model");
                metrics::counter!(m::DISCOVERY_RELOADS, "source" => "file", "result" => "error")
                    .increment(1);
                ready.set_discovery_error(Some(e.to_string()));
                *last = None;
            }
            return;
        }
    };
    if last.as_deref() == Some(text.as_str()) {
        return;
    }
    match parse(&text, path) {
        Ok(model) => {
            let revoked = registry.apply(&model);
            info!(
                path = %path.display(),
                nodes = model.nodes.len(),
                pods = model.pods.len(),
                namespaces = model.namespaces.len(),
                policies = model.policies.len(),
                revoked,
                "discovery file applied"
            );
            metrics::counter!(m::DISCOVERY_RELOADS, "source" => "file", "result" => "ok")
                .increment(1);
            ready.set_discovery_error(None);
            ready.mark_discovery_synced();
        }
        Err(e) => {
            warn!(error = %e, "discovery file refused; keeping the last good model");
            metrics::counter!(m::DISCOVERY_RELOADS, "source" => "file", "result" => "error")
                .increment(1);
            ready.set_discovery_error(Some(e.to_string()));
        }
    }
    *last = Some(text);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn good_then_bad_then_good() {
        let dir = tempfile::tempdir().expect("tmp");
        let path = dir.path().join("d.yaml");
        let reg = Registry::new("n1", 15008);
        let ready = Readiness::default();
        let mut last = None;
        std::fs::write(
            &path,
            "nodes: [{name: n1, address: 10.0.0.1}, {name: n2, address: 10.0.0.2}]\n",
        )
        .expect("write");
        poll_once(&path, &mut last, &reg, &ready);
        assert!(ready.discovery_synced());
        assert_eq!(reg.snapshot().counts().0, 2);
        let gen = reg.snapshot().generation;

        // Unchanged content: not re-applied.
        poll_once(&path, &mut last, &reg, &ready);
        assert_eq!(reg.snapshot().generation, gen);

        // A broken file is refused whole; the last good model stays.
        std::fs::write(&path, "nodes: [{name: n1, address: nope}]\n").expect("write");
        poll_once(&path, &mut last, &reg, &ready);
        assert_eq!(reg.snapshot().counts().0, 2);
        assert!(
            ready
                .not_ready_reasons()
                .iter()
                .all(|r| !r.contains("discovery")),
            "a later bad file must not unready a synced daemon"
        );

        std::fs::write(&path, "nodes: [{name: n1, address: 10.0.0.1}]\n").expect("write");
        poll_once(&path, &mut last, &reg, &ready);
        assert_eq!(reg.snapshot().counts().0, 1);
    }

    #[test]
    fn a_bad_traffic_split_refuses_the_file_whole() {
        const GOOD: &str = r#"
nodes: [{name: n1, address: 10.0.0.1}]
pods:
  - {namespace: shop, name: web-1, node: n1, ips: [10.78.1.2], labels: {track: stable}}
  - {namespace: shop, name: web-2, node: n1, ips: [10.78.1.3], labels: {track: canary}}
services:
  - namespace: shop
    name: web
    cluster_ips: [10.96.0.10]
    ports: [{port: 80, target_port: 8080}]
    split: {label: track, weights: {stable: 90, canary: 10}}
    endpoints:
      - {ip: 10.78.1.2, target_ref: web-1}
      - {ip: 10.78.1.3, target_ref: web-2}
"#;
        let dir = tempfile::tempdir().expect("tmp");
        let path = dir.path().join("d.yaml");
        let reg = Registry::new("n1", 15008);
        let ready = Readiness::default();
        let mut last = None;
        std::fs::write(&path, GOOD).expect("write");
        poll_once(&path, &mut last, &reg, &ready);
        let vip = "10.96.0.10:80".parse().expect("addr");
        let groups = |reg: &Registry| {
            let t = reg.services().lookup(vip).expect("service");
            t.backends
                .iter()
                .map(|b| b.group.clone().unwrap_or_default())
                .collect::<Vec<_>>()
        };
        assert_eq!(groups(&reg), ["stable", "canary"]);
        let gen = reg.snapshot().generation;

        // All weights zero: refused whole, the last good model (and split) stays.
        let bad = GOOD.replace("stable: 90, canary: 10", "stable: 0, canary: 0");
        std::fs::write(&path, &bad).expect("write");
        poll_once(&path, &mut last, &reg, &ready);
        assert_eq!(reg.snapshot().generation, gen);
        assert_eq!(groups(&reg), ["stable", "canary"]);
        let e = parse(&bad, &path).expect_err("refused");
        assert!(
            e.to_string()
                .contains("services[0] (shop/web).split: every weight is 0"),
            "{e}"
        );
    }

    #[test]
    fn errors_name_file_and_problem() {
        let p = Path::new("/etc/nodemesh/discovery.yaml");
        let e = parse(
            "pods: [{namespace: a, name: b, node: x, ips: [10.0.0.1]}]",
            p,
        )
        .expect_err("invalid");
        let msg = e.to_string();
        assert!(
            msg.contains("/etc/nodemesh/discovery.yaml") && msg.contains("node \"x\""),
            "{msg}"
        );
        let e = parse("nodes: {", p).expect_err("malformed");
        assert!(matches!(e, DiscoveryError::Malformed { .. }), "{e}");
    }
}
