//! Writes the history as the run goes: every entry gets the next index and the time since the run
//! started, goes to `history.jsonl` at once (a crash of the harness still leaves a readable
//! prefix) and stays in memory for the checker.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::Instant;

use busbar_jepsen::history::{write_entry, Entry, Op, OpType, NEMESIS};

struct Inner {
    out: BufWriter<File>,
    /// The nemesis schedule: the same nemesis entries, in a file of their own.
    schedule: BufWriter<File>,
    entries: Vec<Entry>,
    write_error: Option<String>,
}

/// The run's history. Shared by every client task (behind an `Arc`).
pub struct Recorder {
    inner: Mutex<Inner>,
    start: Instant,
    next_process: AtomicU64,
}

impl Recorder {
    pub fn create(history: &Path, schedule: &Path) -> anyhow::Result<Self> {
        Ok(Self {
            inner: Mutex::new(Inner {
                out: BufWriter::new(File::create(history)?),
                schedule: BufWriter::new(File::create(schedule)?),
                entries: Vec::new(),
                write_error: None,
            }),
            start: Instant::now(),
            next_process: AtomicU64::new(0),
        })
    }

    /// A process number never used before (a client that got `info` continues under a new one).
    pub fn new_process(&self) -> u64 {
        self.next_process.fetch_add(1, Ordering::Relaxed)
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panicking client task must not take the history down with it.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Appends one entry; returns its index.
    pub fn record(&self, process: u64, kind: OpType, op: Op, node: Option<String>, error: Option<String>) -> u64 {
        let mut g = self.lock();
        let index = g.entries.len() as u64;
        let time_ns = u64::try_from(self.start.elapsed().as_nanos()).unwrap_or(u64::MAX);
        let e = Entry { index, time_ns, process, kind, op, node, error };
        if let Err(err) = write_entry(&mut g.out, &e) {
            g.write_error.get_or_insert_with(|| err.to_string());
        }
        if process == NEMESIS {
            if let Err(err) = write_entry(&mut g.schedule, &e) {
                g.write_error.get_or_insert_with(|| err.to_string());
            }
        }
        g.entries.push(e);
        index
    }

    pub fn invoke(&self, process: u64, op: Op) {
        self.record(process, OpType::Invoke, op, None, None);
    }

    pub fn ok(&self, process: u64, op: Op, node: Option<String>) {
        self.record(process, OpType::Ok, op, node, None);
    }

    /// A nemesis event: `action` names it ("kill-start", "partition-stop", ...).
    pub fn nemesis(&self, action: &str, detail: serde_json::Value) {
        println!("[nemesis {:>6.1}s] {action} {detail}", self.start.elapsed().as_secs_f64());
        self.record(NEMESIS, OpType::Info, Op::Nemesis { action: action.to_string(), detail }, None, None);
    }

    /// Seconds since the run started.
    pub fn elapsed_s(&self) -> f64 {
        self.start.elapsed().as_secs_f64()
    }

    /// Flushes both files and returns every entry so far.
    pub fn finish(&self) -> anyhow::Result<Vec<Entry>> {
        let mut g = self.lock();
        g.out.flush()?;
        g.schedule.flush()?;
        if let Some(e) = &g.write_error {
            anyhow::bail!("writing the history: {e}");
        }
        Ok(g.entries.clone())
    }

    /// How many entries of each completion type so far (for progress lines).
    pub fn counts(&self) -> (usize, usize, usize, usize) {
        let g = self.lock();
        let mut c = (0, 0, 0, 0);
        for e in &g.entries {
            match e.kind {
                OpType::Invoke => c.0 += 1,
                OpType::Ok => c.1 += 1,
                OpType::Fail => c.2 += 1,
                OpType::Info => c.3 += 1,
            }
        }
        c
    }
}
