//! The OS edge for a pod's policy routing: the return path of connections
//! the daemon makes into a pod from the client's address.
//!
//! Owns [`ReturnPath`] (what is installed), the rtnetlink messages that
//! install it (built by pure functions, so they are tested without root),
//! and [`install`], which sends them in the calling thread's network
//! namespace (the netns worker calls it inside the pod's).
//!
//! L2 connects into a pod from a socket made in the pod's namespace, bound
//! with `IP_TRANSPARENT` to the client's address and marked with
//! [`ReturnPath::mark`]. The pod's kernel sends the server's replies to that
//! address, which is not the pod's: by its main table they would leave the
//! pod. Four things, all inside the pod's namespace, bring them back:
//!
//! - `net.ipv4.tcp_fwmark_accept = 1` (set by the netns worker like any pod
//!   sysctl; it covers IPv6 too): a connection accepted from a marked SYN
//!   sends everything with that mark. Only the daemon's SYNs carry one.
//! - `net.ipv4.fwmark_reflect = 1` (and `net.ipv6.fwmark_reflect` for IPv6):
//!   what the kernel answers on no socket's behalf — the RST refusing a SYN
//!   to a closed port — carries the mark too, so a refused connect fails at
//!   once instead of timing out;
//! - a rule `fwmark <mark> lookup <table>` at [`ReturnPath::priority`], per
//!   address family of the pod;
//! - in that table, `local default dev lo`: every marked packet is delivered
//!   locally, to the daemon's socket.
//!
//! Installing is idempotent: an existing identical rule is kept (`EEXIST`
//! answers the exclusive create), the route is replaced.

use std::fs::File;
use std::io::{self, Read, Write};
use std::net::IpAddr;

use nix::sys::socket::{socket, AddressFamily, SockFlag, SockProtocol, SockType};

/// The loopback interface's index, the same in every network namespace
/// (`LOOPBACK_IFINDEX` in the kernel).
const LOOPBACK_IFINDEX: u32 = 1;

const NLMSG_ERROR: u16 = 2;
const RTM_NEWROUTE: u16 = 24;
const RTM_NEWRULE: u16 = 32;

const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
const NLM_F_REPLACE: u16 = 0x100;
const NLM_F_EXCL: u16 = 0x200;
const NLM_F_CREATE: u16 = 0x400;

const AF_INET: u8 = 2;
const AF_INET6: u8 = 10;

/// `fib_rule_hdr.action`: look the packet up in a table.
const FR_ACT_TO_TBL: u8 = 1;
const FRA_PRIORITY: u16 = 6;
const FRA_FWMARK: u16 = 10;
const FRA_TABLE: u16 = 15;
const FRA_FWMASK: u16 = 16;

const RTA_OIF: u16 = 4;
const RTA_TABLE: u16 = 15;
/// `rtmsg.rtm_protocol`: installed by an administrator (as `ip route add`).
const RTPROT_BOOT: u8 = 3;
const RT_SCOPE_HOST: u8 = 254;
const RTN_LOCAL: u8 = 2;

/// The policy routing that brings replies to the client's address back to
/// the daemon's socket, in one pod.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReturnPath {
    /// `SO_MARK` of the daemon's sockets that connect from a client's
    /// address; the rule matches it exactly.
    pub mark: u32,
    /// Routing table holding `local default dev lo`.
    pub table: u32,
    /// The rule's priority (lower is earlier; the main table's is 32766).
    pub priority: u32,
    /// Install for IPv4.
    pub v4: bool,
    /// Install for IPv6.
    pub v6: bool,
}

impl ReturnPath {
    /// The families of `ips` (a pod's addresses).
    pub fn for_ips(mark: u32, table: u32, priority: u32, ips: &[IpAddr]) -> Self {
        Self {
            mark,
            table,
            priority,
            v4: ips.iter().any(IpAddr::is_ipv4),
            v6: ips.iter().any(IpAddr::is_ipv6),
        }
    }

    /// The families to install, as rtnetlink numbers them.
    fn families(&self) -> impl Iterator<Item = u8> {
        [(self.v4, AF_INET), (self.v6, AF_INET6)]
            .into_iter()
            .filter_map(|(on, af)| on.then_some(af))
    }
}

fn family_name(family: u8) -> &'static str {
    if family == AF_INET6 {
        "IPv6"
    } else {
        "IPv4"
    }
}

/// Appends one `rtattr` holding a u32.
fn attr_u32(buf: &mut Vec<u8>, kind: u16, value: u32) {
    buf.extend_from_slice(&8u16.to_ne_bytes());
    buf.extend_from_slice(&kind.to_ne_bytes());
    buf.extend_from_slice(&value.to_ne_bytes());
}

