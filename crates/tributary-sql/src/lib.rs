//! The palette's `db_primary` / `db_replica`: SQL through sqlx, on a SQLite file when embedded and
//! on PostgreSQL when distributed, chosen by URL.
//!
//! - [`Db::embedded`] opens `<data>/tributary.sqlite3` (WAL, `synchronous=FULL`: a commit is on
//!   disk before it returns, a busy timeout instead of immediate `SQLITE_BUSY`).
//! - Writes go through [`Db::writer`]. On SQLite that is a pool of one connection
//!   ([`SQLITE_WRITERS`]): SQLite lets one writer in at a time, and writers on several connections
//!   would wait for each other in its busy handler, which sleeps up to 100 ms per try, and a
//!   transaction that reads before it writes could fail with `SQLITE_BUSY`. Queued in the pool,
//!   they take turns in order. Reads use the other connections and never wait for a writer (WAL).
//!   On PostgreSQL the writer is the primary pool.
//! - [`Db::connect`] takes a primary URL (`sqlite://…` or `postgres://…`) and, optionally, a
//!   replica URL. Writes ([`Db::writer`]) and reads that must see them ([`Read::Primary`]) go
//!   to the primary; reads that tolerate replication lag ([`Read::MayLag`]) go to the replica
//!   when one is given, else to the primary. Replication itself is PostgreSQL's.
//! - Both use sqlx's `Any` driver, so one query text serves both databases: write parameters as
//!   `$1, $2, …` (SQLite accepts them too) and stay within the SQL both speak, or branch on
//!   [`Db::dialect`].
//! - On PostgreSQL a [`DbConfig::schema`] (a deployment's namespace) keeps several deployments
//!   apart in one database: it is created when missing and is every connection's `search_path`.
//!   [`Db::drop_schema`] removes it with everything in it.
//! - [`Db::migrate`] applies a [`Schema`]: an owner's numbered migrations, kept in the repo as SQL
//!   per dialect, recorded in the owner's own table `_tributary_migrations_<owner>` so that
//!   several owners (systems) share one database without their versions colliding. A migration
//!   already applied whose text changed is refused ([`DbError::Migrate`]), never re-run.

pub use sqlx;

use std::borrow::Cow;
use std::path::Path;
use std::time::Duration;

use sqlx::any::{AnyPoolOptions, install_default_drivers};
use sqlx::migrate::{Migration as SqlxMigration, MigrationType, Migrator};
use sqlx::{AnyPool, Connection, Executor, SqlStr};

/// Connections of one pool when the configuration names none.
pub const DB_CONNECTIONS_DEFAULT: u32 = 8;
/// How long a query waits for a free connection.
pub const DB_ACQUIRE_TIMEOUT: Duration = Duration::from_secs(10);
/// A pooled PostgreSQL connection idle this long is pinged before its next use (a broken one
/// is replaced then); one used more recently is not. After PostgreSQL restarts, a connection
/// used within this time fails its next statement once, and the pool replaces it.
pub const DB_IDLE_PING_AFTER: Duration = Duration::from_secs(1);
/// Connections that write to a SQLite database ([`Db::writer`]).
pub const SQLITE_WRITERS: u32 = 1;
/// How long an embedded SQLite connection waits on a lock held by another before `SQLITE_BUSY`.
pub const SQLITE_BUSY_TIMEOUT_MS: u64 = 5_000;
/// The embedded database's file under the data folder.
pub const EMBEDDED_FILE: &str = "tributary.sqlite3";

/// Which SQL the database speaks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dialect {
    Sqlite,
    Postgres,
}

/// Where a read goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Read {
    /// The primary: the read sees every committed write.
    Primary,
    /// The replica when there is one: the read may miss the latest writes.
    MayLag,
}

/// One numbered migration, as SQL for each dialect (several statements are allowed).
#[derive(Clone, Copy, Debug)]
pub struct Migration {
    pub version: i64,
    pub description: &'static str,
    pub sqlite: &'static str,
    pub postgres: &'static str,
}

/// An owner's migrations, in version order.
#[derive(Clone, Copy, Debug)]
pub struct Schema {
    /// A short name (`A-Z a-z 0-9 _`), part of the migrations table's name.
    pub owner: &'static str,
    pub migrations: &'static [Migration],
}

#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("{0}")]
    Invalid(String),
    #[error("connecting to {url}: {source}")]
    Connect { url: String, source: sqlx::Error },
    #[error("migrating {owner}: {source}")]
    Migrate { owner: String, source: sqlx::migrate::MigrateError },
    #[error(transparent)]
    Query(#[from] sqlx::Error),
}

