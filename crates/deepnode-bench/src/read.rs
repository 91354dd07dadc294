//! The `read` benchmark: fill a fresh log through `EventStore::append` (so positions, versions and the
//! hash chain are the real thing), then time `stream_all(0, None)` over every event and, for
//! comparison, the paged `read_all` loop, while a sampler thread watches the process's resident memory.
//!
//! Memory is reported from /proc/self/status: the peak (VmHWM, reset through /proc/self/clear_refs
//! just before each read where the kernel allows it) and VmRSS sampled every few milliseconds, with
//! the resident size at each quarter of the read, which is what shows whether memory stays flat.
//! It does not verify the chain (that is `verify_chain`'s job); it checks count and contiguity.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use deepnode_store::{EventStore, ExpectedVersion, RecordedEvent, StreamId};

use crate::append::new_event;
use crate::db::{load_average, BenchDb, Facts};
use crate::report::thousands;
use crate::ReadArgs;

/// Page size of the `read_all` loop (the same as `stream_all`'s pages).
const PAGE: i64 = 1_000;

/// Fills the log, reads it back and returns the Markdown report.
pub async fn run(db: &BenchDb, args: &ReadArgs) -> Result<String> {
    if args.events == 0 || args.fill_batch == 0 || args.fill_tasks == 0 {
        bail!("--events, --fill-batch and --fill-tasks must be positive");
    }
    let load_start = load_average();
    let mut admin = db.connect().await?;
    let facts = Facts::gather(&mut admin).await?;
    let store = EventStore::connect(&db.url, 4)
        .await
        .with_context(|| format!("opening the event store on {}", db.name))?;

    let fill_started = Instant::now();
    fill(&store, args).await?;
    let fill_secs = fill_started.elapsed().as_secs_f64();
    let head = store
        .head_position()
        .await
        .context("reading the log head")?;
    eprintln!(
        "filled {head} events in {fill_secs:.1} s ({:.0} events/s)",
        head as f64 / fill_secs
    );
    let table_size: String =
        sqlx::query_scalar("SELECT pg_size_pretty(pg_total_relation_size('events'))")
            .fetch_one(&mut admin)
            .await
            .context("measuring the events table")?;
    drop(admin);

    let streamed = measure(head, args.sample_ms, stream_all(&store, head)).await?;
    eprintln!("stream_all: {:.0} events/s", streamed.rate());
    let paged = measure(head, args.sample_ms, paged_read_all(&store, head)).await?;
    eprintln!("read_all pages: {:.0} events/s", paged.rate());

    let mut out = String::new();
    out.push_str(&format!(
        "### read — {} events (payload ≈ {} B JSON), events table {table_size}\n\n",
        thousands(head as f64),
        args.payload_bytes
    ));
    out.push_str(&facts.markdown(&load_start));
    out.push_str(&format!(
        "- fill through `EventStore::append`: {} tasks × {}-event appends, {:.1} s = {} events/s\n\n",
        args.fill_tasks,
        args.fill_batch,
        fill_secs,
        thousands(head as f64 / fill_secs)
    ));
    out.push_str("| read | events | seconds | events/s | RSS before MiB | RSS at 25/50/75/100 % MiB | peak RSS during read MiB | checksum |\n|---|---:|---:|---:|---:|---|---:|---|\n");
    for (label, m) in [
        ("`stream_all(0, None)`", &streamed),
        ("`read_all` loop, pages of 1000", &paged),
    ] {
        out.push_str(&format!(
            "| {label} | {} | {:.2} | {} | {:.1} | {} | {:.1} | {:016x} |\n",
            thousands(m.events as f64),
            m.elapsed.as_secs_f64(),
            thousands(m.rate()),
            mib(m.rss_before),
            m.rss_quarters
                .iter()
                .map(|&kb| format!("{:.1}", mib(kb)))
                .collect::<Vec<_>>()
                .join(" / "),
            mib(m.peak_kb),
            m.checksum,
        ));
    }
    Ok(out)
}

/// Appends `args.events` events: `fill_tasks` tasks, each appending `fill_batch` events at a time to
/// streams of its own.
pub(crate) async fn fill(store: &EventStore, args: &ReadArgs) -> Result<()> {
    let appends = args.events.div_ceil(args.fill_batch as u64);
    let next = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let mut handles = Vec::with_capacity(args.fill_tasks);
    for task in 0..args.fill_tasks {
        let store = store.clone();
        let next = Arc::clone(&next);
        let (total, batch, payload_bytes) =
            (args.events, args.fill_batch as u64, args.payload_bytes);
        handles.push(tokio::spawn(async move {
            let stream = StreamId::parse(&format!("fill-{task}")).context("fill stream id")?;
            loop {
                let n = next.fetch_add(1, Ordering::Relaxed);
                if n >= appends {
                    return anyhow::Ok(());
                }
                let first = n * batch;
                let count = batch.min(total - first);
                let events = (first..first + count)
                    .map(|seq| new_event(seq, task, payload_bytes))
                    .collect();
                store
                    .append(&stream, ExpectedVersion::Any, events)
                    .await
                    .context("filling the log")?;
                // Every 200th append (100,000 events at the default batch) reports progress.
                if n > 0 && n % 200 < 1 {
                    let done = n * batch;
                    eprintln!(
                        "  fill: {done} events, {:.0}/s",
                        done as f64 / started.elapsed().as_secs_f64()
                    );
                }
            }
        }));
    }
    for handle in handles {
        handle.await.context("a fill task panicked")??;
    }
    Ok(())
}

