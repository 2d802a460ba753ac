//! The tunnels' QUIC path statistics (quinn's `ConnectionStats`) as metrics
//! and in `/config_dump`: packets sent and lost, congestion events, UDP
//! datagrams and the `sendmsg` calls that sent them, and each connection's
//! current RTT, congestion window and path MTU.
//!
//! quinn keeps cumulative totals per connection. Counters here are per peer
//! node and advance by what a connection added since it was last exported,
//! at every `/metrics` scrape and once more when it closes, so they keep
//! counting across reconnections and nothing a closed connection did is lost.
//! Gauges are per peer and direction (one live connection each, normally)
//! and read 0 once no such connection is open.

use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use quinn::ConnectionStats;

use crate::metrics as m;

use super::pool::Direction;

/// What one connection's path looks like now, for `/config_dump`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PathInfo {
    /// Smoothed round-trip time.
    pub rtt: Duration,
    /// Congestion window, bytes.
    pub cwnd: u64,
    /// Current path MTU (UDP payload), bytes.
    pub mtu: u16,
    /// Totals since the connection opened.
    pub totals: Totals,
}

/// Cumulative totals of one connection.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Totals {
    /// QUIC packets sent.
    pub sent_packets: u64,
    /// QUIC packets declared lost.
    pub lost_packets: u64,
    /// Congestion events (the window was reduced).
    pub congestion_events: u64,
    /// UDP datagrams sent (each GSO segment counts).
    pub tx_datagrams: u64,
    /// `sendmsg` calls that sent them.
    pub tx_ios: u64,
    /// UDP datagrams received. (quinn counts packets, not receive calls,
    /// on this side: the GRO batch is not visible per connection.)
    pub rx_datagrams: u64,
}

impl From<&ConnectionStats> for PathInfo {
    fn from(s: &ConnectionStats) -> Self {
        Self {
            rtt: s.path.rtt,
            cwnd: s.path.cwnd,
            mtu: s.path.current_mtu,
            totals: Totals {
                sent_packets: s.path.sent_packets,
                lost_packets: s.path.lost_packets,
                congestion_events: s.path.congestion_events,
                tx_datagrams: s.udp_tx.datagrams,
                tx_ios: s.udp_tx.ios,
                rx_datagrams: s.udp_rx.datagrams,
            },
        }
    }
}

impl Totals {
    /// What `self` added over `earlier` (0 where a total went backwards,
    /// which quinn's never do).
    fn since(&self, earlier: &Totals) -> Totals {
        Totals {
            sent_packets: self.sent_packets.saturating_sub(earlier.sent_packets),
            lost_packets: self.lost_packets.saturating_sub(earlier.lost_packets),
            congestion_events: self
                .congestion_events
                .saturating_sub(earlier.congestion_events),
            tx_datagrams: self.tx_datagrams.saturating_sub(earlier.tx_datagrams),
            tx_ios: self.tx_ios.saturating_sub(earlier.tx_ios),
            rx_datagrams: self.rx_datagrams.saturating_sub(earlier.rx_datagrams),
        }
    }
}

/// The totals of one connection already added to the counters.
#[derive(Debug, Default)]
pub(super) struct Exported(Mutex<Totals>);

impl Exported {
    /// Adds to the counters of `peer` what the connection did since the last
    /// call. Returns the path as it is now.
    pub(super) fn export(&self, peer: &str, stats: &ConnectionStats) -> PathInfo {
        let now = PathInfo::from(stats);
        let delta = {
            let mut last = self.0.lock().unwrap_or_else(PoisonError::into_inner);
            let delta = now.totals.since(&last);
            *last = now.totals;
            delta
        };
        // Every series exists from the first export on, at 0 if need be
        // (a loss counter that appears only with the first loss breaks rates).
        let counter = |name: &'static str, v: u64| {
            metrics::counter!(name, "peer" => peer.to_owned()).increment(v);
        };
        counter(m::TUNNEL_PACKETS_SENT, delta.sent_packets);
        counter(m::TUNNEL_PACKETS_LOST, delta.lost_packets);
        counter(m::TUNNEL_CONGESTION_EVENTS, delta.congestion_events);
        counter(m::TUNNEL_UDP_DATAGRAMS_SENT, delta.tx_datagrams);
        counter(m::TUNNEL_UDP_DATAGRAMS_RECEIVED, delta.rx_datagrams);
        counter(m::TUNNEL_UDP_SEND_CALLS, delta.tx_ios);
        now
    }
}

/// Sets the gauges of `peer` and `direction` to `path`, or to 0 (`None`:
/// no such connection is open).
pub(super) fn set_gauges(peer: &str, direction: Direction, path: Option<&PathInfo>) {
    let gauge = |name: &'static str| metrics::gauge!(name, "peer" => peer.to_owned(), "direction" => direction.as_str());
    gauge(m::TUNNEL_RTT).set(path.map_or(0.0, |p| p.rtt.as_secs_f64()));
    gauge(m::TUNNEL_CWND).set(path.map_or(0.0, |p| p.cwnd as f64));
    gauge(m::TUNNEL_PATH_MTU).set(path.map_or(0.0, |p| f64::from(p.mtu)));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deltas_never_go_negative_and_cover_every_total() {
        let a = Totals {
            sent_packets: 10,
            lost_packets: 2,
            congestion_events: 1,
            tx_datagrams: 10,
            tx_ios: 2,
            rx_datagrams: 5,
        };
        let b = Totals {
            sent_packets: 25,
            lost_packets: 2,
            congestion_events: 3,
            tx_datagrams: 25,
            tx_ios: 3,
            rx_datagrams: 9,
        };
        assert_eq!(
            b.since(&a),
            Totals {
                sent_packets: 15,
                lost_packets: 0,
                congestion_events: 2,
                tx_datagrams: 15,
                tx_ios: 1,
                rx_datagrams: 4,
            }
        );
        assert_eq!(a.since(&b).sent_packets, 0, "saturates");
        assert_eq!(b.since(&Totals::default()), b);
    }
}
