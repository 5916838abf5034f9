//! The history checker against small synthetic histories: each anomaly in its smallest form
//! (which must be flagged, naming the offending entry or value), and clean histories (which must
//! pass), including the ones that look suspicious but are allowed.

use busbar_jepsen::checker::{check, Report};
use busbar_jepsen::history::{Entry, GroupOffset, Op, OpType, Read};
use serde_json::{json, Value};

/// Builds a history entry by entry; indices and times follow the order of calls.
#[derive(Default)]
struct H {
    entries: Vec<Entry>,
}

impl H {
    fn push(&mut self, process: u64, kind: OpType, op: Op) -> u64 {
        let index = self.entries.len() as u64;
        self.entries.push(Entry { index, time_ns: index * 1_000, process, kind, op, node: None, error: None });
        index
    }
    fn invoke(&mut self, process: u64, op: Op) -> u64 {
        self.push(process, OpType::Invoke, op)
    }
    fn ok(&mut self, process: u64, op: Op) -> u64 {
        self.push(process, OpType::Ok, op)
    }

    /// An acknowledged send; returns the index of its `ok`.
    fn send(&mut self, process: u64, partition: u32, value: u64, offset: u64) -> u64 {
        self.invoke(process, send(partition, value, None));
        self.ok(process, send(partition, value, Some(offset)))
    }
    /// A send the server refused; returns the index of its `fail`.
    fn send_fail(&mut self, process: u64, partition: u32, value: u64) -> u64 {
        self.invoke(process, send(partition, value, None));
        self.push(process, OpType::Fail, send(partition, value, None))
    }
    /// A send that timed out; returns the index of its `info`.
    fn send_info(&mut self, process: u64, partition: u32, value: u64) -> u64 {
        self.invoke(process, send(partition, value, None));
        self.push(process, OpType::Info, send(partition, value, None))
    }
    /// An ok poll returning `(partition, offset, value)` records; returns the `ok` index.
    fn poll(&mut self, process: u64, consumer: &str, reads: &[(u32, u64, u64)]) -> u64 {
        self.invoke(process, poll(consumer, &[]));
        self.ok(process, poll(consumer, reads))
    }
    fn assign(&mut self, process: u64, consumer: &str, group: Option<&str>, partitions: &[u32]) -> u64 {
        let op = Op::Assign {
            consumer: consumer.into(),
            group: group.map(Into::into),
            generation: group.map(|_| 1),
            partitions: partitions.to_vec(),
        };
        self.invoke(process, op.clone());
        self.ok(process, op)
    }
    fn commit(&mut self, process: u64, consumer: &str, group: &str, offsets: &[(u32, u64)]) -> u64 {
        let op = commit(consumer, group, offsets);
        self.invoke(process, op.clone());
        self.ok(process, op)
    }
    fn fetch(&mut self, process: u64, group: &str, offsets: &[(u32, u64)]) -> u64 {
        self.invoke(process, fetch(group, &[]));
        self.ok(process, fetch(group, offsets))
    }
    /// An ok final read of `node` holding `values` at offsets 0, 1, ...
    fn final_read(&mut self, process: u64, node: &str, partition: u32, values: &[u64]) -> u64 {
        let reads = values.iter().enumerate().map(|(o, v)| (partition, o as u64, *v)).collect::<Vec<_>>();
        self.final_read_raw(process, node, partition, &reads)
    }
    fn final_read_raw(&mut self, process: u64, node: &str, partition: u32, reads: &[(u32, u64, u64)]) -> u64 {
        let op = |reads: Vec<Read>| Op::FinalRead { node: node.into(), partition, reads };
        self.invoke(process, op(vec![]));
        self.ok(process, op(to_reads(reads)))
    }
    fn check(&self) -> Report {
        check(&self.entries)
    }
}

fn send(partition: u32, value: u64, offset: Option<u64>) -> Op {
    Op::Send { partition, value, offset }
}
fn poll(consumer: &str, reads: &[(u32, u64, u64)]) -> Op {
    Op::Poll { consumer: consumer.into(), reads: to_reads(reads) }
}
fn commit(consumer: &str, group: &str, offsets: &[(u32, u64)]) -> Op {
    Op::Commit { consumer: consumer.into(), group: group.into(), offsets: to_offsets(offsets) }
}
fn fetch(group: &str, offsets: &[(u32, u64)]) -> Op {
    Op::FetchCommitted { group: group.into(), offsets: to_offsets(offsets) }
}
fn to_reads(reads: &[(u32, u64, u64)]) -> Vec<Read> {
    reads.iter().map(|&(partition, offset, value)| Read { partition, offset, value }).collect()
}
fn to_offsets(offsets: &[(u32, u64)]) -> Vec<GroupOffset> {
    offsets.iter().map(|&(partition, offset)| GroupOffset { partition, offset }).collect()
}

