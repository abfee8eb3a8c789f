//! rotd — a secret-rotation daemon for observability pipelines.
//!
//! # Layout
//!
//! ```text
//!  cli/commands ──► rotation::Engine ──► targets::Config (enum: prometheus, files)
//!                        │   │                 apply / probe / rollback / retire
//!                        │   └──────────────► deliver (templates → files → reloads)
//!                        ▼
//!                   store::Store  (git2 + age: the journal, the audit trail, the lock)
//!                        │
//!                   secrets/NAME.age, secrets/NAME.pending.age, .age-recipients
//! ```
//!
//! * [`config`] parses `rotd.toml` and `schedules/*.toml` into a checked [`config::Config`].
//! * [`store`] is the git repository of age-encrypted [`store::Record`]s; every change is
//!   a commit with `Rotd-*` trailers, made under a `flock`.
//! * [`rotation`] is the engine: plan → pending commit → apply → deliver → probe →
//!   succeeded commit → retire, with rollback and crash recovery; its module doc states
//!   what each step guarantees.
//! * [`targets`] holds one file per target kind, each with its probe beside it.
//! * [`deliver`] renders consumer files and runs reloads.
//! * [`secret`] is the redacting [`secret::Secret`] type and the CSPRNG generator.
//! * [`audit`] is `rotd verify`: signatures, plaintext leaks, trailers, recipients.
//! * [`agent`] is `rotd agent` on a consumer host: pulls signed store commits, delivers, acknowledges.
//! * [`history`] reads the audit trail back from git.
//! * [`signing`] makes and checks the SSH signatures (sshsig) of store commits.
//! * Leaves used by the layers above: [`fault`] (the crash test hook
//!   `ROTD_FAULT_KILL_AFTER`, shared by the rotator and the agent), [`http`] (the one HTTP client: no redirect
//!   followed, body cap, error wording), [`redact`] (credentials scrubbed from peers'
//!   text, then cut), [`validate`] (formats of values from peers and stdin).
//!
//! Blocking work (git2, age, bcrypt, fsync) runs in `spawn_blocking`; HTTP (probes,
//! reloads) is async on tokio.
//!
//! # Layers
//!
//! There is no cycle: a module uses only modules of a lower layer (the test `layers` below reads the
//! sources and holds every `crate::` path to this table):
//!
//! ```text
//! 11 commands
//! 10 agent
//!  9 daemon
//!  8 control                      (the control-socket protocol and its client)
//!  7 rekey, status
//!  6 rotation
//!  5 config, history
//!  4 targets, audit               (each target kind owns its raw `[target]` form)
//!  3 store, deliver
//!  2 http, signing
//!  1 redact, fsutil
//!  0 secret, syntax, exit, fault, validate, metrics, cli
//! ```

pub mod agent;
pub mod audit;
pub mod cli;
pub mod commands;
pub mod config;
pub mod control;
pub mod daemon;
pub mod deliver;
pub mod exit;
pub mod fault;
pub mod fsutil;
pub mod history;
pub mod http;
pub mod metrics;
pub mod redact;
pub mod rekey;
pub mod rotation;
pub mod secret;
pub mod signing;
pub mod status;
pub mod store;
pub mod syntax;
pub mod targets;
pub mod validate;

#[cfg(test)]
mod layers {
    use std::collections::BTreeMap;

    /// The table of the module doc.
    const LAYERS: &[(&str, u8)] = &[
        ("commands", 11),
        ("agent", 10),
        ("daemon", 9),
        ("control", 8),
        ("rekey", 7),
        ("status", 7),
        ("rotation", 6),
        ("config", 5),
        ("history", 5),
        ("targets", 4),
        ("audit", 4),
        ("store", 3),
        ("deliver", 3),
        ("http", 2),
        ("signing", 2),
        ("redact", 1),
        ("fsutil", 1),
        ("secret", 0),
        ("syntax", 0),
        ("exit", 0),
        ("fault", 0),
        ("validate", 0),
        ("metrics", 0),
        ("cli", 0),
    ];

    fn sources(dir: &std::path::Path, out: &mut Vec<std::path::PathBuf>) {
        for e in std::fs::read_dir(dir).unwrap().flatten() {
            let p = e.path();
            if p.is_dir() {
                sources(&p, out);
            } else if p.extension().is_some_and(|x| x == "rs") {
                out.push(p);
            }
        }
    }

    #[test]
    fn every_module_uses_only_lower_layers() {
        let rank: BTreeMap<&str, u8> = LAYERS.iter().copied().collect();
        let src = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
        let lib = std::fs::read_to_string(src.join("lib.rs")).unwrap();
        for m in lib.lines().filter_map(|l| l.strip_prefix("pub mod ")) {
            let m = m.trim_end_matches(';');
            assert!(rank.contains_key(m), "module {m} is not in the layer table");
        }
        let mut files = Vec::new();
        sources(&src, &mut files);
        let mut wrong = Vec::new();
        for f in files {
            let rel = f.strip_prefix(&src).unwrap();
            let top = rel
                .components()
                .next()
                .unwrap()
                .as_os_str()
                .to_string_lossy();
            let top = top.trim_end_matches(".rs").to_owned();
            let Some(&from) = rank.get(top.as_str()) else {
                continue; // lib.rs, main.rs
            };
            let text = std::fs::read_to_string(&f).unwrap();
            // Unit tests may reach anywhere.
            let text = text.split("#[cfg(test)]").next().unwrap_or("");
            for (i, _) in text.match_indices("crate::") {
                let used: String = text[i + 7..]
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect();
                let Some(&to) = rank.get(used.as_str()) else {
                    continue;
                };
                if used != top && to >= from {
                    wrong.push(format!(
                        "{} uses crate::{used} (layer {from} → {to})",
                        rel.display()
                    ));
                }
            }
        }
        wrong.sort();
        wrong.dedup();
        assert!(
            wrong.is_empty(),
            "uses against the layers:\n{}",
            wrong.join("\n")
        );
    }
}
