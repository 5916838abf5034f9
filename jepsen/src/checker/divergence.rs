//! Replicas that disagree: after the cluster healed and every node caught up, each node's final
//! read of a partition must be the same log. Raft applies the same entries in the same order on
//! every node, so any difference (a value, or a length) is a replication bug.

use std::collections::BTreeMap;

use serde_json::json;

use super::ops::{Operation, Outcome};
use super::report::{Anomalies, DIVERGENCE};
use crate::history::{Op, Read};

pub(crate) fn check(ops: &[Operation<'_>], anomalies: &mut Anomalies) {
    // partition -> node -> (index, records) of the node's last ok final read; `ops` is in
    // completion order, so a retried final read replaces the earlier one.
    let mut logs: BTreeMap<u32, BTreeMap<&str, (u64, Vec<&Read>)>> = BTreeMap::new();
    for o in ops.iter().filter(|o| o.outcome == Outcome::Ok) {
        if let Op::FinalRead { node, partition, reads } = o.op {
            let records = reads.iter().filter(|r| r.partition == *partition).collect();
            logs.entry(*partition).or_default().insert(node.as_str(), (o.index(), records));
        }
    }
    for (partition, nodes) in &logs {
        let nodes: Vec<_> = nodes.iter().collect();
        for (i, (a, (a_index, a_log))) in nodes.iter().enumerate() {
            for (b, (b_index, b_log)) in &nodes[i + 1..] {
                let Some(at) = first_difference(a_log, b_log) else { continue };
                let record = |log: &[&Read]| log.get(at).map(|r| json!({"offset": r.offset, "value": r.value}));
                let offset = a_log.get(at).or(b_log.get(at)).map(|r| r.offset);
                anomalies.push(
                    DIVERGENCE,
                    json!({"partition": partition, "nodes": [a, b], "indices": [a_index, b_index],
                           "lengths": [a_log.len(), b_log.len()], "position": at, "offset": offset,
                           "records": [record(a_log), record(b_log)]}),
                );
            }
        }
    }
}

/// The position of the first record the two logs disagree on (a record only one has counts).
fn first_difference(a: &[&Read], b: &[&Read]) -> Option<usize> {
    let common = a.len().min(b.len());
    (0..common)
        .find(|&i| (a[i].offset, a[i].value) != (b[i].offset, b[i].value))
        .or((a.len() != b.len()).then_some(common))
}
