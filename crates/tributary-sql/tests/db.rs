//! The db component on a SQLite file and on the machine's PostgreSQL (127.0.0.1:5432, trust
//! auth, database `test`; or `TRIBUTARY_TEST_POSTGRES_URL`), started or checked by `.ci/run`.

use sqlx::Row;
use tributary_sql::{Db, DbConfig, DbError, Dialect, Migration, Read, Schema};

fn postgres_url(database: &str) -> String {
    match std::env::var("TRIBUTARY_TEST_POSTGRES_URL") {
        Ok(url) => url,
        Err(_) => format!("postgres://postgres@127.0.0.1:5432/{database}"),
    }
}

/// A name no other run uses (tables of one run on the shared PostgreSQL).
fn unique(what: &str) -> String {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos();
    format!("{what}_{}_{}", std::process::id(), nanos % 1_000_000_000)
}

/// Two migrations over a table named by `table` (leaked: a `Schema` holds static text).
fn schema(owner: &str, table: &str) -> Schema {
    let leak = |s: String| -> &'static str { Box::leak(s.into_boxed_str()) };
    let create_sqlite = leak(format!("CREATE TABLE {table} (id TEXT PRIMARY KEY, body TEXT NOT NULL, at_ms BIGINT NOT NULL)"));
    let create_postgres = leak(format!("CREATE TABLE {table} (id TEXT PRIMARY KEY, body TEXT NOT NULL, at_ms BIGINT NOT NULL)"));
    let index = leak(format!("CREATE INDEX {table}_at ON {table} (at_ms); ALTER TABLE {table} ADD COLUMN state TEXT NOT NULL DEFAULT 'new'"));
    let migrations = vec![
        Migration { version: 1, description: "the table", sqlite: create_sqlite, postgres: create_postgres },
        Migration { version: 2, description: "an index and a state column", sqlite: index, postgres: index },
    ];
    Schema { owner: leak(owner.to_string()), migrations: Box::leak(migrations.into_boxed_slice()) }
}

/// Migrates, writes with `$n` parameters and reads back: the same text on both dialects.
async fn round_trip(db: &Db, owner: &str, table: &str) {
    let schema = schema(owner, table);
    db.migrate(&schema).await.unwrap();
    db.migrate(&schema).await.expect("a second migrate is a no-op");
    let insert = format!("INSERT INTO {table} (id, body, at_ms) VALUES ($1, $2, $3)");
    let insert = || sqlx::AssertSqlSafe(insert.clone());
    sqlx::query(insert()).bind("a").bind("first").bind(1_i64).execute(db.writer()).await.unwrap();
    sqlx::query(insert()).bind("b").bind("second").bind(2_i64).execute(db.writer()).await.unwrap();
    let duplicate = sqlx::query(insert()).bind("a").bind("again").bind(3_i64).execute(db.writer()).await;
    assert!(duplicate.is_err(), "a duplicate primary key was accepted");
    let rows = sqlx::query(sqlx::AssertSqlSafe(format!("SELECT id, body, at_ms, state FROM {table} WHERE at_ms >= $1 ORDER BY at_ms")))
        .bind(1_i64)
        .fetch_all(db.reader(Read::Primary))
        .await
        .unwrap();
    let read: Vec<(String, String, i64, String)> = rows.iter().map(|r| (r.get(0), r.get(1), r.get(2), r.get(3))).collect();
    assert_eq!(read, vec![("a".into(), "first".into(), 1, "new".into()), ("b".into(), "second".into(), 2, "new".into())]);

    // A migration already applied whose text changed is refused, not re-run.
    let mut changed = schema.migrations.to_vec();
    changed[0].sqlite = "CREATE TABLE something_else (x INTEGER)";
    changed[0].postgres = "CREATE TABLE something_else (x INTEGER)";
    let changed = Schema { owner: schema.owner, migrations: Box::leak(changed.into_boxed_slice()) };
    assert!(matches!(db.migrate(&changed).await, Err(DbError::Migrate { .. })));
}

