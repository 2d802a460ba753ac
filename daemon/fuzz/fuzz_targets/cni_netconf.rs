//! Fuzz target `cni_netconf`: see `nodemesh_fuzz::cni_netconf` for the properties checked.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| nodemesh_fuzz::cni_netconf(data));
