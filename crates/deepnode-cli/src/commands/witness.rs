//! `deepnode witness`: an independent witness of the log (issue 14, CONTRACT §6). It reads the
//! latest checkpoint from `DEEPNODE_CHECKPOINTS`, checks the log key's signature, and — when it has
//! accepted one before — that the new one extends it (a consistency proof asked on
//! `cmd.log.proof`, checked here). Then it co-signs: the note with its own signature line is
//! published back to the stream (message id `cosigned-<witness>-<size>`). A checkpoint that is not
//! consistent with the last accepted one, or smaller, or badly signed, is refused and reported
//! (stderr, exit 1 with `--once`), and the witness keeps what it had accepted. What it accepted
//! lives in `--state` (size and root), so a restarted witness cannot be walked back.

use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Context as _};
use deepnode_bus::async_nats::{self, HeaderMap};
use deepnode_bus::Subjects;
use deepnode_domain::merkle::{self, Hash};
use deepnode_domain::note::{Checkpoint, NoteSigner, NoteVerifier, SignedNote};
use serde_json::json;

use super::Outcome;
use crate::cli::{Cli, WitnessArgs};
use crate::context;

/// How often the stream's latest checkpoint is looked at.
const POLL: Duration = Duration::from_secs(1);

/// Witnesses until Ctrl-C (or once, with `--once`).
pub async fn run(cli: &Cli, args: &WitnessArgs) -> anyhow::Result<Outcome> {
    let key_text = std::fs::read_to_string(&args.key)
        .with_context(|| format!("reading the witness key {}", args.key.display()))?;
    let witness = NoteSigner::decode(&key_text).context("the witness key")?;
    let log_key = NoteVerifier::decode(&args.log_key).context("--log-key")?;
    let subjects = Subjects::with_prefix(&args.prefix)?;
    let client = context::connect_nats(cli, "deepnode-witness").await?;
    let js = async_nats::jetstream::new(client.clone());
    let mut accepted = load_state(&args.state)?;
    loop {
        let outcome =
            witness_latest(&client, &js, &subjects, &witness, &log_key, &mut accepted).await;
        match outcome {
            Ok(Some(size)) => {
                save_state(&args.state, accepted)?;
                println!("co-signed the checkpoint of size {size}");
            }
            Ok(None) => {}
            Err(refusal) => {
                eprintln!("deepnode witness: REFUSED: {refusal:#}");
                if args.once {
                    return Ok(Outcome::Difference);
                }
            }
        }
        if args.once {
            return Ok(Outcome::Clean);
        }
        tokio::time::sleep(POLL).await;
    }
}

/// Looks at the stream's latest checkpoint; co-signs it if it is new and holds. Returns its size
/// when co-signed, `None` when there was nothing new.
async fn witness_latest(
    client: &async_nats::Client,
    js: &async_nats::jetstream::Context,
    subjects: &Subjects,
    witness: &NoteSigner,
    log_key: &NoteVerifier,
    accepted: &mut Option<(u64, Hash)>,
) -> anyhow::Result<Option<u64>> {
    let Some(last) = deepnode_bus::jetstream::latest_checkpoint(js, subjects)
        .await
        .context("opening the checkpoints stream")?
    else {
        return Ok(None);
    };
    let text = std::str::from_utf8(&last).context("a checkpoint that is not UTF-8")?;
    let mut note = SignedNote::parse(text).context("a malformed checkpoint")?;
    let checkpoint = Checkpoint::parse(&note.text).context("a malformed checkpoint")?;
    if let Some((size, root)) = *accepted {
        if checkpoint.size == size && checkpoint.root == root {
            return Ok(None);
        }
    }
    note.verify(log_key)
        .with_context(|| format!("the checkpoint of size {}", checkpoint.size))?;
    if note.verify(&witness.verifier()).is_ok() {
        // Already co-signed (by this witness, before a restart without state).
        *accepted = Some((checkpoint.size, checkpoint.root));
        return Ok(None);
    }
    if let Some((size, root)) = *accepted {
        // The evidence a refusal prints: what was accepted, and the note offered instead.
        let evidence = format!(
            "accepted: size {size}, root {}\noffered:\n{}",
            hex::encode(root),
            note.render()
        );
        if checkpoint.size < size {
            bail!(
                "the checkpoint of size {} is smaller than the accepted {size}\n{evidence}",
                checkpoint.size
            );
        }
        let ask = json!({"kind": "consistency", "from_size": size, "to_size": checkpoint.size});
        let proof = deepnode_bus::rpc::request_json(
            client,
            &subjects.cmd_log_proof(),
            &ask,
            Duration::from_secs(10),
        )
        .await
        .context("asking for a consistency proof")?;
        let hashes = proof_hashes(&proof).with_context(|| format!("the proof reply {proof}"))?;
        merkle::verify_consistency(size, checkpoint.size, &root, &checkpoint.root, &hashes)
            .with_context(|| {
                format!(
                    "the checkpoint of size {} does not extend the accepted one of size {size}\n{evidence}",
                    checkpoint.size
                )
            })?;
    }
    note.add(&witness.signature_line(&note.text))?;
    let mut headers = HeaderMap::new();
    let id = format!("cosigned-{}-{}", witness.name(), checkpoint.size);
    headers.insert("Nats-Msg-Id", id.as_str());
    js.publish_with_headers(subjects.checkpoints(), headers, note.render().into())
        .await
        .context("publishing the cosigned checkpoint")?
        .await
        .context("the stream did not acknowledge the cosigned checkpoint")?;
    *accepted = Some((checkpoint.size, checkpoint.root));
    Ok(Some(checkpoint.size))
}

fn proof_hashes(reply: &serde_json::Value) -> anyhow::Result<Vec<Hash>> {
    if reply["ok"] != true {
        bail!("no proof");
    }
    reply["hashes"]
        .as_array()
        .context("no hashes")?
        .iter()
        .map(|h| {
            let h = h.as_str().context("a hash that is not text")?;
            let bytes = hex::decode(h).context("a hash that is not hex")?;
            Hash::try_from(bytes).map_err(|_| anyhow::anyhow!("a hash that is not 32 bytes"))
        })
        .collect()
}

/// The accepted checkpoint kept in `path`: `<size> <hex root>`.
fn load_state(path: &Path) -> anyhow::Result<Option<(u64, Hash)>> {
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    let (size, root) = text
        .trim()
        .split_once(' ')
        .with_context(|| format!("{} is not `<size> <root>`", path.display()))?;
    let bytes = hex::decode(root).context("the state's root is not hex")?;
    Ok(Some((
        size.parse().context("the state's size")?,
        Hash::try_from(bytes).map_err(|_| anyhow::anyhow!("the state's root is not 32 bytes"))?,
    )))
}

fn save_state(path: &Path, accepted: Option<(u64, Hash)>) -> anyhow::Result<()> {
    let Some((size, root)) = accepted else {
        return Ok(());
    };
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, format!("{size} {}\n", hex::encode(root)))
        .with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("replacing {}", path.display()))
}
