//! The `deepnode` binary end to end against a real PostgreSQL: exit codes (0 clean, 1 difference,
//! 2 usage or connection error with one line), audit naming tampered rows and events, replay of the
//! past (by position and by instant, as JSON), replay refusing an unknown event type with its
//! position, and the admin views.

#![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test

use std::process::{Command, Output};

use deepnode_domain::config::PolicyConfig;
use deepnode_projections::synthetic::{History, Spec};
use deepnode_projections::{replay, BookProjection, Until};
use deepnode_store::{EventStore, ExpectedVersion, ProjectionRunner, StreamId};
use deepnode_testkit::{at, event, TestDb};
use serde_json::{json, Value};

fn deepnode(url: &str, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_deepnode"))
        .args(args)
        .env("DATABASE_URL", url)
        .env("NATS_URL", deepnode_testkit::nats_url())
        .env_remove("DEEPNODE_CONFIG")
        .env_remove("DEEPNODE_LOG_PUBLIC_KEYS")
        .output()
        .unwrap()
}

/// `deepnode audit` with `extra` arguments, reading checkpoints from a prefix no other test uses
/// (the default one's stream may hold another log's checkpoints on a shared server).
fn audit(url: &str, extra: &[&str]) -> Output {
    let prefix = deepnode_bus::Subjects::random().prefix().to_owned();
    let mut args = vec!["audit", "--prefix", &prefix];
    args.extend_from_slice(extra);
    deepnode(url, &args)
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// A usage or connection error: exit 2, exactly one line on stderr, nothing on stdout.
fn assert_one_line_error(o: &Output) {
    assert_eq!(o.status.code(), Some(2), "stderr: {}", stderr(o));
    assert_eq!(stderr(o).trim_end().lines().count(), 1, "{:?}", stderr(o));
    assert!(stdout(o).is_empty());
}

async fn history(store: &EventStore, executions: usize) {
    let spec = Spec {
        nodes: 8,
        models: 4,
        executions,
        seed: 11,
        start: at(0),
    };
    for append in History::new(spec).unwrap() {
        let append = append.unwrap();
        store
            .append(&append.stream, ExpectedVersion::Any, append.events)
            .await
            .unwrap();
    }
    ProjectionRunner::new(
        store.pool().clone(),
        BookProjection::new(&PolicyConfig::default()),
    )
    .run_to_head()
    .await
    .unwrap();
}

#[tokio::test]
async fn audit_exits_0_on_an_untouched_log_and_1_naming_a_tampered_row() {
    let db = TestDb::new().await;
    let store = db.store().await;
    history(&store, 200).await;

    let clean = audit(db.url(), &[]);
    assert_eq!(clean.status.code(), Some(0), "{}", stdout(&clean));
    assert!(stdout(&clean).contains("audit: ok"));

    sqlx::query("UPDATE node_reputation SET score = 0.123 WHERE node_id = 'n00001'")
        .execute(store.pool())
        .await
        .unwrap();
    let tampered = audit(db.url(), &[]);
    assert_eq!(tampered.status.code(), Some(1));
    let out = stdout(&tampered);
    assert!(
        out.contains("node_reputation key=n00001 column=score: stored 0.123 vs recomputed"),
        "{out}"
    );

    let json_out = audit(db.url(), &["--json"]);
    assert_eq!(json_out.status.code(), Some(1));
    let report: Value = serde_json::from_str(&stdout(&json_out)).unwrap();
    assert_eq!(report["ok"], json!(false));
    assert_eq!(report["differences"][0]["table"], json!("node_reputation"));
    assert_eq!(report["differences"][0]["key"], json!("n00001"));
    assert_eq!(report["differences"][0]["column"], json!("score"));
}

#[tokio::test]
async fn audit_exits_1_naming_the_position_of_a_tampered_event() {
    let db = TestDb::new().await;
    let store = db.store().await;
    history(&store, 100).await;
    let mut conn = store.pool().acquire().await.unwrap();
    for sql in [
        "ALTER TABLE events DISABLE TRIGGER events_no_update_delete",
        "UPDATE events SET occurred_at = occurred_at + interval '1 second' WHERE global_position = 25",
        "ALTER TABLE events ENABLE TRIGGER events_no_update_delete",
    ] {
        sqlx::query(sql).execute(&mut *conn).await.unwrap();
    }
    drop(conn);

    let o = audit(db.url(), &[]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stdout(&o).contains("BROKEN at position 25"),
        "{}",
        stdout(&o)
    );
    let o = audit(db.url(), &["--json"]);
    let report: Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(report["chain"]["first_break"]["position"], json!(25));
}

#[tokio::test]
async fn replay_shows_the_past_by_position_and_by_instant() {
    let db = TestDb::new().await;
    let store = db.store().await;
    history(&store, 150).await;
    let config = PolicyConfig::default();
    let head = store.head_position().await.unwrap();
    let middle = head / 2;

    let o = deepnode(
        db.url(),
        &["replay", "--until-position", &middle.to_string(), "--json"],
    );
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let past: Value = serde_json::from_str(&stdout(&o)).unwrap();
    let expected = replay(&store, Until::Position(middle), &config, |_| {})
        .await
        .unwrap();
    assert_eq!(past["position"], json!(middle));
    let nodes = past["nodes"].as_array().unwrap();
    assert_eq!(nodes.len(), expected.nodes().len());
    for (shown, row) in nodes.iter().zip(expected.node_rows()) {
        assert_eq!(shown["node_id"], json!(row.node_id));
        assert_eq!(
            shown["score"].as_f64().unwrap().to_bits(),
            row.score.to_bits()
        );
        assert_eq!(shown["successes"], json!(row.successes));
    }
    assert_eq!(
        past["deployments"].as_array().unwrap().len(),
        expected.deployment_rows().count()
    );

    // by instant: the first 3 registrations happened in the first few hundred ms
    let events = store.read_all(0, 3).await.unwrap();
    let t = events[2].occurred_at.to_rfc3339();
    let o = deepnode(db.url(), &["replay", "--until-time", &t, "--json"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let early: Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(early["nodes"].as_array().unwrap().len(), 3);
    assert_eq!(early["position"], json!(3));

    // the table view works too
    let o = deepnode(db.url(), &["replay", "--until-position", "2"]);
    assert_eq!(o.status.code(), Some(0));
    assert!(stdout(&o).contains("state as of position 2"));
    assert!(stdout(&o).contains("n00001"));
}

#[tokio::test]
async fn replay_exits_non_zero_naming_the_position_of_an_unknown_event_type() {
    let db = TestDb::new().await;
    let store = db.store().await;
    history(&store, 10).await;
    let appended = store
        .append(
            &StreamId::parse("node-z").unwrap(),
            ExpectedVersion::Any,
            vec![event("NodeTeleported", json!({"node_id": "z"}))],
        )
        .await
        .unwrap();
    let position = appended.positions[0];

    let o = deepnode(db.url(), &["replay"]);
    assert_eq!(o.status.code(), Some(1));
    let err = stderr(&o);
    assert!(err.contains(&format!("position {position}")), "{err}");
    assert!(err.contains("NodeTeleported"), "{err}");
    assert!(
        stdout(&o).is_empty(),
        "no state is shown past an unreadable event"
    );
}

#[tokio::test]
async fn admin_views_and_migrate() {
    let db = TestDb::new().await;
    let store = db.store().await;
    history(&store, 50).await;

    let o = deepnode(db.url(), &["migrate"]);
    assert_eq!(o.status.code(), Some(0));
    assert!(stdout(&o).contains("up to date"));

    let o = deepnode(db.url(), &["nodes", "--json"]);
    assert_eq!(o.status.code(), Some(0));
    let nodes: Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(nodes.as_array().unwrap().len(), 8);

    let o = deepnode(db.url(), &["deployments"]);
    assert_eq!(o.status.code(), Some(0));
    assert!(stdout(&o).contains("m0000"));

    let o = deepnode(
        db.url(),
        &["events", "--from", "2", "--limit", "3", "--json"],
    );
    assert_eq!(o.status.code(), Some(0));
    let lines: Vec<Value> = stdout(&o)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 3);
    assert_eq!(lines[0]["global_position"], json!(2));

    let o = deepnode(db.url(), &["events", "--stream", "node-n00000"]);
    assert_eq!(o.status.code(), Some(0));
    assert!(stdout(&o).contains("NodeRegistered"));

    // a fresh database is created and migrated on first use
    let fresh = TestDb::unmigrated();
    let o = deepnode(fresh.url(), &["nodes"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert!(stdout(&o).contains("(0 nodes)"));
}

#[test]
fn usage_errors_exit_2_with_one_line() {
    let url = "postgres://postgres@127.0.0.1:1/never";
    assert_one_line_error(&deepnode(url, &["frobnicate"]));
    assert_one_line_error(&deepnode(url, &["replay", "--until-position", "abc"]));
    assert_one_line_error(&deepnode(url, &["replay", "--until-time", "yesterday"]));
    assert_one_line_error(&deepnode(
        url,
        &[
            "replay",
            "--until-position",
            "1",
            "--until-time",
            "2026-01-01T00:00:00Z",
        ],
    ));
    assert_one_line_error(&deepnode(url, &[]));
    let help = deepnode(url, &["--help"]);
    assert_eq!(help.status.code(), Some(0));
}

#[test]
fn connection_refused_exits_2_with_one_line() {
    let url = "postgres://postgres@127.0.0.1:1/deepnode";
    for args in [&["audit"][..], &["replay"], &["nodes"], &["migrate"]] {
        let o = deepnode(url, args);
        assert_one_line_error(&o);
        assert!(stderr(&o).starts_with("deepnode: "), "{}", stderr(&o));
    }
}

#[tokio::test]
async fn a_bad_policy_file_is_a_usage_error() {
    let db = TestDb::new().await;
    let dir =
        std::env::temp_dir().join(format!("deepnode-cli-{}", deepnode_testkit::unique_token()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("policy.toml");
    std::fs::write(&path, "[reputation]\nhalf_life_sec = 5\n").unwrap();
    let o = Command::new(env!("CARGO_BIN_EXE_deepnode"))
        .args(["replay"])
        .env("DATABASE_URL", db.url())
        .env("DEEPNODE_CONFIG", &path)
        .output()
        .unwrap();
    assert_one_line_error(&o);
    assert!(stderr(&o).contains("DEEPNODE_CONFIG"), "{}", stderr(&o));
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A log of `executions` executions with its Merkle tree built and one checkpoint of it signed by
/// `key`, stored in the database and published to the checkpoints stream of a fresh prefix.
async fn checkpointed(
    store: &EventStore,
    executions: usize,
    key: &deepnode_domain::note::NoteSigner,
) -> (deepnode_bus::Subjects, u64) {
    use deepnode_projections::tree::{self, Cadence, TreeProjection};
    history(store, executions).await;
    ProjectionRunner::new(store.pool().clone(), TreeProjection::new())
        .run_to_head()
        .await
        .unwrap();
    let cadence = Cadence {
        every_events: 1,
        every: chrono::Duration::seconds(10),
    };
    let cp = tree::take_checkpoint(
        store.pool(),
        key.name(),
        Some(key),
        cadence,
        chrono::Utc::now(),
    )
    .await
    .unwrap()
    .unwrap();
    let subjects = deepnode_bus::Subjects::random();
    let client = deepnode_bus::async_nats::connect(deepnode_testkit::nats_url())
        .await
        .unwrap();
    let js = deepnode_bus::async_nats::jetstream::new(client);
    deepnode_bus::jetstream::ensure_streams(&js, &subjects, &Default::default())
        .await
        .unwrap();
    js.publish(subjects.checkpoints(), cp.note.clone().into())
        .await
        .unwrap()
        .await
        .unwrap();
    (subjects, cp.tree_size)
}

fn verify(url: &str, subjects: &deepnode_bus::Subjects, key: &str) -> Output {
    Command::new(env!("CARGO_BIN_EXE_deepnode"))
        .args(["verify", "--prefix", subjects.prefix(), "--public-key", key])
        .env("DATABASE_URL", url)
        .env("NATS_URL", deepnode_testkit::nats_url())
        .env_remove("DEEPNODE_CONFIG")
        .output()
        .unwrap()
}

async fn sql(store: &EventStore, statements: &[&str]) {
    let mut conn = store.pool().acquire().await.unwrap();
    for statement in statements {
        sqlx::query(statement).execute(&mut *conn).await.unwrap();
    }
}

async fn drop_stream(subjects: &deepnode_bus::Subjects) {
    let client = deepnode_bus::async_nats::connect(deepnode_testkit::nats_url())
        .await
        .unwrap();
    let js = deepnode_bus::async_nats::jetstream::new(client);
    for stream in [
        subjects.events_stream(),
        subjects.ingest_stream(),
        subjects.checkpoints_stream(),
    ] {
        let _ = js.delete_stream(stream).await;
    }
}

#[tokio::test]
async fn verify_holds_on_an_untouched_log_and_names_a_tail_cut_by_the_database_owner() {
    let db = TestDb::new().await;
    let store = db.store().await;
    let key = deepnode_domain::note::NoteSigner::from_seed("deepnode.test/log", [3; 32]).unwrap();
    let public = key.verifier().encode();
    let (subjects, size) = checkpointed(&store, 40, &key).await;

    let o = verify(db.url(), &subjects, &public);
    assert_eq!(o.status.code(), Some(0), "{}{}", stdout(&o), stderr(&o));
    assert!(stdout(&o).contains("verify: ok"), "{}", stdout(&o));
    assert_eq!(
        stdout(&o).matches("verified").count(),
        2,
        "database and stream: {}",
        stdout(&o)
    );

    // A rotated key: the log's older key under the same name, given first, does not stand in the
    // way of the one that signed.
    let older =
        deepnode_domain::note::NoteSigner::from_seed("deepnode.test/log", [30; 32]).unwrap();
    let both = format!("{},{public}", older.verifier().encode());
    let o = verify(db.url(), &subjects, &both);
    assert_eq!(o.status.code(), Some(0), "{}", stdout(&o));
    let o = verify(db.url(), &subjects, &older.verifier().encode());
    assert_eq!(
        o.status.code(),
        Some(1),
        "only the older key: {}",
        stdout(&o)
    );

    // A key of another name is not the log's: its checkpoints are not trusted.
    let stranger =
        deepnode_domain::note::NoteSigner::from_seed("someone.else/log", [4; 32]).unwrap();
    let o = verify(db.url(), &subjects, &stranger.verifier().encode());
    assert_eq!(o.status.code(), Some(1), "{}", stdout(&o));

    // The database owner erases the last 5 events, the checkpoints it holds, and moves the head
    // back: the audit's chain still holds, but the stream's checkpoint counts the erased events.
    let cut = size - 5;
    sql(
        &store,
        &[
            "ALTER TABLE events DISABLE TRIGGER USER",
            "ALTER TABLE log_head DISABLE TRIGGER USER",
            "ALTER TABLE log_checkpoints DISABLE TRIGGER USER",
            &format!("DELETE FROM events WHERE global_position > {cut}"),
            &format!(
                "UPDATE log_head SET position = {cut}, hash = (SELECT hash FROM events WHERE global_position = {cut})"
            ),
            "DELETE FROM log_checkpoints",
            "ALTER TABLE events ENABLE TRIGGER USER",
            "ALTER TABLE log_head ENABLE TRIGGER USER",
            "ALTER TABLE log_checkpoints ENABLE TRIGGER USER",
        ],
    )
    .await;
    let chain = deepnode_store::verify_chain(store.pool(), 0, None)
        .await
        .unwrap();
    assert!(
        chain.first_break.is_none(),
        "the chain alone does not notice"
    );
    let o = verify(db.url(), &subjects, &public);
    assert_eq!(o.status.code(), Some(1), "{}", stdout(&o));
    let out = stdout(&o);
    assert!(
        out.contains(&format!(
            "verify: FAILED at the checkpoint of size {size} (stream #1)"
        )),
        "{out}"
    );
    assert!(
        out.contains(&format!("positions {}..={size} are gone", cut + 1)),
        "{out}"
    );
    // `audit` runs the same check: the tables would pass once rebuilt, the checkpoint does not.
    let o = deepnode(
        db.url(),
        &[
            "audit",
            "--prefix",
            subjects.prefix(),
            "--public-key",
            &public,
        ],
    );
    assert_eq!(o.status.code(), Some(1), "{}", stdout(&o));
    assert!(
        stdout(&o).contains(&format!(
            "checkpoints: FAILED at the checkpoint of size {size} (stream #1)"
        )),
        "{}",
        stdout(&o)
    );
    drop_stream(&subjects).await;
}

/// `deepnode` with the database out of reach: whatever it does, it does from files.
fn offline(args: &[&str]) -> Output {
    deepnode("postgres://postgres@127.0.0.1:1/unreachable", args)
}

#[tokio::test]
async fn an_export_is_replayed_audited_and_verified_without_the_database() {
    let db = TestDb::new().await;
    let store = db.store().await;
    let key = deepnode_domain::note::NoteSigner::from_seed("deepnode.test/log", [7; 32]).unwrap();
    let public = key.verifier().encode();
    let (subjects, size) = checkpointed(&store, 120, &key).await;
    assert!(size > 256, "a full tile of leaves: {size}");
    let dir = std::env::temp_dir().join(format!("deepnode-export-{}", uuid::Uuid::new_v4()));
    let dir_arg = dir.display().to_string();

    let o = deepnode(db.url(), &["export", &dir_arg]);
    assert_eq!(o.status.code(), Some(0), "{}{}", stdout(&o), stderr(&o));
    assert!(
        stdout(&o).contains(&format!("exported {size} events, 1 checkpoints")),
        "{}",
        stdout(&o)
    );
    // Exporting into it again is refused: an export is never overwritten.
    assert_one_line_error(&deepnode(db.url(), &["export", &dir_arg]));

    let checks = ["--prefix", subjects.prefix(), "--public-key", &public];
    let o = offline(&[&["verify", "--from", &dir_arg][..], &checks].concat());
    assert_eq!(o.status.code(), Some(0), "{}{}", stdout(&o), stderr(&o));
    let out = stdout(&o);
    assert!(out.contains(&format!("log: {size} events")), "{out}");
    assert!(out.contains("tiles: holds"), "{out}");
    assert_eq!(
        out.matches("verified").count(),
        2,
        "export and stream: {out}"
    );

    let o = offline(&[&["audit", "--from", &dir_arg][..], &checks].concat());
    assert_eq!(o.status.code(), Some(0), "{}{}", stdout(&o), stderr(&o));
    assert!(stdout(&o).contains("audit: ok"), "{}", stdout(&o));

    // The same past from the files as from the database.
    for until in [["--until-position", "150"], ["--until-position", "100000"]] {
        let from_db = deepnode(db.url(), &[&["replay", "--json"][..], &until].concat());
        let from_files = offline(&[&["replay", "--json", "--from", &dir_arg][..], &until].concat());
        assert_eq!(from_files.status.code(), Some(0), "{}", stderr(&from_files));
        assert_eq!(stdout(&from_files), stdout(&from_db));
    }

    // One event rewritten in the files: the chain breaks there and the checkpoint no longer holds.
    let events = dir.join("events").join("000000000001.jsonl");
    let text = std::fs::read_to_string(&events).unwrap();
    let mut lines: Vec<String> = text.lines().map(str::to_owned).collect();
    let mut line: Value = serde_json::from_str(&lines[16]).unwrap();
    line["occurred_at"] = json!("2020-01-01T00:00:00Z");
    lines[16] = line.to_string();
    std::fs::write(&events, lines.join("\n") + "\n").unwrap();
    let o = offline(&[&["verify", "--from", &dir_arg][..], &checks].concat());
    assert_eq!(o.status.code(), Some(1), "{}", stdout(&o));
    assert!(
        stdout(&o).contains(&format!("verify: FAILED at the checkpoint of size {size}")),
        "{}",
        stdout(&o)
    );
    let o = offline(&[&["audit", "--from", &dir_arg][..], &checks].concat());
    assert_eq!(o.status.code(), Some(1), "{}", stdout(&o));
    assert!(
        stdout(&o).contains("BROKEN at position 17"),
        "{}",
        stdout(&o)
    );

    // Put back, but with a tile that is not the tree of the events.
    std::fs::write(&events, text).unwrap();
    let tile = dir.join("tile/0/000");
    let mut bytes = std::fs::read(&tile).unwrap();
    bytes[0] ^= 1;
    std::fs::write(&tile, bytes).unwrap();
    let o = offline(&[&["verify", "--from", &dir_arg][..], &checks].concat());
    assert_eq!(o.status.code(), Some(1), "{}", stdout(&o));
    assert!(
        stdout(&o).contains("tiles: tile/0/000 is not the tree of the events"),
        "{}",
        stdout(&o)
    );
    std::fs::remove_dir_all(&dir).unwrap();
    drop_stream(&subjects).await;
}

#[tokio::test]
async fn verify_names_the_position_of_a_rewritten_event() {
    let db = TestDb::new().await;
    let store = db.store().await;
    let key = deepnode_domain::note::NoteSigner::from_seed("deepnode.test/log", [5; 32]).unwrap();
    let (subjects, size) = checkpointed(&store, 30, &key).await;
    // Rewrite event 17. (The chain names it as well; an operator who also recomputed every later
    // hash would pass the chain, not the checkpoint signed before.)
    sql(
        &store,
        &[
            "ALTER TABLE events DISABLE TRIGGER USER",
            "UPDATE events SET occurred_at = occurred_at + interval '1 second' WHERE global_position = 17",
            "ALTER TABLE events ENABLE TRIGGER USER",
        ],
    )
    .await;
    let o = verify(db.url(), &subjects, &key.verifier().encode());
    assert_eq!(o.status.code(), Some(1), "{}", stdout(&o));
    let out = stdout(&o);
    assert!(out.contains(&format!("checkpoint of size {size}")), "{out}");
    assert!(
        out.contains("one of positions 17..=32 was changed"),
        "{out}"
    );
    drop_stream(&subjects).await;
}

/// The receipt the scheduler gives for the event at `position` whose leaf is `leaf`, signed by `key`.
fn signed_receipt(
    key: &deepnode_domain::note::NoteSigner,
    position: i64,
    leaf: &deepnode_domain::merkle::Hash,
) -> Value {
    let text =
        deepnode_domain::note::receipt_text(key.name(), u64::try_from(position).unwrap(), leaf);
    json!({
        "position": position,
        "leaf_hash": hex::encode(leaf),
        "origin": key.name(),
        "signature": key.signature(&text),
    })
}

/// `deepnode verify receipt` on `reply` (written to a file of its own), with the checkpoints of
/// `subjects`' stream and the log's public key.
fn verify_receipt(
    url: &str,
    subjects: &deepnode_bus::Subjects,
    public: &str,
    reply: &Value,
) -> Output {
    let path = std::env::temp_dir().join(format!("deepnode-reply-{}.json", uuid::Uuid::new_v4()));
    std::fs::write(&path, reply.to_string()).unwrap();
    let o = Command::new(env!("CARGO_BIN_EXE_deepnode"))
        .args(["verify", "receipt"])
        .arg(&path)
        .args(["--prefix", subjects.prefix(), "--public-key", public])
        .env("DATABASE_URL", url)
        .env("NATS_URL", deepnode_testkit::nats_url())
        .env_remove("DEEPNODE_CONFIG")
        .output()
        .unwrap();
    std::fs::remove_file(&path).unwrap();
    o
}

/// The thorough rewrite: one event changed, every later chain hash recomputed, `log_head` moved
/// and the stored tree rebuilt — the chain and the database's own tree agree with the new history.
/// The checkpoint published before does not, and the receipt given for an execution after the
/// change no longer verifies.
#[tokio::test]
async fn a_rewrite_with_every_later_hash_recomputed_fails_verify_and_the_receipts_after_it() {
    use deepnode_domain::merkle;
    use deepnode_domain::note::NoteSigner;
    use deepnode_projections::tree::TreeProjection;
    let db = TestDb::new().await;
    let store = db.store().await;
    let key = NoteSigner::from_seed("deepnode.test/log", [8; 32]).unwrap();
    let public = key.verifier().encode();
    let (subjects, size) = checkpointed(&store, 30, &key).await;
    // the receipt of the last execution, as the scheduler gave it
    let position: i64 = sqlx::query_scalar(
        "SELECT max(global_position) FROM events WHERE event_type = 'ExecutionCompleted'",
    )
    .fetch_one(store.pool())
    .await
    .unwrap();
    let event = store.read_all(position - 1, 1).await.unwrap().remove(0);
    let leaf = merkle::leaf_hash(&event.hash);
    let reply = json!({"ok": true, "node_id": event.payload.to_value()["node_id"],
        "receipt": signed_receipt(&key, position, &leaf)});

    // Rewrite event 20's time, recompute every hash from there, move the head, rebuild the tree.
    let events = store.read_all(0, 100_000).await.unwrap();
    let mut conn = store.pool().acquire().await.unwrap();
    for statement in [
        "ALTER TABLE events DISABLE TRIGGER USER",
        "ALTER TABLE log_head DISABLE TRIGGER USER",
        "ALTER TABLE merkle_subtrees DISABLE TRIGGER USER",
    ] {
        sqlx::query(statement).execute(&mut *conn).await.unwrap();
    }
    let mut prev = events[18].hash.clone();
    for mut e in events.into_iter().skip(19) {
        if e.global_position == 20 {
            e.occurred_at += chrono::Duration::seconds(1);
        }
        let hash = e.expected_hash(&prev).to_vec();
        sqlx::query(
            "UPDATE events SET occurred_at = $2, prev_hash = $3, hash = $4 WHERE global_position = $1",
        )
        .bind(e.global_position)
        .bind(e.occurred_at)
        .bind(&prev)
        .bind(&hash)
        .execute(&mut *conn)
        .await
        .unwrap();
        prev = hash;
    }
    sqlx::query("UPDATE log_head SET hash = $1")
        .bind(&prev)
        .execute(&mut *conn)
        .await
        .unwrap();
    sqlx::query("DELETE FROM merkle_subtrees")
        .execute(&mut *conn)
        .await
        .unwrap();
    sqlx::query(
        "UPDATE projection_checkpoints SET global_position = 0 WHERE projection = 'merkle'",
    )
    .execute(&mut *conn)
    .await
    .unwrap();
    for statement in [
        "ALTER TABLE events ENABLE TRIGGER USER",
        "ALTER TABLE log_head ENABLE TRIGGER USER",
        "ALTER TABLE merkle_subtrees ENABLE TRIGGER USER",
    ] {
        sqlx::query(statement).execute(&mut *conn).await.unwrap();
    }
    drop(conn);
    ProjectionRunner::new(store.pool().clone(), TreeProjection::new())
        .run_to_head()
        .await
        .unwrap();
    let chain = deepnode_store::verify_chain(store.pool(), 0, None)
        .await
        .unwrap();
    assert!(
        chain.first_break.is_none(),
        "the chain holds after the rewrite"
    );

    let o = verify(db.url(), &subjects, &public);
    assert_eq!(o.status.code(), Some(1), "{}", stdout(&o));
    assert!(
        stdout(&o).contains(&format!("verify: FAILED at the checkpoint of size {size}")),
        "{}",
        stdout(&o)
    );
    let o = verify_receipt(db.url(), &subjects, &public, &reply);
    assert_eq!(o.status.code(), Some(1), "{}", stdout(&o));
    assert!(
        stdout(&o).contains(&format!(
            "the log's event at position {position} is not the one the receipt signed"
        )),
        "{}",
        stdout(&o)
    );
    drop_stream(&subjects).await;
}

#[tokio::test]
async fn verify_receipt_checks_signature_event_inclusion_and_outcome() {
    use deepnode_domain::merkle;
    use deepnode_domain::note::NoteSigner;
    let db = TestDb::new().await;
    let store = db.store().await;
    let key = NoteSigner::from_seed("deepnode.test/log", [6; 32]).unwrap();
    let public = key.verifier().encode();
    let (subjects, _) = checkpointed(&store, 20, &key).await;
    // an execution's deciding event, and the receipt the scheduler would have given for it
    let position: i64 = sqlx::query_scalar(
        "SELECT min(global_position) FROM events WHERE event_type = 'ExecutionCompleted'",
    )
    .fetch_one(store.pool())
    .await
    .unwrap();
    let event = store.read_all(position - 1, 1).await.unwrap().remove(0);
    let leaf = merkle::leaf_hash(&event.hash);
    let receipt = |position: i64| signed_receipt(&key, position, &leaf);
    let check = |reply: Value| verify_receipt(db.url(), &subjects, &public, &reply);
    let node = event.payload.to_value()["node_id"].clone();
    let o = check(json!({"ok": true, "node_id": node, "receipt": receipt(position)}));
    assert_eq!(o.status.code(), Some(0), "{}{}", stdout(&o), stderr(&o));
    assert!(stdout(&o).contains("verify receipt: ok"), "{}", stdout(&o));
    assert!(
        stdout(&o).contains("inclusion: under the checkpoint"),
        "{}",
        stdout(&o)
    );

    // the reply claims a failure the log does not hold
    let o = check(json!({"ok": false, "receipt": receipt(position)}));
    assert_eq!(o.status.code(), Some(1), "{}", stdout(&o));
    // the receipt moved to another position: its signature no longer holds
    let mut moved = receipt(position);
    moved["position"] = json!(position + 1);
    let o = check(json!({"ok": true, "node_id": node, "receipt": moved}));
    assert_eq!(o.status.code(), Some(1), "{}", stdout(&o));
    assert!(stdout(&o).contains("FAILED"), "{}", stdout(&o));
    drop_stream(&subjects).await;
}

/// Answers `cmd.log.proof` consistency requests from the stored tree (what the reputation service
/// does), until the returned task is aborted.
async fn serve_consistency_proofs(
    store: &EventStore,
    subjects: &deepnode_bus::Subjects,
) -> tokio::task::JoinHandle<()> {
    use deepnode_domain::merkle;
    use deepnode_projections::tree;
    use futures::StreamExt;
    let client = deepnode_bus::async_nats::connect(deepnode_testkit::nats_url())
        .await
        .unwrap();
    let mut requests = client.subscribe(subjects.cmd_log_proof()).await.unwrap();
    client.flush().await.unwrap();
    let pool = store.pool().clone();
    tokio::spawn(async move {
        while let Some(request) = requests.next().await {
            let ask: Value = serde_json::from_slice(&request.payload).unwrap();
            let (from, to) = (
                ask["from_size"].as_u64().unwrap(),
                ask["to_size"].as_u64().unwrap(),
            );
            let ranges = merkle::consistency_ranges(from, to).unwrap();
            let hashes = tree::range_hashes(&pool, &ranges).await.unwrap().unwrap();
            let hex: Vec<String> = hashes.iter().map(hex::encode).collect();
            let reply = json!({"ok": true, "tree_size": to, "hashes": hex}).to_string();
            client
                .publish(request.reply.unwrap(), reply.into())
                .await
                .unwrap();
        }
    })
}

// Two workers: the proof responder answers while the test waits for the witness process.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_witness_cosigns_checkpoints_that_extend_the_last_and_refuses_one_that_does_not() {
    use deepnode_domain::note::{Checkpoint, NoteSigner, SignedNote};
    use deepnode_projections::tree::{self, Cadence, TreeProjection};
    let db = TestDb::new().await;
    let store = db.store().await;
    let log = NoteSigner::from_seed("deepnode.test/log", [8; 32]).unwrap();
    let witness = NoteSigner::from_seed("witness.test/w1", [9; 32]).unwrap();
    let (subjects, first) = checkpointed(&store, 10, &log).await;
    let proofs = serve_consistency_proofs(&store, &subjects).await;
    let dir = std::env::temp_dir().join(format!(
        "deepnode-witness-{}",
        uuid::Uuid::new_v4().simple()
    ));
    std::fs::create_dir(&dir).unwrap();
    std::fs::write(dir.join("w.key"), witness.encode()).unwrap();
    let client = deepnode_bus::async_nats::connect(deepnode_testkit::nats_url())
        .await
        .unwrap();
    let js = deepnode_bus::async_nats::jetstream::new(client);
    let witness_once = || {
        Command::new(env!("CARGO_BIN_EXE_deepnode"))
            .args(["witness", "--once", "--prefix", subjects.prefix()])
            .arg("--key")
            .arg(dir.join("w.key"))
            .arg("--state")
            .arg(dir.join("state"))
            .args(["--log-key", &log.verifier().encode()])
            .env("NATS_URL", deepnode_testkit::nats_url())
            .output()
            .unwrap()
    };
    let latest = || async {
        let last = deepnode_bus::jetstream::latest_checkpoint(&js, &subjects)
            .await
            .unwrap()
            .unwrap();
        SignedNote::parse(std::str::from_utf8(&last).unwrap()).unwrap()
    };
    let publish = |note: String| {
        let js = js.clone();
        let subject = subjects.checkpoints();
        async move {
            js.publish(subject, note.into())
                .await
                .unwrap()
                .await
                .unwrap()
        }
    };
    let grow = |n: usize| {
        let store = store.clone();
        async move {
            let stream =
                StreamId::parse(&format!("more-{}", uuid::Uuid::new_v4().simple())).unwrap();
            let events = (0..n).map(|i| event("Thing", json!({"n": i}))).collect();
            store
                .append(&stream, ExpectedVersion::Any, events)
                .await
                .unwrap();
            ProjectionRunner::new(store.pool().clone(), TreeProjection::new())
                .run_to_head()
                .await
                .unwrap();
        }
    };

    // the first checkpoint: co-signed
    let o = witness_once();
    assert_eq!(o.status.code(), Some(0), "{}{}", stdout(&o), stderr(&o));
    assert!(
        stdout(&o).contains(&format!("co-signed the checkpoint of size {first}")),
        "{}",
        stdout(&o)
    );
    let cosigned = latest().await;
    cosigned.verify(&log.verifier()).unwrap();
    cosigned.verify(&witness.verifier()).unwrap();

    // a later one that extends it: co-signed after checking the consistency proof
    grow(5).await;
    let cadence = Cadence {
        every_events: 1,
        every: chrono::Duration::seconds(10),
    };
    let second = tree::take_checkpoint(
        store.pool(),
        log.name(),
        Some(&log),
        cadence,
        chrono::Utc::now(),
    )
    .await
    .unwrap()
    .unwrap();
    publish(second.note.clone()).await;
    let o = witness_once();
    assert_eq!(o.status.code(), Some(0), "{}{}", stdout(&o), stderr(&o));
    latest().await.verify(&witness.verifier()).unwrap();

    // a checkpoint the log key signed over another tree (a rewritten history): refused, and the
    // witness keeps the one it accepted
    grow(5).await;
    let size = tree::tree_size(store.pool()).await.unwrap();
    let forged = Checkpoint {
        origin: log.name().to_owned(),
        size,
        root: deepnode_domain::merkle::leaf_hash(b"another history"),
        extensions: Vec::new(),
    };
    publish(log.sign(&forged.text()).unwrap()).await;
    let o = witness_once();
    assert_eq!(o.status.code(), Some(1), "{}{}", stdout(&o), stderr(&o));
    assert!(stderr(&o).contains("REFUSED"), "{}", stderr(&o));
    // with both checkpoints as evidence
    assert!(
        stderr(&o).contains(&format!(
            "accepted: size {}, root {}",
            second.tree_size,
            hex::encode(second.root)
        )),
        "{}",
        stderr(&o)
    );
    assert!(stderr(&o).contains(&forged.text()), "{}", stderr(&o));
    assert!(
        latest().await.verify(&witness.verifier()).is_err(),
        "the forged checkpoint was not co-signed"
    );
    let state = std::fs::read_to_string(dir.join("state")).unwrap();
    assert!(
        state.starts_with(&format!("{} ", second.tree_size)),
        "{state}"
    );

    // A real fork: the database restored from a copy taken at the first checkpoint, other events
    // appended past everything accepted, the tree rebuilt, and the log key signs a checkpoint of
    // it. The witness refuses it; `verify` names the checkpoint the witness had accepted.
    sql(
        &store,
        &[
            "ALTER TABLE events DISABLE TRIGGER USER",
            "ALTER TABLE log_head DISABLE TRIGGER USER",
            "ALTER TABLE log_checkpoints DISABLE TRIGGER USER",
            &format!("DELETE FROM events WHERE global_position > {first}"),
            &format!(
                "UPDATE log_head SET position = {first}, hash = (SELECT hash FROM events WHERE global_position = {first})"
            ),
            &format!("DELETE FROM log_checkpoints WHERE tree_size > {first}"),
            "DELETE FROM merkle_subtrees",
            "UPDATE projection_checkpoints SET global_position = 0 WHERE projection = 'merkle'",
            "ALTER TABLE events ENABLE TRIGGER USER",
            "ALTER TABLE log_head ENABLE TRIGGER USER",
            "ALTER TABLE log_checkpoints ENABLE TRIGGER USER",
        ],
    )
    .await;
    let restored = db.store().await;
    let other: Vec<_> = (0..size - first + 3)
        .map(|i| event("Other", json!({"n": i})))
        .collect();
    restored
        .append(
            &StreamId::parse("fork").unwrap(),
            ExpectedVersion::Any,
            other,
        )
        .await
        .unwrap();
    ProjectionRunner::new(restored.pool().clone(), TreeProjection::new())
        .run_to_head()
        .await
        .unwrap();
    let fork = tree::take_checkpoint(
        restored.pool(),
        log.name(),
        Some(&log),
        cadence,
        chrono::Utc::now(),
    )
    .await
    .unwrap()
    .unwrap();
    assert!(fork.tree_size > size);
    publish(fork.note.clone()).await;
    let o = witness_once();
    assert_eq!(o.status.code(), Some(1), "{}{}", stdout(&o), stderr(&o));
    assert!(
        stderr(&o).contains(&format!(
            "does not extend the accepted one of size {}",
            second.tree_size
        )),
        "{}",
        stderr(&o)
    );
    let o = verify(db.url(), &subjects, &log.verifier().encode());
    assert_eq!(o.status.code(), Some(1), "{}", stdout(&o));
    assert!(
        stdout(&o).contains(&format!(
            "verify: FAILED at the checkpoint of size {}",
            second.tree_size
        )),
        "{}",
        stdout(&o)
    );

    proofs.abort();
    std::fs::remove_dir_all(&dir).unwrap();
    drop_stream(&subjects).await;
}
