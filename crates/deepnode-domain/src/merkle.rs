//! The log's Merkle tree (issue 14, CONTRACT §4a): RFC 9162 hashing over the events in log order —
//! leaf *i* is the event at position *i + 1* — with inclusion and consistency proofs and their
//! verification (RFC 9162 §2.1.3, §2.1.4).
//!
//! Pure. Interior hashes are addressed as *perfect subtrees* `(level, index)`: the `2^level` leaves
//! from `index · 2^level`. They never change once complete, so they can be stored as the log grows
//! ([`Frontier::push`] says which complete with each leaf), and every hash a proof needs is built
//! from at most O(log n) of them: [`inclusion_ranges`] / [`consistency_ranges`] name the leaf
//! ranges a proof consists of, [`perfect_cover`] the stored subtrees that make up a range, and
//! [`range_hash`] puts a range's hash together from them. Whoever holds the subtrees (a table, an
//! exported directory) does the reading.

use sha2::{Digest, Sha256};

/// A SHA-256 hash.
pub type Hash = [u8; 32];

/// The root of the empty tree: SHA-256 of nothing.
pub fn empty_root() -> Hash {
    Sha256::digest([]).into()
}

/// A leaf's hash: SHA-256(0x00 ‖ data).
pub fn leaf_hash(data: &[u8]) -> Hash {
    let mut h = Sha256::new();
    h.update([0u8]);
    h.update(data);
    h.finalize().into()
}

/// An interior node's hash: SHA-256(0x01 ‖ left ‖ right).
pub fn node_hash(left: &Hash, right: &Hash) -> Hash {
    let mut h = Sha256::new();
    h.update([1u8]);
    h.update(left);
    h.update(right);
    h.finalize().into()
}

/// The leaves `[start, end)` of a tree; every hash in a proof is the hash of one such range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Range {
    pub start: u64,
    pub end: u64,
}

/// A complete subtree: the `2^level` leaves from `index · 2^level`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Subtree {
    pub level: u32,
    pub index: u64,
}

/// The largest power of two smaller than `n` (`n ≥ 2`).
fn split(n: u64) -> u64 {
    1 << (63 - (n - 1).leading_zeros())
}

/// The ranges whose hashes make the inclusion proof of leaf `index` in a tree of `size` leaves,
/// from the leaf's sibling up (RFC 9162 §2.1.3.1, `PATH`). `None` if `index ≥ size`.
pub fn inclusion_ranges(index: u64, size: u64) -> Option<Vec<Range>> {
    if index >= size {
        return None;
    }
    let mut out = Vec::new();
    path(index, 0, size, &mut out);
    Some(out)
}

fn path(m: u64, start: u64, end: u64, out: &mut Vec<Range>) {
    let n = end - start;
    if n <= 1 {
        return;
    }
    let k = split(n);
    if m < k {
        path(m, start, start + k, out);
        out.push(Range {
            start: start + k,
            end,
        });
    } else {
        path(m - k, start + k, end, out);
        out.push(Range {
            start,
            end: start + k,
        });
    }
}

/// The ranges whose hashes make the consistency proof between the trees of `first` and `second`
/// leaves (RFC 9162 §2.1.4.1, `PROOF`). `None` unless `0 < first ≤ second`.
pub fn consistency_ranges(first: u64, second: u64) -> Option<Vec<Range>> {
    if first == 0 || first > second {
        return None;
    }
    let mut out = Vec::new();
    subproof(first, 0, second, true, &mut out);
    Some(out)
}

fn subproof(m: u64, start: u64, end: u64, whole: bool, out: &mut Vec<Range>) {
    let n = end - start;
    if m == n {
        if !whole {
            out.push(Range { start, end });
        }
        return;
    }
    let k = split(n);
    if m <= k {
        subproof(m, start, start + k, whole, out);
        out.push(Range {
            start: start + k,
            end,
        });
    } else {
        subproof(m - k, start + k, end, false, out);
        out.push(Range {
            start,
            end: start + k,
        });
    }
}

