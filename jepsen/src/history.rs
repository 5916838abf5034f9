//! The history of a run: one JSON object per line, in the order events happened.
//!
//! Jepsen's model: a *process* (one logical client) does one operation at a time. It writes an
//! `invoke` entry, then exactly one completion with the same `process` and `f`:
//! - `ok`: the operation happened, and the entry carries what it returned (offsets, records);
//! - `fail`: the operation definitely did not happen (the server said so before acting);
//! - `info`: indeterminate (a timeout, a lost connection): it may or may not have happened, now or
//!   later. A process that got `info` never invokes again; the client continues under a new
//!   process number, as in Jepsen.
//!
//! A history may end with invocations that never completed (the run stopped): the checker treats
//! them like `info`.
//!
//! Offsets are the partition's record offsets; a committed group offset is, as in Kafka, the
//! *next* offset to consume. Values are unique per run (each `send` writes a value never written
//! before), which is what lets the checker tell a lost write from a duplicate.

use std::io::{self, BufRead, Write};

use serde::{Deserialize, Serialize};

/// Whether an entry starts an operation or how it ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OpType {
    Invoke,
    Ok,
    Fail,
    Info,
}

/// One record as a consumer saw it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Read {
    pub partition: u32,
    pub offset: u64,
    pub value: u64,
}

/// One committed group offset: the next offset the group will consume in `partition`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct GroupOffset {
    pub partition: u32,
    pub offset: u64,
}

/// What an operation did; `f` names the kind in the JSON.
///
/// Fields that only a completion knows (`offset`, `reads`, ...) are absent or empty on the
/// invocation and on `fail`/`info` completions.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "f", rename_all = "kebab-case")]
pub enum Op {
    /// Append `value` to `partition` of the run's topic; `ok` carries the offset it got.
    Send {
        partition: u32,
        value: u64,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        offset: Option<u64>,
    },
    /// One poll by `consumer` (a stable name: a direct partition reader, or a group member).
    /// `ok` carries the records returned, in the order returned.
    Poll {
        consumer: String,
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        reads: Vec<Read>,
    },
    /// `consumer` now owns `partitions` (direct readers: the ones it chose; group members: the
    /// assignment of `generation`). Its next poll of a partition it did not own before starts a new
    /// monotonicity run for that partition.
    Assign {
        consumer: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        group: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        generation: Option<u64>,
        partitions: Vec<u32>,
    },
    /// `consumer` (a member of `group`) commits `offsets`; on `ok` the group has them.
    Commit { consumer: String, group: String, offsets: Vec<GroupOffset> },
    /// Reads the group's committed offsets; `ok` carries them.
    FetchCommitted {
        group: String,
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        offsets: Vec<GroupOffset>,
    },
    /// The final phase: everything `node` holds of `partition`, from the start of the log, read
    /// after the cluster healed. `ok` carries every record in offset order.
    FinalRead {
        node: String,
        partition: u32,
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        reads: Vec<Read>,
    },
    /// A fault started or ended (kill, pause, partition, ...). The checker does not judge these;
    /// they are there to read the history by.
    Nemesis {
        action: String,
        #[serde(default, skip_serializing_if = "serde_json::Value::is_null")]
        detail: serde_json::Value,
    },
}

/// One line of the history.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Entry {
    /// Position in the history, from 0, with no gaps.
    pub index: u64,
    /// Nanoseconds since the run started (monotonic clock).
    pub time_ns: u64,
    /// The logical client; `u64::MAX` is the nemesis.
    pub process: u64,
    #[serde(rename = "type")]
    pub kind: OpType,
    #[serde(flatten)]
    pub op: Op,
    /// The node the client spoke to, when it knows.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    /// Why a `fail` or `info` happened: the error code and message.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// The process number of the nemesis.
pub const NEMESIS: u64 = u64::MAX;

/// A history that could not be read.
#[derive(Debug, thiserror::Error)]
pub enum HistoryError {
    #[error("reading the history: {0}")]
    Io(#[from] io::Error),
    #[error("history line {line}: {source}")]
    Parse { line: usize, source: serde_json::Error },
}

/// Reads a JSON-lines history; blank lines are skipped.
pub fn read_history(input: impl BufRead) -> Result<Vec<Entry>, HistoryError> {
    let mut out = Vec::new();
    for (i, line) in input.lines().enumerate() {
        let line = line?;
        if line.trim().is_empty() {
            continue;
        }
        let e = serde_json::from_str(&line).map_err(|source| HistoryError::Parse { line: i + 1, source })?;
        out.push(e);
    }
    Ok(out)
}

/// Writes one entry as one line.
pub fn write_entry(mut out: impl Write, e: &Entry) -> io::Result<()> {
    serde_json::to_writer(&mut out, e)?;
    out.write_all(b"\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_round_trip_through_json_lines() {
        let entries = vec![
            Entry {
                index: 0,
                time_ns: 10,
                process: 3,
                kind: OpType::Invoke,
                op: Op::Send { partition: 1, value: 42, offset: None },
                node: None,
                error: None,
            },
            Entry {
                index: 1,
                time_ns: 20,
                process: 3,
                kind: OpType::Ok,
                op: Op::Send { partition: 1, value: 42, offset: Some(7) },
                node: Some("n1".into()),
                error: None,
            },
            Entry {
                index: 2,
                time_ns: 30,
                process: 4,
                kind: OpType::Ok,
                op: Op::Poll { consumer: "c1".into(), reads: vec![Read { partition: 1, offset: 7, value: 42 }] },
                node: None,
                error: None,
            },
        ];
        let mut buf = Vec::new();
        for e in &entries {
            write_entry(&mut buf, e).unwrap();
        }
        let text = String::from_utf8(buf.clone()).unwrap();
        assert!(text.lines().next().unwrap().contains(r#""f":"send""#), "{text}");
        assert!(text.lines().next().unwrap().contains(r#""type":"invoke""#), "{text}");
        assert_eq!(read_history(&buf[..]).unwrap(), entries);
    }

    #[test]
    fn a_bad_line_is_reported_with_its_number() {
        let input = b"{\"index\":0,\"time_ns\":0,\"process\":1,\"type\":\"invoke\",\"f\":\"send\",\"partition\":0,\"value\":1}\nnot json\n";
        match read_history(&input[..]) {
            Err(HistoryError::Parse { line, .. }) => assert_eq!(line, 2),
            other => panic!("expected a parse error on line 2, got {other:?}"),
        }
    }
}
