//! The `tlog` benchmark: issue 14's figures for the log's Merkle tree. It fills a fresh log through
//! `EventStore::append` (real positions and hash chain), builds the tree with the projection the
//! reputation service runs, takes a signed checkpoint, then measures
//!
//! 1. inclusion and consistency proofs against the checkpoint's size, each read from the stored
//!    tree as `cmd.log.proof` reads it (`tree::range_hashes`) — in process, so the database part of
//!    the request, without NATS's ~0.2 ms round trip — every proof checked against the root;
//! 2. `deepnode verify` over the whole log: the release binary as its own process, as an auditor
//!    runs it (every chain hash and the tree recomputed from the events' fields);
//! 3. one receipt signature (`NoteSigner::signature` over `receipt_text`), in process: what the
//!    scheduler adds to a `cmd.exec` reply.

use std::path::Path;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use deepnode_domain::merkle;
use deepnode_domain::note::{receipt_text, NoteSigner};
use deepnode_projections::tree::{self, Cadence, TreeProjection};
use deepnode_store::{EventStore, ProjectionRunner};
use rand::{Rng, SeedableRng};

use crate::db::{load_average, BenchDb, Facts};
use crate::read::fill;
use crate::report::{new_histogram, record, thousands};
use crate::{ReadArgs, TlogArgs};

