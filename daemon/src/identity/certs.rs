//! `nodemesh certs`: a development CA and node certificates (rcgen, ECDSA
//! P-256), as files `nodemesh run` loads, and as library functions the tests
//! and the lab call directly.
//!
//! Owns the file layout: `ca.pem` / `ca-key.pem` for the CA, `<node>.pem` /
//! `<node>-key.pem` for each node; keys are written with mode 0600.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType, PKCS_ECDSA_P256_SHA256,
};

use crate::config::{is_dns_subdomain, DEFAULT_TRUST_DOMAIN};

use super::node_spiffe_id;

/// File name of the CA certificate (the trust bundle) in a certs directory.
pub const CA_CERT_FILE: &str = "ca.pem";
/// File name of the CA private key in a certs directory.
pub const CA_KEY_FILE: &str = "ca-key.pem";

/// Allowance for clocks of other nodes running slightly behind.
const CLOCK_SKEW: Duration = Duration::from_secs(5 * 60);
const DAY: Duration = Duration::from_secs(24 * 60 * 60);
/// Upper bound of `--days` and `--backdate-days` (100 years): keeps dates
/// far inside what X.509 and the date arithmetic can represent.
pub const MAX_DAYS: u32 = 36_500;

const AFTER_HELP: &str = "\
Files written (all PEM):
  DIR/ca.pem         CA certificate: the trust bundle (config tls.bundle) of every node
  DIR/ca-key.pem     CA private key, mode 0600: keep it off the nodes
  DIR/NAME.pem       node certificate (config tls.cert); its URI SAN is
                     spiffe://<trust-domain>/nodemesh/node/NAME
  DIR/NAME-key.pem   node private key, mode 0600 (config tls.key)

Example:
  nodemesh certs init --dir /etc/nodemesh/tls
  nodemesh certs node node-1 --dir /etc/nodemesh/tls
then run `nodemesh run` on node-1 with this in its config file:
  node_name: node-1
  tls:
    cert: /etc/nodemesh/tls/node-1.pem
    key: /etc/nodemesh/tls/node-1-key.pem
    bundle: /etc/nodemesh/tls/ca.pem
Each node gets ca.pem and only its own NAME.pem and NAME-key.pem.

This CA is for development, the lab and standalone use. In a cluster, issue
node certificates with cert-manager or the Kubernetes CSR API, same URI SAN.";

/// `nodemesh certs` subcommands.
#[derive(Debug, clap::Subcommand)]
#[command(after_help = AFTER_HELP)]
pub enum CertsCommand {
    /// Create a development CA: DIR/ca.pem (the trust bundle to give every
    /// node) and DIR/ca-key.pem (keep it private; used only to issue node
    /// certificates).
    #[command(after_help = AFTER_HELP)]
    Init {
        /// Directory to write ca.pem and ca-key.pem into (created if missing).
        #[arg(long)]
        dir: PathBuf,
        /// SPIFFE trust domain the CA issues node identities for.
        #[arg(long, default_value = DEFAULT_TRUST_DOMAIN)]
        trust_domain: String,
        /// Validity of the CA certificate, in days.
        #[arg(long, default_value_t = 3650)]
        days: u32,
        /// Overwrite an existing CA (every node certificate it issued stops
        /// being trusted once nodes get the new ca.pem).
        #[arg(long)]
        force: bool,
    },
    /// Issue a node certificate: DIR/NAME.pem (URI SAN
    /// spiffe://<trust-domain>/nodemesh/node/NAME, serverAuth+clientAuth) and
    /// DIR/NAME-key.pem, signed by the CA in --ca-dir.
    #[command(after_help = AFTER_HELP)]
    Node {
        /// Node name, as Kubernetes knows it (an RFC 1123 DNS subdomain).
        name: String,
        /// Directory to write NAME.pem and NAME-key.pem into (created if missing).
        #[arg(long)]
        dir: PathBuf,
        /// Directory holding ca.pem and ca-key.pem. Default: --dir.
        #[arg(long)]
        ca_dir: Option<PathBuf>,
        /// SPIFFE trust domain; must be the one `nodemesh run` is configured with.
        #[arg(long, default_value = DEFAULT_TRUST_DOMAIN)]
        trust_domain: String,
        /// Validity of the node certificate, in days.
        #[arg(long, default_value_t = 365)]
        days: u32,
        /// Move the validity window this many days into the past (for tests:
        /// `--days 1 --backdate-days 2` makes an already expired certificate).
        #[arg(long, default_value_t = 0)]
        backdate_days: u32,
        /// Overwrite existing NAME.pem / NAME-key.pem.
        #[arg(long)]
        force: bool,
    },
}

