//! Memory of the `kubernetes` discovery source per 1,000 pods, measured with
//! a counting allocator (its own test binary, so the allocator counts only
//! this). Prints the figures documented in `docs/operations.md`; asserts a
//! generous bound so a regression (keeping whole objects) is caught.
//!
//! `cargo test -p nodemesh --test kube_memory -- --nocapture`

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicIsize, Ordering};

use k8s_openapi::api::core::v1::Pod as K8sPod;
use kube::runtime::watcher::Event;
use serde_json::Value;

use nodemesh::discovery::kubernetes::{KubeState, PodRecord, Update};
use nodemesh::registry::Registry;

struct Counting;

static LIVE: AtomicIsize = AtomicIsize::new(0);

// SAFETY: forwards every call to the system allocator unchanged; only counts
// the bytes live.
#[allow(unsafe_code)]
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE.fetch_add(layout.size() as isize, Ordering::Relaxed);
        // SAFETY: same contract as ours.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size() as isize, Ordering::Relaxed);
        // SAFETY: same contract as ours.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

fn live() -> isize {
    LIVE.load(Ordering::Relaxed)
}

/// `n` realistic pods (the fixture's web-1, renamed and readdressed).
fn pods(n: usize) -> Vec<K8sPod> {
    let text = std::fs::read_to_string(format!(
        "{}/tests/fixtures/k8s/pods.json",
        env!("CARGO_MANIFEST_DIR")
    ))
    .expect("fixture");
    let all: Vec<Value> = serde_json::from_str(&text).expect("json");
    let template = &all[0];
    (0..n)
        .map(|i| {
            let mut p = template.clone();
            p["metadata"]["name"] = format!("web-{i}").into();
            p["spec"]["nodeName"] = "node-1".into();
            let ip = format!("10.{}.{}.{}", 100 + i / 65536, (i / 256) % 256, i % 256);
            p["status"]["podIP"] = ip.clone().into();
            p["status"]["podIPs"] = serde_json::json!([{ "ip": ip }]);
            serde_json::from_value(p).expect("pod")
        })
        .collect()
}

#[test]
fn memory_per_thousand_pods() {
    const N: usize = 1000;
    let objects = pods(N);

    // What a reflector store would keep: the whole objects.
    let before = live();
    let whole = objects.clone();
    let whole_bytes = live() - before;
    drop(whole);

    // What the source keeps: records.
    let before = live();
    let mut state = KubeState::default();
    state.apply(Update::Node(Event::Init));
    state.apply(Update::Node(Event::InitDone));
    state.apply(Update::Pod(Event::Init));
    for p in &objects {
        let rec = PodRecord::from_object(p);
        let key = format!(
            "shop/{}",
            rec.as_ref().map(|r| r.name.as_str()).unwrap_or("")
        );
        state.apply(Update::Pod(Event::InitApply((key, rec))));
    }
    state.apply(Update::Pod(Event::InitDone));
    let records_bytes = live() - before;
    assert_eq!(state.pods.items().len(), N);

    // And the registry's snapshot built from the model (the model itself is
    // transient). Pods need their node in the model.
    let node: k8s_openapi::api::core::v1::Node = serde_json::from_str(
        r#"{"metadata":{"name":"node-1"},"status":{"addresses":[{"type":"InternalIP","address":"192.0.2.11"}]}}"#,
    )
    .expect("node");
    state.apply(Update::Node(Event::Apply((
        "node-1".into(),
        nodemesh::discovery::kubernetes::NodeRecord::from_object(&node),
    ))));
    let model = state.model();
    assert_eq!(model.pods.len(), N);
    let registry = Registry::new("node-1", 15008);
    let before = live();
    registry.apply(&model);
    let snapshot_bytes = live() - before;
    drop(model);

    let kib = |b: isize| b as f64 / 1024.0;
    println!(
        "per {N} pods: whole Pod objects {:.0} KiB; kept records {:.0} KiB; registry snapshot {:.0} KiB",
        kib(whole_bytes),
        kib(records_bytes),
        kib(snapshot_bytes)
    );
    assert!(
        records_bytes * 5 < whole_bytes,
        "records ({records_bytes} B) must be far smaller than whole objects ({whole_bytes} B)"
    );
    assert!(
        records_bytes < 1024 * 1024,
        "records for {N} pods: {records_bytes} B (budget 1 MiB)"
    );
}
