//! Signed checkpoints of the log (issue 14, CONTRACT §4a): a C2SP tlog-checkpoint — origin, tree
//! size, root hash — as the text of a C2SP signed note, signed with Ed25519; and the receipt an exec
//! reply carries, the log key's signature that the event deciding it is at a position.
//!
//! Pure: keys are made from given bytes (the CLI draws them, the services read them from the file
//! `DEEPNODE_LOG_KEY` names). Formats, from c2sp.org:
//!
//! - checkpoint text: `<origin>\n<tree size>\n<base64 root hash>\n` then optional extension lines;
//! - signed note: the text, a blank line, then one line per signature:
//!   `— <key name> <base64(key ID ‖ signature)>\n`, the key ID being the first four bytes of
//!   SHA-256(key name ‖ `\n` ‖ 0x01 ‖ public key);
//! - keys as text: `PRIVATE+KEY+<name>+<key ID hex>+<base64(0x01 ‖ seed)>` (signer) and
//!   `<name>+<key ID hex>+<base64(0x01 ‖ public key)>` (verifier), as Go's `golang.org/x/mod/sumdb/note`
//!   writes them.

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use ed25519_dalek::{Signature, Signer as _, SigningKey, Verifier as _, VerifyingKey};
use sha2::{Digest, Sha256};

use crate::merkle::Hash;

/// The signature type byte of Ed25519 in signed notes.
const ED25519: u8 = 0x01;
/// What starts a signature line: an em dash and a space.
const DASH: &str = "\u{2014} ";

/// Why a note, a checkpoint or a key could not be read or verified.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NoteError {
    #[error("malformed note: {0}")]
    Malformed(String),
    #[error("malformed checkpoint: {0}")]
    Checkpoint(String),
    #[error("malformed key: {0}")]
    Key(String),
    #[error("no signature by {0}")]
    Unsigned(String),
    #[error("the signature by {0} does not verify")]
    BadSignature(String),
}

/// A tree head: the log named `origin` had `size` events, with Merkle root `root`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checkpoint {
    pub origin: String,
    pub size: u64,
    pub root: Hash,
    /// Extension lines (without their newline), kept as they are.
    pub extensions: Vec<String>,
}

impl Checkpoint {
    /// The checkpoint's text, the part that is signed.
    pub fn text(&self) -> String {
        let mut text = format!(
            "{}\n{}\n{}\n",
            self.origin,
            self.size,
            B64.encode(self.root)
        );
        for line in &self.extensions {
            text.push_str(line);
            text.push('\n');
        }
        text
    }

    /// Reads a checkpoint's text.
    pub fn parse(text: &str) -> Result<Checkpoint, NoteError> {
        let bad = |why: &str| NoteError::Checkpoint(why.to_owned());
        let body = text
            .strip_suffix('\n')
            .ok_or_else(|| bad("no final newline"))?;
        let mut lines = body.split('\n');
        let origin = lines
            .next()
            .filter(|o| !o.is_empty())
            .ok_or_else(|| bad("no origin"))?;
        let size = lines
            .next()
            .filter(|s| !s.is_empty() && (s == &"0" || !s.starts_with('0')))
            .and_then(|s| s.parse::<u64>().ok())
            .ok_or_else(|| bad("the tree size is not a decimal number"))?;
        let root = lines
            .next()
            .and_then(|r| B64.decode(r).ok())
            .and_then(|r| Hash::try_from(r).ok())
            .ok_or_else(|| bad("the root hash is not 32 bytes of base64"))?;
        let extensions: Vec<String> = lines.map(str::to_owned).collect();
        if extensions.iter().any(String::is_empty) {
            return Err(bad("an empty extension line"));
        }
        Ok(Checkpoint {
            origin: origin.to_owned(),
            size,
            root,
            extensions,
        })
    }
}

/// The key ID of an Ed25519 key named `name`.
fn key_id(name: &str, public: &VerifyingKey) -> u32 {
    let mut h = Sha256::new();
    h.update(name.as_bytes());
    h.update([b'\n', ED25519]);
    h.update(public.as_bytes());
    let d = h.finalize();
    u32::from_be_bytes([d[0], d[1], d[2], d[3]])
}

fn valid_name(name: &str) -> bool {
    !name.is_empty() && !name.contains(|c: char| c.is_whitespace() || c == '+')
}

