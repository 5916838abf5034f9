//! Damage on disk: what opening the log must refuse (corruption that may sit under acknowledged entries)
//! and what it must repair (a torn tail of the last segment, which no acknowledgement covered).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::fs::OpenOptions;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use busbar_storage::wal::{Wal, WalError, WalOptions, FRAME_HEADER};
use bytes::Bytes;

fn payload(i: u64) -> Bytes {
    Bytes::from(format!("payload of entry {i}"))
}

/// No synced mark: these tests make a torn tail by cutting frames that were synced, which a log
/// keeping the mark would rightly refuse. The mark's own tests say `marked()`.
fn opts() -> WalOptions {
    WalOptions { segment_bytes: 200, synced_mark_every: None }
}

fn marked() -> WalOptions {
    WalOptions { segment_bytes: 200, synced_mark_every: Some(std::time::Duration::from_millis(20)) }
}

/// A closed log with entries `1..=n`, one append each, in several segments.
fn build(dir: &Path, n: u64) {
    let wal = Wal::open(dir, opts()).unwrap();
    for i in 1..=n {
        wal.append(vec![(i, payload(i))], Box::new(|r| r.unwrap())).unwrap();
    }
    wal.close().unwrap();
}

fn segments(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "seg"))
        .collect();
    v.sort();
    v
}

/// Byte offsets of the frames in a segment file.
fn frame_offsets(path: &Path) -> Vec<u64> {
    let data = std::fs::read(path).unwrap();
    let mut offs = Vec::new();
    let mut off = 0usize;
    while off < data.len() {
        offs.push(off as u64);
        let len = u32::from_le_bytes(data[off + 4..off + 8].try_into().unwrap()) as usize;
        off += FRAME_HEADER + len;
    }
    offs
}

fn flip(path: &Path, at: u64) {
    let f = OpenOptions::new().read(true).write(true).open(path).unwrap();
    let mut b = [0u8; 1];
    f.read_exact_at(&mut b, at).unwrap();
    f.write_all_at(&[b[0] ^ 0x40], at).unwrap();
}

fn assert_corrupt_at(r: Result<Wal, WalError>, want_file: &Path, want_offset: u64) {
    match r {
        Err(WalError::Corrupt { file, offset, reason }) => {
            assert_eq!(file, want_file, "{reason}");
            assert_eq!(offset, want_offset, "{reason}");
        }
        Err(e) => panic!("expected Corrupt, got {e}"),
        Ok(w) => panic!("expected Corrupt, the log opened: {w:?}"),
    }
}

fn assert_entries(wal: &Wal, last: u64) {
    assert_eq!(wal.last_index(), Some(last));
    let want: Vec<_> = (1..=last).map(|i| (i, payload(i))).collect();
    assert_eq!(wal.read_range(1, u64::MAX).unwrap(), want);
}

#[test]
fn flipped_byte_in_a_middle_segment_refuses_to_open() {
    let dir = tempfile::tempdir().unwrap();
    build(dir.path(), 40);
    let segs = segments(dir.path());
    assert!(segs.len() >= 4, "{segs:?}");
    let victim = &segs[segs.len() / 2];
    let offs = frame_offsets(victim);
    let frame = offs[offs.len() - 1];
    // A byte of the payload of the segment's last frame: the tail of a segment, but not the last segment.
    flip(victim, frame + FRAME_HEADER as u64 + 3);
    assert_corrupt_at(Wal::open(dir.path(), opts()), victim, frame);
}

#[test]
fn flipped_length_in_a_middle_segment_refuses_to_open() {
    let dir = tempfile::tempdir().unwrap();
    build(dir.path(), 40);
    let segs = segments(dir.path());
    let victim = &segs[1];
    let frame = frame_offsets(victim)[1];
    flip(victim, frame + 4);
    assert_corrupt_at(Wal::open(dir.path(), opts()), victim, frame);
}

