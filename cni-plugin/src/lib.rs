//! nodemesh-cni: the chained CNI plugin that captures pod traffic into the node daemon.
//!
//! - [`config`]: `CNI_*` environment, `CNI_ARGS`, network configuration.
//! - [`plugin`]: the commands (ADD, DEL, CHECK, VERSION, GC, STATUS).
//! - [`rules`]: the nftables capture ruleset (pure).
//! - [`os`]: the OS edge (netns + nft, daemon socket) behind traits.
//! - [`state`]: DEL queue and GC bookkeeping on disk.
//! - [`install`]: `nodemesh-cni install` / `uninstall` (binary + conflist entry, watcher).
//! - [`cli`]: the installer command line.
//! - [`proto`]: the registration protocol shared with the daemon.

pub mod cli;
pub mod config;
pub mod error;
pub mod install;
pub mod os;
pub mod plugin;
pub mod proto;
pub mod rules;
pub mod state;
