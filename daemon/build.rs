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

fn main() {
    println!("cargo:rustc-link-arg-bins=-Wl,-z,pack-relative-relocs");
    println!("cargo:rerun-if-changed=build.rs");
}
