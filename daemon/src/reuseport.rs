//! `SO_REUSEPORT` groups and the classic BPF programs that steer them during a
//! daemon hand-over (`handover`).
//!
//! Every socket a daemon serves on (tunnel UDP, admin TCP, in-pod capture
//! listeners) is bound with `SO_REUSEPORT`, so a successor daemon can bind
//! beside its predecessor. The kernel then picks the socket of a group for each
//! datagram / new connection: by a hash of the 4-tuple, unless a classic BPF
//! program is attached to the group (`SO_ATTACH_REUSEPORT_CBPF`), in which case
//! the program's return value is the index of the socket in the group. Sockets
//! are indexed in the order they joined; a closing socket's slot is taken by
//! the last one (`net/core/sock_reuseport.c`, `__reuseport_detach_sock`).
//!
//! Owns the programs (pure builders, unit-tested by executing them) and the
//! one setsockopt that attaches them:
//!
//! - [`tunnel_program`]: QUIC datagrams whose destination connection ID starts
//!   with a given daemon's tag go to that daemon's index (the predecessor
//!   bound first: index 0; the successor: 1), everything else to the other.
//! - [`successor_program`]: everything to index 1, for TCP listener groups
//!   whose predecessor socket is about to close.
//!
//! When a program returns an index that is out of range — index 1 once the
//! predecessor's socket has closed and the group is down to one socket — the
//! kernel ignores the result and falls back to its hash over the sockets that
//! are left (`reuseport_select_sock`: `run_bpf_filter` returns NULL for
//! `index >= socks`, then "no bpf or invalid bpf result: fall back to hash
//! usage"). So a program left attached after the hand-over is harmless.

use std::io;
use std::net::SocketAddr;
use std::os::fd::AsFd;
use std::time::Duration;

use nix::libc::sock_filter;
use socket2::{Domain, Protocol, Socket, Type};
use tracing::{debug, warn};

/// Index of the predecessor's socket in a group it created.
pub const PREDECESSOR: u32 = 0;
/// Index of the successor's socket (it joined second).
pub const SUCCESSOR: u32 = 1;

// Classic BPF opcodes (linux/bpf_common.h).
const BPF_LD: u16 = 0x00;
const BPF_JMP: u16 = 0x05;
const BPF_RET: u16 = 0x06;
const BPF_W: u16 = 0x00;
const BPF_B: u16 = 0x10;
const BPF_ABS: u16 = 0x20;
const BPF_LEN: u16 = 0x80;
const BPF_JA: u16 = 0x00;
const BPF_JEQ: u16 = 0x10;
const BPF_JGE: u16 = 0x30;
const BPF_JSET: u16 = 0x40;
const BPF_K: u16 = 0x00;

const fn stmt(code: u16, k: u32) -> sock_filter {
    sock_filter {
        code,
        jt: 0,
        jf: 0,
        k,
    }
}

const fn jump(code: u16, k: u32, jt: u8, jf: u8) -> sock_filter {
    sock_filter { code, jt, jf, k }
}

