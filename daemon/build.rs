//! Link flags of the `nodemesh` binary.
//!
//! `-z pack-relative-relocs` stores the binary's relative relocations as
//! DT_RELR (a bitmap, a few KiB) instead of RELA entries (~450 KiB here).
//! The dynamic loader — or, in the static image, glibc's static-PIE start-up
//! — reads every one of them at start, so with RELA they stay resident: a
//! measured part of the daemon's idle RSS (docs/benchmarks.md, "Idle RSS").
//! Needs glibc ≥ 2.36 (Debian 12) and a linker that knows the flag (rustc's
//! bundled lld, GNU ld ≥ 2.38). Only the daemon's binaries get it: tests and
//! other crates link as before.
//!
//! Release builds of the `nodemesh` binary also get
//! `--symbol-ordering-file=link/hot-symbols.txt`: the functions a running
//! daemon executes (start-up, tunnels, relays, metrics), as profiled by
//! `scripts/hot-symbols`, are laid out first and together in `.text`. The
//! kernel maps a binary's pages 64 KiB around each touched page
//! (fault-around), so code spread over the whole text segment keeps most of
//! it resident; packed, only the hot part is. A symbol the file names that
//! the binary lacks is skipped (`--no-warn-symbol-ordering`), so a stale file
//! costs memory, never a build. Only with rustc's bundled lld (the default
//! linker of x86_64-unknown-linux-gnu since Rust 1.90); another linker gets
//! no ordering.

use std::process::Command;

fn main() {
    println!("cargo:rustc-link-arg-bins=-Wl,-z,pack-relative-relocs");
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-env-changed=NODEMESH_NO_SYMBOL_ORDERING");
    if links_with_bundled_lld() && std::env::var_os("NODEMESH_NO_SYMBOL_ORDERING").is_none() {
        // Tracked only where it is used: a new list relinks release builds,
        // and leaves debug and test builds alone.
        println!("cargo:rerun-if-changed=link/hot-symbols.txt");
        let order = std::path::Path::new(&env("CARGO_MANIFEST_DIR")).join("link/hot-symbols.txt");
        println!(
            "cargo:rustc-link-arg-bin=nodemesh=-Wl,--symbol-ordering-file={}",
            order.display()
        );
        println!("cargo:rustc-link-arg-bin=nodemesh=-Wl,--no-warn-symbol-ordering");
    }
}

fn env(name: &str) -> String {
    std::env::var(name).unwrap_or_default()
}

/// Release build for x86_64-unknown-linux-gnu by rustc ≥ 1.90, with no
/// linker of the user's choosing (no `CARGO_TARGET_…_LINKER`, no linker or
/// link flags in `RUSTFLAGS`): the binary is linked by rustc's lld. GNU ld
/// would refuse `--symbol-ordering-file`, so anything else gets no ordering.
fn links_with_bundled_lld() -> bool {
    if env("PROFILE") != "release" || env("TARGET") != "x86_64-unknown-linux-gnu" {
        return false;
    }
    if std::env::var_os("CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_LINKER").is_some()
        || env("CARGO_ENCODED_RUSTFLAGS").contains("link")
    {
        return false;
    }
    let rustc = std::env::var_os("RUSTC").unwrap_or_else(|| "rustc".into());
    let Ok(out) = Command::new(rustc).arg("--version").output() else {
        return false;
    };
    // "rustc 1.95.0 (59807616e 2026-04-14)"
    let version = String::from_utf8_lossy(&out.stdout);
    let mut parts = version
        .split_whitespace()
        .nth(1)
        .unwrap_or("")
        .split('.')
        .map(|p| p.parse::<u32>().unwrap_or(0));
    matches!((parts.next(), parts.next()), (Some(1), Some(minor)) if minor >= 90)
}
