#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;

use super::*;

fn payload(i: u64) -> Bytes {
    Bytes::from(format!("entry-{i}-").repeat((i % 5) as usize + 1))
}

fn entries(range: std::ops::Range<u64>) -> Vec<(u64, Bytes)> {
    range.map(|i| (i, payload(i))).collect()
}

fn noop() -> FlushCallback {
    Box::new(|r| assert!(r.is_ok(), "flush failed: {r:?}"))
}

fn small() -> WalOptions {
    WalOptions { segment_bytes: 100, ..WalOptions::default() }
}

fn open(dir: &Path, opts: WalOptions) -> Wal {
    Wal::open(dir, opts).unwrap()
}

fn segment_files(dir: &Path) -> Vec<u64> {
    let mut v: Vec<u64> = std::fs::read_dir(dir)
        .unwrap()
        .filter_map(|e| format::parse_segment_name(e.unwrap().file_name().to_str()?))
        .collect();
    v.sort_unstable();
    v
}

/// Checks that the log holds exactly `first..=last` with `payload(i)`, through both read paths.
fn assert_log(wal: &Wal, range: Option<(u64, u64)>) {
    assert_eq!(wal.first_index(), range.map(|r| r.0));
    assert_eq!(wal.last_index(), range.map(|r| r.1));
    let Some((first, last)) = range else {
        assert!(wal.read_range(0, u64::MAX).unwrap().is_empty());
        return;
    };
    let all = wal.read_range(0, u64::MAX).unwrap();
    assert_eq!(all, entries(first..last + 1));
    for i in first..=last {
        assert_eq!(wal.read(i).unwrap(), Some(payload(i)), "entry {i}");
    }
    assert_eq!(wal.read(first - 1).unwrap(), None);
    assert_eq!(wal.read(last + 1).unwrap(), None);
}

#[test]
fn append_read_round_trip_and_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let wal = open(dir.path(), WalOptions::default());
    assert_log(&wal, None);
    wal.append(entries(1..4), noop()).unwrap();
    wal.append(entries(4..5), noop()).unwrap();
    // Written, not necessarily flushed: reads must see it at once.
    assert_log(&wal, Some((1, 4)));
    assert_eq!(wal.read_range(2, 4).unwrap(), entries(2..4));
    assert_eq!(wal.read_range(3, 3).unwrap(), vec![]);
    assert_eq!(wal.read_range(4, 2).unwrap(), vec![]);
    assert_eq!(wal.read_range(0, 2).unwrap(), entries(1..2));
    wal.close().unwrap();

    let wal = open(dir.path(), WalOptions::default());
    assert_log(&wal, Some((1, 4)));
}

#[test]
fn empty_log_accepts_any_start_and_empty_payloads() {
    let dir = tempfile::tempdir().unwrap();
    let wal = open(dir.path(), WalOptions::default());
    wal.append(vec![(1000, Bytes::new()), (1001, Bytes::from_static(b"x"))], noop()).unwrap();
    assert_eq!(wal.read(1000).unwrap(), Some(Bytes::new()));
    drop(wal);
    let wal = open(dir.path(), WalOptions::default());
    assert_eq!((wal.first_index(), wal.last_index()), (Some(1000), Some(1001)));
    assert_eq!(segment_files(dir.path()), vec![1000]);
}

#[test]
fn rotation_across_small_segments_survives_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let wal = open(dir.path(), small());
    for i in 1..=40 {
        wal.append(entries(i..i + 1), noop()).unwrap();
    }
    wal.append(entries(41..50), noop()).unwrap();
    let segs = segment_files(dir.path());
    assert!(segs.len() >= 10, "expected many segments, got {segs:?}");
    assert_eq!(segs[0], 1);
    assert_log(&wal, Some((1, 49)));
    // A range crossing several segments comes back whole and in order.
    assert_eq!(wal.read_range(5, 45).unwrap(), entries(5..45));
    drop(wal);
    let wal = open(dir.path(), small());
    assert_log(&wal, Some((1, 49)));
    wal.append(entries(50..52), noop()).unwrap();
    assert_log(&wal, Some((1, 51)));
}

