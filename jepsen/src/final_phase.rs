//! After the faults: heal everything, wait (bounded) until every member holds the same end offset
//! in every partition, then read every partition whole from every member alone and record it as
//! `final-read` entries. The checker then finds lost writes, unseen values and divergence.
//!
//! A fetch is served from the node's own applied state (`api.rs` reads its `TopicStore`, no
//! redirect), and `Client::fetch_from` sends it to that one node without retrying elsewhere, so
//! each final read is exactly what that node holds.

use std::collections::BTreeMap;
use std::time::Duration;

use busbar_client::Client;
use busbar_jepsen::history::{Op, OpType, Read};
use serde_json::json;
use tokio::time::Instant;

use crate::cluster::Node;
use crate::recorder::Recorder;
use crate::workload::{client_options, TOPIC};

/// Records one fetch asks for.
const FETCH_RECORDS: u32 = 2000;
/// Bound on the fetches of one partition from one node (a partition of a few minutes' run holds
/// well under FETCH_RECORDS * this).
const MAX_FETCHES: usize = 10_000;

/// Each member's end offset per partition, from the member itself; None for a member that did not
/// answer.
async fn end_offsets(node: &Node, partitions: u32) -> Option<Vec<u64>> {
    let addr = node.addr();
    tokio::time::timeout(Duration::from_secs(5), async {
        let c = Client::connect_with([addr.clone()], client_options()).await.ok()?;
        let mut ends = Vec::new();
        for p in 0..partitions {
            let r = c.fetch_from(&addr, TOPIC, p, 0, 1).await.ok()?;
            ends.push(r.end_offset);
        }
        Some(ends)
    })
    .await
    .ok()
    .flatten()
}

/// Waits until every member answers with the same end offsets; returns whether they converged,
/// and the last offsets seen per node.
pub async fn wait_converged(
    nodes: &[Node],
    partitions: u32,
    bound: Duration,
) -> (bool, BTreeMap<String, Option<Vec<u64>>>) {
    let deadline = Instant::now() + bound;
    let mut stable_rounds = 0;
    loop {
        let mut seen = BTreeMap::new();
        for n in nodes {
            seen.insert(n.name(), end_offsets(n, partitions).await);
        }
        let first = seen.values().next().cloned().flatten();
        let same = first.is_some() && seen.values().all(|v| *v == first);
        // Twice in a row: a straggler's producer retries have ended too.
        stable_rounds = if same { stable_rounds + 1 } else { 0 };
        if stable_rounds >= 2 {
            return (true, seen);
        }
        if Instant::now() >= deadline {
            return (false, seen);
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// Reads every partition from every node alone; records each as a `final-read`.
pub async fn read_all(rec: &Recorder, nodes: &[Node], partitions: u32) {
    for n in nodes {
        for p in 0..partitions {
            let process = rec.new_process();
            rec.invoke(process, Op::FinalRead { node: n.name(), partition: p, reads: vec![] });
            match read_partition(n, p).await {
                Ok(reads) => rec.ok(process, Op::FinalRead { node: n.name(), partition: p, reads }, Some(n.name())),
                Err(e) => {
                    rec.record(
                        process,
                        OpType::Fail,
                        Op::FinalRead { node: n.name(), partition: p, reads: vec![] },
                        Some(n.name()),
                        Some(e),
                    );
                }
            }
        }
    }
}

async fn read_partition(node: &Node, partition: u32) -> Result<Vec<Read>, String> {
    let addr = node.addr();
    let c = tokio::time::timeout(Duration::from_secs(5), Client::connect_with([addr.clone()], client_options()))
        .await
        .map_err(|_| format!("{addr}: connect timed out"))?
        .map_err(|e| e.to_string())?;
    let mut offset = 0u64;
    let mut reads = Vec::new();
    for _ in 0..MAX_FETCHES {
        let r =
            tokio::time::timeout(Duration::from_secs(10), c.fetch_from(&addr, TOPIC, partition, offset, FETCH_RECORDS))
                .await
                .map_err(|_| format!("{addr}: fetch at {offset} timed out"))?
                .map_err(|e| format!("{addr}: fetch at {offset}: {e}"))?;
        let Some(last) = r.records.last() else { return Ok(reads) };
        let next = last.offset + 1;
        for cr in &r.records {
            let value = cr.record.as_ref().and_then(|rec| std::str::from_utf8(&rec.value).ok()?.parse().ok());
            match value {
                Some(value) => reads.push(Read { partition, offset: cr.offset, value }),
                None => {
                    return Err(format!("{addr}: partition {partition} offset {}: not a workload value", cr.offset))
                }
            }
        }
        if next >= r.end_offset {
            return Ok(reads);
        }
        offset = next;
    }
    Err(format!("{addr}: partition {partition}: more than {MAX_FETCHES} fetches"))
}

/// A JSON summary of the convergence wait, for the results.
pub fn convergence_json(converged: bool, seen: &BTreeMap<String, Option<Vec<u64>>>) -> serde_json::Value {
    json!({ "converged": converged, "end_offsets": seen })
}
