# shellcheck shell=bash
# Shared by the scripts: make this Debian machine able to build and run
# nodemesh (idempotent: installs only what is missing), and answer --help.

NODEMESH_APT_PACKAGES=(iproute2 nftables containernetworking-plugins procps util-linux python3 python3-venv ca-certificates podman runc busybox-static patch)

log() { printf '\033[1m==> %s\033[0m\n' "$*" >&2; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }

# `--help` of a script: its header comment (line 2 up to `set -euo`), printed
# before anything is installed, built or run.
script_help() {
  sed -n '2,/^set -euo/p' "$1" | sed '$d; s/^# \{0,1\}//'
}

# The options of `nodemesh-lab SUBCOMMAND`, from a lab binary already built
# (release first); otherwise says how to see them. Builds nothing.
lab_help() {
  local exe
  for exe in target/release/nodemesh-lab target/debug/nodemesh-lab; do
    if [ -x "$exe" ]; then
      echo
      echo "Options of \`nodemesh-lab $1\` (from $exe), which the script passes on:"
      echo
      "$exe" "$1" --help
      return
    fi
  done
  echo
  echo "Arguments are passed on to \`nodemesh-lab $1\`; once a first run has built it,"
  echo "\`$2 --help\` lists them here too (or: cargo run -p nodemesh-lab -- $1 --help)."
}

ensure_root() {
  [ "$(id -u)" = 0 ] || die "run as root: the lab and the end-to-end tests create network namespaces and nftables rules"
}

ensure_packages() {
  local missing=()
  for p in "${NODEMESH_APT_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  if [ ${#missing[@]} -gt 0 ]; then
    log "installing Debian packages: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  fi
  [ -x /usr/lib/cni/bridge ] || die "containernetworking-plugins installed but /usr/lib/cni/bridge is missing"
}

ensure_rust() {
  if ! command -v cargo >/dev/null 2>&1 && [ -x "$HOME/.cargo/bin/cargo" ]; then
    export PATH="$HOME/.cargo/bin:$PATH"
  fi
  if ! command -v cargo >/dev/null 2>&1; then
    log "no Rust toolchain found; installing rustup from Debian"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq && apt-get install -y -qq rustup >/dev/null 2>&1 \
      && rustup default stable >/dev/null \
      || die "could not install Rust: install a stable toolchain (https://rustup.rs) and re-run"
    export PATH="$HOME/.cargo/bin:$PATH"
  fi
  local v
  v=$(rustc --version | awk '{print $2}')
  case "$v" in
    1.[0-7][0-9].*|1.8[0-4].*) die "Rust $v is too old: nodemesh needs 1.85 or newer (rustup update stable)";;
  esac
}

build_bins() {
  log "building nodemesh, nodemesh-cni and nodemesh-lab"
  cargo build --workspace --bins --quiet
}

# The daemon and the CNI plugin as they ship (scripts/image) and as
# scripts/bench measures them: release, glibc linked statically (crt-static,
# a static PIE) for x86_64. Prints the directory holding them.
NODEMESH_STATIC_TRIPLE=x86_64-unknown-linux-gnu
build_static_bins() {
  [ "$(uname -m)" = x86_64 ] || die "static builds are for x86_64; this machine is $(uname -m)"
  log "building static release binaries (RUSTFLAGS=-C target-feature=+crt-static, --target $NODEMESH_STATIC_TRIPLE)"
  RUSTFLAGS="${RUSTFLAGS:-} -C target-feature=+crt-static" \
    cargo build --release --target "$NODEMESH_STATIC_TRIPLE" -p nodemesh -p nodemesh-cni --bins --quiet
  echo "target/$NODEMESH_STATIC_TRIPLE/release"
}