/// The program for a tunnel (UDP) group: datagrams whose destination
/// connection ID starts with `tag` go to the socket at index `tagged`,
/// everything else to `rest`.
///
/// For UDP the program sees the UDP payload at offset 0, i.e. the QUIC packet.
/// - Short header (`byte0 & 0x80 == 0`): the destination connection ID starts
///   at offset 1.
/// - Long header: the DCID length is at offset 5 and the DCID at offset 6.
///   Initial packets of *new* connections carry a DCID the client chose;
///   nodemesh clients start it with a byte that is never a tag
///   ([`crate::tunnel::cid::INITIAL_DCID_FIRST_BYTE`]), so they go to `rest`.
///   Initial packets answering a dial of the tag's owner carry its own
///   (tagged) CID and reach it, so it can still dial.
/// - Too short to hold the byte looked at, or a zero-length DCID: `rest`
///   (such a datagram is not a packet of a connection of ours).
///
/// A successor uses it twice: while it starts, `tunnel_program(own tag,
/// SUCCESSOR, PREDECESSOR)` (new connections still reach the predecessor,
/// which is ready; only answers to the successor's own dials reach it);
/// once ready, right before taking over, `tunnel_program(predecessor's tag,
/// PREDECESSOR, SUCCESSOR)` (the predecessor keeps its connections, every
/// new one comes to the successor).
pub fn tunnel_program(tag: u8, tagged: u32, rest: u32) -> Vec<sock_filter> {
    const RET_REST: usize = 13;
    const SHORT: usize = 10;
    const CMP: usize = 11;
    // Jump offsets are relative to the next instruction.
    let off = |from: usize, to: usize| -> u8 { (to - from - 1) as u8 };
    vec![
        /* 0 */ stmt(BPF_LD | BPF_W | BPF_LEN, 0),
        /* 1 */ jump(BPF_JMP | BPF_JGE | BPF_K, 2, 0, off(1, RET_REST)),
        /* 2 */ stmt(BPF_LD | BPF_B | BPF_ABS, 0),
        /* 3 */ jump(BPF_JMP | BPF_JSET | BPF_K, 0x80, 0, off(3, SHORT)),
        // Long header.
        /* 4 */ stmt(BPF_LD | BPF_W | BPF_LEN, 0),
        /* 5 */ jump(BPF_JMP | BPF_JGE | BPF_K, 7, 0, off(5, RET_REST)),
        /* 6 */ stmt(BPF_LD | BPF_B | BPF_ABS, 5),
        /* 7 */ jump(BPF_JMP | BPF_JEQ | BPF_K, 0, off(7, RET_REST), 0),
        /* 8 */ stmt(BPF_LD | BPF_B | BPF_ABS, 6),
        /* 9 */ stmt(BPF_JMP | BPF_JA, (CMP - 9 - 1) as u32),
        // Short header.
        /* 10 */ stmt(BPF_LD | BPF_B | BPF_ABS, 1),
        /* 11 */
        jump(
            BPF_JMP | BPF_JEQ | BPF_K,
            u32::from(tag),
            0,
            off(CMP, RET_REST),
        ),
        /* 12 */ stmt(BPF_RET | BPF_K, tagged),
        /* 13 */ stmt(BPF_RET | BPF_K, rest),
    ]
}

/// The program for a TCP listener group whose predecessor is leaving: every
/// new connection to the successor.
pub fn successor_program() -> Vec<sock_filter> {
    vec![stmt(BPF_RET | BPF_K, SUCCESSOR)]
}

/// Attaches `program` to the reuseport group of `socket` (replacing any
/// program the group had). The socket must be bound with `SO_REUSEPORT`.
pub fn attach(socket: &impl AsFd, program: &[sock_filter]) -> io::Result<()> {
    let len = u16::try_from(program.len())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "BPF program too long"))?;
    let fprog = nix::libc::sock_fprog {
        len,
        // The kernel copies the instructions during the call; it never writes.
        filter: program.as_ptr().cast_mut(),
    };
    nix::sys::socket::setsockopt(
        socket,
        nix::sys::socket::sockopt::AttachReusePortCbpf,
        &fprog,
    )
    .map_err(io::Error::from)
}

/// A non-blocking TCP listener on `addr` with `SO_REUSEADDR` and
/// `SO_REUSEPORT`, in the daemon's own network namespace.
pub fn tcp_listener(addr: SocketAddr) -> io::Result<tokio::net::TcpListener> {
    let sock = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    sock.set_reuse_address(true)?;
    sock.set_reuse_port(true)?;
    sock.set_nonblocking(true)?;
    sock.bind(&addr.into())?;
    sock.listen(1024)?;
    tokio::net::TcpListener::from_std(sock.into())
}