fn describe(r: &Report) -> String {
    format!("{}{}", r.summary(), serde_json::to_string_pretty(&r.anomalies).unwrap_or_default())
}
fn assert_valid(r: &Report) {
    assert!(r.valid && r.anomalies.is_empty(), "expected a valid history:\n{}", describe(r));
}
/// The cases of `name`, asserting there is at least one.
fn cases<'r>(r: &'r Report, name: &str) -> &'r [Value] {
    assert!(!r.valid, "a history with {name} must be invalid:\n{}", describe(r));
    match r.anomalies.get(name) {
        Some(cases) if !cases.is_empty() => cases,
        _ => panic!("expected {name}:\n{}", describe(r)),
    }
}
/// Asserts `r` found exactly the anomalies `names`, nothing else.
fn assert_only(r: &Report, names: &[&str]) {
    let found: Vec<&str> = r.anomalies.keys().map(String::as_str).collect();
    assert_eq!(found, names, "{}", describe(r));
}

// ---------------------------------------------------------------- clean histories

/// Two producers, two partitions, a direct reader, a group member committing, final reads from
/// three nodes that agree.
fn clean_history() -> H {
    let mut h = H::default();
    h.assign(10, "reader", None, &[0, 1]);
    h.assign(20, "m1", Some("g"), &[0]);
    h.send(1, 0, 100, 0);
    h.send(2, 1, 200, 0);
    h.send(1, 0, 101, 1);
    h.poll(10, "reader", &[(0, 0, 100), (1, 0, 200), (0, 1, 101)]);
    h.poll(20, "m1", &[(0, 0, 100)]);
    h.commit(20, "m1", "g", &[(0, 1)]);
    h.send(2, 1, 201, 1);
    h.poll(20, "m1", &[(0, 1, 101)]);
    h.commit(20, "m1", "g", &[(0, 2)]);
    h.fetch(30, "g", &[(0, 2)]);
    h.poll(10, "reader", &[(1, 1, 201)]);
    for node in ["n1", "n2", "n3"] {
        h.final_read(40, node, 0, &[100, 101]);
        h.final_read(40, node, 1, &[200, 201]);
    }
    h
}

#[test]
fn a_clean_history_is_valid_and_counted() {
    let r = clean_history().check();
    assert_valid(&r);
    let s = &r.stats;
    assert_eq!((s.sends_invoked, s.sends_ok, s.sends_failed, s.sends_info), (4, 4, 0, 0));
    assert_eq!((s.polls_ok, s.poll_reads, s.distinct_values_read), (4, 6, 4));
    assert_eq!((s.commits_ok, s.fetch_committed_ok, s.assigns_ok), (2, 1, 2));
    assert_eq!((s.final_reads_ok, s.final_read_nodes, s.partitions), (6, 3, 2));
    assert!(r.summary().contains("VALID"), "{}", r.summary());
}

#[test]
fn indeterminate_sends_that_never_appear_are_fine() {
    let mut h = H::default();
    h.send(1, 0, 100, 0);
    h.send_info(1, 0, 101);
    h.invoke(2, send(0, 102, None)); // never completes: indeterminate as well
    h.send(3, 0, 103, 1);
    h.poll(4, "c", &[(0, 0, 100), (0, 1, 103)]);
    h.final_read(5, "n1", 0, &[100, 103]);
    let r = h.check();
    assert_valid(&r);
    assert_eq!((r.stats.sends_info, r.stats.sends_info_seen), (2, 0));
}

#[test]
fn indeterminate_sends_that_appear_are_fine() {
    let mut h = H::default();
    h.send(1, 0, 100, 0);
    h.send_info(1, 0, 101);
    h.invoke(2, send(0, 102, None));
    h.poll(4, "c", &[(0, 0, 100), (0, 1, 101), (0, 2, 102)]);
    h.final_read(5, "n1", 0, &[100, 101, 102]);
    h.final_read(5, "n2", 0, &[100, 101, 102]);
    let r = h.check();
    assert_valid(&r);
    assert_eq!((r.stats.sends_info, r.stats.sends_info_seen), (2, 2));
}

