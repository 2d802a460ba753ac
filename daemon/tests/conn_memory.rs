//! Heap memory of one idle proxied connection on the tunnel path, measured
//! with a counting allocator (its own test binary, so the allocator counts
//! only this): N connections are opened the way L1 and L2 do it (pipelined
//! header and first bytes, status, `relay::tcp_quic_pipelined` at L1 and
//! `relay::tcp_quic` at L2, over one quinn connection), each carries one
//! request and reply, then sits idle; the growth of live heap bytes over N is
//! the cost per connection of the relays, their tasks and quinn's stream
//! state at both ends. Kernel socket memory is not heap and not counted.
//! Prints the figure (docs/benchmarks/notes.md); asserts the 4 KiB-per-daemon
//! budget of issue 6 for both ends together.
//!
//! `cargo test -p nodemesh --test conn_memory -- --nocapture`

use std::alloc::{GlobalAlloc, Layout, System};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicIsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use metrics::Counter;
use quinn::VarInt;
use rustls_pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use nodemesh::relay;
use nodemesh::tunnel::header::{
    read_header, read_status, write_status, Status, StatusCode, StreamHeader,
};

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
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LIVE.fetch_add(
            new_size as isize - layout.size() as isize,
            Ordering::Relaxed,
        );
        // SAFETY: same contract as ours.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

fn live() -> isize {
    LIVE.load(Ordering::Relaxed)
}

/// Connections measured.
const N: usize = 200;
/// Bytes each end may spend per idle connection: 4 KiB per daemon (issue 6).
const BUDGET_BOTH_ENDS: isize = 2 * 4096;

fn loopback() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 0))
}

async fn quic_pair() -> (
    quinn::Endpoint,
    quinn::Endpoint,
    quinn::Connection,
    quinn::Connection,
) {
    let ck = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).expect("cert");
    let cert = ck.cert.der().clone();
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(ck.signing_key.serialize_der()));
    let mut server_config =
        quinn::ServerConfig::with_single_cert(vec![cert.clone()], key).expect("server config");
    let transport = Arc::new({
        let mut t = quinn::TransportConfig::default();
        t.max_concurrent_bidi_streams(VarInt::from_u32(10_000));
        t
    });
    server_config.transport_config(transport.clone());
    let server_ep = quinn::Endpoint::server(server_config, loopback()).expect("server bind");
    let mut roots = rustls::RootCertStore::empty();
    roots.add(cert).expect("root");
    let mut client_config =
        quinn::ClientConfig::with_root_certificates(Arc::new(roots)).expect("client config");
    client_config.transport_config(transport);
    let mut client_ep = quinn::Endpoint::client(loopback()).expect("client bind");
    client_ep.set_default_client_config(client_config);
    let addr = server_ep.local_addr().expect("addr");
    let (c, s) = tokio::join!(
        async {
            client_ep
                .connect(addr, "localhost")
                .expect("connect")
                .await
                .expect("client handshake")
        },
        async {
            server_ep
                .accept()
                .await
                .expect("incoming")
                .await
                .expect("server handshake")
        }
    );
    (client_ep, server_ep, c, s)
}

/// The two application ends of one proxied connection, held open.
struct Ends {
    _client: TcpStream,
    _server: TcpStream,
}

/// Opens one connection through an L1 and an L2 relay and moves one
/// request and reply across it.
async fn open_one(
    tunnel_c: &quinn::Connection,
    tunnel_s: &quinn::Connection,
    l1_listener: &TcpListener,
    pod: &TcpListener,
) -> Ends {
    let (client, l1_tcp) = tokio::join!(
        TcpStream::connect(l1_listener.local_addr().expect("addr")),
        l1_listener.accept()
    );
    let (mut client, l1_tcp) = (client.expect("connect"), l1_tcp.expect("accept").0);
    client.set_nodelay(true).expect("nodelay");
    client.write_all(b"ping").await.expect("request");

    // L1: header (with the client's first bytes in the daemon), status, relay.
    let (mut send, recv) = tunnel_c.open_bi().await.expect("open stream");
    let header = StreamHeader {
        dst: pod.local_addr().expect("pod addr"),
        src: client.local_addr().expect("client addr"),
        src_identity: "spiffe://cluster.local/ns/default/sa/client".to_owned(),
        flags: 0,
        trace_id: None,
    };
    let mut first = Vec::new();
    header.encode(&mut first).expect("encode");
    send.write_all(&first).await.expect("header");
    // L1 reads the status, then relays (as `outbound::tunnel` does).
    tokio::spawn(async move {
        let mut recv = recv;
        match read_status(&mut recv).await {
            Ok(s) if s.code == StatusCode::Ok => {
                let _ = relay::tcp_quic(l1_tcp, send, recv, Counter::noop(), Counter::noop()).await;
            }
            _ => relay::reset_tcp(l1_tcp),
        }
    });

    // L2: header, connect, status, relay.
    let (mut send, mut recv) = tunnel_s.accept_bi().await.expect("accept stream");
    let got = read_header(&mut recv).await.expect("header");
    let (l2_tcp, server) = tokio::join!(TcpStream::connect(got.dst), pod.accept());
    let (l2_tcp, mut server) = (l2_tcp.expect("connect pod"), server.expect("accept").0);
    write_status(&mut send, &Status::new(StatusCode::Ok))
        .await
        .expect("status");
    tokio::spawn(relay::tcp_quic(
        l2_tcp,
        send,
        recv,
        Counter::noop(),
        Counter::noop(),
    ));

    let mut buf = [0u8; 4];
    server.read_exact(&mut buf).await.expect("request crossed");
    server.write_all(b"pong").await.expect("reply");
    client.read_exact(&mut buf).await.expect("reply crossed");
    assert_eq!(&buf, b"pong");
    Ends {
        _client: client,
        _server: server,
    }
}

#[tokio::test(flavor = "current_thread")]
async fn an_idle_tunnelled_connection_costs_under_4_kib_per_daemon() {
    let (_ce, _se, tunnel_c, tunnel_s) = quic_pair().await;
    let l1_listener = TcpListener::bind(loopback()).await.expect("bind");
    let pod = TcpListener::bind(loopback()).await.expect("bind");
    // Warm-up: first-use allocations (quinn's per-connection buffers, the
    // relay buffer pool, tokio's slabs) are not per connection.
    let mut warm = Vec::new();
    for _ in 0..8 {
        warm.push(open_one(&tunnel_c, &tunnel_s, &l1_listener, &pod).await);
    }
    tokio::time::sleep(Duration::from_millis(50)).await;
    let before = live();
    let mut open = Vec::with_capacity(N);
    for _ in 0..N {
        open.push(open_one(&tunnel_c, &tunnel_s, &l1_listener, &pod).await);
    }
    // Let acknowledgements settle (quinn frees sent data once acknowledged).
    tokio::time::sleep(Duration::from_millis(200)).await;
    let after = live();
    // The test's own handles (two TcpStreams per connection) are counted
    // too; they are tokio registrations, as the daemon's sockets are.
    let per_conn = (after - before) / N as isize;
    println!(
        "idle tunnelled connection: {per_conn} heap bytes for both ends (L1 + L2), {} per end",
        per_conn / 2
    );
    assert!(
        per_conn <= BUDGET_BOTH_ENDS,
        "{per_conn} bytes per idle connection over both ends, budget {BUDGET_BOTH_ENDS}"
    );
    drop(open);
    drop(warm);
}
