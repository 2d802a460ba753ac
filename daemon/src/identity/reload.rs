//! Certificate rotation and expiry while the daemon runs.
//!
//! Owns the [`Reloader`]: every `tls.reload_interval_ms` it re-reads the
//! three TLS files and compares their *content* with what it saw last
//! (Kubernetes Secret volumes swap a `..data` symlink, so inodes and mtimes
//! say nothing). Changed files that make valid, unexpired [`Credentials`] are
//! turned into new rustls configs and handed to a [`TlsInstaller`] (the tunnel
//! endpoint): new handshakes use them, open tunnels and the connections they
//! carry keep the configs they were made with. Files that cannot be used are
//! refused with one `warn!` naming the file and the fix, and the previous
//! credentials stay in use.
//!
//! It also owns the daemon's certificate health: the daemon is not ready
//! (`/ready` says why) while the certificate in use is expired, checked again
//! at every tick so that a certificate expiring while running is noticed, or
//! while the files on disk cannot be used. Metrics:
//! `nodemesh_cert_reloads_total{result="ok"|"error"}` (one count per change
//! of the files' content) and
//! `nodemesh_cert_expiry_timestamp_seconds{kind="node"|"bundle",subject}`.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::leaf::{parse_leaf, unix_secs};
use super::{
    bundle_cas, client_config, node_spiffe_id, server_config, Credentials, IdentityError,
    KnownNodes, TlsFiles,
};
use crate::admin::Readiness;
use crate::config::TlsConfig;

/// Counter: attempts to install changed TLS files; label `result` = `ok` | `error`.
pub const CERT_RELOADS_METRIC: &str = "nodemesh_cert_reloads_total";
/// Gauge: expiry (Unix seconds) of the certificates in use; labels `kind` =
/// `node` (subject = this node's SPIFFE id) or `bundle` (subject = the CA's
/// subject DN; the earliest expiry when several CAs share a subject).
pub const CERT_EXPIRY_METRIC: &str = "nodemesh_cert_expiry_timestamp_seconds";

/// Where new TLS configurations go: the tunnel endpoint.
pub trait TlsInstaller: Send + Sync + fmt::Debug {
    /// Uses `server` for new inbound handshakes and `client` for new
    /// outbound ones; open connections keep theirs. The error is a
    /// human-readable reason.
    fn install_tls(
        &self,
        server: rustls::ServerConfig,
        client: rustls::ClientConfig,
    ) -> Result<(), String>;
}

/// What one [`Reloader::check`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The files hold what was seen last time (or what is in use).
    Unchanged,
    /// New credentials were installed.
    Installed,
    /// The files changed but cannot be used; the reason, naming file and fix.
    Rejected(String),
}

/// What the files held at the last check.
#[derive(PartialEq, Eq)]
enum Seen {
    Files(TlsFiles),
    Unreadable(String),
}

/// Watches the TLS files and keeps the tunnel's credentials current.
pub struct Reloader {
    tls: TlsConfig,
    trust_domain: String,
    node: String,
    known: Arc<dyn KnownNodes>,
    installer: Arc<dyn TlsInstaller>,
    ready: Arc<Readiness>,
    current: Credentials,
    current_files: TlsFiles,
    bundle_expiry: BTreeMap<String, SystemTime>,
    seen: Seen,
    /// Why the files on disk are not the ones in use, if that is the case.
    rejected: Option<String>,
    expiry_logged: bool,
}

impl fmt::Debug for Reloader {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Reloader")
            .field("tls", &self.tls)
            .field("node", &self.node)
            .field("not_after", &self.current.not_after)
            .field("rejected", &self.rejected)
            .finish_non_exhaustive()
    }
}

/// Start-up load: the files once, accepting an expired leaf (the daemon then
/// runs not ready, and peers refuse it) but nothing else.
pub fn load_initial(
    tls: &TlsConfig,
    trust_domain: &str,
    node: &str,
) -> Result<(TlsFiles, Credentials), IdentityError> {
    let files = TlsFiles::read(tls)?;
    let creds = Credentials::from_files(tls, &files, trust_domain, node)?;
    Ok((files, creds))
}

/// The earliest expiry per CA subject of a bundle file's contents.
fn bundle_expiry(bundle_pem: &[u8]) -> BTreeMap<String, SystemTime> {
    let mut by_subject = BTreeMap::new();
    for ca in bundle_cas(bundle_pem) {
        by_subject
            .entry(ca.subject)
            .and_modify(|t: &mut SystemTime| *t = (*t).min(ca.not_after))
            .or_insert(ca.not_after);
    }
    by_subject
}

