//! The control socket, both sides: request lines as the daemon parses them (what
//! parses must re-serialise to the same request) and the answer line as the client
//! parses and prints it (`rotd rotate`, `rotd status`, `rotd reload`).
//! The property checks live in `../harness.rs`, shared with
//! `tests/integration/fuzz_smoke.rs`.
#![no_main]
use libfuzzer_sys::fuzz_target;

#[path = "../harness.rs"]
mod harness;

fuzz_target!(|data: &[u8]| harness::control(data));
