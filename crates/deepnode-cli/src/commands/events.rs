//! `deepnode events`: a window of the log (from a global position) or of one stream (from a stream
//! version), one event per line.

use anyhow::Context as _;
use chrono::SecondsFormat;
use deepnode_store::{RecordedEvent, StreamId};
use serde_json::json;

use super::Outcome;
use crate::cli::{Cli, EventsArgs};
use crate::context;

/// Prints the requested events.
pub async fn run(cli: &Cli, args: &EventsArgs) -> anyhow::Result<Outcome> {
    let stream = match &args.stream {
        Some(s) => Some(StreamId::parse(s).with_context(|| format!("invalid --stream {s:?}"))?),
        None => None,
    };
    let store = context::connect(cli).await?;
    let events = match &stream {
        Some(stream) => {
            let mut events = store
                .read_stream(stream, args.from)
                .await
                .with_context(|| format!("reading stream {stream}"))?;
            events.truncate(usize::try_from(args.limit).unwrap_or(usize::MAX));
            events
        }
        None => store
            .read_all(args.from - 1, args.limit)
            .await
            .context("reading the log")?,
    };
    for e in &events {
        print_event(e, args.json);
    }
    Ok(Outcome::Clean)
}

fn print_event(e: &RecordedEvent, as_json: bool) {
    let occurred = e.occurred_at.to_rfc3339_opts(SecondsFormat::AutoSi, true);
    if as_json {
        let line = json!({
            "global_position": e.global_position, "event_id": e.event_id, "stream_id": e.stream_id,
            "stream_version": e.stream_version, "event_type": e.event_type,
            "schema_version": e.schema_version,
            "payload": e.payload.to_value(), "metadata": e.metadata.to_value(),
            "occurred_at": occurred,
            "recorded_at": e.recorded_at.to_rfc3339_opts(SecondsFormat::AutoSi, true),
        });
        println!("{line}");
    } else {
        println!(
            "{:>8} {} {}#{} {} v{} {}",
            e.global_position,
            occurred,
            e.stream_id,
            e.stream_version,
            e.event_type,
            e.schema_version,
            e.payload.to_value()
        );
    }
}
