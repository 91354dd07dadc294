//! `deepnode verify`: checks the log against every checkpoint it can get — the database's
//! `log_checkpoints`, the JetStream stream `DEEPNODE_CHECKPOINTS` (outside the database), and files
//! given with `--checkpoint` — so that whoever runs the database cannot rewrite or cut the log
//! unnoticed (issue 14, CONTRACT §4a, §6).
//!
//! For each checkpoint: its signature by the log's key (when public keys are given; otherwise it
//! says the signatures were not checked), then its root against the tree recomputed from the events
//! themselves, streamed from position 1. Two checkpoints of one size with different roots (a fork),
//! a checkpoint larger than the log (a cut tail), or a root the log does not hash to (a rewrite)
//! each fail the run (exit 1), naming the first failing checkpoint and the first block of 16
//! positions the stored tree shows changed, or the range of positions between the last checkpoint
//! that holds and the failing one.

use std::collections::BTreeMap;
use std::path::PathBuf;

use anyhow::{bail, Context as _};
use deepnode_domain::merkle::{self, Frontier, Hash, Subtree, Tile, TileCutter};
use deepnode_domain::note::{Checkpoint, NoteVerifier, SignedNote};
use deepnode_projections::{tree, ExportDir};
use serde::Serialize;

use super::Outcome;
use crate::cli::{CheckpointArgs, Cli, VerifyArgs, VerifyWhat};
use crate::context::{self, Log};

/// One checkpoint as found, and what was made of it.
#[derive(Debug, Serialize)]
struct Found {
    /// Where it came from: `database`, `stream #<seq>`, or a file's path.
    source: String,
    tree_size: u64,
    root: String,
    /// `verified`, `unchecked` (no public key given) or why it failed.
    signature: String,
    /// `holds`, or why the log does not match it.
    log: String,
    #[serde(skip)]
    root_hash: Hash,
    #[serde(skip)]
    failed: bool,
}

/// The run's report.
#[derive(Debug, Serialize)]
pub(crate) struct Report {
    pub(crate) ok: bool,
    head: u64,
    checkpoints: Vec<Found>,
    /// Sources that could not be read (the stream when NATS is unreachable…).
    unread: Vec<String>,
    /// The first failing checkpoint and position, when one failed.
    pub(crate) first_failure: Option<String>,
    /// Whether signatures were checked (public keys were given).
    signatures_checked: bool,
    /// For an export: whether its tiles are the tree of its events.
    #[serde(skip_serializing_if = "Option::is_none")]
    tiles: Option<String>,
}

/// Verifies and prints the report.
pub async fn run(cli: &Cli, args: &VerifyArgs) -> anyhow::Result<Outcome> {
    let log = context::open_log(cli, args.from.as_deref()).await?;
    if let Some(VerifyWhat::Receipt { file }) = &args.what {
        let Log::Store(store) = &log else {
            bail!("verify receipt proves inclusion from the database's stored tree; it does not take --from");
        };
        let keys = public_keys(&args.sources.public_key)?;
        let (found, _) = gather(cli, &args.sources, &log, &keys).await?;
        return receipt(store, file, &keys, &found).await;
    }
    let report = check(cli, &args.sources, &log).await?;
    if args.json {
        println!(
            "{}",
            serde_json::to_string(&report).context("serialising the report")?
        );
    } else {
        println!("log: {} events", report.head);
        print_lines(&report);
        match &report.first_failure {
            None => println!("verify: ok"),
            Some(why) => println!("verify: FAILED at the {why}"),
        }
    }
    Ok(if report.ok {
        Outcome::Clean
    } else {
        Outcome::Difference
    })
}

