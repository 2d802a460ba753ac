//! CNI error results: the numeric codes of the CNI specification, our
//! plugin-specific codes (100 and up), and the JSON shape printed on stdout.

use serde::Serialize;

/// Error codes of the CNI specification (1.1.0, "Error" section) and ours.
pub mod code {
    /// Incompatible CNI version.
    pub const INCOMPATIBLE_VERSION: u32 = 1;
    /// Unsupported field in network configuration.
    pub const UNSUPPORTED_FIELD: u32 = 2;
    /// Container unknown or does not exist.
    pub const UNKNOWN_CONTAINER: u32 = 3;
    /// Invalid necessary environment variables.
    pub const INVALID_ENV: u32 = 4;
    /// I/O failure.
    pub const IO: u32 = 5;
    /// Failed to decode content.
    pub const DECODE: u32 = 6;
    /// Invalid network config.
    pub const INVALID_CONFIG: u32 = 7;
    /// Try again later: a transient condition (here: the daemon).
    pub const TRY_AGAIN_LATER: u32 = 11;
    /// The plugin is not available (STATUS).
    pub const NOT_AVAILABLE: u32 = 50;
    /// The daemon answered with an error or refused the pod.
    pub const DAEMON_REFUSED: u32 = 100;
    /// Running `nft` in the pod netns failed.
    pub const NFT: u32 = 101;
    /// CHECK found the capture rules missing or different.
    pub const RULES_MISMATCH: u32 = 102;
    /// CHECK: the daemon does not know the pod.
    pub const NOT_REGISTERED: u32 = 103;
    /// Reading or writing `state_dir` failed.
    pub const STATE: u32 = 104;
    /// The pod netns could not be inspected or entered.
    pub const NETNS: u32 = 105;
}

/// A CNI error result, printed as JSON on stdout with a non-zero exit.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, thiserror::Error)]
#[error("CNI error {code}: {msg} ({details})")]
pub struct CniError {
    /// Version of the error result (the request's when known).
    #[serde(rename = "cniVersion")]
    pub cni_version: String,
    /// Spec or plugin-specific error code.
    pub code: u32,
    /// Short message.
    pub msg: String,
    /// Longer explanation: what to check.
    pub details: String,
}

impl CniError {
    /// An error at the plugin's current version; the dispatcher overwrites
    /// `cni_version` with the request's once the config is parsed.
    pub fn new(code: u32, msg: impl Into<String>, details: impl Into<String>) -> Self {
        Self {
            cni_version: crate::config::CURRENT_VERSION.to_owned(),
            code,
            msg: msg.into(),
            details: details.into(),
        }
    }

    /// Sets the version the error is reported at.
    #[must_use]
    pub fn at_version(mut self, version: &str) -> Self {
        version.clone_into(&mut self.cni_version);
        self
    }

    /// The JSON printed on stdout.
    pub fn to_json(&self) -> String {
        // Serializing a struct of strings and an integer cannot fail; fall
        // back to a hand-made object anyway rather than panic.
        serde_json::to_string(self).unwrap_or_else(|_| {
            format!(
                "{{\"cniVersion\":\"{}\",\"code\":{},\"msg\":\"error\",\"details\":\"\"}}",
                crate::config::CURRENT_VERSION,
                self.code
            )
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_json_shape() {
        let e = CniError::new(code::INVALID_ENV, "missing CNI_NETNS", "set it").at_version("1.0.0");
        assert_eq!(
            e.to_json(),
            r#"{"cniVersion":"1.0.0","code":4,"msg":"missing CNI_NETNS","details":"set it"}"#
        );
    }
}
