//! The lab's error type: one variant per condition, carrying what failed.

use std::path::PathBuf;
use std::time::Duration;

/// Everything that can go wrong while building, using or removing a lab.
#[derive(Debug, thiserror::Error)]
pub enum LabError {
    /// The lab prefix cannot be used in namespace and link names.
    #[error("lab prefix {prefix:?} is invalid: use 1 to 10 lowercase letters or digits, starting with a letter")]
    BadPrefix {
        /// The prefix.
        prefix: String,
    },
    /// A lab option is out of range.
    #[error("lab option {option}: {problem}")]
    BadOption {
        /// Option name.
        option: &'static str,
        /// What is wrong.
        problem: String,
    },
    /// A lab with this prefix already exists.
    #[error("a lab with prefix {prefix:?} already exists ({what}); remove it with `nodemesh-lab down --prefix {prefix}`")]
    LabExists {
        /// The prefix.
        prefix: String,
        /// What was found.
        what: String,
    },
    /// An external program could not be started.
    #[error("cannot run {program}: {source}")]
    Spawn {
        /// The program.
        program: String,
        /// Why.
        source: std::io::Error,
    },
    /// An external command exited unsuccessfully.
    #[error("`{command}` failed ({status}): {stderr}")]
    CommandFailed {
        /// The command line.
        command: String,
        /// Exit status.
        status: String,
        /// Its standard error (trimmed).
        stderr: String,
    },
    /// An external command did not finish in time and was killed.
    #[error("`{command}` did not finish within {timeout:?} and was killed")]
    CommandTimeout {
        /// The command line.
        command: String,
        /// The deadline.
        timeout: Duration,
    },
    /// A binary the lab needs was not found.
    #[error("binary {name} not found in {searched:?}; run `cargo build --workspace --bins` first, or set NODEMESH_BIN_DIR to the directory holding it")]
    BinaryMissing {
        /// Binary name.
        name: String,
        /// Directories searched.
        searched: Vec<PathBuf>,
    },
    /// A file or directory operation failed.
    #[error("{path}: {source}")]
    Io {
        /// The path.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// Entering a network namespace or using a socket inside it failed.
    #[error("network namespace {netns}: {what}: {source}")]
    Netns {
        /// Namespace name.
        netns: String,
        /// What was being done.
        what: String,
        /// Why.
        source: std::io::Error,
    },
    /// A CNI plugin returned an error.
    #[error("CNI plugin {plugin} {command} for pod {pod} failed: {message}")]
    Cni {
        /// Plugin type.
        plugin: String,
        /// ADD or DEL.
        command: &'static str,
        /// Pod netns name.
        pod: String,
        /// The plugin's error message (or exit status and stderr).
        message: String,
    },
    /// The CNI conflist or a result has an unexpected shape.
    #[error("CNI {what}: {problem}")]
    CniFormat {
        /// Which document.
        what: String,
        /// What is wrong.
        problem: String,
    },
    /// A daemon exited before becoming ready.
    #[error("daemon of node {node} exited ({status}) before becoming ready; last lines of {log}:\n{tail}")]
    DaemonDied {
        /// Node name.
        node: String,
        /// Exit status.
        status: String,
        /// Its log file.
        log: PathBuf,
        /// Last log lines.
        tail: String,
    },
    /// A daemon did not answer `/ready` with 200 in time.
    #[error("daemon of node {node} not ready after {timeout:?}; last lines of {log}:\n{tail}")]
    DaemonNotReady {
        /// Node name.
        node: String,
        /// The deadline.
        timeout: Duration,
        /// Its log file.
        log: PathBuf,
        /// Last log lines.
        tail: String,
    },
    /// A daemon's log did not get an expected line in time.
    #[error("no line with all of {needles:?} in {log} after {timeout:?}; last lines:\n{tail}")]
    LogLineMissing {
        /// The log file.
        log: PathBuf,
        /// What the line must contain.
        needles: Vec<String>,
        /// How long it was waited for.
        timeout: Duration,
        /// Last log lines.
        tail: String,
    },
    /// A node's daemon is not running (mesh off, or stopped).
    #[error("node {node} has no running daemon")]
    NoDaemon {
        /// Node name.
        node: String,
    },
    /// An HTTP exchange with an admin endpoint failed.
    #[error("GET http://{addr}{path} in netns {netns}: {problem}")]
    Http {
        /// Namespace the request was made from.
        netns: String,
        /// Server address.
        addr: std::net::SocketAddr,
        /// Request path.
        path: String,
        /// What went wrong.
        problem: String,
    },
    /// A metrics page could not be parsed.
    #[error(transparent)]
    Metrics(#[from] crate::metrics::ParseError),
    /// The recorded lab state is unreadable.
    #[error("lab state {path}: {problem}")]
    State {
        /// The state file.
        path: PathBuf,
        /// What is wrong.
        problem: String,
    },
    /// No node with this index in the lab.
    #[error("the lab has no node {index} (nodes are numbered from 1)")]
    UnknownNode {
        /// The index asked for.
        index: usize,
    },
    /// No pod with these indices in the lab.
    #[error("the lab has no pod {pod} on node {node} (both numbered from 1)")]
    UnknownPod {
        /// Node index.
        node: usize,
        /// Pod index on the node.
        pod: usize,
    },
    /// A transfer's hashes did not match.
    #[error("transfer {what}: {problem}")]
    Transfer {
        /// Which transfer.
        what: String,
        /// What differs.
        problem: String,
    },
    /// The thread doing the lab work failed unexpectedly.
    #[error("the lab worker failed: {problem}")]
    WorkerFailed {
        /// What happened.
        problem: String,
    },
    /// A connection the mesh should have reset was not reset.
    #[error("{what}: expected the mesh to reset the connection, but {got}")]
    NotReset {
        /// Which connection.
        what: String,
        /// What happened instead.
        got: String,
    },
    /// The operation was interrupted by a signal (Ctrl-C, SIGTERM).
    #[error("interrupted by a signal")]
    Interrupted,
}

impl LabError {
    /// Builds an [`LabError::Io`] from a path and an IO error.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Self::Io {
            path: path.into(),
            source,
        }
    }
}
