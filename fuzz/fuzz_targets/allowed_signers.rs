//! `[store] allowed_signers` (git's allowed-signers format), then the verification
//! of an arbitrary armored SSH signature over arbitrary data.
//! The property checks live in `../harness.rs`, shared with
//! `tests/integration/fuzz_smoke.rs`.
#![no_main]
use libfuzzer_sys::fuzz_target;

#[path = "../harness.rs"]
mod harness;

fuzz_target!(|data: &[u8]| harness::allowed_signers(data));
