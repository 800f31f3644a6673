//! # strongroom-import
//!
//! Moves credentials out of a Django app's `django-fernet-fields` columns into Strongroom:
//! each token is decrypted with the app's keys (as django-fernet-fields builds them: see
//! [`strongroom_crypto::django`]) and stored as a new version through [`Vault::put`], sealed
//! under the current KEK and bound to `(owner, name)`.
//!
//! The import is idempotent and resumable: every version it writes records its source in
//! its metadata, `{"imported_from": {"table", "row_id", "column", "token_sha256"}}` (a
//! fingerprint of the Fernet token, which changes whenever the app saves the field again),
//! and a value whose source is already among the credential's versions is skipped. A re-run
//! after the app changed a value therefore imports the new value as a new version. Each
//! version written is audited with it (action `put`, principal `operator`), in the same
//! transaction. A row is all or nothing: when any of
//! its values fails (no key opens it, bad owner, too large), none of its values is written.
//! Nothing here logs or returns a plaintext; failures name the row id and column only.

#![cfg_attr(not(test), warn(clippy::unwrap_used, clippy::expect_used))]

pub mod source;

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::{json, Value};
use strongroom_core::{CoreError, PutRequest, Vault, MAX_VALUE_LEN};
use strongroom_crypto::binding::{is_valid_name, is_valid_owner};
use strongroom_crypto::fernet::MultiFernet;
use strongroom_crypto::SecretBytes;
use strongroom_store::audit::{Event, HeadKey};

pub use source::{Cell, Columns, DatabaseUrl, Source, SourceRow};

/// `created_by` of the versions an import writes.
pub const CREATED_BY: &str = "import:django-fernet-fields";

/// How many times a put is retried when another writer changes the credential between the
/// "already imported?" check and the put.
const PUT_ATTEMPTS: u32 = 8;

/// What an import fails with as a whole (per-row problems go into the [`Report`]).
#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    /// Bad arguments.
    #[error("{0}")]
    Usage(String),
    /// The source database could not be read.
    #[error("source database: {0}")]
    Source(String),
    /// Writing to the vault failed; rerun to continue where the import stopped.
    #[error("target vault: {0} (rerun the import to continue)")]
    Target(#[from] CoreError),
    /// Some rows failed (the report lists them); nothing was written for those rows.
    #[error(
        "{0} row(s) could not be imported (listed in the report); nothing was written for them"
    )]
    RowsFailed(u64),
    /// Some values were not written because their owner holds as many credentials as the
    /// quota allows (the report lists them); the other values were imported.
    #[error(
        "{0} value(s) not imported: their owner already has store.max_credentials_per_owner \
         credentials (listed in the report); raise it, or have the owner delete credentials, \
         and run the same command again"
    )]
    OverQuota(u64),
    /// Stopped when asked to, after a whole batch.
    #[error(
        "interrupted after {0} row(s); run the same command again to go on (values already \
         imported are skipped)"
    )]
    Interrupted(u64),
}

/// Where each value goes.
#[derive(Debug, Clone)]
pub enum Mapping {
    /// `--map COLUMN=NAME`: each listed column becomes the credential NAME of the row's owner.
    Columns(Vec<(String, String)>),
    /// `--name-column N --value-column V`: one credential per row, named by column N.
    NameValue {
        /// Column holding the credential name.
        name_column: String,
        /// Column holding the token.
        value_column: String,
    },
}

/// What to import.
#[derive(Debug, Clone)]
pub struct Plan {
    /// The source table.
    pub table: String,
    /// Its row-id column.
    pub id_column: String,
    /// The column holding the owner id.
    pub owner_column: String,
    /// Which columns become which credentials.
    pub mapping: Mapping,
    /// Rows read per batch.
    pub batch: u32,
}