#[test]
fn flipped_byte_in_the_last_segment_followed_by_data_refuses_to_open() {
    let dir = tempfile::tempdir().unwrap();
    build(dir.path(), 40);
    let last = segments(dir.path()).pop().unwrap();
    let offs = frame_offsets(&last);
    assert!(offs.len() >= 2);
    flip(&last, offs[0] + FRAME_HEADER as u64);
    assert_corrupt_at(Wal::open(dir.path(), opts()), &last, offs[0]);
}

#[test]
fn read_verifies_the_checksum_of_data_damaged_after_open() {
    let dir = tempfile::tempdir().unwrap();
    build(dir.path(), 10);
    let wal = Wal::open(dir.path(), opts()).unwrap();
    let seg = segments(dir.path()).remove(0);
    let frame = frame_offsets(&seg)[1];
    flip(&seg, frame + FRAME_HEADER as u64 + 1);
    assert!(matches!(wal.read(2), Err(WalError::Corrupt { offset, .. }) if offset == frame));
    assert!(matches!(wal.read_range(1, 4), Err(WalError::Corrupt { offset, .. }) if offset == frame));
    assert_eq!(wal.read(1).unwrap(), Some(payload(1)));
}

#[test]
fn flipped_byte_in_the_vote_file_refuses_to_open() {
    let dir = tempfile::tempdir().unwrap();
    let wal = Wal::open(dir.path(), opts()).unwrap();
    wal.save_vote(Bytes::from_static(b"term=7 voted_for=2 committed=true")).unwrap();
    wal.close().unwrap();
    let vote = dir.path().join("vote");
    flip(&vote, 12);
    match Wal::open(dir.path(), opts()) {
        Err(WalError::Corrupt { file, .. }) => assert_eq!(file, vote),
        other => panic!("expected Corrupt, got {other:?}"),
    }
}

#[test]
fn truncated_purge_file_refuses_to_open() {
    let dir = tempfile::tempdir().unwrap();
    build(dir.path(), 10);
    let wal = Wal::open(dir.path(), opts()).unwrap();
    wal.purge(5, Bytes::from_static(b"snapshot meta")).unwrap();
    wal.close().unwrap();
    let purged = dir.path().join("purged");
    let len = std::fs::metadata(&purged).unwrap().len();
    OpenOptions::new().write(true).open(&purged).unwrap().set_len(len - 1).unwrap();
    assert!(matches!(Wal::open(dir.path(), opts()), Err(WalError::Corrupt { file, .. }) if file == purged));
}

/// Reopens a log whose last frame was torn, and checks entries `1..=last` survived and appends go on.
fn assert_recovers_to(dir: &Path, last: u64) {
    let wal = Wal::open(dir, opts()).unwrap();
    assert_entries(&wal, last);
    wal.append(vec![(last + 1, Bytes::from_static(b"after the tear"))], Box::new(|r| r.unwrap())).unwrap();
    wal.close().unwrap();
    let wal = Wal::open(dir, opts()).unwrap();
    assert_eq!(wal.last_index(), Some(last + 1));
    assert_eq!(wal.read(last + 1).unwrap(), Some(Bytes::from_static(b"after the tear")));
    assert_eq!(wal.read_range(1, last + 1).unwrap().len() as u64, last);
}

#[test]
fn partial_frame_appended_to_the_tail_is_dropped() {
    let dir = tempfile::tempdir().unwrap();
    build(dir.path(), 20);
    let last = segments(dir.path()).pop().unwrap();
    // The first 10 bytes of what would be frame 21: a header cut short.
    let mut f = OpenOptions::new().append(true).open(&last).unwrap();
    f.write_all(&[0xde, 0xad, 0xbe, 0xef, 30, 0, 0, 0, 21, 0]).unwrap();
    drop(f);
    assert_recovers_to(dir.path(), 20);
}

