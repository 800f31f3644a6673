//! Reading the source (Django) table: SQLite or PostgreSQL, in batches ordered by row id.

use std::path::PathBuf;

use crate::ImportError;

/// One cell as the source database returned it. Token cells hold ciphertext only; the
/// plaintext never lives in a `Cell`.
#[derive(Clone, PartialEq)]
pub enum Cell {
    /// SQL NULL.
    Null,
    /// An integer (SQLite `INTEGER`).
    Int(i64),
    /// A floating-point number (SQLite `REAL`).
    Real(f64),
    /// Text.
    Text(String),
    /// Bytes (`BLOB` / `bytea`).
    Bytes(Vec<u8>),
}

impl std::fmt::Debug for Cell {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Lengths only: cells may hold tokens or owner ids.
        match self {
            Cell::Null => f.write_str("Null"),
            Cell::Int(_) => f.write_str("Int(..)"),
            Cell::Real(_) => f.write_str("Real(..)"),
            Cell::Text(s) => write!(f, "Text({} bytes)", s.len()),
            Cell::Bytes(b) => write!(f, "Bytes({} bytes)", b.len()),
        }
    }
}

impl Cell {
    /// The cell as text, as an owner id, credential name or row id: integers in decimal,
    /// bytes if they are UTF-8. `None` for NULL or bytes that are not UTF-8.
    pub fn to_text(&self) -> Option<String> {
        match self {
            Cell::Null => None,
            Cell::Int(i) => Some(i.to_string()),
            Cell::Real(r) => Some(r.to_string()),
            Cell::Text(s) => Some(s.clone()),
            Cell::Bytes(b) => String::from_utf8(b.clone()).ok(),
        }
    }
}

/// One source row: its id, owner, optional name cell and the value cells (in the order the
/// plan lists the value columns).
#[derive(Debug, Clone)]
pub struct SourceRow {
    /// The row id column.
    pub id: Cell,
    /// The owner column.
    pub owner: Cell,
    /// The name column (`--name-column` mode only).
    pub name: Option<Cell>,
    /// The value columns.
    pub values: Vec<Cell>,
}

/// Where the Django database is.
#[derive(Clone, PartialEq, Eq)]
pub enum DatabaseUrl {
    /// A SQLite file, `sqlite:PATH` (also `sqlite://PATH`).
    Sqlite(PathBuf),
    /// A PostgreSQL connection string (`postgres://` or `postgresql://`, or key=value form).
    Postgres(String),
}

impl std::fmt::Debug for DatabaseUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DatabaseUrl::Sqlite(p) => f.debug_tuple("Sqlite").field(p).finish(),
            // A connection string can hold the password.
            DatabaseUrl::Postgres(_) => f.write_str("Postgres([REDACTED])"),
        }
    }
}

impl std::str::FromStr for DatabaseUrl {
    type Err = ImportError;

    fn from_str(s: &str) -> Result<Self, ImportError> {
        if let Some(rest) = s.strip_prefix("sqlite:") {
            let path = rest.strip_prefix("//").unwrap_or(rest);
            if path.is_empty() {
                return Err(ImportError::Usage("--database sqlite: needs a path".into()));
            }
            return Ok(DatabaseUrl::Sqlite(PathBuf::from(path)));
        }
        if s.starts_with("postgres://") || s.starts_with("postgresql://") {
            return Ok(DatabaseUrl::Postgres(s.to_owned()));
        }
        Err(ImportError::Usage(
            "--database must be sqlite:PATH or postgresql://…".into(),
        ))
    }
}

/// Which columns to read.
#[derive(Debug, Clone)]
pub struct Columns {
    /// The table (`schema.table` allowed).
    pub table: String,
    /// The row id column (unique, ordered).
    pub id: String,
    /// The owner column.
    pub owner: String,
    /// The credential-name column, if names come from the rows.
    pub name: Option<String>,
    /// The token columns.
    pub values: Vec<String>,
}

/// Quotes an SQL identifier; `a.b` becomes `"a"."b"`.
fn quote_path(ident: &str) -> String {
    ident.split('.').map(quote).collect::<Vec<_>>().join(".")
}

