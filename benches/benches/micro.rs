//! Criterion micro-benchmarks of the daemon's per-connection hot paths:
//! the stream header and status codec (`nodemesh::tunnel::header`), the
//! destination lookup (`nodemesh::registry::Registry::resolve`) and policy
//! evaluation (`nodemesh::policy::authz::PolicyIndex::evaluate`).
//! Run: `cargo bench -p nodemesh-lab --bench micro`.

use std::collections::BTreeMap;
use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use nodemesh::discovery::model::{AuthorizationPolicy, ClusterModel, Node, Pod};
use nodemesh::policy::authz::{Client, Peer, PolicyIndex, Target};
use nodemesh::registry::Registry;
use nodemesh::tunnel::header::{Decoded, Status, StatusCode, StreamHeader};

fn header() -> StreamHeader {
    StreamHeader {
        dst: SocketAddr::new(IpAddr::V4(Ipv4Addr::new(10, 78, 2, 2)), 8080),
        src: SocketAddr::new(IpAddr::V4(Ipv4Addr::new(10, 78, 1, 2)), 49152),
        src_identity: "spiffe://cluster.local/ns/default/sa/frontend".into(),
        flags: 0,
        trace_id: Some([7; 16]),
    }
}

fn codec(c: &mut Criterion) {
    let h = header();
    let mut encoded = Vec::new();
    h.encode(&mut encoded).expect("encodes");
    let mut g = c.benchmark_group("header");
    g.throughput(Throughput::Bytes(encoded.len() as u64));
    g.bench_function("encode", |b| {
        let mut out = Vec::with_capacity(256);
        b.iter(|| {
            out.clear();
            black_box(&h).encode(&mut out).expect("encodes");
            black_box(out.len())
        });
    });
    g.bench_function("decode", |b| {
        b.iter(|| match StreamHeader::decode(black_box(&encoded)) {
            Ok(Decoded::Complete(h, n)) => black_box((h.flags, n)),
            other => panic!("unexpected {other:?}"),
        });
    });
    g.bench_function("decode_partial", |b| {
        let half = &encoded[..encoded.len() / 2];
        b.iter(|| black_box(StreamHeader::decode(black_box(half)).is_ok()));
    });
    g.finish();
    let status = Status::new(StatusCode::Ok);
    let mut st = Vec::new();
    status.encode(&mut st);
    let mut g = c.benchmark_group("status");
    g.throughput(Throughput::Bytes(st.len() as u64));
    g.bench_function("encode", |b| {
        let mut out = Vec::with_capacity(16);
        b.iter(|| {
            out.clear();
            black_box(&status).encode(&mut out);
            black_box(out.len())
        });
    });
    g.bench_function("decode", |b| {
        b.iter(|| black_box(Status::decode(black_box(&st)).is_ok()));
    });
    g.finish();
}

/// `nodes` nodes with `pods` pods each in 10.<n/256>.<n%256>.0/24 style CIDRs.
fn model(nodes: usize, pods: usize) -> ClusterModel {
    let octets = |n: usize| ((n / 256) as u8, (n % 256) as u8);
    let mut m = ClusterModel::default();
    for n in 0..nodes {
        let (a, b) = octets(n);
        m.nodes.push(Node {
            name: format!("node-{n}"),
            address: IpAddr::V4(Ipv4Addr::new(192, 168, a, b)),
            pod_cidrs: vec![format!("10.{a}.{b}.0/24").parse().expect("cidr")],
        });
        for p in 0..pods {
            m.pods.push(Pod {
                namespace: "default".into(),
                name: format!("pod-{n}-{p}"),
                service_account: "default".into(),
                node: format!("node-{n}"),
                ips: vec![IpAddr::V4(Ipv4Addr::new(10, a, b, (p + 2) as u8))],
                labels: BTreeMap::from([("app".to_owned(), format!("app-{p}"))]),
                annotations: BTreeMap::new(),
            });
        }
    }
    m
}

