//! Stable-Rust replay of the kept fuzz corpus (`daemon/fuzz/corpus/<target>/`)
//! through the same checks the libFuzzer targets run (`daemon/fuzz/src/lib.rs`),
//! so `cargo test` guards every input the fuzzer ever found interesting even
//! where libFuzzer cannot run. Fuzzing itself: `scripts/fuzz`.

#[path = "../fuzz/src/lib.rs"]
#[allow(dead_code)]
mod checks;

use std::path::Path;

#[test]
fn every_target_has_a_corpus_and_every_kept_input_passes() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus");
    for (target, check) in checks::TARGETS {
        let dir = root.join(target);
        let mut inputs: Vec<_> = std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("corpus {}: {e}", dir.display()))
            .map(|e| e.expect("dir entry").path())
            .filter(|p| p.is_file())
            .collect();
        inputs.sort();
        assert!(!inputs.is_empty(), "corpus {} is empty", dir.display());
        for input in inputs {
            let data = std::fs::read(&input).expect("read corpus input");
            let outcome = std::panic::catch_unwind(|| check(&data));
            assert!(
                outcome.is_ok(),
                "{target}: {} breaks a property (reproduce: scripts/fuzz --reproduce {target} {})",
                input.display(),
                input.display()
            );
        }
    }
}

#[test]
fn the_fuzz_crate_declares_every_target() {
    let manifest =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/Cargo.toml"))
            .expect("fuzz/Cargo.toml");
    for (target, _) in checks::TARGETS {
        assert!(
            manifest.contains(&format!("path = \"fuzz_targets/{target}.rs\"")),
            "{target} missing from daemon/fuzz/Cargo.toml"
        );
    }
}

fn seed(target: &str, name: &str) -> Vec<u8> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/corpus")
        .join(target)
        .join(name);
    std::fs::read(&path).unwrap_or_else(|e| panic!("seed {}: {e}", path.display()))
}

fn seed_text(target: &str, name: &str) -> String {
    String::from_utf8(seed(target, name)).expect("UTF-8 seed")
}

/// The hand-written `seed-*` inputs are valid, so the fuzzer starts from the
/// real formats (and a format change that breaks them shows up here).
#[test]
fn hand_written_seeds_are_valid_inputs() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus");
    for (target, _) in checks::TARGETS {
        let seeds = std::fs::read_dir(root.join(target))
            .expect("corpus dir")
            .filter(|e| {
                e.as_ref()
                    .is_ok_and(|e| e.file_name().to_string_lossy().starts_with("seed-"))
            })
            .count();
        assert!(seeds > 0, "{target} has no hand-written seed-* input");
    }

    use nodemesh::tunnel::header::{Decoded, Status, StreamHeader};
    for name in ["seed-v4", "seed-v6"] {
        assert!(matches!(
            StreamHeader::decode(&seed("stream_header", name)),
            Ok(Decoded::Complete(..))
        ));
    }
    for name in ["seed-status-ok", "seed-status-denied"] {
        assert!(matches!(
            Status::decode(&seed("stream_header", name)),
            Ok(Decoded::Complete(..))
        ));
    }

    use nodemesh_cni::proto::{decode_line, Request, Response};
    for name in [
        "seed-register",
        "seed-unregister",
        "seed-check",
        "seed-status",
    ] {
        decode_line::<Request>(&seed("cni_request", name)).expect(name);
    }
    for name in [
        "seed-registered",
        "seed-error",
        "seed-ready",
        "seed-skipped",
    ] {
        decode_line::<Response>(&seed("cni_request", name)).expect(name);
    }

    for name in [
        "seed-hello",
        "seed-welcome",
        "seed-stop_cni",
        "seed-take_over",
        "seed-error_escapes",
    ] {
        nodemesh::handover::proto::decode(&seed("handover_message", name)).expect(name);
    }

    for name in ["seed-add", "seed-gc"] {
        nodemesh_cni::config::NetConf::parse(&seed("cni_netconf", name))
            .unwrap_or_else(|e| panic!("{name}: {e:?}"));
    }
    nodemesh_cni::config::CniArgs::parse(&seed_text("cni_netconf", "seed-args"))
        .unwrap_or_else(|e| panic!("seed-args: {e:?}"));

    let model = nodemesh::discovery::file::parse(
        &seed_text("discovery_file", "seed-docs"),
        Path::new("seed-docs"),
    )
    .expect("discovery seed");
    assert_eq!(model.nodes.len(), 2);

    for name in ["seed-full", "seed-minimal"] {
        nodemesh::config::Config::from_yaml(&seed_text("config_file", name), Path::new(name))
            .expect(name)
            .validate()
            .expect(name);
    }

    let data = seed("tls_files", "seed-valid");
    let mut parts = data.splitn(3, |b| *b == 0);
    let mut next = || parts.next().expect("three NUL-separated files").to_vec();
    let files = nodemesh::identity::TlsFiles {
        cert: next(),
        key: next(),
        bundle: next(),
    };
    nodemesh::identity::Credentials::from_files(
        &nodemesh::config::TlsConfig::default(),
        &files,
        "cluster.local",
        "n1",
    )
    .expect("tls seed");
}
