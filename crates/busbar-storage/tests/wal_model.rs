//! The WAL against an in-memory model: random operations on both, states compared after each one.
//! "Reboot" operations drop the log without closing it and reopen it; one of them also cuts the last
//! segment file at a random byte, as a torn write would, and the model forgets the entries cut off.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use busbar_storage::wal::{Wal, WalError, WalOptions, FRAME_HEADER};
use bytes::Bytes;
use proptest::prelude::*;

#[derive(Debug, Clone)]
enum Op {
    /// `n` entries; `start` is used only when the model accepts any start, `skew` != 0 makes the start
    /// wrong on purpose.
    Append {
        n: u8,
        start: u8,
        skew: i8,
        size: u8,
    },
    /// `at` picks an index around the live range.
    Truncate {
        at: u16,
    },
    Purge {
        at: u16,
        meta: u8,
    },
    SaveVote(u8),
    ReadRange {
        a: u16,
        b: u16,
    },
    Reopen,
    /// Reopen after cutting the last segment file at `cut` (a fraction of its length, in 1/256).
    TearAndReopen {
        cut: u8,
    },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        8 => (1u8..6, 0u8..20, prop_oneof![6 => Just(0i8), 1 => -3i8..3], 0u8..40)
            .prop_map(|(n, start, skew, size)| Op::Append { n, start, skew, size }),
        2 => any::<u16>().prop_map(|at| Op::Truncate { at }),
        2 => (any::<u16>(), any::<u8>()).prop_map(|(at, meta)| Op::Purge { at, meta }),
        1 => any::<u8>().prop_map(Op::SaveVote),
        2 => (any::<u16>(), any::<u16>()).prop_map(|(a, b)| Op::ReadRange { a, b }),
        1 => Just(Op::Reopen),
        1 => any::<u8>().prop_map(|cut| Op::TearAndReopen { cut }),
    ]
}

#[derive(Default, Debug)]
struct Model {
    entries: BTreeMap<u64, Bytes>,
    purged: Option<(u64, Bytes)>,
    vote: Option<Bytes>,
}

impl Model {
    fn next(&self) -> Option<u64> {
        match (self.entries.last_key_value(), &self.purged) {
            (Some((last, _)), _) => Some(last + 1),
            (None, Some((p, _))) => Some(p + 1),
            (None, None) => None,
        }
    }

    /// An index from a little below the live range to a little above it.
    fn pick(&self, at: u16) -> u64 {
        let lo = self.entries.first_key_value().map(|(k, _)| *k).or(self.purged.as_ref().map(|p| p.0)).unwrap_or(0);
        let hi = self.next().unwrap_or(lo);
        let span = hi - lo + 4;
        (lo + u64::from(at) % span).saturating_sub(2)
    }
}

fn payload(index: u64, size: u8, salt: u64) -> Bytes {
    let mut v = format!("{index}:{salt}:").into_bytes();
    v.resize(v.len() + usize::from(size), (index as u8).wrapping_add(salt as u8));
    Bytes::from(v)
}

fn check(wal: &Wal, model: &Model) {
    assert_eq!(wal.first_index(), model.entries.first_key_value().map(|(k, _)| *k));
    assert_eq!(wal.last_index(), model.entries.last_key_value().map(|(k, _)| *k));
    assert_eq!(wal.purged(), model.purged);
    assert_eq!(wal.vote(), model.vote);
    let all = wal.read_range(0, u64::MAX).unwrap();
    let want: Vec<(u64, Bytes)> = model.entries.iter().map(|(k, v)| (*k, v.clone())).collect();
    assert_eq!(all, want);
}

fn last_segment(dir: &Path) -> Option<std::path::PathBuf> {
    let mut segs: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "seg"))
        .collect();
    segs.sort();
    segs.pop()
}

/// Cuts the file at `cut_at` and returns the index of the last frame that is still whole, parsing the
/// frames independently of the crate (so a bug in its own parser is not mirrored here).
fn tear(path: &Path, cut_at: u64) -> Option<u64> {
    let data = std::fs::read(path).unwrap();
    let mut off = 0usize;
    let mut last_whole = None;
    while off + FRAME_HEADER <= data.len() {
        let len = u32::from_le_bytes(data[off + 4..off + 8].try_into().unwrap()) as usize;
        let index = u64::from_le_bytes(data[off + 8..off + 16].try_into().unwrap());
        let end = off + FRAME_HEADER + len;
        if end as u64 > cut_at {
            break;
        }
        last_whole = Some(index);
        off = end;
    }
    std::fs::OpenOptions::new().write(true).open(path).unwrap().set_len(cut_at).unwrap();
    last_whole
}