/// What one read measured.
struct ReadOutcome {
    events: u64,
    elapsed: Duration,
    checksum: u64,
    rss_before: u64,
    rss_quarters: Vec<u64>,
    peak_kb: u64,
}

impl ReadOutcome {
    fn rate(&self) -> f64 {
        self.events as f64 / self.elapsed.as_secs_f64().max(f64::MIN_POSITIVE)
    }
}

/// Folds every event into a running count and checksum, checking positions are 1, 2, 3, …
#[derive(Default)]
struct Consumer {
    count: u64,
    checksum: u64,
    last_position: i64,
}

impl Consumer {
    fn take(&mut self, event: &RecordedEvent) -> Result<()> {
        if event.global_position != self.last_position + 1 {
            bail!(
                "position {} follows {}: the read skipped or repeated",
                event.global_position,
                self.last_position
            );
        }
        self.last_position = event.global_position;
        self.count += 1;
        let mut head = [0u8; 8];
        let n = event.hash.len().min(8);
        head[..n].copy_from_slice(&event.hash[..n]);
        let fields = event.payload.text().len() as u64;
        self.checksum = self
            .checksum
            .rotate_left(5)
            .wrapping_add(u64::from_le_bytes(head) ^ event.stream_version as u64 ^ fields);
        Ok(())
    }
}

/// Progress shared with the memory sampler.
struct Progress {
    consumed: AtomicU64,
}

/// A read to measure: consumes the whole log, reporting progress.
type ReadFuture = std::pin::Pin<Box<dyn std::future::Future<Output = Result<Consumer>> + Send>>;

fn stream_all(store: &EventStore, head: i64) -> impl FnOnce(Arc<Progress>) -> ReadFuture {
    let store = store.clone();
    move |progress| {
        Box::pin(async move {
            let mut consumer = Consumer::default();
            let mut pages = store.stream_all(0, Some(head));
            while let Some(page) = pages.recv().await {
                for event in &page.context("stream_all page")? {
                    consumer.take(event)?;
                }
                progress.consumed.store(consumer.count, Ordering::Relaxed);
            }
            Ok(consumer)
        })
    }
}

fn paged_read_all(store: &EventStore, head: i64) -> impl FnOnce(Arc<Progress>) -> ReadFuture {
    let store = store.clone();
    move |progress| {
        Box::pin(async move {
            let mut consumer = Consumer::default();
            while consumer.last_position < head {
                let page = store
                    .read_all(consumer.last_position, PAGE)
                    .await
                    .context("read_all page")?;
                if page.is_empty() {
                    break;
                }
                for event in &page {
                    consumer.take(event)?;
                }
                progress.consumed.store(consumer.count, Ordering::Relaxed);
            }
            Ok(consumer)
        })
    }
}

/// Times one read while a thread samples VmRSS.
async fn measure(
    head: i64,
    sample_ms: u64,
    read: impl FnOnce(Arc<Progress>) -> ReadFuture,
) -> Result<ReadOutcome> {
    let expected = u64::try_from(head).context("negative head")?;
    // "5" resets VmHWM to the current RSS (Linux ≥ 4.0); without it the peak is taken from samples.
    let reset_hwm = std::fs::write("/proc/self/clear_refs", "5").is_ok();
    let rss_before = status_kb("VmRSS:").unwrap_or(0);
    let progress = Arc::new(Progress {
        consumed: AtomicU64::new(0),
    });
    let stop = Arc::new(AtomicBool::new(false));
    let sampler = {
        let (progress, stop) = (Arc::clone(&progress), Arc::clone(&stop));
        std::thread::spawn(move || {
            let mut peak = 0;
            let mut quarters = vec![0u64; 4];
            while !stop.load(Ordering::Relaxed) {
                let rss = status_kb("VmRSS:").unwrap_or(0);
                peak = peak.max(rss);
                let done = progress.consumed.load(Ordering::Relaxed);
                for (q, slot) in quarters.iter_mut().enumerate() {
                    if *slot == 0 && done * 4 >= expected * (q as u64 + 1) {
                        *slot = rss;
                    }
                }
                std::thread::sleep(Duration::from_millis(sample_ms.max(1)));
            }
            (peak, quarters)
        })
    };
    let started = Instant::now();
    let result = read(Arc::clone(&progress)).await;
    let elapsed = started.elapsed();
    // The last quarter is the RSS at the end of the read.
    let rss_end = status_kb("VmRSS:").unwrap_or(0);
    stop.store(true, Ordering::Relaxed);
    let (sampled_peak, mut quarters) = sampler
        .join()
        .map_err(|_| anyhow::anyhow!("the memory sampler panicked"))?;
    let consumer = result?;
    if consumer.count != expected {
        bail!("read {} events, expected {expected}", consumer.count);
    }
    if let Some(last) = quarters.last_mut() {
        if *last == 0 {
            *last = rss_end;
        }
    }
    let hwm = if reset_hwm {
        status_kb("VmHWM:").unwrap_or(0)
    } else {
        0
    };
    Ok(ReadOutcome {
        events: consumer.count,
        elapsed,
        checksum: consumer.checksum,
        rss_before,
        rss_quarters: quarters,
        peak_kb: sampled_peak.max(hwm).max(rss_end),
    })
}

/// A `kB` field of /proc/self/status.
fn status_kb(field: &str) -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with(field))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

fn mib(kb: u64) -> f64 {
    kb as f64 / 1024.0
}