#[test]
fn redelivery_after_reassignment_before_a_commit_is_allowed() {
    // At-least-once: m1 read offsets 0..=3 but committed only 2; m2 takes the partition over and
    // reads 2 and 3 again. Same values at the same offsets: no duplicate, no skip.
    let mut h = H::default();
    for (i, v) in [100, 101, 102, 103].into_iter().enumerate() {
        h.send(1, 0, v, i as u64);
    }
    h.assign(10, "m1", Some("g"), &[0]);
    h.poll(10, "m1", &[(0, 0, 100), (0, 1, 101)]);
    h.commit(10, "m1", "g", &[(0, 2)]);
    h.poll(10, "m1", &[(0, 2, 102), (0, 3, 103)]);
    h.assign(10, "m1", Some("g"), &[]);
    h.assign(20, "m2", Some("g"), &[0]);
    h.poll(20, "m2", &[(0, 2, 102), (0, 3, 103)]);
    h.commit(20, "m2", "g", &[(0, 4)]);
    h.fetch(30, "g", &[(0, 4)]);
    assert_valid(&h.check());
}

#[test]
fn concurrent_overlapping_operations_are_judged_by_real_time() {
    // Sends of three processes overlap; a poll overlaps them; a fetch overlapping a commit may
    // show the old offset; a fetch started after the commit completed shows the new one.
    let mut h = H::default();
    h.invoke(1, send(0, 100, None));
    h.invoke(2, send(0, 101, None));
    h.invoke(4, poll("c", &[]));
    h.invoke(3, send(1, 200, None));
    h.ok(2, send(0, 101, Some(0)));
    h.ok(4, poll("c", &[(0, 0, 101)]));
    h.ok(1, send(0, 100, Some(1)));
    h.ok(3, send(1, 200, Some(0)));
    h.invoke(6, fetch("g", &[]));
    h.invoke(5, commit("c", "g", &[(0, 1)]));
    h.ok(5, commit("c", "g", &[(0, 1)]));
    h.ok(6, fetch("g", &[]));
    h.fetch(6, "g", &[(0, 1)]);
    h.poll(4, "c", &[(0, 1, 100), (1, 0, 200)]);
    assert_valid(&h.check());
}

#[test]
fn a_commit_lower_than_the_last_may_be_rejected_or_ignored() {
    let mut h = H::default();
    h.commit(1, "m1", "g", &[(0, 5)]);
    // Rejected: it never happened.
    h.invoke(2, commit("m2", "g", &[(0, 3)]));
    h.push(2, OpType::Fail, commit("m2", "g", &[(0, 3)]));
    // Acknowledged, but the group kept the higher offset: nothing went back.
    h.commit(3, "m3", "g", &[(0, 4)]);
    h.fetch(4, "g", &[(0, 5)]);
    assert_valid(&h.check());
}

#[test]
fn a_new_owner_may_start_at_the_committed_offset_or_before_it() {
    let mut h = H::default();
    for (i, v) in [100, 101, 102].into_iter().enumerate() {
        h.send(1, 0, v, i as u64);
    }
    h.commit(10, "m1", "g", &[(0, 2)]);
    h.assign(20, "m2", Some("g"), &[0]);
    h.poll(20, "m2", &[(0, 2, 102)]);
    h.assign(30, "m3", Some("g"), &[0]);
    h.poll(30, "m3", &[(0, 0, 100), (0, 1, 101), (0, 2, 102)]);
    assert_valid(&h.check());
}

#[test]
fn a_commit_in_flight_when_the_owner_starts_may_set_its_start() {
    // The old owner's commit is recorded after the new owner's assignment: the new owner reads
    // the committed offset later, and may see it.
    let mut h = H::default();
    for (i, v) in [100, 101, 102].into_iter().enumerate() {
        h.send(1, 0, v, i as u64);
    }
    h.poll(10, "m1", &[(0, 0, 100), (0, 1, 101), (0, 2, 102)]);
    h.commit(10, "m1", "g", &[(0, 1)]);
    h.invoke(10, commit("m1", "g", &[(0, 3)]));
    h.assign(20, "m2", Some("g"), &[0]);
    h.ok(10, commit("m1", "g", &[(0, 3)]));
    h.poll(20, "m2", &[(0, 2, 102)]);
    assert_valid(&h.check());
}

#[test]
fn a_reassignment_restarts_the_monotonicity_run() {
    let mut h = H::default();
    for (i, v) in [100, 101, 102].into_iter().enumerate() {
        h.send(1, 0, v, i as u64);
    }
    h.assign(10, "c", None, &[0]);
    h.poll(10, "c", &[(0, 1, 101), (0, 2, 102)]);
    h.assign(10, "c", None, &[0]);
    h.poll(10, "c", &[(0, 0, 100)]);
    assert_valid(&h.check());
}

