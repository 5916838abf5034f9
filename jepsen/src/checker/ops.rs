//! Pairs each invocation with its completion, and reports what breaks the history's own rules
//! (`malformed-history`) instead of trusting it: a checker that panics or guesses on a broken
//! history hides exactly the runs that need looking at.

use std::collections::{BTreeMap, HashMap};

use serde_json::json;

use super::report::{Anomalies, MALFORMED_HISTORY};
use crate::history::{Entry, Op, OpType};

/// How an operation ended, as far as the checker may rely on it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Outcome {
    Ok,
    /// Definitely did not happen.
    Fail,
    /// May or may not have happened: `info`, never completed, or an `ok` the checker cannot use.
    Info,
}

/// One operation: an invocation and its completion, either of which may be missing.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Operation<'h> {
    pub process: u64,
    pub outcome: Outcome,
    /// What the operation did: the completion's op when it carries results (`ok`), otherwise
    /// the invocation's.
    pub op: &'h Op,
    pub invoke: Option<&'h Entry>,
    pub complete: Option<&'h Entry>,
    /// Positions in the history. The history is written in the order events happened, so
    /// "`a.end < b.start`" means a completed before b was invoked: real-time order.
    pub start: usize,
    /// `usize::MAX` when the operation never completed.
    pub end: usize,
}

impl Operation<'_> {
    /// The index that names this operation in a report: its completion's, else its invocation's.
    pub fn index(&self) -> u64 {
        self.complete.or(self.invoke).map_or(0, |e| e.index)
    }

    pub fn invoke_index(&self) -> Option<u64> {
        self.invoke.map(|e| e.index)
    }
}

/// The name of an op's kind, as in the JSON `f` field.
pub(crate) fn f_name(op: &Op) -> &'static str {
    match op {
        Op::Send { .. } => "send",
        Op::Poll { .. } => "poll",
        Op::Assign { .. } => "assign",
        Op::Commit { .. } => "commit",
        Op::FetchCommitted { .. } => "fetch-committed",
        Op::FinalRead { .. } => "final-read",
        Op::Nemesis { .. } => "nemesis",
    }
}

/// Pairs the history into operations, ordered by completion (never-completed ones last, by
/// invocation). Nemesis entries are not operations and are skipped.
pub(crate) fn pair<'h>(history: &'h [Entry], anomalies: &mut Anomalies) -> Vec<Operation<'h>> {
    let mut ops: Vec<Operation<'h>> = Vec::new();
    let mut pending: HashMap<u64, (usize, &'h Entry)> = HashMap::new();
    let mut index_reported = false;

    for (pos, e) in history.iter().enumerate() {
        // One report is enough: an off-by-one at the start shifts every later index too.
        if !index_reported && e.index != pos as u64 {
            index_reported = true;
            anomalies.push(
                MALFORMED_HISTORY,
                json!({"reason": "entry index differs from its position in the history",
                       "position": pos, "index": e.index}),
            );
        }
        if matches!(e.op, Op::Nemesis { .. }) {
            continue;
        }
        match e.kind {
            OpType::Invoke => {
                if let Some((p_pos, p)) = pending.insert(e.process, (pos, e)) {
                    anomalies.push(
                        MALFORMED_HISTORY,
                        json!({"reason": "invocation while the process has one pending",
                               "process": e.process, "pending": p.index, "index": e.index}),
                    );
                    ops.push(unfinished(p_pos, p));
                }
            }
            kind => {
                let invocation = match pending.remove(&e.process) {
                    Some((i_pos, inv)) if f_name(&inv.op) == f_name(&e.op) => Some((i_pos, inv)),
                    Some((i_pos, inv)) => {
                        anomalies.push(
                            MALFORMED_HISTORY,
                            json!({"reason": "completion of a different operation than the pending one",
                                   "process": e.process, "invoke": inv.index, "index": e.index,
                                   "invoked": f_name(&inv.op), "completed": f_name(&e.op)}),
                        );
                        ops.push(unfinished(i_pos, inv));
                        None
                    }
                    None => {
                        anomalies.push(
                            MALFORMED_HISTORY,
                            json!({"reason": "completion without an invocation",
                                   "process": e.process, "index": e.index, "f": f_name(&e.op)}),
                        );
                        None
                    }
                };
                ops.push(completed(pos, e, invocation, kind, anomalies));
            }
        }
    }
    let mut rest: Vec<_> = pending.into_values().collect();
    rest.sort_by_key(|(pos, _)| *pos);
    ops.extend(rest.into_iter().map(|(pos, e)| unfinished(pos, e)));
    ops.sort_by_key(|o| (o.end, o.start));

    check_unique_send_values(&ops, anomalies);
    check_read_partitions(&ops, anomalies);
    ops
}

