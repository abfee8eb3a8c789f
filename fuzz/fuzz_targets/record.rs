//! The decrypted plaintext of secrets/NAME.age: the secret, then `key: value` lines;
//! what parses must parse again once written back.
//! The property checks live in `../harness.rs`, shared with
//! `tests/integration/fuzz_smoke.rs`.
#![no_main]
use libfuzzer_sys::fuzz_target;

#[path = "../harness.rs"]
mod harness;

fuzz_target!(|data: &[u8]| harness::record(data));
