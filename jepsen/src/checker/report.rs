//! What the checker hands back: the verdict, every anomaly with the entries that show it, and the
//! counts that say how much the history exercised (a valid history with no reads proves nothing).

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde::{Deserialize, Serialize};

pub const LOST_WRITE: &str = "lost-write";
pub const UNSEEN: &str = "unseen";
pub const DUPLICATE: &str = "duplicate";
pub const INCONSISTENT_OFFSETS: &str = "inconsistent-offsets";
pub const NONMONOTONIC_SEND: &str = "nonmonotonic-send";
pub const POLL_SKIP: &str = "poll-skip";
pub const NONMONOTONIC_POLL: &str = "nonmonotonic-poll";
pub const G1A: &str = "g1a";
pub const COMMIT_BACKWARDS: &str = "commit-backwards";
pub const COMMIT_NOT_VISIBLE: &str = "commit-not-visible";
pub const TAKEOVER_SKIP: &str = "takeover-skip";
pub const DIVERGENCE: &str = "divergence";
pub const MALFORMED_HISTORY: &str = "malformed-history";

/// How many entry indices a case lists when many entries saw the same thing: enough to find them
/// in the history, few enough that one popular value does not swamp the report.
const MAX_CITED: usize = 10;

/// The checker's verdict on one history.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Report {
    /// True iff no anomaly of any kind (malformed histories included) was found.
    pub valid: bool,
    /// Anomaly name (kebab-case, see the constants in this module) to its cases; each case names
    /// the history entries (by `index`), values, partitions and offsets involved.
    pub anomalies: BTreeMap<String, Vec<serde_json::Value>>,
    pub stats: Stats,
}

/// How much the history exercised.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stats {
    pub entries: u64,
    pub sends_invoked: u64,
    pub sends_ok: u64,
    pub sends_failed: u64,
    /// Indeterminate sends: `info`, or never completed.
    pub sends_info: u64,
    /// Indeterminate sends whose value some read returned (so they did happen).
    pub sends_info_seen: u64,
    pub polls_invoked: u64,
    pub polls_ok: u64,
    /// Records returned by ok polls, repeats included.
    pub poll_reads: u64,
    /// Distinct values returned by ok polls and final reads.
    pub distinct_values_read: u64,
    pub assigns_ok: u64,
    pub commits_ok: u64,
    pub fetch_committed_ok: u64,
    pub final_reads_ok: u64,
    /// Distinct nodes with at least one ok final read.
    pub final_read_nodes: u64,
    /// Distinct partitions any send or read touched.
    pub partitions: u64,
    pub nemesis_events: u64,
}

impl Report {
    pub(crate) fn new(anomalies: Anomalies, stats: Stats) -> Report {
        let anomalies = anomalies.0;
        Report { valid: anomalies.is_empty(), anomalies, stats }
    }

    /// A few lines for a human: the verdict, each anomaly with its count, the key counts.
    pub fn summary(&self) -> String {
        let s = &self.stats;
        let mut out = String::new();
        let verdict = if self.valid { "VALID" } else { "INVALID" };
        let _ = writeln!(out, "history: {verdict} ({} entries)", s.entries);
        if self.anomalies.is_empty() {
            let _ = writeln!(out, "anomalies: none");
        } else {
            let list: Vec<String> =
                self.anomalies.iter().map(|(name, cases)| format!("{name}: {}", cases.len())).collect();
            let _ = writeln!(out, "anomalies: {}", list.join(", "));
        }
        let _ = writeln!(
            out,
            "sends: {} invoked, {} ok, {} failed, {} indeterminate ({} of them seen)",
            s.sends_invoked, s.sends_ok, s.sends_failed, s.sends_info, s.sends_info_seen
        );
        let _ = writeln!(
            out,
            "polls: {} invoked, {} ok, {} records read, {} distinct values read",
            s.polls_invoked, s.polls_ok, s.poll_reads, s.distinct_values_read
        );
        let _ = writeln!(
            out,
            "groups: {} assigns, {} commits, {} committed-offset reads (all ok); final reads: {} ok from {} nodes; \
             {} partitions; {} nemesis events",
            s.assigns_ok,
            s.commits_ok,
            s.fetch_committed_ok,
            s.final_reads_ok,
            s.final_read_nodes,
            s.partitions,
            s.nemesis_events
        );
        out
    }
}

/// The cases found so far, by anomaly name; only names with at least one case appear.
#[derive(Debug, Default)]
pub(crate) struct Anomalies(BTreeMap<String, Vec<serde_json::Value>>);

impl Anomalies {
    pub(crate) fn push(&mut self, name: &str, case: serde_json::Value) {
        self.0.entry(name.to_owned()).or_default().push(case);
    }
}

/// Entry indices for a case: the first few, and how many there were.
pub(crate) fn cite(indices: &[u64]) -> serde_json::Value {
    if indices.len() <= MAX_CITED {
        serde_json::json!(indices)
    } else {
        serde_json::json!({ "first": &indices[..MAX_CITED], "count": indices.len() })
    }
}