#[test]
fn an_indeterminate_poll_forgets_the_consumer_position() {
    let mut h = H::default();
    for (i, v) in [100, 101, 102].into_iter().enumerate() {
        h.send(1, 0, v, i as u64);
    }
    h.poll(10, "c", &[(0, 0, 100)]);
    h.invoke(10, poll("c", &[]));
    h.push(10, OpType::Info, poll("c", &[]));
    // The lost poll may have returned offset 1.
    h.poll(11, "c", &[(0, 2, 102)]);
    h.poll(12, "d", &[(0, 1, 101)]);
    assert_valid(&h.check());
}

/// Producers, a direct reader, a committing group member and a fetcher, over many rounds: the
/// checker must stay quiet, and fast enough for a real run's history.
#[test]
fn a_long_clean_history_is_valid() {
    let mut h = H::default();
    let mut logs: Vec<Vec<u64>> = vec![Vec::new(); 4];
    let (mut reader_at, mut member_at) = (vec![0usize; 4], vec![0usize; 4]);
    let mut value = 0;
    h.assign(100, "reader", None, &[0, 1, 2, 3]);
    h.assign(200, "member", Some("g"), &[0, 1, 2, 3]);
    let unread = |logs: &[Vec<u64>], at: &mut [usize]| {
        let mut reads = Vec::new();
        for (p, log) in logs.iter().enumerate() {
            reads.extend((at[p]..log.len()).map(|o| (p as u32, o as u64, log[o])));
            at[p] = log.len();
        }
        reads
    };
    for round in 0..3_000u64 {
        for process in 0..3u64 {
            let p = ((round * 3 + process) % 4) as usize;
            value += 1;
            h.send(process, p as u32, value, logs[p].len() as u64);
            logs[p].push(value);
        }
        let reads = unread(&logs, &mut reader_at);
        h.poll(100, "reader", &reads);
        if round % 3 == 0 {
            let reads = unread(&logs, &mut member_at);
            h.poll(200, "member", &reads);
            let offsets: Vec<(u32, u64)> = member_at.iter().enumerate().map(|(p, o)| (p as u32, *o as u64)).collect();
            h.commit(200, "member", "g", &offsets);
            h.fetch(300, "g", &offsets);
        }
    }
    for node in ["n1", "n2", "n3"] {
        for (p, log) in logs.iter().enumerate() {
            h.final_read(400, node, p as u32, log);
        }
    }
    let started = std::time::Instant::now();
    let r = h.check();
    assert_valid(&r);
    assert_eq!(r.stats.sends_ok, 9_000);
    eprintln!("checked {} entries in {:?}", r.stats.entries, started.elapsed());
}

// ---------------------------------------------------------------- sends

#[test]
fn lost_write_when_a_read_went_past_it() {
    let mut h = H::default();
    let lost = h.send(1, 0, 100, 0);
    h.send(1, 0, 101, 1);
    h.poll(2, "c", &[(0, 1, 101)]);
    let r = h.check();
    assert_only(&r, &["lost-write"]);
    let c = &cases(&r, "lost-write")[0];
    assert_eq!((c["value"].clone(), c["offset"].clone(), c["index"].clone()), (json!(100), json!(0), json!(lost)));
}

#[test]
fn lost_write_when_missing_from_every_final_read() {
    let mut h = H::default();
    h.send(1, 0, 100, 0);
    let lost = h.send(1, 0, 101, 1);
    h.poll(2, "c", &[(0, 0, 100), (0, 1, 101)]);
    h.final_read(3, "n1", 0, &[100]);
    h.final_read(3, "n2", 0, &[100]);
    let r = h.check();
    assert_only(&r, &["lost-write"]);
    let c = cases(&r, "lost-write");
    assert_eq!(c.len(), 1, "{}", describe(&r));
    assert_eq!((c[0]["value"].clone(), c[0]["index"].clone()), (json!(101), json!(lost)));
    assert_eq!(c[0]["missing_from_final_reads"].as_array().map(Vec::len), Some(2), "{}", describe(&r));
}

#[test]
fn lost_write_on_one_node_is_also_divergence() {
    let mut h = H::default();
    h.send(1, 0, 100, 0);
    h.send(1, 0, 101, 1);
    h.final_read(3, "n1", 0, &[100, 101]);
    let short = h.final_read(3, "n2", 0, &[100]);
    let r = h.check();
    assert_only(&r, &["divergence", "lost-write"]);
    let c = &cases(&r, "lost-write")[0];
    assert_eq!(c["value"], json!(101));
    assert_eq!(c["missing_from_final_reads"], json!([{"node": "n2", "final_read": short}]));
}

#[test]
fn unseen_when_never_read_and_nothing_read_past_it() {
    let mut h = H::default();
    h.send(1, 0, 100, 0);
    let unseen = h.send(1, 0, 101, 1);
    h.poll(2, "c", &[(0, 0, 100)]);
    let r = h.check();
    assert_only(&r, &["unseen"]);
    let c = &cases(&r, "unseen")[0];
    assert_eq!((c["value"].clone(), c["index"].clone()), (json!(101), json!(unseen)));
}

