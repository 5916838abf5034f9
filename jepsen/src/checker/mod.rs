//! The history checker: every anomaly of Jepsen's Kafka workload, plus consumer-group offset
//! checks and per-node divergence. See `docs/jepsen.md`.
//!
//! The checker pairs invocations with completions (`ops`), builds the version order of each
//! partition from everything observed (`version_order`), then runs one family of checks per
//! module over them. It never panics on a bad history: what it cannot use is reported as
//! `malformed-history`, and the rest is still checked.
//!
//! The anomalies (keys of [`Report::anomalies`]); each case names the entries (`index`) involved:
//!
//! | name | what was observed |
//! |---|---|
//! | `inconsistent-offsets` | two values at one (partition, offset), by acks, polls or final reads |
//! | `duplicate` | one value at two (partition, offset)s |
//! | `lost-write` | an ok send missing from some node's final read of its partition; or, with no final read of it, never read although a read reached its offset |
//! | `unseen` | an ok send never read, with nothing proving it lost |
//! | `g1a` | a read of a failed send's value |
//! | `nonmonotonic-send` | one process's ok sends to a partition got non-increasing offsets |
//! | `poll-skip` / `nonmonotonic-poll` | a consumer's next read of a partition was not the offset after its last (since its last assignment); a final read not 0, 1, 2, ... |
//! | `commit-backwards` | a read of committed offsets shows less than an earlier read did, or than an earlier ok commit after which a lower commit was accepted |
//! | `commit-not-visible` | a read of committed offsets started after an ok commit shows less than it, or lacks its partition |
//! | `takeover-skip` | a member's first read of a partition it newly got is above every committed offset it could have started from |
//! | `divergence` | two nodes' final reads of a partition differ (a value, or the length) |
//! | `malformed-history` | the history breaks its own rules (pairing, indices, unique values, an ok send without offset, a read of a value never sent) |
//!
//! Indeterminate operations (`info`, or never completed) may or may not have happened: their
//! values may appear or not, and a commit in flight may have set the offset a new owner starts
//! from. Real-time order is order in the history.

mod divergence;
mod groups;
mod ops;
mod polls;
mod report;
mod sends;
mod version_order;

use std::collections::HashSet;

pub use report::{
    Report, Stats, COMMIT_BACKWARDS, COMMIT_NOT_VISIBLE, DIVERGENCE, DUPLICATE, G1A, INCONSISTENT_OFFSETS, LOST_WRITE,
    MALFORMED_HISTORY, NONMONOTONIC_POLL, NONMONOTONIC_SEND, POLL_SKIP, TAKEOVER_SKIP, UNSEEN,
};

use crate::history::{Entry, Op};
use ops::{Operation, Outcome};
use report::Anomalies;
use version_order::VersionOrder;

/// Checks a whole history (as read by [`crate::history::read_history`]) and reports every anomaly.
pub fn check(history: &[Entry]) -> Report {
    let mut anomalies = Anomalies::default();
    let ops = ops::pair(history, &mut anomalies);
    let vo = VersionOrder::build(&ops);
    let finals = sends::FinalReads::build(&ops);
    vo.check(&mut anomalies);
    sends::check(&ops, &vo, &finals, &mut anomalies);
    polls::check(&ops, &vo, &mut anomalies);
    groups::check(&ops, &mut anomalies);
    divergence::check(&ops, &mut anomalies);
    let stats = stats(history, &ops, &vo, &finals);
    Report::new(anomalies, stats)
}

fn stats(history: &[Entry], ops: &[Operation<'_>], vo: &VersionOrder, finals: &sends::FinalReads<'_>) -> Stats {
    let mut s = Stats {
        entries: history.len() as u64,
        distinct_values_read: vo.read_by.len() as u64,
        final_read_nodes: finals.nodes() as u64,
        sends_info_seen: sends::info_sends_seen(ops, vo),
        nemesis_events: history.iter().filter(|e| matches!(e.op, Op::Nemesis { .. })).count() as u64,
        ..Stats::default()
    };
    let mut partitions: HashSet<u32> = vo.partitions().into_iter().collect();
    for o in ops {
        let ok = o.outcome == Outcome::Ok;
        match o.op {
            Op::Send { partition, .. } => {
                partitions.insert(*partition);
                s.sends_invoked += u64::from(o.invoke.is_some());
                match o.outcome {
                    Outcome::Ok => s.sends_ok += 1,
                    Outcome::Fail => s.sends_failed += 1,
                    Outcome::Info => s.sends_info += 1,
                }
            }
            Op::Poll { reads, .. } => {
                s.polls_invoked += u64::from(o.invoke.is_some());
                if ok {
                    s.polls_ok += 1;
                    s.poll_reads += reads.len() as u64;
                }
            }
            Op::Assign { .. } => s.assigns_ok += u64::from(ok),
            Op::Commit { .. } => s.commits_ok += u64::from(ok),
            Op::FetchCommitted { .. } => s.fetch_committed_ok += u64::from(ok),
            Op::FinalRead { .. } => s.final_reads_ok += u64::from(ok),
            Op::Nemesis { .. } => {}
        }
    }
    s.partitions = partitions.len() as u64;
    s
}
