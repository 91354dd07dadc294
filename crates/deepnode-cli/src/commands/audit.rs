//! `deepnode audit`: verify the hash chain, recompute every projection from the log and compare it
//! with the stored tables, then check the log against every checkpoint it can get (`verify`'s
//! check). Exit 0 only when everything matches; otherwise print each difference (table, key,
//! column, stored vs recomputed; the broken or unreadable position; the failing checkpoint) and
//! exit 1. With `--from DIR` it audits an export: chain, fold and checkpoints (no tables).

use anyhow::Context as _;
use deepnode_projections::{audit, audit_export, AuditProgress};

use super::{verify, Outcome};
use crate::cli::{AuditArgs, Cli};
use crate::context::{self, Log};
use crate::progress;

/// Audits and prints the report.
pub async fn run(cli: &Cli, args: &AuditArgs) -> anyhow::Result<Outcome> {
    let config = context::load_config(cli)?;
    let log = context::open_log(cli, args.from.as_deref()).await?;
    let chain_bar = progress::bar("chain", 0);
    let fold_bar = progress::bar("fold", 0);
    let (c, f) = (chain_bar.clone(), fold_bar.clone());
    let show = move |p| match p {
        AuditProgress::Chain { verified, target } => {
            c.set_length(u64::try_from(target).unwrap_or(0));
            c.set_position(verified);
        }
        AuditProgress::Fold { position, target } => {
            f.set_length(u64::try_from(target).unwrap_or(0));
            f.set_position(u64::try_from(position).unwrap_or(0));
        }
        AuditProgress::Compare { table } => f.set_message(table),
    };
    let report = match &log {
        Log::Store(store) => audit(store, &config, show).await,
        Log::Export(dir) => audit_export(dir, &config, show).await,
    }
    .context("auditing")?;
    chain_bar.finish_and_clear();
    fold_bar.finish_and_clear();
    let checkpoints = verify::check(cli, &args.sources, &log).await?;
    let clean = report.is_clean() && checkpoints.ok;

    if args.json {
        let mut value = serde_json::to_value(&report).context("serialising the report")?;
        if let Some(object) = value.as_object_mut() {
            object.insert("ok".into(), clean.into());
            object.insert(
                "checkpoints".into(),
                serde_json::to_value(&checkpoints).context("serialising the report")?,
            );
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
        } else if report.tables_compared {
            println!(
                "projection deepnode_book: checkpoint {}, {} events folded",
                report.checkpoint, report.folded
            );
        } else {
            println!(
                "fold: {} events folded (an export holds no tables to compare)",
                report.folded
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
        verify::print_lines(&checkpoints);
        if let Some(why) = &checkpoints.first_failure {
            println!("checkpoints: FAILED at the {why}");
        }
        println!("{}", if clean { "audit: ok" } else { "audit: FAILED" });
    }
    Ok(if clean {
        Outcome::Clean
    } else {
        Outcome::Difference
    })
}