/// A netlink message: header, then `body` (already 4-byte aligned).
fn message(kind: u16, flags: u16, seq: u32, body: &[u8]) -> Vec<u8> {
    let len = u32::try_from(16 + body.len()).unwrap_or(u32::MAX);
    let mut buf = Vec::with_capacity(16 + body.len());
    buf.extend_from_slice(&len.to_ne_bytes());
    buf.extend_from_slice(&kind.to_ne_bytes());
    buf.extend_from_slice(&(flags | NLM_F_REQUEST | NLM_F_ACK).to_ne_bytes());
    buf.extend_from_slice(&seq.to_ne_bytes());
    buf.extend_from_slice(&0u32.to_ne_bytes()); // port id: the kernel
    buf.extend_from_slice(body);
    buf
}

/// `ip rule add fwmark <mark>/0xffffffff lookup <table> priority <priority>`,
/// exclusive: an identical rule answers `EEXIST` instead of being doubled.
pub fn rule_message(path: &ReturnPath, family: u8, seq: u32) -> Vec<u8> {
    let mut body = vec![
        family,
        0, // dst_len
        0, // src_len
        0, // tos
        0, // table: RT_TABLE_UNSPEC, the table is the attribute
        0,
        0,
        FR_ACT_TO_TBL,
    ];
    body.extend_from_slice(&0u32.to_ne_bytes()); // flags
    attr_u32(&mut body, FRA_PRIORITY, path.priority);
    attr_u32(&mut body, FRA_FWMARK, path.mark);
    attr_u32(&mut body, FRA_FWMASK, u32::MAX);
    attr_u32(&mut body, FRA_TABLE, path.table);
    message(RTM_NEWRULE, NLM_F_CREATE | NLM_F_EXCL, seq, &body)
}

/// `ip route replace local default dev lo table <table>`.
pub fn route_message(path: &ReturnPath, family: u8, seq: u32) -> Vec<u8> {
    let mut body = vec![
        family,
        0, // dst_len: the default route
        0, // src_len
        0, // tos
        0, // table: RT_TABLE_UNSPEC, the table is the attribute
        RTPROT_BOOT,
        RT_SCOPE_HOST,
        RTN_LOCAL,
    ];
    body.extend_from_slice(&0u32.to_ne_bytes()); // flags
    attr_u32(&mut body, RTA_TABLE, path.table);
    attr_u32(&mut body, RTA_OIF, LOOPBACK_IFINDEX);
    message(RTM_NEWROUTE, NLM_F_CREATE | NLM_F_REPLACE, seq, &body)
}

/// The kernel's answer to one request: `Ok` for an acknowledgement, the
/// error it reports, or `InvalidData` for a reply that is not one.
pub fn parse_ack(reply: &[u8], seq: u32) -> io::Result<()> {
    let bad = |what: &str| io::Error::new(io::ErrorKind::InvalidData, format!("netlink: {what}"));
    let word = |at: usize| -> Option<[u8; 4]> { reply.get(at..at + 4)?.try_into().ok() };
    let half = |at: usize| -> Option<[u8; 2]> { reply.get(at..at + 2)?.try_into().ok() };
    let (Some(kind), Some(got_seq), Some(errno)) = (half(4), word(8), word(16)) else {
        return Err(bad(&format!("reply of {} bytes is too short", reply.len())));
    };
    if u16::from_ne_bytes(kind) != NLMSG_ERROR {
        return Err(bad(&format!(
            "reply of type {} where an acknowledgement was expected",
            u16::from_ne_bytes(kind)
        )));
    }
    if u32::from_ne_bytes(got_seq) != seq {
        return Err(bad(&format!(
            "reply to request {} where {seq} was sent",
            u32::from_ne_bytes(got_seq)
        )));
    }
    match i32::from_ne_bytes(errno) {
        0 => Ok(()),
        e => Err(io::Error::from_raw_os_error(e.saturating_neg())),
    }
}

/// One request and its acknowledgement on `sock`.
fn request(sock: &mut File, msg: &[u8], seq: u32) -> io::Result<()> {
    sock.write_all(msg)?;
    let mut reply = [0u8; 4096];
    let n = sock.read(&mut reply)?;
    parse_ack(reply.get(..n).unwrap_or_default(), seq)
}

