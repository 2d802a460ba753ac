//! `nodemesh-cni install` / `uninstall`: puts the binary into the CNI bin
//! dir and our entry at the end of the primary CNI's conflist, keeps it there
//! while the primary rewrites its file, and removes exactly that on uninstall.
//!
//! The primary config is the first file by name in the conf dir with a
//! `.conflist`, `.conf` or `.json` extension (libcni's choice); a `.conf`
//! (a single plugin) is converted into a `.conflist`. Every write is
//! write-to-temp-then-rename, so neither the runtime nor the primary ever
//! sees a torn file and a running binary is never overwritten in place.

use std::fs;
use std::io::ErrorKind;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify};
use serde_json::{Map, Value};
use tracing::{info, warn};

/// The `type` of our conflist entry (and our binary's name).
pub const PLUGIN_TYPE: &str = "nodemesh-cni";
/// Default CNI binary directory.
pub const DEFAULT_BIN_DIR: &str = "/opt/cni/bin";
/// Default CNI configuration directory.
pub const DEFAULT_CONF_DIR: &str = "/etc/cni/net.d";
/// Default full resync period of the watcher, a safety net for missed
/// events (an inotify queue overflow, a conf dir replaced wholesale).
pub const DEFAULT_RESYNC: Duration = Duration::from_secs(30);

/// Installer failures.
#[derive(Debug, thiserror::Error)]
pub enum InstallError {
    /// A file operation failed.
    #[error("{path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// A CNI config file is not valid JSON of the expected shape.
    #[error("{path} is not a valid CNI config: {reason}")]
    BadConfig {
        /// The config file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The plugin entry given to the installer is not a JSON object.
    #[error("plugin entry must be a JSON object: {0}")]
    BadEntry(String),
    /// Watching the conf dir failed.
    #[error("watching {path}: {source}")]
    Watch {
        /// The conf dir.
        path: PathBuf,
        /// The OS error.
        source: nix::Error,
    },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> InstallError + '_ {
    move |source| InstallError::Io {
        path: path.to_owned(),
        source,
    }
}

/// Writes `bytes` to `path` atomically (hidden temp file in the same dir, then rename).
fn write_atomic(path: &Path, bytes: &[u8], mode: Option<u32>) -> Result<(), InstallError> {
    use std::os::unix::fs::PermissionsExt;
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("file");
    let tmp = dir.join(format!(".{name}.nodemesh-tmp"));
    fs::write(&tmp, bytes).map_err(io(&tmp))?;
    if let Some(mode) = mode {
        fs::set_permissions(&tmp, fs::Permissions::from_mode(mode)).map_err(io(&tmp))?;
    }
    fs::rename(&tmp, path).map_err(io(path))
}

/// Copies the binary to `bin_dir/nodemesh-cni` by copy-then-rename (never
/// "text file busy", never a half-written binary). Returns the target.
pub fn install_binary(source: &Path, bin_dir: &Path) -> Result<PathBuf, InstallError> {
    let target = bin_dir.join(PLUGIN_TYPE);
    let bytes = fs::read(source).map_err(io(source))?;
    fs::create_dir_all(bin_dir).map_err(io(bin_dir))?;
    write_atomic(&target, &bytes, Some(0o755))?;
    Ok(target)
}

/// The primary CNI config: first by name among `*.conflist`, `*.conf`,
/// `*.json` (hidden files skipped).
pub fn primary_config(conf_dir: &Path) -> Result<Option<PathBuf>, InstallError> {
    let entries = match fs::read_dir(conf_dir) {
        Ok(e) => e,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io(conf_dir)(e)),
    };
    let mut names = Vec::new();
    for entry in entries {
        let entry = entry.map_err(io(conf_dir))?;
        let Some(name) = entry.file_name().to_str().map(str::to_owned) else {
            continue;
        };
        let ext_ok = [".conflist", ".conf", ".json"]
            .iter()
            .any(|e| name.ends_with(e));
        if ext_ok && !name.starts_with('.') && entry.path().is_file() {
            names.push(name);
        }
    }
    names.sort();
    Ok(names.first().map(|n| conf_dir.join(n)))
}