#[test]
fn non_contiguous_append_is_rejected_and_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let wal = open(dir.path(), small());
    wal.append(entries(1..4), noop()).unwrap();
    for bad in [entries(5..6), entries(3..5), entries(1..2)] {
        assert!(matches!(wal.append(bad, noop()), Err(WalError::NonContiguous { expected: 4, .. })));
    }
    let gap = vec![(4, payload(4)), (6, payload(6))];
    assert!(matches!(wal.append(gap, noop()), Err(WalError::NonContiguous { expected: 5, got: 6 })));
    assert_log(&wal, Some((1, 3)));
    wal.purge(10, Bytes::from_static(b"m")).unwrap();
    assert!(matches!(wal.append(entries(4..5), noop()), Err(WalError::NonContiguous { expected: 11, got: 4 })));
    wal.append(entries(11..12), noop()).unwrap();
    assert_log(&wal, Some((11, 11)));
}

#[test]
fn oversized_entry_is_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let wal = open(dir.path(), WalOptions::default());
    let big = Bytes::from(vec![0u8; MAX_ENTRY_BYTES + 1]);
    assert!(matches!(wal.append(vec![(1, big)], noop()), Err(WalError::EntryTooLarge { index: 1, .. })));
    assert_log(&wal, None);
    wal.append(entries(1..2), noop()).unwrap();
}

#[test]
fn truncate_mid_segment_at_segment_start_and_past_end() {
    let dir = tempfile::tempdir().unwrap();
    let wal = open(dir.path(), small());
    for i in 1..=30 {
        wal.append(entries(i..i + 1), noop()).unwrap();
    }
    wal.truncate(31).unwrap();
    assert_log(&wal, Some((1, 30)));

    let segs = segment_files(dir.path());
    // Cut exactly at a segment's first entry: that segment goes away entirely.
    let at_start = segs[segs.len() / 2];
    wal.truncate(at_start).unwrap();
    assert_log(&wal, Some((1, at_start - 1)));
    assert_eq!(*segment_files(dir.path()).last().unwrap(), segs[segs.len() / 2 - 1]);

    // Cut inside a segment, then append different payloads at the same indexes.
    wal.truncate(at_start - 1).unwrap();
    assert_log(&wal, Some((1, at_start - 2)));
    wal.append(vec![(at_start - 1, Bytes::from_static(b"new"))], noop()).unwrap();
    assert_eq!(wal.read(at_start - 1).unwrap(), Some(Bytes::from_static(b"new")));
    drop(wal);

    let wal = open(dir.path(), small());
    assert_eq!(wal.last_index(), Some(at_start - 1));
    assert_eq!(wal.read(at_start - 1).unwrap(), Some(Bytes::from_static(b"new")));
    assert_eq!(wal.read_range(1, at_start - 1).unwrap(), entries(1..at_start - 1));

    wal.truncate(0).unwrap();
    assert_log(&wal, None);
    assert!(segment_files(dir.path()).is_empty());
    // Empty and never purged again: any start is fine.
    wal.append(entries(7..9), noop()).unwrap();
    drop(wal);
    assert_log(&open(dir.path(), small()), Some((7, 8)));
}

#[test]
fn truncate_completes_earlier_appends_first() {
    let dir = tempfile::tempdir().unwrap();
    let wal = open(dir.path(), WalOptions::default());
    let fired = Arc::new(AtomicUsize::new(0));
    for i in 1..=20 {
        let fired = Arc::clone(&fired);
        wal.append(
            entries(i..i + 1),
            Box::new(move |r| {
                r.unwrap();
                fired.fetch_add(1, Ordering::SeqCst);
            }),
        )
        .unwrap();
    }
    wal.truncate(10).unwrap();
    assert_eq!(fired.load(Ordering::SeqCst), 20);
    assert_log(&wal, Some((1, 9)));
}