/// Installs `path` in the calling thread's network namespace.
pub fn install(path: &ReturnPath) -> io::Result<()> {
    let fd = socket(
        AddressFamily::Netlink,
        SockType::Raw,
        SockFlag::SOCK_CLOEXEC,
        SockProtocol::NetlinkRoute,
    )
    .map_err(|e| io::Error::other(format!("cannot open a netlink socket: {e}")))?;
    let mut sock = File::from(fd);
    let context =
        |what: String| move |e: io::Error| io::Error::new(e.kind(), format!("{what}: {e}"));
    let mut seq = 0;
    for family in path.families() {
        let fam = family_name(family);
        seq += 1;
        request(&mut sock, &rule_message(path, family, seq), seq)
            // An identical rule is already there (a restore, a restart).
            .or_else(|e| match e.raw_os_error() {
                Some(nix::libc::EEXIST) => Ok(()),
                _ => Err(e),
            })
            .map_err(context(format!(
                "ip rule fwmark {:#x} lookup {} priority {} ({fam})",
                path.mark, path.table, path.priority
            )))?;
        seq += 1;
        request(&mut sock, &route_message(path, family, seq), seq).map_err(context(format!(
            "ip route local default dev lo table {} ({fam})",
            path.table
        )))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const PATH: ReturnPath = ReturnPath {
        mark: 0x4e4e,
        table: 20045,
        priority: 32000,
        v4: true,
        v6: false,
    };

    fn u16_at(b: &[u8], at: usize) -> u16 {
        u16::from_ne_bytes([b[at], b[at + 1]])
    }

    fn u32_at(b: &[u8], at: usize) -> u32 {
        u32::from_ne_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
    }

    /// (type, u32 value) of each attribute after a 16 + 12 byte header.
    fn attrs(b: &[u8]) -> Vec<(u16, u32)> {
        b[28..]
            .chunks(8)
            .map(|a| {
                assert_eq!(u16_at(a, 0), 8, "every attribute is one u32");
                (u16_at(a, 2), u32_at(a, 4))
            })
            .collect()
    }

    #[test]
    fn rule_is_an_exclusive_fwmark_lookup() {
        let m = rule_message(&PATH, AF_INET, 7);
        assert_eq!(u32_at(&m, 0) as usize, m.len());
        assert_eq!(u16_at(&m, 4), RTM_NEWRULE);
        assert_eq!(
            u16_at(&m, 6),
            NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL
        );
        assert_eq!(u32_at(&m, 8), 7);
        assert_eq!(m[16], AF_INET);
        assert_eq!(m[16 + 7], FR_ACT_TO_TBL);
        assert_eq!(
            attrs(&m),
            [
                (FRA_PRIORITY, 32000),
                (FRA_FWMARK, 0x4e4e),
                (FRA_FWMASK, u32::MAX),
                (FRA_TABLE, 20045)
            ]
        );
    }

    #[test]
    fn route_is_local_default_on_loopback() {
        let m = route_message(&PATH, AF_INET6, 3);
        assert_eq!(u32_at(&m, 0) as usize, m.len());
        assert_eq!(u16_at(&m, 4), RTM_NEWROUTE);
        assert_eq!(
            u16_at(&m, 6),
            NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_REPLACE
        );
        assert_eq!(
            &m[16..24],
            [AF_INET6, 0, 0, 0, 0, RTPROT_BOOT, RT_SCOPE_HOST, RTN_LOCAL]
        );
        assert_eq!(attrs(&m), [(RTA_TABLE, 20045), (RTA_OIF, 1)]);
    }

    #[test]
    fn families_follow_the_pods_addresses() {
        let v4: IpAddr = "10.0.0.1".parse().expect("v4");
        let v6: IpAddr = "fd00::1".parse().expect("v6");
        let fams = |ips: &[IpAddr]| {
            ReturnPath::for_ips(1, 2, 3, ips)
                .families()
                .collect::<Vec<_>>()
        };
        assert_eq!(fams(&[v4]), [AF_INET]);
        assert_eq!(fams(&[v6]), [AF_INET6]);
        assert_eq!(fams(&[v6, v4]), [AF_INET, AF_INET6]);
        assert!(fams(&[]).is_empty());
    }

    fn ack(seq: u32, errno: i32) -> Vec<u8> {
        let mut b = Vec::new();
        b.extend_from_slice(&36u32.to_ne_bytes());
        b.extend_from_slice(&NLMSG_ERROR.to_ne_bytes());
        b.extend_from_slice(&0u16.to_ne_bytes());
        b.extend_from_slice(&seq.to_ne_bytes());
        b.extend_from_slice(&0u32.to_ne_bytes());
        b.extend_from_slice(&errno.to_ne_bytes());
        b.extend_from_slice(&[0; 16]);
        b
    }

    #[test]
    fn acknowledgements_and_errors_are_read() {
        assert!(parse_ack(&ack(5, 0), 5).is_ok());
        let e = parse_ack(&ack(5, -nix::libc::EEXIST), 5).expect_err("an error");
        assert_eq!(e.raw_os_error(), Some(nix::libc::EEXIST));
        let e = parse_ack(&ack(4, 0), 5).expect_err("an error");
        assert!(e.to_string().contains("request 4 where 5"), "{e}");
        let e = parse_ack(&ack(5, 0)[..12], 5).expect_err("an error");
        assert!(e.to_string().contains("too short"), "{e}");
        let mut other = ack(5, 0);
        other[4] = 24;
        let e = parse_ack(&other, 5).expect_err("an error");
        assert!(e.to_string().contains("type 24"), "{e}");
        // Any errno, even one the kernel never sends, is an error, not a panic.
        assert!(parse_ack(&ack(5, i32::MIN), 5).is_err());
    }
}
