//! Consumer-group assignment: which member consumes which partition. Pure and deterministic (every
//! replica computes the same answer from the same state), sticky (a member keeps what it has unless
//! balance requires otherwise) and even (member loads differ by at most one where subscriptions allow).
//!
//! A rebalance is cooperative, in two phases, so members keep consuming what they keep:
//! 1. [`plan`]: compute the target; partitions whose owner changes are taken from their current owner
//!    (moved to its `revoking` set) but not yet given to the new one; partitions nobody owns are given
//!    at once.
//! 2. once every revoking member has acknowledged (committed and stopped), [`complete`] hands the freed
//!    partitions to their targets.

use std::collections::{BTreeMap, BTreeSet};

/// A partition of a topic, by topic id (ids are never reused, so a recreated topic is a new one).
pub type Tp = (u32, u32);

/// What the assignor needs to know about one member.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MemberLoad {
    /// Partitions this member may consume (of the topics it subscribes to).
    pub eligible: BTreeSet<Tp>,
    /// Partitions it consumes now.
    pub assigned: BTreeSet<Tp>,
    /// Partitions taken from it, still to be acknowledged.
    pub revoking: BTreeSet<Tp>,
}

/// The target assignment: every eligible partition to exactly one member, sticky and balanced.
/// `members` is keyed by member id; ties break by member id and partition order, so the result is
/// a function of the input alone.
pub fn target(members: &BTreeMap<String, MemberLoad>) -> BTreeMap<String, BTreeSet<Tp>> {
    let mut out: BTreeMap<String, BTreeSet<Tp>> = members.keys().map(|m| (m.clone(), BTreeSet::new())).collect();
    // Keep what each member has (assigned or being revoked counts as "has" for stickiness), if still
    // eligible and not claimed twice.
    let mut owner: BTreeMap<Tp, String> = BTreeMap::new();
    for (m, load) in members {
        for tp in load.assigned.iter().chain(load.revoking.iter()) {
            if load.eligible.contains(tp) && !owner.contains_key(tp) {
                owner.insert(*tp, m.clone());
                out.entry(m.clone()).or_default().insert(*tp);
            }
        }
    }
    // Give every unowned eligible partition to the least loaded member that may take it.
    let all: BTreeSet<Tp> = members.values().flat_map(|l| l.eligible.iter().copied()).collect();
    for tp in &all {
        if owner.contains_key(tp) {
            continue;
        }
        if let Some(m) = least_loaded(&out, members, tp) {
            owner.insert(*tp, m.clone());
            out.entry(m).or_default().insert(*tp);
        }
    }
    // Even out: move a partition from the most to the least loaded member that may take it, while
    // that narrows the gap. Bounded: every move lowers the sum of squared loads.
    let mut moves_left = all.len() * members.len().max(1);
    while moves_left > 0 {
        moves_left -= 1;
        let mut best: Option<(usize, String, String, Tp)> = None;
        for (from, owned) in &out {
            for tp in owned.iter().rev() {
                if let Some(to) = least_loaded(&out, members, tp) {
                    let (nf, nt) = (owned.len(), out.get(&to).map_or(0, BTreeSet::len));
                    if to != *from && nf > nt + 1 {
                        let gap = nf - nt;
                        if best.as_ref().is_none_or(|(g, ..)| gap > *g) {
                            best = Some((gap, from.clone(), to, *tp));
                        }
                    }
                }
            }
        }
        let Some((_, from, to, tp)) = best else { break };
        if let Some(s) = out.get_mut(&from) {
            s.remove(&tp);
        }
        out.entry(to).or_default().insert(tp);
    }
    out
}

fn least_loaded(
    out: &BTreeMap<String, BTreeSet<Tp>>,
    members: &BTreeMap<String, MemberLoad>,
    tp: &Tp,
) -> Option<String> {
    members
        .iter()
        .filter(|(_, l)| l.eligible.contains(tp))
        .min_by_key(|(m, _)| (out.get(*m).map_or(0, BTreeSet::len), (*m).clone()))
        .map(|(m, _)| m.clone())
}