fn quote(ident: &str) -> String {
    format!("\"{}\"", ident.replace('"', "\"\""))
}

/// An open source database.
pub enum Source {
    /// SQLite, read-only; the connection moves into blocking tasks and back.
    Sqlite {
        /// The connection (taken while a read runs).
        conn: Option<rusqlite::Connection>,
        /// The last row id read (keyset pagination).
        last_id: Option<rusqlite::types::Value>,
    },
    /// PostgreSQL, reading through a server-side cursor in a read-only transaction.
    Postgres {
        /// The client.
        client: tokio_postgres::Client,
        /// The connection task.
        task: tokio::task::JoinHandle<()>,
        /// Whether the cursor is declared.
        open: bool,
    },
}

impl std::fmt::Debug for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Source::Sqlite { .. } => f.write_str("Source::Sqlite"),
            Source::Postgres { .. } => f.write_str("Source::Postgres"),
        }
    }
}

const CURSOR: &str = "strongroom_import";

fn src_err(e: impl std::fmt::Display) -> ImportError {
    ImportError::Source(e.to_string())
}

/// The error with its causes ("error connecting to server: Connection refused"), as
/// tokio-postgres keeps the reason in the source chain.
fn src_chain(e: impl std::error::Error) -> ImportError {
    let mut text = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        let more = c.to_string();
        if !text.contains(&more) {
            text.push_str(": ");
            text.push_str(&more);
        }
        cause = c.source();
    }
    ImportError::Source(text)
}

impl Source {
    /// Opens the source database (SQLite read-only; it must exist).
    ///
    /// # Errors
    ///
    /// [`ImportError::Source`] when it cannot be opened.
    pub async fn open(url: &DatabaseUrl) -> Result<Source, ImportError> {
        match url {
            DatabaseUrl::Sqlite(path) => {
                let path = path.clone();
                let conn = tokio::task::spawn_blocking(move || {
                    let conn = rusqlite::Connection::open_with_flags(
                        &path,
                        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY
                            | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
                    )
                    .map_err(|e| ImportError::Source(format!("{}: {e}", path.display())))?;
                    conn.busy_timeout(std::time::Duration::from_secs(30))
                        .map_err(src_err)?;
                    // Off, SQLite's double-quoted-string fallback: with it, a mistyped
                    // `"column"` silently reads as the string 'column' (every row owned by
                    // "uid", every credential named after the typo) instead of failing.
                    conn.set_db_config(rusqlite::config::DbConfig::SQLITE_DBCONFIG_DQS_DML, false)
                        .map_err(src_err)?;
                    Ok::<_, ImportError>(conn)
                })
                .await
                .map_err(src_err)??;
                Ok(Source::Sqlite {
                    conn: Some(conn),
                    last_id: None,
                })
            }
            DatabaseUrl::Postgres(url) => {
                // The store's TLS rule: a server not on this host only over TLS verified
                // against the platform's roots.
                let (config, tls) = strongroom_store::postgres::client_config(
                    url,
                    &strongroom_store::postgres::PostgresTls::SystemRoots,
                )
                .map_err(|e| ImportError::Source(e.to_string()))?;
                let (client, connection) = config.connect(tls).await.map_err(src_chain)?;
                let task = tokio::spawn(async move {
                    let _ = connection.await;
                });
                Ok(Source::Postgres {
                    client,
                    task,
                    open: false,
                })
            }
        }
    }