impl Plan {
    /// Checks names and builds the column list.
    ///
    /// # Errors
    ///
    /// [`ImportError::Usage`] for an empty mapping or an invalid credential name.
    pub fn columns(&self) -> Result<Columns, ImportError> {
        let (name, values) = match &self.mapping {
            Mapping::Columns(pairs) => {
                if pairs.is_empty() {
                    return Err(ImportError::Usage("give at least one --map".into()));
                }
                for (i, (col, name)) in pairs.iter().enumerate() {
                    if !is_valid_name(name) {
                        return Err(ImportError::Usage(format!(
                            "--map {col}={name}: credential names must match \
                             [a-z0-9][a-z0-9._-]{{0,127}}"
                        )));
                    }
                    // Two columns into one credential would stack their values as versions
                    // of it, in no order a user chose; one column twice imports it twice.
                    if let Some((other, _)) = pairs[..i].iter().find(|(_, n)| n == name) {
                        return Err(ImportError::Usage(format!(
                            "--map {other}={name} and --map {col}={name}: each credential \
                             name takes one column"
                        )));
                    }
                    if pairs[..i].iter().any(|(c, _)| c.eq_ignore_ascii_case(col)) {
                        return Err(ImportError::Usage(format!(
                            "--map {col}=...: the column is mapped twice"
                        )));
                    }
                }
                (None, pairs.iter().map(|(c, _)| c.clone()).collect())
            }
            Mapping::NameValue {
                name_column,
                value_column,
            } => (Some(name_column.clone()), vec![value_column.clone()]),
        };
        if self.batch == 0 {
            return Err(ImportError::Usage("--batch must be at least 1".into()));
        }
        // The row id and the owner are recorded in each version's metadata, which its owner
        // reads: never a column of tokens.
        for (flag, column) in [
            ("--id-column", &self.id_column),
            ("--owner-column", &self.owner_column),
        ] {
            if values.iter().any(|v| v.eq_ignore_ascii_case(column)) {
                return Err(ImportError::Usage(format!(
                    "{flag} {column} is also given as a column of tokens (--map or \
                     --value-column): the id and owner columns are copied into each version's \
                     metadata, which its owner reads, so they never hold tokens; map another \
                     column, or name the table's primary key or owner column"
                )));
            }
        }
        Ok(Columns {
            table: self.table.clone(),
            id: self.id_column.clone(),
            owner: self.owner_column.clone(),
            name,
            values,
        })
    }
}

/// One value that could not be imported: where it is and why, never what it holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RowFailure {
    /// The row id, as text.
    pub row_id: String,
    /// The column at fault (the owner or name column for those problems).
    pub column: String,
    /// Why.
    pub reason: &'static str,
}

/// The outcome of an import (or a dry run).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Report {
    /// Whether nothing was written.
    pub dry_run: bool,
    /// Rows read from the source.
    pub rows_read: u64,
    /// Values decrypted (in a dry run: values that would be imported or skipped).
    pub values_decrypted: u64,
    /// New versions written.
    pub values_imported: u64,
    /// NULL cells skipped.
    pub nulls_skipped: u64,
    /// Values whose source is already recorded in a version (skipped).
    pub already_imported: u64,
    /// Values not written because the credential changed in Strongroom since: its current
    /// version was set there (not imported), or it is disabled. Strongroom's copy is kept.
    pub kept_in_strongroom: u64,
    /// Values not written because their credential was deleted in Strongroom since (by its
    /// owner, say): a deletion is not undone by a re-run.
    pub deleted_in_strongroom: u64,
    /// Rows that failed (none of their values was written).
    pub rows_failed: u64,
    /// Values not written because the put would have created a credential beyond its
    /// owner's quota (`store.max_credentials_per_owner`); each is also in `failures`. Other
    /// values of the same row may have been imported.
    pub over_quota: u64,
    /// Each failing value, by row id and column.
    pub failures: Vec<RowFailure>,
    /// Whether the import stopped early, when asked to, after a whole batch.
    pub interrupted: bool,
}

/// Progress after each batch.
#[derive(Debug, Clone, Copy)]
pub struct Progress {
    /// Rows handled so far.
    pub rows_done: u64,
    /// Rows in the table when the import started.
    pub rows_total: u64,
    /// Versions written so far.
    pub imported: u64,
    /// Failed rows so far.
    pub failed: u64,
}

/// A decrypted value ready to store.
struct Ready {
    column: String,
    name: String,
    plaintext: SecretBytes,
    /// [`token_fingerprint`] of the token it came from.
    token: String,
}

/// Where an import writes.
pub struct Target<'a> {
    /// The vault the versions are written through.
    pub vault: &'a Vault,
    /// The audit head key: each version is written with its own audit record.
    pub audit_key: Arc<HeadKey>,
    /// Who runs the import (the OS user), the records' principal.
    pub operator: String,
}

/// The `imported_from` record of one value. `table` is kept as the database folds it
/// (lower case, without the default schema), so that `main.T` and `t` are one source.
pub fn source_record(table: &str, row_id: &str, column: &str, token: &str) -> Value {
    let row_id = match row_id.parse::<i64>() {
        Ok(n) if n.to_string() == row_id => json!(n),
        _ => json!(row_id),
    };
    let table = table.to_lowercase();
    let table = table
        .strip_prefix("main.")
        .or_else(|| table.strip_prefix("public."))
        .unwrap_or(&table);
    json!({ "table": table, "row_id": row_id, "column": column, "token_sha256": token })
}

