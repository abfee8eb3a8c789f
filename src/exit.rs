//! Exit codes of every rotd command (DESIGN §2, contract): the CLI, the daemon's
//! control-socket answers and the agent share them. A leaf module.

pub const OK: i32 = 0;
/// A rotation or pass failed and everything was put back (or nothing was touched).
pub const ROLLED_BACK: i32 = 1;
/// A failure left something that could not be put back: see the message.
pub const NOT_ROLLED_BACK: i32 = 2;
/// A command line that cannot be run as written.
pub const USAGE: i32 = 64;
/// The configuration or a key file is wrong.
pub const CONFIG: i32 = 78;