#[test]
fn g1a_when_a_failed_send_is_read() {
    let mut h = H::default();
    let failed = h.send_fail(1, 0, 100);
    let read = h.poll(2, "c", &[(0, 0, 100)]);
    let r = h.check();
    assert_only(&r, &["g1a"]);
    let c = &cases(&r, "g1a")[0];
    assert_eq!(
        (c["value"].clone(), c["index"].clone(), c["reads"].clone()),
        (json!(100), json!(failed), json!([read]))
    );
}

#[test]
fn nonmonotonic_send_when_a_process_gets_a_lower_offset() {
    let mut h = H::default();
    let first = h.send(1, 0, 100, 1);
    let second = h.send(1, 0, 101, 0);
    h.poll(2, "c", &[(0, 0, 101), (0, 1, 100)]);
    let r = h.check();
    assert_only(&r, &["nonmonotonic-send"]);
    let c = &cases(&r, "nonmonotonic-send")[0];
    assert_eq!(c["previous"]["index"], json!(first));
    assert_eq!((c["next"]["index"].clone(), c["next"]["value"].clone()), (json!(second), json!(101)));
}

// ---------------------------------------------------------------- the version order

#[test]
fn inconsistent_offsets_when_two_values_share_a_slot() {
    let mut h = H::default();
    let acked = h.send(1, 0, 100, 0);
    h.send_info(2, 0, 101);
    let read = h.poll(3, "c", &[(0, 0, 101)]);
    let r = h.check();
    let c = &cases(&r, "inconsistent-offsets")[0];
    assert_eq!(c["offset"], json!(0));
    assert_eq!(
        c["values"],
        json!([{"value": 100, "indices": [acked]}, {"value": 101, "indices": [read]}]),
        "{}",
        describe(&r)
    );
    // The acknowledged value's slot holds another: it was lost, too.
    assert_eq!(cases(&r, "lost-write")[0]["value"], json!(100));
}

#[test]
fn duplicate_when_one_value_sits_at_two_offsets() {
    let mut h = H::default();
    h.send(1, 0, 100, 0);
    h.send(1, 0, 101, 1);
    let read = h.poll(2, "c", &[(0, 0, 100), (0, 1, 101), (0, 2, 100)]);
    let r = h.check();
    assert_only(&r, &["duplicate"]);
    let c = &cases(&r, "duplicate")[0];
    assert_eq!(c["value"], json!(100));
    assert_eq!(c["locations"][1], json!({"partition": 0, "offset": 2, "indices": [read]}), "{}", describe(&r));
}

// ---------------------------------------------------------------- polls

fn four_sends(h: &mut H) {
    for (i, v) in [100, 101, 102, 103].into_iter().enumerate() {
        h.send(1, 0, v, i as u64);
    }
    // Another consumer reads everything, so no write looks lost.
    h.poll(9, "all", &[(0, 0, 100), (0, 1, 101), (0, 2, 102), (0, 3, 103)]);
}

#[test]
fn poll_skip_across_polls() {
    let mut h = H::default();
    four_sends(&mut h);
    h.assign(2, "c", None, &[0]);
    h.poll(2, "c", &[(0, 0, 100), (0, 1, 101)]);
    let skipping = h.poll(2, "c", &[(0, 3, 103)]);
    let r = h.check();
    assert_only(&r, &["poll-skip"]);
    let c = &cases(&r, "poll-skip")[0];
    assert_eq!(c["next"]["index"], json!(skipping));
    assert_eq!(c["skipped"], json!([{"offset": 2, "value": 102}]));
}

#[test]
fn poll_skip_within_a_poll() {
    let mut h = H::default();
    four_sends(&mut h);
    let skipping = h.poll(2, "c", &[(0, 0, 100), (0, 2, 102), (0, 3, 103)]);
    let r = h.check();
    assert_only(&r, &["poll-skip"]);
    let c = &cases(&r, "poll-skip")[0];
    assert_eq!((c["consumer"].clone(), c["next"]["index"].clone()), (json!("c"), json!(skipping)));
    assert_eq!(c["skipped"], json!([{"offset": 1, "value": 101}]));
}

#[test]
fn nonmonotonic_poll_when_a_consumer_rereads_without_reassignment() {
    let mut h = H::default();
    four_sends(&mut h);
    h.poll(2, "c", &[(0, 0, 100), (0, 1, 101)]);
    let again = h.poll(2, "c", &[(0, 1, 101)]);
    let r = h.check();
    assert_only(&r, &["nonmonotonic-poll"]);
    let c = &cases(&r, "nonmonotonic-poll")[0];
    assert_eq!((c["next"]["index"].clone(), c["next"]["offset"].clone()), (json!(again), json!(1)));
}

