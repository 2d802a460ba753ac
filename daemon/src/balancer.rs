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
//! **Traffic split** (a canary): a service with a [`TrafficSplit`] groups its
//! endpoints by the value of one label of the pod behind each (found by the
//! endpoint's `targetRef`, else by its IP). A connection first picks a group
//! at random in proportion to its weight, among the groups that have at least
//! one *usable* endpoint (ready, not ejected, not already tried by this
//! connection), then an endpoint of that group by power of two choices. So:
//! - a group with no usable endpoint gives its share to the others, in
//!   proportion to their weights (availability first: a split never refuses a
//!   connection a plain service would serve), and an ejection inside a group
//!   moves its traffic to the group's other endpoints first;
//! - a group of weight 0 gets no new connections, and neither do endpoints
//!   whose pod lacks the label or has a value the split does not list, while
//!   any group of weight above 0 is usable;
//! - when none is, the choice falls back to the plain behaviour above over
//!   every ready endpoint of the service, whatever its group.
//!
//! Each choice made under a split is counted in
//! `nodemesh_traffic_split_picks_total{service, group}`.
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

use crate::discovery::model::{Pod, Protocol, Service, TrafficSplit};
use crate::metrics as m;

/// `group` label of [`m::SPLIT_PICKS`] for an endpoint outside the split (its
/// pod lacks the label, or has a value the split does not list). It cannot
/// clash with a Kubernetes label value, which starts with an alphanumeric.
pub const UNLISTED_GROUP: &str = "_unlisted";

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
    /// Under a traffic split: the value of the split's label on the pod
    /// behind it, if the pod is known and has the label.
    pub group: Option<String>,
    /// Under a traffic split: the index of its group in
    /// [`Split::groups`], if the split lists its value.
    weighted: Option<usize>,
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

    /// Under a traffic split: whether the split lists its group.
    pub fn in_split(&self) -> bool {
        self.weighted.is_some()
    }
}

/// A service's traffic split as the balancer applies it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Split {
    /// The pod label naming each endpoint's group.
    pub label: String,
    /// Label value and weight of each group, in the order written.
    pub groups: Vec<(String, u32)>,
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
    /// The weighted split between groups of endpoints, if any.
    pub split: Option<Split>,
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

    /// Replaces the table with `services`' TCP ports on their cluster IPs;
    /// `pods` give the labels that place endpoints in a traffic split's
    /// groups. Endpoint state (in flight, ejection) carries over for
    /// endpoints that stay, keyed by service, and endpoint address, whatever
    /// happens to the split or the endpoint's group.
    pub fn apply(&self, services: &[Service], pods: &[Pod]) {
        let pods_by_name: HashMap<(&str, &str), &Pod> = pods
            .iter()
            .map(|p| ((p.namespace.as_str(), p.name.as_str()), p))
            .collect();
        let pods_by_ip: HashMap<std::net::IpAddr, &Pod> = pods
            .iter()
            .flat_map(|p| p.ips.iter().map(move |ip| (*ip, p)))
            .collect();
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
            // The group of each endpoint: its pod's value of the split label.
            let groups: Vec<(Option<String>, Option<usize>)> = s
                .endpoints
                .iter()
                .map(|e| {
                    let Some(split) = &s.split else {
                        return (None, None);
                    };
                    let pod = e
                        .target_ref
                        .as_deref()
                        .and_then(|n| pods_by_name.get(&(s.namespace.as_str(), n)))
                        .or_else(|| pods_by_ip.get(&e.ip));
                    let value = pod.and_then(|p| p.labels.get(&split.label)).cloned();
                    let index = value
                        .as_deref()
                        .and_then(|v| split.weights.iter().position(|(w, _)| w == v));
                    (value, index)
                })
                .collect();
            let split = s.split.as_ref().map(|t: &TrafficSplit| Split {
                label: t.label.clone(),
                groups: t.weights.clone(),
            });
            for p in s.ports.iter().filter(|p| p.protocol == Protocol::Tcp) {
                let backends = s
                    .endpoints
                    .iter()
                    .zip(&groups)
                    .map(|(e, (group, weighted))| {
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
                            group: group.clone(),
                            weighted: *weighted,
                            state,
                        }
                    })
                    .collect();
                let target = Arc::new(ServiceTarget {
                    service: service.clone(),
                    namespace: s.namespace.clone(),
                    backends,
                    split: split.clone(),
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
            // n is small (endpoints, or the sum of a split's weights, at most
            // MAX_SPLIT_WEIGHT per group); the modulo bias is negligible.
            (self.next_random() % n as u64) as usize
        })?;
        if target.split.is_some() {
            let b = &target.backends[index];
            let group = match (b.weighted, &b.group) {
                (Some(_), Some(g)) => g.clone(),
                _ => UNLISTED_GROUP.to_owned(),
            };
            metrics::counter!(m::SPLIT_PICKS, "service" => target.service.to_string(), "group" => group)
                .increment(1);
        }
        Some(Lease::new(target.clone(), index, self.policy))
    }
}