    /// Number of rows in the table (for the progress bar).
    ///
    /// # Errors
    ///
    /// [`ImportError::Source`], e.g. for a missing table.
    pub async fn count(&mut self, cols: &Columns) -> Result<u64, ImportError> {
        self.check_names(cols).await?;
        // Rows are paged by id (`WHERE id > last`): rows sharing an id, or with none, would
        // be skipped at a page boundary, so such an id column is refused up front.
        let sql = format!(
            "SELECT count(*), count(*) - count(DISTINCT {}) FROM {}",
            quote(&cols.id),
            quote_path(&cols.table)
        );
        let (rows, shared) = match self {
            Source::Sqlite { conn, .. } => {
                let c = conn.take().ok_or_else(|| src_err("connection lost"))?;
                let (c, n) = tokio::task::spawn_blocking(move || {
                    let n =
                        c.query_row(&sql, [], |r| Ok((r.get::<_, i64>(0)?, r.get::<_, i64>(1)?)));
                    (c, n)
                })
                .await
                .map_err(src_err)?;
                *conn = Some(c);
                n.map_err(src_err)?
            }
            Source::Postgres { client, .. } => {
                let row = client.query_one(&sql, &[]).await.map_err(src_err)?;
                (
                    row.try_get::<_, i64>(0).map_err(src_err)?,
                    row.try_get::<_, i64>(1).map_err(src_err)?,
                )
            }
        };
        if shared > 0 {
            return Err(ImportError::Usage(format!(
                "--id-column {} is not unique in {} ({shared} rows share an id or have none): \
                 rows would be skipped; name a unique column such as the primary key",
                cols.id, cols.table
            )));
        }
        Ok(u64::try_from(rows).unwrap_or(0))
    }

    /// Refuses a table or column the source does not have, by its name and flag (the
    /// database's own message quotes the whole query): each is read alone, no rows.
    async fn check_names(&mut self, cols: &Columns) -> Result<(), ImportError> {
        let table = quote_path(&cols.table);
        if !self
            .reads(&format!("SELECT 1 FROM {table} LIMIT 0"))
            .await?
        {
            return Err(ImportError::Usage(format!(
                "--table {}: no such table in the source database",
                cols.table
            )));
        }
        let mut named = vec![("--id-column", &cols.id), ("--owner-column", &cols.owner)];
        if let Some(name) = &cols.name {
            named.push(("--name-column", name));
        }
        named.extend(cols.values.iter().map(|v| ("--map or --value-column", v)));
        for (flag, column) in named {
            if !self
                .reads(&format!("SELECT {} FROM {table} LIMIT 0", quote(column)))
                .await?
            {
                return Err(ImportError::Usage(format!(
                    "{flag} {column}: table {} has no such column",
                    cols.table
                )));
            }
        }
        Ok(())
    }

    /// Whether `sql` runs (its rows unread): `false` when it names a table or column the
    /// source does not have; any other failure (a lost connection) is an error.
    async fn reads(&mut self, sql: &str) -> Result<bool, ImportError> {
        match self {
            Source::Sqlite { conn, .. } => {
                let c = conn.take().ok_or_else(|| src_err("connection lost"))?;
                let sql = sql.to_owned();
                let (c, ran) = tokio::task::spawn_blocking(move || {
                    let ran = c.prepare(&sql).and_then(|mut s| s.query([]).map(|_| ()));
                    (c, ran)
                })
                .await
                .map_err(src_err)?;
                *conn = Some(c);
                match ran {
                    Ok(()) => Ok(true),
                    // SQLite says so in its message only.
                    Err(e) if e.to_string().contains("no such ") => Ok(false),
                    Err(e) => Err(src_err(e)),
                }
            }
            Source::Postgres { client, .. } => match client.query(sql, &[]).await {
                Ok(_) => Ok(true),
                Err(e)
                    if e.code().is_some_and(|c| {
                        *c == tokio_postgres::error::SqlState::UNDEFINED_TABLE
                            || *c == tokio_postgres::error::SqlState::UNDEFINED_COLUMN
                    }) =>
                {
                    Ok(false)
                }
                Err(e) => Err(src_err(e)),
            },
        }
    }

