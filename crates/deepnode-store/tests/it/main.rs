//! The event store's integration tests, one module per area, linked into one test binary (one link
//! and one ~50 MB binary instead of one per file).

mod append;
mod coordination;
mod linger;
mod log;
mod probe;
mod projection;
mod shared_reader;
mod tail;

/// The positions of the next `n` events `sub` yields (each within 10 s).
async fn next_positions(sub: &mut deepnode_store::Subscription, n: usize) -> Vec<i64> {
    let mut seen = Vec::new();
    while seen.len() < n {
        let event = tokio::time::timeout(std::time::Duration::from_secs(10), sub.next())
            .await
            .expect("the subscription delivers within 10 s")
            .expect("the subscription reads the log");
        seen.push(event.global_position);
    }
    seen
}

/// Commits `n` events, one append (and so one commit and one notification) each, each to a new
/// stream; the last position.
async fn commit_one_by_one(store: &deepnode_store::EventStore, n: usize) -> i64 {
    let mut last = 0;
    for i in 0..n {
        let stream =
            deepnode_store::StreamId::parse(&format!("one-by-one-{}", uuid::Uuid::new_v4()))
                .expect("a valid stream id");
        last = store
            .append(
                &stream,
                deepnode_store::ExpectedVersion::NoStream,
                vec![deepnode_testkit::event("Tick", serde_json::json!({"i": i}))],
            )
            .await
            .expect("the append commits")
            .last_position();
    }
    last
}