/// Hands a TCP listener's group to the successor and closes the listener:
/// attaches [`successor_program`] so the kernel sends new connections to the
/// successor's socket, keeps accepting for `linger` (handshakes that had
/// already reached this socket complete), then takes whatever is still in the
/// accept queue and drops the listener. Every connection accepted on the way
/// goes to `serve`, so none is reset by the close.
///
/// If the program cannot be attached, the listener is closed all the same
/// (after taking its queue): the kernel then spreads new connections over the
/// sockets left in the group.
pub async fn hand_off(
    listener: tokio::net::TcpListener,
    linger: Duration,
    mut serve: impl FnMut(tokio::net::TcpStream, SocketAddr),
) {
    match attach(&listener, &successor_program()) {
        Ok(()) => {
            let deadline = tokio::time::sleep(linger);
            tokio::pin!(deadline);
            loop {
                tokio::select! {
                    _ = &mut deadline => break,
                    a = listener.accept() => match a {
                        Ok((s, peer)) => serve(s, peer),
                        Err(e) => {
                            debug!(error = %e, "accept failed while handing a listener over");
                            break;
                        }
                    },
                }
            }
        }
        Err(e) => warn!(error = %e, "cannot steer a listener's group to the successor"),
    }
    // Connections whose handshake completed meanwhile wait in the queue: the
    // reactor may not have reported them yet, so ask the socket directly.
    let Ok(std) = listener.into_std() else { return };
    loop {
        match std.accept() {
            Ok((s, peer)) => {
                let s = s
                    .set_nonblocking(true)
                    .and_then(|()| tokio::net::TcpStream::from_std(s));
                match s {
                    Ok(s) => serve(s, peer),
                    Err(e) => debug!(error = %e, "cannot adopt a queued connection"),
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) => break,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs a classic BPF program over `packet` the way the kernel does for
    /// the opcodes our programs use. A load past the end aborts the program
    /// with 0, as in the kernel.
    fn run(program: &[sock_filter], packet: &[u8]) -> u32 {
        let mut a: u32 = 0;
        let mut pc = 0usize;
        loop {
            let ins = program.get(pc).expect("pc stays inside the program");
            pc += 1;
            match ins.code {
                c if c == BPF_LD | BPF_W | BPF_LEN => a = packet.len() as u32,
                c if c == BPF_LD | BPF_B | BPF_ABS => match packet.get(ins.k as usize) {
                    Some(b) => a = u32::from(*b),
                    None => return 0,
                },
                c if c == BPF_JMP | BPF_JA => pc += ins.k as usize,
                c if c == BPF_JMP | BPF_JEQ | BPF_K => {
                    pc += usize::from(if a == ins.k { ins.jt } else { ins.jf })
                }
                c if c == BPF_JMP | BPF_JGE | BPF_K => {
                    pc += usize::from(if a >= ins.k { ins.jt } else { ins.jf })
                }
                c if c == BPF_JMP | BPF_JSET | BPF_K => {
                    pc += usize::from(if a & ins.k != 0 { ins.jt } else { ins.jf })
                }
                c if c == BPF_RET | BPF_K => return ins.k,
                other => panic!("opcode {other:#x} not expected in our programs"),
            }
        }
    }

    const TAG: u8 = 0x5a;

    /// The successor's final program: the predecessor (TAG) keeps its own.
    fn taken_over() -> Vec<sock_filter> {
        tunnel_program(TAG, PREDECESSOR, SUCCESSOR)
    }

    fn short(dcid0: u8) -> Vec<u8> {
        let mut p = vec![0x40, dcid0];
        p.extend_from_slice(&[1, 2, 3, 4, 5, 6, 7, 0xaa, 0xbb, 0xcc]);
        p
    }

    /// A long-header packet of `kind` (0 Initial, 1 0-RTT, 2 Handshake, 3 Retry).
    fn long(kind: u8, dcid: &[u8]) -> Vec<u8> {
        let mut p = vec![0xc0 | (kind << 4), 0, 0, 0, 1, dcid.len() as u8];
        p.extend_from_slice(dcid);
        p.push(8);
        p.extend_from_slice(&[9; 8]);
        p.resize(1200, 0);
        p
    }

    #[test]
    fn short_header_packets_follow_the_first_dcid_byte() {
        let prog = taken_over();
        assert_eq!(run(&prog, &short(TAG)), PREDECESSOR);
        assert_eq!(run(&prog, &short(TAG + 1)), SUCCESSOR);
        assert_eq!(run(&prog, &short(0)), SUCCESSOR);
        // Only byte 1 matters: a tag-valued byte elsewhere changes nothing.
        let mut p = short(7);
        p[0] = 0x40 | 0x1f;
        p[5] = TAG;
        assert_eq!(run(&prog, &p), SUCCESSOR);
    }

    #[test]
    fn long_header_packets_follow_the_first_dcid_byte() {
        let prog = taken_over();
        for kind in 0..4 {
            assert_eq!(
                run(&prog, &long(kind, &[TAG, 1, 2, 3, 4, 5, 6, 7])),
                PREDECESSOR,
                "kind {kind}"
            );
            assert_eq!(
                run(&prog, &long(kind, &[TAG ^ 0xff, 1, 2, 3, 4, 5, 6, 7])),
                SUCCESSOR,
                "kind {kind}"
            );
        }
    }

    #[test]
    fn new_connections_reach_the_predecessor_until_the_successor_is_ready() {
        let first = crate::tunnel::cid::INITIAL_DCID_FIRST_BYTE;
        for tag in 1..=u8::MAX {
            let mut initial = vec![first];
            initial.extend_from_slice(&[tag; 19]);
            let initial = long(0, &initial);
            // Starting: tagged with the successor's own tag → successor, rest → predecessor.
            let joining = tunnel_program(tag, SUCCESSOR, PREDECESSOR);
            assert_eq!(run(&joining, &initial), PREDECESSOR, "tag {tag}");
            assert_eq!(run(&joining, &short(tag)), SUCCESSOR, "tag {tag}");
            assert_eq!(run(&joining, &long(2, &[tag, 0, 0, 0])), SUCCESSOR);
            assert_eq!(run(&joining, &short(tag ^ 0x80)), PREDECESSOR);
            // Taken over: tagged with the predecessor's tag → predecessor, rest → successor.
            let final_ = tunnel_program(tag, PREDECESSOR, SUCCESSOR);
            assert_eq!(run(&final_, &initial), SUCCESSOR, "tag {tag}");
            assert_eq!(run(&final_, &short(tag)), PREDECESSOR, "tag {tag}");
        }
    }

    #[test]
    fn too_short_or_cid_less_packets_go_to_the_rest() {
        let prog = taken_over();
        assert_eq!(run(&prog, &[]), SUCCESSOR);
        assert_eq!(run(&prog, &[0x40]), SUCCESSOR);
        // Long header cut before DCID[0].
        assert_eq!(run(&prog, &[0xc0, 0, 0, 0, 1, 8]), SUCCESSOR);
        // Long header with a zero-length DCID: byte 6 is the SCID length.
        let mut p = long(2, &[]);
        p[6] = TAG;
        assert_eq!(run(&prog, &p), SUCCESSOR);
        // Exactly long enough.
        assert_eq!(run(&prog, &[0xc0, 0, 0, 0, 1, 1, TAG]), PREDECESSOR);
        assert_eq!(run(&prog, &[0x40, TAG]), PREDECESSOR);
        // The other orientation sends them to its `rest`, the predecessor.
        let joining = tunnel_program(TAG, SUCCESSOR, PREDECESSOR);
        assert_eq!(run(&joining, &[]), PREDECESSOR);
        assert_eq!(run(&joining, &[0xc0, 0, 0, 0, 1, 8]), PREDECESSOR);
    }

    #[test]
    fn successor_program_returns_the_second_socket() {
        let prog = successor_program();
        assert_eq!(run(&prog, &[]), SUCCESSOR);
        assert_eq!(run(&prog, &[0x16, 0x03, 0x01]), SUCCESSOR);
    }

    #[tokio::test]
    async fn hand_off_steers_new_connections_and_serves_the_queue() {
        let old = tcp_listener("127.0.0.1:0".parse().expect("addr")).expect("old");
        let addr = old.local_addr().expect("addr");
        let new = tcp_listener(addr).expect("a second listener beside the first");
        // Queued on the old listener before the hand-off (it never accepted).
        let mut queued = Vec::new();
        for _ in 0..8 {
            let c = tokio::net::TcpStream::connect(addr).await.expect("connect");
            queued.push(c);
        }
        let mut on_new = 0;
        // The ones the hash gave to the new listener.
        while let Ok(Ok(_)) = tokio::time::timeout(Duration::from_millis(50), new.accept()).await {
            on_new += 1;
        }
        let mut served = 0usize;
        hand_off(old, Duration::from_millis(1), |_, _| served += 1).await;
        assert_eq!(
            served + on_new,
            queued.len(),
            "every queued connection served"
        );
        // The old socket is gone: everything now reaches the new one.
        for _ in 0..8 {
            let _c = tokio::net::TcpStream::connect(addr).await.expect("connect");
            tokio::time::timeout(Duration::from_secs(5), new.accept())
                .await
                .expect("accepted by the new listener")
                .expect("accept");
        }
    }

    #[test]
    fn programs_attach_to_a_reuseport_group() {
        let a = std::net::UdpSocket::bind("127.0.0.1:0").expect("probe");
        let addr = a.local_addr().expect("addr");
        drop(a);
        let s = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP)).expect("socket");
        s.set_reuse_port(true).expect("reuseport");
        s.bind(&addr.into()).expect("bind");
        attach(&s, &taken_over()).expect("attach tunnel program");
        let t = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP)).expect("socket");
        t.set_reuse_port(true).expect("reuseport");
        t.bind(&"127.0.0.1:0".parse::<SocketAddr>().expect("addr").into())
            .expect("bind");
        t.listen(8).expect("listen");
        attach(&t, &successor_program()).expect("attach successor program");
        // Without SO_REUSEPORT there is no group to attach to.
        let plain = std::net::UdpSocket::bind("127.0.0.1:0").expect("plain");
        assert!(attach(&plain, &successor_program()).is_err());
    }
}
