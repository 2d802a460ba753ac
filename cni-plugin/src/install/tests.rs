//! Installer tests against conflists shaped like those of common primary
//! CNIs, including the primary rewriting its file while the installer watches.

use std::sync::atomic::AtomicBool;
use std::sync::mpsc;

use serde_json::json;

use super::*;

const BRIDGE: &str = r#"{"cniVersion":"1.0.0","name":"bridge","plugins":[
 {"type":"bridge","bridge":"cni0","isGateway":true,"ipMasq":true,
  "ipam":{"type":"host-local","ranges":[[{"subnet":"10.88.0.0/16"}]],"routes":[{"dst":"0.0.0.0/0"}]}},
 {"type":"portmap","capabilities":{"portMappings":true}},{"type":"firewall"},{"type":"tuning"}]}"#;

const CALICO: &str = r#"{"name":"k8s-pod-network","cniVersion":"0.3.1","plugins":[
 {"type":"calico","log_level":"info","datastore_type":"kubernetes","nodename":"node1","mtu":1440,
  "ipam":{"type":"calico-ipam"},"policy":{"type":"k8s"},
  "kubernetes":{"kubeconfig":"/etc/cni/net.d/calico-kubeconfig"}},
 {"type":"portmap","snat":true,"capabilities":{"portMappings":true}},
 {"type":"bandwidth","capabilities":{"bandwidth":true}}]}"#;

const CILIUM_CONF: &str = r#"{"cniVersion":"0.3.1","name":"cilium","type":"cilium-cni","enable-debug":false,"log-file":"/var/run/cilium/cilium-cni.log"}"#;

const FLANNEL: &str = r#"{"name":"cbr0","cniVersion":"0.3.1","plugins":[
 {"type":"flannel","delegate":{"hairpinMode":true,"isDefaultGateway":true}},
 {"type":"portmap","capabilities":{"portMappings":true}}]}"#;

fn entry() -> Value {
    plugin_entry(&json!({"excluded_namespaces": ["kube-system"]})).expect("entry")
}

fn read(path: &Path) -> Value {
    serde_json::from_slice(&fs::read(path).expect("read")).expect("json")
}

fn with_entry(original: &str) -> Value {
    let mut v: Value = serde_json::from_str(original).expect("json");
    v["plugins"].as_array_mut().expect("plugins").push(entry());
    v
}

#[test]
fn appends_to_common_primary_conflists_and_removes_exactly_that() {
    for (name, text) in [
        ("10-bridge.conflist", BRIDGE),
        ("10-calico.conflist", CALICO),
        ("10-flannel.conflist", FLANNEL),
    ] {
        let dir = tempfile::tempdir().expect("tmp");
        let path = dir.path().join(name);
        fs::write(&path, text).expect("write");
        assert_eq!(
            ensure_entry(dir.path(), &entry()).expect("sync"),
            Sync::Appended(path.clone())
        );
        assert_eq!(read(&path), with_entry(text), "{name}");
        assert_eq!(
            ensure_entry(dir.path(), &entry()).expect("again"),
            Sync::InPlace(path.clone())
        );
        assert_eq!(
            remove_entry(dir.path()).expect("remove"),
            vec![path.clone()]
        );
        assert_eq!(
            read(&path),
            serde_json::from_str::<Value>(text).expect("json"),
            "{name}"
        );
        let files: Vec<_> = fs::read_dir(dir.path()).expect("dir").collect();
        assert_eq!(files.len(), 1, "no standalone config, no temp files left");
    }
}

#[test]
fn converts_a_single_plugin_conf() {
    let dir = tempfile::tempdir().expect("tmp");
    let conf = dir.path().join("05-cilium.conf");
    fs::write(&conf, CILIUM_CONF).expect("write");
    let to = dir.path().join("05-cilium.conflist");
    assert_eq!(
        ensure_entry(dir.path(), &entry()).expect("sync"),
        Sync::Converted {
            from: conf.clone(),
            to: to.clone()
        }
    );
    assert!(!conf.exists());
    assert_eq!(
        read(&to),
        json!({"cniVersion": "0.3.1", "name": "cilium", "plugins": [
            {"type": "cilium-cni", "enable-debug": false, "log-file": "/var/run/cilium/cilium-cni.log"},
            entry()
        ]})
    );
    assert_eq!(
        ensure_entry(dir.path(), &entry()).expect("again"),
        Sync::InPlace(to)
    );
}

#[test]
fn picks_the_first_config_by_name_and_moves_a_stale_entry_last() {
    let dir = tempfile::tempdir().expect("tmp");
    fs::write(dir.path().join("10-calico.conflist"), CALICO).expect("write");
    let mut first: Value = serde_json::from_str(FLANNEL).expect("json");
    // An old entry of ours in the middle, with other settings.
    first["plugins"]
        .as_array_mut()
        .expect("plugins")
        .insert(0, json!({"type": "nodemesh-cni", "timeout_ms": 1}));
    let path = dir.path().join("05-flannel.conflist");
    fs::write(&path, first.to_string()).expect("write");
    fs::write(dir.path().join(".hidden.conflist"), "garbage").expect("write");
    fs::write(dir.path().join("00-readme.txt"), "not a config").expect("write");
    assert_eq!(
        primary_config(dir.path()).expect("primary"),
        Some(path.clone())
    );
    assert_eq!(
        ensure_entry(dir.path(), &entry()).expect("sync"),
        Sync::Appended(path.clone())
    );
    assert_eq!(read(&path), with_entry(FLANNEL));
    // The other conflist is left alone.
    assert_eq!(
        read(&dir.path().join("10-calico.conflist")),
        serde_json::from_str::<Value>(CALICO).expect("json")
    );
}