/// A signing key with its name (the log's origin, or a witness's name).
#[derive(Clone)]
pub struct NoteSigner {
    name: String,
    key: SigningKey,
}

impl std::fmt::Debug for NoteSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "NoteSigner({})", self.verifier().encode())
    }
}

impl NoteSigner {
    /// The key of the 32-byte `seed`, named `name` (no spaces, no `+`).
    pub fn from_seed(name: &str, seed: [u8; 32]) -> Result<NoteSigner, NoteError> {
        if !valid_name(name) {
            return Err(NoteError::Key(format!("invalid key name {name:?}")));
        }
        Ok(NoteSigner {
            name: name.to_owned(),
            key: SigningKey::from_bytes(&seed),
        })
    }

    /// The key's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Its public half.
    pub fn verifier(&self) -> NoteVerifier {
        let key = self.key.verifying_key();
        NoteVerifier {
            name: self.name.clone(),
            id: key_id(&self.name, &key),
            key,
        }
    }

    /// `PRIVATE+KEY+<name>+<id>+<base64(0x01 ‖ seed)>`.
    pub fn encode(&self) -> String {
        let mut bytes = vec![ED25519];
        bytes.extend_from_slice(self.key.as_bytes());
        format!(
            "PRIVATE+KEY+{}+{:08x}+{}",
            self.name,
            self.verifier().id,
            B64.encode(bytes)
        )
    }

    /// Reads [`NoteSigner::encode`]'s form (surrounding whitespace ignored).
    pub fn decode(text: &str) -> Result<NoteSigner, NoteError> {
        let bad = |why: &str| NoteError::Key(why.to_owned());
        let rest = text
            .trim()
            .strip_prefix("PRIVATE+KEY+")
            .ok_or_else(|| bad("a signing key starts with PRIVATE+KEY+"))?;
        let (name, id, key) = three(rest).ok_or_else(|| bad("expected name+id+key"))?;
        let seed = typed_key(key)?;
        let signer = NoteSigner::from_seed(name, seed)?;
        if format!("{:08x}", signer.verifier().id) != id {
            return Err(bad("the key ID does not match the key"));
        }
        Ok(signer)
    }

    /// This key's signature of `text` as a signature line carries it: base64(key ID ‖ signature).
    pub fn signature(&self, text: &str) -> String {
        let signature = self.key.sign(text.as_bytes());
        let mut bytes = self.verifier().id.to_be_bytes().to_vec();
        bytes.extend_from_slice(&signature.to_bytes());
        B64.encode(bytes)
    }

    /// The signature line of `text` by this key (ends with a newline).
    pub fn signature_line(&self, text: &str) -> String {
        format!("{DASH}{} {}\n", self.name, self.signature(text))
    }

    /// `text` as a signed note signed by this key.
    pub fn sign(&self, text: &str) -> Result<String, NoteError> {
        check_text(text)?;
        Ok(format!("{text}\n{}", self.signature_line(text)))
    }
}

fn three(s: &str) -> Option<(&str, &str, &str)> {
    let mut parts = s.splitn(3, '+');
    Some((parts.next()?, parts.next()?, parts.next()?))
}

fn typed_key(b64: &str) -> Result<[u8; 32], NoteError> {
    let bytes = B64
        .decode(b64)
        .map_err(|e| NoteError::Key(format!("key bytes are not base64: {e}")))?;
    match bytes.split_first() {
        Some((&ED25519, key)) => <[u8; 32]>::try_from(key)
            .map_err(|_| NoteError::Key("an Ed25519 key has 32 bytes".to_owned())),
        _ => Err(NoteError::Key("not an Ed25519 (0x01) key".to_owned())),
    }
}

fn check_text(text: &str) -> Result<(), NoteError> {
    if !text.ends_with('\n') {
        return Err(NoteError::Malformed(
            "the text must end with a newline".into(),
        ));
    }
    if text.chars().any(|c| c.is_control() && c != '\n') {
        return Err(NoteError::Malformed(
            "control characters in the text".into(),
        ));
    }
    Ok(())
}

/// A public key with its name, to verify notes with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NoteVerifier {
    name: String,
    id: u32,
    key: VerifyingKey,
}

impl NoteVerifier {
    /// The key's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// `<name>+<id>+<base64(0x01 ‖ public key)>`.
    pub fn encode(&self) -> String {
        let mut bytes = vec![ED25519];
        bytes.extend_from_slice(self.key.as_bytes());
        format!("{}+{:08x}+{}", self.name, self.id, B64.encode(bytes))
    }

