//! The projection runner against a real PostgreSQL: runners killed at random points (task aborted,
//! connections terminated) and restarted, two copies racing, and a rebuild — the table always ends
//! equal to a fresh fold of the log, with nothing applied twice or skipped.

#![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test

use std::time::Duration;

use async_trait::async_trait;
use deepnode_store::{
    Error, EventStore, ExpectedVersion, LogTail, Paired, Projection, ProjectionRunner,
    RecordedEvent, StreamId,
};
use deepnode_testkit::{event, TestDb};
use rand::{Rng, SeedableRng};
use serde_json::json;
use sqlx::{PgConnection, PgPool};

/// Per-stream counts and sums: stateless, every row derived from the events alone.
struct StreamStats;

#[async_trait]
impl Projection for StreamStats {
    fn name(&self) -> &str {
        "test_stream_stats"
    }

    async fn apply(
        &mut self,
        conn: &mut PgConnection,
        events: &[RecordedEvent],
    ) -> Result<(), Error> {
        for e in events {
            sqlx::query(
                "INSERT INTO test_stream_stats (stream_id, events, last_version, total) VALUES ($1, 1, $2, $3)
                 ON CONFLICT (stream_id) DO UPDATE SET events = test_stream_stats.events + 1,
                    last_version = EXCLUDED.last_version, total = test_stream_stats.total + EXCLUDED.total",
            )
            .bind(&e.stream_id)
            .bind(e.stream_version)
            .bind(e.payload.to_value()["n"].as_i64().unwrap_or(0))
            .execute(&mut *conn)
            .await?;
        }
        Ok(())
    }

    async fn clear(&mut self, conn: &mut PgConnection) -> Result<(), Error> {
        sqlx::query("DELETE FROM test_stream_stats")
            .execute(conn)
            .await?;
        Ok(())
    }
}

/// Keeps a running count in memory and writes, per event, how many events preceded it. Wrong
/// in-memory state (a missed `observe`, a missed `reset`) shows up as a wrong row.
#[derive(Default)]
struct RunningCount {
    seen: i64,
    /// Events ever observed, across resets: how much of the log this copy folded without writing.
    observed: i64,
}

#[async_trait]
impl Projection for RunningCount {
    fn name(&self) -> &str {
        "test_running_count"
    }

    async fn apply(
        &mut self,
        conn: &mut PgConnection,
        events: &[RecordedEvent],
    ) -> Result<(), Error> {
        for e in events {
            sqlx::query("INSERT INTO test_running_count (position, seen_before) VALUES ($1, $2)")
                .bind(e.global_position)
                .bind(self.seen)
                .execute(&mut *conn)
                .await?;
            self.seen += 1;
        }
        Ok(())
    }

    fn observe(&mut self, events: &[RecordedEvent]) -> Result<(), Error> {
        self.seen += events.len() as i64;
        self.observed += events.len() as i64;
        Ok(())
    }

    fn reset(&mut self) {
        self.seen = 0;
    }

    async fn clear(&mut self, conn: &mut PgConnection) -> Result<(), Error> {
        sqlx::query("DELETE FROM test_running_count")
            .execute(conn)
            .await?;
        Ok(())
    }
}

async fn create_tables(pool: &PgPool) {
    sqlx::query("CREATE TABLE test_stream_stats (stream_id text PRIMARY KEY, events bigint, last_version bigint, total bigint)")
        .execute(pool)
        .await
        .unwrap();
    sqlx::query(
        "CREATE TABLE test_running_count (position bigint PRIMARY KEY, seen_before bigint)",
    )
    .execute(pool)
    .await
    .unwrap();
}

/// What a fresh fold of the log gives, computed independently in SQL.
async fn expected_stats(pool: &PgPool) -> Vec<(String, i64, i64, i64)> {
    sqlx::query_as(
        "SELECT stream_id, count(*), max(stream_version), sum((payload->>'n')::bigint)::bigint
           FROM events GROUP BY stream_id ORDER BY stream_id",
    )
    .fetch_all(pool)
    .await
    .unwrap()
}

async fn stored_stats(pool: &PgPool) -> Vec<(String, i64, i64, i64)> {
    sqlx::query_as(
        "SELECT stream_id, events, last_version, total FROM test_stream_stats ORDER BY stream_id",
    )
    .fetch_all(pool)
    .await
    .unwrap()
}

