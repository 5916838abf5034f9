//! Read contiguity: a consumer reading a partition must get offset after offset, each the one
//! after the last (`poll-skip` when it jumps ahead, `nonmonotonic-poll` when it goes back or
//! repeats), within a poll and across polls, until its assignment changes. A final read, which
//! reads a whole partition from offset 0, is held to the same rule.

use std::collections::HashMap;

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

pub(crate) fn check(ops: &[Operation<'_>], vo: &VersionOrder, anomalies: &mut Anomalies) {
    // consumer -> partition -> last read. `ops` is in completion order, and a consumer does one
    // thing at a time, so this walks each consumer's reads in the order it made them.
    let mut last: HashMap<&str, HashMap<u32, Last>> = HashMap::new();
    for o in ops {
        match (o.op, o.outcome) {
            (Op::Assign { .. }, Outcome::Fail) => {}
            (Op::Assign { consumer, .. }, _) => {
                // Any (possible) assignment may move the consumer's positions: a new partition
                // starts at the group's committed offset, and a client may re-seek a kept one
                // too. Forgetting every position costs a little sensitivity and never a false
                // alarm.
                last.remove(consumer.as_str());
            }
            (Op::Poll { consumer, reads }, Outcome::Ok) => {
                let positions = last.entry(consumer.as_str()).or_default();
                for r in reads {
                    let prev =
                        positions.insert(r.partition, Last { offset: r.offset, value: r.value, index: o.index() });
                    if let Some(prev) = prev {
                        judge(vo, anomalies, json!({"consumer": consumer}), Some(prev), r, o.index());
                    }
                }
            }
            (Op::Poll { consumer, .. }, _) => {
                // An indeterminate poll may have returned records nobody recorded, moving the
                // consumer's positions by an unknown amount.
                last.remove(consumer.as_str());
            }
            (Op::FinalRead { node, partition, reads }, Outcome::Ok) => {
                let mut prev = None;
                for r in reads.iter().filter(|r| r.partition == *partition) {
                    judge(vo, anomalies, json!({"final_read_of": node}), prev, r, o.index());
                    prev = Some(Last { offset: r.offset, value: r.value, index: o.index() });
                }
            }
            _ => {}
        }
    }
}

/// Checks that `next` directly follows `prev` (or, with no `prev`, that a whole-log read starts
/// at offset 0).
fn judge(
    vo: &VersionOrder,
    anomalies: &mut Anomalies,
    reader: serde_json::Value,
    prev: Option<Last>,
    next: &Read,
    index: u64,
) {
    let expected = prev.map_or(0, |p| p.offset + 1);
    if next.offset == expected {
        return;
    }
    let mut case = json!({
        "partition": next.partition,
        "previous": prev.map(|p| json!({"offset": p.offset, "value": p.value, "index": p.index})),
        "next": {"offset": next.offset, "value": next.value, "index": index},
    });
    if let (Some(c), serde_json::Value::Object(reader)) = (case.as_object_mut(), reader) {
        c.extend(reader);
    }
    if next.offset > expected {
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
        anomalies.push(POLL_SKIP, case);
    } else {
        anomalies.push(NONMONOTONIC_POLL, case);
    }
}