/// Fills, builds, measures; returns the Markdown report.
pub async fn run(db: &BenchDb, args: &TlogArgs, bin_dir: &Path) -> Result<String> {
    let load_start = load_average();
    let mut admin = db.connect().await?;
    let facts = Facts::gather(&mut admin).await?;
    let store = EventStore::connect(&db.url, 4)
        .await
        .with_context(|| format!("opening the event store on {}", db.name))?;
    let pool = store.pool().clone();

    let started = Instant::now();
    let fill_args = ReadArgs {
        events: args.events,
        fill_batch: 500,
        fill_tasks: 4,
        payload_bytes: args.payload_bytes,
        sample_ms: 10,
    };
    fill(&store, &fill_args).await?;
    let fill_secs = started.elapsed().as_secs_f64();
    let head = store.head_position().await?;

    let started = Instant::now();
    ProjectionRunner::new(pool.clone(), TreeProjection::new())
        .with_batch(5_000)
        .run_to_head()
        .await
        .context("building the tree")?;
    let tree_secs = started.elapsed().as_secs_f64();
    let subtrees: i64 = sqlx::query_scalar("SELECT count(*) FROM merkle_subtrees")
        .fetch_one(&pool)
        .await?;

    let key = NoteSigner::from_seed("deepnode.bench/log", [7; 32])?;
    let cadence = Cadence {
        every_events: 1,
        every: chrono::Duration::zero(),
    };
    let checkpoint =
        tree::take_checkpoint(&pool, key.name(), Some(&key), cadence, chrono::Utc::now())
            .await?
            .context("no checkpoint was taken")?;
    let size = checkpoint.tree_size;
    if i64::try_from(size)? != head {
        bail!("the checkpoint counts {size} events, the log {head}");
    }

    // 1. Proofs.
    let mut rng = rand::rngs::StdRng::seed_from_u64(14);
    let mut inclusion = new_histogram()?;
    for _ in 0..args.proofs {
        let index = rng.gen_range(0..size);
        let ranges = merkle::inclusion_ranges(index, size).context("inclusion ranges")?;
        let t = Instant::now();
        let proof = tree::range_hashes(&pool, &ranges)
            .await?
            .context("the tree cannot prove it")?;
        record(&mut inclusion, t.elapsed());
        let event = store
            .read_all(i64::try_from(index)?, 1)
            .await?
            .pop()
            .context("no event")?;
        merkle::verify_inclusion(
            index,
            size,
            &tree::leaf_of(&event),
            &proof,
            &checkpoint.root,
        )
        .context("an inclusion proof does not verify")?;
    }
    let mut consistency = new_histogram()?;
    for i in 0..args.proofs {
        let first = rng.gen_range(1..size);
        let ranges = merkle::consistency_ranges(first, size).context("consistency ranges")?;
        let t = Instant::now();
        let proof = tree::range_hashes(&pool, &ranges)
            .await?
            .context("the tree cannot prove it")?;
        record(&mut consistency, t.elapsed());
        // Checking needs the older root: for every tenth proof (outside the timing).
        if i % 10 == 0 {
            let old_root = tree::root_at(&pool, first).await?.context("no old root")?;
            merkle::verify_consistency(first, size, &old_root, &checkpoint.root, &proof)
                .context("a consistency proof does not verify")?;
        }
    }

    // 2. `deepnode verify`, as its own process.
    let started = Instant::now();
    let out = tokio::process::Command::new(bin_dir.join("deepnode"))
        // A prefix of its own: no other log's checkpoints on a shared NATS.
        .args(["verify", "--public-key", &key.verifier().encode()])
        .args(["--prefix", deepnode_bus::Subjects::random().prefix()])
        .env("DATABASE_URL", &db.url)
        .output()
        .await
        .context("running deepnode verify")?;
    let verify_secs = started.elapsed().as_secs_f64();
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        bail!(
            "deepnode verify failed:\n{text}{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    // 3. A receipt's signature.
    let leaf = merkle::leaf_hash(b"receipt");
    let mut ns = Vec::with_capacity(10_000);
    for position in 0..10_000u64 {
        let t = Instant::now();
        std::hint::black_box(key.signature(&receipt_text(key.name(), position, &leaf)));
        ns.push(t.elapsed().as_nanos());
    }
    ns.sort_unstable();
    let sign_p50_us = ns[ns.len() / 2] as f64 / 1_000.0;
    let sign_p99_us = ns[ns.len() * 99 / 100] as f64 / 1_000.0;

    let ms = |h: &hdrhistogram::Histogram<u64>, q: f64| h.value_at_quantile(q) as f64 / 1_000.0;
    let mut md = String::new();
    md.push_str("# deepnode-bench tlog\n\n");
    md.push_str(&facts.markdown(&load_start));
    md.push_str(&format!(
        "\n- log: {} events filled through `EventStore::append` in {fill_secs:.1} s ({} events/s)\n",
        thousands(head as f64),
        thousands(head as f64 / fill_secs)
    ));
    md.push_str(&format!(
        "- tree built from the log by `TreeProjection` (5,000-event batches): {tree_secs:.1} s ({} events/s), {} stored subtrees\n",
        thousands(head as f64 / tree_secs),
        thousands(subtrees as f64)
    ));
    md.push_str(&format!(
        "- {} inclusion proofs at tree size {}: p50 {:.3} ms, p99 {:.3} ms, max {:.3} ms (in process: the stored-tree read of `cmd.log.proof`; each verified)\n",
        args.proofs,
        thousands(size as f64),
        ms(&inclusion, 0.5),
        ms(&inclusion, 0.99),
        inclusion.max() as f64 / 1_000.0
    ));
    md.push_str(&format!(
        "- {} consistency proofs to tree size {}: p50 {:.3} ms, p99 {:.3} ms, max {:.3} ms (same; every tenth verified)\n",
        args.proofs,
        thousands(size as f64),
        ms(&consistency, 0.5),
        ms(&consistency, 0.99),
        consistency.max() as f64 / 1_000.0
    ));
    md.push_str(&format!(
        "- `deepnode verify` (release binary, own process) over the whole log: {verify_secs:.1} s = {} events/s, exit 0 (`{}`)\n",
        thousands(head as f64 / verify_secs),
        text.lines().last().unwrap_or("")
    ));
    md.push_str(&format!(
        "- one receipt signature (Ed25519 over `receipt_text`, in process): p50 {sign_p50_us:.1} µs, p99 {sign_p99_us:.1} µs\n"
    ));
    Ok(md)
}
