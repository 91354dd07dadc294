//! `deepnode migrate`: create the database if needed and apply pending migrations.

use anyhow::Context as _;

use super::Outcome;
use crate::cli::Cli;

/// Applies pending migrations and says which.
pub async fn run(cli: &Cli) -> anyhow::Result<Outcome> {
    let applied = deepnode_store::migrate(&cli.database_url)
        .await
        .context("applying migrations")?;
    if applied.is_empty() {
        println!(
            "database is up to date (version {})",
            deepnode_store::latest_known_version()
        );
    } else {
        let list: Vec<String> = applied.iter().map(|v| format!("V{v}")).collect();
        println!("applied {}", list.join(", "));
    }
    Ok(Outcome::Clean)
}
