//! Attacks on rotd through HTTP peers: targets, probes, reload endpoints, Elasticsearch answers (see the module list in `tests/security.rs`).

#[allow(unused_imports)]
use crate::util::*;
