//! PostgreSQL migrations, embedded. Index `i` holds the migration to schema version `i + 1`.
//!
//! Text columns that are compared or ordered use `COLLATE "C"`, so names sort by bytes,
//! as in SQLite, whatever the database's locale. The table name prefix `audit` is reserved
//! for the audit log.

pub(super) const MIGRATIONS: &[&str] = &[
    // 1: initial schema
    r#"
CREATE TABLE credentials (
    id              BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    owner           TEXT COLLATE "C" NOT NULL CHECK (octet_length(owner) BETWEEN 1 AND 255),
    name            TEXT COLLATE "C" NOT NULL CHECK (octet_length(name) BETWEEN 1 AND 128),
    enabled         BOOLEAN NOT NULL DEFAULT TRUE,
    deleted         BOOLEAN NOT NULL DEFAULT FALSE,
    current_version INTEGER,
    latest_version  INTEGER NOT NULL,
    created_at      BIGINT NOT NULL,
    updated_at      BIGINT NOT NULL,
    last_used_at    BIGINT,
    UNIQUE (owner, name)
);
CREATE TABLE versions (
    id            BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    credential_id BIGINT NOT NULL REFERENCES credentials (id),
    version       INTEGER NOT NULL CHECK (version > 0),
    state         SMALLINT NOT NULL,
    kek_provider  TEXT COLLATE "C" NOT NULL,
    kek_key_id    TEXT COLLATE "C" NOT NULL,
    kek_version   BIGINT NOT NULL,
    metadata      JSONB NOT NULL,
    created_by    TEXT NOT NULL,
    created_at    BIGINT NOT NULL,
    destroyed_at  BIGINT,
    wrapped_key   BYTEA NOT NULL,
    sealed_value  BYTEA NOT NULL,
    UNIQUE (credential_id, version)
);
-- Retention and "newest active version" read only active versions, never the tombstones
-- that pile up over a credential's life.
CREATE INDEX versions_active_by_credential ON versions (credential_id, version)
    WHERE state = 0;
CREATE INDEX versions_active_by_kek ON versions (kek_provider, kek_key_id, kek_version, id)
    WHERE state = 0;
CREATE TABLE provider_state (
    key   TEXT COLLATE "C" PRIMARY KEY,
    value BYTEA NOT NULL
);
"#,
    // 2: the audit log (see `crate::audit`); appends lock the one `audit_head` row
    r#"
CREATE TABLE audit_records (
    seq            BIGINT PRIMARY KEY CHECK (seq > 0),
    time_ms        BIGINT NOT NULL,
    principal_kind TEXT NOT NULL,
    principal_id   TEXT COLLATE "C" NOT NULL,
    action         TEXT NOT NULL,
    owner          TEXT COLLATE "C",
    name           TEXT COLLATE "C",
    version        BIGINT,
    outcome        TEXT NOT NULL,
    status         INTEGER NOT NULL,
    request_id     TEXT,
    client_addr    TEXT,
    on_behalf_of   TEXT,
    destination    TEXT,
    error_code     TEXT,
    prev_hash      BYTEA NOT NULL,
    hash           BYTEA NOT NULL
);
CREATE INDEX audit_records_by_credential ON audit_records (owner, name, seq);
CREATE INDEX audit_records_by_principal ON audit_records (principal_id, seq);
CREATE INDEX audit_records_by_time ON audit_records (time_ms);
CREATE TABLE audit_head (
    id    INTEGER PRIMARY KEY CHECK (id = 1),
    count BIGINT NOT NULL,
    hash  BYTEA NOT NULL,
    mac   BYTEA NOT NULL
);
INSERT INTO audit_head (id, count, hash, mac) VALUES (1, 0, decode(repeat('00', 32), 'hex'), ''::bytea);
"#,
    // 3: nothing here. (The schema version is shared by both backends; version 3 moved
    // SQLite's per-credential audit index behind the appends.)
    "SELECT 1;",
    // 4: nothing here either (SQLite's by-principal and by-time audit indexes, likewise).
    "SELECT 1;",
    // 5: records by credential name across owners (`GET /v1/audit?name=`): the
    // per-credential index starts with the owner, so a name alone scanned all of it.
    "CREATE INDEX audit_records_by_name ON audit_records (name, seq);",
    // 6: records by owner alone (`GET /v1/audit?owner=`) newest first off an index, without
    // sorting all of the owner's records per page. And time bounds become seq bounds
    // (`crate::audit::TimeIndex`): through `audit_records_by_time`, a page of a day's records
    // sorted the whole day. The head row carries the running state; appends (under its row
    // lock) keep it and the marks. `second` is the time's second rounded down.
    r#"
CREATE INDEX audit_records_by_owner ON audit_records (owner, seq);
DROP INDEX audit_records_by_time;
CREATE TABLE audit_time_marks (
    second BIGINT PRIMARY KEY,
    seq    BIGINT NOT NULL
);
ALTER TABLE audit_head
    ADD COLUMN max_time_ms BIGINT,
    ADD COLUMN max_lag_ms BIGINT NOT NULL DEFAULT 0;
WITH times AS (
    SELECT seq, time_ms,
           max(time_ms) OVER (ORDER BY seq ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING)
               AS prev_max
    FROM audit_records
)
INSERT INTO audit_time_marks (second, seq)
    SELECT floor(time_ms / 1000.0)::bigint, seq FROM times
    WHERE prev_max IS NULL
       OR (time_ms > prev_max AND floor(time_ms / 1000.0) > floor(prev_max / 1000.0));
WITH times AS (
    SELECT time_ms,
           max(time_ms) OVER (ORDER BY seq ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING)
               AS prev_max
    FROM audit_records
)
UPDATE audit_head SET
    max_time_ms = (SELECT max(time_ms) FROM times),
    max_lag_ms = coalesce((SELECT max(prev_max - time_ms) FROM times WHERE prev_max > time_ms), 0)
    WHERE id = 1;
"#,
    // 7: audit retention (see `crate::audit`): the anchor the log starts after once its older
    // records were archived and removed (no row: none ever was).
    r#"
CREATE TABLE audit_anchor (
    id   INTEGER PRIMARY KEY CHECK (id = 1),
    seq  BIGINT NOT NULL CHECK (seq > 0),
    hash BYTEA NOT NULL,
    puts BIGINT NOT NULL CHECK (puts >= 0),
    mac  BYTEA NOT NULL
);
"#,
    // 8: request allowances (`crate::allowance`), as in SQLite's schema 8.
    r#"
CREATE TABLE rate_allowances (
    scope  TEXT NOT NULL,
    key    TEXT NOT NULL,
    tat_us BIGINT NOT NULL,
    PRIMARY KEY (scope, key)
);
CREATE INDEX rate_allowances_by_tat ON rate_allowances (tat_us);
"#,
    // 9: late records instead of the largest lag, as in SQLite's schema 9 (marks of removed
    // records go first: a prune cut short between its batches leaves some).
    r#"
DELETE FROM audit_time_marks WHERE seq < coalesce(
    (SELECT min(seq) FROM audit_records),
    (SELECT count FROM audit_head WHERE id = 1) + 1);
CREATE TABLE audit_time_late (
    second BIGINT PRIMARY KEY,
    seq    BIGINT NOT NULL
);
WITH times AS (
    SELECT seq, time_ms,
           max(time_ms) OVER (ORDER BY seq ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING)
               AS prev_max
    FROM audit_records
), late AS (
    SELECT floor(time_ms / 1000.0)::bigint AS second, seq FROM times
    WHERE prev_max IS NOT NULL AND floor(time_ms / 1000.0) < floor(prev_max / 1000.0)
), frontier AS (
    SELECT second, seq,
           min(second) OVER (ORDER BY seq ROWS BETWEEN 1 FOLLOWING AND UNBOUNDED FOLLOWING)
               AS later_min
    FROM late
)
INSERT INTO audit_time_late (second, seq)
    SELECT second, seq FROM frontier WHERE later_min IS NULL OR later_min > second;
ALTER TABLE audit_head DROP COLUMN max_lag_ms;
"#,
];
