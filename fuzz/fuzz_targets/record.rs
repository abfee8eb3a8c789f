//! The decrypted plaintext of secrets/NAME.age: the secret, then `key: value` lines.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(r) = rotd::store::Record::parse(data) {
        // What parses must parse again once written back.
        rotd::store::Record::parse(&r.to_plaintext()).expect("round trip");
    }
});
