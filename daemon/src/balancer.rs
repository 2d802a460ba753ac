//! Service load balancing: which endpoint a connection to `ClusterIP:port` gets.
//!
//! Owns the service table built from the model's services, the per-endpoint
//! state that survives discovery reloads (connections in flight, outlier
//! ejection), and the choice itself: **power of two choices** on connections
//! in flight among ready, non-ejected endpoints. An endpoint whose connect
//! failed (refused, timed out, `CONNECT_FAILED`/`NO_ROUTE` from L2) is ejected
//! for a window that starts at [`BASE_EJECTION`] and doubles on each failure
//! after it returns, up to [`MAX_EJECTION`]; a success resets it. Unready
//! endpoints get no new connections. When every ready endpoint is ejected, the
//! ejections are ignored (better a likely failure than a certain one).
//!
//! Pure logic, no IO: `outbound_service` does the connecting and retrying.
//! Time is `tokio::time::Instant`, so tests run with paused time.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use tokio::time::Instant;
use tracing::{debug, info};

use crate::discovery::model::{Protocol, Service};
use crate::metrics as m;

/// First ejection window of a failing endpoint.
pub const BASE_EJECTION: Duration = Duration::from_secs(5);
/// Longest ejection window: an endpoint failing for long is still probed
/// about once a minute.
pub const MAX_EJECTION: Duration = Duration::from_secs(60);

/// How long a failing endpoint is avoided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EjectionPolicy {
    /// First window.
    pub base: Duration,
    /// Longest window.
    pub max: Duration,
}

impl Default for EjectionPolicy {
    fn default() -> Self {
        Self {
            base: BASE_EJECTION,
            max: MAX_EJECTION,
        }
    }
}

/// State of one endpoint of one service, kept across reloads.
#[derive(Debug, Default)]
struct EndpointState {
    in_flight: AtomicUsize,
    ejection: Mutex<Ejection>,
}

#[derive(Debug, Default, Clone, Copy)]
struct Ejection {
    /// Ejected until then.
    until: Option<Instant>,
    /// The next window; zero means "base".
    next: Duration,
}

impl EndpointState {
    fn ejection(&self) -> Ejection {
        match self.ejection.lock() {
            Ok(g) => *g,
            Err(p) => *p.into_inner(),
        }
    }

    fn update<R>(&self, f: impl FnOnce(&mut Ejection) -> R) -> R {
        match self.ejection.lock() {
            Ok(mut g) => f(&mut g),
            Err(p) => f(&mut p.into_inner()),
        }
    }

    fn is_ejected(&self, now: Instant) -> bool {
        self.ejection().until.is_some_and(|u| u > now)
    }
}

/// One endpoint of a service port, as the balancer sees it.
#[derive(Debug)]
pub struct Backend {
    /// Where to connect: endpoint IP and the port's target port.
    pub addr: SocketAddr,
    /// The pod behind it (`targetRef`), if known.
    pub pod: Option<String>,
    /// Its node, if known.
    pub node: Option<String>,
    /// Whether it takes new connections.
    pub ready: bool,
    state: Arc<EndpointState>,
}

impl Backend {
    /// Connections in flight to it from this node.
    pub fn in_flight(&self) -> usize {
        self.state.in_flight.load(Ordering::Relaxed)
    }

    /// Whether it is ejected at `now`.
    pub fn is_ejected(&self, now: Instant) -> bool {
        self.state.is_ejected(now)
    }
}

/// One service port: `ClusterIP:port` and its endpoints.
#[derive(Debug)]
pub struct ServiceTarget {
    /// `namespace/name`, the `service` metric label.
    pub service: Arc<str>,
    /// Service namespace.
    pub namespace: String,
    /// Endpoints, ready or not.
    pub backends: Vec<Backend>,
}

#[derive(Debug, Default)]
struct Table {
    by_addr: HashMap<SocketAddr, Arc<ServiceTarget>>,
}

/// The service table and the choice of endpoints. Cheap to share by reference
/// (it lives in the `Registry`).
#[derive(Debug)]
pub struct Balancer {
    table: RwLock<Arc<Table>>,
    rng: AtomicU64,
    policy: EjectionPolicy,
}

impl Default for Balancer {
    fn default() -> Self {
        Self::new(EjectionPolicy::default())
    }
}

