//! # strongroom-keys
//!
//! Key providers for Strongroom: implementations of
//! [`strongroom_crypto::KeyProvider`], each in its own module, each passing the conformance
//! kit in `strongroom_crypto::testing`.
//!
//! * [`local`]: a keyring file of versioned KEKs on local disk (mode 0600, written
//!   atomically). The simplest provider, for development and single-node deployments whose
//!   disk is trusted.
//!
//! Remote providers (AWS KMS, PKCS#11, Vault/OpenBao Transit) will live beside it.

#![cfg_attr(not(test), warn(clippy::unwrap_used, clippy::expect_used))]

pub mod local;
