//! SQLite migrations, embedded. Index `i` holds the migration to schema version `i + 1`.
//!
//! Column order matters in SQLite: a row's columns are stored in order and a large blob
//! spills into overflow pages, so the blobs (`wrapped_key`, `sealed_value`) come last and
//! reading a version's metadata never walks a 64 KiB value.
//!
//! The table name prefix `audit` is reserved for the audit log.

pub(super) const MIGRATIONS: &[&str] = &[
    // 1: initial schema
    r#"
CREATE TABLE credentials (
    id              INTEGER PRIMARY KEY,
    owner           TEXT NOT NULL CHECK (length(CAST(owner AS BLOB)) BETWEEN 1 AND 255),
    name            TEXT NOT NULL CHECK (length(CAST(name AS BLOB)) BETWEEN 1 AND 128),
    enabled         INTEGER NOT NULL DEFAULT 1,
    deleted         INTEGER NOT NULL DEFAULT 0,
    current_version INTEGER,
    latest_version  INTEGER NOT NULL,
    created_at      INTEGER NOT NULL,
    updated_at      INTEGER NOT NULL,
    last_used_at    INTEGER,
    UNIQUE (owner, name)
);
CREATE TABLE versions (
    id            INTEGER PRIMARY KEY,
    credential_id INTEGER NOT NULL REFERENCES credentials (id),
    version       INTEGER NOT NULL CHECK (version > 0),
    state         INTEGER NOT NULL,
    kek_provider  TEXT NOT NULL,
    kek_key_id    TEXT NOT NULL,
    kek_version   INTEGER NOT NULL,
    metadata      TEXT NOT NULL,
    created_by    TEXT NOT NULL,
    created_at    INTEGER NOT NULL,
    destroyed_at  INTEGER,
    wrapped_key   BLOB NOT NULL,
    sealed_value  BLOB NOT NULL,
    UNIQUE (credential_id, version)
);
-- Retention and "newest active version" read only active versions, never the tombstones
-- that pile up over a credential's life.
CREATE INDEX versions_active_by_credential ON versions (credential_id, version)
    WHERE state = 0;
CREATE INDEX versions_active_by_kek ON versions (kek_provider, kek_key_id, kek_version, id)
    WHERE state = 0;
CREATE TABLE provider_state (
    key   TEXT PRIMARY KEY,
    value BLOB NOT NULL
);
"#,
    // 2: the audit log (see `crate::audit`)
    r#"
CREATE TABLE audit_records (
    seq            INTEGER PRIMARY KEY CHECK (seq > 0),
    time_ms        INTEGER NOT NULL,
    principal_kind TEXT NOT NULL,
    principal_id   TEXT NOT NULL,
    action         TEXT NOT NULL,
    owner          TEXT,
    name           TEXT,
    version        INTEGER,
    outcome        TEXT NOT NULL,
    status         INTEGER NOT NULL,
    request_id     TEXT,
    client_addr    TEXT,
    on_behalf_of   TEXT,
    destination    TEXT,
    error_code     TEXT,
    prev_hash      BLOB NOT NULL,
    hash           BLOB NOT NULL
);
CREATE INDEX audit_records_by_credential ON audit_records (owner, name, seq);
CREATE INDEX audit_records_by_principal ON audit_records (principal_id, seq);
CREATE INDEX audit_records_by_time ON audit_records (time_ms);
CREATE TABLE audit_head (
    id    INTEGER PRIMARY KEY CHECK (id = 1),
    count INTEGER NOT NULL,
    hash  BLOB NOT NULL,
    mac   BLOB NOT NULL
);
INSERT INTO audit_head (id, count, hash, mac) VALUES (1, 0, zeroblob(32), X'');
"#,
    // 3: the per-credential audit index, filled behind the appends (see the module docs of
    // `super`): an index on `audit_records` put one random leaf page into every append's
    // commit. A record without an owner is never found by owner; a record without a name
    // is indexed under '' (no credential is named '').
    r#"
DROP INDEX audit_records_by_credential;
CREATE TABLE audit_by_credential (
    owner TEXT NOT NULL,
    name  TEXT NOT NULL,
    seq   INTEGER NOT NULL,
    PRIMARY KEY (owner, name, seq)
) WITHOUT ROWID;
CREATE TABLE audit_index_state (
    id           INTEGER PRIMARY KEY CHECK (id = 1),
    indexed_upto INTEGER NOT NULL
);
INSERT INTO audit_by_credential (owner, name, seq)
    SELECT owner, coalesce(name, ''), seq FROM audit_records WHERE owner IS NOT NULL;
INSERT INTO audit_index_state (id, indexed_upto)
    VALUES (1, (SELECT coalesce(max(seq), 0) FROM audit_records));
"#,
    // 4: the by-principal and by-time audit indexes move behind the appends too (a put's
    // principal is its user, so by-principal was one more random page per put). Filled up to
    // `indexed_upto` here; later records by the background run, as for `audit_by_credential`.
    r#"
DROP INDEX audit_records_by_principal;
DROP INDEX audit_records_by_time;
CREATE TABLE audit_by_principal (
    principal_id TEXT NOT NULL,
    seq          INTEGER NOT NULL,
    PRIMARY KEY (principal_id, seq)
) WITHOUT ROWID;
CREATE TABLE audit_by_time (
    time_ms INTEGER NOT NULL,
    seq     INTEGER NOT NULL,
    PRIMARY KEY (time_ms, seq)
) WITHOUT ROWID;
INSERT INTO audit_by_principal (principal_id, seq)
    SELECT principal_id, seq FROM audit_records
    WHERE seq <= (SELECT indexed_upto FROM audit_index_state WHERE id = 1);
INSERT INTO audit_by_time (time_ms, seq)
    SELECT time_ms, seq FROM audit_records
    WHERE seq <= (SELECT indexed_upto FROM audit_index_state WHERE id = 1);
"#,
    // 5: records by credential name across owners (`GET /v1/audit?name=`), deferred like
    // the others: `audit_by_credential` starts with the owner, so a name alone scanned it
    // whole. Records without a name are not in it.
    r#"
CREATE TABLE audit_by_name (
    name TEXT NOT NULL,
    seq  INTEGER NOT NULL,
    PRIMARY KEY (name, seq)
) WITHOUT ROWID;
INSERT INTO audit_by_name (name, seq)
    SELECT name, seq FROM audit_records
    WHERE name IS NOT NULL
      AND seq <= (SELECT indexed_upto FROM audit_index_state WHERE id = 1);
"#,
    // 6: records by owner alone (`GET /v1/audit?owner=`), deferred like the others: read
    // through `audit_by_credential` they came out in name order and were sorted, all of
    // them, for every page. And time bounds become seq bounds (`crate::audit::TimeIndex`):
    // `audit_by_time` gave the matches in time order, so a page of a day's records sorted
    // the whole day. Its place is taken by one mark per second and the running state, filled
    // here up to `indexed_upto` (`second` is the time's second rounded down, before 1970 too).
    r#"
CREATE TABLE audit_by_owner (
    owner TEXT NOT NULL,
    seq   INTEGER NOT NULL,
    PRIMARY KEY (owner, seq)
) WITHOUT ROWID;
INSERT INTO audit_by_owner (owner, seq)
    SELECT owner, seq FROM audit_records
    WHERE owner IS NOT NULL
      AND seq <= (SELECT indexed_upto FROM audit_index_state WHERE id = 1);
CREATE TABLE audit_time_marks (
    second INTEGER PRIMARY KEY,
    seq    INTEGER NOT NULL
);
ALTER TABLE audit_index_state ADD COLUMN max_time_ms INTEGER;
ALTER TABLE audit_index_state ADD COLUMN max_lag_ms INTEGER NOT NULL DEFAULT 0;
WITH times AS (
    SELECT seq, time_ms,
           max(time_ms) OVER (ORDER BY seq ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING)
               AS prev_max
    FROM audit_records
    WHERE seq <= (SELECT indexed_upto FROM audit_index_state WHERE id = 1)
), seconds AS (
    SELECT seq, time_ms, prev_max,
           CASE WHEN time_ms >= 0 THEN time_ms / 1000 ELSE -((999 - time_ms) / 1000) END
               AS second,
           CASE WHEN prev_max >= 0 THEN prev_max / 1000 ELSE -((999 - prev_max) / 1000) END
               AS prev_second
    FROM times
)
INSERT INTO audit_time_marks (second, seq)
    SELECT second, seq FROM seconds
    WHERE prev_max IS NULL OR (time_ms > prev_max AND second > prev_second)
    ORDER BY seq;
WITH times AS (
    SELECT time_ms,
           max(time_ms) OVER (ORDER BY seq ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING)
               AS prev_max
    FROM audit_records
    WHERE seq <= (SELECT indexed_upto FROM audit_index_state WHERE id = 1)
)
UPDATE audit_index_state SET
    max_time_ms = (SELECT max(time_ms) FROM times),
    max_lag_ms = coalesce((SELECT max(prev_max - time_ms) FROM times WHERE prev_max > time_ms), 0)
    WHERE id = 1;
DROP TABLE audit_by_time;
"#,
    // 7: audit retention (see `crate::audit`): the anchor the log starts after once its older
    // records were archived and removed (no row: none ever was). `swept_upto`: the deferred
    // index entries are removed up to there (they are outside the chain; see
    // `SqliteStore::audit_prune`).
    r#"
CREATE TABLE audit_anchor (
    id         INTEGER PRIMARY KEY CHECK (id = 1),
    seq        INTEGER NOT NULL CHECK (seq > 0),
    hash       BLOB NOT NULL,
    puts       INTEGER NOT NULL CHECK (puts >= 0),
    mac        BLOB NOT NULL,
    swept_upto INTEGER NOT NULL DEFAULT 0
);
"#,
    // 8: request allowances (`crate::allowance`): a key's state is its theoretical arrival
    // time in Unix microseconds; rows at or before now are full allowances, and takes delete
    // those full for a minute, oldest first, off the index.
    r#"
CREATE TABLE rate_allowances (
    scope  TEXT NOT NULL,
    key    TEXT NOT NULL,
    tat_us INTEGER NOT NULL,
    PRIMARY KEY (scope, key)
);
CREATE INDEX rate_allowances_by_tat ON rate_allowances (tat_us);
"#,
    // 9: late records instead of the largest lag (`crate::audit::TimeIndex`): one request
    // that finished late, or one clock step back, widened every later query by time as far
    // as it lagged. Filled here from the records indexed so far, as the frontier: a late
    // record is kept unless a later one lies at its second or before.
    // First, the marks of records already removed go (an index run that read them before
    // a prune may have planted them again): the frontier is computed from the stored
    // records, and a mark of a removed one, later than all of them, could end a query before
    // a stored record it does not count as late. Removing marks only widens queries.
    r#"
DELETE FROM audit_time_marks WHERE seq < coalesce(
    (SELECT min(seq) FROM audit_records),
    (SELECT indexed_upto FROM audit_index_state WHERE id = 1) + 1);
CREATE TABLE audit_time_late (
    second INTEGER PRIMARY KEY,
    seq    INTEGER NOT NULL
);
WITH times AS (
    SELECT seq, time_ms,
           max(time_ms) OVER (ORDER BY seq ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING)
               AS prev_max
    FROM audit_records
    WHERE seq <= (SELECT indexed_upto FROM audit_index_state WHERE id = 1)
), seconds AS (
    SELECT seq,
           CASE WHEN time_ms >= 0 THEN time_ms / 1000 ELSE -((999 - time_ms) / 1000) END
               AS second,
           CASE WHEN prev_max >= 0 THEN prev_max / 1000 ELSE -((999 - prev_max) / 1000) END
               AS prev_second
    FROM times
    WHERE prev_max IS NOT NULL
), late AS (
    SELECT second, seq,
           min(second) OVER (ORDER BY seq ROWS BETWEEN 1 FOLLOWING AND UNBOUNDED FOLLOWING)
               AS later_min
    FROM seconds
    WHERE second < prev_second
)
INSERT INTO audit_time_late (second, seq)
    SELECT second, seq FROM late WHERE later_min IS NULL OR later_min > second;
ALTER TABLE audit_index_state DROP COLUMN max_lag_ms;
"#,
];