#[test]
fn empty_dir_is_not_ready_and_broken_config_is_an_error() {
    let dir = tempfile::tempdir().expect("tmp");
    assert_eq!(
        ensure_entry(dir.path(), &entry()).expect("empty"),
        Sync::NoPrimary
    );
    assert!(!Sync::NoPrimary.ready());
    fs::write(dir.path().join("10-x.conflist"), "{not json").expect("write");
    assert!(matches!(
        ensure_entry(dir.path(), &entry()),
        Err(InstallError::BadConfig { .. })
    ));
    assert!(matches!(
        plugin_entry(&json!([1])),
        Err(InstallError::BadEntry(_))
    ));
}

#[test]
fn binary_is_installed_by_rename_and_uninstalled() {
    let dir = tempfile::tempdir().expect("tmp");
    let src = dir.path().join("src-bin");
    fs::write(&src, b"#!/bin/sh\nexit 0\n").expect("write");
    let bin_dir = dir.path().join("bin");
    let conf_dir = dir.path().join("net.d");
    fs::create_dir_all(&conf_dir).expect("mkdir");
    fs::write(conf_dir.join("10-bridge.conflist"), BRIDGE).expect("write");
    let target = install_binary(&src, &bin_dir).expect("install");
    // A running copy keeps its inode: the new one replaces the name only.
    let held = fs::File::open(&target).expect("open");
    install_binary(&src, &bin_dir).expect("reinstall over an open binary");
    drop(held);
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        fs::metadata(&target).expect("meta").permissions().mode() & 0o777,
        0o755
    );
    ensure_entry(&conf_dir, &entry()).expect("sync");
    let removed = uninstall(&bin_dir, &conf_dir).expect("uninstall");
    assert_eq!(
        removed,
        vec![conf_dir.join("10-bridge.conflist"), target.clone()]
    );
    assert!(!target.exists());
    assert_eq!(
        read(&conf_dir.join("10-bridge.conflist")),
        serde_json::from_str::<Value>(BRIDGE).expect("json")
    );
    assert_eq!(
        uninstall(&bin_dir, &conf_dir).expect("twice"),
        Vec::<PathBuf>::new()
    );
}

#[test]
fn ready_file_follows_state() {
    let dir = tempfile::tempdir().expect("tmp");
    let f = dir.path().join("run/ready");
    set_ready(Some(&f), true).expect("ready");
    assert!(f.exists());
    set_ready(Some(&f), false).expect("not ready");
    assert!(!f.exists());
    set_ready(Some(&f), false).expect("idempotent");
    set_ready(None, true).expect("no file");
}

/// Waits (bounded) for the watcher to report a sync matching `pred`.
fn wait_for(rx: &mpsc::Receiver<Sync>, pred: impl Fn(&Sync) -> bool) -> Sync {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let s = rx.recv_timeout(left).expect("watcher reported in time");
        if pred(&s) {
            return s;
        }
    }
}

#[test]
fn watcher_reappends_when_the_primary_rewrites_its_file() {
    let dir = tempfile::tempdir().expect("tmp");
    let conf_dir = dir.path().to_owned();
    let stop = std::sync::Arc::new(AtomicBool::new(false));
    let (tx, rx) = mpsc::channel();
    let handle = {
        let (conf_dir, stop) = (conf_dir.clone(), stop.clone());
        std::thread::spawn(move || {
            // Long resync: only inotify events can explain the re-appends.
            watch(&conf_dir, &entry(), Duration::from_secs(3600), &stop, |r| {
                if let Ok(s) = r {
                    let _ = tx.send(s.clone());
                }
            })
        })
    };
    assert_eq!(wait_for(&rx, |_| true), Sync::NoPrimary);
    let path = conf_dir.join("10-calico.conflist");

    // The primary appears (create + write).
    fs::write(&path, CALICO).expect("write");
    wait_for(&rx, |s| matches!(s, Sync::Appended(_)));
    assert_eq!(read(&path), with_entry(CALICO));

    // The primary rewrites in place (modify), dropping us.
    fs::write(&path, CALICO).expect("rewrite");
    wait_for(&rx, |s| matches!(s, Sync::Appended(_)));
    assert_eq!(read(&path), with_entry(CALICO));

    // The primary rewrites by rename.
    let tmp = conf_dir.join("calico.tmp");
    fs::write(&tmp, CALICO).expect("tmp");
    fs::rename(&tmp, &path).expect("rename");
    wait_for(&rx, |s| matches!(s, Sync::Appended(_)));
    assert_eq!(read(&path), with_entry(CALICO));

    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    handle.join().expect("join").expect("watch ok");
}

#[test]
fn periodic_resync_repairs_without_events() {
    let dir = tempfile::tempdir().expect("tmp");
    fs::write(dir.path().join("10-bridge.conflist"), BRIDGE).expect("write");
    let stop = AtomicBool::new(false);
    let mut syncs = 0;
    watch(dir.path(), &entry(), Duration::from_millis(1), &stop, |r| {
        syncs += 1;
        if syncs >= 3 {
            stop.store(true, std::sync::atomic::Ordering::SeqCst);
        }
        assert!(r.as_ref().is_ok_and(Sync::ready));
    })
    .expect("watch");
    assert_eq!(
        read(&dir.path().join("10-bridge.conflist")),
        with_entry(BRIDGE)
    );
}
