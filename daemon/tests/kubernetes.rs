//! The `kubernetes` discovery source against a fake API server.
//!
//! The real kube-rs client and watchers talk HTTP to a local server
//! (127.0.0.1:0) that speaks the API server's list/watch protocol: lists with
//! a `resourceVersion`, `?watch=true&resourceVersion=..` answered with a
//! chunked stream of JSON events, and `410 Gone` as an `ERROR` event with code
//! 410 when a watch asks for a version older than the server keeps. It replays
//! real API objects (`tests/fixtures/k8s/*.json`). The registry is asserted
//! after each step: initial list, add, modify, delete, a dropped watch, a
//! 410 Gone with changes missed in between; namespaces' mesh mode (label
//! `nodemesh.io/mode`) as listed and as relabelled; and a Service's traffic
//! split (annotations `nodemesh.io/split-label` / `nodemesh.io/split-weights`),
//! well-formed and malformed.

use std::collections::{BTreeMap, HashMap};
use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{combinators::BoxBody, BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};
use tokio::sync::{mpsc, Notify};
use tokio_util::sync::CancellationToken;

use nodemesh::admin::Readiness;
use nodemesh::discovery::kubernetes;
use nodemesh::discovery::model::Mode;
use nodemesh::registry::Registry;

// ---------------------------------------------------------------------------
// The fake API server.
// ---------------------------------------------------------------------------

const PODS: &str = "/api/v1/pods";
const NODES: &str = "/api/v1/nodes";
const SERVICES: &str = "/api/v1/services";
const SLICES: &str = "/apis/discovery.k8s.io/v1/endpointslices";
const NAMESPACES: &str = "/api/v1/namespaces";
const POLICIES: &str = "/apis/nodemesh.io/v1alpha1/authorizationpolicies";

#[derive(Default)]
struct Collection {
    api_version: &'static str,
    list_kind: &'static str,
    items: BTreeMap<String, Value>,
    watchers: Vec<mpsc::UnboundedSender<Bytes>>,
    lists: usize,
    watches: usize,
    /// Watches from an older resourceVersion get 410 Gone.
    oldest_rv: u64,
    /// Lists wait for `release` while set.
    hold_lists: bool,
}

#[derive(Default)]
struct ApiState {
    rv: u64,
    collections: HashMap<&'static str, Collection>,
}

struct FakeApi {
    addr: SocketAddr,
    state: Arc<Mutex<ApiState>>,
    release: Arc<Notify>,
    stop: CancellationToken,
}

fn key(obj: &Value) -> String {
    let m = &obj["metadata"];
    match m["namespace"].as_str() {
        Some(ns) => format!("{ns}/{}", m["name"].as_str().unwrap_or_default()),
        None => m["name"].as_str().unwrap_or_default().to_owned(),
    }
}

fn fixture(name: &str) -> Value {
    let path = format!("{}/tests/fixtures/k8s/{name}", env!("CARGO_MANIFEST_DIR"));
    serde_json::from_str(&std::fs::read_to_string(&path).expect("fixture")).expect("json")
}

impl FakeApi {
    async fn start() -> Self {
        let mut st = ApiState::default();
        for (path, api_version, list_kind, file) in [
            (NODES, "v1", "NodeList", "nodes.json"),
            (PODS, "v1", "PodList", "pods.json"),
            (SERVICES, "v1", "ServiceList", "services.json"),
            (
                SLICES,
                "discovery.k8s.io/v1",
                "EndpointSliceList",
                "endpointslices.json",
            ),
            (NAMESPACES, "v1", "NamespaceList", "namespaces.json"),
            (
                POLICIES,
                "nodemesh.io/v1alpha1",
                "AuthorizationPolicyList",
                "authorizationpolicies.json",
            ),
        ] {
            let mut c = Collection {
                api_version,
                list_kind,
                ..Default::default()
            };
            for obj in fixture(file).as_array().expect("array") {
                st.rv += 1;
                let mut obj = obj.clone();
                obj["metadata"]["resourceVersion"] = json!(st.rv.to_string());
                c.items.insert(key(&obj), obj);
            }
            st.collections.insert(path, c);
        }
        let state = Arc::new(Mutex::new(st));
        let release = Arc::new(Notify::new());
        let stop = CancellationToken::new();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn({
            let (state, release, stop) = (state.clone(), release.clone(), stop.clone());
            async move {
                loop {
                    let (tcp, _) = tokio::select! {
                        _ = stop.cancelled() => return,
                        a = listener.accept() => match a { Ok(a) => a, Err(_) => continue },
                    };
                    let (state, release) = (state.clone(), release.clone());
                    let svc = hyper::service::service_fn(move |req| {
                        handle(req, state.clone(), release.clone())
                    });
                    let stop = stop.clone();
                    tokio::spawn(async move {
                        let conn = hyper::server::conn::http1::Builder::new()
                            .serve_connection(TokioIo::new(tcp), svc);
                        tokio::select! {
                            _ = stop.cancelled() => {}
                            _ = conn => {}
                        }
                    });
                }
            }
        });
        Self {
            addr,
            state,
            release,
            stop,
        }
    }