/// The first 128 bits of the token's SHA-256, in hex: it says whether the app saved the
/// field again since, and nothing about the value (the token is ciphertext).
fn token_fingerprint(token: &str) -> String {
    use sha2::{Digest, Sha256};
    Sha256::digest(token.as_bytes())[..16]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn token_text(cell: &Cell) -> Result<Option<&str>, &'static str> {
    match cell {
        Cell::Null => Ok(None),
        Cell::Bytes(b) => std::str::from_utf8(b)
            .map(Some)
            .map_err(|_| "not a Fernet token (bytes are not ASCII)"),
        Cell::Text(s) => Ok(Some(s.as_str())),
        Cell::Int(_) | Cell::Real(_) => Err("not a Fernet token (the column holds a number)"),
    }
}

/// Decrypts one row. `Err` lists the row's failures; `Ok` its values (NULLs counted).
fn decrypt_row(
    row: &SourceRow,
    row_id: &str,
    plan: &Plan,
    cols: &Columns,
    fernet: &MultiFernet,
    nulls: &mut u64,
) -> Result<(String, Vec<Ready>), Vec<RowFailure>> {
    let mut failures = Vec::new();
    let fail = |column: &str, reason: &'static str| RowFailure {
        row_id: row_id.to_owned(),
        column: column.to_owned(),
        reason,
    };
    let owner = match row.owner.to_text() {
        None if row.owner == Cell::Null => {
            failures.push(fail(&cols.owner, "owner is NULL"));
            String::new()
        }
        None => {
            failures.push(fail(&cols.owner, "owner is not UTF-8 text"));
            String::new()
        }
        Some(o) if !is_valid_owner(&o) => {
            failures.push(fail(
                &cols.owner,
                "owner must be 1 to 255 bytes of UTF-8 without control characters",
            ));
            String::new()
        }
        Some(o) => o,
    };
    let names: Vec<Option<String>> = match &plan.mapping {
        Mapping::Columns(pairs) => pairs.iter().map(|(_, n)| Some(n.clone())).collect(),
        Mapping::NameValue { name_column, .. } => {
            let cell = row.name.as_ref().unwrap_or(&Cell::Null);
            match cell.to_text() {
                Some(n) if is_valid_name(&n) => vec![Some(n)],
                Some(_) => {
                    failures.push(fail(
                        name_column,
                        "credential name must match [a-z0-9][a-z0-9._-]{0,127}",
                    ));
                    vec![None]
                }
                None => {
                    failures.push(fail(name_column, "credential name is NULL or not text"));
                    vec![None]
                }
            }
        }
    };
    let now = unix_now();
    let mut ready = Vec::new();
    let mut row_nulls = 0;
    for ((column, cell), name) in cols.values.iter().zip(&row.values).zip(names) {
        let token = match token_text(cell) {
            Ok(None) => {
                row_nulls += 1;
                continue;
            }
            Ok(Some(t)) => t,
            Err(reason) => {
                failures.push(fail(column, reason));
                continue;
            }
        };
        match fernet.decrypt_with_index(token, None, now) {
            Ok((plaintext, _)) if plaintext.len() > MAX_VALUE_LEN => {
                failures.push(fail(column, "value larger than 64 KiB"));
            }
            // Values are text (the API's JSON strings); Django could not read these either.
            Ok((plaintext, _)) if std::str::from_utf8(plaintext.expose_secret()).is_err() => {
                failures.push(fail(column, "value is not UTF-8 text"));
            }
            // An empty secret is no credential: skipped, as a NULL is.
            Ok((plaintext, _)) if plaintext.expose_secret().is_empty() => row_nulls += 1,
            Ok((plaintext, _)) => ready.push(Ready {
                column: column.clone(),
                name: name.unwrap_or_default(),
                plaintext,
                token: token_fingerprint(token),
            }),
            Err(strongroom_crypto::fernet::FernetError::InvalidToken) => {
                failures.push(fail(column, "no key opens the token"));
            }
            Err(_) => failures.push(fail(column, "not a valid Fernet token")),
        }
    }
    if failures.is_empty() {
        *nulls += row_nulls;
        Ok((owner, ready))
    } else {
        Err(failures)
    }
}

/// Whether it was written, already there, or left alone.
enum Put {
    Imported,
    AlreadyThere,
    /// The credential's current version was set in Strongroom, or it is disabled.
    KeptInStrongroom,
    /// The credential was deleted in Strongroom since: not re-created.
    DeletedInStrongroom,
    /// Creating the credential would take its owner past the quota: not written.
    OverQuota,
}