/// The whole check, `verify`'s and `audit`'s: every checkpoint to be had from `sources` and the
/// log's own (database or export), each signature against the keys given, then the log streamed
/// once against all of them — and, for an export, its tiles against the tree of its events.
pub(crate) async fn check(
    cli: &Cli,
    sources: &CheckpointArgs,
    log: &Log,
) -> anyhow::Result<Report> {
    let keys = public_keys(&sources.public_key)?;
    let (mut found, unread) = gather(cli, sources, log, &keys).await?;
    let (head, tiles) = check_against_log(log, &mut found).await?;
    // A fork: two checkpoints of one size that disagree.
    let mut by_size: BTreeMap<u64, Hash> = BTreeMap::new();
    for f in &mut found {
        if let Some(root) = by_size.insert(f.tree_size, f.root_hash) {
            if root != f.root_hash {
                f.failed = true;
                f.log = "another checkpoint of this size has another root (a fork)".into();
            }
        }
    }
    let mut first_failure = found.iter().find(|f| f.failed).map(|f| {
        format!(
            "checkpoint of size {} ({}): {}; {}",
            f.tree_size, f.source, f.signature, f.log
        )
    });
    if let Some(problem) = tiles.as_ref().filter(|t| *t != "holds") {
        first_failure.get_or_insert_with(|| format!("export's tiles: {problem}"));
    }
    Ok(Report {
        ok: first_failure.is_none(),
        head,
        checkpoints: found,
        unread,
        first_failure,
        signatures_checked: !keys.is_empty(),
        tiles,
    })
}

/// Every checkpoint to be had — the log's own (database or export), the stream's, the files' —
/// read and sorted by size, and the sources that could not be read.
async fn gather(
    cli: &Cli,
    sources: &CheckpointArgs,
    log: &Log,
    keys: &[NoteVerifier],
) -> anyhow::Result<(Vec<Found>, Vec<String>)> {
    let mut unread = Vec::new();
    let mut notes: Vec<(String, String)> = match log {
        Log::Store(store) => tree::checkpoints(store.pool())
            .await
            .context("reading log_checkpoints")?
            .into_iter()
            .map(|c| ("database".to_owned(), c.note))
            .collect(),
        Log::Export(dir) => dir
            .checkpoints()
            .context("reading the export's checkpoints")?,
    };
    match stream_notes(cli, &sources.prefix).await {
        Ok(found) => notes.extend(found),
        Err(e) => unread.push(format!("stream: {e:#}")),
    }
    for path in &sources.checkpoint {
        let note = std::fs::read_to_string(path)
            .with_context(|| format!("reading checkpoint file {}", path.display()))?;
        notes.push((path.display().to_string(), note));
    }
    let mut found: Vec<Found> = notes
        .into_iter()
        .filter_map(|(source, note)| read(source, &note, keys))
        .collect();
    found.sort_by_key(|f| f.tree_size);
    Ok((found, unread))
}

