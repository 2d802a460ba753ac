//! Fuzz target `stream_header`: see `nodemesh_fuzz::stream_header` for the properties checked.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| nodemesh_fuzz::stream_header(data));
