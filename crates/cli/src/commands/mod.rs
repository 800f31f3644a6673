//! One module per top-level subcommand.

pub mod fernet;
pub mod keys;
