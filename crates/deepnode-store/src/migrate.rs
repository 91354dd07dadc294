//! Database bootstrap: create the database named in `DATABASE_URL` if it is missing, then apply the
//! refinery migrations in `migrations/` under a Postgres advisory lock, so that several binaries
//! starting at once are safe (the first applies, the others wait and find nothing left to do).
//!
//! It deliberately knows nothing about the schema itself: that lives in the SQL files.

use std::str::FromStr;

use sqlx::postgres::PgConnectOptions;
use sqlx::{ConnectOptions, Connection};
use tokio_postgres::NoTls;

use crate::Error;

mod embedded {
    refinery::embed_migrations!("../../migrations");
}

/// Key of the session-level advisory lock held while migrating ("deepnode" in ASCII).
const MIGRATION_LOCK_KEY: i64 = 0x6465_6570_6e6f_6465;

/// Creates the database if needed and applies pending migrations. Returns the versions applied now.
pub async fn migrate(database_url: &str) -> Result<Vec<i32>, Error> {
    create_database_if_missing(database_url).await?;

    let (mut client, connection) = tokio_postgres::connect(database_url, NoTls)
        .await
        .map_err(|e| Error::Migration(format!("connecting to {}: {e}", redact(database_url))))?;
    let driver = tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::warn!(error = %e, "migration connection ended with an error");
        }
    });

    let result = async {
        client
            .execute("SELECT pg_advisory_lock($1)", &[&MIGRATION_LOCK_KEY])
            .await
            .map_err(|e| Error::Migration(format!("taking the migration lock: {e}")))?;
        let report = embedded::migrations::runner()
            .run_async(&mut client)
            .await
            .map_err(|e| Error::Migration(e.to_string()));
        // Unlock even when a migration failed; the session ending would release it anyway.
        let _ = client
            .execute("SELECT pg_advisory_unlock($1)", &[&MIGRATION_LOCK_KEY])
            .await;
        report
    }
    .await;
    drop(client);
    let _ = driver.await;

    let applied: Vec<i32> = result?
        .applied_migrations()
        .iter()
        .map(|m| m.version() as i32)
        .collect();
    if !applied.is_empty() {
        tracing::info!(?applied, "applied migrations");
    }
    Ok(applied)
}

/// The highest migration version this binary knows (used by readiness checks).
pub fn latest_known_version() -> i32 {
    embedded::migrations::runner()
        .get_migrations()
        .iter()
        .map(|m| m.version() as i32)
        .max()
        .unwrap_or(0)
}

/// Connects to the server's maintenance database and creates the target database if it is absent.
/// Two processes racing to create it is fine: the loser sees "already exists" and carries on.
pub async fn create_database_if_missing(database_url: &str) -> Result<(), Error> {
    let options = PgConnectOptions::from_str(database_url)
        .map_err(|e| Error::Migration(format!("invalid DATABASE_URL: {e}")))?;
    let Some(name) = options.get_database().map(str::to_owned) else {
        return Ok(());
    };
    let mut last_error = None;
    for maintenance in ["postgres", "template1"] {
        if maintenance == name {
            return Ok(());
        }
        let mut conn = match options.clone().database(maintenance).connect().await {
            Ok(conn) => conn,
            Err(e) => {
                last_error = Some(e);
                continue;
            }
        };
        let exists: bool =
            sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1)")
                .bind(&name)
                .fetch_one(&mut conn)
                .await?;
        if !exists {
            let sql = format!("CREATE DATABASE \"{}\"", name.replace('"', "\"\""));
            match sqlx::query(&sql).execute(&mut conn).await {
                Ok(_) => tracing::info!(database = %name, "created database"),
                // 42P04 duplicate_database, 23505 when two CREATEs race on pg_database's index.
                Err(sqlx::Error::Database(db))
                    if matches!(db.code().as_deref(), Some("42P04") | Some("23505")) => {}
                Err(e) => return Err(e.into()),
            }
        }
        let _ = conn.close().await;
        return Ok(());
    }
    Err(last_error
        .map(Error::from)
        .unwrap_or_else(|| Error::Migration("no maintenance database to connect to".into())))
}

/// The URL without its password, for error messages.
pub(crate) fn redact(database_url: &str) -> String {
    match url::Url::parse(database_url) {
        Ok(mut url) if url.password().is_some() => {
            let _ = url.set_password(Some("***"));
            url.to_string()
        }
        _ => database_url.to_owned(),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use sha2::{Digest, Sha256};

    /// Released migrations never change (a database that applied one would disagree with a new
    /// binary about its schema): `migrations/RELEASED.sha256` lists every migration with its
    /// SHA-256, and a changed file, a missing one or an unlisted one fails here.
    #[test]
    fn released_migrations_are_frozen() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../migrations");
        let list = std::fs::read_to_string(dir.join("RELEASED.sha256")).unwrap();
        let listed: std::collections::BTreeMap<&str, &str> = list
            .lines()
            .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
            .map(|l| {
                let (hash, name) = l.split_once("  ").expect("`<sha256>  <file>` lines");
                (name, hash)
            })
            .collect();
        let mut present = Vec::new();
        for entry in std::fs::read_dir(&dir).unwrap() {
            let name = entry.unwrap().file_name().into_string().unwrap();
            if name.starts_with('V') && name.ends_with(".sql") {
                present.push(name);
            }
        }
        present.sort();
        let names: Vec<&str> = listed.keys().copied().collect();
        assert_eq!(
            present, names,
            "every migration is listed in migrations/RELEASED.sha256 (a new one: add its line)"
        );
        for (name, hash) in &listed {
            let bytes = std::fs::read(dir.join(name)).unwrap();
            let actual = hex::encode(Sha256::digest(&bytes));
            assert_eq!(
                &actual, hash,
                "{name} changed after its release: write a new migration instead"
            );
        }
    }
}