/// `deepnode verify receipt FILE`: the receipt's signature, the event it names, its inclusion under
/// the first signed checkpoint that covers it, and the outcome the reply states.
async fn receipt(
    store: &deepnode_store::EventStore,
    file: &std::path::Path,
    keys: &[NoteVerifier],
    checkpoints: &[Found],
) -> anyhow::Result<Outcome> {
    let no_keys = keys.is_empty();
    let text = std::fs::read_to_string(file)
        .with_context(|| format!("reading the receipt file {}", file.display()))?;
    let reply: serde_json::Value =
        serde_json::from_str(&text).with_context(|| format!("{} is not JSON", file.display()))?;
    let receipt = reply.get("receipt").unwrap_or(&reply);
    let position = receipt["position"]
        .as_u64()
        .filter(|p| *p > 0)
        .context("the receipt has no position")?;
    let leaf: Hash = receipt["leaf_hash"]
        .as_str()
        .and_then(|h| hex::decode(h).ok())
        .and_then(|b| Hash::try_from(b).ok())
        .context("the receipt's leaf_hash is not 32 bytes of hex")?;
    let origin = receipt["origin"]
        .as_str()
        .context("the receipt has no origin")?;
    let mut failures = Vec::new();

    // 1. Signed by the log's key.
    let statement = deepnode_domain::note::receipt_text(origin, position, &leaf);
    let signature = match receipt["signature"].as_str() {
        _ if no_keys => "unchecked (no public key given)".to_owned(),
        None => {
            failures.push("the receipt is not signed".to_owned());
            "FAILED".to_owned()
        }
        Some(sig) => match signed_by_one_of(keys, origin, |k| k.verify(&statement, sig)) {
            Ok(()) => "verified".to_owned(),
            Err(e) => {
                failures.push(e);
                "FAILED".to_owned()
            }
        },
    };
    println!("receipt: position {position}, origin {origin}, signature {signature}");

    // 2. The log's event at that position is the one signed for (its chain hash recomputed from
    //    its fields).
    let event = store
        .read_all(i64::try_from(position - 1).unwrap_or(i64::MAX), 1)
        .await
        .context("reading the log")?
        .pop();
    match &event {
        None => failures.push(format!("the log has no event at position {position}")),
        Some(event) => {
            let (recomputed, _) = tree::leaf_recomputed(event, &event.prev_hash);
            if recomputed == leaf {
                println!("event: {} {} holds", event.event_type, event.stream_id);
            } else {
                failures.push(format!(
                    "the log's event at position {position} is not the one the receipt signed"
                ));
            }
            // 3. The outcome the reply states is the one recorded.
            if let Some(ok) = reply.get("ok").and_then(serde_json::Value::as_bool) {
                let expected = if ok {
                    "ExecutionCompleted"
                } else {
                    "ExecutionFailed"
                };
                if event.event_type != expected {
                    failures.push(format!(
                        "the reply says ok: {ok} but the event is {}",
                        event.event_type
                    ));
                } else if ok && reply.get("node_id") != event.payload.to_value().get("node_id") {
                    failures.push("the reply names another node than the log".to_owned());
                } else {
                    println!("outcome: ok {ok} as recorded");
                }
            }
        }
    }

    // 4. Included under the first checkpoint that covers it and holds (signature-wise).
    match checkpoints
        .iter()
        .find(|c| c.tree_size >= position && !c.signature.starts_with("FAILED"))
    {
        None => failures.push(format!("no checkpoint covers position {position} yet")),
        Some(cp) => {
            let index = position - 1;
            let ranges = merkle::inclusion_ranges(index, cp.tree_size).unwrap_or_default();
            let proof = tree::range_hashes(store.pool(), &ranges)
                .await
                .context("reading the stored tree")?;
            match proof
                .map(|p| merkle::verify_inclusion(index, cp.tree_size, &leaf, &p, &cp.root_hash))
            {
                Some(Ok(())) => println!(
                    "inclusion: under the checkpoint of size {} ({}): holds",
                    cp.tree_size, cp.source
                ),
                Some(Err(e)) => failures.push(format!(
                    "not included under the checkpoint of size {} ({}): {e}",
                    cp.tree_size, cp.source
                )),
                None => failures.push("the stored tree cannot prove it".to_owned()),
            }
        }
    }
    if no_keys {
        println!("signatures were not checked: give the log's public key (--public-key or DEEPNODE_LOG_PUBLIC_KEYS)");
    }
    if failures.is_empty() {
        println!("verify receipt: ok");
        Ok(Outcome::Clean)
    } else {
        for f in &failures {
            println!("verify receipt: FAILED: {f}");
        }
        Ok(Outcome::Difference)
    }
}

/// The public keys given (each a key, or a file of keys one per line).
fn public_keys(given: &[String]) -> anyhow::Result<Vec<NoteVerifier>> {
    let mut keys = Vec::new();
    for item in given.iter().map(|s| s.trim()).filter(|s| !s.is_empty()) {
        let path = PathBuf::from(item);
        let text = if path.is_file() {
            std::fs::read_to_string(&path)
                .with_context(|| format!("reading public keys from {}", path.display()))?
        } else {
            item.to_owned()
        };
        for line in text.lines().map(str::trim).filter(|l| !l.is_empty()) {
            keys.push(NoteVerifier::decode(line).with_context(|| format!("public key {line:?}"))?);
        }
    }
    Ok(keys)
}

/// Every message of the checkpoints stream, as `(stream #seq, note)`.
async fn stream_notes(cli: &Cli, prefix: &str) -> anyhow::Result<Vec<(String, String)>> {
    let subjects = deepnode_bus::Subjects::with_prefix(prefix)?;
    let client = context::connect_nats(cli, "deepnode-verify").await?;
    let js = deepnode_bus::async_nats::jetstream::new(client);
    let mut stream = js
        .get_stream(subjects.checkpoints_stream())
        .await
        .with_context(|| format!("opening {}", subjects.checkpoints_stream()))?;
    let state = stream
        .info()
        .await
        .context("reading the stream's state")?
        .state
        .clone();
    let mut out = Vec::new();
    if state.messages == 0 {
        return Ok(out);
    }
    for seq in state.first_sequence..=state.last_sequence {
        if let Ok(message) = stream.get_raw_message(seq).await {
            out.push((
                format!("stream #{seq}"),
                String::from_utf8_lossy(&message.payload).into_owned(),
            ));
        }
    }
    Ok(out)
}