pub type Result<T, E = DbError> = std::result::Result<T, E>;

/// How to reach the database.
#[derive(Clone, Debug)]
pub struct DbConfig {
    pub primary: String,
    pub replica: Option<String>,
    pub max_connections: u32,
    /// PostgreSQL: the schema (`A-Z a-z 0-9 _ -`) that holds this deployment's tables; None for
    /// the connection's default (`public`). Ignored by SQLite, whose file is the deployment's.
    pub schema: Option<String>,
}

impl DbConfig {
    pub fn new(primary: impl Into<String>) -> DbConfig {
        DbConfig { primary: primary.into(), replica: None, max_connections: DB_CONNECTIONS_DEFAULT, schema: None }
    }

    /// The same database, its tables in `schema` (on PostgreSQL).
    pub fn in_schema(self, schema: impl Into<String>) -> DbConfig {
        DbConfig { schema: Some(schema.into()), ..self }
    }
}

/// The PostgreSQL advisory lock held while a schema is made (any fixed number; Tributary's).
const SCHEMA_LOCK_KEY: i64 = 0x7472_6962_7574;

/// The longest schema name PostgreSQL keeps (NAMEDATALEN - 1).
pub const SCHEMA_NAME_BYTES_MAX: usize = 63;

/// The schema name, quoted, once checked.
fn quoted_schema(schema: &str) -> Result<String> {
    if schema.is_empty() || schema.len() > SCHEMA_NAME_BYTES_MAX || !schema.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-') {
        return Err(DbError::Invalid(format!("a schema name is 1 to SCHEMA_NAME_BYTES_MAX ({SCHEMA_NAME_BYTES_MAX}) of A-Z a-z 0-9 _ -, got {schema:?}")));
    }
    Ok(format!("\"{schema}\""))
}

/// Parameters of the rows one SQL statement writes or names, at most: far below SQLite's and
/// PostgreSQL's limits, and small because binding them costs SQLite time that grows with the
/// square of their number (each is found by its name, `$n`, in a list of them all). A statement
/// of 1,400 parameters spent more time binding than writing.
pub const SQL_PARAMETERS_PER_STATEMENT: usize = 256;

/// Rows of `width` parameters one statement writes or names: as many as
/// [`SQL_PARAMETERS_PER_STATEMENT`] holds, at least one.
pub const fn rows_per_statement(width: usize) -> usize {
    let rows = SQL_PARAMETERS_PER_STATEMENT / if width == 0 { 1 } else { width };
    if rows == 0 { 1 } else { rows }
}

/// `$first, $first+1, …` for `count` parameters, comma-separated.
pub fn placeholders(first: usize, count: usize) -> String {
    (first..first + count).map(|n| format!("${n}")).collect::<Vec<_>>().join(", ")
}

/// `($1, …, $width), (…), …` for `rows` rows of `width` parameters.
pub fn value_rows(rows: usize, width: usize) -> String {
    (0..rows).map(|row| format!("({})", placeholders(row * width + 1, width))).collect::<Vec<_>>().join(", ")
}

/// The rows of `select … WHERE column` (the text ends with the column) whose column is one of
/// `keys`, one statement per [`rows_per_statement`]`(1)` keys.
///
/// On PostgreSQL the statement is not kept prepared: it is planned for its parameters and the
/// table as it is at each call. A kept statement gets a generic plan after five executions, and
/// one made while a table was small goes on scanning the whole table however large it grows,
/// until the table is next analyzed. There is one statement text per count of keys, so kept
/// statements would also crowd the connection's cache of them.
pub async fn rows_in(pool: &AnyPool, select: &str, keys: &[String]) -> std::result::Result<Vec<sqlx::any::AnyRow>, sqlx::Error> {
    let keep_prepared = !matches!(dialect_of(pool.connect_options().database_url.as_str()), Ok(Dialect::Postgres));
    let mut rows = Vec::new();
    for chunk in keys.chunks(rows_per_statement(1)) {
        let mut query = sqlx::query(sqlx::AssertSqlSafe(format!("{select} IN ({})", placeholders(1, chunk.len())))).persistent(keep_prepared);
        for key in chunk {
            query = query.bind(key.clone());
        }
        rows.extend(query.fetch_all(pool).await?);
    }
    Ok(rows)
}

