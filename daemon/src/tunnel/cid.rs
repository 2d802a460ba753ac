//! QUIC connection IDs that name the daemon process that issued them.
//!
//! During a hand-over two daemons share the tunnel's UDP port (a
//! `SO_REUSEPORT` group, see `reuseport`), and the kernel must deliver each
//! datagram to the process that owns its connection. So every connection ID a
//! daemon issues starts with its one-byte **tag** ([`TaggedCids`]); the rest
//! (7 bytes) is random. The successor picks a tag different from its
//! predecessor's, and a classic BPF program on the group steers by the first
//! byte of the destination connection ID.
//!
//! The first byte of a connection ID is visible to observers, as in QUIC-LB
//! server IDs: it tells which of (at most two) daemon processes on a node owns
//! a connection, nothing else. Tags are 1..=255; the initial destination
//! connection IDs nodemesh clients choose start with
//! [`INITIAL_DCID_FIRST_BYTE`] (0, never a tag), so a new connection's packets
//! never look like an existing one's.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use quinn::{ConnectionId, ConnectionIdGenerator};
use ring::rand::{SecureRandom, SystemRandom};

/// Length of the connection IDs a daemon issues (the tag and 7 random bytes).
pub const CID_LEN: usize = 8;
/// First byte of the initial destination connection ID a nodemesh client
/// sends; never a tag.
pub const INITIAL_DCID_FIRST_BYTE: u8 = 0;
/// Length of that initial destination connection ID (RFC 9000 §7.2: at least
/// 8 unpredictable bytes; 1 fixed + 15 random).
pub const INITIAL_DCID_LEN: usize = 16;

/// A daemon's connection-ID tag: 1..=255.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Tag(u8);

impl Tag {
    /// `value` as a tag, if it is one (0 is reserved for initial DCIDs).
    pub fn new(value: u8) -> Option<Self> {
        (value != INITIAL_DCID_FIRST_BYTE).then_some(Self(value))
    }

    /// A random tag different from `avoid` (the predecessor's, if any).
    pub fn random_except(avoid: Option<Tag>) -> Self {
        let mut b = [0u8; 1];
        loop {
            fill_random(&mut b);
            if let Some(t) = Self::new(b[0]) {
                if Some(t) != avoid {
                    return t;
                }
            }
        }
    }

    /// The byte.
    pub fn get(self) -> u8 {
        self.0
    }
}

/// Generates [`CID_LEN`]-byte connection IDs starting with a fixed [`Tag`].
#[derive(Debug, Clone, Copy)]
pub struct TaggedCids {
    tag: Tag,
}

impl TaggedCids {
    /// A generator for `tag`.
    pub fn new(tag: Tag) -> Self {
        Self { tag }
    }
}

impl ConnectionIdGenerator for TaggedCids {
    fn generate_cid(&mut self) -> ConnectionId {
        let mut b = [0u8; CID_LEN];
        b[0] = self.tag.0;
        fill_random(&mut b[1..]);
        ConnectionId::new(&b)
    }

    fn cid_len(&self) -> usize {
        CID_LEN
    }

    fn cid_lifetime(&self) -> Option<Duration> {
        None
    }
}

/// The initial destination connection ID of a dial: [`INITIAL_DCID_FIRST_BYTE`]
/// then random bytes.
pub fn initial_dcid() -> ConnectionId {
    let mut b = [0u8; INITIAL_DCID_LEN];
    b[0] = INITIAL_DCID_FIRST_BYTE;
    fill_random(&mut b[1..]);
    ConnectionId::new(&b)
}

/// The `quinn::ClientConfig::initial_dst_cid_provider` for [`initial_dcid`].
pub fn initial_dcid_provider() -> Arc<dyn Fn() -> ConnectionId + Send + Sync> {
    Arc::new(initial_dcid)
}

/// Fills `buf` from the system CSPRNG. Should the kernel ever refuse
/// (getrandom unavailable), a counter mixed with the time keeps IDs distinct,
/// which is all quinn needs to route; that never panics on the data path.
fn fill_random(buf: &mut [u8]) {
    static RNG: std::sync::OnceLock<SystemRandom> = std::sync::OnceLock::new();
    if RNG.get_or_init(SystemRandom::new).fill(buf).is_ok() {
        return;
    }
    static COUNTER: AtomicU64 = AtomicU64::new(0x9e37_79b9_7f4a_7c15);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    let mut x = COUNTER.fetch_add(0x9e37_79b9_7f4a_7c15, Ordering::Relaxed) ^ nanos;
    for chunk in buf.chunks_mut(8) {
        // splitmix64
        x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = x;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^= z >> 31;
        chunk.copy_from_slice(&z.to_le_bytes()[..chunk.len()]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cids_carry_the_tag_and_random_bytes() {
        let tag = Tag::new(0xa7).expect("tag");
        let mut g = TaggedCids::new(tag);
        assert_eq!(g.cid_len(), CID_LEN);
        let cids: Vec<ConnectionId> = (0..64).map(|_| g.generate_cid()).collect();
        for c in &cids {
            assert_eq!(c.len(), CID_LEN);
            assert_eq!(c[0], 0xa7);
        }
        let mut unique = cids.iter().map(|c| c[1..].to_vec()).collect::<Vec<_>>();
        unique.sort();
        unique.dedup();
        assert_eq!(unique.len(), cids.len(), "random part differs");
    }

    #[test]
    fn zero_is_never_a_tag_and_random_tags_avoid_the_predecessor() {
        assert!(Tag::new(INITIAL_DCID_FIRST_BYTE).is_none());
        let old = Tag::new(1).expect("tag");
        for _ in 0..2000 {
            let t = Tag::random_except(Some(old));
            assert_ne!(t, old);
            assert_ne!(t.get(), INITIAL_DCID_FIRST_BYTE);
        }
    }

    #[test]
    fn initial_dcids_start_with_the_reserved_byte() {
        let a = initial_dcid();
        let b = initial_dcid();
        assert_eq!(a.len(), INITIAL_DCID_LEN);
        assert_eq!(a[0], INITIAL_DCID_FIRST_BYTE);
        assert_ne!(a[1..], b[1..]);
    }
}
