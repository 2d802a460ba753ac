//! Fuzz target `config_file`: see `nodemesh_fuzz::config_file` for the properties checked.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| nodemesh_fuzz::config_file(data));