/// Chooses a backend; `random(n)` returns a value in `0..n`. Under a traffic
/// split, first a group (see [`choose_in_split`]); otherwise, or when no
/// group of the split has a usable endpoint, power of two choices among the
/// eligible backends. Eligible: ready, not excluded, and not ejected at `now`
/// (unless every ready, non-excluded backend is ejected).
pub fn choose(
    target: &ServiceTarget,
    exclude: &[SocketAddr],
    now: Instant,
    random: &mut dyn FnMut(usize) -> usize,
) -> Option<usize> {
    let usable = |b: &Backend| b.ready && !exclude.contains(&b.addr);
    if let Some(split) = &target.split {
        if let Some(i) = choose_in_split(target, split, exclude, now, random) {
            return Some(i);
        }
        debug!(service = %target.service, label = %split.label,
            "no group of the traffic split has a usable endpoint; balancing over every ready endpoint");
    }
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
    p2c(target, &eligible, random)
}

/// The traffic split's choice: a group at random in proportion to its weight
/// among the groups with a usable endpoint (ready, not excluded, not ejected
/// at `now`), then power of two choices among that group's usable endpoints.
/// `None` when no group of weight above 0 has a usable endpoint.
pub fn choose_in_split(
    target: &ServiceTarget,
    split: &Split,
    exclude: &[SocketAddr],
    now: Instant,
    random: &mut dyn FnMut(usize) -> usize,
) -> Option<usize> {
    let mut members: Vec<Vec<usize>> = vec![Vec::new(); split.groups.len()];
    for (i, b) in target.backends.iter().enumerate() {
        if let Some(g) = b.weighted {
            if b.ready && !exclude.contains(&b.addr) && !b.is_ejected(now) {
                members[g].push(i);
            }
        }
    }
    let live = |g: usize| !members[g].is_empty() && split.groups[g].1 > 0;
    let total: usize = (0..split.groups.len())
        .filter(|&g| live(g))
        .map(|g| split.groups[g].1 as usize)
        .sum();
    if total == 0 {
        return None;
    }
    let mut r = random(total) % total;
    for (g, (_, weight)) in split.groups.iter().enumerate() {
        if !live(g) {
            continue;
        }
        let weight = *weight as usize;
        if r < weight {
            return p2c(target, &members[g], random);
        }
        r -= weight;
    }
    None
}