    /// Reads [`NoteVerifier::encode`]'s form (surrounding whitespace ignored).
    pub fn decode(text: &str) -> Result<NoteVerifier, NoteError> {
        let (name, id, key) =
            three(text.trim()).ok_or_else(|| NoteError::Key("expected name+id+key".to_owned()))?;
        if !valid_name(name) {
            return Err(NoteError::Key(format!("invalid key name {name:?}")));
        }
        let key = VerifyingKey::from_bytes(&typed_key(key)?)
            .map_err(|e| NoteError::Key(format!("not an Ed25519 public key: {e}")))?;
        let verifier = NoteVerifier {
            name: name.to_owned(),
            id: key_id(name, &key),
            key,
        };
        if format!("{:08x}", verifier.id) != id {
            return Err(NoteError::Key(
                "the key ID does not match the key".to_owned(),
            ));
        }
        Ok(verifier)
    }

    /// Checks a signature (`base64(key ID ‖ signature)`, as on a signature line) of `text`.
    pub fn verify(&self, text: &str, signature: &str) -> Result<(), NoteError> {
        let bad = || NoteError::BadSignature(self.name.clone());
        let bytes = B64.decode(signature).map_err(|_| bad())?;
        let (id, sig) = bytes.split_at_checked(4).ok_or_else(bad)?;
        if id != self.id.to_be_bytes() {
            return Err(bad());
        }
        let sig = Signature::from_slice(sig).map_err(|_| bad())?;
        self.key.verify(text.as_bytes(), &sig).map_err(|_| bad())
    }
}

/// A signed note, read: its text and its signature lines.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignedNote {
    /// The text that was signed (ends with a newline).
    pub text: String,
    /// `(key name, base64(key ID ‖ signature))` of each signature line.
    pub signatures: Vec<(String, String)>,
}

impl SignedNote {
    /// Splits a note at its last blank line into text and signature lines.
    pub fn parse(note: &str) -> Result<SignedNote, NoteError> {
        let bad = |why: &str| NoteError::Malformed(why.to_owned());
        let split = note
            .rfind("\n\n")
            .ok_or_else(|| bad("no blank line before the signatures"))?;
        let text = &note[..=split];
        check_text(text)?;
        let mut signatures = Vec::new();
        let lines = note[split + 2..]
            .strip_suffix('\n')
            .ok_or_else(|| bad("no final newline"))?;
        for line in lines.split('\n') {
            let rest = line
                .strip_prefix(DASH)
                .ok_or_else(|| bad("a signature line starts with an em dash"))?;
            let (name, sig) = rest
                .split_once(' ')
                .ok_or_else(|| bad("a signature line is `— name signature`"))?;
            signatures.push((name.to_owned(), sig.to_owned()));
        }
        if signatures.is_empty() || signatures.len() > 64 {
            return Err(bad("a note has 1 to 64 signatures"));
        }
        Ok(SignedNote {
            text: text.to_owned(),
            signatures,
        })
    }

    /// Checks that `verifier` signed the note: a signature line with its name and key ID that
    /// verifies. Signatures of other keys are ignored.
    pub fn verify(&self, verifier: &NoteVerifier) -> Result<(), NoteError> {
        let id = verifier.id.to_be_bytes();
        let mine = self.signatures.iter().filter(|(name, sig)| {
            name == &verifier.name && B64.decode(sig).is_ok_and(|b| b.get(..4) == Some(&id[..]))
        });
        let mut found = false;
        for (_, sig) in mine {
            verifier.verify(&self.text, sig)?;
            found = true;
        }
        if found {
            Ok(())
        } else {
            Err(NoteError::Unsigned(verifier.name.clone()))
        }
    }

    /// Adds a signature line (a witness's cosignature).
    pub fn add(&mut self, line: &str) -> Result<(), NoteError> {
        let parsed = SignedNote::parse(&format!("{}\n{line}", self.text))?;
        self.signatures.extend(parsed.signatures);
        Ok(())
    }

    /// The note as text.
    pub fn render(&self) -> String {
        let mut out = format!("{}\n", self.text);
        for (name, sig) in &self.signatures {
            out.push_str(&format!("{DASH}{name} {sig}\n"));
        }
        out
    }
}

