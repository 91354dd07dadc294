//! `deepnode keygen`: makes an Ed25519 key for the log (or a witness) and prints its public key
//! (CONTRACT §6). The private key is written to `--out` (created, mode 0600, never overwritten) in
//! the signed-note text form `PRIVATE+KEY+<name>+<id>+<key>`; the services read it from the file
//! `DEEPNODE_LOG_KEY` names. Without `--out` it is printed, for a secret store to take.

use std::io::Write as _;

use anyhow::{bail, Context as _};
use deepnode_domain::note::NoteSigner;
use rand::RngCore as _;

use super::Outcome;
use crate::cli::KeygenArgs;

/// Makes the key and prints the public half.
pub fn run(args: &KeygenArgs) -> anyhow::Result<Outcome> {
    let key = new_key(&args.name)?;
    match &args.out {
        Some(path) => {
            write_new(path, &key)?;
            eprintln!("private key written to {} (mode 0600)", path.display());
        }
        None => println!("{}", key.encode()),
    }
    println!("{}", key.verifier().encode());
    Ok(Outcome::Clean)
}

/// A fresh key named `name`.
pub(crate) fn new_key(name: &str) -> anyhow::Result<NoteSigner> {
    let mut seed = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut seed);
    NoteSigner::from_seed(name, seed).context("the key's name")
}

/// Writes `key` to a new file at `path` (mode 0600); an existing file is never overwritten.
pub(crate) fn write_new(path: &std::path::Path, key: &NoteSigner) -> anyhow::Result<()> {
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut file = match options.open(path) {
        Ok(file) => file,
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            bail!("{} exists; a key is never overwritten", path.display())
        }
        Err(e) => return Err(e).with_context(|| format!("creating {}", path.display())),
    };
    writeln!(file, "{}", key.encode()).with_context(|| format!("writing {}", path.display()))
}
