//! The installer as the DaemonSet runs it: `install --once`, `install`
//! watching until SIGTERM (which must not uninstall), and `uninstall`.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde_json::{json, Value};

const BIN: &str = env!("CARGO_BIN_EXE_nodemesh-cni");
const FLANNEL: &str = r#"{"name":"cbr0","cniVersion":"0.3.1","plugins":[{"type":"flannel","delegate":{"hairpinMode":true,"isDefaultGateway":true}},{"type":"portmap","capabilities":{"portMappings":true}}]}"#;

fn read(path: &Path) -> Value {
    serde_json::from_slice(&std::fs::read(path).expect("read")).expect("json")
}

fn types(path: &Path) -> Vec<String> {
    read(path)["plugins"]
        .as_array()
        .expect("plugins")
        .iter()
        .map(|p| p["type"].as_str().expect("type").to_owned())
        .collect()
}

/// Polls `cond` until true or a bounded deadline (waiting on another process).
fn eventually(what: &str, cond: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn install_once_then_uninstall() {
    let dir = tempfile::tempdir().expect("tmp");
    let (bin_dir, conf_dir) = (dir.path().join("bin"), dir.path().join("net.d"));
    std::fs::create_dir_all(&conf_dir).expect("mkdir");
    let conflist = conf_dir.join("10-flannel.conflist");
    std::fs::write(&conflist, FLANNEL).expect("write");
    let st = Command::new(BIN)
        .args([
            "install",
            "--once",
            "--plugin-config",
            r#"{"timeout_ms": 5000}"#,
        ])
        .arg("--bin-dir")
        .arg(&bin_dir)
        .arg("--conf-dir")
        .arg(&conf_dir)
        .status()
        .expect("run");
    assert!(st.success());
    assert!(bin_dir.join("nodemesh-cni").exists());
    let plugins = read(&conflist)["plugins"].clone();
    assert_eq!(
        plugins[2],
        json!({"type": "nodemesh-cni", "timeout_ms": 5000})
    );
    // The installed copy is a working plugin.
    let out = Command::new(bin_dir.join("nodemesh-cni"))
        .env("CNI_COMMAND", "VERSION")
        .stdin(Stdio::null())
        .output()
        .expect("run copy");
    assert!(String::from_utf8_lossy(&out.stdout).contains("supportedVersions"));
    let st = Command::new(BIN)
        .arg("uninstall")
        .arg("--bin-dir")
        .arg(&bin_dir)
        .arg("--conf-dir")
        .arg(&conf_dir)
        .status()
        .expect("run");
    assert!(st.success());
    assert!(!bin_dir.join("nodemesh-cni").exists());
    assert_eq!(
        read(&conflist),
        serde_json::from_str::<Value>(FLANNEL).expect("json")
    );
}

#[test]
fn install_watches_reports_ready_and_survives_sigterm_installed() {
    let dir = tempfile::tempdir().expect("tmp");
    let (bin_dir, conf_dir) = (dir.path().join("bin"), dir.path().join("net.d"));
    let ready = dir.path().join("ready");
    std::fs::create_dir_all(&conf_dir).expect("mkdir");
    let child = Command::new(BIN)
        .arg("install")
        .arg("--bin-dir")
        .arg(&bin_dir)
        .arg("--conf-dir")
        .arg(&conf_dir)
        .arg("--ready-file")
        .arg(&ready)
        .spawn()
        .expect("spawn installer");
    /// Kills the installer if the test fails before it exits.
    struct Kill(std::process::Child);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let mut guard = Kill(child);
    let pid = Pid::from_raw(i32::try_from(guard.0.id()).expect("pid"));
    // No primary yet: installed binary, but not ready.
    eventually("binary", || bin_dir.join("nodemesh-cni").exists());
    assert!(!ready.exists());
    let conflist = conf_dir.join("10-flannel.conflist");
    std::fs::write(&conflist, FLANNEL).expect("write");
    eventually("entry appended", || {
        std::fs::read(&conflist)
            .ok()
            .and_then(|b| serde_json::from_slice::<Value>(&b).ok())
            .is_some_and(|v| v["plugins"].as_array().is_some_and(|p| p.len() == 3))
    });
    eventually("ready", || ready.exists());
    // The primary rewrites its file: we come back.
    std::fs::write(&conflist, FLANNEL).expect("rewrite");
    eventually("entry re-appended", || {
        std::fs::read(&conflist)
            .ok()
            .and_then(|b| serde_json::from_slice::<Value>(&b).ok())
            .is_some_and(|v| v["plugins"].as_array().is_some_and(|p| p.len() == 3))
    });
    assert_eq!(types(&conflist), ["flannel", "portmap", "nodemesh-cni"]);
    kill(pid, Signal::SIGTERM).expect("SIGTERM");
    let status = guard.0.wait().expect("wait");
    assert!(status.success(), "{status}");
    // Not uninstalled on exit (an upgrade must not unmesh new pods).
    assert_eq!(types(&conflist), ["flannel", "portmap", "nodemesh-cni"]);
    assert!(bin_dir.join("nodemesh-cni").exists());
    assert!(!ready.exists(), "readiness withdrawn on exit");
}
