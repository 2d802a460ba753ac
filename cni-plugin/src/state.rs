//! The plugin's on-disk state under `state_dir`:
//!
//! - `queue/<container_id>.json`: an unregister the daemon could not take
//!   when DEL ran; the file is exactly one [`Request::Unregister`] JSON line
//!   (the socket's framing), and the daemon drains the directory on start.
//! - `attachments/<container_id>.json`: an [`Attachment`] record written by a
//!   successful ADD and removed by DEL; GC compares these with the runtime's
//!   valid list.
//!
//! Every write is write-to-temp-then-rename so a crash never leaves a torn file.

use std::fs;
use std::io::ErrorKind;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::proto::{encode_line, Request};

/// Subdirectory of queued unregisters.
pub const QUEUE_DIR: &str = "queue";
/// Subdirectory of attachment records.
pub const ATTACHMENTS_DIR: &str = "attachments";

/// Failures reading or writing `state_dir`.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// A file operation failed.
    #[error("state file {path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// A record could not be encoded.
    #[error("cannot encode state record {path}: {reason}")]
    Encode {
        /// The file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
}

/// Capture values the daemon gave at ADD.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Capture {
    /// Outbound listener port.
    pub outbound_port: u16,
    /// Inbound listener port.
    pub inbound_port: u16,
    /// Daemon socket mark.
    pub mark: u32,
}

/// What ADD did for one attachment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attachment {
    /// `CNI_CONTAINERID`.
    pub container_id: String,
    /// `CNI_IFNAME`.
    pub ifname: String,
    /// Network `name` from the config.
    pub network: String,
    /// `CNI_NETNS`.
    pub netns: PathBuf,
    /// `Some` when the pod is meshed; `None` when the daemon skipped it.
    pub capture: Option<Capture>,
}

/// The state directory.
#[derive(Debug, Clone)]
pub struct StateDir {
    root: PathBuf,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> StateError + '_ {
    move |source| StateError::Io {
        path: path.to_owned(),
        source,
    }
}

fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), StateError> {
    if let Some(dir) = path.parent() {
        fs::create_dir_all(dir).map_err(io(dir))?;
    }
    let tmp = path.with_extension("json.tmp");
    fs::write(&tmp, bytes).map_err(io(&tmp))?;
    fs::rename(&tmp, path).map_err(io(path))
}

fn remove_if_present(path: &Path) -> Result<bool, StateError> {
    match fs::remove_file(path) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(false),
        Err(e) => Err(io(path)(e)),
    }
}

/// Container IDs of the `*.json` files in `dir` (missing dir: none).
fn ids_in(dir: &Path) -> Result<Vec<String>, StateError> {
    let entries = match fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io(dir)(e)),
    };
    let mut ids = Vec::new();
    for entry in entries {
        let entry = entry.map_err(io(dir))?;
        let name = entry.file_name();
        if let Some(id) = name.to_str().and_then(|n| n.strip_suffix(".json")) {
            ids.push(id.to_owned());
        }
    }
    ids.sort();
    Ok(ids)
}

impl StateDir {
    /// State rooted at `root` (created lazily on first write).
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    /// Path of the queued unregister for a container.
    pub fn queue_path(&self, container_id: &str) -> PathBuf {
        self.root
            .join(QUEUE_DIR)
            .join(format!("{container_id}.json"))
    }

    fn attachment_path(&self, container_id: &str) -> PathBuf {
        self.root
            .join(ATTACHMENTS_DIR)
            .join(format!("{container_id}.json"))
    }

    /// Queues an unregister for the daemon to process when it is back.
    pub fn queue_unregister(&self, container_id: &str) -> Result<PathBuf, StateError> {
        let path = self.queue_path(container_id);
        let line = encode_line(&Request::Unregister {
            container_id: container_id.to_owned(),
        })
        .map_err(|e| StateError::Encode {
            path: path.clone(),
            reason: e.to_string(),
        })?;
        write_atomic(&path, &line)?;
        Ok(path)
    }

    /// Drops a queued unregister; `true` if there was one.
    pub fn dequeue(&self, container_id: &str) -> Result<bool, StateError> {
        remove_if_present(&self.queue_path(container_id))
    }

    /// Container IDs with a queued unregister.
    pub fn queued(&self) -> Result<Vec<String>, StateError> {
        ids_in(&self.root.join(QUEUE_DIR))
    }

    /// Records an attachment.
    pub fn save_attachment(&self, a: &Attachment) -> Result<(), StateError> {
        let path = self.attachment_path(&a.container_id);
        let json = serde_json::to_vec(a).map_err(|e| StateError::Encode {
            path: path.clone(),
            reason: e.to_string(),
        })?;
        write_atomic(&path, &json)
    }

    /// Reads an attachment record; unreadable or corrupt records read as absent.
    pub fn attachment(&self, container_id: &str) -> Option<Attachment> {
        let bytes = fs::read(self.attachment_path(container_id)).ok()?;
        serde_json::from_slice(&bytes).ok()
    }

    /// Forgets an attachment; `true` if there was a record.
    pub fn remove_attachment(&self, container_id: &str) -> Result<bool, StateError> {
        remove_if_present(&self.attachment_path(container_id))
    }

    /// Container IDs with an attachment record.
    pub fn attachments(&self) -> Result<Vec<String>, StateError> {
        ids_in(&self.root.join(ATTACHMENTS_DIR))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queue_file_is_one_unregister_line() {
        let dir = tempfile::tempdir().expect("tmp");
        let st = StateDir::new(dir.path());
        let p = st.queue_unregister("c1").expect("queue");
        assert_eq!(p, dir.path().join("queue/c1.json"));
        assert_eq!(
            fs::read_to_string(&p).expect("read"),
            "{\"op\":\"unregister\",\"container_id\":\"c1\"}\n"
        );
        assert_eq!(st.queued().expect("list"), vec!["c1".to_owned()]);
        assert!(st.dequeue("c1").expect("dequeue"));
        assert!(!st.dequeue("c1").expect("dequeue again"));
    }

    #[test]
    fn attachment_roundtrip() {
        let dir = tempfile::tempdir().expect("tmp");
        let st = StateDir::new(dir.path().join("nested"));
        assert!(st.attachments().expect("empty").is_empty());
        let a = Attachment {
            container_id: "c2".into(),
            ifname: "eth0".into(),
            network: "net".into(),
            netns: "/run/netns/x".into(),
            capture: Some(Capture {
                outbound_port: 1,
                inbound_port: 2,
                mark: 3,
            }),
        };
        st.save_attachment(&a).expect("save");
        assert_eq!(st.attachment("c2"), Some(a));
        assert_eq!(st.attachments().expect("list"), vec!["c2".to_owned()]);
        assert!(st.remove_attachment("c2").expect("rm"));
        assert_eq!(st.attachment("c2"), None);
    }
}