    fn client(&self) -> kube::Client {
        let url = format!("http://{}", self.addr).parse().expect("url");
        kube::Client::try_from(kube::Config::new(url)).expect("client")
    }

    fn with<R>(&self, f: impl FnOnce(&mut ApiState) -> R) -> R {
        f(&mut self.state.lock().expect("lock"))
    }

    fn counts(&self, path: &str) -> (usize, usize) {
        self.with(|s| {
            let c = &s.collections[path];
            (c.lists, c.watches)
        })
    }

    /// Adds or replaces an object; active watches see ADDED or MODIFIED.
    fn put(&self, path: &'static str, mut obj: Value) {
        self.with(|s| {
            s.rv += 1;
            obj["metadata"]["resourceVersion"] = json!(s.rv.to_string());
            let c = s.collections.get_mut(path).expect("collection");
            let kind = if c.items.insert(key(&obj), obj.clone()).is_some() {
                "MODIFIED"
            } else {
                "ADDED"
            };
            send(c, &json!({"type": kind, "object": obj}));
        });
    }

    /// Deletes an object; active watches see DELETED.
    fn delete(&self, path: &'static str, key: &str) {
        self.with(|s| {
            s.rv += 1;
            let rv = s.rv;
            let c = s.collections.get_mut(path).expect("collection");
            let mut obj = c.items.remove(key).expect("exists");
            obj["metadata"]["resourceVersion"] = json!(rv.to_string());
            send(c, &json!({"type": "DELETED", "object": obj}));
        });
    }

    /// Changes an object while nobody watches (no event), as if the watch
    /// had been down.
    fn put_silently(&self, path: &'static str, mut obj: Value) {
        self.with(|s| {
            s.rv += 1;
            obj["metadata"]["resourceVersion"] = json!(s.rv.to_string());
            let c = s.collections.get_mut(path).expect("collection");
            c.items.insert(key(&obj), obj);
        });
    }

    fn delete_silently(&self, path: &'static str, key: &str) {
        self.with(|s| {
            s.rv += 1;
            s.collections
                .get_mut(path)
                .expect("collection")
                .items
                .remove(key);
        });
    }

    /// Closes every watch of `path` (the connection ends cleanly).
    fn drop_watches(&self, path: &'static str) {
        self.with(|s| s.collections.get_mut(path).expect("c").watchers.clear());
    }

    /// Compacts history: active watches get an ERROR 410 event and end, and
    /// later watches from an older version get 410 too.
    fn expire(&self, path: &'static str) {
        self.with(|s| {
            let rv = s.rv;
            let c = s.collections.get_mut(path).expect("collection");
            c.oldest_rv = rv + 1;
            send(c, &gone(rv));
            c.watchers.clear();
        });
    }

    fn hold_lists(&self, path: &'static str, hold: bool) {
        self.with(|s| s.collections.get_mut(path).expect("c").hold_lists = hold);
        if !hold {
            self.release.notify_waiters();
        }
    }
}

