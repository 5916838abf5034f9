//! Read contiguity: a consumer reading a partition must get offset after offset, each the one
//! after the last (`poll-skip` when it jumps ahead, `nonmonotonic-poll` when it goes back or
//! repeats), within a poll and across polls, until its assignment changes. A final read, which
//! reads a whole partition from offset 0, is held to the same rule.
//!
//! Assignment changes reach a group member as events *during* a poll, and the harness can record
//! them (as `assign` entries) only after that poll completes: the last poll before a batch of
//! `assign` entries may already hold records of the new ownership, which restart at the group's
//! committed offset. So a discontinuity in that poll, in a partition whose ownership the batch
//! changes, is excused (one per change): it may be the restart. This costs a little sensitivity
//! on the polls right before a rebalance and buys no false alarm from the recording's lag.

use std::collections::{BTreeSet, HashMap};

use serde_json::json;

use super::ops::{Operation, Outcome};
use super::report::{Anomalies, NONMONOTONIC_POLL, POLL_SKIP};
use super::version_order::VersionOrder;
use crate::history::{Op, Read};

/// How many skipped offsets a case spells out; the count is always given.
const MAX_SKIPPED_LISTED: u64 = 20;

/// The last record a consumer read from a partition.
#[derive(Clone, Copy)]
struct Last {
    offset: u64,
    value: u64,
    index: u64,
}

/// A discontinuity found in a consumer's latest poll, reported once it is known whether an
/// assignment change follows that poll.
struct Held {
    partition: u32,
    anomaly: &'static str,
    case: serde_json::Value,
}

#[derive(Default)]
struct Consumer {
    /// Partition -> the last record read since the consumer's last assignment.
    last: HashMap<u32, Last>,
    /// The partitions the latest assignment gave it (or may have, after an indeterminate one).
    owned: BTreeSet<u32>,
    held: Vec<Held>,
    /// While `assign` entries follow the latest poll: how many times each partition's ownership
    /// changed in them.
    batch: Option<HashMap<u32, usize>>,
}

impl Consumer {
    /// Reports what the latest poll held back, less what the assignments after it excuse.
    fn settle(&mut self, anomalies: &mut Anomalies) {
        let mut excused = self.batch.take().unwrap_or_default();
        // The restart comes after any older discontinuity, so excuse from the last one back.
        let mut keep: Vec<Held> = Vec::new();
        for h in self.held.drain(..).rev() {
            match excused.get_mut(&h.partition) {
                Some(n) if *n > 0 => *n -= 1,
                _ => keep.push(h),
            }
        }
        for h in keep.into_iter().rev() {
            anomalies.push(h.anomaly, h.case);
        }
    }

    fn assign(&mut self, partitions: &[u32], outcome: Outcome) {
        let next: BTreeSet<u32> = partitions.iter().copied().collect();
        let batch = self.batch.get_or_insert_with(HashMap::new);
        let changed: Vec<u32> = match outcome {
            Outcome::Ok => self.owned.symmetric_difference(&next).copied().collect(),
            // Whether it took effect is unknown: any partition may have changed hands.
            Outcome::Info | Outcome::Fail => self.owned.union(&next).copied().collect(),
        };
        for p in changed {
            *batch.entry(p).or_default() += 1;
        }
        self.owned = match outcome {
            Outcome::Ok => next,
            Outcome::Info | Outcome::Fail => self.owned.union(&next).copied().collect(),
        };
        // Any (possible) assignment may move the consumer's positions: a new partition starts at
        // the group's committed offset, and a direct reader re-seeks the ones it keeps.
        self.last.clear();
    }
}

pub(crate) fn check(ops: &[Operation<'_>], vo: &VersionOrder, anomalies: &mut Anomalies) {
    // `ops` is in completion order, and a consumer does one thing at a time, so this walks each
    // consumer's reads in the order it made them.
    let mut consumers: HashMap<&str, Consumer> = HashMap::new();
    for o in ops {
        match (o.op, o.outcome) {
            (Op::Assign { .. }, Outcome::Fail) => {}
            (Op::Assign { consumer, partitions, .. }, outcome) => {
                consumers.entry(consumer.as_str()).or_default().assign(partitions, outcome);
            }
            (Op::Poll { consumer, reads }, outcome) => {
                let c = consumers.entry(consumer.as_str()).or_default();
                c.settle(anomalies);
                match outcome {
                    Outcome::Ok => {
                        for r in reads {
                            let prev =
                                c.last.insert(r.partition, Last { offset: r.offset, value: r.value, index: o.index() });
                            // A consumer's first read after an assignment may start anywhere.
                            let Some(prev) = prev else { continue };
                            if let Some(found) = judge(vo, json!({"consumer": consumer}), Some(prev), r, o.index()) {
                                c.held.push(found);
                            }
                        }
                    }
                    // An indeterminate poll may have returned records nobody recorded, moving the
                    // consumer's positions by an unknown amount.
                    Outcome::Info => c.last.clear(),
                    Outcome::Fail => {}
                }
            }
            (Op::FinalRead { node, partition, reads }, Outcome::Ok) => {
                let mut prev = None;
                for r in reads.iter().filter(|r| r.partition == *partition) {
                    if let Some(h) = judge(vo, json!({"final_read_of": node}), prev, r, o.index()) {
                        anomalies.push(h.anomaly, h.case);
                    }
                    prev = Some(Last { offset: r.offset, value: r.value, index: o.index() });
                }
            }
            _ => {}
        }
    }
    let mut names: Vec<&str> = consumers.keys().copied().collect();
    names.sort_unstable();
    for name in names {
        if let Some(c) = consumers.get_mut(name) {
            c.settle(anomalies);
        }
    }
}

/// Checks that `next` directly follows `prev` (or, with no `prev`, that a whole-log read starts
/// at offset 0); returns the discontinuity if not.
fn judge(vo: &VersionOrder, reader: serde_json::Value, prev: Option<Last>, next: &Read, index: u64) -> Option<Held> {
    let expected = prev.map_or(0, |p| p.offset + 1);
    if next.offset == expected {
        return None;
    }
    let mut case = json!({
        "partition": next.partition,
        "previous": prev.map(|p| json!({"offset": p.offset, "value": p.value, "index": p.index})),
        "next": {"offset": next.offset, "value": next.value, "index": index},
    });
    if let (Some(c), serde_json::Value::Object(reader)) = (case.as_object_mut(), reader) {
        c.extend(reader);
    }
    let anomaly = if next.offset > expected {
        // Offsets are dense: every offset below one that was read exists, so all of these were
        // jumped over. Name what the version order knows of them.
        let count = next.offset - expected;
        let skipped: Vec<_> = (expected..next.offset)
            .take(MAX_SKIPPED_LISTED as usize)
            .map(|off| json!({"offset": off, "value": vo.value_at(next.partition, off)}))
            .collect();
        if let Some(c) = case.as_object_mut() {
            c.insert("skipped_count".into(), json!(count));
            c.insert("skipped".into(), json!(skipped));
        }
        POLL_SKIP
    } else {
        NONMONOTONIC_POLL
    };
    Some(Held { partition: next.partition, anomaly, case })
}