/// The outcome of phase 1.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Plan {
    /// Each member's new (assigned, revoking).
    pub members: BTreeMap<String, (BTreeSet<Tp>, BTreeSet<Tp>)>,
    /// Where each partition being revoked is to go once released, so phase 2 follows the plan.
    pub pending: BTreeMap<Tp, String>,
}

/// Phase 1. A member keeps the partitions it keeps, loses (to `revoking`) those that move away, and
/// gains only partitions nobody holds.
pub fn plan(members: &BTreeMap<String, MemberLoad>) -> Plan {
    let target = target(members);
    let target_of: BTreeMap<Tp, String> =
        target.iter().flat_map(|(m, tps)| tps.iter().map(move |tp| (*tp, m.clone()))).collect();
    let held: BTreeSet<Tp> =
        members.values().flat_map(|l| l.assigned.iter().chain(l.revoking.iter()).copied()).collect();
    let members: BTreeMap<String, (BTreeSet<Tp>, BTreeSet<Tp>)> = members
        .iter()
        .map(|(m, load)| {
            let want = target.get(m).cloned().unwrap_or_default();
            let mut assigned: BTreeSet<Tp> = load.assigned.intersection(&want).copied().collect();
            // Newly free partitions (nobody holds them) can be handed over at once.
            assigned.extend(want.iter().filter(|tp| !held.contains(tp)).copied());
            let mut revoking: BTreeSet<Tp> = load.revoking.clone();
            revoking.extend(load.assigned.difference(&want).copied());
            // A partition being revoked that the target gives back to its holder is simply kept.
            let kept_back: Vec<Tp> = revoking.intersection(&want).copied().collect();
            for tp in kept_back {
                revoking.remove(&tp);
                assigned.insert(tp);
            }
            // No longer eligible (topic deleted or unsubscribed): nothing to revoke, it is gone.
            revoking.retain(|tp| load.eligible.contains(tp));
            (m.clone(), (assigned, revoking))
        })
        .collect();
    let pending = members
        .values()
        .flat_map(|(_, revoking)| revoking.iter())
        .filter_map(|tp| target_of.get(tp).map(|m| (*tp, m.clone())))
        .collect();
    Plan { members, pending }
}