impl Balancer {
    /// An empty table with the given ejection windows.
    pub fn new(policy: EjectionPolicy) -> Self {
        // Seed: not security-relevant, only needs to differ between daemons.
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0)
            ^ u64::from(std::process::id()).rotate_left(32);
        Self::with_seed(policy, seed)
    }

    /// An empty table with a fixed random seed (tests).
    pub fn with_seed(policy: EjectionPolicy, seed: u64) -> Self {
        Self {
            table: RwLock::new(Arc::new(Table::default())),
            rng: AtomicU64::new(seed),
            policy,
        }
    }

    fn table(&self) -> Arc<Table> {
        match self.table.read() {
            Ok(g) => g.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }

    /// Replaces the table with `services`' TCP ports on their cluster IPs.
    /// Endpoint state (in flight, ejection) carries over for endpoints that
    /// stay, keyed by service, and endpoint address.
    pub fn apply(&self, services: &[Service]) {
        let old = self.table();
        let mut previous: HashMap<(&str, SocketAddr), &Arc<EndpointState>> = HashMap::new();
        for t in old.by_addr.values() {
            for b in &t.backends {
                previous.insert((&t.service, b.addr), &b.state);
            }
        }
        let mut by_addr = HashMap::new();
        for s in services {
            let service: Arc<str> = format!("{}/{}", s.namespace, s.name).into();
            for p in s.ports.iter().filter(|p| p.protocol == Protocol::Tcp) {
                let backends = s
                    .endpoints
                    .iter()
                    .map(|e| {
                        let addr = SocketAddr::new(e.ip, p.target_port);
                        let state = previous
                            .get(&(&*service, addr))
                            .map(|s| Arc::clone(s))
                            .unwrap_or_default();
                        Backend {
                            addr,
                            pod: e.target_ref.clone(),
                            node: e.node.clone(),
                            ready: e.ready,
                            state,
                        }
                    })
                    .collect();
                let target = Arc::new(ServiceTarget {
                    service: service.clone(),
                    namespace: s.namespace.clone(),
                    backends,
                });
                for ip in &s.cluster_ips {
                    by_addr.insert(SocketAddr::new(*ip, p.port), target.clone());
                }
            }
        }
        let next = Arc::new(Table { by_addr });
        match self.table.write() {
            Ok(mut g) => *g = next,
            Err(p) => *p.into_inner() = next,
        }
    }

    /// The service port at `dst`, if `dst` is a cluster IP and port.
    pub fn lookup(&self, dst: SocketAddr) -> Option<Arc<ServiceTarget>> {
        self.table().by_addr.get(&dst).cloned()
    }

    /// Number of `ClusterIP:port` entries.
    pub fn len(&self) -> usize {
        self.table().by_addr.len()
    }

    /// Whether there are no services.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn next_random(&self) -> u64 {
        // splitmix64 on an atomic counter: lock-free, good enough for P2C.
        let mut z = self
            .rng
            .fetch_add(0x9E37_79B9_7F4A_7C15, Ordering::Relaxed)
            .wrapping_add(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Chooses an endpoint of `target` for a new connection, skipping
    /// `exclude` (endpoints that already failed this connection). `None` when
    /// no ready endpoint is left. The lease counts the connection in flight
    /// until dropped.
    pub fn pick(&self, target: &Arc<ServiceTarget>, exclude: &[SocketAddr]) -> Option<Lease> {
        let index = choose(target, exclude, Instant::now(), &mut |n| {
            // n is small; the modulo bias is negligible.
            (self.next_random() % n as u64) as usize
        })?;
        Some(Lease::new(target.clone(), index, self.policy))
    }
}

/// Power of two choices among the eligible backends; `random(n)` returns a
/// value in `0..n`. Eligible: ready, not excluded, and not ejected at `now`
/// (unless every ready, non-excluded backend is ejected).
pub fn choose(
    target: &ServiceTarget,
    exclude: &[SocketAddr],
    now: Instant,
    random: &mut dyn FnMut(usize) -> usize,
) -> Option<usize> {
    let usable = |b: &Backend| b.ready && !exclude.contains(&b.addr);
    let mut eligible: Vec<usize> = (0..target.backends.len())
        .filter(|&i| usable(&target.backends[i]) && !target.backends[i].is_ejected(now))
        .collect();
    if eligible.is_empty() {
        eligible = (0..target.backends.len())
            .filter(|&i| usable(&target.backends[i]))
            .collect();
        if !eligible.is_empty() {
            debug!(service = %target.service, "every endpoint is ejected; ignoring ejections");
        }
    }
    match eligible.len() {
        0 => None,
        1 => Some(eligible[0]),
        n => {
            let a = random(n) % n;
            let mut b = random(n - 1) % (n - 1);
            if b >= a {
                b += 1;
            }
            let (a, b) = (eligible[a], eligible[b]);
            if target.backends[b].in_flight() < target.backends[a].in_flight() {
                Some(b)
            } else {
                Some(a)
            }
        }
    }
}

/// One connection's claim on an endpoint: counted in flight until dropped;
/// report the connect's outcome with [`Lease::succeeded`] or [`Lease::failed`].
#[derive(Debug)]
pub struct Lease {
    target: Arc<ServiceTarget>,
    index: usize,
    policy: EjectionPolicy,
}

impl Lease {
    fn new(target: Arc<ServiceTarget>, index: usize, policy: EjectionPolicy) -> Self {
        target.backends[index]
            .state
            .in_flight
            .fetch_add(1, Ordering::Relaxed);
        Self {
            target,
            index,
            policy,
        }
    }

    /// The chosen endpoint.
    pub fn backend(&self) -> &Backend {
        &self.target.backends[self.index]
    }

    /// The service.
    pub fn target(&self) -> &Arc<ServiceTarget> {
        &self.target
    }

    /// The connect succeeded: the endpoint's ejection backoff resets.
    pub fn succeeded(&self) {
        self.backend().state.update(|e| *e = Ejection::default());
    }

    /// The connect failed: eject the endpoint. A failure while it is already
    /// ejected (connections that were opened before) does not lengthen the
    /// window. Returns whether this call ejected it.
    pub fn failed(&self) -> bool {
        let now = Instant::now();
        let policy = self.policy;
        let window = self.backend().state.update(|e| {
            if e.until.is_some_and(|u| u > now) {
                return None;
            }
            let window = if e.next.is_zero() {
                policy.base
            } else {
                e.next
            };
            e.until = Some(now + window);
            e.next = (window * 2).min(policy.max);
            Some(window)
        });
        match window {
            Some(window) => {
                info!(
                    service = %self.target.service,
                    endpoint = %self.backend().addr,
                    window_ms = window.as_millis() as u64,
                    "endpoint ejected after a connect failure"
                );
                metrics::counter!(m::ENDPOINT_EJECTIONS, "service" => self.target.service.to_string())
                    .increment(1);
                true
            }
            None => false,
        }
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.backend()
            .state
            .in_flight
            .fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::discovery::model::{Endpoint, ServicePort};
    use proptest::prelude::*;

    fn service(endpoints: &[(&str, bool)]) -> Service {
        Service {
            namespace: "shop".into(),
            name: "web".into(),
            cluster_ips: vec!["10.96.0.10".parse().expect("ip")],
            ports: vec![
                ServicePort {
                    name: Some("http".into()),
                    port: 80,
                    target_port: 8080,
                    protocol: Protocol::Tcp,
                },
                ServicePort {
                    name: Some("dns".into()),
                    port: 53,
                    target_port: 53,
                    protocol: Protocol::Udp,
                },
            ],
            endpoints: endpoints
                .iter()
                .map(|(ip, ready)| Endpoint {
                    ip: ip.parse().expect("ip"),
                    node: None,
                    ready: *ready,
                    target_ref: None,
                })
                .collect(),
        }
    }

    const VIP: &str = "10.96.0.10:80";

    fn balancer(endpoints: &[(&str, bool)]) -> (Balancer, Arc<ServiceTarget>) {
        let b = Balancer::with_seed(EjectionPolicy::default(), 7);
        b.apply(&[service(endpoints)]);
        let t = b.lookup(VIP.parse().expect("addr")).expect("service");
        (b, t)
    }

    fn addr(s: &str) -> SocketAddr {
        s.parse().expect("addr")
    }

    #[test]
    fn lookup_is_by_cluster_ip_and_tcp_port() {
        let (b, t) = balancer(&[("10.78.1.2", true)]);
        assert_eq!(&*t.service, "shop/web");
        assert_eq!(t.backends[0].addr, addr("10.78.1.2:8080"));
        assert!(b.lookup(addr("10.96.0.10:81")).is_none());
        assert!(
            b.lookup(addr("10.96.0.10:53")).is_none(),
            "UDP is not proxied"
        );
        assert_eq!(b.len(), 1);
    }

    #[test]
    fn unready_endpoints_get_nothing() {
        let (b, t) = balancer(&[("10.78.1.2", false), ("10.78.1.3", true)]);
        for _ in 0..50 {
            let l = b.pick(&t, &[]).expect("pick");
            assert_eq!(l.backend().addr, addr("10.78.1.3:8080"));
        }
        let (b, t) = balancer(&[("10.78.1.2", false)]);
        assert!(b.pick(&t, &[]).is_none());
    }

    #[test]
    fn excluded_endpoints_are_skipped() {
        let (b, t) = balancer(&[("10.78.1.2", true), ("10.78.1.3", true)]);
        for _ in 0..20 {
            let l = b.pick(&t, &[addr("10.78.1.2:8080")]).expect("pick");
            assert_eq!(l.backend().addr, addr("10.78.1.3:8080"));
        }
        assert!(b
            .pick(&t, &[addr("10.78.1.2:8080"), addr("10.78.1.3:8080")])
            .is_none());
    }

    #[test]
    fn leases_count_in_flight_and_p2c_spreads_them() {
        let (b, t) = balancer(&[
            ("10.78.1.2", true),
            ("10.78.1.3", true),
            ("10.78.2.2", true),
        ]);
        let leases: Vec<Lease> = (0..300).map(|_| b.pick(&t, &[]).expect("pick")).collect();
        let counts: Vec<usize> = t.backends.iter().map(Backend::in_flight).collect();
        assert_eq!(counts.iter().sum::<usize>(), 300);
        // P2C never picks a unique maximum, so held connections stay close.
        let (min, max) = (counts.iter().min(), counts.iter().max());
        assert!(max.zip(min).is_some_and(|(a, b)| a - b <= 10), "{counts:?}");
        drop(leases);
        assert!(t.backends.iter().all(|b| b.in_flight() == 0));
    }

    #[tokio::test(start_paused = true)]
    async fn ejection_window_doubles_to_the_cap_and_resets_on_success() {
        let (b, t) = balancer(&[("10.78.1.2", true), ("10.78.1.3", true)]);
        let bad = addr("10.78.1.2:8080");
        // Only the bad endpoint, ejected or not, once the other is excluded.
        let lease_bad = || {
            let l = b.pick(&t, &[addr("10.78.1.3:8080")]).expect("pick");
            assert_eq!(l.backend().addr, bad);
            l
        };
        let mut expected = Vec::new();
        let mut windows = Vec::new();
        for _ in 0..6 {
            let l = lease_bad();
            assert!(l.failed(), "a failure outside a window ejects");
            // A second failure inside the window does not lengthen it.
            assert!(!lease_bad().failed());
            let start = Instant::now();
            // Ejected: every pick goes to the other endpoint.
            for _ in 0..10 {
                assert_ne!(b.pick(&t, &[]).expect("pick").backend().addr, bad);
            }
            // Find the window end to the second.
            let mut waited = Duration::ZERO;
            while t.backends[0].is_ejected(Instant::now()) {
                tokio::time::advance(Duration::from_secs(1)).await;
                waited += Duration::from_secs(1);
            }
            assert_eq!(Instant::now() - start, waited);
            windows.push(waited.as_secs());
            expected.push(expected.last().map_or(5, |w: &u64| (w * 2).min(60)));
        }
        assert_eq!(windows, expected);
        assert_eq!(windows, [5, 10, 20, 40, 60, 60]);

        // Success resets the backoff: the next failure ejects for 5 s again.
        lease_bad().succeeded();
        assert!(lease_bad().failed());
        tokio::time::advance(Duration::from_secs(5)).await;
        assert!(!t.backends[0].is_ejected(Instant::now()));
    }

    #[tokio::test(start_paused = true)]
    async fn all_ejected_falls_back_to_ready_endpoints() {
        let (b, t) = balancer(&[("10.78.1.2", true), ("10.78.1.3", false)]);
        assert!(b.pick(&t, &[]).expect("pick").failed());
        let l = b.pick(&t, &[]).expect("ejected but the only ready one");
        assert_eq!(l.backend().addr, addr("10.78.1.2:8080"));
    }

    #[tokio::test(start_paused = true)]
    async fn state_survives_a_reload_of_the_same_endpoints() {
        let (b, t) = balancer(&[("10.78.1.2", true), ("10.78.1.3", true)]);
        let held = b.pick(&t, &[]).expect("pick");
        let held_addr = held.backend().addr;
        let other = t
            .backends
            .iter()
            .find(|x| x.addr != held_addr)
            .expect("other");
        let other_addr = other.addr;
        assert!(b.pick(&t, &[held_addr]).expect("pick").failed());
        // Reload: same endpoints plus one.
        b.apply(&[service(&[
            ("10.78.1.2", true),
            ("10.78.1.3", true),
            ("10.78.2.9", true),
        ])]);
        let t2 = b.lookup(addr(VIP)).expect("service");
        let find = |a: SocketAddr| t2.backends.iter().find(|x| x.addr == a).expect("kept");
        assert_eq!(find(held_addr).in_flight(), 1);
        assert!(find(other_addr).is_ejected(Instant::now()));
        drop(held);
        assert_eq!(find(held_addr).in_flight(), 0);
    }

    fn target_with(in_flight: &[usize], ready: &[bool], ejected: &[bool]) -> ServiceTarget {
        let now = Instant::now();
        ServiceTarget {
            service: "t/t".into(),
            namespace: "t".into(),
            backends: in_flight
                .iter()
                .enumerate()
                .map(|(i, n)| {
                    let state = EndpointState::default();
                    state.in_flight.store(*n, Ordering::Relaxed);
                    if ejected[i] {
                        state.update(|e| e.until = Some(now + Duration::from_secs(5)));
                    }
                    Backend {
                        addr: SocketAddr::from(([10, 0, 0, i as u8], 80)),
                        pod: None,
                        node: None,
                        ready: ready[i],
                        state: Arc::new(state),
                    }
                })
                .collect(),
        }
    }

    proptest! {
        #[test]
        fn p2c_picks_only_eligible_and_never_a_unique_maximum(
            spec in prop::collection::vec((0usize..20, any::<bool>(), any::<bool>(), any::<bool>()), 1..8),
            seeds in prop::collection::vec(any::<usize>(), 2),
        ) {
            let in_flight: Vec<usize> = spec.iter().map(|s| s.0).collect();
            let ready: Vec<bool> = spec.iter().map(|s| s.1).collect();
            let ejected: Vec<bool> = spec.iter().map(|s| s.2).collect();
            let excluded: Vec<SocketAddr> = spec
                .iter()
                .enumerate()
                .filter(|(_, s)| s.3)
                .map(|(i, _)| SocketAddr::from(([10, 0, 0, i as u8], 80)))
                .collect();
            let t = target_with(&in_flight, &ready, &ejected);
            let mut k = 0;
            let mut random = |n: usize| { k += 1; seeds[k % 2] % n };
            let usable: Vec<usize> = (0..spec.len())
                .filter(|&i| ready[i] && !excluded.contains(&t.backends[i].addr))
                .collect();
            let healthy: Vec<usize> = usable.iter().copied().filter(|&i| !ejected[i]).collect();
            let pool = if healthy.is_empty() { usable.clone() } else { healthy };
            match choose(&t, &excluded, Instant::now(), &mut random) {
                None => prop_assert!(usable.is_empty()),
                Some(i) => {
                    prop_assert!(pool.contains(&i), "picked {i} outside {pool:?}");
                    let max = pool.iter().map(|&j| in_flight[j]).max().unwrap_or(0);
                    let at_max = pool.iter().filter(|&&j| in_flight[j] == max).count();
                    if pool.len() >= 2 && at_max == 1 {
                        prop_assert!(in_flight[i] < max, "picked the unique maximum");
                    }
                }
            }
        }

        #[test]
        fn p2c_with_held_leases_stays_balanced(seed in any::<u64>(), n in 2usize..6) {
            let b = Balancer::with_seed(EjectionPolicy::default(), seed);
            let ips: Vec<String> = (0..n).map(|i| format!("10.78.1.{}", i + 2)).collect();
            let eps: Vec<(&str, bool)> = ips.iter().map(|s| (s.as_str(), true)).collect();
            b.apply(&[service(&eps)]);
            let t = b.lookup(addr(VIP)).expect("service");
            let _leases: Vec<Lease> = (0..60 * n).map(|_| b.pick(&t, &[]).expect("pick")).collect();
            let counts: Vec<usize> = t.backends.iter().map(Backend::in_flight).collect();
            // Each endpoint gets at least half its fair share of 60.
            prop_assert!(counts.iter().all(|&c| c >= 30), "{counts:?}");
        }
    }
}
