//! `deepnode export DIR`: the log, its checkpoints and its Merkle tree as files
//! (`deepnode_projections::export`, docs/VERIFY.md), for `replay`, `audit` and `verify --from DIR`
//! without database access.

use anyhow::Context as _;
use deepnode_projections::export;

use super::Outcome;
use crate::cli::{Cli, ExportArgs};
use crate::{context, progress};

/// Exports and prints what was written.
pub async fn run(cli: &Cli, args: &ExportArgs) -> anyhow::Result<Outcome> {
    let store = context::connect(cli).await?;
    let bar = progress::bar("export", 0);
    let manifest = export::write(&store, &args.dir, |position, head| {
        bar.set_length(u64::try_from(head).unwrap_or(0));
        bar.set_position(u64::try_from(position).unwrap_or(0));
    })
    .await
    .with_context(|| format!("exporting to {}", args.dir.display()))?;
    bar.finish_and_clear();
    println!(
        "exported {} events, {} checkpoints and the tree of {} leaves to {}",
        manifest.events,
        manifest.checkpoints,
        manifest.tree_size,
        args.dir.display()
    );
    Ok(Outcome::Clean)
}