/// Phase 2: revocations are acknowledged; revoking sets are emptied. Each released partition goes
/// where phase 1 planned (`pending`), if that member is still there and may take it; any other
/// partition nobody holds goes to the least loaded eligible member. Returns each member's assignment.
pub fn complete(
    members: &BTreeMap<String, MemberLoad>,
    pending: &BTreeMap<Tp, String>,
) -> BTreeMap<String, BTreeSet<Tp>> {
    let mut out: BTreeMap<String, BTreeSet<Tp>> = members
        .iter()
        .map(|(m, l)| (m.clone(), l.assigned.iter().filter(|tp| l.eligible.contains(tp)).copied().collect()))
        .collect();
    let mut held: BTreeSet<Tp> = out.values().flat_map(|s| s.iter().copied()).collect();
    for (tp, m) in pending {
        if !held.contains(tp) && members.get(m).is_some_and(|l| l.eligible.contains(tp)) {
            out.entry(m.clone()).or_default().insert(*tp);
            held.insert(*tp);
        }
    }
    let all: BTreeSet<Tp> = members.values().flat_map(|l| l.eligible.iter().copied()).collect();
    for tp in all {
        if held.contains(&tp) {
            continue;
        }
        if let Some(m) = least_loaded(&out, members, &tp) {
            out.entry(m).or_default().insert(tp);
            held.insert(tp);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parts(n: u32) -> BTreeSet<Tp> {
        (0..n).map(|p| (0, p)).collect()
    }

    fn member(eligible: &BTreeSet<Tp>, assigned: &[u32]) -> MemberLoad {
        MemberLoad {
            eligible: eligible.clone(),
            assigned: assigned.iter().map(|p| (0, *p)).collect(),
            revoking: BTreeSet::new(),
        }
    }

    #[test]
    fn three_members_six_partitions_two_each() {
        let e = parts(6);
        let members: BTreeMap<String, MemberLoad> =
            ["a", "b", "c"].iter().map(|m| (m.to_string(), member(&e, &[]))).collect();
        let plan = plan(&members);
        for (m, (assigned, revoking)) in &plan.members {
            assert_eq!(assigned.len(), 2, "{m}");
            assert!(revoking.is_empty());
        }
        let all: BTreeSet<Tp> = plan.members.values().flat_map(|(a, _)| a.iter().copied()).collect();
        assert_eq!(all, e);
    }

    #[test]
    fn a_fourth_member_takes_only_what_must_move_and_others_keep_the_rest() {
        let e = parts(6);
        let mut members = BTreeMap::new();
        members.insert("a".to_string(), member(&e, &[0, 1]));
        members.insert("b".to_string(), member(&e, &[2, 3]));
        members.insert("c".to_string(), member(&e, &[4, 5]));
        members.insert("d".to_string(), member(&e, &[]));
        let p1 = plan(&members);
        // Phase 1: 6 over 4 is 2, 2, 1, 1, so exactly one partition must move: revoked from one
        // member, given to nobody yet (d waits), and nobody loses anything else.
        let revoked: Vec<Tp> = p1.members.values().flat_map(|(_, r)| r.iter().copied()).collect();
        assert_eq!(revoked.len(), 1, "{p1:?}");
        assert!(p1.members["d"].0.is_empty());
        assert_eq!(p1.pending.get(&revoked[0]).map(String::as_str), Some("d"));
        for m in ["a", "b", "c"] {
            let (assigned, revoking) = &p1.members[m];
            assert_eq!(assigned.len() + revoking.len(), 2);
        }
        // Phase 2: d gets the revoked partition; the others keep exactly what they kept.
        let after: BTreeMap<String, MemberLoad> = p1
            .members
            .iter()
            .map(|(m, (a, r))| {
                (m.clone(), MemberLoad { eligible: e.clone(), assigned: a.clone(), revoking: r.clone() })
            })
            .collect();
        let p2 = complete(&after, &p1.pending);
        assert_eq!(p2["d"], revoked.iter().copied().collect::<BTreeSet<_>>());
        for m in ["a", "b", "c"] {
            assert_eq!(p2[m], p1.members[m].0, "{m} keeps what it kept");
        }
    }

    #[test]
    fn a_member_leaving_frees_its_partitions_at_once_without_moving_others() {
        let e = parts(6);
        let mut members = BTreeMap::new();
        members.insert("a".to_string(), member(&e, &[0, 1]));
        members.insert("b".to_string(), member(&e, &[2, 3]));
        // c (4, 5) left.
        let p = plan(&members).members;
        assert_eq!(p["a"].0.len() + p["b"].0.len(), 6);
        assert!(p["a"].0.is_superset(&[(0, 0), (0, 1)].into_iter().collect()));
        assert!(p["b"].0.is_superset(&[(0, 2), (0, 3)].into_iter().collect()));
        assert!(p.values().all(|(_, r)| r.is_empty()));
    }

    #[test]
    fn subscriptions_are_respected() {
        let t0: BTreeSet<Tp> = (0..4).map(|p| (0, p)).collect();
        let t1: BTreeSet<Tp> = (0..2).map(|p| (1, p)).collect();
        let mut members = BTreeMap::new();
        members.insert("a".to_string(), MemberLoad { eligible: t0.clone(), ..Default::default() });
        members
            .insert("b".to_string(), MemberLoad { eligible: t0.union(&t1).copied().collect(), ..Default::default() });
        let t = target(&members);
        assert!(t["a"].iter().all(|tp| tp.0 == 0));
        assert!(t1.iter().all(|tp| t["b"].contains(tp)));
        assert_eq!(t["a"].len() + t["b"].len(), 6);
    }

    #[test]
    fn deterministic() {
        let e = parts(13);
        let members: BTreeMap<String, MemberLoad> =
            (0..5).map(|i| (format!("m{i}"), member(&e, if i == 0 { &[0, 1, 2, 3, 4, 5, 6] } else { &[] }))).collect();
        assert_eq!(plan(&members), plan(&members));
        let t = target(&members);
        let loads: Vec<usize> = t.values().map(BTreeSet::len).collect();
        assert!(loads.iter().max().unwrap() - loads.iter().min().unwrap() <= 1, "{loads:?}");
    }
}