#[test]
fn nonmonotonic_poll_when_a_poll_goes_back() {
    let mut h = H::default();
    four_sends(&mut h);
    let back = h.poll(2, "c", &[(0, 2, 102), (0, 3, 103), (0, 0, 100)]);
    let r = h.check();
    assert_only(&r, &["nonmonotonic-poll"]);
    assert_eq!(cases(&r, "nonmonotonic-poll")[0]["next"], json!({"offset": 0, "value": 100, "index": back}));
}

#[test]
fn a_final_read_with_a_hole_is_a_skip() {
    let mut h = H::default();
    h.send(1, 0, 100, 0);
    h.send(1, 0, 101, 1);
    h.send(1, 0, 102, 2);
    h.poll(2, "c", &[(0, 0, 100), (0, 1, 101), (0, 2, 102)]);
    let holed = h.final_read_raw(3, "n1", 0, &[(0, 0, 100), (0, 2, 102)]);
    let r = h.check();
    let c = &cases(&r, "poll-skip")[0];
    assert_eq!((c["final_read_of"].clone(), c["next"]["index"].clone()), (json!("n1"), json!(holed)));
    assert_eq!(cases(&r, "lost-write")[0]["value"], json!(101));
}

// ---------------------------------------------------------------- groups

#[test]
fn commit_backwards_when_observations_decrease() {
    let mut h = H::default();
    let high = h.fetch(1, "g", &[(0, 5)]);
    let low = h.fetch(2, "g", &[(0, 3)]);
    let r = h.check();
    assert_only(&r, &["commit-backwards"]);
    let c = &cases(&r, "commit-backwards")[0];
    assert_eq!((c["index"].clone(), c["observed"].clone()), (json!(low), json!(3)));
    assert_eq!(c["earlier_observation"], json!({"offset": 5, "index": high}));
}

#[test]
fn commit_backwards_when_an_accepted_lower_commit_is_observed() {
    let mut h = H::default();
    let high = h.commit(1, "m1", "g", &[(0, 5)]);
    h.commit(2, "m2", "g", &[(0, 3)]);
    let fetch = h.fetch(3, "g", &[(0, 3)]);
    let r = h.check();
    assert_only(&r, &["commit-backwards"]);
    let c = &cases(&r, "commit-backwards")[0];
    assert_eq!(c["index"], json!(fetch));
    assert_eq!(c["earlier_commit"], json!({"offset": 5, "index": high}));
}

#[test]
fn commit_not_visible_when_a_later_fetch_shows_less() {
    let mut h = H::default();
    h.commit(1, "m1", "g", &[(0, 3)]);
    let commit = h.commit(1, "m1", "g", &[(0, 5)]);
    let fetch = h.fetch(2, "g", &[(0, 3)]);
    let r = h.check();
    assert_only(&r, &["commit-not-visible"]);
    let c = &cases(&r, "commit-not-visible")[0];
    assert_eq!((c["index"].clone(), c["observed"].clone()), (json!(fetch), json!(3)));
    assert_eq!(c["commit"], json!({"offset": 5, "index": commit}));
}

#[test]
fn commit_not_visible_when_a_later_fetch_lacks_the_partition() {
    let mut h = H::default();
    let commit = h.commit(1, "m1", "g", &[(0, 5), (1, 2)]);
    h.fetch(2, "g", &[(0, 5)]);
    let r = h.check();
    assert_only(&r, &["commit-not-visible"]);
    let c = &cases(&r, "commit-not-visible")[0];
    assert_eq!((c["partition"].clone(), c["observed"].clone()), (json!(1), Value::Null));
    assert_eq!(c["commit"]["index"], json!(commit));
}

#[test]
fn takeover_skip_when_a_new_owner_starts_past_the_committed_offset() {
    let mut h = H::default();
    four_sends(&mut h);
    h.assign(10, "m1", Some("g"), &[0]);
    h.poll(10, "m1", &[(0, 0, 100), (0, 1, 101)]);
    let commit = h.commit(10, "m1", "g", &[(0, 2)]);
    h.assign(10, "m1", Some("g"), &[]);
    let assign = h.assign(20, "m2", Some("g"), &[0]);
    let first = h.poll(20, "m2", &[(0, 3, 103)]);
    let r = h.check();
    assert_only(&r, &["takeover-skip"]);
    let c = &cases(&r, "takeover-skip")[0];
    assert_eq!((c["assign"].clone(), c["index"].clone()), (json!(assign), json!(first)));
    assert_eq!(c["first_read"], json!({"offset": 3, "value": 103}));
    assert_eq!(c["committed"], json!({"offset": 2, "index": commit}));
}

