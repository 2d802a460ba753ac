//! Naming and addressing of a lab, and creation of its underlay and nodes.
//!
//! For prefix `p`: underlay namespace `p-ul` holding bridge `br0`; node `i`
//! (from 1) in namespace `p-ni`, named `ni`, joined to the bridge by a veth
//! (`ni` in the underlay, `ul0` in the node) with address `10.77.0.i/24`,
//! forwarding on, and a route to every other node's pod CIDR `10.78.j.0/24`
//! via `10.77.0.j`. Pod `k` of node `i` lives in namespace `p-ni-pk`. Every
//! address exists only inside these namespaces; every interface name is
//! short (at most 15 characters) whatever the prefix.
//!
//! A dual-stack lab adds IPv6 beside: node `i` also has `fd00:77::i/64` on its
//! uplink, pod CIDR `fd00:78:i::/64`, IPv6 forwarding, and routes to the other
//! nodes' IPv6 pod CIDRs. Duplicate address detection is off in its
//! namespaces (addresses are unique by construction), so addresses are usable
//! at once. The tunnels stay on the IPv4 underlay.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use crate::error::LabError;
use crate::netns::{add_netns, ip, write_sysctl};

/// Most nodes a lab may have (the node index is an address octet).
pub const MAX_NODES: usize = 200;
/// Most pods per node (host-local allocates from a /24).
pub const MAX_PODS_PER_NODE: usize = 200;
/// Longest accepted prefix.
pub const MAX_PREFIX_LEN: usize = 10;
/// Name of the underlay bridge, in the underlay namespace.
pub const UNDERLAY_BRIDGE: &str = "br0";
/// Name of a node's uplink veth, in the node namespace.
pub const NODE_UPLINK: &str = "ul0";

/// Checks a lab prefix: 1..=10 chars, lowercase letters and digits, starting with a letter.
pub fn validate_prefix(prefix: &str) -> Result<(), LabError> {
    let ok = !prefix.is_empty()
        && prefix.len() <= MAX_PREFIX_LEN
        && prefix.starts_with(|c: char| c.is_ascii_lowercase())
        && prefix
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit());
    if ok {
        Ok(())
    } else {
        Err(LabError::BadPrefix {
            prefix: prefix.to_owned(),
        })
    }
}

/// Underlay namespace name.
pub fn underlay_netns(prefix: &str) -> String {
    format!("{prefix}-ul")
}

/// Node name (also its Kubernetes-style name in discovery and certificates).
pub fn node_name(node: usize) -> String {
    format!("n{node}")
}

/// Node namespace name.
pub fn node_netns(prefix: &str, node: usize) -> String {
    format!("{prefix}-n{node}")
}

/// Pod namespace name.
pub fn pod_netns(prefix: &str, node: usize, pod: usize) -> String {
    format!("{prefix}-n{node}-p{pod}")
}

/// Pod name, as shown in discovery and metrics (`n1-p2`).
pub fn pod_name(node: usize, pod: usize) -> String {
    format!("n{node}-p{pod}")
}

/// A node's underlay address `10.77.0.<node>`.
pub fn node_address(node: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 77, 0, octet(node))
}

/// A node's pod CIDR `10.78.<node>.0/24`, as text.
pub fn pod_cidr(node: usize) -> String {
    format!("10.78.{}.0/24", octet(node))
}

/// A node's IPv6 underlay address `fd00:77::<node>` (dual-stack labs).
pub fn node_address6(node: usize) -> Ipv6Addr {
    Ipv6Addr::new(0xfd00, 0x77, 0, 0, 0, 0, 0, hextet(node))
}

/// A node's daemon address, its tunnel endpoint: [`node_address`], or
/// [`node_address6`] when the tunnels run over IPv6.
pub fn tunnel_address(node: usize, ipv6: bool) -> IpAddr {
    if ipv6 {
        IpAddr::V6(node_address6(node))
    } else {
        IpAddr::V4(node_address(node))
    }
}

/// A node's IPv6 pod CIDR `fd00:78:<node>::/64` (dual-stack labs), as text.
pub fn pod_cidr6(node: usize) -> String {
    format!("fd00:78:{:x}::/64", hextet(node))
}

fn hextet(n: usize) -> u16 {
    u16::try_from(n).unwrap_or(u16::MAX)
}

/// Turns IPv6 duplicate address detection off in namespace `ns` for every
/// interface created from now on (`default`) and the existing ones (`all`).
pub fn disable_dad(ns: &str) -> Result<(), LabError> {
    write_sysctl(ns, "net/ipv6/conf/all/accept_dad", "0")?;
    write_sysctl(ns, "net/ipv6/conf/default/accept_dad", "0")
}

fn octet(n: usize) -> u8 {
    u8::try_from(n).unwrap_or(u8::MAX)
}

