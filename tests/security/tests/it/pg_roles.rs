//! Postgres roles (issue 5, CONTRACT §4): on a fresh migrated database, `SET LOCAL ROLE` inside a
//! transaction proves that `deepnode_service` may INSERT/SELECT `events` but never UPDATE, DELETE or
//! TRUNCATE it and may write the projections, and that `deepnode_reader` may only SELECT — INSERT,
//! UPDATE, DELETE and TRUNCATE are refused on every table of the schema (SQLSTATE 42501). It also
//! checks that even a superuser's UPDATE/DELETE/TRUNCATE of `events` is refused by the triggers.
//!
//! Statements carry `WHERE false` (or insert nothing) so an allowed statement changes no row:
//! privileges are checked when the statement is planned, before any row is touched. Every
//! transaction is rolled back.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use deepnode_testkit::TestDb;
use sqlx::PgPool;

/// Runs `sql` as `role` in a transaction that is rolled back; the SQLSTATE on failure.
async fn as_role(pool: &PgPool, role: &str, sql: &str) -> Result<(), String> {
    let mut tx = pool.begin().await.unwrap();
    sqlx::query(&format!("SET LOCAL ROLE {role}"))
        .execute(&mut *tx)
        .await
        .unwrap();
    let result = sqlx::query(sql).execute(&mut *tx).await;
    tx.rollback().await.unwrap();
    match result {
        Ok(_) => Ok(()),
        Err(sqlx::Error::Database(e)) => Err(e.code().map(|c| c.into_owned()).unwrap_or_default()),
        Err(e) => panic!("{sql}: {e}"),
    }
}

/// Every base table of the public schema with one of its columns.
async fn tables(pool: &PgPool) -> Vec<(String, String)> {
    sqlx::query_as(
        "SELECT c.table_name::text, min(c.column_name::text) FROM information_schema.columns c \
         JOIN information_schema.tables t USING (table_schema, table_name) \
         WHERE c.table_schema = 'public' AND t.table_type = 'BASE TABLE' \
         GROUP BY c.table_name ORDER BY 1",
    )
    .fetch_all(pool)
    .await
    .unwrap()
}

const DENIED: &str = "42501";

#[tokio::test]
async fn service_role_appends_but_never_rewrites_the_log() {
    let db = TestDb::new().await;
    let pool = db.pool().await;
    let role = "deepnode_service";

    assert_eq!(as_role(&pool, role, "SELECT * FROM events").await, Ok(()));
    assert_eq!(
        as_role(
            &pool,
            role,
            "INSERT INTO events SELECT * FROM events WHERE false"
        )
        .await,
        Ok(()),
        "service may insert events"
    );
    for sql in [
        "UPDATE events SET event_type = event_type WHERE false",
        "DELETE FROM events WHERE false",
        "TRUNCATE events",
        "DELETE FROM log_head WHERE false",
        "TRUNCATE log_head",
    ] {
        assert_eq!(as_role(&pool, role, sql).await, Err(DENIED.into()), "{sql}");
    }
    for table in ["node_reputation", "deployments", "executions"] {
        for sql in [
            format!("INSERT INTO {table} SELECT * FROM {table} WHERE false"),
            format!("UPDATE {table} SET model_id = model_id WHERE false").replace(
                "model_id",
                if table == "node_reputation" {
                    "node_id"
                } else {
                    "model_id"
                },
            ),
            format!("DELETE FROM {table} WHERE false"),
        ] {
            assert_eq!(as_role(&pool, role, &sql).await, Ok(()), "{sql}");
        }
    }
    for sql in [
        "INSERT INTO projection_checkpoints SELECT * FROM projection_checkpoints WHERE false",
        "UPDATE projection_checkpoints SET global_position = global_position WHERE false",
    ] {
        assert_eq!(as_role(&pool, role, sql).await, Ok(()), "{sql}");
    }

    // Not even the owner/superuser: the triggers refuse rewriting the log (CONTRACT §4).
    let event = deepnode_testkit::event("NodeRegistered", serde_json::json!({"x": 1}));
    db.store()
        .await
        .append(
            &deepnode_domain::log::StreamId::parse("node-x").unwrap(),
            deepnode_domain::log::ExpectedVersion::Any,
            vec![event],
        )
        .await
        .unwrap();
    for sql in [
        "UPDATE events SET event_type = 'Tampered'",
        "DELETE FROM events",
        "TRUNCATE events",
    ] {
        let refused = sqlx::query(sql).execute(&pool).await;
        assert!(refused.is_err(), "superuser {sql} accepted");
    }
    let count: i64 = sqlx::query_scalar("SELECT count(*) FROM events")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(count, 1);
}

#[tokio::test]
async fn reader_role_only_selects_every_table() {
    let db = TestDb::new().await;
    let pool = db.pool().await;
    let role = "deepnode_reader";
    let tables = tables(&pool).await;
    let names: Vec<&str> = tables.iter().map(|(t, _)| t.as_str()).collect();
    for expected in [
        "events",
        "log_head",
        "projection_checkpoints",
        "node_reputation",
        "deployments",
        "executions",
    ] {
        assert!(
            names.contains(&expected),
            "{expected} missing from {names:?}"
        );
        assert_eq!(
            as_role(&pool, role, &format!("SELECT * FROM {expected}")).await,
            Ok(()),
            "reader may read {expected}"
        );
    }
    let mut refused = 0;
    for (table, column) in &tables {
        for sql in [
            format!("INSERT INTO \"{table}\" SELECT * FROM \"{table}\" WHERE false"),
            format!("UPDATE \"{table}\" SET \"{column}\" = \"{column}\" WHERE false"),
            format!("DELETE FROM \"{table}\" WHERE false"),
            format!("TRUNCATE \"{table}\""),
        ] {
            assert_eq!(
                as_role(&pool, role, &sql).await,
                Err(DENIED.into()),
                "{sql}"
            );
            refused += 1;
        }
    }
    println!(
        "reader: {refused} writes refused on {} tables: {names:?}",
        tables.len()
    );
}
