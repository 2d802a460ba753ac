//! Fuzz target `tls_files`: see `nodemesh_fuzz::tls_files` for the properties checked.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| nodemesh_fuzz::tls_files(data));
