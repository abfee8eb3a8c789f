//! An Elasticsearch response body: parsed as the client parses it, then read by every
//! decision rotd takes on an answer (created key, key lookups, invalidate
//! confirmation, probe document, `_has_privileges`, error descriptions).
//! The property checks live in `../harness.rs`, shared with
//! `tests/integration/fuzz_smoke.rs`.
#![no_main]
use libfuzzer_sys::fuzz_target;

#[path = "../harness.rs"]
mod harness;

fuzz_target!(|data: &[u8]| harness::es_response(data));