fn read_json(path: &Path) -> Result<Map<String, Value>, InstallError> {
    let bytes = fs::read(path).map_err(io(path))?;
    match serde_json::from_slice(&bytes) {
        Ok(Value::Object(m)) => Ok(m),
        Ok(_) => Err(InstallError::BadConfig {
            path: path.to_owned(),
            reason: "not a JSON object".into(),
        }),
        Err(e) => Err(InstallError::BadConfig {
            path: path.to_owned(),
            reason: e.to_string(),
        }),
    }
}

fn is_ours(plugin: &Value) -> bool {
    plugin.get("type").and_then(Value::as_str) == Some(PLUGIN_TYPE)
}

/// Our conflist entry: `entry` with `"type": "nodemesh-cni"`.
pub fn plugin_entry(extra: &Value) -> Result<Value, InstallError> {
    let mut m = match extra {
        Value::Object(m) => m.clone(),
        other => return Err(InstallError::BadEntry(other.to_string())),
    };
    m.insert("type".into(), Value::String(PLUGIN_TYPE.into()));
    Ok(Value::Object(m))
}

/// What [`ensure_entry`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Sync {
    /// No primary config in the conf dir yet: nothing to attach to.
    NoPrimary,
    /// Our entry was already last, as wanted, in this file.
    InPlace(PathBuf),
    /// Our entry was (re-)appended to this conflist.
    Appended(PathBuf),
    /// This `.conf` was converted into the conflist, with our entry.
    Converted {
        /// The primary's single-plugin config (removed).
        from: PathBuf,
        /// The conflist written in its place.
        to: PathBuf,
    },
}

impl Sync {
    /// Whether the entry is in place after this sync.
    pub fn ready(&self) -> bool {
        !matches!(self, Self::NoPrimary)
    }
}

/// Makes our entry the last plugin of the primary conflist (idempotent:
/// writes nothing when it already is).
pub fn ensure_entry(conf_dir: &Path, entry: &Value) -> Result<Sync, InstallError> {
    let Some(path) = primary_config(conf_dir)? else {
        return Ok(Sync::NoPrimary);
    };
    let mut conf = read_json(&path)?;
    let bad = |reason: &str| InstallError::BadConfig {
        path: path.clone(),
        reason: reason.into(),
    };
    if let Some(plugins) = conf.get_mut("plugins") {
        let plugins = plugins
            .as_array_mut()
            .ok_or_else(|| bad("plugins is not an array"))?;
        if plugins.last() == Some(entry) && plugins.iter().filter(|p| is_ours(p)).count() == 1 {
            return Ok(Sync::InPlace(path));
        }
        plugins.retain(|p| !is_ours(p));
        plugins.push(entry.clone());
        let bytes = serde_json::to_vec_pretty(&conf).map_err(|e| bad(&e.to_string()))?;
        write_atomic(&path, &bytes, None)?;
        info!(conflist = %path.display(), "nodemesh-cni appended to the primary conflist");
        return Ok(Sync::Appended(path));
    }
    // A single-plugin `.conf`: convert into a conflist.
    if conf.get("type").is_none() {
        return Err(bad("neither plugins nor type"));
    }
    let mut list = Map::new();
    for key in ["cniVersion", "name"] {
        if let Some(v) = conf.remove(key) {
            list.insert(key.into(), v);
        }
    }
    if is_ours(&Value::Object(conf.clone())) {
        return Err(bad("the primary config is nodemesh-cni itself"));
    }
    list.insert(
        "plugins".into(),
        Value::Array(vec![Value::Object(conf), entry.clone()]),
    );
    let to = path.with_extension("conflist");
    let to = if to == path {
        path.with_extension("converted.conflist")
    } else {
        to
    };
    let bytes = serde_json::to_vec_pretty(&Value::Object(list)).map_err(|e| bad(&e.to_string()))?;
    write_atomic(&to, &bytes, None)?;
    fs::remove_file(&path).map_err(io(&path))?;
    info!(from = %path.display(), to = %to.display(), "primary .conf converted to a conflist with nodemesh-cni");
    Ok(Sync::Converted { from: path, to })
}

