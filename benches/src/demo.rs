//! The demo's per-edge table: connections and bytes per (reporter, source
//! workload, destination workload, route, tls), summed from the daemons'
//! metrics, the number of open tunnels, and each tunnel's path (RTT, packets
//! sent and lost, GSO batch).

use std::collections::BTreeMap;
use std::fmt::Write as _;

use nodemesh::metrics as m;

use crate::metrics::{sum, Sample};

/// Connections opened.
pub const OPENED: &str = "nodemesh_connections_opened_total";
/// Connections closed.
pub const CLOSED: &str = "nodemesh_connections_closed_total";
/// Bytes relayed, by `direction`.
pub const BYTES: &str = "nodemesh_tcp_bytes_total";
/// Open tunnels, by `peer` and `direction` (`dialled` / `accepted`).
pub const TUNNELS: &str = "nodemesh_tunnels_open";

/// One edge of the table.
#[derive(Debug, Clone, Default, PartialEq, Eq, PartialOrd, Ord)]
pub struct EdgeKey {
    /// `src_namespace/src_workload`.
    pub src: String,
    /// `dst_namespace/dst_workload`.
    pub dst: String,
    /// `tunnel`, `local` or `passthrough`.
    pub route: String,
    /// `true` / `false`.
    pub tls: String,
    /// `source` or `destination`.
    pub reporter: String,
}

/// Counters of one edge.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct EdgeStats {
    /// Connections opened.
    pub opened: f64,
    /// Connections closed.
    pub closed: f64,
    /// Bytes source to destination.
    pub src_to_dst: f64,
    /// Bytes destination to source.
    pub dst_to_src: f64,
}

fn key(s: &Sample) -> EdgeKey {
    EdgeKey {
        src: format!("{}/{}", s.label("src_namespace"), s.label("src_workload")),
        dst: format!("{}/{}", s.label("dst_namespace"), s.label("dst_workload")),
        route: s.label("route").to_owned(),
        tls: s.label("tls").to_owned(),
        reporter: s.label("reporter").to_owned(),
    }
}

/// Folds the samples of every node into edges.
pub fn edges(samples: &[Sample]) -> BTreeMap<EdgeKey, EdgeStats> {
    let mut out: BTreeMap<EdgeKey, EdgeStats> = BTreeMap::new();
    for s in samples {
        let field = match (s.name.as_str(), s.label("direction")) {
            (OPENED, _) => |e: &mut EdgeStats, v| e.opened += v,
            (CLOSED, _) => |e: &mut EdgeStats, v| e.closed += v,
            (BYTES, "src_to_dst") => |e: &mut EdgeStats, v| e.src_to_dst += v,
            (BYTES, "dst_to_src") => |e: &mut EdgeStats, v| e.dst_to_src += v,
            _ => continue,
        };
        field(out.entry(key(s)).or_default(), s.value);
    }
    out
}

/// Tunnels this node dialled and holds open (`direction="dialled"`). A
/// connection carries streams both ways and the peer counts it as
/// `accepted`, so summed over nodes this counts each QUIC connection once:
/// at most one per node pair (plus a duplicate from a simultaneous dial
/// while it drains).
pub fn open_tunnels(samples: &[Sample]) -> f64 {
    sum(samples, TUNNELS, &[("direction", "dialled")])
}

/// Tunnels this node holds, whichever side dialled them (each connection
/// is held by both of its nodes).
pub fn held_tunnels(samples: &[Sample]) -> f64 {
    sum(samples, TUNNELS, &[])
}

/// What one daemon's metrics say about its tunnels to one peer node.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TunnelPath {
    /// Peer node.
    pub peer: String,
    /// Smoothed RTT of its newest open tunnel, seconds (0: none open).
    pub rtt_s: f64,
    /// QUIC packets sent.
    pub sent: f64,
    /// Of those, declared lost.
    pub lost: f64,
    /// UDP datagrams sent.
    pub datagrams: f64,
    /// `sendmsg` calls that sent them.
    pub send_calls: f64,
}

impl TunnelPath {
    /// One line: `to n2: RTT 0.41 ms, 2913 packets sent, 0 lost, 12.3 datagrams per sendmsg`.
    pub fn render(&self) -> String {
        let batch = if self.send_calls > 0.0 {
            format!(
                ", {:.1} datagrams per sendmsg",
                self.datagrams / self.send_calls
            )
        } else {
            String::new()
        };
        format!(
            "to {}: RTT {:.2} ms, {:.0} packets sent, {:.0} lost{batch}",
            self.peer,
            self.rtt_s * 1e3,
            self.sent,
            self.lost
        )
    }
}