/// The complete subtrees a range's hash is built from, left to right: the largest aligned one that
/// fits, then the next. A proof's ranges start at a multiple of the largest power of two they hold,
/// so for them this is one subtree per set bit of the range's length.
pub fn perfect_cover(range: Range) -> Vec<Subtree> {
    let mut out = Vec::new();
    let mut start = range.start;
    while start < range.end {
        let left = range.end - start;
        // The largest power of two that fits, and that `start` is aligned to.
        let mut level = 63 - left.leading_zeros();
        while level > 0 && !start.is_multiple_of(1 << level) {
            level -= 1;
        }
        out.push(Subtree {
            level,
            index: start >> level,
        });
        start += 1 << level;
    }
    out
}

/// The hash of `range`, from the hashes of its [`perfect_cover`] given by `subtree` (RFC 9162's
/// `MTH` of the range: its right-hand subtrees are folded first). `None` if one is missing.
pub fn range_hash(range: Range, subtree: impl Fn(Subtree) -> Option<Hash>) -> Option<Hash> {
    if range.start >= range.end {
        return Some(empty_root());
    }
    let cover = perfect_cover(range);
    let mut hashes = cover
        .into_iter()
        .map(subtree)
        .collect::<Option<Vec<Hash>>>()?;
    let mut acc = hashes.pop()?;
    while let Some(left) = hashes.pop() {
        acc = node_hash(&left, &acc);
    }
    Some(acc)
}

/// Why a proof does not hold.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProofError {
    #[error("leaf {index} is not in a tree of {size} leaves")]
    OutOfRange { index: u64, size: u64 },
    #[error("the proof has the wrong number of hashes")]
    WrongLength,
    #[error("the proof leads to another root")]
    RootMismatch,
}

/// Checks that `leaf` is leaf `index` of the tree of `size` leaves whose root is `root`
/// (RFC 9162 §2.1.3.2).
pub fn verify_inclusion(
    index: u64,
    size: u64,
    leaf: &Hash,
    proof: &[Hash],
    root: &Hash,
) -> Result<(), ProofError> {
    if index >= size {
        return Err(ProofError::OutOfRange { index, size });
    }
    let (mut f, mut s) = (index, size - 1);
    let mut r = *leaf;
    for p in proof {
        if s == 0 {
            return Err(ProofError::WrongLength);
        }
        if f & 1 == 1 || f == s {
            r = node_hash(p, &r);
            while f & 1 == 0 && f != 0 {
                f >>= 1;
                s >>= 1;
            }
        } else {
            r = node_hash(&r, p);
        }
        f >>= 1;
        s >>= 1;
    }
    if s != 0 {
        return Err(ProofError::WrongLength);
    }
    if r != *root {
        return Err(ProofError::RootMismatch);
    }
    Ok(())
}

/// Checks that the tree of `first` leaves with root `first_root` is a prefix of the tree of
/// `second` leaves with root `second_root` (RFC 9162 §2.1.4.2).
pub fn verify_consistency(
    first: u64,
    second: u64,
    first_root: &Hash,
    second_root: &Hash,
    proof: &[Hash],
) -> Result<(), ProofError> {
    if first == 0 || first > second {
        return Err(ProofError::OutOfRange {
            index: first,
            size: second,
        });
    }
    if first == second {
        if !proof.is_empty() {
            return Err(ProofError::WrongLength);
        }
        return if first_root == second_root {
            Ok(())
        } else {
            Err(ProofError::RootMismatch)
        };
    }
    let mut path: Vec<Hash> = Vec::with_capacity(proof.len() + 1);
    if first.is_power_of_two() {
        path.push(*first_root);
    }
    path.extend_from_slice(proof);
    let (first_hash, rest) = path.split_first().ok_or(ProofError::WrongLength)?;
    let (mut f, mut s) = (first - 1, second - 1);
    while f & 1 == 1 {
        f >>= 1;
        s >>= 1;
    }
    let (mut fr, mut sr) = (*first_hash, *first_hash);
    for c in rest {
        if s == 0 {
            return Err(ProofError::WrongLength);
        }
        if f & 1 == 1 || f == s {
            fr = node_hash(c, &fr);
            sr = node_hash(c, &sr);
            while f & 1 == 0 && f != 0 {
                f >>= 1;
                s >>= 1;
            }
        } else {
            sr = node_hash(&sr, c);
        }
        f >>= 1;
        s >>= 1;
    }
    if s != 0 {
        return Err(ProofError::WrongLength);
    }
    if fr != *first_root || sr != *second_root {
        return Err(ProofError::RootMismatch);
    }
    Ok(())
}

