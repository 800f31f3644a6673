//! The one conformance suite every [`Store`] backend must pass, plus helpers for tests and
//! benchmarks. Enabled by the `testing` feature.
//!
//! A backend's integration test implements [`TestBackend`] (one fresh, empty database per
//! instance) and expands [`conformance_tests!`](crate::conformance_tests) with an async
//! expression that makes one:
//!
//! ```ignore
//! strongroom_store::conformance_tests!(make_backend());
//! async fn make_backend() -> Option<Box<dyn TestBackend>> { ... }
//! ```
//!
//! Each suite function panics (with a message) on a violation, like any test.

pub(crate) mod suite;

use std::sync::Arc;

use async_trait::async_trait;

use crate::{Store, StoreError};

pub use suite::*;

/// One fresh database of one backend, for one conformance test.
#[async_trait]
pub trait TestBackend: Send + Sync {
    /// Opens this backend's database (the same database on every call; the first call
    /// creates the schema). Several stores may be open on it at once.
    async fn open(&self) -> Result<Arc<dyn Store>, StoreError>;

    /// Reads a version's raw `(sealed_value, wrapped_key)` columns straight from the
    /// database, bypassing the store (`None` if there is no such row).
    async fn raw_secret_columns(
        &self,
        owner: &str,
        name: &str,
        version: u32,
    ) -> Result<Option<(Vec<u8>, Vec<u8>)>, StoreError>;

    /// Overwrites the schema version recorded in the database (every store opened before
    /// has been dropped).
    async fn set_schema_version(&self, version: u32) -> Result<(), StoreError>;

    /// Every audit time mark `(second, seq)` in the database, in `second` order, read
    /// straight from its table.
    async fn raw_audit_time_marks(&self) -> Result<Vec<(i64, i64)>, StoreError>;

    /// Every stored late mark `(second, seq)`, in `second` order, read straight from its
    /// table (see [`crate::audit`]'s time index).
    async fn raw_audit_late_marks(&self) -> Result<Vec<(i64, i64)>, StoreError>;

    /// The `seq` range a query by time in milliseconds scans, once every record is indexed
    /// (`0` and `i64::MAX` for open ends).
    async fn audit_seq_bounds(
        &self,
        since: Option<i64>,
        until: Option<i64>,
    ) -> Result<(i64, i64), StoreError>;

    /// How many keys have allowance state in the database (see
    /// [`Store::take_allowance`]).
    async fn raw_allowance_rows(&self) -> Result<u64, StoreError>;
}

/// What a backend's `testing_bulk_load` inserts: credential `i` (for `i` in
/// `0..credentials`) is `(bulk_owner(i), bulk_name(i))` with versions
/// `1..=versions_per_credential`, each holding a `value_len`-byte sealed value and KEK
/// `bench/k1/1`.
#[derive(Debug, Clone)]
pub struct BulkSpec {
    /// How many credentials.
    pub credentials: u64,
    /// How many versions each.
    pub versions_per_credential: u32,
    /// Sealed value length, in bytes.
    pub value_len: usize,
}

/// The owner of bulk-loaded credential `i` (100 credentials per owner).
pub fn bulk_owner(i: u64) -> String {
    format!("bench-owner-{}", i / 100)
}

/// The name of bulk-loaded credential `i`.
pub fn bulk_name(i: u64) -> String {
    format!("cred-{i:08}")
}