    /// The next at most `limit` rows in row-id order; empty at the end.
    ///
    /// # Errors
    ///
    /// [`ImportError::Source`].
    pub async fn next_batch(
        &mut self,
        cols: &Columns,
        limit: u32,
    ) -> Result<Vec<SourceRow>, ImportError> {
        match self {
            Source::Sqlite { conn, last_id } => {
                let c = conn.take().ok_or_else(|| src_err("connection lost"))?;
                let (cols, after) = (cols.clone(), last_id.clone());
                let (c, res) = tokio::task::spawn_blocking(move || {
                    let res = sqlite_batch(&c, &cols, after, limit);
                    (c, res)
                })
                .await
                .map_err(src_err)?;
                *conn = Some(c);
                let (rows, last) = res?;
                if last.is_some() {
                    *last_id = last;
                }
                Ok(rows)
            }
            Source::Postgres { client, open, .. } => {
                if !*open {
                    let sql = format!(
                        "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY; \
                         DECLARE {CURSOR} NO SCROLL CURSOR FOR {}",
                        select_sql(cols, "::text")
                    );
                    client.batch_execute(&sql).await.map_err(src_err)?;
                    *open = true;
                }
                let rows = client
                    .query(&format!("FETCH FORWARD {limit} FROM {CURSOR}"), &[])
                    .await
                    .map_err(src_err)?;
                rows.iter().map(|r| pg_row(r, cols)).collect()
            }
        }
    }

    /// Ends the read (commits the read-only transaction, closes the connection).
    pub async fn close(self) {
        if let Source::Postgres { client, task, open } = self {
            if open {
                let _ = client.batch_execute("COMMIT").await;
            }
            drop(client);
            let _ = task.await;
        }
    }
}

/// `SELECT id, owner, [name,] values... FROM table`; `cast` is appended to the id, owner and
/// name columns (PostgreSQL reads them as text whatever their type).
fn select_sql(cols: &Columns, cast: &str) -> String {
    let mut list = vec![
        format!("{}{cast}", quote(&cols.id)),
        format!("{}{cast}", quote(&cols.owner)),
    ];
    if let Some(name) = &cols.name {
        list.push(format!("{}{cast}", quote(name)));
    }
    list.extend(cols.values.iter().map(|c| quote(c)));
    format!(
        "SELECT {} FROM {} ORDER BY {}",
        list.join(", "),
        quote_path(&cols.table),
        quote(&cols.id)
    )
}

type SqliteBatch = (Vec<SourceRow>, Option<rusqlite::types::Value>);

fn sqlite_batch(
    conn: &rusqlite::Connection,
    cols: &Columns,
    after: Option<rusqlite::types::Value>,
    limit: u32,
) -> Result<SqliteBatch, ImportError> {
    use rusqlite::types::Value;
    let base = select_sql(cols, "");
    // Keyset pagination: no read transaction stays open between batches, so the Django app
    // (and a running Strongroom) keep writing while the import runs.
    let (head, order) = base
        .rsplit_once(" ORDER BY ")
        .ok_or_else(|| src_err("internal: bad query"))?;
    let sql = match after {
        None => format!("{head} ORDER BY {order} LIMIT ?1"),
        Some(_) => format!(
            "{head} WHERE {} > ?2 ORDER BY {order} LIMIT ?1",
            quote(&cols.id)
        ),
    };
    let mut stmt = conn.prepare(&sql).map_err(src_err)?;
    let to_cell = |v: Value| match v {
        Value::Null => Cell::Null,
        Value::Integer(i) => Cell::Int(i),
        Value::Real(r) => Cell::Real(r),
        Value::Text(s) => Cell::Text(s),
        Value::Blob(b) => Cell::Bytes(b),
    };
    let extra = usize::from(cols.name.is_some());
    let map = |r: &rusqlite::Row<'_>| -> rusqlite::Result<(Value, SourceRow)> {
        let id: Value = r.get(0)?;
        let owner: Value = r.get(1)?;
        let name = if extra == 1 {
            Some(to_cell(r.get::<_, Value>(2)?))
        } else {
            None
        };
        let mut values = Vec::with_capacity(cols.values.len());
        for i in 0..cols.values.len() {
            values.push(to_cell(r.get::<_, Value>(2 + extra + i)?));
        }
        Ok((
            id.clone(),
            SourceRow {
                id: to_cell(id),
                owner: to_cell(owner),
                name,
                values,
            },
        ))
    };
    let rows: Vec<(Value, SourceRow)> = match &after {
        None => stmt
            .query_map(rusqlite::params![limit], map)
            .map_err(src_err)?
            .collect::<Result<_, _>>(),
        Some(a) => stmt
            .query_map(rusqlite::params![limit, a], map)
            .map_err(src_err)?
            .collect::<Result<_, _>>(),
    }
    .map_err(src_err)?;
    let last = rows.last().map(|(id, _)| id.clone());
    Ok((rows.into_iter().map(|(_, r)| r).collect(), last))
}