/// The right edge of a growing tree (a compact range): the hash of each complete subtree the
/// leaves so far end with, one per set bit of the size, largest first. Enough to compute the root
/// and every subtree a new leaf completes, without reading anything back.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Frontier {
    size: u64,
    /// `(level, hash)`, levels decreasing.
    edge: Vec<(u32, Hash)>,
}

impl Frontier {
    /// The frontier of the empty tree.
    pub fn new() -> Frontier {
        Frontier::default()
    }

    /// Rebuilds the frontier of a tree of `size` leaves from its stored subtrees (`None` if one
    /// is missing).
    pub fn at(size: u64, subtree: impl Fn(Subtree) -> Option<Hash>) -> Option<Frontier> {
        let edge = perfect_cover(Range {
            start: 0,
            end: size,
        })
        .into_iter()
        .map(|t| subtree(t).map(|h| (t.level, h)))
        .collect::<Option<Vec<_>>>()?;
        Some(Frontier { size, edge })
    }

    /// How many leaves the tree has.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Appends a leaf (its [`leaf_hash`]); returns every subtree it completes, the leaf itself
    /// first, with its hash.
    pub fn push(&mut self, leaf: Hash) -> Vec<(Subtree, Hash)> {
        let index = self.size;
        let mut done = vec![(Subtree { level: 0, index }, leaf)];
        let mut hash = leaf;
        let mut level = 0;
        while let Some(&(top, left)) = self.edge.last() {
            if top != level {
                break;
            }
            self.edge.pop();
            hash = node_hash(&left, &hash);
            level += 1;
            done.push((
                Subtree {
                    level,
                    index: index >> level,
                },
                hash,
            ));
        }
        self.edge.push((level, hash));
        self.size += 1;
        done
    }

    /// The root of the tree so far.
    pub fn root(&self) -> Hash {
        let mut hashes = self.edge.iter().map(|(_, h)| *h).rev();
        let Some(mut acc) = hashes.next() else {
            return empty_root();
        };
        for left in hashes {
            acc = node_hash(&left, &acc);
        }
        acc
    }
}

/// Tree levels one tile spans (C2SP tlog-tiles): a tile of level *L* holds nodes of height 8·*L*.
pub const TILE_HEIGHT: u32 = 8;

/// Hashes in a full tile.
pub const TILE_WIDTH: usize = 256;

/// One tile of the tree as C2SP tlog-tiles lays it out: the hashes of the nodes at height
/// `8 · level`, indexes `256 · index ..`, concatenated; fewer than 256 in a partial tile at the
/// right edge.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tile {
    pub level: u32,
    pub index: u64,
    pub hashes: Vec<Hash>,
}

impl Tile {
    /// Its path: `tile/<L>/<N>`, or `tile/<L>/<N>.p/<W>` when partial; `N` in groups of three
    /// digits, all but the last prefixed `x` (`x001/x234/067`).
    pub fn path(&self) -> String {
        let digits = format!("{:03}", self.index);
        let padded = format!("{}{digits}", "0".repeat((3 - digits.len() % 3) % 3));
        let groups: Vec<&str> = padded
            .as_bytes()
            .chunks(3)
            .map(|g| std::str::from_utf8(g).unwrap_or("000"))
            .collect();
        let (last, rest) = groups
            .split_last()
            .map_or(("000", &[][..]), |(l, r)| (*l, r));
        let mut path = format!("tile/{}/", self.level);
        for group in rest {
            path.push('x');
            path.push_str(group);
            path.push('/');
        }
        path.push_str(last);
        if self.hashes.len() < TILE_WIDTH {
            path.push_str(&format!(".p/{}", self.hashes.len()));
        }
        path
    }

    /// Its contents: the hashes, concatenated.
    pub fn bytes(&self) -> Vec<u8> {
        self.hashes.concat()
    }
}

