//! The log as files, for an audit without database access (issue 14, docs/VERIFY.md "An export"):
//! [`write`] writes the events, the stored checkpoints and the Merkle tree as C2SP tlog-tiles into a
//! directory; [`ExportDir`] reads them back page by page, so `replay`, `audit` and `verify` run on
//! an export exactly as on the database ([`LogSource`]).
//!
//! Nothing in an export is trusted by its reader: the tiles are computed here from the events'
//! stored hashes for readers who want proofs without the events, and `verify --from` recomputes
//! every hash from the events' fields and checks the tiles against that.
//!
//! ```text
//! DIR/manifest.json                       written last: its presence marks a complete export
//! DIR/events/<first position>.jsonl        100,000 events per file, one per line in the bus's JSON form
//!                                         (`deepnode_domain::wire`)
//! DIR/checkpoints/<tree size>.note        each stored checkpoint's signed note
//! DIR/tile/<L>/<N>[.p/<W>]                the tree, C2SP tlog-tiles
//! ```

use std::io::{BufRead, BufWriter, Write};
use std::path::{Path, PathBuf};

use chrono::{DateTime, Utc};
use deepnode_domain::merkle::{Frontier, TileCutter};
use deepnode_domain::wire;
use deepnode_store::{EventStore, RecordedEvent};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

use crate::{tree, Error};

/// The format named in every manifest this code writes.
pub const FORMAT: &str = "deepnode-export/1";

/// Events per `events/*.jsonl` file.
pub const EVENTS_PER_FILE: i64 = 100_000;

/// Events per page handed to a reader.
const PAGE: usize = 2_000;

/// `manifest.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    pub format: String,
    /// Events exported: positions `1..=events`.
    pub events: i64,
    /// The stored hash of the last event, hex (of 32 zero bytes for an empty log).
    pub head_hash: String,
    /// Checkpoint notes exported.
    pub checkpoints: usize,
    /// Leaves of the tree in `tile/` (the events).
    pub tree_size: u64,
    pub exported_at: DateTime<Utc>,
}

fn export_error(path: &Path, e: impl std::fmt::Display) -> Error {
    Error::Export(format!("{}: {e}", path.display()))
}

/// The file holding position `position`.
fn events_file(dir: &Path, position: i64) -> PathBuf {
    let first = (position - 1) / EVENTS_PER_FILE * EVENTS_PER_FILE + 1;
    dir.join("events").join(format!("{first:012}.jsonl"))
}

/// Writes the log as it is now (up to its head when called) into `dir` (created; it must be
/// empty or absent), calling `progress(position, head)` after each page. Returns the manifest.
pub async fn write(
    store: &EventStore,
    dir: &Path,
    mut progress: impl FnMut(i64, i64),
) -> Result<Manifest, Error> {
    if dir.exists()
        && std::fs::read_dir(dir)
            .map_err(|e| export_error(dir, e))?
            .next()
            .is_some()
    {
        return Err(export_error(
            dir,
            "not empty: an export goes into a new directory",
        ));
    }
    for sub in ["events", "checkpoints", "tile"] {
        std::fs::create_dir_all(dir.join(sub)).map_err(|e| export_error(dir, e))?;
    }
    let head = store.head_position().await?;
    let (mut frontier, mut cutter) = (Frontier::new(), TileCutter::new());
    let mut out: Option<(PathBuf, BufWriter<std::fs::File>)> = None;
    let mut head_hash = vec![0u8; 32];
    let mut pages = store.stream_all(0, Some(head));
    while let Some(page) = pages.recv().await {
        for event in page? {
            let path = events_file(dir, event.global_position);
            if out.as_ref().is_none_or(|(p, _)| *p != path) {
                if let Some((p, mut w)) = out.take() {
                    w.flush().map_err(|e| export_error(&p, e))?;
                }
                let file = std::fs::File::create(&path).map_err(|e| export_error(&path, e))?;
                out = Some((path, BufWriter::new(file)));
            }
            if let Some((p, w)) = out.as_mut() {
                w.write_all(&wire::to_bytes(&event))
                    .and_then(|()| w.write_all(b"\n"))
                    .map_err(|e| export_error(p, e))?;
            }
            for tile in cutter.push(&frontier.push(tree::leaf_of(&event))) {
                write_tile(dir, &tile)?;
            }
            head_hash = event.hash;
            progress(event.global_position, head);
        }
    }
    if let Some((p, mut w)) = out.take() {
        w.flush().map_err(|e| export_error(&p, e))?;
    }
    for tile in cutter.partial() {
        write_tile(dir, &tile)?;
    }
    let checkpoints: Vec<_> = tree::checkpoints(store.pool())
        .await?
        .into_iter()
        .filter(|c| i64::try_from(c.tree_size).is_ok_and(|s| s <= head))
        .collect();
    for cp in &checkpoints {
        let path = dir
            .join("checkpoints")
            .join(format!("{}.note", cp.tree_size));
        std::fs::write(&path, &cp.note).map_err(|e| export_error(&path, e))?;
    }
    let manifest = Manifest {
        format: FORMAT.to_owned(),
        events: head,
        head_hash: hex::encode(head_hash),
        checkpoints: checkpoints.len(),
        tree_size: frontier.size(),
        exported_at: Utc::now(),
    };
    let path = dir.join("manifest.json");
    let text = serde_json::to_string_pretty(&manifest).map_err(|e| export_error(&path, e))?;
    std::fs::write(&path, text).map_err(|e| export_error(&path, e))?;
    Ok(manifest)
}

