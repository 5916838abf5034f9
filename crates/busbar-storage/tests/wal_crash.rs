//! Kill -9 a process that is appending, reopen its log, and check that every acknowledged entry is there.
//!
//! The test binary re-executes itself: with `WAL_CRASH_CHILD_DIR` set, `crash_child` appends entries in a
//! loop and prints `WALACK <index>` for each entry only after its flush callback fired. The parent kills it
//! mid-stream with SIGKILL, reopens the log and checks: every acknowledged index is present with its
//! payload, the log is contiguous, and every entry present (acknowledged or not) is whole and correct.
//! A process kill keeps the page cache, so this checks the acknowledgement protocol and recovery from a
//! write cut short, not power loss.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use busbar_storage::wal::{Wal, WalOptions};
use bytes::Bytes;

const CHILD_ENV: &str = "WAL_CRASH_CHILD_DIR";
const MARK: &str = "WALACK ";

fn opts() -> WalOptions {
    // Small segments so that kills also land around rotations.
    WalOptions { segment_bytes: 32 * 1024, ..WalOptions::default() }
}

/// Derived from the index alone, so that any entry read back can be checked.
fn payload(index: u64) -> Bytes {
    let len = (index * 7919 % 700) as usize;
    Bytes::from((0..len).map(|i| (index as usize).wrapping_mul(31).wrapping_add(i) as u8).collect::<Vec<u8>>())
}

#[test]
fn crash_child() {
    // In a normal test run this is a no-op; the parent runs it in a child process.
    let Ok(dir) = std::env::var(CHILD_ENV) else { return };
    let wal = Wal::open(Path::new(&dir), opts()).unwrap();
    let mut next = wal.last_index().map_or(1, |l| l + 1);
    for round in 0u64.. {
        let n = round % 8 + 1;
        let batch: Vec<_> = (next..next + n).map(|i| (i, payload(i))).collect();
        let (lo, hi) = (next, next + n);
        wal.append(
            batch,
            Box::new(move |r| {
                r.unwrap();
                let mut out = std::io::stdout().lock();
                for i in lo..hi {
                    // Stdout closed means the parent is gone: nothing left to do.
                    if writeln!(out, "{MARK}{i}").and_then(|()| out.flush()).is_err() {
                        std::process::exit(0);
                    }
                }
            }),
        )
        .unwrap();
        next = hi;
        if round > 5_000_000 {
            break;
        }
    }
}

#[test]
fn acknowledged_entries_survive_sigkill() {
    let dir = tempfile::tempdir().unwrap();
    let exe = std::env::current_exe().unwrap();
    let mut all_acked = 0u64;
    for (round, kill_after) in [50u64, 1_000, 7, 3_000, 400].into_iter().enumerate() {
        let mut child = Command::new(&exe)
            .args(["crash_child", "--exact", "--nocapture", "--test-threads=1"])
            .env(CHILD_ENV, dir.path())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel();
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                // libtest may print its own text on the same line before ours.
                if let Some(at) = line.find(MARK) {
                    if tx.send(line[at + MARK.len()..].trim().parse::<u64>().unwrap()).is_err() {
                        break;
                    }
                }
            }
        });

        let mut acked = Vec::new();
        while (acked.len() as u64) < kill_after {
            match rx.recv_timeout(Duration::from_secs(60)) {
                Ok(i) => acked.push(i),
                Err(e) => {
                    let _ = child.kill();
                    panic!("round {round}: child stopped acknowledging after {} acks: {e}", acked.len());
                }
            }
        }
        child.kill().unwrap(); // SIGKILL on unix
        child.wait().unwrap();
        reader.join().unwrap();
        // Acks printed before the kill but not yet read count too: they were acknowledged.
        acked.extend(rx.try_iter());

        let wal = Wal::open(dir.path(), opts()).unwrap();
        let last = wal.last_index().unwrap();
        let max_acked = *acked.iter().max().unwrap();
        assert!(last >= max_acked, "round {round}: acknowledged up to {max_acked} but the log ends at {last}");
        assert_eq!(wal.first_index(), Some(1));
        let entries = wal.read_range(1, last + 1).unwrap();
        assert_eq!(entries.len() as u64, last, "round {round}: log is not contiguous");
        for (n, (i, p)) in entries.iter().enumerate() {
            assert_eq!(*i, n as u64 + 1);
            assert_eq!(*p, payload(*i), "round {round}: entry {i} has the wrong payload");
        }
        for i in &acked {
            assert_eq!(wal.read(*i).unwrap(), Some(payload(*i)), "round {round}: acknowledged {i} lost");
        }
        all_acked += acked.len() as u64;
        wal.close().unwrap();
    }
    assert!(all_acked > 4_000);
}