/// `synced_mark_every`: `None` when `ops` tear the log (the torn-tail model cuts frames that were
/// synced, which a log keeping the mark would rightly refuse); with a mark, every open must succeed.
fn run(ops: Vec<Op>, segment_bytes: u64, synced_mark_every: Option<Duration>) {
    let dir = tempfile::tempdir().unwrap();
    let opts = WalOptions { segment_bytes, synced_mark_every };
    let acked = Arc::new(AtomicU64::new(0));
    let mut appended = 0u64;
    let mut wal = Wal::open(dir.path(), opts.clone()).unwrap();
    let mut model = Model::default();
    for (step, op) in ops.into_iter().enumerate() {
        match op {
            Op::Append { n, start, skew, size } => {
                let expected = model.next();
                let first = match expected {
                    Some(e) => e.saturating_add_signed(i64::from(skew)),
                    None => u64::from(start),
                };
                let batch: Vec<_> = (first..first + u64::from(n)).map(|i| (i, payload(i, size, step as u64))).collect();
                let acked = Arc::clone(&acked);
                let r = wal.append(
                    batch.clone(),
                    Box::new(move |r| {
                        r.unwrap();
                        acked.fetch_add(1, Ordering::SeqCst);
                    }),
                );
                match expected {
                    Some(e) if e != first => {
                        assert!(matches!(r, Err(WalError::NonContiguous { .. })), "{r:?}");
                    }
                    _ => {
                        r.unwrap();
                        appended += 1;
                        model.entries.extend(batch);
                    }
                }
            }
            Op::Truncate { at } => {
                let from = model.pick(at);
                wal.truncate(from).unwrap();
                model.entries.split_off(&from);
            }
            Op::Purge { at, meta } => {
                let index = model.pick(at);
                let meta = Bytes::from(vec![meta; usize::from(meta % 7)]);
                let r = wal.purge(index, meta.clone());
                let first = model.entries.first_key_value().map(|(k, _)| *k);
                if model.purged.as_ref().is_some_and(|(p, _)| index <= *p) {
                    r.unwrap();
                } else if first.is_some_and(|f| index + 1 < f) {
                    assert!(matches!(r, Err(WalError::InvalidIndex { .. })), "{r:?}");
                } else {
                    r.unwrap();
                    model.entries = model.entries.split_off(&(index + 1));
                    model.purged = Some((index, meta));
                }
            }
            Op::SaveVote(v) => {
                let vote = Bytes::from(vec![v; usize::from(v % 11) + 1]);
                wal.save_vote(vote.clone()).unwrap();
                model.vote = Some(vote);
            }
            Op::ReadRange { a, b } => {
                let (a, b) = (model.pick(a), model.pick(b));
                let want: Vec<(u64, Bytes)> =
                    if a < b { model.entries.range(a..b).map(|(k, v)| (*k, v.clone())).collect() } else { vec![] };
                assert_eq!(wal.read_range(a, b).unwrap(), want);
                assert_eq!(wal.read(a).unwrap(), model.entries.get(&a).cloned());
            }
            Op::Reopen => {
                // Dropped, not closed: like a process crash with the page cache intact.
                drop(wal);
                wal = Wal::open(dir.path(), opts.clone()).unwrap();
            }
            Op::TearAndReopen { cut } => {
                drop(wal);
                if let Some(seg) = last_segment(dir.path()) {
                    let len = std::fs::metadata(&seg).unwrap().len();
                    let cut_at = len * u64::from(cut) / 256;
                    match tear(&seg, cut_at) {
                        Some(last) => {
                            model.entries.split_off(&(last + 1));
                        }
                        // Nothing whole is left in it: everything at or above its first index is gone.
                        None => {
                            let base: u64 = seg.file_stem().unwrap().to_str().unwrap().parse().unwrap();
                            model.entries.split_off(&base);
                        }
                    }
                }
                wal = Wal::open(dir.path(), opts.clone()).unwrap();
            }
        }
        check(&wal, &model);
    }
    wal.close().unwrap();
    assert_eq!(acked.load(Ordering::SeqCst), appended, "every successful append's callback fired");
    check(&Wal::open(dir.path(), opts).unwrap(), &model);
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn wal_matches_model(ops in proptest::collection::vec(op(), 1..60), segment_bytes in 1u64..300) {
        run(ops, segment_bytes, None);
    }

    /// The synced mark never makes the log refuse itself: truncates, purges and crashes (reopen
    /// without close), with the mark written every millisecond.
    #[test]
    fn wal_with_a_synced_mark_matches_model_and_always_reopens(
        ops in proptest::collection::vec(op(), 1..60),
        segment_bytes in 1u64..300,
    ) {
        let ops = ops.into_iter().map(|op| match op { Op::TearAndReopen { .. } => Op::Reopen, op => op }).collect();
        run(ops, segment_bytes, Some(Duration::from_millis(1)));
    }
}

#[test]
fn wal_matches_model_default_segments() {
    // One long deterministic-ish run with big segments, so nothing rotates and purge only hides entries.
    let ops: Vec<Op> = (0..200u16)
        .map(|i| match i % 13 {
            0 => Op::Truncate { at: i.wrapping_mul(31) },
            5 => Op::Purge { at: i.wrapping_mul(7), meta: i as u8 },
            7 => Op::Reopen,
            9 => Op::TearAndReopen { cut: (i as u8).wrapping_mul(37) },
            11 => Op::SaveVote(i as u8),
            _ => Op::Append { n: (i % 5 + 1) as u8, start: 3, skew: 0, size: (i % 40) as u8 },
        })
        .collect();
    run(ops, 64 << 20, None);
}