/// Why a value was left out when its owner is at the quota.
pub const OVER_QUOTA_REASON: &str =
    "not created: the owner already has store.max_credentials_per_owner credentials";

async fn put_once(
    target: &Target<'_>,
    owner: &str,
    name: &str,
    plaintext: &SecretBytes,
    record: &Value,
) -> Result<Put, ImportError> {
    let vault = target.vault;
    for _ in 0..PUT_ATTEMPTS {
        let current = match vault.describe(owner, name).await {
            Ok(cred) => {
                // A version whose metadata does not read may be this very import's: neither
                // "already there" nor "set here" can be told. Stopped, as before such a
                // version was listed at all.
                if let Some(v) = cred.versions.iter().find(|v| v.metadata_unreadable) {
                    return Err(CoreError::Integrity {
                        version: Some(v.version),
                    }
                    .into());
                }
                // The same source, or the same token reached by another row id (a run with
                // another --id-column): already there either way.
                let token = &record["token_sha256"];
                if cred.versions.iter().any(|v| {
                    v.metadata
                        .get("imported_from")
                        .is_some_and(|from| from == record || from["token_sha256"] == *token)
                }) {
                    return Ok(Put::AlreadyThere);
                }
                // Once the app writes through Strongroom (or the owner set a value, or
                // disabled the credential), the Django copy is the stale one.
                let current = cred
                    .versions
                    .iter()
                    .find(|v| Some(v.version) == cred.summary.current_version);
                let set_here = current.is_some_and(|v| v.metadata.get("imported_from").is_none());
                if !cred.summary.enabled || set_here {
                    return Ok(Put::KeptInStrongroom);
                }
                cred.summary.current_version.unwrap_or(0)
            }
            // Never there, or deleted in Strongroom since: numbering outlives a deletion,
            // and a credential its owner deleted is not brought back from the Django copy.
            Err(CoreError::NotFound) => {
                let latest = vault.store().latest_version(owner, name).await;
                if latest.map_err(CoreError::from)? > 0 {
                    return Ok(Put::DeletedInStrongroom);
                }
                0
            }
            Err(e) => return Err(e.into()),
        };
        // Check-and-set against the version seen above: if anyone (another import, a user)
        // wrote in between, look again rather than risk a duplicate.
        let req = PutRequest {
            owner,
            name,
            value: SecretBytes::from_slice(plaintext.expose_secret()),
            metadata: Some(json!({ "imported_from": record })),
            expected_version: Some(current),
            created_by: CREATED_BY,
        };
        let event = Event {
            time: vault.now(),
            principal_kind: "operator".into(),
            principal_id: target.operator.clone(),
            action: "put".into(),
            owner: Some(owner.to_owned()),
            name: Some(name.to_owned()),
            version: None, // set by the put
            outcome: "ok".into(),
            status: 0,
            request_id: Some(CREATED_BY.into()),
            client_addr: None,
            on_behalf_of: None,
            destination: None,
            error_code: None,
        };
        match vault
            .put_audited(req, target.audit_key.clone(), event)
            .await
        {
            Ok(_) => return Ok(Put::Imported),
            Err(CoreError::VersionConflict { .. }) | Err(CoreError::Contended) => continue,
            // The owner's business, not the import's: the other values go on.
            Err(CoreError::QuotaExceeded { .. }) => return Ok(Put::OverQuota),
            Err(e) => return Err(e.into()),
        }
    }
    Err(CoreError::Contended.into())
}

