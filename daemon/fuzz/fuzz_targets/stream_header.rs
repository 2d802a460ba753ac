//! Fuzz target: the stream header and status decoders (docs/protocol.md).
//!
//! Decodes arbitrary bytes as a header and as a status. Neither may panic;
//! whatever decodes must re-encode, and the re-encoding must decode to the
//! same value (a status re-encodes to exactly the bytes it was read from).
#![no_main]

use libfuzzer_sys::fuzz_target;
use nodemesh::tunnel::header::{Decoded, Status, StreamHeader};

fuzz_target!(|data: &[u8]| {
    if let Ok(Decoded::Complete(header, used)) = StreamHeader::decode(data) {
        assert!(used <= data.len());
        let mut again = Vec::new();
        header
            .encode(&mut again)
            .expect("a decoded header re-encodes");
        assert_eq!(again.len(), header.encoded_len());
        assert_eq!(
            StreamHeader::decode(&again).expect("re-encoded header decodes"),
            Decoded::Complete(header, again.len())
        );
    }
    if let Ok(Decoded::Complete(status, used)) = Status::decode(data) {
        let mut again = Vec::new();
        status.encode(&mut again);
        assert_eq!(again.as_slice(), &data[..used]);
    }
});