fn unfinished(pos: usize, inv: &Entry) -> Operation<'_> {
    Operation {
        process: inv.process,
        outcome: Outcome::Info,
        op: &inv.op,
        invoke: Some(inv),
        complete: None,
        start: pos,
        end: usize::MAX,
    }
}

fn completed<'h>(
    pos: usize,
    e: &'h Entry,
    invocation: Option<(usize, &'h Entry)>,
    kind: OpType,
    anomalies: &mut Anomalies,
) -> Operation<'h> {
    let mut outcome = match kind {
        OpType::Ok => Outcome::Ok,
        OpType::Fail => Outcome::Fail,
        OpType::Info | OpType::Invoke => Outcome::Info,
    };
    if let Op::Send { partition, value, offset } = &e.op {
        if outcome == Outcome::Ok && offset.is_none() {
            anomalies.push(
                MALFORMED_HISTORY,
                json!({"reason": "ok send without an offset", "index": e.index, "value": value}),
            );
            // It happened, but where is unknown: as useful as an indeterminate send.
            outcome = Outcome::Info;
        }
        if let Some((_, Entry { op: Op::Send { partition: ip, value: iv, .. }, index, .. })) = invocation {
            if ip != partition || iv != value {
                anomalies.push(
                    MALFORMED_HISTORY,
                    json!({"reason": "send completion differs from its invocation",
                           "invoke": index, "index": e.index,
                           "invoked": {"partition": ip, "value": iv},
                           "completed": {"partition": partition, "value": value}}),
                );
            }
        }
    }
    // A fail or info completion carries no results; its invocation says what was attempted.
    let op = match (outcome, invocation) {
        (Outcome::Ok, _) | (_, None) => &e.op,
        (_, Some((_, inv))) => &inv.op,
    };
    Operation {
        process: e.process,
        outcome,
        op,
        invoke: invocation.map(|(_, inv)| inv),
        complete: Some(e),
        start: invocation.map_or(pos, |(p, _)| p),
        end: pos,
    }
}

/// The checker tells lost writes from duplicates by values, so values must be unique.
fn check_unique_send_values(ops: &[Operation<'_>], anomalies: &mut Anomalies) {
    let mut by_value: BTreeMap<u64, Vec<u64>> = BTreeMap::new();
    for o in ops {
        if let Op::Send { value, .. } = o.op {
            by_value.entry(*value).or_default().push(o.invoke_index().unwrap_or_else(|| o.index()));
        }
    }
    for (value, sends) in by_value.into_iter().filter(|(_, s)| s.len() > 1) {
        anomalies.push(
            MALFORMED_HISTORY,
            json!({"reason": "value sent more than once (values must be unique per run)",
                   "value": value, "sends": sends}),
        );
    }
}

/// A final read is of one partition; a record of another in it is the recorder's mistake.
fn check_read_partitions(ops: &[Operation<'_>], anomalies: &mut Anomalies) {
    for o in ops.iter().filter(|o| o.outcome == Outcome::Ok) {
        if let Op::FinalRead { node, partition, reads } = o.op {
            if let Some(r) = reads.iter().find(|r| r.partition != *partition) {
                anomalies.push(
                    MALFORMED_HISTORY,
                    json!({"reason": "final read holds a record of another partition",
                           "index": o.index(), "node": node, "partition": partition,
                           "read": {"partition": r.partition, "offset": r.offset, "value": r.value}}),
                );
            }
        }
    }
}
