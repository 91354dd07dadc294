//! `deepnode replay`: fold the log up to a position or an instant and print node reputation and
//! deployments as they were then. An event this binary cannot fold stops the replay with exit 1 and
//! its position — never a silently different past.

use deepnode_projections::{replay_from, Error, Until};
use serde_json::json;

use super::Outcome;
use crate::cli::{Cli, ReplayArgs};
use crate::{context, progress, render};

/// Replays and prints.
pub async fn run(cli: &Cli, args: &ReplayArgs) -> anyhow::Result<Outcome> {
    let config = context::load_config(cli)?;
    let log = context::open_log(cli, args.from.as_deref()).await?;
    let until = match (args.until_position, args.until_time) {
        (Some(position), _) => Until::Position(position),
        (None, Some(t)) => Until::Time(t.with_timezone(&chrono::Utc)),
        (None, None) => Until::Head,
    };
    let bar = progress::bar("replay", 0);
    let result = replay_from(log.source(), until, &config, |p| {
        bar.set_length(u64::try_from(p.target).unwrap_or(0));
        bar.set_position(u64::try_from(p.position).unwrap_or(0));
    })
    .await;
    bar.finish_and_clear();
    let book = match result {
        Ok(book) => book,
        Err(e @ Error::Decode { .. }) => {
            eprintln!("deepnode: replay stopped: {e}");
            return Ok(Outcome::Difference);
        }
        Err(e) => return Err(anyhow::Error::new(e).context("replaying the log")),
    };
    let nodes: Vec<_> = book.node_rows().collect();
    let deployments: Vec<_> = book.deployment_rows().collect();
    if args.json {
        let out = json!({
            "position": book.last_position(),
            "nodes": nodes.iter().map(render::node_json).collect::<Vec<_>>(),
            "deployments": deployments.iter().map(render::deployment_json).collect::<Vec<_>>(),
        });
        println!("{out}");
    } else {
        println!("state as of position {}", book.last_position());
        render::print_nodes(&nodes);
        println!();
        render::print_deployments(&deployments);
    }
    Ok(Outcome::Clean)
}