#[tokio::test]
async fn the_embedded_sqlite_file_migrates_keeps_commits_across_a_reopen_and_reads_from_the_primary() {
    let dir = tempfile::tempdir().unwrap();
    let db = Db::embedded(dir.path()).await.unwrap();
    assert_eq!(db.dialect(), Dialect::Sqlite);
    round_trip(&db, "mail", "messages").await;
    db.close().await;
    let reopened = Db::embedded(dir.path()).await.unwrap();
    let count: i64 = sqlx::query("SELECT COUNT(*) FROM messages").fetch_one(reopened.reader(Read::MayLag)).await.unwrap().get(0);
    assert_eq!(count, 2, "committed rows survive a reopen; without a replica a lagging read goes to the primary");
    let mode: String = sqlx::query("PRAGMA journal_mode").fetch_one(reopened.primary()).await.unwrap().get(0);
    assert_eq!(mode, "wal");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sqlite_writers_take_turns_so_transactions_that_read_then_write_all_commit() {
    let dir = tempfile::tempdir().unwrap();
    let db = Db::embedded(dir.path()).await.unwrap();
    sqlx::query("CREATE TABLE counter (name TEXT PRIMARY KEY, value BIGINT NOT NULL)").execute(db.writer()).await.unwrap();
    sqlx::query("INSERT INTO counter (name, value) VALUES ('n', 0)").execute(db.writer()).await.unwrap();
    const WRITERS: i64 = 64;
    // Each reads the value, then writes it plus one, in one (deferred) transaction: on
    // connections of their own, one whose snapshot is older than another's commit would fail.
    let started = std::time::Instant::now();
    let mut increments = tokio::task::JoinSet::new();
    for _ in 0..WRITERS {
        let db = db.clone();
        increments.spawn(async move {
            let mut transaction = db.writer().begin().await?;
            let value: i64 = sqlx::query("SELECT value FROM counter WHERE name = 'n'").fetch_one(&mut *transaction).await?.get(0);
            tokio::task::yield_now().await;
            sqlx::query("UPDATE counter SET value = $1 WHERE name = 'n'").bind(value + 1).execute(&mut *transaction).await?;
            transaction.commit().await
        });
    }
    while let Some(result) = increments.join_next().await {
        result.unwrap().expect("a writer's transaction commits");
    }
    let value: i64 = sqlx::query("SELECT value FROM counter WHERE name = 'n'").fetch_one(db.primary()).await.unwrap().get(0);
    assert_eq!(value, WRITERS, "every increment counted once");
    // Reads do not queue behind the writer: one runs while a write transaction is open.
    let mut open = db.writer().begin().await.unwrap();
    sqlx::query("UPDATE counter SET value = value + 1 WHERE name = 'n'").execute(&mut *open).await.unwrap();
    let seen: i64 = tokio::time::timeout(std::time::Duration::from_secs(2), sqlx::query("SELECT value FROM counter WHERE name = 'n'").fetch_one(db.primary())).await.expect("a read waited for a writer").unwrap().get(0);
    assert_eq!(seen, WRITERS, "a read sees the last commit, not the open transaction");
    open.commit().await.unwrap();
    eprintln!("{WRITERS} read-then-write transactions in {:?}", started.elapsed());
    db.close().await;
}

#[tokio::test]
async fn postgres_migrates_and_round_trips_with_the_same_queries() {
    let db = Db::connect(&DbConfig::new(postgres_url("test"))).await.expect("PostgreSQL answers on 127.0.0.1:5432");
    assert_eq!(db.dialect(), Dialect::Postgres);
    let (owner, table) = (unique("owner"), unique("messages"));
    round_trip(&db, &owner, &table).await;
    for drop in [format!("DROP TABLE {table}"), format!("DROP TABLE _tributary_migrations_{owner}")] {
        sqlx::query(sqlx::AssertSqlSafe(drop)).execute(db.primary()).await.unwrap();
    }
}

#[tokio::test]
async fn deployments_in_schemas_of_their_own_share_one_postgres_without_seeing_each_other() {
    let (a, b) = (unique("deploy-a"), unique("deploy-b"));
    // Nodes of one deployment starting together all find (or make) its schema.
    let config = DbConfig::new(postgres_url("test")).in_schema(&a);
    let together = tokio::join!(Db::connect(&config), Db::connect(&config), Db::connect(&config), Db::connect(&config));
    for db in [together.0, together.1, together.2, together.3] {
        db.expect("a node starting beside others connects").close().await;
    }
    let first = Db::connect(&DbConfig::new(postgres_url("test")).in_schema(&a)).await.unwrap();
    let second = Db::connect(&DbConfig::new(postgres_url("test")).in_schema(&b)).await.unwrap();
    // The same owner and table names in both: each deployment migrates and writes its own.
    for (db, body) in [(&first, "of a"), (&second, "of b")] {
        db.migrate(&schema("shared_owner", "items")).await.unwrap();
        sqlx::query("INSERT INTO items (id, body, at_ms) VALUES ($1, $2, $3)").bind("x").bind(body).bind(1_i64).execute(db.primary()).await.unwrap();
    }
    for (db, body) in [(&first, "of a"), (&second, "of b")] {
        let rows = sqlx::query("SELECT body FROM items").fetch_all(db.reader(Read::MayLag)).await.unwrap();
        assert_eq!(rows.iter().map(|r| r.get::<String, _>(0)).collect::<Vec<_>>(), [body]);
    }
    // A reopened deployment finds its tables; a dropped one is gone with them.
    let again = Db::connect(&DbConfig::new(postgres_url("test")).in_schema(&a)).await.unwrap();
    assert_eq!(sqlx::query("SELECT body FROM items").fetch_one(again.primary()).await.unwrap().get::<String, _>(0), "of a");
    again.close().await;
    first.drop_schema().await.unwrap();
    second.drop_schema().await.unwrap();
    let public = Db::connect(&DbConfig::new(postgres_url("test"))).await.unwrap();
    let left: i64 = sqlx::query("SELECT count(*) FROM information_schema.schemata WHERE schema_name IN ($1, $2)").bind(&a).bind(&b).fetch_one(public.primary()).await.unwrap().get(0);
    assert_eq!(left, 0);
    assert!(matches!(public.drop_schema().await, Err(DbError::Invalid(_))), "the default schema is not dropped");
    let bad = Db::connect(&DbConfig::new(postgres_url("test")).in_schema("a\"; DROP")).await;
    assert!(matches!(bad, Err(DbError::Invalid(_))), "{bad:?}");
}

#[tokio::test]
async fn reads_that_may_lag_go_to_the_replica_and_the_others_to_the_primary() {
    // The "replica" here is another database of the same server, so the answer shows which pool
    // served the read; keeping a real replica current is PostgreSQL's streaming replication.
    let config = DbConfig { replica: Some(postgres_url("postgres")), ..DbConfig::new(postgres_url("test")) };
    let db = Db::connect(&config).await.unwrap();
    let served_by = |read| {
        let db = db.clone();
        async move { sqlx::query("SELECT current_database()::text").fetch_one(db.reader(read)).await.unwrap().get::<String, _>(0) }
    };
    assert_eq!(served_by(Read::Primary).await, "test");
    assert_eq!(served_by(Read::MayLag).await, "postgres");
    let written: String = sqlx::query("SELECT current_database()::text").fetch_one(db.primary()).await.unwrap().get(0);
    assert_eq!(written, "test");
}

#[tokio::test]
async fn bad_urls_and_mixed_dialects_are_refused_by_name() {
    assert!(matches!(Db::connect(&DbConfig::new("mysql://x@h/db")).await, Err(DbError::Invalid(_))));
    let mixed = DbConfig { replica: Some("sqlite://x.sqlite3".into()), ..DbConfig::new(postgres_url("test")) };
    assert!(matches!(Db::connect(&mixed).await, Err(DbError::Invalid(_))));
    let unreachable = Db::connect(&DbConfig::new("postgres://postgres@127.0.0.1:1/test")).await;
    assert!(matches!(unreachable, Err(DbError::Connect { .. })), "{unreachable:?}");
}

/// A pooled connection that PostgreSQL closed (a restart, an administrator): one that sat idle
/// for `DB_IDLE_PING_AFTER` is found dead before use and replaced, so the statement succeeds;
/// one used more recently fails its next statement once, and the statement after that gets a
/// new connection.
#[tokio::test]
async fn connections_postgresql_closed_are_replaced() {
    let name = unique("closed");
    let base = postgres_url("test");
    let url = format!("{base}{}application_name={name}", if base.contains('?') { '&' } else { '?' });
    let db = Db::connect(&DbConfig { max_connections: 1, ..DbConfig::new(url) }).await.unwrap();
    let admin = Db::connect(&DbConfig::new(postgres_url("test"))).await.unwrap();
    let backend = || async { sqlx::query("SELECT pg_backend_pid()").fetch_one(db.primary()).await.map(|row| row.get::<i32, _>(0)) };
    let close = || async {
        let closed = sqlx::query("SELECT count(*) FROM (SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = $1) t")
            .bind(name.clone())
            .fetch_one(admin.primary())
            .await
            .unwrap()
            .get::<i64, _>(0);
        assert_eq!(closed, 1, "the pool's one connection is closed");
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    };

    let first = backend().await.unwrap();
    close().await;
    assert!(backend().await.is_err(), "a connection used 200 ms ago is not pinged: its next statement fails");
    let second = backend().await.expect("the statement after gets a new connection");
    assert_ne!(first, second);

    close().await;
    tokio::time::sleep(tributary_sql::DB_IDLE_PING_AFTER).await;
    let third = backend().await.expect("an idle connection found dead is replaced before use");
    assert_ne!(second, third);
}
