//! # strongroom-core
//!
//! Strongroom's use cases — put, list, describe, choose the current version, disable/enable,
//! verify, destroy, reveal, brokered use ([`broker`]) — and the service authorization [`policy`]. It sees only the
//! [`strongroom_crypto::KeyProvider`] and [`strongroom_store::Store`] traits; the server
//! picks the implementations.
//!
//! Who may call what is decided in two places: the API layer maps a user to their own owner
//! id (a user never names an owner), and [`policy::Policy`] decides for services. This crate
//! never returns a value except from [`Vault::reveal`], and the value never appears in an
//! error.

#![cfg_attr(not(test), warn(clippy::unwrap_used, clippy::expect_used))]

pub mod audit;
pub mod broker;
mod error;
pub mod hierarchy;
pub mod keyring_record;
pub mod lines;
pub mod policy;
pub mod rewrap;
mod usage;
mod vault;

pub use error::CoreError;
pub use rewrap::{rewrap, FailedVersion, RewrapOptions, RewrapReport, MAX_FAILURES_LISTED};
pub use strongroom_store::Change;
pub use vault::{
    check_place, expiry_of, Clock, PutOutcome, PutRequest, ReadCheck, Revealed, SystemClock, Vault,
    VaultConfig, EXPIRES_AT_KEY, MAX_METADATA_LEN, MAX_VALUE_LEN,
};