/// Removes our entry from every config in the conf dir (only our entry:
/// the rest of each file is left as it is). Returns the files changed.
pub fn remove_entry(conf_dir: &Path) -> Result<Vec<PathBuf>, InstallError> {
    let mut changed = Vec::new();
    let entries = match fs::read_dir(conf_dir) {
        Ok(e) => e,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(changed),
        Err(e) => return Err(io(conf_dir)(e)),
    };
    let mut paths: Vec<PathBuf> = entries
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.extension().and_then(|e| e.to_str()) == Some("conflist"))
        .collect();
    paths.sort();
    for path in paths {
        let Ok(mut conf) = read_json(&path) else {
            continue;
        };
        let Some(Value::Array(plugins)) = conf.get_mut("plugins") else {
            continue;
        };
        let before = plugins.len();
        plugins.retain(|p| !is_ours(p));
        if plugins.len() != before {
            let bytes = serde_json::to_vec_pretty(&conf).map_err(|e| InstallError::BadConfig {
                path: path.clone(),
                reason: e.to_string(),
            })?;
            write_atomic(&path, &bytes, None)?;
            changed.push(path);
        }
    }
    Ok(changed)
}

/// `uninstall`: removes our conflist entries and our binary.
pub fn uninstall(bin_dir: &Path, conf_dir: &Path) -> Result<Vec<PathBuf>, InstallError> {
    let mut changed = remove_entry(conf_dir)?;
    let bin = bin_dir.join(PLUGIN_TYPE);
    match fs::remove_file(&bin) {
        Ok(()) => changed.push(bin),
        Err(e) if e.kind() == ErrorKind::NotFound => {}
        Err(e) => return Err(io(&bin)(e)),
    }
    Ok(changed)
}

/// Creates or removes the readiness file to match `ready`.
pub fn set_ready(ready_file: Option<&Path>, ready: bool) -> Result<(), InstallError> {
    let Some(path) = ready_file else {
        return Ok(());
    };
    if ready {
        if let Some(dir) = path.parent() {
            fs::create_dir_all(dir).map_err(io(dir))?;
        }
        fs::write(path, b"ready\n").map_err(io(path))
    } else {
        match fs::remove_file(path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io(path)(e)),
        }
    }
}

/// Keeps our entry in place until `stop` is set: re-syncs on every change
/// in the conf dir (create, modify, rename, delete) and every `resync`.
/// `on_sync` sees each outcome (readiness reporting, tests).
pub fn watch(
    conf_dir: &Path,
    entry: &Value,
    resync: Duration,
    stop: &AtomicBool,
    mut on_sync: impl FnMut(&Result<Sync, InstallError>),
) -> Result<(), InstallError> {
    let werr = |source| InstallError::Watch {
        path: conf_dir.to_owned(),
        source,
    };
    fs::create_dir_all(conf_dir).map_err(io(conf_dir))?;
    let inotify = Inotify::init(InitFlags::IN_NONBLOCK | InitFlags::IN_CLOEXEC).map_err(werr)?;
    inotify
        .add_watch(
            conf_dir,
            AddWatchFlags::IN_CREATE
                | AddWatchFlags::IN_CLOSE_WRITE
                | AddWatchFlags::IN_MODIFY
                | AddWatchFlags::IN_MOVED_TO
                | AddWatchFlags::IN_MOVED_FROM
                | AddWatchFlags::IN_DELETE,
        )
        .map_err(werr)?;
    // How often `stop` is looked at while no event comes.
    let tick = Duration::from_millis(200).min(resync);
    let mut next_resync = Instant::now();
    while !stop.load(Ordering::SeqCst) {
        let now = Instant::now();
        let mut changed = now >= next_resync;
        if !changed {
            let wait = next_resync.saturating_duration_since(now).min(tick);
            let timeout = PollTimeout::try_from(wait).unwrap_or(PollTimeout::NONE);
            let mut fds = [PollFd::new(inotify.as_fd(), PollFlags::POLLIN)];
            match poll(&mut fds, timeout) {
                Ok(0) | Err(nix::Error::EINTR) => {}
                Ok(_) => {
                    // Drain; the events themselves do not matter, the dir is re-read.
                    while inotify.read_events().is_ok_and(|e| !e.is_empty()) {}
                    changed = true;
                }
                Err(e) => return Err(werr(e)),
            }
        }
        if changed {
            let outcome = ensure_entry(conf_dir, entry);
            if let Err(e) = &outcome {
                warn!(error = %e, "conflist sync failed; retrying on the next change or resync");
            }
            on_sync(&outcome);
            next_resync = Instant::now() + resync;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests;