/// The database: a pool on the primary and, optionally, one on a replica. Cheap to clone.
#[derive(Clone, Debug)]
pub struct Db {
    primary: AnyPool,
    /// SQLite: the one connection that writes. PostgreSQL: none (the primary pool writes).
    writer: Option<AnyPool>,
    replica: Option<AnyPool>,
    dialect: Dialect,
    /// The schema of a PostgreSQL deployment, quoted.
    schema: Option<String>,
}

fn dialect_of(url: &str) -> Result<Dialect> {
    if url.starts_with("sqlite:") {
        Ok(Dialect::Sqlite)
    } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        Ok(Dialect::Postgres)
    } else {
        Err(DbError::Invalid(format!("a database URL starts with sqlite: or postgres://, got {:?}", redacted_url(url))))
    }
}

/// The URL without its password, for messages.
pub fn redacted_url(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let credentials = &url[scheme + 3..at];
            match credentials.split_once(':') {
                Some((user, _)) => format!("{}{user}:***{}", &url[..scheme + 3], &url[at..]),
                None => url.to_string(),
            }
        }
        _ => url.to_string(),
    }
}

async fn pool(url: &str, max_connections: u32, schema: Option<&str>) -> Result<AnyPool> {
    let dialect = dialect_of(url)?;
    install_default_drivers();
    // A connection is pinged when it goes back to the pool (sqlx always does); a PostgreSQL one
    // is pinged again before use only if it sat idle for DB_IDLE_PING_AFTER since. A ping before
    // every use would be one more round trip per statement (on a busy notification-fanout node,
    // about an eighth of its CPU samples). A connection to a local SQLite file does not go stale.
    let options = AnyPoolOptions::new().max_connections(max_connections).acquire_timeout(DB_ACQUIRE_TIMEOUT).test_before_acquire(false);
    let options = if dialect == Dialect::Postgres {
        options.before_acquire(|connection, meta| {
            Box::pin(async move {
                if meta.idle_for >= DB_IDLE_PING_AFTER {
                    connection.ping().await?;
                }
                Ok(true)
            })
        })
    } else {
        options
    };
    let options = if let (Dialect::Postgres, Some(schema)) = (dialect, schema) {
        let set = format!("SET search_path TO {schema}");
        options.after_connect(move |connection, _| {
            let set = set.clone();
            Box::pin(async move {
                connection.execute(sqlx::AssertSqlSafe(set)).await?;
                Ok(())
            })
        })
    } else if dialect == Dialect::Sqlite {
        options.after_connect(|connection, _| {
            Box::pin(async move {
                connection.execute(sqlx::AssertSqlSafe(format!("PRAGMA busy_timeout = {SQLITE_BUSY_TIMEOUT_MS}"))).await?;
                connection.execute("PRAGMA journal_mode = WAL").await?;
                connection.execute("PRAGMA synchronous = FULL").await?;
                connection.execute("PRAGMA foreign_keys = ON").await?;
                Ok(())
            })
        })
    } else {
        options
    };
    options.connect(url).await.map_err(|source| DbError::Connect { url: redacted_url(url), source })
}

impl Db {
    /// The embedded database: `<dir>/tributary.sqlite3`, created when missing.
    pub async fn embedded(dir: &Path) -> Result<Db> {
        std::fs::create_dir_all(dir).map_err(|e| DbError::Invalid(format!("creating {}: {e}", dir.display())))?;
        let path = dir.join(EMBEDDED_FILE);
        let url = format!("sqlite://{}?mode=rwc", path.display());
        Db::connect(&DbConfig::new(url)).await
    }

    /// Connects to the primary (and the replica, when given); both must speak the same dialect.
    pub async fn connect(config: &DbConfig) -> Result<Db> {
        if config.max_connections == 0 {
            return Err(DbError::Invalid("max_connections must be at least 1".into()));
        }
        let dialect = dialect_of(&config.primary)?;
        if let Some(replica) = &config.replica
            && dialect_of(replica)? != dialect
        {
            return Err(DbError::Invalid("the replica must be the same kind of database as the primary".into()));
        }
        let schema = match (&config.schema, dialect) {
            (Some(schema), Dialect::Postgres) => Some(quoted_schema(schema)?),
            _ => None,
        };
        if let Some(schema) = &schema {
            // Made once, before the pool whose connections use it. Nodes starting together
            // would race (PostgreSQL's CREATE SCHEMA IF NOT EXISTS fails on a concurrent
            // creation of the same name), so the creation holds a transaction-scoped advisory
            // lock.
            let setup = pool(&config.primary, 1, None).await?;
            let made = async {
                let mut transaction = setup.begin().await?;
                transaction.execute(sqlx::AssertSqlSafe(format!("SELECT pg_advisory_xact_lock({SCHEMA_LOCK_KEY})"))).await?;
                transaction.execute(sqlx::AssertSqlSafe(format!("CREATE SCHEMA IF NOT EXISTS {schema}"))).await?;
                transaction.commit().await
            }
            .await;
            setup.close().await;
            made?;
        }
        let primary = pool(&config.primary, config.max_connections, schema.as_deref()).await?;
        let writer = match dialect {
            Dialect::Sqlite => Some(pool(&config.primary, SQLITE_WRITERS, None).await?),
            Dialect::Postgres => None,
        };
        let replica = match &config.replica {
            Some(url) => Some(pool(url, config.max_connections, schema.as_deref()).await?),
            None => None,
        };
        Ok(Db { primary, writer, replica, dialect, schema })
    }