#[test]
fn last_frame_chopped_in_half_is_dropped() {
    let dir = tempfile::tempdir().unwrap();
    build(dir.path(), 20);
    let last = segments(dir.path()).pop().unwrap();
    let len = std::fs::metadata(&last).unwrap().len();
    let frame = *frame_offsets(&last).last().unwrap();
    OpenOptions::new().write(true).open(&last).unwrap().set_len(frame + (len - frame) / 2).unwrap();
    assert_recovers_to(dir.path(), 19);
}

#[test]
fn zeroed_tail_is_dropped() {
    let dir = tempfile::tempdir().unwrap();
    build(dir.path(), 20);
    let last = segments(dir.path()).pop().unwrap();
    let frame = *frame_offsets(&last).last().unwrap();
    // The file size reached the disk but the last frame's pages did not: zeros from its payload on,
    // and more zeros past it (as a filesystem may leave after a power loss).
    let f = OpenOptions::new().write(true).open(&last).unwrap();
    let len = f.metadata().unwrap().len();
    f.write_all_at(&vec![0u8; (len - frame - FRAME_HEADER as u64) as usize], frame + FRAME_HEADER as u64).unwrap();
    f.set_len(len + 4096).unwrap();
    drop(f);
    assert_recovers_to(dir.path(), 19);
}

#[test]
fn zeros_after_the_last_frame_are_dropped() {
    let dir = tempfile::tempdir().unwrap();
    build(dir.path(), 20);
    let last = segments(dir.path()).pop().unwrap();
    // A size extended with nothing written: a frame header of zeros, which fails its checksum.
    let f = OpenOptions::new().write(true).open(&last).unwrap();
    let len = f.metadata().unwrap().len();
    f.set_len(len + 100).unwrap();
    drop(f);
    assert_recovers_to(dir.path(), 20);
}

#[test]
fn only_frame_of_the_last_segment_torn_removes_the_segment() {
    let dir = tempfile::tempdir().unwrap();
    build(dir.path(), 20);
    let wal = Wal::open(dir.path(), WalOptions { segment_bytes: 1, synced_mark_every: None }).unwrap();
    // With tiny segments the next append starts a segment of its own.
    wal.append(vec![(21, payload(21))], Box::new(|r| r.unwrap())).unwrap();
    wal.close().unwrap();
    let last = segments(dir.path()).pop().unwrap();
    assert!(last.ends_with("00000000000000000021.seg"), "{last:?}");
    OpenOptions::new().write(true).open(&last).unwrap().set_len(FRAME_HEADER as u64 + 2).unwrap();
    assert_recovers_to(dir.path(), 20);
}

/// A closed log with entries `1..=n` and its synced mark (exact: `close` writes it).
fn build_marked(dir: &Path, n: u64) {
    let wal = Wal::open(dir, marked()).unwrap();
    for i in 1..=n {
        wal.append(vec![(i, payload(i))], Box::new(|r| r.unwrap())).unwrap();
    }
    wal.close().unwrap();
}

fn assert_refused_as_lost(r: Result<Wal, WalError>) {
    match r {
        Err(WalError::Corrupt { reason, .. }) => {
            assert!(reason.contains("synced mark") && reason.contains("acknowledged entries are gone"), "{reason}")
        }
        Err(e) => panic!("refused for another reason: {e}"),
        Ok(_) => panic!("opened a log that lost synced entries"),
    }
}