/// Reads one note: its checkpoint and whether the log's key signed it.
fn read(source: String, note: &str, keys: &[NoteVerifier]) -> Option<Found> {
    let (checkpoint, signed) = match SignedNote::parse(note) {
        Ok(signed) => (Checkpoint::parse(&signed.text), Some(signed)),
        Err(_) => (Checkpoint::parse(note), None),
    };
    let checkpoint = match checkpoint {
        Ok(c) => c,
        Err(e) => {
            eprintln!("verify: {source}: not a checkpoint ({e}); ignored");
            return None;
        }
    };
    let (signature, failed) = match &signed {
        _ if keys.is_empty() => ("unchecked (no public key given)".to_owned(), false),
        None => ("FAILED: unsigned".to_owned(), true),
        Some(note) => match signed_by_one_of(keys, &checkpoint.origin, |k| note.verify(k)) {
            Ok(()) => ("verified".to_owned(), false),
            Err(e) => (format!("FAILED: {e}"), true),
        },
    };
    Some(Found {
        source,
        tree_size: checkpoint.size,
        root: hex::encode(checkpoint.root),
        signature,
        log: String::new(),
        root_hash: checkpoint.root,
        failed,
    })
}

/// Whether one of the keys named `origin` signed (`check` with each): a log may have rotated its key,
/// and every key it had is given under the same name, each with its own key id.
fn signed_by_one_of(
    keys: &[NoteVerifier],
    origin: &str,
    check: impl Fn(&NoteVerifier) -> Result<(), deepnode_domain::note::NoteError>,
) -> Result<(), String> {
    let mut last = format!("no public key named {origin}");
    for key in keys.iter().filter(|k| k.name() == origin) {
        match check(key) {
            Ok(()) => return Ok(()),
            Err(e) => last = e.to_string(),
        }
    }
    Err(last)
}

/// Streams the log once, recomputing the tree, and checks each checkpoint's root at its size
/// (`found` sorted by size). Returns the log's head and, for an export, what became of its tiles.
async fn check_against_log(
    log: &Log,
    found: &mut [Found],
) -> anyhow::Result<(u64, Option<String>)> {
    let mut frontier = Frontier::new();
    let mut next = 0usize;
    let mut last_good = 0u64;
    // The first block of stored leaves whose hash the log no longer gives, as positions.
    let mut changed: Option<(u64, u64)> = None;
    // An export's tiles, cut again from the recomputed tree and compared.
    let mut tiles = match log {
        Log::Export(dir) => Some(TileCheck::new(dir)),
        Log::Store(_) => None,
    };
    // The chain starts from 32 zero bytes (`log_head` of an empty log).
    let mut prev = vec![0u8; 32];
    let mut after = 0i64;
    let mut pages = log.source().pages(0, None);
    loop {
        // Checkpoints end exactly at a size: each is checked as the tree reaches it (an empty
        // tree's before the first event).
        while next < found.len() && found[next].tree_size <= frontier.size() {
            let f = &mut found[next];
            let holds = f.tree_size == frontier.size() && frontier.root() == f.root_hash;
            judge(f, holds, changed, &mut last_good);
            next += 1;
        }
        let Some(page) = pages.recv().await else {
            break;
        };
        let page = page.context("reading the log")?;
        let Some(last) = page.last() else { continue };
        let stored = match log {
            Log::Store(store) => stored_blocks(store.pool(), after, last.global_position).await?,
            Log::Export(_) => BTreeMap::new(),
        };
        after = last.global_position;
        for event in &page {
            // The leaf from the event's own fields, never from the hash stored beside them.
            let (leaf, hash) = tree::leaf_recomputed(event, &prev);
            prev = hash.to_vec();
            let completed = frontier.push(leaf);
            for (subtree, hash) in &completed {
                let block = subtree.level == tree::LOWEST_STORED_LEVEL;
                if block
                    && changed.is_none()
                    && stored.get(&subtree.index).is_some_and(|s| s != hash)
                {
                    let first = (subtree.index << subtree.level) + 1;
                    changed = Some((first, first + (1 << subtree.level) - 1));
                }
            }
            if let Some(tiles) = &mut tiles {
                tiles.push(&completed)?;
            }
            while next < found.len() && found[next].tree_size == frontier.size() {
                let f = &mut found[next];
                let holds = frontier.root() == f.root_hash;
                judge(f, holds, changed, &mut last_good);
                next += 1;
            }
        }
    }
    let head = frontier.size();
    for f in &mut found[next..] {
        f.failed = true;
        f.log = format!(
            "it counts {} events but the log holds {head}: positions {}..={} are gone",
            f.tree_size,
            head + 1,
            f.tree_size
        );
    }
    let tiles = match tiles {
        Some(t) => Some(t.finish()?),
        None => None,
    };
    Ok((head, tiles))
}