fn resolve(c: &mut Criterion) {
    let mut g = c.benchmark_group("registry_resolve");
    for nodes in [10usize, 100, 1000] {
        let r = Registry::new("node-0", 15008);
        r.apply(&model(nodes, 30));
        let last = nodes - 1;
        let (a, b) = ((last / 256) as u8, (last % 256) as u8);
        let known_pod = IpAddr::V4(Ipv4Addr::new(10, a, b, 5));
        let cidr_only = IpAddr::V4(Ipv4Addr::new(10, a, b, 200));
        let outside = IpAddr::V4(Ipv4Addr::new(172, 16, 0, 1));
        g.throughput(Throughput::Elements(1));
        g.bench_with_input(
            BenchmarkId::new("remote_pod", nodes),
            &known_pod,
            |bch, ip| {
                bch.iter(|| black_box(r.resolve(black_box(*ip))));
            },
        );
        g.bench_with_input(
            BenchmarkId::new("cidr_only", nodes),
            &cidr_only,
            |bch, ip| {
                bch.iter(|| black_box(r.resolve(black_box(*ip))));
            },
        );
        g.bench_with_input(
            BenchmarkId::new("passthrough", nodes),
            &outside,
            |bch, ip| {
                bch.iter(|| black_box(r.resolve(black_box(*ip))));
            },
        );
    }
    g.finish();
}

/// `n` ALLOW policies in namespace `default`, policy `i` selecting
/// `app: app-<i>` and allowing one service account on port 8080, plus one
/// DENY policy for an ip block; written as YAML so the model's own parser
/// builds them.
fn policies(n: usize) -> Vec<AuthorizationPolicy> {
    let mut yaml = String::from(
        "- {name: deny-bad, namespace: default, action: DENY, rules: [{from: [{ipBlocks: [192.0.2.0/24]}]}]}\n",
    );
    for i in 0..n {
        yaml.push_str(&format!(
            "- {{name: allow-{i}, namespace: default, selector: {{matchLabels: {{app: app-{i}}}}}, action: ALLOW, rules: [{{from: [{{serviceAccounts: [default/client-{i}]}}], to: [{{ports: [8080]}}]}}]}}\n"
        ));
    }
    serde_yaml::from_str(&yaml).expect("policies parse")
}

fn policy(c: &mut Criterion) {
    let mut g = c.benchmark_group("policy_evaluate");
    g.throughput(Throughput::Elements(1));
    for n in [1usize, 10, 100] {
        let index = PolicyIndex::build(&policies(n));
        let labels = BTreeMap::from([("app".to_owned(), format!("app-{}", n - 1))]);
        let target = Target {
            namespace: "default",
            labels: &labels,
            port: 8080,
        };
        let principal = format!("spiffe://cluster.local/ns/default/sa/client-{}", n - 1);
        let sa = format!("client-{}", n - 1);
        let allowed = Client {
            identity: Some(Peer {
                principal: &principal,
                namespace: "default",
                service_account: &sa,
            }),
            ip: IpAddr::V4(Ipv4Addr::new(10, 78, 1, 2)),
        };
        let denied = Client {
            identity: None,
            ip: IpAddr::V4(Ipv4Addr::new(10, 78, 1, 3)),
        };
        assert!(index.evaluate(&target, &allowed).is_allow());
        assert!(!index.evaluate(&target, &denied).is_allow());
        g.bench_with_input(BenchmarkId::new("allow", n), &allowed, |b, cl| {
            b.iter(|| black_box(index.evaluate(black_box(&target), black_box(cl)).is_allow()));
        });
        g.bench_with_input(BenchmarkId::new("default_deny", n), &denied, |b, cl| {
            b.iter(|| black_box(index.evaluate(black_box(&target), black_box(cl)).is_allow()));
        });
    }
    g.finish();
}

criterion_group!(benches, codec, resolve, policy);
criterion_main!(benches);