#[test]
fn last_segment_cut_at_a_frame_boundary_below_the_synced_mark_refuses_to_open() {
    let dir = tempfile::tempdir().unwrap();
    build_marked(dir.path(), 20);
    let last = segments(dir.path()).pop().unwrap();
    // A clean cut: what is left parses as a whole log, only the mark can tell.
    let frame = *frame_offsets(&last).last().unwrap();
    OpenOptions::new().write(true).open(&last).unwrap().set_len(frame).unwrap();
    assert_refused_as_lost(Wal::open(dir.path(), marked()));
    // The same cut mid-frame, as a torn tail would look: refused too.
    let dir = tempfile::tempdir().unwrap();
    build_marked(dir.path(), 20);
    let last = segments(dir.path()).pop().unwrap();
    let len = std::fs::metadata(&last).unwrap().len();
    OpenOptions::new().write(true).open(&last).unwrap().set_len(len - 3).unwrap();
    assert_refused_as_lost(Wal::open(dir.path(), marked()));
    // Refusing leaves the evidence: the partial frame is still there, byte for byte, on every try.
    assert_eq!(std::fs::metadata(&last).unwrap().len(), len - 3, "a refused open cut the torn tail");
    assert_refused_as_lost(Wal::open(dir.path(), marked()));
    assert_eq!(std::fs::metadata(&last).unwrap().len(), len - 3);
}

/// Emptied segments would be deleted as "never written", but not before the checks: a refused open
/// keeps them (found in review: the last one emptied below the mark, a middle one emptied).
#[test]
fn emptied_segments_stay_on_disk_when_the_open_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    build_marked(dir.path(), 20);
    let segs = segments(dir.path());
    let last = segs.last().unwrap().clone();
    OpenOptions::new().write(true).open(&last).unwrap().set_len(0).unwrap();
    assert_refused_as_lost(Wal::open(dir.path(), marked()));
    assert!(last.exists(), "the emptied last segment was deleted by a refused open");

    let dir = tempfile::tempdir().unwrap();
    build(dir.path(), 40);
    let segs = segments(dir.path());
    OpenOptions::new().write(true).open(&segs[1]).unwrap().set_len(0).unwrap();
    assert!(matches!(Wal::open(dir.path(), opts()), Err(WalError::Corrupt { .. })));
    assert_eq!(segments(dir.path()), segs, "a refused open deleted a segment");
}

/// The last segment holds a single frame, torn: the segment would be removed as empty, but not before
/// the mark is checked, so a refusal keeps it.
#[test]
fn a_torn_lone_frame_below_the_synced_mark_keeps_its_segment() {
    let dir = tempfile::tempdir().unwrap();
    let wal = Wal::open(dir.path(), WalOptions { segment_bytes: 1, ..marked() }).unwrap();
    for i in 1..=3 {
        wal.append(vec![(i, payload(i))], Box::new(|r| r.unwrap())).unwrap();
    }
    wal.close().unwrap();
    let last = segments(dir.path()).pop().unwrap();
    assert!(last.ends_with("00000000000000000003.seg"), "{last:?}");
    OpenOptions::new().write(true).open(&last).unwrap().set_len(FRAME_HEADER as u64 + 2).unwrap();
    assert_refused_as_lost(Wal::open(dir.path(), WalOptions { segment_bytes: 1, ..marked() }));
    assert_eq!(std::fs::metadata(&last).unwrap().len(), FRAME_HEADER as u64 + 2, "the torn segment was touched");
}

#[test]
fn the_last_segment_deleted_below_the_synced_mark_refuses_to_open() {
    let dir = tempfile::tempdir().unwrap();
    build_marked(dir.path(), 20);
    std::fs::remove_file(segments(dir.path()).pop().unwrap()).unwrap();
    assert_refused_as_lost(Wal::open(dir.path(), marked()));
}