#[test]
fn a_kept_partition_continues_from_the_members_own_position() {
    // A new generation that keeps partition 0 with m1 is not a takeover: m1 goes on past its
    // last commit.
    let mut h = H::default();
    four_sends(&mut h);
    h.assign(10, "m1", Some("g"), &[0]);
    h.poll(10, "m1", &[(0, 0, 100), (0, 1, 101)]);
    h.commit(10, "m1", "g", &[(0, 1)]);
    h.assign(10, "m1", Some("g"), &[0, 1]);
    h.poll(10, "m1", &[(0, 2, 102)]);
    assert_valid(&h.check());
}

// ---------------------------------------------------------------- rebalances recorded late

// A group member learns of assignment changes during a poll; the harness records them after the
// poll. The poll before the `assign` entries may already hold the new ownership's records.

#[test]
fn a_restart_in_the_poll_before_the_assign_entries_is_excused() {
    let mut h = H::default();
    four_sends(&mut h);
    h.assign(10, "m", Some("g"), &[0]);
    h.poll(10, "m", &[(0, 0, 100), (0, 1, 101), (0, 2, 102)]);
    h.commit(10, "m", "g", &[(0, 1)]);
    // Lost and given back during this poll: the partition restarts at the committed offset.
    h.poll(10, "m", &[(0, 1, 101), (0, 2, 102)]);
    h.assign(10, "m", Some("g"), &[]);
    h.assign(10, "m", Some("g"), &[0]);
    h.poll(10, "m", &[(0, 3, 103)]);
    assert_valid(&h.check());
}

#[test]
fn a_discontinuity_before_an_assignment_that_changes_nothing_is_reported() {
    let mut h = H::default();
    four_sends(&mut h);
    h.assign(10, "c", None, &[0]);
    h.poll(10, "c", &[(0, 0, 100), (0, 1, 101)]);
    let skipping = h.poll(10, "c", &[(0, 3, 103)]);
    h.assign(10, "c", None, &[0]);
    h.poll(10, "c", &[(0, 0, 100)]);
    let r = h.check();
    assert_only(&r, &["poll-skip"]);
    assert_eq!(cases(&r, "poll-skip")[0]["next"]["index"], json!(skipping));
}

#[test]
fn a_new_owners_first_records_may_precede_its_assign_entry() {
    let mut h = H::default();
    four_sends(&mut h);
    h.commit(10, "m1", "g", &[(0, 2)]);
    h.assign(20, "m2", Some("g"), &[]);
    h.poll(20, "m2", &[(0, 2, 102)]);
    h.assign(20, "m2", Some("g"), &[0]);
    h.poll(20, "m2", &[(0, 3, 103)]);
    assert_valid(&h.check());
}

#[test]
fn takeover_skip_is_found_across_a_late_assign_entry() {
    let mut h = H::default();
    four_sends(&mut h);
    let commit = h.commit(10, "m1", "g", &[(0, 2)]);
    h.assign(20, "m2", Some("g"), &[]);
    let first = h.poll(20, "m2", &[(0, 3, 103)]);
    h.assign(20, "m2", Some("g"), &[0]);
    h.poll(20, "m2", &[]);
    let r = h.check();
    assert_only(&r, &["takeover-skip"]);
    let c = &cases(&r, "takeover-skip")[0];
    assert_eq!((c["index"].clone(), c["first_read"]["offset"].clone()), (json!(first), json!(3)));
    assert_eq!(c["committed"], json!({"offset": 2, "index": commit}));
}

#[test]
fn a_member_given_back_a_partition_resumes_at_its_own_position() {
    // Its revocation commit failed, the partition came back before it left: it goes on from its
    // own position, above the group's committed offset, having read everything in between.
    let mut h = H::default();
    four_sends(&mut h);
    h.assign(10, "m", Some("g"), &[0]);
    h.poll(10, "m", &[(0, 0, 100)]);
    h.commit(10, "m", "g", &[(0, 1)]);
    h.poll(10, "m", &[(0, 1, 101), (0, 2, 102)]);
    h.poll(10, "m", &[]);
    h.invoke(10, commit("m", "g", &[(0, 3)]));
    h.push(10, OpType::Fail, commit("m", "g", &[(0, 3)]));
    h.assign(10, "m", Some("g"), &[]);
    h.assign(10, "m", Some("g"), &[0]);
    h.poll(10, "m", &[(0, 3, 103)]);
    assert_valid(&h.check());
}

