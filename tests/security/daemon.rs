//! Attacks on rotd through its control socket, metrics port and scheduler (see the module list in `tests/security.rs`).

#[allow(unused_imports)]
use crate::util::*;