/// Certificate generation failures.
#[derive(Debug, thiserror::Error)]
pub enum CertsError {
    /// The node name is not a DNS subdomain.
    #[error("node name {name:?} is not a valid RFC 1123 DNS subdomain (lowercase letters, digits, '-', '.')")]
    InvalidNodeName {
        /// The name given.
        name: String,
    },
    /// The trust domain is not a DNS subdomain.
    #[error("trust domain {trust_domain:?} is invalid: use lowercase letters, digits, '-' and '.', e.g. cluster.local")]
    InvalidTrustDomain {
        /// The trust domain given.
        trust_domain: String,
    },
    /// A validity of zero days.
    #[error("--days must be at least 1")]
    ZeroDays,
    /// A number of days beyond what X.509 dates can express sensibly.
    #[error("--{flag} {days} is too large: at most {max} days", max = MAX_DAYS)]
    TooManyDays {
        /// `days` or `backdate-days`.
        flag: &'static str,
        /// The value given.
        days: u32,
    },
    /// A file exists and `--force` was not given.
    #[error("{path} already exists; pass --force to overwrite it")]
    AlreadyExists {
        /// The file.
        path: PathBuf,
    },
    /// A file cannot be written.
    #[error("cannot write {path}: {source}")]
    Write {
        /// The file.
        path: PathBuf,
        /// The IO error.
        source: std::io::Error,
    },
    /// A CA file cannot be read.
    #[error("cannot read {path}: {source}; create a CA with `nodemesh certs init --dir <dir>` or pass --ca-dir")]
    Read {
        /// The file.
        path: PathBuf,
        /// The IO error.
        source: std::io::Error,
    },
    /// The CA certificate or key cannot be used.
    #[error("the CA ({what}) cannot be used: {source}")]
    BadCa {
        /// Which part: a file path or `certificate`/`key`.
        what: String,
        /// rcgen's complaint.
        source: rcgen::Error,
    },
    /// rcgen failed to generate or sign.
    #[error("cannot generate the {what}: {source}")]
    Generate {
        /// What was being made.
        what: &'static str,
        /// rcgen's complaint.
        source: rcgen::Error,
    },
}

/// A CA as PEM text.
#[derive(Debug, Clone)]
pub struct GeneratedCa {
    /// The CA certificate (the trust bundle).
    pub cert_pem: String,
    /// The CA's PKCS#8 private key.
    pub key_pem: String,
}

fn check_days(days: u32, backdate_days: u32) -> Result<(), CertsError> {
    if days == 0 {
        return Err(CertsError::ZeroDays);
    }
    if days > MAX_DAYS {
        return Err(CertsError::TooManyDays { flag: "days", days });
    }
    if backdate_days > MAX_DAYS {
        return Err(CertsError::TooManyDays {
            flag: "backdate-days",
            days: backdate_days,
        });
    }
    Ok(())
}

fn check_trust_domain(trust_domain: &str) -> Result<(), CertsError> {
    if is_dns_subdomain(trust_domain) {
        Ok(())
    } else {
        Err(CertsError::InvalidTrustDomain {
            trust_domain: trust_domain.to_owned(),
        })
    }
}

/// Generates a self-signed CA for `trust_domain`, valid `days` days from now.
pub fn generate_ca(trust_domain: &str, days: u32) -> Result<GeneratedCa, CertsError> {
    check_trust_domain(trust_domain)?;
    check_days(days, 0)?;
    let key =
        KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(|source| CertsError::Generate {
            what: "CA key",
            source,
        })?;
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "nodemesh");
    dn.push(
        DnType::CommonName,
        format!("nodemesh development CA for {trust_domain}"),
    );
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let (not_before, not_after) = validity(days, 0);
    params.not_before = rcgen::date_time_ymd(1970, 1, 1) + not_before;
    params.not_after = rcgen::date_time_ymd(1970, 1, 1) + not_after;
    let cert = params
        .self_signed(&key)
        .map_err(|source| CertsError::Generate {
            what: "CA certificate",
            source,
        })?;
    Ok(GeneratedCa {
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
    })
}