/// An export's tiles against the tree recomputed from its events: the first missing or differing
/// tile, else `holds`.
struct TileCheck<'a> {
    dir: &'a ExportDir,
    cutter: TileCutter,
    problem: Option<String>,
}

impl<'a> TileCheck<'a> {
    fn new(dir: &'a ExportDir) -> Self {
        TileCheck {
            dir,
            cutter: TileCutter::new(),
            problem: None,
        }
    }

    fn push(&mut self, completed: &[(Subtree, Hash)]) -> anyhow::Result<()> {
        for tile in self.cutter.push(completed) {
            self.compare(&tile)?;
        }
        Ok(())
    }

    fn compare(&mut self, tile: &Tile) -> anyhow::Result<()> {
        if self.problem.is_some() {
            return Ok(());
        }
        let path = tile.path();
        self.problem = match self.dir.tile(&path).context("reading a tile")? {
            None => Some(format!("{path} is missing")),
            Some(bytes) if bytes != tile.bytes() => {
                Some(format!("{path} is not the tree of the events"))
            }
            Some(_) => None,
        };
        Ok(())
    }

    fn finish(mut self) -> anyhow::Result<String> {
        for tile in self.cutter.partial() {
            self.compare(&tile)?;
        }
        Ok(self.problem.unwrap_or_else(|| "holds".to_owned()))
    }
}

/// Records whether checkpoint `f` holds; if not, where the log changed: the first block of stored
/// leaves it no longer hashes to, else the positions since the last checkpoint that held.
fn judge(f: &mut Found, holds: bool, changed: Option<(u64, u64)>, last_good: &mut u64) {
    if holds {
        f.log = "holds".into();
        *last_good = (*last_good).max(f.tree_size);
        return;
    }
    f.failed = true;
    f.log = match changed {
        Some((a, b)) if a <= f.tree_size => {
            format!("the log differs from it: one of positions {a}..={b} was changed")
        }
        _ => format!(
            "the log differs from it somewhere in positions {}..={}",
            *last_good + 1,
            f.tree_size
        ),
    };
}

/// The stored hashes of the blocks of leaves (subtrees at the lowest stored level) that lie in
/// positions `(after, to]`, by block index.
async fn stored_blocks(
    pool: &sqlx::PgPool,
    after: i64,
    to: i64,
) -> anyhow::Result<BTreeMap<u64, Hash>> {
    let level = i16::try_from(tree::LOWEST_STORED_LEVEL).unwrap_or(i16::MAX);
    let width = 1i64 << tree::LOWEST_STORED_LEVEL;
    let rows: Vec<(i64, Vec<u8>)> = sqlx::query_as(
        "SELECT idx, hash FROM merkle_subtrees WHERE level = $1 AND idx >= $2 AND idx <= $3",
    )
    .bind(level)
    .bind(after / width)
    .bind(to / width)
    .fetch_all(pool)
    .await
    .context("reading the stored tree")?;
    Ok(rows
        .into_iter()
        .filter_map(|(i, h)| Some((u64::try_from(i).ok()?, Hash::try_from(h).ok()?)))
        .collect())
}

/// The report's lines, between the head line and the verdict (also printed by `audit`).
pub(crate) fn print_lines(report: &Report) {
    for source in &report.unread {
        println!("not read: {source}");
    }
    if report.checkpoints.is_empty() {
        println!("no checkpoint found: nothing to verify against");
    }
    for f in &report.checkpoints {
        println!(
            "checkpoint {:>10} from {:<14} signature {:<32} log {}",
            f.tree_size, f.source, f.signature, f.log
        );
    }
    if let Some(tiles) = &report.tiles {
        println!("tiles: {tiles}");
    }
    if !report.signatures_checked {
        println!("signatures were not checked: give the log's public key (--public-key or DEEPNODE_LOG_PUBLIC_KEYS)");
    }
}
