//! Attacks on rotd through the store remote: forged and unsigned commits (see the module list in `tests/security.rs`).

#[allow(unused_imports)]
use crate::util::*;