#[test]
fn purge_hides_entries_deletes_whole_segments_and_persists() {
    let dir = tempfile::tempdir().unwrap();
    let wal = open(dir.path(), small());
    for i in 1..=30 {
        wal.append(entries(i..i + 1), noop()).unwrap();
    }
    let before = segment_files(dir.path());
    // Purge to the first entry of a segment holding more than one (each holds at least two here): that
    // segment stays on disk, partly hidden; those before it go.
    let mid = before[before.len() / 2];
    wal.purge(mid, Bytes::from_static(b"meta-1")).unwrap();
    assert_eq!(wal.purged(), Some((mid, Bytes::from_static(b"meta-1"))));
    assert_log(&wal, Some((mid + 1, 30)));
    assert_eq!(segment_files(dir.path())[0], before[before.len() / 2]);

    // Not above the current point: ignored, the meta too.
    wal.purge(mid - 1, Bytes::from_static(b"older")).unwrap();
    assert_eq!(wal.purged(), Some((mid, Bytes::from_static(b"meta-1"))));
    drop(wal);

    let wal = open(dir.path(), small());
    assert_eq!(wal.purged(), Some((mid, Bytes::from_static(b"meta-1"))));
    assert_log(&wal, Some((mid + 1, 30)));

    // Truncating below the purge point removes the live entries only; the log resumes after the point.
    wal.truncate(1).unwrap();
    assert_log(&wal, None);
    wal.append(entries(mid + 1..mid + 3), noop()).unwrap();
    drop(wal);
    let wal = open(dir.path(), small());
    assert_log(&wal, Some((mid + 1, mid + 2)));
}

#[test]
fn purge_past_the_end_empties_the_log() {
    let dir = tempfile::tempdir().unwrap();
    let wal = open(dir.path(), small());
    wal.append(entries(1..20), noop()).unwrap();
    wal.purge(100, Bytes::from_static(b"snap")).unwrap();
    assert_log(&wal, None);
    assert!(segment_files(dir.path()).is_empty());
    drop(wal);
    let wal = open(dir.path(), small());
    assert_log(&wal, None);
    assert_eq!(wal.purged(), Some((100, Bytes::from_static(b"snap"))));
    assert!(matches!(wal.append(entries(1..2), noop()), Err(WalError::NonContiguous { expected: 101, .. })));
    wal.append(entries(101..103), noop()).unwrap();
    assert_log(&wal, Some((101, 102)));
}

#[test]
fn purge_point_below_the_log_is_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let wal = open(dir.path(), small());
    wal.append(entries(50..55), noop()).unwrap();
    assert!(matches!(wal.purge(10, Bytes::new()), Err(WalError::InvalidIndex { index: 10, .. })));
    wal.purge(49, Bytes::new()).unwrap();
    assert_log(&wal, Some((50, 54)));
    drop(wal);
    assert_log(&open(dir.path(), small()), Some((50, 54)));
}

#[test]
fn vote_round_trip_and_persists() {
    let dir = tempfile::tempdir().unwrap();
    let wal = open(dir.path(), WalOptions::default());
    assert_eq!(wal.vote(), None);
    wal.save_vote(Bytes::from_static(b"term 1")).unwrap();
    wal.save_vote(Bytes::from_static(b"term 2, voted for 3")).unwrap();
    assert_eq!(wal.vote(), Some(Bytes::from_static(b"term 2, voted for 3")));
    drop(wal);
    let wal = open(dir.path(), WalOptions::default());
    assert_eq!(wal.vote(), Some(Bytes::from_static(b"term 2, voted for 3")));
    // A leftover temporary file from a crash before the rename is ignored and removed.
    std::fs::write(dir.path().join("vote.tmp"), b"half written").unwrap();
    drop(wal);
    let wal = open(dir.path(), WalOptions::default());
    assert_eq!(wal.vote(), Some(Bytes::from_static(b"term 2, voted for 3")));
    assert!(!dir.path().join("vote.tmp").exists());
}

