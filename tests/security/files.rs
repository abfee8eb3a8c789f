//! Attacks on rotd through the files it reads and writes (see the module list in `tests/security.rs`).

#[allow(unused_imports)]
use crate::util::*;