/// Cuts a growing tree into tiles: given what each [`Frontier::push`] completes, hands out each
/// full tile once it is full, and the partial ones at the end.
#[derive(Debug, Clone, Default)]
pub struct TileCutter {
    /// Per tile level, the hashes of its open tile.
    open: Vec<Vec<Hash>>,
    /// Per tile level, how many full tiles were handed out.
    full: Vec<u64>,
}

impl TileCutter {
    /// A cutter for the empty tree.
    pub fn new() -> TileCutter {
        TileCutter::default()
    }

    /// Takes the subtrees one leaf completed; returns the tiles they fill.
    pub fn push(&mut self, completed: &[(Subtree, Hash)]) -> Vec<Tile> {
        let mut tiles = Vec::new();
        for (subtree, hash) in completed {
            if subtree.level % TILE_HEIGHT != 0 {
                continue;
            }
            let level = (subtree.level / TILE_HEIGHT) as usize;
            if self.open.len() <= level {
                self.open.resize(level + 1, Vec::new());
                self.full.resize(level + 1, 0);
            }
            self.open[level].push(*hash);
            if self.open[level].len() == TILE_WIDTH {
                tiles.push(Tile {
                    level: level as u32,
                    index: self.full[level],
                    hashes: std::mem::take(&mut self.open[level]),
                });
                self.full[level] += 1;
            }
        }
        tiles
    }

    /// The partial tiles of the tree so far (those not full yet).
    pub fn partial(&self) -> Vec<Tile> {
        self.open
            .iter()
            .zip(&self.full)
            .enumerate()
            .filter(|(_, (open, _))| !open.is_empty())
            .map(|(level, (open, full))| Tile {
                level: level as u32,
                index: *full,
                hashes: open.clone(),
            })
            .collect()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeMap;

    #[test]
    fn tile_paths_follow_tlog_tiles() {
        let tile = |level, index, width| Tile {
            level,
            index,
            hashes: vec![[0u8; 32]; width],
        };
        assert_eq!(tile(0, 0, 256).path(), "tile/0/000");
        assert_eq!(tile(1, 7, 3).path(), "tile/1/007.p/3");
        assert_eq!(tile(0, 1234, 256).path(), "tile/0/x001/234");
        assert_eq!(tile(2, 1_234_067, 256).path(), "tile/2/x001/x234/067");
    }

    #[test]
    fn tiles_hold_the_nodes_of_every_eighth_level() {
        let leaves: Vec<Hash> = (0..70_000u32)
            .map(|i| leaf_hash(&i.to_be_bytes()))
            .collect();
        let (mut frontier, mut cutter) = (Frontier::new(), TileCutter::new());
        let mut tiles = Vec::new();
        for leaf in &leaves {
            tiles.extend(cutter.push(&frontier.push(*leaf)));
        }
        tiles.extend(cutter.partial());
        // 70,000 leaves: 273 full level-0 tiles and one of 112; 273 level-8 nodes → one full
        // level-1 tile and one of 17; one level-16 node → a level-2 tile of 1.
        let shape: Vec<(u32, u64, usize)> = tiles
            .iter()
            .filter(|t| t.hashes.len() < TILE_WIDTH || t.index == 0)
            .map(|t| (t.level, t.index, t.hashes.len()))
            .collect();
        assert_eq!(
            shape,
            vec![
                (0, 0, 256),
                (1, 0, 256),
                (0, 273, 112),
                (1, 1, 17),
                (2, 0, 1)
            ]
        );
        let find = |level: u32, index: u64| {
            tiles
                .iter()
                .find(|t| t.level == level && t.index == index)
                .unwrap()
        };
        // A level-0 tile holds the leaves; a level-1 entry is the hash of 256 of them.
        assert_eq!(find(0, 3).hashes[5], leaves[3 * 256 + 5]);
        let level8 = |i: u64| {
            let mut f = Frontier::new();
            for l in &leaves[(i * 256) as usize..((i + 1) * 256) as usize] {
                f.push(*l);
            }
            f.root()
        };
        assert_eq!(find(1, 1).hashes[16], level8(272));
        assert_eq!(find(2, 0).hashes[0], {
            let mut f = Frontier::new();
            for l in &leaves[..65_536] {
                f.push(*l);
            }
            f.root()
        });
    }

    fn unhex(s: &str) -> Hash {
        hex::decode(s).unwrap().try_into().unwrap()
    }

    /// RFC 6962's test leaves (as in Certificate Transparency's reference tests).
    fn ct_leaves() -> Vec<Hash> {
        [
            "",
            "00",
            "10",
            "2021",
            "3031",
            "40414243",
            "5051525354555657",
            "606162636465666768696a6b6c6d6e6f",
        ]
        .iter()
        .map(|h| leaf_hash(&hex::decode(h).unwrap()))
        .collect()
    }

    const CT_ROOTS: [&str; 9] = [
        "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
        "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
        "fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125",
        "aeb6bcfe274b70a14fb067a5e5578264db0fa9b51af5e0ba159158f329e06e77",
        "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
        "4e3bbb1f7b478dcfe71fb631631519a3bca12c9aefca1612bfce4c13a86264d4",
        "76e67dadbcdf1e10e1b74ddc608abd2f98dfb16fbce75277b5232a127f2087ef",
        "ddb89be403809e325750d3d263cd78929c2942b7942a34b77e122c9594a74c8c",
        "5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328",
    ];

    /// A tree held in memory the simple way: every complete subtree, from its leaves.
    struct Stored(BTreeMap<Subtree, Hash>);

    impl Stored {
        fn of(leaves: &[Hash]) -> Stored {
            let mut frontier = Frontier::new();
            let mut all = BTreeMap::new();
            for leaf in leaves {
                all.extend(frontier.push(*leaf));
            }
            Stored(all)
        }
        fn get(&self) -> impl Fn(Subtree) -> Option<Hash> + '_ {
            |t| self.0.get(&t).copied()
        }
        fn hashes(&self, ranges: &[Range]) -> Vec<Hash> {
            ranges
                .iter()
                .map(|r| range_hash(*r, self.get()).unwrap())
                .collect()
        }
    }

