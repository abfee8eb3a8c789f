//! schedules/NAME.toml: TOML, then every check of `rotd check`.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let mut problems = Vec::new();
        let path = std::path::Path::new("/nonexistent/rotd-fuzz/schedules/fuzz.toml");
        let _ = rotd::config::parse_schedule_str(text, path, &mut problems);
        for p in &problems {
            let _ = p.to_string();
        }
    }
});