/// The tunnel paths in one daemon's samples, by peer (peers it has sent to).
pub fn tunnel_paths(samples: &[Sample]) -> Vec<TunnelPath> {
    let mut peers: Vec<&str> = samples
        .iter()
        .filter(|s| s.name == m::TUNNEL_PACKETS_SENT)
        .map(|s| s.label("peer"))
        .collect();
    peers.sort_unstable();
    peers.dedup();
    peers
        .into_iter()
        .map(|peer| {
            let by_peer = [("peer", peer)];
            TunnelPath {
                peer: peer.to_owned(),
                rtt_s: samples
                    .iter()
                    .filter(|s| s.name == m::TUNNEL_RTT && s.label("peer") == peer)
                    .map(|s| s.value)
                    .fold(0.0, f64::max),
                sent: sum(samples, m::TUNNEL_PACKETS_SENT, &by_peer),
                lost: sum(samples, m::TUNNEL_PACKETS_LOST, &by_peer),
                datagrams: sum(samples, m::TUNNEL_UDP_DATAGRAMS_SENT, &by_peer),
                send_calls: sum(samples, m::TUNNEL_UDP_SEND_CALLS, &by_peer),
            }
        })
        .collect()
}

/// The most QUIC connections `nodes` nodes hold: one per node pair.
pub fn max_tunnels(nodes: usize) -> usize {
    nodes * nodes.saturating_sub(1) / 2
}

fn human_bytes(b: f64) -> String {
    const UNITS: [&str; 4] = ["B", "KiB", "MiB", "GiB"];
    let mut v = b;
    let mut unit = 0;
    while v >= 1024.0 && unit < UNITS.len() - 1 {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{v:.0} {}", UNITS[unit])
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
}

/// Renders the table.
pub fn render(edges: &BTreeMap<EdgeKey, EdgeStats>) -> String {
    let header = [
        "SOURCE",
        "DESTINATION",
        "ROUTE",
        "TLS",
        "REPORTER",
        "CONNS",
        "SRC->DST",
        "DST->SRC",
    ];
    let rows: Vec<[String; 8]> = edges
        .iter()
        .map(|(k, v)| {
            [
                k.src.clone(),
                k.dst.clone(),
                k.route.clone(),
                k.tls.clone(),
                k.reporter.clone(),
                format!("{:.0}", v.opened),
                human_bytes(v.src_to_dst),
                human_bytes(v.dst_to_src),
            ]
        })
        .collect();
    let mut widths = header.map(str::len);
    for r in &rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.len());
        }
    }
    let mut out = String::new();
    let mut line = |cells: Vec<&str>| {
        let text: Vec<String> = cells
            .iter()
            .zip(widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        let _ = writeln!(out, "{}", text.join("  ").trim_end());
    };
    line(header.to_vec());
    for r in &rows {
        line(r.iter().map(String::as_str).collect());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::parse;

    #[test]
    fn folds_and_renders_edges() {
        let page = r#"
nodemesh_connections_opened_total{reporter="source",src_namespace="lab",src_workload="a",dst_namespace="lab",dst_workload="b",tls="true",route="tunnel"} 2
nodemesh_tcp_bytes_total{direction="src_to_dst",reporter="source",src_namespace="lab",src_workload="a",dst_namespace="lab",dst_workload="b",tls="true",route="tunnel"} 2097152
nodemesh_tcp_bytes_total{direction="dst_to_src",reporter="source",src_namespace="lab",src_workload="a",dst_namespace="lab",dst_workload="b",tls="true",route="tunnel"} 512
nodemesh_tunnels_open{peer="n2",direction="dialled"} 1
nodemesh_tunnels_open{peer="n3",direction="accepted"} 1
nodemesh_tunnel_packets_sent_total{peer="n2"} 2913
nodemesh_tunnel_packets_lost_total{peer="n2"} 1
nodemesh_tunnel_udp_datagrams_sent_total{peer="n2"} 2913
nodemesh_tunnel_udp_send_calls_total{peer="n2"} 237
nodemesh_tunnel_rtt_seconds{peer="n2",direction="dialled"} 0.00041
nodemesh_tunnel_rtt_seconds{peer="n2",direction="accepted"} 0
"#;
        let samples = parse(page).expect("parse");
        let e = edges(&samples);
        assert_eq!(e.len(), 1);
        let (k, v) = e.iter().next().expect("one edge");
        assert_eq!(k.src, "lab/a");
        assert_eq!(v.opened, 2.0);
        assert_eq!(v.src_to_dst, 2097152.0);
        assert_eq!(open_tunnels(&samples), 1.0);
        assert_eq!(held_tunnels(&samples), 2.0);
        assert_eq!(max_tunnels(3), 3);
        assert_eq!(max_tunnels(2), 1);
        assert_eq!(max_tunnels(1), 0);
        let table = render(&e);
        assert!(
            table.contains("2.0 MiB") && table.contains("512 B"),
            "{table}"
        );
        assert!(table.lines().next().expect("header").starts_with("SOURCE"));

        let paths = tunnel_paths(&samples);
        assert_eq!(paths.len(), 1, "{paths:?}");
        assert_eq!(
            paths[0].render(),
            "to n2: RTT 0.41 ms, 2913 packets sent, 1 lost, 12.3 datagrams per sendmsg"
        );
        assert!(tunnel_paths(&[]).is_empty());
    }
}
