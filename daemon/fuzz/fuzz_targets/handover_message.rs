//! Fuzz target `handover_message`: see `nodemesh_fuzz::handover_message` for the properties checked.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| nodemesh_fuzz::handover_message(data));