impl Drop for FakeApi {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

fn gone(rv: u64) -> Value {
    json!({"type": "ERROR", "object": {
        "kind": "Status", "apiVersion": "v1", "metadata": {},
        "status": "Failure",
        "message": format!("too old resource version: 1 ({rv})"),
        "reason": "Expired", "code": 410
    }})
}

fn send(c: &mut Collection, event: &Value) {
    let mut line = serde_json::to_vec(event).expect("json");
    line.push(b'\n');
    let line = Bytes::from(line);
    c.watchers.retain(|w| w.send(line.clone()).is_ok());
}

type Body = BoxBody<Bytes, Infallible>;

fn json_response(status: StatusCode, v: &Value) -> Response<Body> {
    let mut r = Response::new(Full::new(Bytes::from(v.to_string())).boxed());
    *r.status_mut() = status;
    r.headers_mut()
        .insert("content-type", "application/json".parse().expect("header"));
    r
}

async fn handle(
    req: Request<Incoming>,
    state: Arc<Mutex<ApiState>>,
    release: Arc<Notify>,
) -> Result<Response<Body>, Infallible> {
    let path = req.uri().path().to_owned();
    let query: HashMap<String, String> = req
        .uri()
        .query()
        .unwrap_or_default()
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
    let watch = matches!(query.get("watch").map(String::as_str), Some("true" | "1"));
    if !watch {
        // LIST, possibly held back by the test.
        loop {
            let notified = release.notified();
            let held = {
                let mut s = state.lock().expect("lock");
                let Some(c) = s.collections.get_mut(path.as_str()) else {
                    return Ok(json_response(
                        StatusCode::NOT_FOUND,
                        &json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "NotFound", "code": 404}),
                    ));
                };
                c.hold_lists
            };
            if !held {
                break;
            }
            {
                // Count the held request once so the test can see it arrived.
                let mut s = state.lock().expect("lock");
                if let Some(c) = s.collections.get_mut(path.as_str()) {
                    c.lists += 1;
                }
            }
            notified.await;
            let mut s = state.lock().expect("lock");
            if let Some(c) = s.collections.get_mut(path.as_str()) {
                c.lists -= 1;
            }
        }
        let mut s = state.lock().expect("lock");
        let rv = s.rv;
        let Some(c) = s.collections.get_mut(path.as_str()) else {
            return Ok(json_response(StatusCode::NOT_FOUND, &json!({})));
        };
        c.lists += 1;
        let list = json!({
            "apiVersion": c.api_version,
            "kind": c.list_kind,
            "metadata": {"resourceVersion": rv.to_string()},
            "items": c.items.values().collect::<Vec<_>>(),
        });
        return Ok(json_response(StatusCode::OK, &list));
    }
    // WATCH: a chunked stream of JSON lines.
    let from: u64 = query
        .get("resourceVersion")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let (tx, mut rx) = mpsc::unbounded_channel::<Bytes>();
    {
        let mut s = state.lock().expect("lock");
        let rv = s.rv;
        let Some(c) = s.collections.get_mut(path.as_str()) else {
            return Ok(json_response(StatusCode::NOT_FOUND, &json!({})));
        };
        c.watches += 1;
        if from < c.oldest_rv {
            let mut line = serde_json::to_vec(&gone(rv)).expect("json");
            line.push(b'\n');
            let _ = tx.send(Bytes::from(line));
            drop(tx);
        } else {
            c.watchers.push(tx);
        }
    }
    let stream = futures::stream::poll_fn(move |cx| {
        rx.poll_recv(cx)
            .map(|o| o.map(|b| Ok::<_, Infallible>(Frame::data(b))))
    });
    let mut r = Response::new(BodyExt::boxed(StreamBody::new(stream)));
    r.headers_mut()
        .insert("content-type", "application/json".parse().expect("header"));
    Ok(r)
}

// ---------------------------------------------------------------------------
// Test helpers.
// ---------------------------------------------------------------------------

const DEADLINE: Duration = Duration::from_secs(15);

