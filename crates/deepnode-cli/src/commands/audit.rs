//! `deepnode audit`: verify the hash chain, recompute every projection from the log and compare it
//! with the stored tables. Exit 0 only when everything matches; otherwise print each difference
//! (table, key, column, stored vs recomputed; or the broken or unreadable position) and exit 1.

use anyhow::Context as _;
use deepnode_projections::{audit, AuditProgress};

use super::Outcome;
use crate::cli::{AuditArgs, Cli};
use crate::{context, progress};

/// Audits and prints the report.
pub async fn run(cli: &Cli, args: &AuditArgs) -> anyhow::Result<Outcome> {
    let config = context::load_config(cli)?;
    let store = context::connect(cli).await?;
    let chain_bar = progress::bar("chain", 0);
    let fold_bar = progress::bar("fold", 0);
    let (c, f) = (chain_bar.clone(), fold_bar.clone());
    let report = audit(&store, &config, move |p| match p {
        AuditProgress::Chain { verified, target } => {
            c.set_length(u64::try_from(target).unwrap_or(0));
            c.set_position(verified);
        }
        AuditProgress::Fold { position, target } => {
            f.set_length(u64::try_from(target).unwrap_or(0));
            f.set_position(u64::try_from(position).unwrap_or(0));
        }
        AuditProgress::Compare { table } => f.set_message(table),
    })
    .await
    .context("auditing")?;
    chain_bar.finish_and_clear();
    fold_bar.finish_and_clear();

    if args.json {
        let mut value = serde_json::to_value(&report).context("serialising the report")?;
        if let Some(object) = value.as_object_mut() {
            object.insert("ok".into(), report.is_clean().into());
        }
        println!("{value}");
    } else {
        match &report.chain.first_break {
            None => println!(
                "hash chain: ok ({} events, head {})",
                report.chain.verified, report.head
            ),
            Some(b) => println!(
                "hash chain: BROKEN at position {} ({:?}; {} events verified before it)",
                b.position, b.kind, report.chain.verified
            ),
        }
        if let Some(u) = &report.unfoldable {
            println!(
                "fold: event at position {} cannot be folded: {}",
                u.position, u.reason
            );
        } else {
            println!(
                "projection deepnode_book: checkpoint {}, {} events folded",
                report.checkpoint, report.folded
            );
        }
        for d in &report.differences {
            println!("difference: {d}");
        }
        if report.differences_total > report.differences.len() as u64 {
            println!(
                "... and {} more differences",
                report.differences_total - report.differences.len() as u64
            );
        }
        println!(
            "{}",
            if report.is_clean() {
                "audit: ok"
            } else {
                "audit: FAILED"
            }
        );
    }
    Ok(if report.is_clean() {
        Outcome::Clean
    } else {
        Outcome::Difference
    })
}