/// What a receipt's signature covers: that the event with `leaf` hash is at `position` of the log
/// `origin` (a promise that the next checkpoint includes it).
pub fn receipt_text(origin: &str, position: u64, leaf: &Hash) -> String {
    format!(
        "deepnode receipt v1\n{origin}\n{position}\n{}\n",
        B64.encode(leaf)
    )
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::merkle;

    fn signer(name: &str, seed: u8) -> NoteSigner {
        NoteSigner::from_seed(name, [seed; 32]).unwrap()
    }

    #[test]
    fn a_checkpoint_reads_back_and_its_signature_verifies_with_the_log_key_only() {
        let log = signer("deepnode.example/log", 7);
        let cp = Checkpoint {
            origin: "deepnode.example/log".into(),
            size: 272,
            root: merkle::leaf_hash(b"x"),
            extensions: vec![],
        };
        let note = log.sign(&cp.text()).unwrap();
        let read = SignedNote::parse(&note).unwrap();
        assert_eq!(Checkpoint::parse(&read.text).unwrap(), cp);
        read.verify(&log.verifier()).unwrap();
        assert_eq!(read.render(), note);
        // another key of the same name: ignored, so the note counts as unsigned by it
        let impostor = signer("deepnode.example/log", 8);
        assert_eq!(
            read.verify(&impostor.verifier()),
            Err(NoteError::Unsigned("deepnode.example/log".into()))
        );
        // a rewritten size with the old signature: refused
        let forged = note.replacen("\n272\n", "\n268\n", 1);
        assert_eq!(
            SignedNote::parse(&forged).unwrap().verify(&log.verifier()),
            Err(NoteError::BadSignature("deepnode.example/log".into()))
        );
    }

    #[test]
    fn keys_round_trip_through_their_text_forms() {
        let log = signer("deepnode.example/log", 3);
        let text = log.encode();
        assert!(text.starts_with("PRIVATE+KEY+deepnode.example/log+"));
        let back = NoteSigner::decode(&text).unwrap();
        assert_eq!(back.verifier(), log.verifier());
        let public = log.verifier().encode();
        assert_eq!(NoteVerifier::decode(&public).unwrap(), log.verifier());
        assert!(NoteVerifier::decode(&public.replacen('+', "+0", 1)).is_err());
        assert!(NoteSigner::from_seed("has space", [1; 32]).is_err());
    }

    #[test]
    fn a_witness_cosignature_is_one_more_line_and_each_key_verifies_its_own() {
        let log = signer("log", 1);
        let witness = signer("witness.example/w1", 2);
        let cp = Checkpoint {
            origin: "log".into(),
            size: 3,
            root: merkle::empty_root(),
            extensions: vec!["an extension".into()],
        };
        let mut note = SignedNote::parse(&log.sign(&cp.text()).unwrap()).unwrap();
        note.add(&witness.signature_line(&note.text)).unwrap();
        let again = SignedNote::parse(&note.render()).unwrap();
        again.verify(&log.verifier()).unwrap();
        again.verify(&witness.verifier()).unwrap();
        assert_eq!(Checkpoint::parse(&again.text).unwrap(), cp);
    }

    #[test]
    fn malformed_checkpoints_and_notes_are_refused() {
        for text in [
            "",
            "origin\n",
            "origin\n12\n",
            "origin\n012\nAAAA\n",
            "origin\n-1\nAAAA\n",
            "origin\n1\nnot base64!\n",
            "origin\n1\n47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU=",
        ] {
            assert!(Checkpoint::parse(text).is_err(), "{text:?}");
        }
        assert!(
            Checkpoint::parse("origin\n1\n47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU=\n").is_ok()
        );
        for note in [
            "text\n",
            "text\n\nno dash\n",
            "text\n\n\u{2014} name\n",
            "text\n\n",
        ] {
            assert!(SignedNote::parse(note).is_err(), "{note:?}");
        }
    }

    #[test]
    fn a_receipt_signature_binds_origin_position_and_leaf() {
        let log = signer("log", 9);
        let leaf = merkle::leaf_hash(b"ExecutionCompleted");
        let signature = log.signature(&receipt_text("log", 41, &leaf));
        let sig = signature.as_str();
        let v = log.verifier();
        v.verify(&receipt_text("log", 41, &leaf), sig).unwrap();
        assert!(v.verify(&receipt_text("log", 42, &leaf), sig).is_err());
        assert!(v.verify(&receipt_text("other", 41, &leaf), sig).is_err());
    }
}