async fn append_some(store: &EventStore, rng: &mut impl Rng, n: usize) {
    for _ in 0..n {
        let s = StreamId::parse(&format!("s-{}", rng.gen_range(0..12))).unwrap();
        let events: Vec<_> = (0..rng.gen_range(1..4))
            .map(|_| event("Tick", json!({"n": rng.gen_range(0..100)})))
            .collect();
        // A killed connection is transient: retry with the same event ids (idempotent).
        for attempt in 0.. {
            match store.append(&s, ExpectedVersion::Any, events.clone()).await {
                Ok(_) => break,
                Err(e) if e.is_transient() && attempt < 50 => {
                    tokio::time::sleep(Duration::from_millis(20)).await
                }
                Err(e) => panic!("append failed: {e}"),
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn runners_killed_at_random_points_leave_the_projection_equal_to_a_rebuild() {
    let db = TestDb::new().await;
    let store = db.store().await;
    create_tables(store.pool()).await;
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    append_some(&store, &mut rng, 300).await;

    for round in 0..12 {
        // Writers keep appending while runners come and go.
        let writer = {
            let store = store.clone();
            let seed = round;
            tokio::spawn(async move {
                let mut rng = rand::rngs::StdRng::seed_from_u64(1000 + seed);
                append_some(&store, &mut rng, 40).await;
            })
        };
        let runner_pool = db.pool().await;
        let stats = tokio::spawn({
            let mut runner = ProjectionRunner::new(runner_pool.clone(), StreamStats).with_batch(7);
            async move { runner.run(std::future::pending()).await }
        });
        let running = tokio::spawn({
            let mut runner =
                ProjectionRunner::new(runner_pool.clone(), RunningCount::default()).with_batch(5);
            async move { runner.run(std::future::pending()).await }
        });
        tokio::time::sleep(Duration::from_millis(rng.gen_range(5..80))).await;
        if round % 2 == 0 {
            // Crash: the task dies wherever it is; its open transaction is abandoned.
            stats.abort();
            running.abort();
        } else {
            // Cut: the database kills the runners' (and the writer's) connections mid-transaction;
            // the runners see transient errors and retry until they are stopped.
            db.kill_connections().await;
            tokio::time::sleep(Duration::from_millis(rng.gen_range(5..50))).await;
            stats.abort();
            running.abort();
        }
        let _ = stats.await;
        let _ = running.await;
        writer.await.unwrap();
    }

    let pool = db.pool().await;
    let mut stats = ProjectionRunner::new(pool.clone(), StreamStats);
    let mut running = ProjectionRunner::new(pool.clone(), RunningCount::default());
    let head = store.head_position().await.unwrap();
    assert_eq!(stats.run_to_head().await.unwrap(), head);
    assert_eq!(running.run_to_head().await.unwrap(), head);

    let stored = stored_stats(&pool).await;
    assert_eq!(
        stored,
        expected_stats(&pool).await,
        "never double-applied or skipped"
    );
    let wrong: Vec<(i64, i64)> = sqlx::query_as(
        "SELECT position, seen_before FROM test_running_count WHERE seen_before <> position - 1 ORDER BY position LIMIT 5",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    assert_eq!(
        wrong,
        vec![],
        "in-memory state was caught up correctly after every crash"
    );
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM test_running_count")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(rows, head);

    // A rebuild from position 0 yields the same rows.
    assert_eq!(stats.rebuild().await.unwrap(), head);
    assert_eq!(stored_stats(&pool).await, stored);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_copies_of_a_runner_take_turns_without_double_counting() {
    let db = TestDb::new().await;
    let store = db.store().await;
    create_tables(store.pool()).await;
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let copies: Vec<_> = (0..2)
        .map(|_| {
            let pool = store.pool().clone();
            let mut stop = stop_rx.clone();
            tokio::spawn(async move {
                let shutdown = async move {
                    let _ = stop.wait_for(|s| *s).await;
                };
                ProjectionRunner::new(pool, RunningCount::default())
                    .with_batch(3)
                    .run(shutdown)
                    .await
            })
        })
        .collect();
    let mut rng = rand::rngs::StdRng::seed_from_u64(3);
    append_some(&store, &mut rng, 200).await;
    let head = store.head_position().await.unwrap();

    // Wait (bounded) for the copies to reach the head, woken by notifications.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while deepnode_store::checkpoint(store.pool(), "test_running_count")
        .await
        .unwrap()
        < head
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "runners did not catch up"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    stop_tx.send(true).unwrap();
    for c in copies {
        c.await.unwrap().unwrap();
    }
    let (rows, wrong): (i64, i64) = sqlx::query_as(
        "SELECT count(*), count(*) FILTER (WHERE seen_before <> position - 1) FROM test_running_count",
    )
    .fetch_one(store.pool())
    .await
    .unwrap();
    assert_eq!((rows, wrong), (head, 0));
}

/// `Paired`: a stateful projection rides along with another in its runner. Its rows stand behind
/// the runner's at first (it joins an old log), then ahead of it (it ran alone for a while); two
/// paired copies race through crashes. Its rows end equal to its own fold — each position once, in
/// order, with the right in-memory count — and its checkpoint at the head.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_projection_riding_along_joins_behind_or_ahead_and_never_double_counts() {
    let db = TestDb::new().await;
    let store = db.store().await;
    create_tables(store.pool()).await;
    let pool = store.pool().clone();
    let mut rng = rand::rngs::StdRng::seed_from_u64(11);
    let paired = || Paired::new(StreamStats, RunningCount::default());

    // Behind: the runner's rows reach the head of an old log, the second has none.
    append_some(&store, &mut rng, 60).await;
    let mut alone = ProjectionRunner::new(pool.clone(), StreamStats);
    alone.run_to_head().await.unwrap();
    append_some(&store, &mut rng, 30).await;
    let mut both = ProjectionRunner::new(pool.clone(), paired()).with_batch(7);
    let head = store.head_position().await.unwrap();
    assert_eq!(both.run_to_head().await.unwrap(), head);
    assert_eq!(
        deepnode_store::checkpoint(&pool, "test_running_count")
            .await
            .unwrap(),
        head
    );

    // Ahead: the second ran alone past the pair's checkpoint.
    append_some(&store, &mut rng, 30).await;
    ProjectionRunner::new(pool.clone(), RunningCount::default())
        .run_to_head()
        .await
        .unwrap();
    append_some(&store, &mut rng, 30).await;

    // Two paired copies, killed at random points, with writers going on.
    for round in 0..6u64 {
        let writer = {
            let store = store.clone();
            tokio::spawn(async move {
                let mut rng = rand::rngs::StdRng::seed_from_u64(2000 + round);
                append_some(&store, &mut rng, 30).await;
            })
        };
        let copies: Vec<_> = (0..2)
            .map(|i| {
                tokio::spawn({
                    let mut runner =
                        ProjectionRunner::new(pool.clone(), paired()).with_batch(3 + i);
                    async move { runner.run(std::future::pending()).await }
                })
            })
            .collect();
        tokio::time::sleep(Duration::from_millis(rng.gen_range(5..60))).await;
        if round % 2 == 1 {
            db.kill_connections().await;
        }
        for c in copies {
            c.abort();
            let _ = c.await;
        }
        writer.await.unwrap();
    }
    let mut both = ProjectionRunner::new(db.pool().await, paired());
    let head = store.head_position().await.unwrap();
    assert_eq!(both.run_to_head().await.unwrap(), head);

    let pool = db.pool().await;
    let (rows, wrong): (i64, i64) = sqlx::query_as(
        "SELECT count(*), count(*) FILTER (WHERE seen_before <> position - 1) FROM test_running_count",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(
        (rows, wrong),
        (head, 0),
        "every position once, counted right"
    );
    assert_eq!(
        deepnode_store::checkpoint(&pool, "test_running_count")
            .await
            .unwrap(),
        head
    );
    assert_eq!(stored_stats(&pool).await, expected_stats(&pool).await);
}

#[tokio::test]
async fn a_standby_folds_only_what_is_written_and_takes_over_from_there() {
    // given a log projected by one runner
    let db = TestDb::new().await;
    let store = db.store().await;
    create_tables(store.pool()).await;
    let mut rng = rand::rngs::StdRng::seed_from_u64(4);
    append_some(&store, &mut rng, 20).await;
    let written = store.head_position().await.unwrap();
    let mut writer = ProjectionRunner::new(store.pool().clone(), RunningCount::default());
    assert_eq!(writer.run_to_head().await.unwrap(), written);

    // when a second runner stands by
    let mut standby = ProjectionRunner::new(store.pool().clone(), RunningCount::default());
    // (standing by for 50 ms at a time, asking every 5 ms)
    async fn stand_by(runner: &mut ProjectionRunner<RunningCount>) {
        let _ = tokio::time::timeout(
            Duration::from_millis(50),
            runner.stand_by(Duration::from_millis(5)),
        )
        .await;
    }
    let limit = tokio::time::Instant::now() + Duration::from_secs(10);
    while standby.projection().seen < written {
        assert!(
            tokio::time::Instant::now() < limit,
            "the standby never folded what was written"
        );
        stand_by(&mut standby).await;
    }
    // then it folds what was written, and nothing of what was only logged
    append_some(&store, &mut rng, 20).await;
    let head = store.head_position().await.unwrap();
    for _ in 0..3 {
        stand_by(&mut standby).await;
    }
    assert_eq!(standby.projection().seen, written);

    // and taking over, it writes the rest from where it stood, without folding the log again
    assert_eq!(standby.run_to_head().await.unwrap(), head);
    assert_eq!(
        standby.projection().observed,
        written,
        "the log was folded again"
    );
    let seen_before: Vec<(i64, i64)> =
        sqlx::query_as("SELECT position, seen_before FROM test_running_count ORDER BY position")
            .fetch_all(store.pool())
            .await
            .unwrap();
    assert_eq!(
        seen_before,
        (1..=head).map(|p| (p, p - 1)).collect::<Vec<_>>()
    );
}

/// Remembers what it folded: each position with the event type it was given.
#[derive(Default)]
struct Folded(Vec<(i64, String)>);

#[async_trait]
impl Projection for Folded {
    fn name(&self) -> &str {
        "test_folded"
    }

    async fn apply(&mut self, _: &mut PgConnection, events: &[RecordedEvent]) -> Result<(), Error> {
        self.observe(events)
    }

    fn observe(&mut self, events: &[RecordedEvent]) -> Result<(), Error> {
        let folded = events
            .iter()
            .map(|e| (e.global_position, e.event_type.clone()));
        self.0.extend(folded);
        Ok(())
    }

    fn reset(&mut self) {
        self.0.clear();
    }

    async fn clear(&mut self, _: &mut PgConnection) -> Result<(), Error> {
        Ok(())
    }
}

#[tokio::test]
async fn a_standby_takes_what_the_tail_holds_and_reads_the_rest_from_the_log() {
    // given 10 events, projected by one runner, and a standby following a tail of its own
    let db = TestDb::new().await;
    let store = db.store().await;
    let append = |n: usize| {
        let store = store.clone();
        async move {
            for _ in 0..n {
                let s = StreamId::parse("s-1").unwrap();
                let tick = event("Tick", json!({}));
                store
                    .append(&s, ExpectedVersion::Any, vec![tick])
                    .await
                    .unwrap();
            }
        }
    };
    append(10).await;
    let mut writer = ProjectionRunner::new(store.pool().clone(), Folded::default());
    assert_eq!(writer.run_to_head().await.unwrap(), 10);
    let tail = LogTail::new(64);
    let follower = db.store().await.with_tail(tail.clone());
    let mut standby = ProjectionRunner::for_store(&follower, Folded::default());
    async fn stand_by(runner: &mut ProjectionRunner<Folded>) {
        let _ = tokio::time::timeout(
            Duration::from_millis(50),
            runner.stand_by(Duration::from_millis(5)),
        )
        .await;
    }
    // The tail's copies carry a mark, so what was folded from it shows.
    let offer_marked = |events: Vec<RecordedEvent>| {
        for mut e in events {
            e.event_type = "FromTail".into();
            tail.offer(e);
        }
    };
    let folded = |runner: &ProjectionRunner<Folded>| runner.projection().0.clone();
    let logged = |range: std::ops::RangeInclusive<i64>| range.map(|p| (p, "Tick".to_owned()));
    let tailed = |range: std::ops::RangeInclusive<i64>| range.map(|p| (p, "FromTail".to_owned()));

    // when the standby starts (the tail holds nothing), it reads what is written from the log
    stand_by(&mut standby).await;
    assert_eq!(folded(&standby), logged(1..=10).collect::<Vec<_>>());

    // when 10 more commit, the tail is given 11-15 of them and the runner writes all 20
    append(10).await;
    offer_marked(store.read_all(10, 5).await.unwrap());
    stand_by(&mut standby).await;
    assert_eq!(folded(&standby).len(), 10, "folded past the checkpoint");
    assert_eq!(writer.run_to_head().await.unwrap(), 20);

    // then the standby folds 11-15 from the tail and 16-20 from the log
    stand_by(&mut standby).await;
    let expected: Vec<_> = logged(1..=10)
        .chain(tailed(11..=15))
        .chain(logged(16..=20))
        .collect();
    assert_eq!(folded(&standby), expected);

    // and what the tail gives past the checkpoint waits for it to be written
    append(5).await;
    offer_marked(store.read_all(20, 5).await.unwrap());
    stand_by(&mut standby).await;
    assert_eq!(folded(&standby), expected);
    assert_eq!(writer.run_to_head().await.unwrap(), 25);
    stand_by(&mut standby).await;
    let expected: Vec<_> = expected.into_iter().chain(tailed(21..=25)).collect();
    assert_eq!(folded(&standby), expected);
}
