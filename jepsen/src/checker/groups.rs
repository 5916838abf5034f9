//! Consumer-group offsets: a group's committed offset never goes back (`commit-backwards`), an
//! acknowledged commit is seen by every later read of the offsets (`commit-not-visible`), and a
//! member taking a partition over resumes no later than the group's committed offset, so no
//! record goes unconsumed (`takeover-skip`).
//!
//! Real-time order is position in the history: an operation whose completion is recorded before
//! another's invocation finished before the other started.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use serde_json::json;

use super::ops::{Operation, Outcome};
use super::report::{Anomalies, COMMIT_BACKWARDS, COMMIT_NOT_VISIBLE, TAKEOVER_SKIP};
use crate::history::Op;

/// One (group, partition) the offsets are kept for.
type Key<'h> = (&'h str, u32);

/// The highest committed offset known so far, and which operation made it known.
#[derive(Clone, Copy)]
struct Known {
    offset: u64,
    index: u64,
    /// Position of the completion of the operation that made it known.
    end: usize,
}

pub(crate) fn check(ops: &[Operation<'_>], anomalies: &mut Anomalies) {
    offsets_over_time(ops, anomalies);
    takeovers(ops, anomalies);
}

/// Judges every ok read of committed offsets against what was known before it started.
fn offsets_over_time(ops: &[Operation<'_>], anomalies: &mut Anomalies) {
    let mut fetches: Vec<&Operation<'_>> =
        ops.iter().filter(|o| o.outcome == Outcome::Ok && matches!(o.op, Op::FetchCommitted { .. })).collect();
    fetches.sort_by_key(|o| o.start);
    // Completed operations that make an offset known: ok fetches and ok commits (`ops` is in
    // completion order already).
    let known_by: Vec<&Operation<'_>> = ops
        .iter()
        .filter(|o| o.outcome == Outcome::Ok && matches!(o.op, Op::FetchCommitted { .. } | Op::Commit { .. }))
        .collect();
    // (group, partition, offset) -> invocation positions of commits (ok or indeterminate) of it:
    // what could explain a lower offset showing up after a higher one.
    let mut commit_starts: HashMap<(&str, u32, u64), Vec<usize>> = HashMap::new();
    for o in ops.iter().filter(|o| o.outcome != Outcome::Fail) {
        if let Op::Commit { group, offsets, .. } = o.op {
            for g in offsets {
                commit_starts.entry((group.as_str(), g.partition, g.offset)).or_default().push(o.start);
            }
        }
    }

    let mut fetched: BTreeMap<Key<'_>, Known> = BTreeMap::new();
    let mut committed: BTreeMap<Key<'_>, Known> = BTreeMap::new();
    let mut next = 0;
    for f in fetches {
        while let Some(k) = known_by.get(next).filter(|k| k.end < f.start) {
            next += 1;
            let (group, offsets, into) = match k.op {
                Op::FetchCommitted { group, offsets } => (group, offsets, &mut fetched),
                Op::Commit { group, offsets, .. } => (group, offsets, &mut committed),
                _ => continue,
            };
            for g in offsets {
                let known = into.entry((group.as_str(), g.partition)).or_insert(Known {
                    offset: g.offset,
                    index: k.index(),
                    end: k.end,
                });
                if g.offset > known.offset {
                    *known = Known { offset: g.offset, index: k.index(), end: k.end };
                }
            }
        }
        let Op::FetchCommitted { group, offsets } = f.op else { continue };
        let seen: BTreeMap<u32, u64> = offsets.iter().map(|g| (g.partition, g.offset)).collect();
        for (&partition, &offset) in &seen {
            let key = (group.as_str(), partition);
            let case = |kind: &str, known: Known| {
                json!({"group": group, "partition": partition, "index": f.index(), "invoke": f.invoke_index(),
                       "observed": offset, kind: {"offset": known.offset, "index": known.index}})
            };
            if let Some(&known) = fetched.get(&key).filter(|k| k.offset > offset) {
                anomalies.push(COMMIT_BACKWARDS, case("earlier_observation", known));
            } else if let Some(&known) = committed.get(&key).filter(|k| k.offset > offset) {
                // A lower commit issued after the higher one was acknowledged, and accepted,
                // moved the offset back; otherwise the acknowledged commit simply is not there.
                let rewound = commit_starts
                    .get(&(group.as_str(), partition, offset))
                    .is_some_and(|starts| starts.iter().any(|&s| s > known.end && s < f.end));
                if rewound {
                    anomalies.push(COMMIT_BACKWARDS, case("earlier_commit", known));
                } else {
                    anomalies.push(COMMIT_NOT_VISIBLE, case("commit", known));
                }
            }
        }
        // The read has no partition filter: it returns every offset the group has, so an
        // acknowledged commit of a partition it lacks is not visible either.
        for (&(_, partition), known) in committed.range((group.as_str(), 0)..=(group.as_str(), u32::MAX)) {
            if !seen.contains_key(&partition) {
                anomalies.push(
                    COMMIT_NOT_VISIBLE,
                    json!({"group": group, "partition": partition, "index": f.index(), "invoke": f.invoke_index(),
                           "observed": null, "commit": {"offset": known.offset, "index": known.index}}),
                );
            }
        }
    }
}

/// Everything that bounds where a new owner of a partition may start: (position, offset, index).
/// A commit counts from its invocation, ok or indeterminate, because the new owner reads the
/// committed offset at some moment after its assignment, and a commit in flight may already be
/// applied then; a fetch counts from its completion. Counting generously only weakens the bound:
/// no false alarms from timing.
fn start_bounds<'h>(ops: &[Operation<'h>]) -> HashMap<Key<'h>, Vec<(usize, u64, u64)>> {
    let mut bounds: HashMap<Key<'h>, Vec<(usize, u64, u64)>> = HashMap::new();
    for o in ops {
        let (group, offsets, pos) = match (o.op, o.outcome) {
            (Op::Commit { group, offsets, .. }, Outcome::Ok | Outcome::Info) => (group, offsets, o.start),
            (Op::FetchCommitted { group, offsets }, Outcome::Ok) => (group, offsets, o.end),
            _ => continue,
        };
        for g in offsets {
            bounds.entry((group.as_str(), g.partition)).or_default().push((pos, g.offset, o.index()));
        }
    }
    bounds
}

