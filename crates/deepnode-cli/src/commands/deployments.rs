//! `deepnode deployments`: the stored `deployments` table (current assignments).

use anyhow::Context as _;

use super::Outcome;
use crate::cli::{Cli, JsonArg};
use crate::{context, render};

/// Prints every current deployment.
pub async fn run(cli: &Cli, args: &JsonArg) -> anyhow::Result<Outcome> {
    let store = context::connect(cli).await?;
    let rows = deepnode_projections::load_deployments(store.pool())
        .await
        .context("reading deployments")?;
    if args.json {
        let list: Vec<_> = rows.iter().map(render::deployment_json).collect();
        println!("{}", serde_json::Value::from(list));
    } else {
        render::print_deployments(&rows);
    }
    Ok(Outcome::Clean)
}
