//! The properties every fuzz target checks, one function per target, shared
//! by the libFuzzer binaries (`fuzz_targets/`) and by the stable-Rust replay
//! of the kept corpus (`daemon/tests/fuzz_corpus.rs`, run by `cargo test`).
//!
//! Each function takes arbitrary bytes and panics only when a property is
//! broken: a parser panicking, or a value that parsed not surviving its own
//! encoding. Every other outcome (including a parse error) is fine.

use std::path::Path;

use nodemesh::handover::proto as handover;
use nodemesh::tunnel::header::{Decoded, Status, StreamHeader};
use nodemesh_cni::proto::{self, FrameError, Request, Response};

/// A target's check: panics when a property is broken.
pub type Check = fn(&[u8]);

/// Every target: its name (= `fuzz_targets/<name>.rs`, `corpus/<name>/`) and check.
pub const TARGETS: &[(&str, Check)] = &[
    ("stream_header", stream_header),
    ("cni_request", cni_request),
    ("handover_message", handover_message),
    ("cni_netconf", cni_netconf),
    ("discovery_file", discovery_file),
    ("config_file", config_file),
    ("tls_files", tls_files),
    ("split_annotations", split_annotations),
];

/// The stream header and status decoders (docs/protocol.md): whatever
/// decodes re-encodes, and the re-encoding decodes to the same value (a
/// status re-encodes to exactly the bytes it was read from).
pub fn stream_header(data: &[u8]) {
    if let Ok(Decoded::Complete(header, used)) = StreamHeader::decode(data) {
        assert!(used <= data.len());
        let mut again = Vec::new();
        header
            .encode(&mut again)
            .expect("a decoded header re-encodes");
        assert_eq!(again.len(), header.encoded_len());
        assert_eq!(
            StreamHeader::decode(&again).expect("re-encoded header decodes"),
            Decoded::Complete(header, again.len())
        );
    }
    if let Ok(Decoded::Complete(status, used)) = Status::decode(data) {
        let mut again = Vec::new();
        status.encode(&mut again);
        assert_eq!(again.as_slice(), &data[..used]);
    }
}

/// Re-encodes `msg` and checks it decodes to itself. A re-encoding is never
/// longer than its source plus the newline, so it is only too long when the
/// source was at the limit.
fn round_trip_line<T>(msg: &T, source_len: usize)
where
    T: serde::Serialize + serde::de::DeserializeOwned + PartialEq + std::fmt::Debug,
{
    match proto::encode_line(msg) {
        Ok(line) => {
            let again: T = proto::decode_line(&line).expect("a re-encoded message decodes");
            assert_eq!(&again, msg);
        }
        Err(FrameError::TooLong) => assert!(source_len + 1 >= proto::MAX_MESSAGE_BYTES),
        Err(e) => panic!("a decoded message does not re-encode: {e}"),
    }
}

/// The CNI socket's JSON-line messages, as the daemon reads requests and the
/// plugin reads responses: no panic, and a decoded message round-trips.
pub fn cni_request(data: &[u8]) {
    if let Ok(req) = proto::decode_line::<Request>(data) {
        round_trip_line(&req, data.len());
    }
    if let Ok(resp) = proto::decode_line::<Response>(data) {
        round_trip_line(&resp, data.len());
    }
}

/// The hand-over socket's JSON-line messages (`nodemesh::handover::proto`):
/// no panic, and a decoded message re-encodes to a line that decodes to
/// itself (never longer than its source, which was within the limit).
pub fn handover_message(data: &[u8]) {
    if let Ok(msg) = handover::decode(data) {
        let line = handover::encode(&msg).expect("a decoded hand-over message re-encodes");
        assert_eq!(handover::decode(&line).expect("re-encoded decodes"), msg);
    }
}

/// The CNI plugin's own inputs: the network configuration on stdin and
/// `CNI_ARGS`, and the `prevResult` addresses. Errors are fine; panics are not.
pub fn cni_netconf(data: &[u8]) {
    if let Ok(conf) = nodemesh_cni::config::NetConf::parse(data) {
        if let Some(prev) = &conf.prev_result {
            let _ = nodemesh_cni::config::prev_ips(prev);
        }
    }
    let _ = nodemesh_cni::config::peek_version(data);
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = nodemesh_cni::config::CniArgs::parse(text);
    }
}

/// The discovery file parser (nodes, pods and whatever the model holds,
/// policies included): no panic on any UTF-8, and a model that parses
/// survives being written back as YAML (the lab and tools write it so).
pub fn discovery_file(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let path = Path::new("fuzz/discovery.yaml");
    if let Ok(model) = nodemesh::discovery::file::parse(text, path) {
        let yaml = serde_yaml::to_string(&model).expect("a parsed model serializes");
        let again = nodemesh::discovery::file::parse(&yaml, path)
            .unwrap_or_else(|e| panic!("a written model parses back: {e}\n{yaml}"));
        assert_eq!(again, model);
    }
}

/// The daemon config file: parse then validate never panic, and a config
/// that parses survives being written back as YAML.
pub fn config_file(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let path = Path::new("fuzz/config.yaml");
    if let Ok(config) = nodemesh::config::Config::from_yaml(text, path) {
        let valid = config.validate().is_ok();
        let yaml = serde_yaml::to_string(&config).expect("a parsed config serializes");
        let again = nodemesh::config::Config::from_yaml(&yaml, path)
            .unwrap_or_else(|e| panic!("a written config parses back: {e}\n{yaml}"));
        assert_eq!(again, config);
        assert_eq!(again.validate().is_ok(), valid);
    }
}

/// The node credential files as the start-up load and the reloader check
/// them (PEM, X.509, keys, bundle, identity): the input is the certificate,
/// key and bundle files separated by NUL bytes. Errors are fine; panics are not.
pub fn tls_files(data: &[u8]) {
    let mut parts = data.splitn(3, |b| *b == 0);
    let files = nodemesh::identity::TlsFiles {
        cert: parts.next().unwrap_or_default().to_vec(),
        key: parts.next().unwrap_or_default().to_vec(),
        bundle: parts.next().unwrap_or_default().to_vec(),
    };
    let tls = nodemesh::config::TlsConfig::default();
    if let Ok(creds) =
        nodemesh::identity::Credentials::from_files(&tls, &files, "cluster.local", "n1")
    {
        assert_eq!(creds.node, "n1");
        assert!(!creds.chain.is_empty());
    }
    let _ = nodemesh::identity::bundle_cas(&files.bundle);
}

/// A Service's traffic-split annotations (`nodemesh.io/split-label`, then
/// after the first newline `nodemesh.io/split-weights`; no newline: the
/// label alone): parsing never panics, an accepted split is valid, and
/// written back in the annotation's syntax it parses to the same split.
pub fn split_annotations(data: &[u8]) {
    use nodemesh::discovery::split_annotations::parse_split;
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let (label, weights) = match text.split_once('\n') {
        Some((l, w)) => (Some(l), Some(w)),
        None => (Some(text), None),
    };
    if let Ok(Some(split)) = parse_split(label, weights) {
        split
            .check()
            .unwrap_or_else(|e| panic!("an accepted split is valid: {e}"));
        let written = split
            .weights
            .iter()
            .map(|(v, w)| format!("{v}={w}"))
            .collect::<Vec<_>>()
            .join(",");
        let again = parse_split(Some(&split.label), Some(&written))
            .unwrap_or_else(|e| panic!("a written split parses back: {e}: {written}"));
        assert_eq!(again, Some(split));
    }
}