    /// RFC 9162's `MTH`, straight from its definition.
    fn mth(leaves: &[Hash]) -> Hash {
        match leaves.len() {
            0 => empty_root(),
            1 => leaves[0],
            n => {
                let k = split(n as u64) as usize;
                node_hash(&mth(&leaves[..k]), &mth(&leaves[k..]))
            }
        }
    }

    #[test]
    fn roots_match_rfc_6962s_reference_tree_heads() {
        let leaves = ct_leaves();
        let stored = Stored::of(&leaves);
        let mut frontier = Frontier::new();
        assert_eq!(hex::encode(frontier.root()), CT_ROOTS[0]);
        for (n, leaf) in leaves.iter().enumerate() {
            frontier.push(*leaf);
            let size = n as u64 + 1;
            assert_eq!(hex::encode(frontier.root()), CT_ROOTS[n + 1], "size {size}");
            let range = Range {
                start: 0,
                end: size,
            };
            assert_eq!(
                hex::encode(range_hash(range, stored.get()).unwrap()),
                CT_ROOTS[n + 1]
            );
        }
    }

    #[test]
    fn proofs_match_the_reference_vectors_and_verify() {
        let leaves = ct_leaves();
        let stored = Stored::of(&leaves);
        let inclusion: [(u64, u64, &[&str]); 4] = [
            (
                0,
                8,
                &[
                    "96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7",
                    "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
                    "6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4",
                ],
            ),
            (
                5,
                8,
                &[
                    "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b",
                    "ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0",
                    "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
                ],
            ),
            (
                2,
                3,
                &["fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125"],
            ),
            (
                1,
                5,
                &[
                    "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
                    "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
                    "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b",
                ],
            ),
        ];
        for (index, size, expected) in inclusion {
            let proof = stored.hashes(&inclusion_ranges(index, size).unwrap());
            let got: Vec<String> = proof.iter().map(hex::encode).collect();
            assert_eq!(got, expected, "inclusion of {index} in {size}");
            let root = unhex(CT_ROOTS[size as usize]);
            verify_inclusion(index, size, &leaves[index as usize], &proof, &root).unwrap();
        }
        let consistency: [(u64, u64, &[&str]); 4] = [
            (1, 1, &[]),
            (
                1,
                8,
                &[
                    "96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7",
                    "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
                    "6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4",
                ],
            ),
            (
                6,
                8,
                &[
                    "0ebc5d3437fbe2db158b9f126a1d118e308181031d0a949f8dededebc558ef6a",
                    "ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0",
                    "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
                ],
            ),
            (
                2,
                5,
                &[
                    "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
                    "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b",
                ],
            ),
        ];
        for (first, second, expected) in consistency {
            let proof = stored.hashes(&consistency_ranges(first, second).unwrap());
            let got: Vec<String> = proof.iter().map(hex::encode).collect();
            assert_eq!(got, expected, "consistency {first} → {second}");
            let (a, b) = (
                unhex(CT_ROOTS[first as usize]),
                unhex(CT_ROOTS[second as usize]),
            );
            verify_consistency(first, second, &a, &b, &proof).unwrap();
        }
    }