/// Power of two choices among `eligible` (indices into the backends): two
/// distinct ones at random, the one with fewer connections in flight.
fn p2c(
    target: &ServiceTarget,
    eligible: &[usize],
    random: &mut dyn FnMut(usize) -> usize,
) -> Option<usize> {
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
    use std::collections::BTreeMap;

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
            split: None,
        }
    }

    const VIP: &str = "10.96.0.10:80";

    fn balancer(endpoints: &[(&str, bool)]) -> (Balancer, Arc<ServiceTarget>) {
        let b = Balancer::with_seed(EjectionPolicy::default(), 7);
        b.apply(&[service(endpoints)], &[]);
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
        b.apply(
            &[service(&[
                ("10.78.1.2", true),
                ("10.78.1.3", true),
                ("10.78.2.9", true),
            ])],
            &[],
        );
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
                        group: None,
                        weighted: None,
                        state: Arc::new(state),
                    }
                })
                .collect(),
            split: None,
        }
    }

    // --- Traffic split ---------------------------------------------------

    /// A split service: each endpoint `(ip, ready, track label)`; its pod is
    /// `shop/p<last octet>`, found by `targetRef` for even last octets and by
    /// IP for odd ones (both ways the model offers).
    fn split_service(
        endpoints: &[(&str, bool, Option<&str>)],
        weights: &[(&str, u32)],
    ) -> (Service, Vec<Pod>) {
        let mut svc = service(
            &endpoints
                .iter()
                .map(|(ip, ready, _)| (*ip, *ready))
                .collect::<Vec<_>>(),
        );
        svc.split = Some(TrafficSplit {
            label: "track".into(),
            weights: weights.iter().map(|(v, w)| ((*v).to_owned(), *w)).collect(),
        });
        let mut pods = Vec::new();
        for (e, (ip, _, track)) in svc.endpoints.iter_mut().zip(endpoints) {
            let octet = ip.rsplit('.').next().expect("octet");
            let name = format!("p{octet}");
            if octet.parse::<u8>().expect("octet") % 2 == 0 {
                e.target_ref = Some(name.clone());
            }
            pods.push(Pod {
                namespace: "shop".into(),
                name,
                service_account: "default".into(),
                node: "n1".into(),
                ips: vec![e.ip],
                labels: track
                    .iter()
                    .map(|t| ("track".to_owned(), (*t).to_owned()))
                    .chain([("app".to_owned(), "web".to_owned())])
                    .collect::<BTreeMap<_, _>>(),
                annotations: BTreeMap::new(),
            });
        }
        (svc, pods)
    }

    fn split_balancer(
        seed: u64,
        endpoints: &[(&str, bool, Option<&str>)],
        weights: &[(&str, u32)],
    ) -> (Balancer, Arc<ServiceTarget>) {
        let b = Balancer::with_seed(EjectionPolicy::default(), seed);
        let (svc, pods) = split_service(endpoints, weights);
        b.apply(&[svc], &pods);
        let t = b.lookup(addr(VIP)).expect("service");
        (b, t)
    }

    /// Picks `n` times (each lease dropped at once) and counts the picks per
    /// endpoint IP.
    fn picks(b: &Balancer, t: &Arc<ServiceTarget>, n: usize) -> BTreeMap<String, usize> {
        let mut counts = BTreeMap::new();
        for _ in 0..n {
            let l = b.pick(t, &[]).expect("pick");
            *counts.entry(l.backend().addr.ip().to_string()).or_default() += 1;
        }
        counts
    }

    fn count(counts: &BTreeMap<String, usize>, ip: &str) -> usize {
        counts.get(ip).copied().unwrap_or(0)
    }

    /// `k` successes in `n` draws of probability `p` lie within 6 standard
    /// deviations of `n p`: a bound that would fail about once in 5·10^8 runs
    /// for a truly random sequence (the seeds here are fixed anyway).
    fn assert_binomial(k: usize, n: usize, p: f64, what: &str) {
        let mean = n as f64 * p;
        let sd = (n as f64 * p * (1.0 - p)).sqrt();
        assert!(
            (k as f64 - mean).abs() <= 6.0 * sd,
            "{what}: {k} of {n}, expected {mean} ± {:.0} (6 sd)",
            6.0 * sd
        );
    }

    const S1: &str = "10.78.1.2";
    const S2: &str = "10.78.1.3";
    const C1: &str = "10.78.2.4";

    #[test]
    fn weights_90_10_split_picks_within_six_standard_deviations() {
        // 100 000 picks, canary share p = 0.1: sd = sqrt(100000 · 0.1 · 0.9)
        // ≈ 94.9, so 10 000 ± 569. The two stable endpoints share the stable
        // picks evenly (P2C on equal in-flight counts takes its first, random
        // candidate): each is Binomial(stable picks, 1/2).
        const N: usize = 100_000;
        for seed in 0..4 {
            let (b, t) = split_balancer(
                seed,
                &[
                    (S1, true, Some("stable")),
                    (S2, true, Some("stable")),
                    (C1, true, Some("canary")),
                ],
                &[("stable", 90), ("canary", 10)],
            );
            assert_eq!(
                t.backends
                    .iter()
                    .map(|b| b.group.as_deref())
                    .collect::<Vec<_>>(),
                [Some("stable"), Some("stable"), Some("canary")],
                "groups found by targetRef and by IP"
            );
            let recorder = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder();
            let handle = recorder.handle();
            let counts = metrics::with_local_recorder(&recorder, || picks(&b, &t, N));
            let canary = count(&counts, C1);
            assert_binomial(canary, N, 0.1, &format!("seed {seed}: canary"));
            let stable = N - canary;
            assert_binomial(count(&counts, S1), stable, 0.5, "stable endpoint 1");
            // Every choice counted under its group.
            let page = handle.render();
            for (group, n) in [("canary", canary), ("stable", stable)] {
                let line = format!(
                    "nodemesh_traffic_split_picks_total{{service=\"shop/web\",group=\"{group}\"}} {n}"
                );
                assert!(page.contains(&line), "{line} in:\n{page}");
            }
        }
    }

    #[test]
    fn a_group_without_usable_endpoints_gives_its_share_to_the_others() {
        // a 50, b 30, c 20; c has no ready endpoint: a gets 50/80 = 0.625.
        // 20 000 picks: sd = sqrt(20000 · 0.625 · 0.375) ≈ 68.5, 6 sd ≈ 411.
        const N: usize = 20_000;
        let (b, t) = split_balancer(
            11,
            &[
                (S1, true, Some("a")),
                (S2, true, Some("b")),
                (C1, false, Some("c")),
            ],
            &[("a", 50), ("b", 30), ("c", 20)],
        );
        let counts = picks(&b, &t, N);
        assert_eq!(count(&counts, C1), 0, "unready");
        assert_binomial(count(&counts, S1), N, 0.625, "a");
        assert_eq!(count(&counts, S1) + count(&counts, S2), N);
        // A connection's retry excludes what it tried: b's endpoint excluded,
        // a takes everything.
        for _ in 0..50 {
            let l = b.pick(&t, &[addr("10.78.1.3:8080")]).expect("pick");
            assert_eq!(l.backend().addr, addr("10.78.1.2:8080"));
        }
    }

    #[test]
    fn weight_zero_gets_nothing_while_another_group_is_usable() {
        let eps = [
            (S1, true, Some("stable")),
            (S2, true, Some("stable")),
            (C1, true, Some("canary")),
        ];
        let (b, t) = split_balancer(3, &eps, &[("stable", 0), ("canary", 100)]);
        assert_eq!(count(&picks(&b, &t, 1_000), C1), 1_000);
        // The canary gone: availability first, the weight-0 group serves.
        let (b, t) = split_balancer(
            3,
            &[eps[0], eps[1], (C1, false, Some("canary"))],
            &[("stable", 0), ("canary", 100)],
        );
        let counts = picks(&b, &t, 1_000);
        assert_eq!(count(&counts, C1), 0);
        assert!(
            count(&counts, S1) > 0 && count(&counts, S2) > 0,
            "{counts:?}"
        );
    }

    #[test]
    fn unlisted_endpoints_get_nothing_while_a_group_is_usable_and_everything_when_none_is() {
        // S1 stable; S2 labelled with a value the split does not list; C1's
        // pod has no track label; 10.78.2.6 has no pod in the model at all.
        let eps = |stable_ready: bool| {
            [
                (S1, stable_ready, Some("stable")),
                (S2, true, Some("beta")),
                (C1, true, None),
                ("10.78.2.6", true, Some("stable")),
            ]
        };
        let build = |stable_ready: bool| {
            let (svc, mut pods) =
                split_service(&eps(stable_ready), &[("stable", 1), ("canary", 1)]);
            pods.retain(|p| p.name != "p6");
            let b = Balancer::with_seed(EjectionPolicy::default(), 5);
            b.apply(&[svc], &pods);
            let t = b.lookup(addr(VIP)).expect("service");
            (b, t)
        };
        let (b, t) = build(true);
        assert_eq!(
            t.backends
                .iter()
                .map(|b| (b.group.as_deref(), b.in_split()))
                .collect::<Vec<_>>(),
            [
                (Some("stable"), true),
                (Some("beta"), false),
                (None, false),
                (None, false)
            ]
        );
        assert_eq!(count(&picks(&b, &t, 1_000), S1), 1_000);

        // No group usable (stable unready, no canary endpoint): every ready
        // endpoint, listed or not, as without a split; counted as unlisted.
        let (b, t) = build(false);
        let recorder = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder();
        let handle = recorder.handle();
        let counts = metrics::with_local_recorder(&recorder, || picks(&b, &t, 3_000));
        assert_eq!(count(&counts, S1), 0, "unready");
        for ip in [S2, C1, "10.78.2.6"] {
            assert!(count(&counts, ip) > 0, "{ip}: {counts:?}");
        }
        assert!(handle.render().contains(
            r#"nodemesh_traffic_split_picks_total{service="shop/web",group="_unlisted"} 3000"#
        ));
    }

    #[tokio::test(start_paused = true)]
    async fn ejection_inside_a_group_moves_its_traffic_within_the_group_first() {
        let (b, t) = split_balancer(
            9,
            &[
                (S1, true, Some("stable")),
                (S2, true, Some("stable")),
                (C1, true, Some("canary")),
            ],
            &[("stable", 50), ("canary", 50)],
        );
        // S1 fails once: ejected for BASE_EJECTION.
        let l = b
            .pick(&t, &[addr("10.78.1.3:8080"), addr("10.78.2.4:8080")])
            .expect("S1");
        assert!(l.failed());
        drop(l);
        // The stable half now goes to S2 alone; the canary keeps its half.
        // 2 000 picks, p = 0.5: sd ≈ 22.4, 6 sd ≈ 134.
        let counts = picks(&b, &t, 2_000);
        assert_eq!(count(&counts, S1), 0, "ejected");
        assert_binomial(count(&counts, S2), 2_000, 0.5, "S2 takes the stable share");
        // S2 ejected too: the stable group has no usable endpoint, the canary
        // takes everything (rather than ignoring the ejections).
        let l = b.pick(&t, &[addr("10.78.2.4:8080")]).expect("S2");
        assert_eq!(l.backend().addr.ip().to_string(), S2);
        assert!(l.failed());
        drop(l);
        assert_eq!(count(&picks(&b, &t, 500), C1), 500);
        // The windows end: back to 50/50 over the three.
        tokio::time::advance(BASE_EJECTION).await;
        let counts = picks(&b, &t, 2_000);
        assert_binomial(count(&counts, C1), 2_000, 0.5, "canary");
        assert!(
            count(&counts, S1) > 0 && count(&counts, S2) > 0,
            "{counts:?}"
        );
        // Everything ejected: ejections ignored, as without a split.
        for ip in [S1, S2, C1] {
            let others: Vec<SocketAddr> = [S1, S2, C1]
                .iter()
                .filter(|o| **o != ip)
                .map(|o| SocketAddr::new(o.parse().expect("ip"), 8080))
                .collect();
            assert!(b.pick(&t, &others).expect("pick").failed());
        }
        assert_eq!(picks(&b, &t, 300).len(), 3);
    }

    #[tokio::test(start_paused = true)]
    async fn a_reload_keeps_endpoint_state_and_applies_the_new_split() {
        let eps = [
            (S1, true, Some("stable")),
            (S2, true, Some("stable")),
            (C1, true, Some("canary")),
        ];
        let (b, t) = split_balancer(2, &eps, &[("stable", 90), ("canary", 10)]);
        let held = b
            .pick(&t, &[addr("10.78.1.3:8080"), addr("10.78.2.4:8080")])
            .expect("S1");
        assert!(b
            .pick(&t, &[addr("10.78.1.2:8080"), addr("10.78.1.3:8080")])
            .expect("C1")
            .failed());
        // Reload: weights flipped to the canary, S2 relabelled canary.
        let (svc, pods) = split_service(
            &[eps[0], (S2, true, Some("canary")), eps[2]],
            &[("stable", 0), ("canary", 100)],
        );
        b.apply(&[svc], &pods);
        let t2 = b.lookup(addr(VIP)).expect("service");
        let find = |ip: &str| {
            t2.backends
                .iter()
                .find(|x| x.addr.ip().to_string() == ip)
                .expect("kept")
        };
        assert_eq!(find(S1).in_flight(), 1, "in flight carried over");
        assert!(find(C1).is_ejected(Instant::now()), "ejection carried over");
        assert_eq!(find(S2).group.as_deref(), Some("canary"));
        assert_eq!(
            t2.split.as_ref().map(|s| s.groups.clone()),
            Some(vec![("stable".to_owned(), 0), ("canary".to_owned(), 100)])
        );
        // The canary group is S2 (C1 ejected): everything to S2.
        assert_eq!(count(&picks(&b, &t2, 500), S2), 500);
        drop(held);
        assert_eq!(find(S1).in_flight(), 0);
        // The split removed: plain P2C over all three once C1 is back.
        tokio::time::advance(BASE_EJECTION).await;
        let mut plain = service(&[(S1, true), (S2, true), (C1, true)]);
        plain.split = None;
        b.apply(&[plain], &pods);
        let t3 = b.lookup(addr(VIP)).expect("service");
        assert!(t3.split.is_none() && t3.backends.iter().all(|b| b.group.is_none()));
        assert_eq!(picks(&b, &t3, 300).len(), 3);
    }

    /// The addresses of the test backends (`10.0.0.<i>:80`) whose flag is set.
    fn excluded_where(flags: impl Iterator<Item = bool>) -> Vec<SocketAddr> {
        flags
            .enumerate()
            .filter(|(_, f)| *f)
            .map(|(i, _)| SocketAddr::from(([10, 0, 0, i as u8], 80)))
            .collect()
    }

    proptest! {
        #[test]
        fn a_split_picks_from_a_usable_weighted_group_else_as_without_one(
            spec in prop::collection::vec(
                (prop::option::of(0usize..4), any::<bool>(), any::<bool>(), any::<bool>()),
                1..8,
            ),
            weights in prop::collection::vec(0u32..3, 3),
            seeds in prop::collection::vec(any::<usize>(), 3),
        ) {
            // Group 3 is a value the split does not list.
            let mut t = target_with(
                &vec![0; spec.len()],
                &spec.iter().map(|s| s.1).collect::<Vec<_>>(),
                &spec.iter().map(|s| s.2).collect::<Vec<_>>(),
            );
            for (b, s) in t.backends.iter_mut().zip(&spec) {
                b.group = s.0.map(|g| format!("g{g}"));
                b.weighted = s.0.filter(|g| *g < 3);
            }
            t.split = Some(Split {
                label: "track".into(),
                groups: (0..3).map(|g| (format!("g{g}"), weights[g])).collect(),
            });
            let excluded = excluded_where(spec.iter().map(|s| s.3));
            let mut k = 0;
            let mut random = |n: usize| { k += 1; seeds[k % 3] % n };
            let healthy = |i: usize| spec[i].1 && !spec[i].3 && !spec[i].2;
            let in_live_group = |i: usize| {
                healthy(i) && spec[i].0.is_some_and(|g| g < 3 && weights[g] > 0)
            };
            let any_live = (0..spec.len()).any(in_live_group);
            let usable: Vec<usize> = (0..spec.len()).filter(|&i| spec[i].1 && !spec[i].3).collect();
            let chosen = choose(&t, &excluded, Instant::now(), &mut random);
            if any_live {
                let i = chosen.expect("a live group serves");
                prop_assert!(in_live_group(i), "picked {i} outside the live groups");
            } else {
                match chosen {
                    None => prop_assert!(usable.is_empty()),
                    Some(i) => {
                        let pool: Vec<usize> = usable.iter().copied().filter(|&j| healthy(j)).collect();
                        let pool = if pool.is_empty() { usable.clone() } else { pool };
                        prop_assert!(pool.contains(&i), "picked {i} outside {pool:?}");
                    }
                }
            }
        }

        #[test]
        fn p2c_picks_only_eligible_and_never_a_unique_maximum(
            spec in prop::collection::vec((0usize..20, any::<bool>(), any::<bool>(), any::<bool>()), 1..8),
            seeds in prop::collection::vec(any::<usize>(), 2),
        ) {
            let in_flight: Vec<usize> = spec.iter().map(|s| s.0).collect();
            let ready: Vec<bool> = spec.iter().map(|s| s.1).collect();
            let ejected: Vec<bool> = spec.iter().map(|s| s.2).collect();
            let excluded = excluded_where(spec.iter().map(|s| s.3));
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
            b.apply(&[service(&eps)], &[]);
            let t = b.lookup(addr(VIP)).expect("service");
            let _leases: Vec<Lease> = (0..60 * n).map(|_| b.pick(&t, &[]).expect("pick")).collect();
            let counts: Vec<usize> = t.backends.iter().map(Backend::in_flight).collect();
            // Each endpoint gets at least half its fair share of 60.
            prop_assert!(counts.iter().all(|&c| c >= 30), "{counts:?}");
        }
    }
}