fn pg_row(row: &tokio_postgres::Row, cols: &Columns) -> Result<SourceRow, ImportError> {
    use tokio_postgres::types::Type;
    let text = |i: usize| -> Result<Cell, ImportError> {
        Ok(
            match row.try_get::<_, Option<String>>(i).map_err(src_err)? {
                Some(s) => Cell::Text(s),
                None => Cell::Null,
            },
        )
    };
    let extra = usize::from(cols.name.is_some());
    let mut values = Vec::with_capacity(cols.values.len());
    for (k, col) in cols.values.iter().enumerate() {
        let i = 2 + extra + k;
        let ty = row.columns()[i].type_();
        let cell = if *ty == Type::BYTEA {
            match row.try_get::<_, Option<Vec<u8>>>(i).map_err(src_err)? {
                Some(b) => Cell::Bytes(b),
                None => Cell::Null,
            }
        } else if [Type::TEXT, Type::VARCHAR, Type::BPCHAR, Type::NAME].contains(ty) {
            text(i)?
        } else {
            return Err(ImportError::Source(format!(
                "column {col} has type {ty}; expected bytea or text"
            )));
        };
        values.push(cell);
    }
    Ok(SourceRow {
        id: text(0)?,
        owner: text(1)?,
        name: if extra == 1 { Some(text(2)?) } else { None },
        values,
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    /// The store's TLS rule holds for the importer's own connection too.
    #[tokio::test]
    async fn a_remote_django_database_in_the_clear_is_refused() {
        let url = DatabaseUrl::Postgres("postgresql://u@db.example.com/app?sslmode=disable".into());
        match Source::open(&url).await {
            Err(ImportError::Source(m)) => assert!(m.contains("sslmode=disable"), "{m}"),
            other => panic!("{:?}", other.err()),
        }
    }

    #[test]
    fn a_database_url_debug_hides_the_password() {
        let url: DatabaseUrl = "postgresql://app:PW-CANARY@db/app".parse().unwrap();
        assert!(!format!("{url:?}").contains("PW-CANARY"));
    }

    #[test]
    fn database_urls() {
        assert_eq!(
            "sqlite:/tmp/x.sqlite3".parse::<DatabaseUrl>().unwrap(),
            DatabaseUrl::Sqlite("/tmp/x.sqlite3".into())
        );
        assert_eq!(
            "sqlite:///tmp/x".parse::<DatabaseUrl>().unwrap(),
            DatabaseUrl::Sqlite("/tmp/x".into())
        );
        assert_eq!(
            "sqlite:rel.db".parse::<DatabaseUrl>().unwrap(),
            DatabaseUrl::Sqlite("rel.db".into())
        );
        assert!(matches!(
            "postgresql://u@h/db".parse::<DatabaseUrl>().unwrap(),
            DatabaseUrl::Postgres(_)
        ));
        assert!("mysql://x".parse::<DatabaseUrl>().is_err());
        assert!("sqlite:".parse::<DatabaseUrl>().is_err());
    }

    #[test]
    fn identifiers_are_quoted() {
        assert_eq!(quote_path("app.vault_secret"), "\"app\".\"vault_secret\"");
        assert_eq!(quote("we\"ird"), "\"we\"\"ird\"");
    }

    #[test]
    fn cells_as_text() {
        assert_eq!(Cell::Int(-42).to_text().unwrap(), "-42");
        assert_eq!(Cell::Bytes(b"alice".to_vec()).to_text().unwrap(), "alice");
        assert_eq!(Cell::Bytes(vec![0xff]).to_text(), None);
        assert_eq!(Cell::Null.to_text(), None);
    }
}
