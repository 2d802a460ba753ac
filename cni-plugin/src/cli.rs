//! The installer's command line: `nodemesh-cni install` and
//! `nodemesh-cni uninstall` (runtimes call the plugin with no arguments,
//! so any argument selects this mode).

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use clap::{Parser, Subcommand};
use nix::sys::signal::{SigSet, Signal};
use tracing::{info, warn};

use crate::install::{
    ensure_entry, install_binary, plugin_entry, set_ready, uninstall, watch, InstallError,
    DEFAULT_BIN_DIR, DEFAULT_CONF_DIR,
};

/// `nodemesh-cni` installer commands.
#[derive(Debug, Parser)]
#[command(
    name = "nodemesh-cni",
    about = "nodemesh chained CNI plugin: installer"
)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Cmd,
}

/// Installer subcommands.
#[derive(Debug, Subcommand)]
pub enum Cmd {
    /// Copy the binary into the CNI bin dir, append the plugin to the
    /// primary conflist, and keep it there (until SIGTERM, unless --once).
    /// Exiting never uninstalls: an upgrade leaves new pods waiting for the
    /// new daemon instead of starting unmeshed.
    Install {
        /// CNI binary directory.
        #[arg(long, env = "NODEMESH_CNI_BIN_DIR", default_value = DEFAULT_BIN_DIR)]
        bin_dir: PathBuf,
        /// CNI configuration directory.
        #[arg(long, env = "NODEMESH_CNI_CONF_DIR", default_value = DEFAULT_CONF_DIR)]
        conf_dir: PathBuf,
        /// Our keys for the conflist entry, as a JSON object (see docs/cni.md).
        #[arg(long, env = "NODEMESH_CNI_PLUGIN_CONFIG", default_value = "{}")]
        plugin_config: String,
        /// File that exists only while the entry is in place (readiness probe).
        #[arg(long, env = "NODEMESH_CNI_READY_FILE")]
        ready_file: Option<PathBuf>,
        /// Full resync period in seconds, besides inotify events.
        #[arg(long, default_value_t = 30)]
        resync_secs: u64,
        /// Sync once and exit instead of watching.
        #[arg(long)]
        once: bool,
    },
    /// Exit 0 while the ready file exists, 1 otherwise: the install-cni
    /// container's readiness probe (the image has no shell and no `cat`).
    Ready {
        /// The file `install --ready-file` maintains.
        #[arg(long, env = "NODEMESH_CNI_READY_FILE")]
        ready_file: PathBuf,
    },
    /// Remove exactly what install added: our conflist entry and our binary.
    Uninstall {
        /// CNI binary directory.
        #[arg(long, env = "NODEMESH_CNI_BIN_DIR", default_value = DEFAULT_BIN_DIR)]
        bin_dir: PathBuf,
        /// CNI configuration directory.
        #[arg(long, env = "NODEMESH_CNI_CONF_DIR", default_value = DEFAULT_CONF_DIR)]
        conf_dir: PathBuf,
    },
}

/// Installer failures, including bad flags.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// `--plugin-config` is not JSON.
    #[error("--plugin-config is not JSON: {0}")]
    PluginConfig(serde_json::Error),
    /// The path of the running binary is unknown.
    #[error("cannot find the running binary: {0}")]
    CurrentExe(std::io::Error),
    /// The ready file is absent: the entry is not (yet) in the primary conflist.
    #[error("not ready: {0} does not exist (the plugin entry is not in the primary CNI conflist yet; see the install-cni container's log)")]
    NotReady(PathBuf),
    /// Blocking or waiting for signals failed.
    #[error("signal handling: {0}")]
    Signal(nix::Error),
    /// The install itself failed.
    #[error(transparent)]
    Install(#[from] InstallError),
}

/// Runs an installer command.
pub fn run(cli: Cli) -> Result<(), CliError> {
    match cli.command {
        Cmd::Ready { ready_file } => {
            if ready_file.exists() {
                Ok(())
            } else {
                Err(CliError::NotReady(ready_file))
            }
        }
        Cmd::Uninstall { bin_dir, conf_dir } => {
            for path in uninstall(&bin_dir, &conf_dir)? {
                info!(path = %path.display(), "removed");
            }
            Ok(())
        }
        Cmd::Install {
            bin_dir,
            conf_dir,
            plugin_config,
            ready_file,
            resync_secs,
            once,
        } => {
            let extra = serde_json::from_str(&plugin_config).map_err(CliError::PluginConfig)?;
            let entry = plugin_entry(&extra)?;
            let exe = std::env::current_exe().map_err(CliError::CurrentExe)?;
            let target = install_binary(&exe, &bin_dir)?;
            info!(binary = %target.display(), "binary installed");
            if once {
                let sync = ensure_entry(&conf_dir, &entry)?;
                set_ready(ready_file.as_deref(), sync.ready())?;
                info!(?sync, "conflist synced");
                return Ok(());
            }
            // Block SIGTERM/SIGINT before any thread exists, then wait for them.
            let mut signals = SigSet::empty();
            signals.add(Signal::SIGTERM);
            signals.add(Signal::SIGINT);
            signals.thread_block().map_err(CliError::Signal)?;
            let stop = Arc::new(AtomicBool::new(false));
            let watcher = {
                let stop = stop.clone();
                let ready_file = ready_file.clone();
                std::thread::spawn(move || {
                    watch(
                        &conf_dir,
                        &entry,
                        Duration::from_secs(resync_secs.max(1)),
                        &stop,
                        |r| {
                            let ready = r.as_ref().is_ok_and(crate::install::Sync::ready);
                            if let Err(e) = set_ready(ready_file.as_deref(), ready) {
                                warn!(error = %e, "cannot update the readiness file");
                            }
                        },
                    )
                })
            };
            let sig = signals.wait().map_err(CliError::Signal)?;
            info!(signal = ?sig, "stopping the watcher; the plugin stays installed");
            stop.store(true, Ordering::SeqCst);
            let result = watcher.join();
            set_ready(ready_file.as_deref(), false)?;
            match result {
                Ok(r) => r.map_err(CliError::from),
                Err(_) => Ok(()),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_follows_the_ready_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("ready");
        let cli = |f: &std::path::Path| {
            Cli::try_parse_from([
                "nodemesh-cni",
                "ready",
                "--ready-file",
                f.to_str().expect("utf-8"),
            ])
            .expect("parses")
        };
        assert!(matches!(run(cli(&file)), Err(CliError::NotReady(p)) if p == file));
        std::fs::write(&file, b"").expect("write");
        assert!(run(cli(&file)).is_ok());
    }
}
