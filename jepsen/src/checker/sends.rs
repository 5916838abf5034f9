//! What became of each send: `lost-write` (acknowledged, then missing where it must be),
//! `unseen` (acknowledged, never read, though nothing proves it lost), `g1a` (failed, yet read),
//! and `nonmonotonic-send` (one process's acknowledged offsets going backwards).

use std::collections::{BTreeMap, HashMap, HashSet};

use serde_json::json;

use super::ops::{Operation, Outcome};
use super::report::{cite, Anomalies, G1A, LOST_WRITE, MALFORMED_HISTORY, NONMONOTONIC_SEND, UNSEEN};
use super::version_order::VersionOrder;
use crate::history::Op;

/// The last ok final read of each node, per partition: what that node holds, in full.
pub(crate) struct FinalReads<'h> {
    /// partition -> node -> (entry index, values held).
    by_partition: BTreeMap<u32, BTreeMap<&'h str, (u64, HashSet<u64>)>>,
}

impl<'h> FinalReads<'h> {
    pub(crate) fn build(ops: &[Operation<'h>]) -> FinalReads<'h> {
        let mut by_partition: BTreeMap<u32, BTreeMap<&'h str, (u64, HashSet<u64>)>> = BTreeMap::new();
        // `ops` is in completion order, so a later final read of the same node replaces an
        // earlier one: the harness retries a final read until it succeeds.
        for o in ops.iter().filter(|o| o.outcome == Outcome::Ok) {
            if let Op::FinalRead { node, partition, reads } = o.op {
                let values = reads.iter().filter(|r| r.partition == *partition).map(|r| r.value).collect();
                by_partition.entry(*partition).or_default().insert(node.as_str(), (o.index(), values));
            }
        }
        FinalReads { by_partition }
    }

    pub(crate) fn nodes(&self) -> usize {
        self.by_partition.values().flat_map(|nodes| nodes.keys()).collect::<HashSet<_>>().len()
    }
}

pub(crate) fn check(ops: &[Operation<'_>], vo: &VersionOrder, finals: &FinalReads<'_>, anomalies: &mut Anomalies) {
    lost_or_unseen(ops, vo, finals, anomalies);
    aborted_reads(ops, vo, anomalies);
    reads_of_unsent_values(ops, vo, anomalies);
    nonmonotonic_sends(ops, anomalies);
}

fn lost_or_unseen(ops: &[Operation<'_>], vo: &VersionOrder, finals: &FinalReads<'_>, anomalies: &mut Anomalies) {
    for o in ops.iter().filter(|o| o.outcome == Outcome::Ok) {
        let Op::Send { partition, value, offset: Some(offset) } = o.op else { continue };
        let case = |extra: serde_json::Value| {
            let mut c = json!({"partition": partition, "offset": offset, "value": value,
                               "index": o.index(), "invoke": o.invoke_index()});
            if let (Some(c), serde_json::Value::Object(extra)) = (c.as_object_mut(), extra) {
                c.extend(extra);
            }
            c
        };
        if let Some(nodes) = finals.by_partition.get(partition) {
            // Final reads hold whole logs, read after the cluster healed: an acknowledged value
            // missing from any of them is gone from that node, whatever polls saw earlier.
            let missing: Vec<_> = nodes
                .iter()
                .filter(|(_, (_, values))| !values.contains(value))
                .map(|(node, (index, _))| json!({"node": node, "final_read": index}))
                .collect();
            if !missing.is_empty() {
                anomalies.push(LOST_WRITE, case(json!({"missing_from_final_reads": missing})));
            }
            continue;
        }
        if vo.read_by.contains_key(value) {
            continue;
        }
        match vo.max_read.get(partition) {
            // Offsets are dense and reads run in order, so a read at or past this offset passed
            // the slot the ack named without returning this value.
            Some(&(max, max_index)) if max >= *offset => anomalies.push(
                LOST_WRITE,
                case(json!({"highest_read_offset": max, "highest_read_index": max_index,
                            "read_at_offset": vo.value_at(*partition, *offset)})),
            ),
            _ => anomalies.push(UNSEEN, case(json!({}))),
        }
    }
}

/// A failed send definitely did not happen; a read of its value is a read of an aborted write.
fn aborted_reads(ops: &[Operation<'_>], vo: &VersionOrder, anomalies: &mut Anomalies) {
    for o in ops.iter().filter(|o| o.outcome == Outcome::Fail) {
        let Op::Send { partition, value, .. } = o.op else { continue };
        if let Some(reads) = vo.read_by.get(value) {
            let at: Vec<_> = vo
                .locations
                .get(value)
                .map(|l| l.keys().map(|(p, off)| json!({"partition": p, "offset": off})).collect())
                .unwrap_or_default();
            anomalies.push(
                G1A,
                json!({"value": value, "partition": partition, "index": o.index(), "invoke": o.invoke_index(),
                       "read_at": at, "reads": cite(reads)}),
            );
        }
    }
}

/// Every value read must come from some send; anything else is garbage from the server or a
/// recorder that lost sends, and either way the other checks cannot judge it.
fn reads_of_unsent_values(ops: &[Operation<'_>], vo: &VersionOrder, anomalies: &mut Anomalies) {
    let sent: HashSet<u64> =
        ops.iter().filter_map(|o| if let Op::Send { value, .. } = o.op { Some(*value) } else { None }).collect();
    let mut unsent: Vec<(&u64, &Vec<u64>)> = vo.read_by.iter().filter(|(v, _)| !sent.contains(v)).collect();
    unsent.sort_by_key(|(v, _)| **v);
    for (value, reads) in unsent {
        anomalies.push(
            MALFORMED_HISTORY,
            json!({"reason": "read of a value no send wrote", "value": value, "reads": cite(reads)}),
        );
    }
}

fn nonmonotonic_sends(ops: &[Operation<'_>], anomalies: &mut Anomalies) {
    // process -> partition -> (offset, value, index) of its last ok send there. A process runs
    // one operation at a time, so completion order is its program order.
    let mut last: HashMap<u64, HashMap<u32, (u64, u64, u64)>> = HashMap::new();
    for o in ops.iter().filter(|o| o.outcome == Outcome::Ok) {
        let Op::Send { partition, value, offset: Some(offset) } = o.op else { continue };
        let prev = last.entry(o.process).or_default().insert(*partition, (*offset, *value, o.index()));
        if let Some((p_off, p_val, p_idx)) = prev {
            if *offset <= p_off {
                anomalies.push(
                    NONMONOTONIC_SEND,
                    json!({"process": o.process, "partition": partition,
                           "previous": {"offset": p_off, "value": p_val, "index": p_idx},
                           "next": {"offset": offset, "value": value, "index": o.index()}}),
                );
            }
        }
    }
}

/// How many indeterminate sends some read proved to have happened.
pub(crate) fn info_sends_seen(ops: &[Operation<'_>], vo: &VersionOrder) -> u64 {
    ops.iter()
        .filter(|o| o.outcome == Outcome::Info)
        .filter(|o| matches!(o.op, Op::Send { value, .. } if vo.read_by.contains_key(value)))
        .count() as u64
}