#[allow(clippy::cast_precision_loss)]
fn seconds(t: SystemTime) -> f64 {
    unix_secs(t) as f64
}

impl Reloader {
    /// A reloader whose credentials in use are `current`, built from `files`
    /// (as returned by [`load_initial`]). Call [`Reloader::report`] once to
    /// publish readiness and metrics before serving.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        tls: TlsConfig,
        trust_domain: &str,
        node: &str,
        known: Arc<dyn KnownNodes>,
        installer: Arc<dyn TlsInstaller>,
        ready: Arc<Readiness>,
        files: TlsFiles,
        current: Credentials,
    ) -> Self {
        Self {
            tls,
            trust_domain: trust_domain.to_owned(),
            node: node.to_owned(),
            known,
            installer,
            ready,
            bundle_expiry: bundle_expiry(&files.bundle),
            seen: Seen::Files(files.clone()),
            current_files: files,
            current,
            rejected: None,
            expiry_logged: false,
        }
    }

    /// The credentials in use.
    pub fn current(&self) -> &Credentials {
        &self.current
    }

    /// One tick: re-reads the files, installs them if they changed and are
    /// valid at `now`, then [`Reloader::report`]s.
    pub fn check(&mut self, now: SystemTime) -> Outcome {
        let read = TlsFiles::read(&self.tls);
        let seen = match &read {
            Ok(files) => Seen::Files(files.clone()),
            Err(e) => Seen::Unreadable(e.to_string()),
        };
        let outcome = if seen == self.seen {
            Outcome::Unchanged
        } else {
            self.seen = seen;
            match read {
                Ok(files) if files == self.current_files => {
                    if self.rejected.take().is_some() {
                        info!(cert = %self.tls.cert.display(), "TLS files are back to the certificate in use");
                    }
                    Outcome::Unchanged
                }
                Ok(files) => self.try_install(files, now),
                Err(e) => self.refused(&e),
            }
        };
        self.report(now);
        outcome
    }

    fn try_install(&mut self, files: TlsFiles, now: SystemTime) -> Outcome {
        let built = Credentials::from_files(&self.tls, &files, &self.trust_domain, &self.node)
            .and_then(|creds| {
                creds.check_not_expired(&self.tls.cert, now)?;
                let server = server_config(&creds, &self.trust_domain, self.known.clone())?;
                let client = client_config(&creds, &self.trust_domain)?;
                Ok((creds, server, client))
            })
            .and_then(|(creds, server, client)| {
                self.installer
                    .install_tls(server, client)
                    .map_err(|reason| IdentityError::TlsSetup {
                        what: "QUIC endpoint",
                        node: self.node.clone(),
                        reason,
                    })?;
                Ok(creds)
            });
        match built {
            Ok(creds) => {
                let serial = creds
                    .chain
                    .first()
                    .and_then(|der| parse_leaf(der).ok())
                    .map(|leaf| leaf.serial)
                    .unwrap_or_default();
                info!(
                    node = %self.node,
                    cert = %self.tls.cert.display(),
                    serial,
                    not_after = unix_secs(creds.not_after),
                    previous_not_after = unix_secs(self.current.not_after),
                    "node certificate reloaded; new tunnels use it, open tunnels keep theirs"
                );
                metrics::counter!(CERT_RELOADS_METRIC, "result" => "ok").increment(1);
                self.bundle_expiry = bundle_expiry(&files.bundle);
                self.current = creds;
                self.current_files = files;
                self.rejected = None;
                self.expiry_logged = false;
                Outcome::Installed
            }
            Err(e) => self.refused(&e),
        }
    }

    fn refused(&mut self, e: &IdentityError) -> Outcome {
        warn!(
            node = %self.node,
            error = %e,
            in_use_not_after = unix_secs(self.current.not_after),
            "changed TLS files refused; keeping the certificate in use"
        );
        metrics::counter!(CERT_RELOADS_METRIC, "result" => "error").increment(1);
        let reason = e.to_string();
        self.rejected = Some(reason.clone());
        Outcome::Rejected(reason)
    }

    /// Why the daemon's credentials make it unfit to serve at `now`, if
    /// they do: the certificate in use is expired, or the files on disk
    /// cannot be used.
    pub fn problem(&self, now: SystemTime) -> Option<String> {
        let mut problems = Vec::new();
        if let Err(e) = self.current.check_not_expired(&self.tls.cert, now) {
            problems.push(format!(
                "node certificate in use {e}; peers refuse this node"
            ));
        }
        if let Some(rejected) = &self.rejected {
            problems.push(format!(
                "TLS files cannot be used (still serving with the previous certificate, which expires at unix time {}): {rejected}",
                unix_secs(self.current.not_after)
            ));
        }
        (!problems.is_empty()).then(|| problems.join("; "))
    }

    /// Publishes readiness and the expiry gauges for `now`; logs the
    /// certificate in use becoming expired once.
    pub fn report(&mut self, now: SystemTime) {
        let expired = self.current.is_expired(now);
        if expired && !self.expiry_logged {
            warn!(
                node = %self.node,
                cert = %self.tls.cert.display(),
                not_after = unix_secs(self.current.not_after),
                fix = IdentityError::Expired { path: self.tls.cert.clone(), not_after: self.current.not_after }.fix(),
                "node certificate expired: not ready, peers refuse this node"
            );
        }
        self.expiry_logged = expired;
        self.ready.set_credentials_error(self.problem(now));
        metrics::gauge!(
            CERT_EXPIRY_METRIC,
            "kind" => "node",
            "subject" => node_spiffe_id(&self.trust_domain, &self.node)
        )
        .set(seconds(self.current.not_after));
        for (subject, not_after) in &self.bundle_expiry {
            metrics::gauge!(CERT_EXPIRY_METRIC, "kind" => "bundle", "subject" => subject.clone())
                .set(seconds(*not_after));
        }
    }
}

