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
