//! Criterion micro-benchmarks of the daemon's per-connection hot paths:
//! the stream header and status codec (`nodemesh::tunnel::header`) and the
//! destination lookup (`nodemesh::registry::Registry::resolve`).
//!
//! Policy evaluation is not benchmarked: `nodemesh::policy` does not exist
//! on main yet. Run: `cargo bench -p nodemesh-lab --bench micro`.

use std::collections::BTreeMap;
use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use nodemesh::discovery::model::{ClusterModel, Node, Pod};
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
    let mut m = ClusterModel {
        nodes: Vec::new(),
        pods: Vec::new(),
    };
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

criterion_group!(benches, codec, resolve);
criterion_main!(benches);