#[test]
fn group_commit_covers_many_appends_with_one_sync() {
    let dir = tempfile::tempdir().unwrap();
    let wal = open(dir.path(), WalOptions::default());
    let (tx, rx) = mpsc::channel();
    const THREADS: u64 = 4;
    const PER_THREAD: u64 = 50;
    {
        // Holding the gate stalls the syncer (at most in its first round), so every append below is
        // written before any later round starts: they must all share one or two rounds.
        let _gate = lock(&wal.inner.shared.sync_gate);
        let next = Arc::new(Mutex::new(1u64));
        let threads: Vec<_> = (0..THREADS)
            .map(|_| {
                let (wal, tx, next) = (wal.clone(), tx.clone(), Arc::clone(&next));
                std::thread::spawn(move || {
                    for _ in 0..PER_THREAD {
                        // Indexes are handed out under the lock that also orders the appends.
                        let mut n = next.lock().unwrap();
                        let tx = tx.clone();
                        let i = *n;
                        wal.append(entries(i..i + 1), Box::new(move |r| tx.send((i, r.is_ok())).unwrap())).unwrap();
                        *n += 1;
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert_log(&wal, Some((1, THREADS * PER_THREAD)));
    }
    let mut acked = Vec::new();
    for _ in 0..THREADS * PER_THREAD {
        let (i, ok) = rx.recv_timeout(Duration::from_secs(30)).unwrap();
        assert!(ok);
        acked.push(i);
    }
    // Callbacks fire in submission order.
    assert_eq!(acked, (1..=THREADS * PER_THREAD).collect::<Vec<_>>());
    assert!(wal.sync_count() <= 2, "{} syncs for {} appends", wal.sync_count(), THREADS * PER_THREAD);
    wal.close().unwrap();
}

#[test]
fn empty_append_completes_after_earlier_ones() {
    let dir = tempfile::tempdir().unwrap();
    let wal = open(dir.path(), WalOptions::default());
    let (tx, rx) = mpsc::channel();
    let tx2 = tx.clone();
    wal.append(entries(1..3), Box::new(move |r| tx.send(("a", r.is_ok())).unwrap())).unwrap();
    wal.append(vec![], Box::new(move |r| tx2.send(("b", r.is_ok())).unwrap())).unwrap();
    assert_eq!(rx.recv_timeout(Duration::from_secs(10)).unwrap(), ("a", true));
    assert_eq!(rx.recv_timeout(Duration::from_secs(10)).unwrap(), ("b", true));
}

#[test]
fn close_flushes_then_every_call_fails() {
    let dir = tempfile::tempdir().unwrap();
    let wal = open(dir.path(), WalOptions::default());
    let fired = Arc::new(AtomicUsize::new(0));
    let f = Arc::clone(&fired);
    wal.append(
        entries(1..3),
        Box::new(move |r| {
            r.unwrap();
            f.fetch_add(1, Ordering::SeqCst);
        }),
    )
    .unwrap();
    wal.close().unwrap();
    assert_eq!(fired.load(Ordering::SeqCst), 1);
    assert!(matches!(wal.append(entries(3..4), noop()), Err(WalError::Closed)));
    assert!(matches!(wal.read(1), Err(WalError::Closed)));
    assert!(matches!(wal.truncate(1), Err(WalError::Closed)));
    assert!(matches!(wal.purge(1, Bytes::new()), Err(WalError::Closed)));
    assert!(matches!(wal.save_vote(Bytes::new()), Err(WalError::Closed)));
    assert!(matches!(wal.close(), Err(WalError::Closed)));
}

#[test]
fn blocking_call_from_a_callback_is_refused_not_deadlocked() {
    let dir = tempfile::tempdir().unwrap();
    let wal = open(dir.path(), WalOptions::default());
    let (tx, rx) = mpsc::channel();
    let w = wal.clone();
    wal.append(entries(1..2), Box::new(move |_| tx.send(w.truncate(1).map_err(|e| e.to_string())).unwrap())).unwrap();
    let r = rx.recv_timeout(Duration::from_secs(10)).unwrap();
    assert!(r.unwrap_err().contains("flush callback"));
}

#[test]
fn poisoned_log_refuses_every_call() {
    let dir = tempfile::tempdir().unwrap();
    let wal = open(dir.path(), WalOptions::default());
    wal.append(entries(1..2), noop()).unwrap();
    wal.inner.shared.fail(WalError::Poisoned("injected fsync failure".into()));
    assert!(matches!(wal.append(entries(2..3), noop()), Err(WalError::Poisoned(_))));
    assert!(matches!(wal.read(1), Err(WalError::Poisoned(_))));
    assert!(matches!(wal.save_vote(Bytes::new()), Err(WalError::Poisoned(_))));
    assert!(matches!(wal.close(), Err(WalError::Poisoned(_))));
}
