//! A stable-Rust stand-in for the cargo-fuzz targets in `fuzz/`: the committed seed
//! corpus and 10,000 random mutations of it go through each parser (a schedule file,
//! the Prometheus web config, a store record, an Elasticsearch response body, the
//! Prometheus query answer, the control socket's two sides, allowed signers and
//! signatures, recipient and identity lines, commit trailers, the web-config
//! rewrite, the scheduler's next run). None may panic or break a property of `fuzz/harness.rs`
//! (shared with the fuzz targets), and each input must be handled quickly. For the
//! coverage-guided runs see fuzz/README.md.

#[path = "../../fuzz/harness.rs"]
mod harness;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

const MUTATIONS: usize = 10_000;
/// Generous for a debug build on a loaded machine; a parser that loops or backtracks
/// badly on some input blows through it.
const PER_INPUT: Duration = Duration::from_secs(2);

/// xorshift64*: deterministic, so a failure reproduces with the printed seed.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

/// Fragments that mean something to TOML, YAML, cron, templates, records and JSON.
#[rustfmt::skip]
const TOKENS: &[&str] = &[
    "\n", "\r\n", "=", ":", "[", "]", "[[", "]]", "{", "}", "\"", "'''", "\"\"\"", ",", "#",
    "- ", "  ", "\t", "{{", "}}", "{{secret}}", "{{username}}", "*", "0", "-1",
    "99999999999999999999", "1e309", "nan", "&a", "*a", "!!binary", "~", "null", "\u{0}",
    "\u{feff}", "é", "kind = \"files\"", "kind = \"prometheus-remote-write\"",
    "kind = \"elasticsearch-api-key\"", "[target]", "[[deliver]]", "[probe]", "[generate]",
    "schedule = \"", "grace = \"", "length = ", "charset = \"", "basic_auth_users:",
    "username: ", "key-id: ", "retire-after: ",
    "true", "false", "[]", "{}", "\\u0000", "\\ud800", "1e400", "-0", "18446744073709551616",
    "\"api_keys\":[", "\"id\":", "\"invalidated\":", "\"error\":{", "\"error_count\":",
    "\"status\":\"success\"", "\"result\":[", "[[[[[[[[[[[[[[[[", "{\"a\":{\"a\":{\"a\":",
    "{\"cmd\":\"rotate\",\"names\":[", "\"ok\":", "\"results\":[", "\"last_rotation\":{\"time\":",
    "Rotd-", "Rotd-Step: ", ": ", "\\n", "-----BEGIN SSH SIGNATURE-----", "namespaces=\"", "valid-after=\"",
    "cert-authority", "ssh-ed25519 ", "age1", "AGE-SECRET-KEY-PLACEHOLDER", "jitter = \"", "window = \"",
    "retries = ", "max_age = \"", "10000000000y", "L", "W", "#", "?",
];

fn corpus(kind: &str) -> Vec<Vec<u8>> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/corpus")
        .join(kind);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    let seeds: Vec<Vec<u8>> = files.iter().map(|f| std::fs::read(f).unwrap()).collect();
    assert!(!seeds.is_empty(), "no seeds in {}", dir.display());
    seeds
}

fn mutate(rng: &mut Rng, seeds: &[Vec<u8>]) -> Vec<u8> {
    let mut v = seeds[rng.below(seeds.len())].clone();
    for _ in 0..1 + rng.below(8) {
        let at = rng.below(v.len() + 1);
        match rng.below(7) {
            0 if !v.is_empty() => {
                let i = rng.below(v.len());
                v[i] ^= 1 << rng.below(8);
            }
            1 if !v.is_empty() => {
                let end = (at + 1 + rng.below(16)).min(v.len());
                v.drain(at.min(end)..end);
            }
            2 => v.insert(at, rng.next() as u8),
            3 | 4 => {
                let t = TOKENS[rng.below(TOKENS.len())].as_bytes();
                v.splice(at..at, t.iter().copied());
            }
            5 => {
                // splice a chunk of another seed
                let o = &seeds[rng.below(seeds.len())];
                let s = rng.below(o.len() + 1);
                let e = (s + rng.below(64)).min(o.len());
                v.splice(at..at, o[s..e].iter().copied());
            }
            _ if !v.is_empty() => {
                // duplicate a chunk (deep nesting, repeated keys)
                let e = (at + rng.below(32)).min(v.len());
                let chunk = v[at.min(e)..e].to_vec();
                for _ in 0..1 + rng.below(4) {
                    v.splice(at..at, chunk.iter().copied());
                }
            }
            _ => v.extend_from_slice(TOKENS[rng.below(TOKENS.len())].as_bytes()),
        }
    }
    v
}

fn run(kind: &str, seed: u64, mut parse: impl FnMut(&[u8])) {
    let seeds = corpus(kind);
    let mut rng = Rng(seed);
    let started = Instant::now();
    let inputs = seeds
        .clone()
        .into_iter()
        .chain((0..MUTATIONS).map(|_| mutate(&mut rng, &seeds)));
    for (i, input) in inputs.enumerate() {
        let t = Instant::now();
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| parse(&input)));
        assert!(
            r.is_ok(),
            "{kind}: input #{i} (seed {seed:#x}) panicked: {:?}",
            String::from_utf8_lossy(&input)
        );
        assert!(
            t.elapsed() < PER_INPUT,
            "{kind}: input #{i} (seed {seed:#x}) took {:?}: {:?}",
            t.elapsed(),
            String::from_utf8_lossy(&input)
        );
    }
    eprintln!(
        "{kind}: {} seeds + {MUTATIONS} mutations in {:?}",
        seeds.len(),
        started.elapsed()
    );
}

#[test]
fn schedule_parser_never_panics() {
    run("schedule", 0x5EED_0001, harness::schedule);
}

#[test]
fn web_config_parser_never_panics() {
    run("web_config", 0x5EED_0002, harness::web_config);
}

#[test]
fn record_parser_never_panics_and_round_trips() {
    run("record", 0x5EED_0003, harness::record);
}

#[test]
fn elasticsearch_response_decisions_never_panic() {
    run("es_response", 0x5EED_0004, harness::es_response);
}

#[test]
fn prometheus_query_answer_never_panics() {
    run("prom_query", 0x5EED_0005, harness::prom_query);
}

#[test]
fn control_socket_lines_never_panic_and_requests_round_trip() {
    run("control", 0x5EED_0006, harness::control);
}

#[test]
fn allowed_signers_and_signatures_never_panic() {
    run("allowed_signers", 0x5EED_0007, harness::allowed_signers);
}

#[test]
fn recipient_and_identity_lines_never_panic_and_round_trip() {
    run("recipients", 0x5EED_0008, harness::recipients);
    harness::remove_scratch();
}

#[test]
fn commit_trailers_never_panic_and_read_back_as_written() {
    run("trailers", 0x5EED_0009, harness::trailers);
}

#[test]
fn web_config_rewrite_keeps_foreign_lines_and_holds_the_intended_users() {
    run(
        "web_config_rewrite",
        0x5EED_000A,
        harness::web_config_rewrite,
    );
}

#[test]
fn next_run_never_panics_on_a_checked_schedule() {
    run("next_run", 0x5EED_000B, harness::next_run);
}