/// Runs the import: reads `source` in batches, decrypts with `fernet`, and (unless `target`
/// is `None`, a dry run) writes each value. `progress` is called after every batch.
///
/// # Errors
///
/// [`ImportError`] when the source cannot be read or the vault refuses a write; the
/// import can be rerun and continues where it stopped. Row failures are in the [`Report`].
pub async fn run(
    source: &mut Source,
    plan: &Plan,
    fernet: &MultiFernet,
    target: Option<&Target<'_>>,
    progress: &mut dyn FnMut(Progress) -> std::ops::ControlFlow<()>,
) -> Result<Report, ImportError> {
    let cols = plan.columns()?;
    let rows_total = source.count(&cols).await?;
    let mut report = Report {
        dry_run: target.is_none(),
        ..Report::default()
    };
    loop {
        let batch = source.next_batch(&cols, plan.batch).await?;
        if batch.is_empty() {
            break;
        }
        for row in &batch {
            report.rows_read += 1;
            let row_id = row.id.to_text().unwrap_or_else(|| "?".into());
            let (owner, values) =
                match decrypt_row(row, &row_id, plan, &cols, fernet, &mut report.nulls_skipped) {
                    Ok(v) => v,
                    Err(failures) => {
                        report.rows_failed += 1;
                        report.failures.extend(failures);
                        continue;
                    }
                };
            report.values_decrypted += values.len() as u64;
            let Some(target) = target else { continue };
            for v in values {
                let record = source_record(&plan.table, &row_id, &v.column, &v.token);
                match put_once(target, &owner, &v.name, &v.plaintext, &record).await? {
                    Put::Imported => report.values_imported += 1,
                    Put::AlreadyThere => report.already_imported += 1,
                    Put::KeptInStrongroom => report.kept_in_strongroom += 1,
                    Put::DeletedInStrongroom => report.deleted_in_strongroom += 1,
                    Put::OverQuota => {
                        report.over_quota += 1;
                        report.failures.push(RowFailure {
                            row_id: row_id.clone(),
                            column: v.column.clone(),
                            reason: OVER_QUOTA_REASON,
                        });
                    }
                }
            }
        }
        // Asked to stop (an interrupt): after a whole batch, so the report counts every
        // write, and a re-run picks up where this one ended (what is there is skipped).
        if progress(Progress {
            rows_done: report.rows_read,
            rows_total: rows_total.max(report.rows_read),
            imported: report.values_imported,
            failed: report.rows_failed,
        })
        .is_break()
        {
            report.interrupted = true;
            break;
        }
    }
    Ok(report)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn source_records_keep_integer_ids_as_numbers() {
        assert_eq!(
            source_record("t", "17", "c", "ab"),
            json!({"table": "t", "row_id": 17, "column": "c", "token_sha256": "ab"})
        );
        assert_eq!(source_record("t", "007", "c", "")["row_id"], json!("007"));
        assert_eq!(
            source_record("t", "a-uuid", "c", "")["row_id"],
            json!("a-uuid")
        );
    }

    /// One table however it is spelled: the record is what re-runs compare.
    #[test]
    fn source_records_fold_the_table_name() {
        for spelled in [
            "accounts_profile",
            "ACCOUNTS_PROFILE",
            "main.accounts_profile",
        ] {
            assert_eq!(
                source_record(spelled, "1", "c", "")["table"],
                "accounts_profile",
                "{spelled}"
            );
        }
        assert_eq!(
            source_record("public.Accounts_Profile", "1", "c", "")["table"],
            "accounts_profile"
        );
        assert_eq!(source_record("app.t", "1", "c", "")["table"], "app.t");
    }

    #[test]
    fn token_fingerprints_differ_per_token() {
        let a = token_fingerprint("gAAAAAB-one");
        assert_eq!(a.len(), 32);
        assert_eq!(a, token_fingerprint("gAAAAAB-one"));
        assert_ne!(a, token_fingerprint("gAAAAAB-two"));
    }

    #[test]
    fn the_id_and_owner_columns_are_never_token_columns() {
        for (id, owner) in [("secret", "o"), ("id", "SECRET")] {
            let plan = Plan {
                table: "t".into(),
                id_column: id.into(),
                owner_column: owner.into(),
                mapping: Mapping::Columns(vec![("secret".into(), "n".into())]),
                batch: 10,
            };
            assert!(
                matches!(plan.columns(), Err(ImportError::Usage(_))),
                "{id} {owner}"
            );
        }
    }

    #[test]
    fn a_name_takes_one_column_and_a_column_maps_once() {
        let plan = |pairs: &[(&str, &str)]| Plan {
            table: "t".into(),
            id_column: "id".into(),
            owner_column: "o".into(),
            mapping: Mapping::Columns(
                pairs
                    .iter()
                    .map(|(c, n)| ((*c).to_owned(), (*n).to_owned()))
                    .collect(),
            ),
            batch: 10,
        };
        for pairs in [
            &[("zoom_key", "zoom.key"), ("old_zoom_key", "zoom.key")][..],
            &[("zoom_key", "zoom.key"), ("ZOOM_KEY", "zoom.other")][..],
        ] {
            match plan(pairs).columns() {
                Err(ImportError::Usage(m)) => assert!(m.contains("--map"), "{m}"),
                other => panic!("{pairs:?}: {:?}", other.map(|_| ())),
            }
        }
        assert!(plan(&[("zoom_key", "zoom.key"), ("slack", "slack.token")])
            .columns()
            .is_ok());
    }

    #[test]
    fn mapping_names_are_checked() {
        let plan = Plan {
            table: "t".into(),
            id_column: "id".into(),
            owner_column: "o".into(),
            mapping: Mapping::Columns(vec![("c".into(), "Bad Name".into())]),
            batch: 10,
        };
        assert!(matches!(plan.columns(), Err(ImportError::Usage(_))));
    }
}
