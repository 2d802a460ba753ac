//! Fuzz target `split_annotations`: see `nodemesh_fuzz::split_annotations` for the properties checked.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| nodemesh_fuzz::split_annotations(data));