/// The lowest record a member read from a partition in one poll.
#[derive(Clone, Copy)]
struct Lowest {
    offset: u64,
    value: u64,
    index: u64,
    /// Position of the poll's completion.
    end: usize,
}

impl Lowest {
    fn min(a: Option<Lowest>, b: Option<Lowest>) -> Option<Lowest> {
        match (a, b) {
            (Some(a), Some(b)) => Some(if b.offset < a.offset { b } else { a }),
            (a, b) => a.or(b),
        }
    }
}

/// A partition newly given to a member, whose first read is not judged yet.
struct Takeover<'h> {
    group: &'h str,
    assign: u64,
    /// The lowest read of it in the poll just before the assignment was recorded (see below).
    before: Option<Lowest>,
    /// The member's own position in it from an earlier ownership (the offset after the highest it
    /// read before that poll), where it had one.
    own_next: Option<u64>,
}

/// What the walk knows of one member.
#[derive(Default)]
struct Member<'h> {
    /// The partitions it owns (or may own, after an indeterminate assignment).
    owned: BTreeSet<u32>,
    /// Partition -> the lowest record its latest poll returned.
    last_poll: BTreeMap<u32, Lowest>,
    /// Partition -> the offset after the highest record it ever read there, before the latest
    /// poll and after it.
    read_to_before_last_poll: BTreeMap<u32, u64>,
    read_to: BTreeMap<u32, u64>,
    /// While `assign` entries follow the latest poll: that poll's lowest records, and the
    /// member's positions before it.
    batch: Option<(BTreeMap<u32, Lowest>, BTreeMap<u32, u64>)>,
    awaiting: BTreeMap<u32, Takeover<'h>>,
}

