//! Reading the kernel's text files (`/proc`, `/sys/fs/cgroup`) behind a
//! trait, so the code that parses them ([`crate::memory_limit`],
//! [`crate::process_metrics`]) is tested without them.

use std::path::Path;

/// Reads the kernel's files.
pub trait HostFiles {
    /// The file's text, or `None` when it cannot be read (missing, or not
    /// there on this kernel).
    fn read(&self, path: &Path) -> Option<String>;
    /// Entries in a directory, or `None` when it cannot be listed.
    fn count(&self, dir: &Path) -> Option<u64>;
}

/// The running system's files.
#[derive(Debug, Clone, Copy, Default)]
pub struct Host;

impl HostFiles for Host {
    fn read(&self, path: &Path) -> Option<String> {
        std::fs::read_to_string(path).ok()
    }

    fn count(&self, dir: &Path) -> Option<u64> {
        Some(std::fs::read_dir(dir).ok()?.count() as u64)
    }
}

/// Files in memory, for tests.
#[cfg(test)]
#[derive(Debug, Default)]
pub struct Fake {
    /// Path → text.
    pub text: std::collections::HashMap<std::path::PathBuf, String>,
    /// What [`HostFiles::count`] answers for any directory.
    pub entries: Option<u64>,
}

#[cfg(test)]
impl Fake {
    /// The given files, no directory.
    pub fn new(files: &[(&str, &str)]) -> Self {
        Self {
            text: files
                .iter()
                .map(|(p, t)| (p.into(), (*t).to_owned()))
                .collect(),
            entries: None,
        }
    }
}

#[cfg(test)]
impl HostFiles for Fake {
    fn read(&self, path: &Path) -> Option<String> {
        self.text.get(path).cloned()
    }

    fn count(&self, _dir: &Path) -> Option<u64> {
        self.entries
    }
}
