//! Fuzz target `cni_request`: see `nodemesh_fuzz::cni_request` for the properties checked.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| nodemesh_fuzz::cni_request(data));