/// Runs [`Reloader::check`] every `interval` until `shutdown`.
pub async fn watch(mut reloader: Reloader, interval: Duration, shutdown: CancellationToken) {
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {
                reloader.check(SystemTime::now());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;
    use std::sync::Mutex;

    use super::super::certs::{generate_ca, issue_node, GeneratedCa};
    use super::*;

    const TD: &str = "cluster.local";
    const DAY: Duration = Duration::from_secs(24 * 3600);

    #[derive(Debug)]
    struct AllNodes;
    impl KnownNodes for AllNodes {
        fn is_known(&self, _: &str) -> bool {
            true
        }
    }

    /// Counts installs; fails them while `fail` is set.
    #[derive(Debug, Default)]
    struct Recorder {
        installs: Mutex<usize>,
        fail: Mutex<bool>,
    }

    impl TlsInstaller for Recorder {
        fn install_tls(
            &self,
            _: rustls::ServerConfig,
            _: rustls::ClientConfig,
        ) -> Result<(), String> {
            if *self.fail.lock().expect("lock") {
                return Err("endpoint refused".into());
            }
            *self.installs.lock().expect("lock") += 1;
            Ok(())
        }
    }

    impl Recorder {
        fn installs(&self) -> usize {
            *self.installs.lock().expect("lock")
        }
    }

    struct Fixture {
        dir: tempfile::TempDir,
        ca: GeneratedCa,
        installer: Arc<Recorder>,
        ready: Arc<Readiness>,
    }

    impl Fixture {
        /// Files for `n1` valid `days` days, backdated `backdate` days.
        fn new(days: u32, backdate: u32) -> Self {
            let f = Self {
                dir: tempfile::tempdir().expect("tempdir"),
                ca: generate_ca(TD, 30).expect("ca"),
                installer: Arc::new(Recorder::default()),
                ready: Arc::new(Readiness::default()),
            };
            f.write("ca.pem", f.ca.cert_pem.as_bytes());
            f.issue(days, backdate);
            f
        }

        fn path(&self, name: &str) -> PathBuf {
            self.dir.path().join(name)
        }

        fn write(&self, name: &str, contents: &[u8]) {
            std::fs::write(self.path(name), contents).expect("write");
        }

        fn issue(&self, days: u32, backdate: u32) {
            let (cert, key) = issue_node(&self.ca, TD, "n1", days, backdate).expect("issue");
            self.write("n1.pem", cert.as_bytes());
            self.write("n1-key.pem", key.as_bytes());
        }

        fn tls(&self) -> TlsConfig {
            TlsConfig {
                cert: self.path("n1.pem"),
                key: self.path("n1-key.pem"),
                bundle: self.path("ca.pem"),
                ..TlsConfig::default()
            }
        }

        fn reloader(&self) -> Reloader {
            let (files, creds) = load_initial(&self.tls(), TD, "n1").expect("initial load");
            let mut r = Reloader::new(
                self.tls(),
                TD,
                "n1",
                Arc::new(AllNodes),
                self.installer.clone(),
                self.ready.clone(),
                files,
                creds,
            );
            r.report(SystemTime::now());
            r
        }

        fn credentials_reason(&self) -> Option<String> {
            self.ready
                .not_ready_reasons()
                .into_iter()
                .find(|r| r.starts_with("credentials:"))
        }
    }

    #[test]
    fn unchanged_files_are_not_reinstalled() {
        let f = Fixture::new(30, 0);
        let mut r = f.reloader();
        assert_eq!(r.check(SystemTime::now()), Outcome::Unchanged);
        assert_eq!(r.check(SystemTime::now()), Outcome::Unchanged);
        assert_eq!(f.installer.installs(), 0);
        assert_eq!(f.credentials_reason(), None);
    }

    #[test]
    fn rotated_files_are_installed_and_same_content_is_not_a_change() {
        let f = Fixture::new(30, 0);
        let mut r = f.reloader();
        let before = r.current().not_after;
        f.issue(10, 0);
        assert_eq!(r.check(SystemTime::now()), Outcome::Installed);
        assert_eq!(f.installer.installs(), 1);
        assert!(r.current().not_after < before);
        // Rewriting the same bytes (a new inode) is not a change.
        let cert = std::fs::read(f.path("n1.pem")).expect("read");
        std::fs::remove_file(f.path("n1.pem")).expect("rm");
        f.write("n1.pem", &cert);
        assert_eq!(r.check(SystemTime::now()), Outcome::Unchanged);
        assert_eq!(f.installer.installs(), 1);
    }

    #[test]
    fn symlink_swap_as_in_a_secret_volume_is_followed() {
        let f = Fixture::new(30, 0);
        // ..data -> v1/, files are symlinks through ..data, as kubelet does.
        let v1 = f.path("v1");
        std::fs::create_dir(&v1).expect("mkdir");
        for name in ["n1.pem", "n1-key.pem", "ca.pem"] {
            std::fs::rename(f.path(name), v1.join(name)).expect("mv");
            std::os::unix::fs::symlink(format!("..data/{name}"), f.path(name)).expect("ln");
        }
        std::os::unix::fs::symlink("v1", f.path("..data")).expect("ln");
        let mut r = f.reloader();

        let v2 = f.path("v2");
        std::fs::create_dir(&v2).expect("mkdir");
        let (cert, key) = issue_node(&f.ca, TD, "n1", 7, 0).expect("issue");
        std::fs::write(v2.join("n1.pem"), cert).expect("write");
        std::fs::write(v2.join("n1-key.pem"), key).expect("write");
        std::fs::write(v2.join("ca.pem"), &f.ca.cert_pem).expect("write");
        std::os::unix::fs::symlink("v2", f.path("..data_tmp")).expect("ln");
        std::fs::rename(f.path("..data_tmp"), f.path("..data")).expect("swap");

        assert_eq!(r.check(SystemTime::now()), Outcome::Installed);
        assert!(r.current().not_after < SystemTime::now() + 8 * DAY);
    }

    #[test]
    fn invalid_files_keep_the_old_credentials_and_make_the_daemon_not_ready() {
        let f = Fixture::new(30, 0);
        let mut r = f.reloader();
        let before = r.current().not_after;
        // A key that belongs to another certificate, as in a half-done rotation.
        let (_, other_key) = issue_node(&f.ca, TD, "n1", 30, 0).expect("issue");
        f.write("n1-key.pem", other_key.as_bytes());
        match r.check(SystemTime::now()) {
            Outcome::Rejected(reason) => {
                assert!(reason.contains("n1-key.pem"), "{reason}");
                assert!(
                    reason.contains("use the key file written together"),
                    "{reason}"
                );
            }
            other => panic!("expected Rejected, got {other:?}"),
        }
        assert_eq!(f.installer.installs(), 0);
        assert_eq!(r.current().not_after, before);
        let reason = f.credentials_reason().expect("not ready");
        assert!(
            reason.contains("still serving with the previous"),
            "{reason}"
        );
        assert!(reason.contains("does not match"), "{reason}");
        // The same bad content is not retried (nor counted) every tick.
        assert!(matches!(r.check(SystemTime::now()), Outcome::Unchanged));
        // Completing the rotation installs it and clears the reason.
        f.issue(20, 0);
        assert_eq!(r.check(SystemTime::now()), Outcome::Installed);
        assert_eq!(f.credentials_reason(), None);
    }

    #[test]
    fn unreadable_files_name_the_file_and_recover_when_restored() {
        let f = Fixture::new(30, 0);
        let mut r = f.reloader();
        let cert = std::fs::read(f.path("n1.pem")).expect("read");
        std::fs::remove_file(f.path("n1.pem")).expect("rm");
        match r.check(SystemTime::now()) {
            Outcome::Rejected(reason) => assert!(reason.contains("cannot read"), "{reason}"),
            other => panic!("expected Rejected, got {other:?}"),
        }
        assert!(f
            .credentials_reason()
            .expect("not ready")
            .contains("n1.pem"));
        assert_eq!(r.check(SystemTime::now()), Outcome::Unchanged);
        f.write("n1.pem", &cert);
        assert_eq!(r.check(SystemTime::now()), Outcome::Unchanged);
        assert_eq!(f.installer.installs(), 0);
        assert_eq!(f.credentials_reason(), None);
    }

    #[test]
    fn expired_new_files_are_refused() {
        let f = Fixture::new(30, 0);
        let mut r = f.reloader();
        f.issue(1, 2);
        match r.check(SystemTime::now()) {
            Outcome::Rejected(reason) => assert!(reason.contains("expired"), "{reason}"),
            other => panic!("expected Rejected, got {other:?}"),
        }
        assert!(!r.current().is_expired(SystemTime::now()));
    }

    #[test]
    fn expired_at_start_is_not_ready_until_valid_files_appear() {
        let f = Fixture::new(1, 2);
        let mut r = f.reloader();
        let reason = f.credentials_reason().expect("not ready");
        assert!(reason.contains("expired at unix time"), "{reason}");
        assert!(reason.contains("n1.pem"), "{reason}");
        assert!(reason.contains("nodemesh certs node"), "{reason}");
        f.issue(30, 0);
        assert_eq!(r.check(SystemTime::now()), Outcome::Installed);
        assert_eq!(f.credentials_reason(), None);
    }

    #[test]
    fn a_certificate_expiring_while_running_makes_the_daemon_not_ready() {
        let f = Fixture::new(2, 0);
        let mut r = f.reloader();
        assert_eq!(f.credentials_reason(), None);
        let later = SystemTime::now() + 3 * DAY;
        assert_eq!(r.check(later), Outcome::Unchanged);
        let reason = f.credentials_reason().expect("not ready");
        assert!(reason.contains("expired"), "{reason}");
    }

    #[test]
    fn an_installer_failure_keeps_the_old_credentials() {
        let f = Fixture::new(30, 0);
        let mut r = f.reloader();
        let before = r.current().not_after;
        *f.installer.fail.lock().expect("lock") = true;
        f.issue(10, 0);
        match r.check(SystemTime::now()) {
            Outcome::Rejected(reason) => assert!(reason.contains("endpoint refused"), "{reason}"),
            other => panic!("expected Rejected, got {other:?}"),
        }
        assert_eq!(r.current().not_after, before);
    }

    #[test]
    fn bundle_expiry_keeps_the_earliest_per_subject() {
        let a = generate_ca(TD, 10).expect("ca");
        let b = generate_ca(TD, 20).expect("ca");
        let both = format!("{}{}", b.cert_pem, a.cert_pem);
        let expiry = bundle_expiry(both.as_bytes());
        assert_eq!(expiry.len(), 1, "{expiry:?}");
        let (subject, not_after) = expiry.iter().next().expect("one");
        assert!(subject.contains("nodemesh development CA"), "{subject}");
        assert!(*not_after < SystemTime::now() + 11 * DAY);
    }

    #[tokio::test(start_paused = true)]
    async fn watch_stops_on_shutdown() {
        let f = Fixture::new(30, 0);
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(watch(
            f.reloader(),
            Duration::from_millis(100),
            shutdown.clone(),
        ));
        tokio::time::sleep(Duration::from_millis(350)).await;
        shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(1), task)
            .await
            .expect("watch returns")
            .expect("no panic");
    }
}