/// The first read of a partition taken over must be at or below the group's committed offset.
///
/// Assignment changes reach a member during a poll and are recorded only after it (see
/// `polls`), so the new owner's first records may be in the poll just before its `assign`
/// entry. The first read is therefore taken as the lowest of that poll's and the next poll's
/// records of the partition: never above the real first read, so never a false alarm.
///
/// A member given back a partition it was still giving up resumes at its own position, which its
/// failed commit may have left above the group's: nothing is skipped, since it read the records
/// in between itself. So its own earlier position is allowed too.
fn takeovers(ops: &[Operation<'_>], anomalies: &mut Anomalies) {
    let bounds = start_bounds(ops);
    let judge =
        |anomalies: &mut Anomalies, consumer: &str, partition: u32, t: &Takeover<'_>, first: Lowest, at: usize| {
            let bound = bounds
                .get(&(t.group, partition))
                .and_then(|b| b.iter().filter(|(pos, ..)| *pos < at).max_by_key(|(_, off, _)| *off));
            // No commit known: the group had no position, and where a member then starts (earliest
            // or latest) is the client's configuration, not in the history.
            if let Some(&(_, committed, committed_index)) = bound {
                if first.offset > committed && t.own_next.is_none_or(|own| first.offset > own) {
                    anomalies.push(
                        TAKEOVER_SKIP,
                        json!({"consumer": consumer, "group": t.group, "partition": partition,
                           "assign": t.assign, "index": first.index,
                           "first_read": {"offset": first.offset, "value": first.value},
                           "committed": {"offset": committed, "index": committed_index},
                           "own_position": t.own_next}),
                    );
                }
            }
        };
    let mut members: HashMap<&str, Member<'_>> = HashMap::new();
    for o in ops {
        match (o.op, o.outcome) {
            (Op::Assign { .. }, Outcome::Fail) => {}
            (Op::Assign { consumer, group, partitions, .. }, outcome) => {
                let m = members.entry(consumer.as_str()).or_default();
                if m.batch.is_none() {
                    m.batch = Some((std::mem::take(&mut m.last_poll), m.read_to_before_last_poll.clone()));
                }
                let (before, own) = m.batch.clone().unwrap_or_default();
                if outcome != Outcome::Ok {
                    m.owned.extend(partitions.iter().copied());
                    continue;
                }
                // Taken away before any later read: judge on the poll before, if it had one.
                let gone: Vec<u32> = m.awaiting.keys().filter(|p| !partitions.contains(p)).copied().collect();
                for p in gone {
                    if let Some(t) = m.awaiting.remove(&p) {
                        if let Some(first) = t.before {
                            judge(anomalies, consumer, p, &t, first, first.end);
                        }
                    }
                }
                if let Some(group) = group {
                    // Only a partition the member did not own resumes from the committed offset;
                    // a kept one continues from the member's own position, ahead of its commits.
                    for p in partitions.iter().filter(|p| !m.owned.contains(p)) {
                        let t = Takeover {
                            group: group.as_str(),
                            assign: o.index(),
                            before: before.get(p).copied(),
                            own_next: own.get(p).copied(),
                        };
                        m.awaiting.insert(*p, t);
                    }
                }
                m.owned = partitions.iter().copied().collect();
            }
            (Op::Poll { consumer, reads }, outcome) => {
                let m = members.entry(consumer.as_str()).or_default();
                m.batch = None;
                m.last_poll.clear();
                m.read_to_before_last_poll.clone_from(&m.read_to);
                match outcome {
                    Outcome::Ok => {
                        for r in reads {
                            let to = m.read_to.entry(r.partition).or_default();
                            *to = (*to).max(r.offset + 1);
                            let read = Lowest { offset: r.offset, value: r.value, index: o.index(), end: o.end };
                            let lowest = Lowest::min(m.last_poll.get(&r.partition).copied(), Some(read));
                            if let Some(lowest) = lowest {
                                m.last_poll.insert(r.partition, lowest);
                            }
                        }
                        let read: Vec<u32> =
                            m.awaiting.keys().filter(|p| m.last_poll.contains_key(p)).copied().collect();
                        for p in read {
                            if let Some(t) = m.awaiting.remove(&p) {
                                if let Some(first) = Lowest::min(t.before, m.last_poll.get(&p).copied()) {
                                    judge(anomalies, consumer, p, &t, first, o.end);
                                }
                            }
                        }
                    }
                    // Its first reads may be in a poll nobody recorded.
                    Outcome::Info => m.awaiting.clear(),
                    Outcome::Fail => {}
                }
            }
            _ => {}
        }
    }
    // Never read again after the assignment: judge on the poll before it, where there was one.
    let mut names: Vec<&str> = members.keys().copied().collect();
    names.sort_unstable();
    for name in names {
        let Some(m) = members.get_mut(name) else { continue };
        for (p, t) in std::mem::take(&mut m.awaiting) {
            if let Some(first) = t.before {
                judge(anomalies, name, p, &t, first, first.end);
            }
        }
    }
}
