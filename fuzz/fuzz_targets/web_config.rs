//! The exporter-toolkit web config (YAML) rotd edits for prometheus-remote-write.
//! The property checks live in `../harness.rs`, shared with
//! `tests/integration/fuzz_smoke.rs`.
#![no_main]
use libfuzzer_sys::fuzz_target;

#[path = "../harness.rs"]
mod harness;

fuzz_target!(|data: &[u8]| harness::web_config(data));
