//! What nodemesh reads from a leaf certificate: its URI SANs (the SPIFFE
//! identity) and its validity window. Pure parsing, no trust decisions.

use std::time::{Duration, SystemTime};

use x509_parser::certificate::X509Certificate;
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::FromDer;

/// The parts of a leaf certificate the identity checks need.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct LeafInfo {
    /// Every URI subject alternative name, in certificate order.
    pub uris: Vec<String>,
    /// The subject distinguished name, e.g. `CN=n1`.
    pub subject: String,
    /// The serial number, lowercase hex.
    pub serial: String,
    /// Start of validity.
    pub not_before: SystemTime,
    /// End of validity.
    pub not_after: SystemTime,
}

impl LeafInfo {
    /// The single URI SAN, if there is exactly one (SPIFFE X.509-SVIDs carry exactly one).
    pub(crate) fn single_uri(&self) -> Option<&str> {
        match self.uris.as_slice() {
            [one] => Some(one),
            _ => None,
        }
    }

    /// The URI SANs for a log line: comma separated, or `<none>`.
    pub(crate) fn describe(&self) -> String {
        if self.uris.is_empty() {
            "<none>".to_owned()
        } else {
            self.uris.join(",")
        }
    }
}

/// Parses a DER certificate; the error is a human-readable reason.
pub(crate) fn parse_leaf(der: &[u8]) -> Result<LeafInfo, String> {
    let (rest, cert) =
        X509Certificate::from_der(der).map_err(|e| format!("not an X.509 certificate: {e}"))?;
    if !rest.is_empty() {
        return Err(format!(
            "{} trailing bytes after the certificate",
            rest.len()
        ));
    }
    let mut uris = Vec::new();
    let san = cert
        .subject_alternative_name()
        .map_err(|e| format!("unreadable subjectAltName extension: {e}"))?;
    if let Some(san) = san {
        for name in &san.value.general_names {
            if let GeneralName::URI(uri) = name {
                uris.push((*uri).to_owned());
            }
        }
    }
    let validity = cert.validity();
    Ok(LeafInfo {
        uris,
        subject: cert.subject().to_string(),
        serial: cert.raw_serial_as_string().replace(':', ""),
        not_before: from_unix(validity.not_before.timestamp()),
        not_after: from_unix(validity.not_after.timestamp()),
    })
}

/// A Unix timestamp (seconds, possibly negative) as a `SystemTime`.
fn from_unix(secs: i64) -> SystemTime {
    let magnitude = Duration::from_secs(secs.unsigned_abs());
    if secs >= 0 {
        SystemTime::UNIX_EPOCH + magnitude
    } else {
        SystemTime::UNIX_EPOCH - magnitude
    }
}

/// Seconds since the Unix epoch, for log fields (0 before the epoch).
pub(crate) fn unix_secs(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn garbage_is_rejected_with_a_reason() {
        let err = parse_leaf(b"not a certificate").expect_err("garbage must not parse");
        assert!(err.contains("not an X.509 certificate"), "{err}");
    }

    #[test]
    fn negative_timestamps_are_before_the_epoch() {
        assert!(from_unix(-10) < SystemTime::UNIX_EPOCH);
        assert_eq!(
            from_unix(10),
            SystemTime::UNIX_EPOCH + Duration::from_secs(10)
        );
        assert_eq!(unix_secs(from_unix(-10)), 0);
    }
}