#[test]
fn the_mark_is_written_in_the_background_a_torn_tail_above_it_recovers_a_cut_below_it_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let wal = Wal::open(dir.path(), marked()).unwrap();
    for i in 1..=10 {
        wal.append(vec![(i, payload(i))], Box::new(|r| r.unwrap())).unwrap();
    }
    // Without a close: the writer thread records the synced end within a few of its periods.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while wal.synced_mark() != 11 {
        assert!(std::time::Instant::now() < deadline, "synced mark {} after 10 s, want 11", wal.synced_mark());
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    drop(wal);
    // A tail appended after the mark and torn: an append never acknowledged, repaired as before.
    let last = segments(dir.path()).pop().unwrap();
    let mut f = OpenOptions::new().append(true).open(&last).unwrap();
    f.write_all(&[0xde, 0xad, 0xbe, 0xef, 30, 0, 0, 0, 11, 0]).unwrap();
    drop(f);
    let wal = Wal::open(dir.path(), marked()).unwrap();
    assert_eq!(wal.last_index(), Some(10));
    drop(wal);
    // Entry 10 itself cut off (whole): below the mark the background thread wrote, so refused.
    let last = segments(dir.path()).pop().unwrap();
    let frame = *frame_offsets(&last).last().unwrap();
    OpenOptions::new().write(true).open(&last).unwrap().set_len(frame).unwrap();
    assert_refused_as_lost(Wal::open(dir.path(), marked()));
}

#[test]
fn truncate_lowers_the_mark_before_it_cuts() {
    let dir = tempfile::tempdir().unwrap();
    build_marked(dir.path(), 20);
    let wal = Wal::open(dir.path(), marked()).unwrap();
    wal.truncate(8).unwrap();
    // Dropped without a close (as by a crash right after the truncate): the log that is left is whole.
    drop(wal);
    let wal = Wal::open(dir.path(), marked()).unwrap();
    assert_eq!(wal.last_index(), Some(7));
    wal.append(vec![(8, payload(80))], Box::new(|r| r.unwrap())).unwrap();
    wal.close().unwrap();
    assert_eq!(Wal::open(dir.path(), marked()).unwrap().last_index(), Some(8));
}

#[test]
fn gap_between_segments_refuses_to_open() {
    let dir = tempfile::tempdir().unwrap();
    build(dir.path(), 40);
    let segs = segments(dir.path());
    std::fs::remove_file(&segs[1]).unwrap();
    assert_corrupt_at(Wal::open(dir.path(), opts()), &segs[2], 0);
}

/// Regression (found by the process-level tests): a damaged length field in the *last* segment made
/// its frame appear to run past the end of the file, and recovery cut it as a torn tail, silently
/// dropping the synced frames after it. A whole valid frame of a later index after the bad one proves
/// the damage is inside the log.
#[test]
fn length_field_damaged_in_the_last_segment_with_frames_after_it_refuses_to_open() {
    // Entries 1..=20 in one segment; returns that segment.
    fn one_segment(dir: &Path) -> PathBuf {
        let wal = Wal::open(dir, WalOptions { segment_bytes: 1 << 20, synced_mark_every: None }).unwrap();
        for i in 1..=20 {
            wal.append(vec![(i, payload(i))], Box::new(|r| r.unwrap())).unwrap();
        }
        wal.close().unwrap();
        segments(dir).pop().unwrap()
    }
    // +4096 on the frame's length: within the entry limit, far past the end of this small file.
    fn lengthen(path: &Path, frame: u64) {
        let f = OpenOptions::new().read(true).write(true).open(path).unwrap();
        let mut b = [0u8; 1];
        f.read_exact_at(&mut b, frame + 5).unwrap();
        f.write_all_at(&[b[0] ^ 0x10], frame + 5).unwrap();
        f.sync_all().unwrap();
    }

    let dir = tempfile::tempdir().unwrap();
    let last = one_segment(dir.path());
    let victim = frame_offsets(&last)[10];
    lengthen(&last, victim);
    assert_corrupt_at(
        Wal::open(dir.path(), WalOptions { segment_bytes: 1 << 20, synced_mark_every: None }),
        &last,
        victim,
    );
    // The same damage on the very last frame is a torn tail: nothing follows it.
    let dir = tempfile::tempdir().unwrap();
    let last = one_segment(dir.path());
    lengthen(&last, *frame_offsets(&last).last().unwrap());
    let wal = Wal::open(dir.path(), WalOptions { segment_bytes: 1 << 20, synced_mark_every: None }).unwrap();
    assert_eq!(wal.last_index(), Some(19));
}
