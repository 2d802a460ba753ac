//! Fuzz target `discovery_file`: see `nodemesh_fuzz::discovery_file` for the properties checked.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| nodemesh_fuzz::discovery_file(data));