/// Expands to one `#[tokio::test]` per conformance check. `$make` is an async expression
/// of type `Option<Box<dyn TestBackend>>` evaluated once per test (`None` skips the test:
/// the expression should say loudly why).
#[macro_export]
macro_rules! conformance_tests {
    ($make:expr) => {
        $crate::conformance_tests!(@each $make;
            put_and_get_round_trip,
            version_must_be_latest_plus_one,
            racing_writers_exactly_one_wins,
            expected_current_check_and_set,
            racing_check_and_set_exactly_one_wins,
            pagination_is_stable_and_owner_isolated,
            get_credential_lists_versions_without_secrets,
            set_current_version,
            disable_and_enable,
            destroy_version_erases_bytes,
            destroy_credential_continues_numbering,
            retention_destroys_oldest_first,
            tombstones_beyond_the_window_are_deleted,
            rewrap_iteration_and_compare_and_swap,
            counts_by_kek_cover_active_versions_only,
            schema_too_new_is_refused,
            reopen_keeps_everything,
            unicode_and_long_owner_ids,
            values_of_64_kib_round_trip,
            touch_last_used_keeps_the_latest_but_not_a_clock_far_ahead,
            provider_state_round_trips,
            provider_state_compare_and_swap,
            missing_credentials_are_not_found,
            invalid_input_is_rejected,
            random_operations_match_a_model,
            audit_append_chains_and_verifies,
            audit_genesis_is_not_sealed_over_data,
            audit_query_filters_and_pages,
            audit_query_by_time_and_owner_is_exact,
            a_late_record_widens_only_the_queries_that_need_it,
            audit_head_key_first_wins,
            audit_concurrent_appends_one_chain,
            audited_put_is_one_transaction,
            audited_change_is_one_transaction,
            audit_archive_anchor_and_prune,
            audit_prune_removes_time_marks_and_queries_stay_exact,
            quota_counts_live_credentials_per_owner,
            quota_holds_under_racing_creates,
            credential_versions_come_in_pages,
            allowances_are_shared_kept_and_refilled,
            allowance_holds_under_racing_takes,
        );
    };
    (@each $make:expr; $($name:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn $name() {
                let backend: Option<Box<dyn $crate::testing::TestBackend>> = $make.await;
                if let Some(backend) = backend {
                    $crate::testing::$name(&*backend).await;
                }
            }
        )*
    };
}

/// The audit log the schema-5 migration tests write on each backend: 60 records, record `i`
/// (seq `i + 1`) at second [`Schema5Log::second`] of the fixed epoch, of owner
/// [`Schema5Log::owner`]. Every fifth record is 3 s late and one an hour late, so that the
/// time marks and the lag the migration computes are both put to the test.
pub struct Schema5Log;

impl Schema5Log {
    /// How many records.
    pub const RECORDS: u64 = 60;

    /// Record `i`'s second, relative to [`Schema5Log::at`]'s epoch.
    #[must_use]
    pub fn second(i: u64) -> i64 {
        let late = match i {
            17 => 3600,
            i if i % 5 == 0 => 3,
            _ => 0,
        };
        i as i64 - late
    }

    /// The time `s` seconds after the fixed epoch (1 700 000 000).
    #[must_use]
    pub fn at(s: i64) -> time::OffsetDateTime {
        time::OffsetDateTime::UNIX_EPOCH + time::Duration::seconds(1_700_000_000 + s)
    }

    /// Record `i`'s owner.
    #[must_use]
    pub fn owner(i: u64) -> &'static str {
        ["erin", "frank"][(i % 2) as usize]
    }

    /// Record `i`'s event: a reveal of the owner's `k` at its second.
    #[must_use]
    pub fn event(i: u64) -> crate::audit::Event {
        let mut e = audit_event(i, Self::owner(i), "k", "reveal");
        e.time = Self::at(Self::second(i));
        e
    }

    /// Checks that queries by time, alone and with an owner, over windows before, across and
    /// after the late records, find exactly the records a plain filter does, newest first.
    ///
    /// # Panics
    ///
    /// On a query error or a wrong answer.
    pub async fn check_queries(log: &dyn crate::audit::AuditLog) {
        for owner in [None, Some("erin")] {
            for (since, until) in [
                (None, Some(10)),
                (Some(10), Some(30)),
                (Some(-3600), Some(-3599)),
                (Some(33), None),
                (Some(50), Some(51)),
            ] {
                let f = crate::audit::AuditFilter {
                    owner: owner.map(String::from),
                    since: since.map(Self::at),
                    until: until.map(Self::at),
                    ..Default::default()
                };
                let want: Vec<u64> = (0..Self::RECORDS)
                    .rev()
                    .filter(|&i| owner.is_none_or(|o| o == Self::owner(i)))
                    .filter(|&i| {
                        since.is_none_or(|s| Self::second(i) >= s)
                            && until.is_none_or(|u| Self::second(i) < u)
                    })
                    .map(|i| i + 1)
                    .collect();
                let got: Vec<u64> = log
                    .audit_query(&f, None, 100)
                    .await
                    .unwrap()
                    .iter()
                    .map(|r| r.seq)
                    .collect();
                assert_eq!(got, want, "{f:?}");
            }
        }
    }
}