fn write_tile(dir: &Path, tile: &deepnode_domain::merkle::Tile) -> Result<(), Error> {
    let path = dir.join(tile.path());
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(|e| export_error(parent, e))?;
    }
    std::fs::write(&path, tile.bytes()).map_err(|e| export_error(&path, e))
}

/// An export, opened for reading.
#[derive(Debug, Clone)]
pub struct ExportDir {
    root: PathBuf,
    manifest: Manifest,
}

impl ExportDir {
    /// Opens `dir`: its manifest must be there and of [`FORMAT`].
    pub fn open(dir: &Path) -> Result<ExportDir, Error> {
        let path = dir.join("manifest.json");
        let text = std::fs::read_to_string(&path)
            .map_err(|e| export_error(&path, format!("{e} (not a complete export?)")))?;
        let manifest: Manifest = serde_json::from_str(&text).map_err(|e| export_error(&path, e))?;
        if manifest.format != FORMAT {
            return Err(export_error(
                &path,
                format!("format {:?}, this binary reads {FORMAT:?}", manifest.format),
            ));
        }
        Ok(ExportDir {
            root: dir.to_owned(),
            manifest,
        })
    }

    /// The manifest.
    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    /// The directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The exported events after `after` up to `until` (inclusive; `None`: all), in pages, read
    /// by a background thread: flat memory whatever the export's size. A line that does not read
    /// as an event ends the pages with an error naming its file and line.
    pub fn pages(
        &self,
        after: i64,
        until: Option<i64>,
    ) -> mpsc::Receiver<Result<Vec<RecordedEvent>, Error>> {
        let (tx, rx) = mpsc::channel(4);
        let (root, last) = (self.root.clone(), self.manifest.events);
        let until = until.map_or(last, |u| u.min(last));
        tokio::task::spawn_blocking(move || {
            if let Err(e) = read_pages(&root, after, until, &tx) {
                let _ = tx.blocking_send(Err(e));
            }
        });
        rx
    }

    /// Every checkpoint note in `checkpoints/`, as `(path, note)`, smallest tree first.
    pub fn checkpoints(&self) -> Result<Vec<(String, String)>, Error> {
        let dir = self.root.join("checkpoints");
        let mut found = Vec::new();
        for entry in std::fs::read_dir(&dir).map_err(|e| export_error(&dir, e))? {
            let path = entry.map_err(|e| export_error(&dir, e))?.path();
            let size: Option<u64> = path
                .file_stem()
                .and_then(|s| s.to_str())
                .and_then(|s| s.parse().ok());
            if let Some(size) = size {
                let note = std::fs::read_to_string(&path).map_err(|e| export_error(&path, e))?;
                found.push((size, path.display().to_string(), note));
            }
        }
        found.sort_by_key(|(size, _, _)| *size);
        Ok(found.into_iter().map(|(_, p, n)| (p, n)).collect())
    }

    /// The contents of the tile at `path` (as [`deepnode_domain::merkle::Tile::path`] names it),
    /// `None` if the export has no such file.
    pub fn tile(&self, path: &str) -> Result<Option<Vec<u8>>, Error> {
        let file = self.root.join(path);
        match std::fs::read(&file) {
            Ok(bytes) => Ok(Some(bytes)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(export_error(&file, e)),
        }
    }
}

fn read_pages(
    root: &Path,
    after: i64,
    until: i64,
    tx: &mpsc::Sender<Result<Vec<RecordedEvent>, Error>>,
) -> Result<(), Error> {
    let mut next = after + 1;
    let mut page = Vec::with_capacity(PAGE);
    while next <= until {
        let path = events_file(root, next);
        let file = std::fs::File::open(&path).map_err(|e| export_error(&path, e))?;
        let mut lines = std::io::BufReader::new(file).lines().enumerate();
        let before = next;
        while next <= until {
            let Some((n, line)) = lines.next() else { break };
            let line = line.map_err(|e| export_error(&path, e))?;
            let event = wire::from_slice(line.as_bytes())
                .map_err(|e| export_error(&path, format!("line {}: {e}", n + 1)))?;
            if event.global_position < next {
                continue;
            }
            next = event.global_position + 1;
            page.push(event);
            if page.len() == PAGE && tx.blocking_send(Ok(std::mem::take(&mut page))).is_err() {
                return Ok(());
            }
        }
        if next == before {
            return Err(export_error(&path, format!("position {next} is missing")));
        }
    }
    if !page.is_empty() {
        let _ = tx.blocking_send(Ok(page));
    }
    Ok(())
}

/// Where a replay, audit or verification reads the log from.
#[derive(Clone, Copy)]
pub enum LogSource<'a> {
    /// The database.
    Store(&'a EventStore),
    /// An export's files.
    Export(&'a ExportDir),
}

impl LogSource<'_> {
    /// The last position there is.
    pub async fn head(&self) -> Result<i64, Error> {
        match self {
            LogSource::Store(store) => Ok(store.head_position().await?),
            LogSource::Export(dir) => Ok(dir.manifest.events),
        }
    }

    /// The events after `after` up to `until` (inclusive; `None`: the head), in pages.
    pub fn pages(
        &self,
        after: i64,
        until: Option<i64>,
    ) -> mpsc::Receiver<Result<Vec<RecordedEvent>, Error>> {
        match self {
            LogSource::Store(store) => {
                let mut pages = store.stream_all(after, until);
                let (tx, rx) = mpsc::channel(1);
                tokio::spawn(async move {
                    while let Some(page) = pages.recv().await {
                        if tx.send(page.map_err(Error::from)).await.is_err() {
                            return;
                        }
                    }
                });
                rx
            }
            LogSource::Export(dir) => dir.pages(after, until),
        }
    }
}
