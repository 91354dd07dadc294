//! `deepnode nodes`: the stored `node_reputation` table.

use anyhow::Context as _;

use super::Outcome;
use crate::cli::{Cli, JsonArg};
use crate::{context, render};

/// Prints every node.
pub async fn run(cli: &Cli, args: &JsonArg) -> anyhow::Result<Outcome> {
    let store = context::connect(cli).await?;
    let rows = deepnode_projections::load_nodes(store.pool())
        .await
        .context("reading node_reputation")?;
    if args.json {
        let list: Vec<_> = rows.iter().map(render::node_json).collect();
        println!("{}", serde_json::Value::from(list));
    } else {
        render::print_nodes(&rows);
    }
    Ok(Outcome::Clean)
}