    /// Drops the PostgreSQL schema of this deployment with everything in it, then closes the
    /// pools. Refused on SQLite and without a schema (the file, or `public`, is not ours alone).
    pub async fn drop_schema(&self) -> Result<()> {
        let Some(schema) = &self.schema else {
            return Err(DbError::Invalid("only a PostgreSQL deployment with a schema of its own can drop it".into()));
        };
        self.primary.execute(sqlx::AssertSqlSafe(format!("DROP SCHEMA IF EXISTS {schema} CASCADE"))).await?;
        self.close().await;
        Ok(())
    }

    pub fn dialect(&self) -> Dialect {
        self.dialect
    }

    /// The pool for reads that must see every committed write (and for writes where their
    /// speed does not matter: on SQLite, prefer [`Db::writer`]).
    pub fn primary(&self) -> &AnyPool {
        &self.primary
    }

    /// The pool for writes (and transactions that read, then write): on SQLite its one
    /// connection, so writers take turns in order; on PostgreSQL the primary pool.
    pub fn writer(&self) -> &AnyPool {
        self.writer.as_ref().unwrap_or(&self.primary)
    }

    /// The pool for a read: the replica for [`Read::MayLag`] when there is one.
    pub fn reader(&self, read: Read) -> &AnyPool {
        match (read, &self.replica) {
            (Read::MayLag, Some(replica)) => replica,
            _ => &self.primary,
        }
    }

    /// Applies the schema's migrations not yet applied, in version order, on the primary.
    pub async fn migrate(&self, schema: &Schema) -> Result<()> {
        if schema.owner.is_empty() || !schema.owner.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
            return Err(DbError::Invalid(format!("a schema owner is A-Z a-z 0-9 _, got {:?}", schema.owner)));
        }
        let migrations = schema
            .migrations
            .iter()
            .map(|m| {
                let sql = match self.dialect {
                    Dialect::Sqlite => m.sqlite,
                    Dialect::Postgres => m.postgres,
                };
                SqlxMigration::new(m.version, Cow::Borrowed(m.description), MigrationType::Simple, SqlStr::from_static(sql), false)
            })
            .collect();
        let mut migrator = Migrator::with_migrations(migrations);
        migrator.dangerous_set_table_name(format!("_tributary_migrations_{}", schema.owner));
        migrator.run(self.writer()).await.map_err(|source| DbError::Migrate { owner: schema.owner.to_string(), source })
    }

    /// Closes the pools, waiting for connections in use to be returned.
    pub async fn close(&self) {
        if let Some(writer) = &self.writer {
            writer.close().await;
        }
        self.primary.close().await;
        if let Some(replica) = &self.replica {
            replica.close().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placeholders_number_parameters_row_by_row() {
        assert_eq!(placeholders(3, 2), "$3, $4");
        assert_eq!(value_rows(2, 3), "($1, $2, $3), ($4, $5, $6)");
        assert_eq!(rows_per_statement(7), 36);
        assert_eq!(rows_per_statement(1), SQL_PARAMETERS_PER_STATEMENT);
        assert_eq!(rows_per_statement(SQL_PARAMETERS_PER_STATEMENT + 1), 1);
    }

    #[test]
    fn urls_name_their_dialect_and_passwords_stay_out_of_messages() {
        assert_eq!(dialect_of("sqlite://data/x.sqlite3").unwrap(), Dialect::Sqlite);
        assert_eq!(dialect_of("postgres://u@h/db").unwrap(), Dialect::Postgres);
        let error = dialect_of("mysql://u:secret@h/db").unwrap_err().to_string();
        assert!(error.contains("u:***@h") && !error.contains("secret"), "{error}");
    }
}