/// Validity window as offsets from the Unix epoch: starts `backdate_days`
/// days (plus clock skew allowance) before now, ends `days` after the
/// backdated now.
fn validity(days: u32, backdate_days: u32) -> (Duration, Duration) {
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default();
    let start = now.saturating_sub(DAY * backdate_days);
    (start.saturating_sub(CLOCK_SKEW), start + DAY * days)
}

/// Issues a node certificate for `node` in `trust_domain`, signed by `ca`:
/// returns `(certificate PEM, PKCS#8 key PEM)`. The validity starts
/// `backdate_days` days in the past and lasts `days` days.
pub fn issue_node(
    ca: &GeneratedCa,
    trust_domain: &str,
    node: &str,
    days: u32,
    backdate_days: u32,
) -> Result<(String, String), CertsError> {
    check_trust_domain(trust_domain)?;
    if !is_dns_subdomain(node) {
        return Err(CertsError::InvalidNodeName {
            name: node.to_owned(),
        });
    }
    check_days(days, backdate_days)?;
    let ca_key = KeyPair::from_pem(&ca.key_pem).map_err(|source| CertsError::BadCa {
        what: "key".to_owned(),
        source,
    })?;
    let issuer =
        Issuer::from_ca_cert_pem(&ca.cert_pem, ca_key).map_err(|source| CertsError::BadCa {
            what: "certificate".to_owned(),
            source,
        })?;

    let key =
        KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(|source| CertsError::Generate {
            what: "node key",
            source,
        })?;
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, node);
    params.distinguished_name = dn;
    let uri = node_spiffe_id(trust_domain, node)
        .try_into()
        .map_err(|source| CertsError::Generate {
            what: "node URI SAN",
            source,
        })?;
    params.subject_alt_names = vec![SanType::URI(uri)];
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    params.use_authority_key_identifier_extension = true;
    let (not_before, not_after) = validity(days, backdate_days);
    params.not_before = rcgen::date_time_ymd(1970, 1, 1) + not_before;
    params.not_after = rcgen::date_time_ymd(1970, 1, 1) + not_after;
    let cert = params
        .signed_by(&key, &issuer)
        .map_err(|source| CertsError::Generate {
            what: "node certificate",
            source,
        })?;
    Ok((cert.pem(), key.serialize_pem()))
}

/// Writes `contents` to `path` through a temporary file and a rename, with
/// `mode`; refuses to replace an existing file unless `force`.
fn write_file(path: &Path, contents: &str, mode: u32) -> Result<(), CertsError> {
    let tmp = path.with_extension("pem.tmp");
    let write_err = |source| CertsError::Write {
        path: path.to_owned(),
        source,
    };
    let _ = std::fs::remove_file(&tmp);
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)
        .map_err(write_err)?;
    let written = file
        .write_all(contents.as_bytes())
        .and_then(|()| file.sync_all());
    drop(file);
    if let Err(source) = written.and_then(|()| std::fs::rename(&tmp, path)) {
        let _ = std::fs::remove_file(&tmp);
        return Err(write_err(source));
    }
    Ok(())
}

fn refuse_existing(paths: &[&Path], force: bool) -> Result<(), CertsError> {
    if force {
        return Ok(());
    }
    match paths.iter().find(|p| p.exists()) {
        Some(path) => Err(CertsError::AlreadyExists {
            path: path.to_path_buf(),
        }),
        None => Ok(()),
    }
}

fn create_dir(dir: &Path) -> Result<(), CertsError> {
    std::fs::create_dir_all(dir).map_err(|source| CertsError::Write {
        path: dir.to_owned(),
        source,
    })
}

fn read_to_string(path: PathBuf) -> Result<String, CertsError> {
    std::fs::read_to_string(&path).map_err(|source| CertsError::Read { path, source })
}

/// Where `init` writes the CA; returns the written paths (certificate, key).
pub fn write_ca(
    dir: &Path,
    ca: &GeneratedCa,
    force: bool,
) -> Result<(PathBuf, PathBuf), CertsError> {
    let cert = dir.join(CA_CERT_FILE);
    let key = dir.join(CA_KEY_FILE);
    refuse_existing(&[&cert, &key], force)?;
    create_dir(dir)?;
    write_file(&key, &ca.key_pem, 0o600)?;
    write_file(&cert, &ca.cert_pem, 0o644)?;
    Ok((cert, key))
}