/// Whether namespace `name` is one a lab with `prefix` creates
/// (`p-ul`, `p-n<digits>`, `p-n<digits>-p<digits>`), and nothing else.
pub fn is_lab_netns(prefix: &str, name: &str) -> bool {
    let Some(rest) = name.strip_prefix(prefix).and_then(|r| r.strip_prefix('-')) else {
        return false;
    };
    if rest == "ul" {
        return true;
    }
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    let Some(node_part) = rest.strip_prefix('n') else {
        return false;
    };
    match node_part.split_once("-p") {
        None => digits(node_part),
        Some((n, p)) => digits(n) && digits(p),
    }
}

/// Creates the underlay namespace and its bridge.
pub fn create_underlay(prefix: &str) -> Result<(), LabError> {
    let ul = underlay_netns(prefix);
    add_netns(&ul)?;
    ip(["-n", &ul, "link", "add", UNDERLAY_BRIDGE, "type", "bridge"])?;
    ip(["-n", &ul, "link", "set", UNDERLAY_BRIDGE, "up"])?;
    Ok(())
}

/// Sets the MTU of node `node`'s uplink, both ends, and of the underlay
/// bridge (jumbo frames: `LabOptions::underlay_mtu`).
pub fn set_node_mtu(prefix: &str, node: usize, mtu: u32) -> Result<(), LabError> {
    let ul = underlay_netns(prefix);
    let ns = node_netns(prefix, node);
    let mtu = mtu.to_string();
    ip(["-n", &ul, "link", "set", &node_name(node), "mtu", &mtu])?;
    ip(["-n", &ul, "link", "set", UNDERLAY_BRIDGE, "mtu", &mtu])?;
    ip(["-n", &ns, "link", "set", NODE_UPLINK, "mtu", &mtu])?;
    Ok(())
}

/// Creates node `node` of `nodes`: namespace, uplink, address, forwarding,
/// routes; IPv6 ones too when `dual_stack`.
pub fn create_node(
    prefix: &str,
    node: usize,
    nodes: usize,
    dual_stack: bool,
) -> Result<(), LabError> {
    let ul = underlay_netns(prefix);
    let ns = node_netns(prefix, node);
    let ul_side = node_name(node);
    add_netns(&ns)?;
    if dual_stack {
        // Before any link exists here: the uplink, and the pods' bridge the
        // CNI bridge plugin makes later, inherit it.
        disable_dad(&ns)?;
    }
    // Created in the underlay, its peer moved straight into the node: no link
    // ever appears in the caller's namespace.
    ip([
        "-n",
        &ul,
        "link",
        "add",
        &ul_side,
        "type",
        "veth",
        "peer",
        "name",
        NODE_UPLINK,
        "netns",
        &ns,
    ])?;
    ip([
        "-n",
        &ul,
        "link",
        "set",
        &ul_side,
        "master",
        UNDERLAY_BRIDGE,
        "up",
    ])?;
    let addr = format!("{}/24", node_address(node));
    ip(["-n", &ns, "addr", "add", &addr, "dev", NODE_UPLINK])?;
    ip(["-n", &ns, "link", "set", NODE_UPLINK, "up"])?;
    write_sysctl(&ns, "net/ipv4/ip_forward", "1")?;
    for other in (1..=nodes).filter(|&j| j != node) {
        let via = node_address(other).to_string();
        ip(["-n", &ns, "route", "add", &pod_cidr(other), "via", &via])?;
    }
    if dual_stack {
        let addr = format!("{}/64", node_address6(node));
        ip(["-n", &ns, "addr", "add", &addr, "dev", NODE_UPLINK, "nodad"])?;
        write_sysctl(&ns, "net/ipv6/conf/all/forwarding", "1")?;
        for other in (1..=nodes).filter(|&j| j != node) {
            let via = node_address6(other).to_string();
            ip([
                "-n",
                &ns,
                "-6",
                "route",
                "add",
                &pod_cidr6(other),
                "via",
                &via,
            ])?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_addresses() {
        assert_eq!(underlay_netns("nml"), "nml-ul");
        assert_eq!(node_netns("nml", 2), "nml-n2");
        assert_eq!(pod_netns("nml", 2, 1), "nml-n2-p1");
        assert_eq!(node_address(3).to_string(), "10.77.0.3");
        assert_eq!(pod_cidr(3), "10.78.3.0/24");
        assert_eq!(node_address6(3).to_string(), "fd00:77::3");
        assert_eq!(pod_cidr6(3), "fd00:78:3::/64");
        assert_eq!(pod_cidr6(200), "fd00:78:c8::/64");
    }

    #[test]
    fn prefixes() {
        validate_prefix("nml").expect("nml");
        validate_prefix("nmt12345").expect("test prefix");
        for bad in ["", "1ab", "a-b", "ABC", "abcdefghijk"] {
            assert!(validate_prefix(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn lab_netns_matching_is_exact() {
        for ours in ["nml-ul", "nml-n1", "nml-n12-p3"] {
            assert!(is_lab_netns("nml", ours), "{ours}");
        }
        for theirs in [
            "nmlx-ul", "nml-n", "nml-n1-p", "nml-nx", "nml-ulx", "nml", "other-n1",
        ] {
            assert!(!is_lab_netns("nml", theirs), "{theirs}");
        }
    }
}