// ---------------------------------------------------------------- divergence

#[test]
fn divergence_when_nodes_disagree_on_a_value() {
    let mut h = H::default();
    h.send_info(1, 0, 100);
    h.send_info(2, 0, 101);
    h.final_read(3, "n1", 0, &[100, 101]);
    h.final_read(3, "n2", 0, &[101, 100]);
    let r = h.check();
    let c = &cases(&r, "divergence")[0];
    assert_eq!((c["nodes"].clone(), c["offset"].clone()), (json!(["n1", "n2"]), json!(0)));
    assert_eq!(c["records"], json!([{"offset": 0, "value": 100}, {"offset": 0, "value": 101}]));
}

#[test]
fn divergence_when_a_node_holds_a_shorter_log() {
    let mut h = H::default();
    h.send(1, 0, 100, 0);
    h.send_info(1, 0, 101);
    let full = h.final_read(3, "n1", 0, &[100, 101]);
    let short = h.final_read(3, "n2", 0, &[100]);
    h.final_read(3, "n3", 0, &[100, 101]);
    let r = h.check();
    assert_only(&r, &["divergence"]);
    let c = cases(&r, "divergence");
    assert_eq!(c.len(), 2, "n2 differs from n1 and from n3: {}", describe(&r));
    assert_eq!(c[0]["indices"], json!([full, short]));
    assert_eq!((c[0]["offset"].clone(), c[0]["lengths"].clone()), (json!(1), json!([2, 1])));
}

// ---------------------------------------------------------------- malformed histories

fn malformed_reasons(r: &Report) -> Vec<String> {
    cases(r, "malformed-history").iter().map(|c| c["reason"].as_str().unwrap_or_default().to_owned()).collect()
}

#[test]
fn a_completion_without_an_invocation_is_malformed() {
    let mut h = H::default();
    let orphan = h.ok(1, send(0, 100, Some(0)));
    let r = h.check();
    assert_only(&r, &["malformed-history", "unseen"]);
    let c = &cases(&r, "malformed-history")[0];
    assert_eq!((c["reason"].clone(), c["index"].clone()), (json!("completion without an invocation"), json!(orphan)));
}

#[test]
fn an_ok_send_without_an_offset_is_malformed_and_indeterminate() {
    let mut h = H::default();
    h.invoke(1, send(0, 100, None));
    let bad = h.ok(1, send(0, 100, None));
    h.poll(2, "c", &[(0, 0, 100)]);
    let r = h.check();
    assert_only(&r, &["malformed-history"]);
    let c = &cases(&r, "malformed-history")[0];
    assert_eq!((c["reason"].clone(), c["index"].clone()), (json!("ok send without an offset"), json!(bad)));
    assert_eq!(r.stats.sends_info_seen, 1);
}

#[test]
fn broken_pairing_indices_and_values_are_reported_not_panicked_on() {
    let mut h = H::default();
    h.invoke(1, send(0, 100, None));
    h.invoke(1, send(0, 101, None)); // a second invocation while one is pending
    h.ok(1, poll("c", &[])); // completes something else
    h.send(2, 0, 102, 0);
    h.send(3, 0, 102, 1); // the same value twice
    h.poll(4, "c", &[(0, 0, 102), (0, 1, 102), (0, 2, 999)]); // 999 was never sent
    h.entries[3].index = 77;
    let r = h.check();
    let reasons = malformed_reasons(&r);
    for expected in [
        "entry index differs from its position in the history",
        "invocation while the process has one pending",
        "completion of a different operation than the pending one",
        "value sent more than once (values must be unique per run)",
        "read of a value no send wrote",
    ] {
        assert!(reasons.iter().any(|r| r == expected), "missing {expected:?} in {reasons:?}");
    }
}

#[test]
fn an_empty_history_is_valid() {
    let r = check(&[]);
    assert_valid(&r);
    assert_eq!(r.stats.entries, 0);
}

// ---------------------------------------------------------------- the report

#[test]
fn the_report_round_trips_and_its_summary_names_each_anomaly() {
    let mut h = H::default();
    h.send_fail(1, 0, 100);
    h.poll(2, "c", &[(0, 0, 100)]);
    h.fetch(3, "g", &[(0, 5)]);
    h.fetch(3, "g", &[(0, 4)]);
    let r = h.check();
    let summary = r.summary();
    assert!(summary.contains("INVALID"), "{summary}");
    assert!(summary.contains("g1a: 1") && summary.contains("commit-backwards: 1"), "{summary}");
    let back: Report = serde_json::from_str(&serde_json::to_string(&r).unwrap()).unwrap();
    assert_eq!(back, r);
}