    #[test]
    fn a_rewritten_leaf_or_a_forged_root_fails_every_check() {
        let leaves: Vec<Hash> = (0u8..13).map(|i| leaf_hash(&[i])).collect();
        let stored = Stored::of(&leaves);
        let root = mth(&leaves);
        let proof = stored.hashes(&inclusion_ranges(4, 13).unwrap());
        assert_eq!(
            verify_inclusion(4, 13, &leaf_hash(b"other"), &proof, &root),
            Err(ProofError::RootMismatch)
        );
        // the last leaf's place depends on the size (a left leaf's does not: a checkpoint signs
        // the size with the root)
        let last = stored.hashes(&inclusion_ranges(12, 13).unwrap());
        verify_inclusion(12, 13, &leaves[12], &last, &root).unwrap();
        assert!(verify_inclusion(12, 14, &leaves[12], &last, &root).is_err());
        assert_eq!(
            verify_inclusion(13, 13, &leaves[4], &proof, &root),
            Err(ProofError::OutOfRange {
                index: 13,
                size: 13
            })
        );
        // the operator rewrites leaf 2 and recomputes everything after it: the old root is no
        // longer a prefix of the new tree
        let old_root = mth(&leaves[..8]);
        let mut rewritten = leaves.clone();
        rewritten[2] = leaf_hash(b"rewritten");
        let forged = Stored::of(&rewritten);
        let proof = forged.hashes(&consistency_ranges(8, 13).unwrap());
        assert_eq!(
            verify_consistency(8, 13, &old_root, &mth(&rewritten), &proof),
            Err(ProofError::RootMismatch)
        );
    }

    proptest! {
        #[test]
        fn every_proof_of_every_shape_verifies_against_the_definition(
            n in 1usize..70, picks in proptest::collection::vec(any::<u64>(), 1..8)
        ) {
            let leaves: Vec<Hash> = (0..n).map(|i| leaf_hash(&(i as u64).to_be_bytes())).collect();
            let stored = Stored::of(&leaves);
            for pick in picks {
                let size = pick % n as u64 + 1;
                let index = (pick >> 20) % size;
                let root = mth(&leaves[..size as usize]);
                prop_assert_eq!(range_hash(Range { start: 0, end: size }, stored.get()).unwrap(), root);
                let ranges = inclusion_ranges(index, size).unwrap();
                for r in &ranges {
                    // each proof hash is the MTH of its range, built from O(log n) stored subtrees
                    prop_assert!(perfect_cover(*r).len() <= 64 - (r.end - r.start).leading_zeros() as usize);
                    prop_assert_eq!(range_hash(*r, stored.get()).unwrap(), mth(&leaves[r.start as usize..r.end as usize]));
                }
                let proof = stored.hashes(&ranges);
                prop_assert!(verify_inclusion(index, size, &leaves[index as usize], &proof, &root).is_ok());
                let first = (pick >> 40) % size + 1;
                let old = mth(&leaves[..first as usize]);
                let proof = stored.hashes(&consistency_ranges(first, size).unwrap());
                prop_assert!(verify_consistency(first, size, &old, &root, &proof).is_ok());
                if first < size {
                    let wrong = leaf_hash(b"not the old root");
                    prop_assert!(verify_consistency(first, size, &wrong, &root, &proof).is_err());
                }
            }
        }
    }
}