/// Reads the CA written by `init` from `dir`.
pub fn read_ca(dir: &Path) -> Result<GeneratedCa, CertsError> {
    Ok(GeneratedCa {
        cert_pem: read_to_string(dir.join(CA_CERT_FILE))?,
        key_pem: read_to_string(dir.join(CA_KEY_FILE))?,
    })
}

/// Writes a node's certificate and key as `dir/<node>.pem` and
/// `dir/<node>-key.pem`; returns the written paths (certificate, key).
pub fn write_node(
    dir: &Path,
    node: &str,
    cert_pem: &str,
    key_pem: &str,
    force: bool,
) -> Result<(PathBuf, PathBuf), CertsError> {
    if !is_dns_subdomain(node) {
        return Err(CertsError::InvalidNodeName {
            name: node.to_owned(),
        });
    }
    let cert = dir.join(format!("{node}.pem"));
    let key = dir.join(format!("{node}-key.pem"));
    refuse_existing(&[&cert, &key], force)?;
    create_dir(dir)?;
    write_file(&key, key_pem, 0o600)?;
    write_file(&cert, cert_pem, 0o644)?;
    Ok((cert, key))
}

/// Runs a `nodemesh certs` subcommand.
pub fn run(cmd: CertsCommand) -> Result<(), CertsError> {
    match cmd {
        CertsCommand::Init {
            dir,
            trust_domain,
            days,
            force,
        } => {
            let ca = generate_ca(&trust_domain, days)?;
            let (cert, key) = write_ca(&dir, &ca, force)?;
            println!(
                "wrote CA certificate (trust bundle) {} and key {}",
                cert.display(),
                key.display()
            );
            println!(
                "next: nodemesh certs node <node-name> --dir {} --trust-domain {trust_domain}",
                dir.display()
            );
        }
        CertsCommand::Node {
            name,
            dir,
            ca_dir,
            trust_domain,
            days,
            backdate_days,
            force,
        } => {
            if !is_dns_subdomain(&name) {
                return Err(CertsError::InvalidNodeName { name });
            }
            let ca = read_ca(ca_dir.as_deref().unwrap_or(&dir))?;
            let (cert_pem, key_pem) = issue_node(&ca, &trust_domain, &name, days, backdate_days)?;
            let (cert, key) = write_node(&dir, &name, &cert_pem, &key_pem, force)?;
            println!(
                "wrote {} for {} and key {}",
                cert.display(),
                node_spiffe_id(&trust_domain, &name),
                key.display()
            );
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use clap::Parser;
    use rustls_pki_types::pem::PemObject;

    use super::*;

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(subcommand)]
        cmd: CertsCommand,
    }

    fn parse(args: &[&str]) -> CertsCommand {
        Cli::try_parse_from(std::iter::once("certs").chain(args.iter().copied()))
            .expect("parse")
            .cmd
    }

    fn mode(path: &Path) -> u32 {
        std::fs::metadata(path)
            .expect("metadata")
            .permissions()
            .mode()
            & 0o777
    }

    #[test]
    fn init_then_node_writes_loadable_files() {
        let dir = tempfile::tempdir().expect("tempdir");
        let d = dir.path().to_str().expect("utf-8 path");
        run(parse(&["init", "--dir", d])).expect("init");
        assert_eq!(mode(&dir.path().join("ca-key.pem")), 0o600);
        run(parse(&["node", "node-1", "--dir", d])).expect("node");
        assert_eq!(mode(&dir.path().join("node-1-key.pem")), 0o600);
        let tls = crate::config::TlsConfig {
            cert: dir.path().join("node-1.pem"),
            key: dir.path().join("node-1-key.pem"),
            bundle: dir.path().join("ca.pem"),
            ..crate::config::TlsConfig::default()
        };
        let creds =
            crate::identity::Credentials::load(&tls, "cluster.local", "node-1").expect("load");
        assert_eq!(creds.node, "node-1");
    }

    #[test]
    fn init_refuses_to_overwrite_without_force() {
        let dir = tempfile::tempdir().expect("tempdir");
        let d = dir.path().to_str().expect("utf-8 path");
        run(parse(&["init", "--dir", d])).expect("init");
        let before = std::fs::read_to_string(dir.path().join("ca.pem")).expect("read");
        let err = run(parse(&["init", "--dir", d])).expect_err("second init");
        assert!(
            matches!(&err, CertsError::AlreadyExists { path } if path.ends_with("ca.pem")),
            "{err}"
        );
        assert_eq!(
            std::fs::read_to_string(dir.path().join("ca.pem")).expect("read"),
            before
        );
        run(parse(&["init", "--dir", d, "--force"])).expect("forced init");
        assert_ne!(
            std::fs::read_to_string(dir.path().join("ca.pem")).expect("read"),
            before
        );
        assert_eq!(mode(&dir.path().join("ca-key.pem")), 0o600);
    }

    #[test]
    fn node_uses_the_ca_dir_and_trust_domain() {
        let ca_dir = tempfile::tempdir().expect("tempdir");
        let out = tempfile::tempdir().expect("tempdir");
        let c = ca_dir.path().to_str().expect("utf-8");
        let o = out.path().to_str().expect("utf-8");
        run(parse(&[
            "init",
            "--dir",
            c,
            "--trust-domain",
            "example.org",
        ]))
        .expect("init");
        run(parse(&[
            "node",
            "n2",
            "--dir",
            o,
            "--ca-dir",
            c,
            "--trust-domain",
            "example.org",
        ]))
        .expect("node");
        let tls = crate::config::TlsConfig {
            cert: out.path().join("n2.pem"),
            key: out.path().join("n2-key.pem"),
            bundle: ca_dir.path().join("ca.pem"),
            ..crate::config::TlsConfig::default()
        };
        crate::identity::Credentials::load(&tls, "example.org", "n2").expect("load");
        assert!(!out.path().join("ca.pem").exists());
    }

    #[test]
    fn node_without_a_ca_names_the_missing_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let err = run(parse(&[
            "node",
            "n1",
            "--dir",
            dir.path().to_str().expect("utf-8"),
        ]))
        .expect_err("no CA");
        assert!(
            matches!(&err, CertsError::Read { path, .. } if path.ends_with("ca.pem")),
            "{err}"
        );
    }

    #[test]
    fn invalid_names_are_refused() {
        let ca = generate_ca("cluster.local", 1).expect("ca");
        for bad in ["", "Upper", "a_b", "-a", "a/b", "a..b"] {
            assert!(
                matches!(
                    issue_node(&ca, "cluster.local", bad, 1, 0),
                    Err(CertsError::InvalidNodeName { .. })
                ),
                "{bad:?}"
            );
        }
        assert!(matches!(
            generate_ca("bad td", 1),
            Err(CertsError::InvalidTrustDomain { .. })
        ));
        assert!(matches!(
            generate_ca("cluster.local", 0),
            Err(CertsError::ZeroDays)
        ));
        assert!(matches!(
            generate_ca("cluster.local", u32::MAX),
            Err(CertsError::TooManyDays { .. })
        ));
        assert!(matches!(
            issue_node(&ca, "cluster.local", "n1", 1, u32::MAX),
            Err(CertsError::TooManyDays {
                flag: "backdate-days",
                ..
            })
        ));
        generate_ca("cluster.local", MAX_DAYS).expect("the maximum is representable");
        issue_node(&ca, "cluster.local", "n1", MAX_DAYS, MAX_DAYS)
            .expect("the maximum is representable");
    }

    #[test]
    fn backdated_certificate_is_expired() {
        let ca = generate_ca("cluster.local", 1).expect("ca");
        let (cert, _) = issue_node(&ca, "cluster.local", "n1", 1, 2).expect("issue");
        let der = rustls_pki_types::CertificateDer::from_pem_slice(cert.as_bytes()).expect("pem");
        let leaf = crate::identity::leaf::parse_leaf(&der).expect("parse");
        assert!(leaf.not_after < SystemTime::now() - DAY + Duration::from_secs(60));
        assert_eq!(leaf.uris, ["spiffe://cluster.local/nodemesh/node/n1"]);
    }

    #[test]
    fn help_teaches_the_files() {
        use clap::CommandFactory;
        let mut cmd = Cli::command();
        let help = cmd
            .find_subcommand_mut("node")
            .expect("node")
            .render_long_help()
            .to_string();
        assert!(help.contains("--backdate-days"), "{help}");
        assert!(help.contains("tls.bundle"), "{help}");
    }
}
