//! The exporter-toolkit web config (YAML) rotd edits for prometheus-remote-write.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = rotd::targets::prometheus::WebConfig::parse(data, std::path::Path::new("web.yml"));
});
