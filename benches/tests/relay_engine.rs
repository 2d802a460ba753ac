//! `nodemesh-lab relay-engine` as the benchmark runs it: one process, one
//! listener per `--listen`/`--to` pair, each accepted connection relayed to
//! its own listener's target with the half-close forwarded. On loopback; no
//! root needed.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use nodemesh_lab::bench::relays::parse_listening;

const LAB: &str = env!("CARGO_BIN_EXE_nodemesh-lab");
const TIMEOUT: Duration = Duration::from_secs(10);

/// Kills the relay when the test ends, passing or not.
struct Relay(Child);

impl Drop for Relay {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start(engine: &str, targets: &[SocketAddr]) -> (Relay, Vec<SocketAddr>) {
    let mut cmd = Command::new(LAB);
    cmd.args(["relay-engine", "--engine", engine]);
    for t in targets {
        cmd.args(["--listen", "127.0.0.1:0", "--to", &t.to_string()]);
    }
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start relay-engine");
    let out = child.stdout.take().expect("stdout");
    let relay = Relay(child);
    let mut lines = BufReader::new(out).lines();
    let addrs = targets
        .iter()
        .map(|_| {
            let line = lines.next().expect("a line per listener").expect("read");
            parse_listening(&line).unwrap_or_else(|| panic!("not a listening line: {line:?}"))
        })
        .collect();
    (relay, addrs)
}

/// Accepts on `server`, or fails the test after [`TIMEOUT`] (a relay that
/// connected elsewhere would otherwise hang it).
fn accept_within(server: &TcpListener) -> (TcpStream, SocketAddr) {
    let listener = server.try_clone().expect("clone the listener");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(listener.accept());
    });
    rx.recv_timeout(TIMEOUT)
        .expect("the relay connects to its own target within the timeout")
        .expect("accept")
}

/// Sends `msg` through `via`, half-closes; the server behind `server`
/// answers with its tag and what it read, then closes. Returns the answer.
fn exchange(via: SocketAddr, server: &TcpListener, tag: &[u8], msg: &[u8]) -> Vec<u8> {
    let mut c = TcpStream::connect(via).expect("connect to the relay");
    c.set_read_timeout(Some(TIMEOUT)).expect("timeout");
    c.write_all(msg).expect("write");
    c.shutdown(Shutdown::Write).expect("half-close");
    let (mut s, _) = accept_within(server);
    s.set_read_timeout(Some(TIMEOUT)).expect("timeout");
    let mut got = Vec::new();
    // Ends only if the relay forwarded the half-close.
    s.read_to_end(&mut got).expect("server reads to EOF");
    s.write_all(tag).expect("write tag");
    s.write_all(&got).expect("echo");
    drop(s);
    let mut answer = Vec::new();
    c.read_to_end(&mut answer).expect("client reads to EOF");
    answer
}

#[test]
fn every_engine_relays_each_listener_to_its_own_target() {
    for engine in ["copy", "splice", "uring"] {
        let a = TcpListener::bind("127.0.0.1:0").expect("bind a");
        let b = TcpListener::bind("127.0.0.1:0").expect("bind b");
        let targets = [a.local_addr().expect("addr"), b.local_addr().expect("addr")];
        let (_relay, via) = start(engine, &targets);
        assert_eq!(via.len(), 2, "{engine}");
        assert_ne!(via[0], via[1], "{engine}: two listeners");
        let big: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        // The second listener first: order of use does not matter.
        let answer = exchange(via[1], &b, b"B:", &big);
        assert_eq!(&answer[..2], b"B:", "{engine}");
        assert!(answer[2..] == big[..], "{engine}: bytes through listener 2");
        let answer = exchange(via[0], &a, b"A:", b"hello");
        assert_eq!(answer, b"A:hello", "{engine}");
    }
}

#[test]
fn unpaired_listen_and_to_are_refused_with_how_to_fix() {
    let out = Command::new(LAB)
        .args(["relay-engine", "--engine", "copy"])
        .args(["--listen", "127.0.0.1:0", "--listen", "127.0.0.1:0"])
        .args(["--to", "127.0.0.1:9"])
        .output()
        .expect("run relay-engine");
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("2 --listen against 1 --to") && err.contains("one --to per --listen"),
        "{err}"
    );
}