/// Polls `cond` until it holds or the deadline passes.
async fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    let start = tokio::time::Instant::now();
    while !cond() {
        assert!(start.elapsed() < DEADLINE, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn ip(s: &str) -> IpAddr {
    s.parse().expect("ip")
}

fn has_pod(reg: &Registry, addr: &str) -> bool {
    reg.snapshot().pod(ip(addr)).is_some()
}

/// (addr, ready, pod) of the backends of `vip`.
fn backends(reg: &Registry, vip: &str) -> Vec<(String, bool, Option<String>)> {
    let Some(t) = reg.services().lookup(vip.parse().expect("addr")) else {
        return Vec::new();
    };
    let mut v: Vec<_> = t
        .backends
        .iter()
        .map(|b| (b.addr.to_string(), b.ready, b.pod.clone()))
        .collect();
    v.sort();
    v
}

fn be(addr: &str, ready: bool, pod: &str) -> (String, bool, Option<String>) {
    (addr.to_owned(), ready, Some(pod.to_owned()))
}

fn slice_with(endpoints: Value) -> Value {
    let mut s = fixture("endpointslices.json")[0].clone();
    s["endpoints"] = endpoints;
    s
}

fn ep(addr: &str, node: &str, pod: &str, ready: bool) -> Value {
    json!({"addresses": [addr], "conditions": {"ready": ready}, "nodeName": node,
           "targetRef": {"kind": "Pod", "namespace": "shop", "name": pod}})
}

struct Source {
    registry: Arc<Registry>,
    ready: Arc<Readiness>,
    stop: CancellationToken,
}

impl Drop for Source {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

fn start_source(api: &FakeApi) -> Source {
    let registry = Arc::new(Registry::new("node-1", 15008));
    let ready = Arc::new(Readiness::default());
    let stop = CancellationToken::new();
    tokio::spawn(kubernetes::run(
        api.client(),
        ip("192.0.2.11"),
        registry.clone(),
        ready.clone(),
        stop.clone(),
    ));
    Source {
        registry,
        ready,
        stop,
    }
}

// ---------------------------------------------------------------------------
// Tests.
// ---------------------------------------------------------------------------

#[tokio::test]
async fn list_add_modify_delete_dropped_watch_and_410_gone() {
    let api = FakeApi::start().await;
    // Readiness waits for every kind: hold the pods list back at first.
    api.hold_lists(PODS, true);
    let src = start_source(&api);
    let reg = &src.registry;
    eventually("every kind listed but pods", || {
        [NODES, SERVICES, SLICES, NAMESPACES, POLICIES]
            .iter()
            .all(|p| api.counts(p).0 >= 1)
            && api.counts(PODS).0 >= 1
    })
    .await;
    assert!(!src.ready.discovery_synced(), "pods not listed yet");
    assert_eq!(
        reg.snapshot().counts(),
        (0, 0),
        "nothing applied before the first full sync"
    );
    api.hold_lists(PODS, false);

    // 1. Initial list.
    eventually("first sync", || src.ready.discovery_synced()).await;
    let snap = reg.snapshot();
    let n2 = snap.node("node-2").expect("node-2");
    assert_eq!(n2.address, ip("192.0.2.12"));
    assert_eq!(n2.pod_cidrs[0].to_string(), "10.244.2.0/24");
    let n1 = snap.node("node-1").expect("node-1");
    assert_eq!(n1.address, ip("192.0.2.11"), "first InternalIP");
    assert_eq!(n1.pod_cidrs.len(), 2, "dual-stack podCIDRs");
    // 3 pods: the hostNetwork pod and the finished one are left out; web-1
    // has two IPs.
    assert_eq!(snap.counts(), (2, 4));
    let web1 = snap.pod(ip("10.244.1.5")).expect("web-1");
    assert_eq!(
        (
            web1.name.as_str(),
            web1.service_account.as_str(),
            web1.workload.as_str()
        ),
        ("web-1", "web", "web")
    );
    assert!(snap.pod(ip("fd00:10:244:1::5")).is_some());
    assert_eq!(
        snap.pod(ip("10.244.1.9")).expect("client").workload,
        "client"
    );
    assert!(
        snap.pod(ip("10.244.2.8")).is_none(),
        "Succeeded pod left out"
    );
    assert!(
        snap.pod(ip("192.0.2.11")).is_none(),
        "hostNetwork pod left out"
    );
    // Services: named targetPort resolved through the slice; numeric kept.
    assert_eq!(
        backends(reg, "10.96.0.10:80"),
        [
            be("10.244.1.5:8080", true, "web-1"),
            be("10.244.2.7:8080", true, "web-2")
        ]
    );
    assert_eq!(backends(reg, "10.96.0.10:9090").len(), 2);
    assert_eq!(
        backends(reg, "10.96.0.1:443").len(),
        1,
        "kubernetes service"
    );
    assert_eq!(
        reg.services().len(),
        3,
        "headless and ExternalName not balanced"
    );

    // 2. Add: a pod and a not-yet-ready endpoint.
    let added = fixture("pods-added.json");
    api.put(PODS, added["web-3"].clone());
    api.put(
        SLICES,
        slice_with(json!([
            ep("10.244.1.5", "node-1", "web-1", true),
            ep("10.244.2.7", "node-2", "web-2", true),
            ep("10.244.2.9", "node-2", "web-3", false),
        ])),
    );
    eventually("web-3 added, unready", || {
        has_pod(reg, "10.244.2.9") && backends(reg, "10.96.0.10:80").len() == 3
    })
    .await;
    assert!(!backends(reg, "10.96.0.10:80")[2].1, "web-3 unready");

    // 3. Modify: web-3 ready; web-1 relabelled.
    api.put(
        SLICES,
        slice_with(json!([
            ep("10.244.1.5", "node-1", "web-1", true),
            ep("10.244.2.7", "node-2", "web-2", true),
            ep("10.244.2.9", "node-2", "web-3", true),
        ])),
    );
    let mut web1 = fixture("pods.json")[0].clone();
    web1["metadata"]["labels"] = json!({"app": "web-canary"});
    api.put(PODS, web1);
    eventually("web-3 ready, web-1 relabelled", || {
        backends(reg, "10.96.0.10:80").iter().all(|b| b.1)
            && reg
                .snapshot()
                .pod(ip("10.244.1.5"))
                .is_some_and(|p| p.workload == "web-canary")
    })
    .await;

    // 4. Delete: web-2 and its endpoint.
    api.delete(PODS, "shop/web-2");
    api.put(
        SLICES,
        slice_with(json!([
            ep("10.244.1.5", "node-1", "web-1", true),
            ep("10.244.2.9", "node-2", "web-3", true),
        ])),
    );
    eventually("web-2 deleted", || {
        !has_pod(reg, "10.244.2.7") && backends(reg, "10.96.0.10:80").len() == 2
    })
    .await;
    assert_eq!(
        backends(reg, "10.96.0.10:80"),
        [
            be("10.244.1.5:8080", true, "web-1"),
            be("10.244.2.9:8080", true, "web-3")
        ]
    );

    // 5. A dropped watch: resumed from its resourceVersion, no relist, the
    //    registry untouched meanwhile.
    let (lists, watches) = api.counts(PODS);
    let generation = reg.snapshot().generation;
    api.drop_watches(PODS);
    eventually("pods re-watched", || api.counts(PODS).1 > watches).await;
    assert_eq!(api.counts(PODS).0, lists, "a dropped watch does not relist");
    assert_eq!(reg.snapshot().generation, generation, "nothing re-applied");
    assert!(has_pod(reg, "10.244.1.5"));
    api.put(PODS, added["web-4"].clone());
    eventually("web-4 seen on the new watch", || {
        has_pod(reg, "10.244.1.12")
    })
    .await;

    // 6. 410 Gone: changes happened that the watch will never deliver. The
    //    relist is held back: meanwhile the registry keeps its model.
    api.hold_lists(PODS, true);
    api.delete_silently(PODS, "shop/web-4");
    api.put_silently(PODS, added["web-5"].clone());
    let (lists, _) = api.counts(PODS);
    api.expire(PODS);
    eventually("relist requested", || api.counts(PODS).0 > lists).await;
    assert!(
        has_pod(reg, "10.244.1.12") && has_pod(reg, "10.244.1.5"),
        "the registry is not dropped while the relist runs"
    );
    assert_eq!(reg.snapshot().counts(), (2, 5));
    api.hold_lists(PODS, false);
    eventually("relist applied", || {
        has_pod(reg, "10.244.2.15") && !has_pod(reg, "10.244.1.12")
    })
    .await;
    assert!(has_pod(reg, "10.244.1.5") && has_pod(reg, "10.244.2.9"));
    assert!(src.ready.discovery_synced());
    // Services survived the pods' relist.
    assert_eq!(backends(reg, "10.96.0.10:80").len(), 2);
}

#[tokio::test]
async fn a_missing_policy_crd_does_not_block_readiness() {
    let api = FakeApi::start().await;
    api.with(|s| s.collections.remove(POLICIES));
    let src = start_source(&api);
    eventually("synced without the CRD", || src.ready.discovery_synced()).await;
    assert_eq!(src.registry.snapshot().counts().0, 2);
}

#[tokio::test]
async fn readiness_reports_discovery_until_the_first_sync() {
    let api = FakeApi::start().await;
    api.hold_lists(NODES, true);
    let src = start_source(&api);
    eventually("nodes list requested", || api.counts(NODES).0 >= 1).await;
    assert!(!src.ready.discovery_synced());
    assert!(src
        .ready
        .not_ready_reasons()
        .iter()
        .any(|r| r.contains("discovery")));
    api.hold_lists(NODES, false);
    eventually("synced", || src.ready.discovery_synced()).await;
}

#[tokio::test]
async fn namespace_modes_follow_the_label() {
    let api = FakeApi::start().await;
    // Readiness waits for namespaces too.
    api.hold_lists(NAMESPACES, true);
    let src = start_source(&api);
    let reg = &src.registry;
    eventually("namespaces list requested", || {
        api.counts(NAMESPACES).0 >= 1
    })
    .await;
    assert!(!src.ready.discovery_synced(), "namespaces not listed yet");
    api.hold_lists(NAMESPACES, false);

    // Initial list: strict by label, permissive by absence, permissive for
    // a bad value (the model is not refused: nodes and pods are there).
    eventually("first sync", || src.ready.discovery_synced()).await;
    let snap = reg.snapshot();
    assert_eq!(snap.mode("shop"), Mode::Strict);
    assert_eq!(snap.mode("default"), Mode::Permissive, "no label");
    assert_eq!(snap.mode("batch"), Mode::Permissive, "bad value STRICT");
    assert_eq!(snap.mode("unknown"), Mode::Permissive, "not a namespace");
    assert_eq!(snap.counts(), (2, 4), "the rest of the model applied");

    // Modify: batch turned strict, shop back to permissive.
    let namespaces = fixture("namespaces.json");
    let mut shop = namespaces[0].clone();
    shop["metadata"]["labels"]["nodemesh.io/mode"] = json!("permissive");
    let mut batch = namespaces[2].clone();
    batch["metadata"]["labels"]["nodemesh.io/mode"] = json!("strict");
    api.put(NAMESPACES, shop);
    api.put(NAMESPACES, batch);
    eventually("batch strict, shop permissive", || {
        let s = reg.snapshot();
        s.mode("batch") == Mode::Strict && s.mode("shop") == Mode::Permissive
    })
    .await;
    assert_eq!(reg.snapshot().mode("default"), Mode::Permissive);

    // Label removed: permissive again. A new strict namespace: strict.
    let mut batch = namespaces[2].clone();
    batch["metadata"]["labels"] = json!({"kubernetes.io/metadata.name": "batch"});
    api.put(NAMESPACES, batch);
    let mut ops = namespaces[1].clone();
    ops["metadata"]["name"] = json!("ops");
    ops["metadata"]["labels"] = json!({"nodemesh.io/mode": "strict"});
    api.put(NAMESPACES, ops);
    eventually("batch permissive, ops strict", || {
        let s = reg.snapshot();
        s.mode("batch") == Mode::Permissive && s.mode("ops") == Mode::Strict
    })
    .await;

    // Deleted: the mode goes with it.
    api.delete(NAMESPACES, "ops");
    eventually("ops gone", || {
        reg.snapshot().mode("ops") == Mode::Permissive
    })
    .await;
    assert!(src.ready.discovery_synced());
}

/// The process's metrics (installed once; only the split test reads them).
fn metrics_page() -> String {
    static HANDLE: std::sync::OnceLock<metrics_exporter_prometheus::PrometheusHandle> =
        std::sync::OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let recorder = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder();
            let handle = recorder.handle();
            metrics::set_global_recorder(recorder).expect("the only recorder");
            handle
        })
        .render()
}

fn invalid_splits_counted() -> f64 {
    metrics_page()
        .lines()
        .find_map(|l| l.strip_prefix(r#"nodemesh_discovery_invalid_total{kind="traffic_split"} "#))
        .map_or(0.0, |v| v.parse().expect("number"))
}

/// A service's split groups (value, weight), and its backends' (addr, group).
type SplitView = (Option<Vec<(String, u32)>>, Vec<(String, Option<String>)>);

/// The split of `vip`'s service and each backend's (addr, group).
fn split_of(reg: &Registry, vip: &str) -> SplitView {
    let Some(t) = reg.services().lookup(vip.parse().expect("addr")) else {
        return (None, Vec::new());
    };
    let mut groups: Vec<_> = t
        .backends
        .iter()
        .map(|b| (b.addr.to_string(), b.group.clone()))
        .collect();
    groups.sort();
    (t.split.as_ref().map(|s| s.groups.clone()), groups)
}

#[tokio::test]
async fn traffic_split_annotations_and_a_malformed_one() {
    let _ = metrics_page();
    let api = FakeApi::start().await;
    // web-1 is the stable track, web-2 the canary.
    let pods = fixture("pods.json");
    for (i, track) in [(0, "stable"), (1, "canary")] {
        let mut pod = pods[i].clone();
        pod["metadata"]["labels"]["track"] = json!(track);
        api.put(PODS, pod);
    }
    let annotated = |weights: &str| {
        let mut web = fixture("services.json")[0].clone();
        web["metadata"]["annotations"] = json!({
            "nodemesh.io/split-label": "track",
            "nodemesh.io/split-weights": weights,
        });
        web
    };
    api.put(SERVICES, annotated("stable=90, canary=10"));
    let src = start_source(&api);
    let reg = &src.registry;
    eventually("first sync", || src.ready.discovery_synced()).await;
    let groups = vec![
        ("10.244.1.5:8080".to_owned(), Some("stable".to_owned())),
        ("10.244.2.7:8080".to_owned(), Some("canary".to_owned())),
    ];
    let split = Some(vec![("stable".to_owned(), 90), ("canary".to_owned(), 10)]);
    assert_eq!(
        split_of(reg, "10.96.0.10:80"),
        (split.clone(), groups.clone())
    );
    assert_eq!(
        split_of(reg, "10.96.0.10:9090").0,
        split,
        "every port of the service"
    );

    // Malformed weights: the service stays, balanced without a split; the
    // rest of discovery goes on; the problem is counted.
    let before = invalid_splits_counted();
    api.put(SERVICES, annotated("stable=90,canary"));
    eventually("split dropped", || {
        split_of(reg, "10.96.0.10:80").0.is_none()
    })
    .await;
    let (_, kept) = split_of(reg, "10.96.0.10:80");
    assert_eq!(kept.len(), 2, "both endpoints kept: {kept:?}");
    assert!(kept.iter().all(|(_, g)| g.is_none()), "no split, no groups");
    assert_eq!(
        backends(reg, "10.96.0.1:443").len(),
        1,
        "other services kept"
    );
    assert!(has_pod(reg, "10.244.1.9"), "pods kept");
    assert!(
        invalid_splits_counted() >= before + 1.0,
        "counted: {}",
        metrics_page()
    );
    // A label without weights: the same.
    let mut label_only = annotated("");
    label_only["metadata"]["annotations"] = json!({"nodemesh.io/split-label": "track"});
    let before = invalid_splits_counted();
    api.put(SERVICES, label_only);
    eventually("counted", || invalid_splits_counted() >= before + 1.0).await;
    assert!(split_of(reg, "10.96.0.10:80").0.is_none());

    // Fixed, and flipped to the canary: applied.
    api.put(SERVICES, annotated("stable=0,canary=100"));
    eventually("split back", || split_of(reg, "10.96.0.10:80").0.is_some()).await;
    assert_eq!(
        split_of(reg, "10.96.0.10:80"),
        (
            Some(vec![("stable".to_owned(), 0), ("canary".to_owned(), 100)]),
            groups
        )
    );
    let t = reg
        .services()
        .lookup("10.96.0.10:80".parse().expect("addr"))
        .expect("service");
    for _ in 0..50 {
        let lease = reg.services().pick(&t, &[]).expect("pick");
        assert_eq!(lease.backend().group.as_deref(), Some("canary"));
    }
}
