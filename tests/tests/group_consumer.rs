//! `GroupConsumer` (the client crate's consumer-group member) against real in-process clusters:
//! cooperative rebalances that move only what must move, a member that dies without leaving,
//! independent groups, committed offsets across a leader crash, and lag.
//!
//! Each member runs in its own task that drains its stream and logs what it saw (records and
//! assignment events); the test steers it (commit, close) through a channel and asserts on the logs.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use anyhow::Context;
use busbar_client::{
    Admin, Client, ClientError, GroupConsumer, GroupConsumerConfig, GroupEvent, Record, TopicPartition,
};
use busbar_tests::inprocess::InProcessCluster;
use busbar_tests::wait;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio_stream::StreamExt;

/// Bound on a group reaching a state the test waits for (joins, rebalances, session expiries).
const SETTLE: Duration = Duration::from_secs(40);

/// (partition, offset) of one record of topic "t"-like topics; one topic per test.
type Seen = (u32, u64);

enum Ctl {
    Commit(oneshot::Sender<Result<(), ClientError>>),
    Close(oneshot::Sender<Result<(), ClientError>>),
}

/// One group member, drained by its own task.
struct Member {
    id: String,
    seen: Arc<Mutex<Vec<Seen>>>,
    events: Arc<Mutex<Vec<GroupEvent>>>,
    ctl: mpsc::Sender<Ctl>,
    task: JoinHandle<anyhow::Result<()>>,
}

fn config(group: &str, topic: &str, session: Duration, auto_commit: Option<Duration>) -> GroupConsumerConfig {
    let mut cfg = GroupConsumerConfig::new(group, [topic]);
    cfg.session_timeout = session;
    cfg.auto_commit_interval = auto_commit;
    cfg
}

impl Member {
    async fn join(client: &Client, cfg: GroupConsumerConfig) -> anyhow::Result<Self> {
        Self::join_with(client, cfg, false).await
    }

    /// `commit_on_revoke`: commit when told partitions are being revoked, as an application
    /// without auto-commit does to hand them over without repeats.
    async fn join_with(client: &Client, cfg: GroupConsumerConfig, commit_on_revoke: bool) -> anyhow::Result<Self> {
        let mut consumer = GroupConsumer::subscribe(client.clone(), cfg).await?;
        let id = consumer.member_id();
        let mut events = consumer.events().context("events taken twice")?;
        let seen = Arc::new(Mutex::new(Vec::new()));
        let log = Arc::new(Mutex::new(Vec::new()));
        let (ctl, mut ctl_rx) = mpsc::channel(4);
        let (seen2, log2) = (seen.clone(), log.clone());
        let task = tokio::spawn(async move {
            loop {
                tokio::select! {
                    r = consumer.next() => match r {
                        Some(Ok(rec)) => seen2.lock().unwrap_or_else(PoisonError::into_inner).push((rec.partition, rec.offset)),
                        Some(Err(e)) => return Err(anyhow::Error::new(e).context("the member's stream failed")),
                        None => return Ok(()),
                    },
                    Some(ev) = events.recv() => {
                        let revoked = matches!(ev, GroupEvent::Revoked(_));
                        log2.lock().unwrap_or_else(PoisonError::into_inner).push(ev);
                        if revoked && commit_on_revoke {
                            consumer.commit().await.context("commit on revoke")?;
                        }
                    }
                    c = ctl_rx.recv() => match c {
                        Some(Ctl::Commit(tx)) => {
                            let _ = tx.send(consumer.commit().await);
                        }
                        Some(Ctl::Close(tx)) => {
                            let _ = tx.send(consumer.close().await);
                            return Ok(());
                        }
                        None => return Ok(()),
                    },
                }
            }
        });
        Ok(Self { id, seen, events: log, ctl, task })
    }

    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap_or_else(PoisonError::into_inner).clone()
    }

    fn events(&self) -> Vec<GroupEvent> {
        self.events.lock().unwrap_or_else(PoisonError::into_inner).clone()
    }

    /// The partitions it owns, as its events tell.
    fn owned(&self) -> BTreeSet<u32> {
        let mut owned = BTreeSet::new();
        for ev in self.events() {
            match ev {
                GroupEvent::Assigned(tps) => owned.extend(tps.iter().map(|tp| tp.partition)),
                GroupEvent::Revoked(tps) | GroupEvent::Lost(tps) => {
                    for tp in tps {
                        owned.remove(&tp.partition);
                    }
                }
            }
        }
        owned
    }

    /// Partitions named in Revoked or Lost events.
    fn given_up(&self) -> BTreeSet<u32> {
        self.events()
            .iter()
            .flat_map(|ev| match ev {
                GroupEvent::Revoked(tps) | GroupEvent::Lost(tps) => tps.clone(),
                GroupEvent::Assigned(_) => Vec::new(),
            })
            .map(|tp: TopicPartition| tp.partition)
            .collect()
    }

    async fn commit(&self) -> anyhow::Result<()> {
        let (tx, rx) = oneshot::channel();
        self.ctl.send(Ctl::Commit(tx)).await.map_err(|_| anyhow::anyhow!("member {} is gone", self.id))?;
        Ok(rx.await??)
    }

    async fn close(self) -> anyhow::Result<()> {
        let (tx, rx) = oneshot::channel();
        self.ctl.send(Ctl::Close(tx)).await.map_err(|_| anyhow::anyhow!("member {} is gone", self.id))?;
        rx.await??;
        self.task.await??;
        Ok(())
    }

    /// Dies without leaving: the consumer is dropped mid-stream, as in a crash of its process.
    async fn kill(self) {
        self.task.abort();
        let _ = self.task.await;
    }
}

/// Writes one record to each partition in turn until stopped; returns every acknowledged
/// (partition, offset).
struct Writer {
    stop: Arc<AtomicBool>,
    task: JoinHandle<anyhow::Result<Vec<Seen>>>,
}

impl Writer {
    fn start(client: Client, topic: &'static str, partitions: u32, pause: Duration) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let stop2 = stop.clone();
        let task = tokio::spawn(async move {
            let mut acked = Vec::new();
            let mut i = 0u64;
            while !stop2.load(Ordering::Relaxed) {
                let p = (i % u64::from(partitions)) as u32;
                let r = client.produce(topic, p, vec![Record::value(format!("r{i}"))]).await?;
                acked.push((r.partition, r.base_offset));
                i += 1;
                tokio::time::sleep(pause).await;
            }
            Ok(acked)
        });
        Self { stop, task }
    }

    async fn finish(self) -> anyhow::Result<Vec<Seen>> {
        self.stop.store(true, Ordering::Relaxed);
        self.task.await?
    }
}

async fn produce(client: &Client, topic: &str, partition: u32, n: usize) -> anyhow::Result<()> {
    for i in 0..n {
        client.produce(topic, partition, vec![Record::value(format!("{partition}-{i}"))]).await?;
    }
    Ok(())
}

/// Waits until the members' owned partitions have the sizes `want` (in member order) and together
/// cover `0..partitions` exactly once.
async fn settled(members: &[&Member], partitions: u32, want: &[usize]) -> anyhow::Result<()> {
    wait::until(&format!("assignments of sizes {want:?}"), SETTLE, || async {
        let owned: Vec<BTreeSet<u32>> = members.iter().map(|m| m.owned()).collect();
        let sizes: Vec<usize> = owned.iter().map(BTreeSet::len).collect();
        let all: Vec<u32> = owned.iter().flatten().copied().collect();
        let distinct: BTreeSet<u32> = all.iter().copied().collect();
        (sizes == want && all.len() == partitions as usize && distinct.len() == partitions as usize).then_some(())
    })
    .await
}

/// Waits until `members` together have seen every record in `acked`.
async fn all_delivered(members: &[&Member], acked: &[Seen]) -> anyhow::Result<()> {
    let logs: Vec<SeenLog> = members.iter().map(|m| m.seen.clone()).collect();
    all_delivered_to(&logs, acked).await
}

type SeenLog = Arc<Mutex<Vec<Seen>>>;

/// Waits until the logs together hold every record in `acked`.
async fn all_delivered_to(logs: &[SeenLog], acked: &[Seen]) -> anyhow::Result<()> {
    let want: BTreeSet<Seen> = acked.iter().copied().collect();
    let got = || -> BTreeSet<Seen> {
        logs.iter().flat_map(|l| l.lock().unwrap_or_else(PoisonError::into_inner).clone()).collect()
    };
    wait::until(&format!("all {} records delivered", want.len()), SETTLE, || async {
        want.is_subset(&got()).then_some(())
    })
    .await
    .with_context(|| {
        let got = got();
        let missing: Vec<&Seen> = want.difference(&got).take(20).collect();
        format!("missing (first 20): {missing:?}")
    })
}

/// The offsets a member saw of one partition, in delivery order.
fn offsets_of(seen: &[Seen], partition: u32) -> Vec<u64> {
    seen.iter().filter(|(p, _)| *p == partition).map(|(_, o)| *o).collect()
}

fn contiguous(offsets: &[u64]) -> bool {
    offsets.windows(2).all(|w| w[1] == w[0] + 1)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn t10_a_fourth_member_takes_only_what_moves_and_the_others_never_stop() -> anyhow::Result<()> {
    let c = InProcessCluster::start(3).await?;
    let client = c.client().await?;
    client.create_topic("t", 6).await?;
    let cfg = || config("email", "t", Duration::from_secs(10), Some(Duration::from_millis(200)));

    let a = Member::join(&client, cfg()).await?;
    settled(&[&a], 6, &[6]).await?;
    let b = Member::join(&client, cfg()).await?;
    settled(&[&a, &b], 6, &[3, 3]).await?;
    let d = Member::join(&client, cfg()).await?;
    settled(&[&a, &b, &d], 6, &[2, 2, 2]).await?;
    let before: Vec<BTreeSet<u32>> = [&a, &b, &d].iter().map(|m| m.owned()).collect();
    let given_up_before: Vec<BTreeSet<u32>> = [&a, &b, &d].iter().map(|m| m.given_up()).collect();

    // Records keep coming in every partition while the fourth member joins.
    let writer = Writer::start(client.clone(), "t", 6, Duration::from_millis(5));
    tokio::time::sleep(Duration::from_millis(500)).await;
    let marks: Vec<usize> = [&a, &b, &d].iter().map(|m| m.seen().len()).collect();
    let e = Member::join(&client, cfg()).await?;
    // 6 over 4 is 2,2,1,1: exactly one partition moves, to the new member.
    wait::until("the fourth member to get one partition", SETTLE, || async {
        let owned: Vec<BTreeSet<u32>> = [&a, &b, &d, &e].iter().map(|m| m.owned()).collect();
        let all: BTreeSet<u32> = owned.iter().flatten().copied().collect();
        let total: usize = owned.iter().map(BTreeSet::len).sum();
        (e.owned().len() == 1 && total == 6 && all.len() == 6).then_some(())
    })
    .await?;
    let moved = e.owned();
    // Let the writer run on after the rebalance, then check everything arrived.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let acked = writer.finish().await?;
    all_delivered(&[&a, &b, &d, &e], &acked).await?;

    for (i, m) in [&a, &b, &d].iter().enumerate() {
        let after = m.owned();
        let lost: BTreeSet<u32> = before[i].difference(&after).copied().collect();
        assert!(lost.is_subset(&moved), "member {i} lost {lost:?}, but only {moved:?} moved");
        let newly_given_up: BTreeSet<u32> = m.given_up().difference(&given_up_before[i]).copied().collect();
        assert_eq!(newly_given_up, lost, "member {i}: Revoked/Lost events only for what moved: {:?}", m.events());
        // Every partition it kept was delivered to it without a gap or a restart, from before
        // the fourth member came until after the group settled.
        let seen = m.seen();
        for p in before[i].intersection(&after) {
            let offs = offsets_of(&seen, *p);
            assert!(contiguous(&offs), "member {i}, partition {p}: offsets {offs:?} not contiguous");
            let during = offsets_of(&seen[marks[i]..], *p);
            let last_acked = acked.iter().filter(|(q, _)| q == p).map(|(_, o)| *o).max();
            assert!(!during.is_empty(), "member {i} received nothing of partition {p} during the join");
            assert_eq!(offs.last().copied(), last_acked, "member {i} kept delivering partition {p} to the end");
        }
    }
    // The moved partition: the old owner committed when it gave it up, and the new owner started
    // there. Together nothing is skipped; what was delivered after the last commit may repeat.
    assert_eq!(moved.len(), 1);
    let lost: usize = [&a, &b, &d].iter().enumerate().map(|(i, m)| before[i].difference(&m.owned()).count()).sum();
    assert_eq!(lost, 1, "exactly one partition changed hands");
    let e_seen = e.seen();
    for p in &moved {
        let offs = offsets_of(&e_seen, *p);
        assert!(contiguous(&offs), "new owner, partition {p}: {offs:?}");
        let (i, old) =
            [&a, &b, &d].into_iter().enumerate().find(|(i, _)| before[*i].contains(p)).context("old owner")?;
        assert!(
            old.events()
                .iter()
                .any(|ev| matches!(ev, GroupEvent::Revoked(tps) if tps.iter().any(|tp| tp.partition == *p))),
            "member {i} gave up {p} with a Revoked event (it could commit): {:?}",
            old.events()
        );
        // The new owner starts at the old owner's commit: at or before the old owner's next record.
        let old_offs = offsets_of(&old.seen(), *p);
        let (Some(first_new), Some(last_old)) = (offs.first(), old_offs.last()) else {
            anyhow::bail!("partition {p}: old owner saw {old_offs:?}, new owner {offs:?}")
        };
        assert!(*first_new <= last_old + 1, "partition {p}: the new owner started at {first_new} after {last_old}");
    }
    assert!(e.given_up().is_empty(), "{:?}", e.events());

    for m in [a, b, d, e] {
        m.close().await?;
    }
    c.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn t15_without_auto_commit_a_commit_on_revoked_hands_over_exactly() -> anyhow::Result<()> {
    let c = InProcessCluster::start(3).await?;
    let client = c.client().await?;
    client.create_topic("t", 2).await?;
    // A revocation waits for the application's commit up to a minute: if the commit did not end
    // it, the hand-over below would time out.
    let cfg = || {
        let mut cfg = config("manual", "t", Duration::from_secs(4), None);
        cfg.revoke_timeout = Duration::from_secs(60);
        cfg
    };
    let a = Member::join_with(&client, cfg(), true).await?;
    settled(&[&a], 2, &[2]).await?;
    let writer = Writer::start(client.clone(), "t", 2, Duration::from_millis(5));
    tokio::time::sleep(Duration::from_millis(500)).await;
    let b = Member::join_with(&client, cfg(), true).await?;
    wait::until("b to take over one partition", Duration::from_secs(20), || async {
        (b.owned().len() == 1 && a.owned().len() == 1).then_some(())
    })
    .await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let acked = writer.finish().await?;
    all_delivered(&[&a, &b], &acked).await?;
    // a committed everything it had been given when told of the revocation: b starts right
    // after a's last record of it. No gap, no repeat.
    let moved = b.owned();
    for p in &moved {
        let (old, new) = (offsets_of(&a.seen(), *p), offsets_of(&b.seen(), *p));
        let (Some(last_old), Some(first_new)) = (old.last(), new.first()) else {
            anyhow::bail!("partition {p}: a saw {old:?}, b saw {new:?}")
        };
        assert_eq!(*first_new, last_old + 1, "partition {p}: b starts where a's commit left it");
        assert!(contiguous(&old) && contiguous(&new));
    }
    a.close().await?;
    b.close().await?;
    c.shutdown().await;
    Ok(())
}

/// Regression (found by jepsen/, see docs/jepsen.md): records were delivered, then their partition
/// was given up before the application committed (here: revoked, and not committed within the
/// revoke timeout; in the Jepsen run: lost after a session timeout without a heartbeat answer).
/// `commit()` then had nothing left to commit for it and answered Ok, so the application believed
/// positions committed that the group never had. It must fail with ILLEGAL_GENERATION, commit
/// what the member still owns, and leave the given-up partition's offset where it was.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn t16_a_commit_after_delivered_records_were_given_up_uncommitted_fails() -> anyhow::Result<()> {
    let c = InProcessCluster::start(3).await?;
    let client = c.client().await?;
    client.create_topic("t", 2).await?;
    produce(&client, "t", 0, 10).await?;
    produce(&client, "t", 1, 10).await?;
    let cfg = || {
        let mut cfg = config("gave-up", "t", Duration::from_secs(4), None);
        cfg.revoke_timeout = Duration::from_millis(300);
        cfg
    };
    let mut a = GroupConsumer::subscribe(client.clone(), cfg()).await?;
    let mut delivered = 0;
    let deadline = tokio::time::Instant::now() + SETTLE;
    while delivered < 20 {
        anyhow::ensure!(tokio::time::Instant::now() < deadline, "a got {delivered} of 20 records");
        delivered += a.poll(Duration::from_millis(200)).await?.len();
    }
    // b joins: a is asked to give one partition up and does not commit in time, so it lets it go
    // with 10 delivered records uncommitted; b gets it only then.
    let b = GroupConsumer::subscribe(client.clone(), cfg()).await?;
    wait::until("b to own one partition", SETTLE, || async { (b.assignment().len() == 1).then_some(()) }).await?;
    let kept = a.assignment();
    assert_eq!(kept.len(), 1, "a keeps one partition");
    let err = match a.commit().await {
        Err(e) => e,
        Ok(()) => anyhow::bail!("commit() said Ok, but the given-up partition's 10 records were never committed"),
    };
    assert_eq!(err.code(), Some(busbar_client::codes::ILLEGAL_GENERATION), "{err}");
    // What a still owns was committed; the partition it gave up was not.
    let desc = client.describe_group("gave-up").await?;
    let committed: BTreeMap<u32, u64> =
        desc.partitions.iter().filter(|p| p.has_committed).map(|p| (p.partition, p.committed)).collect();
    assert_eq!(committed.get(&kept[0].partition), Some(&10), "{committed:?}");
    let gone = 1 - kept[0].partition;
    assert!(committed.get(&gone).is_none_or(|o| *o == 0), "{committed:?}");
    // The error is reported once: the next commit, with nothing dropped since, is Ok.
    a.commit().await?;
    drop(b);
    drop(a);
    c.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn t20_a_member_that_dies_without_leaving_is_replaced_and_nothing_is_skipped() -> anyhow::Result<()> {
    let c = InProcessCluster::start(3).await?;
    let client = c.client().await?;
    client.create_topic("t", 6).await?;
    let cfg = || config("billing", "t", Duration::from_secs(2), Some(Duration::from_millis(200)));
    let a = Member::join(&client, cfg()).await?;
    settled(&[&a], 6, &[6]).await?;
    let b = Member::join(&client, cfg()).await?;
    settled(&[&a, &b], 6, &[3, 3]).await?;
    let d = Member::join(&client, cfg()).await?;
    settled(&[&a, &b, &d], 6, &[2, 2, 2]).await?;

    let writer = Writer::start(client.clone(), "t", 6, Duration::from_millis(5));
    tokio::time::sleep(Duration::from_millis(1500)).await;
    // d dies: no commit, no leave. Its partitions sit idle until its 2 s session runs out.
    let dead = d.owned();
    let dead_log = d.seen.clone();
    d.kill().await;
    // A commit d had in flight has landed by now; nothing of d's commits after this.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let desc = client.describe_group("billing").await?;
    let committed_at_death: BTreeMap<u32, u64> =
        desc.partitions.iter().filter(|p| p.has_committed).map(|p| (p.partition, p.committed)).collect();
    settled(&[&a, &b], 6, &[3, 3]).await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let acked = writer.finish().await?;
    // Everything reaches the group: d's partitions from d's last commit on, through their new owners.
    all_delivered_to(&[a.seen.clone(), b.seen.clone(), dead_log.clone()], &acked).await?;
    for p in &dead {
        let from = committed_at_death.get(p).copied().unwrap_or(0);
        let want: Vec<Seen> = acked.iter().copied().filter(|(q, o)| q == p && *o >= from).collect();
        all_delivered(&[&a, &b], &want).await.with_context(|| format!("partition {p} after d's death"))?;
    }

    // Across all three, every record at least once; a record twice only in d's partitions, at or
    // after d's last commit (delivered to d, not committed, then delivered to the new owner).
    let mut count: BTreeMap<Seen, usize> = BTreeMap::new();
    let dead_seen = dead_log.lock().unwrap_or_else(PoisonError::into_inner).clone();
    for s in a.seen().into_iter().chain(b.seen()).chain(dead_seen) {
        *count.entry(s).or_default() += 1;
    }
    for s in &acked {
        assert!(count.contains_key(s), "record {s:?} was never delivered");
    }
    for ((p, o), n) in &count {
        if *n > 1 {
            assert!(dead.contains(p), "partition {p} offset {o} delivered {n} times, but its owner never changed");
            let from = committed_at_death.get(p).copied().unwrap_or(0);
            assert!(*o >= from, "partition {p} offset {o} repeated although committed up to {from}");
        }
    }
    a.close().await?;
    b.close().await?;
    c.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn t30_two_groups_on_one_topic_each_get_every_record() -> anyhow::Result<()> {
    let c = InProcessCluster::start(3).await?;
    let client = c.client().await?;
    client.create_topic("t", 3).await?;
    let cfg = |g: &str| config(g, "t", Duration::from_secs(10), Some(Duration::from_millis(200)));
    let x = Member::join(&client, cfg("audit")).await?;
    let y1 = Member::join(&client, cfg("search")).await?;
    let y2 = Member::join(&client, cfg("search")).await?;
    settled(&[&x], 3, &[3]).await?;
    wait::until("search to share the partitions", SETTLE, || async {
        let (o1, o2) = (y1.owned(), y2.owned());
        (o1.len() + o2.len() == 3 && o1.is_disjoint(&o2) && !o1.is_empty() && !o2.is_empty()).then_some(())
    })
    .await?;
    let mut acked = Vec::new();
    for i in 0..90u32 {
        let r = client.produce("t", i % 3, vec![Record::value(format!("r{i}"))]).await?;
        acked.push((r.partition, r.base_offset));
    }
    all_delivered(&[&x], &acked).await?;
    all_delivered(&[&y1, &y2], &acked).await?;
    // Within one group, each record exactly once here: nothing moved.
    let mut search: Vec<Seen> = y1.seen().into_iter().chain(y2.seen()).collect();
    search.sort();
    search.dedup();
    assert_eq!(search.len(), 90);
    assert_eq!(y1.seen().len() + y2.seen().len(), 90, "no record twice within a group that did not rebalance");
    assert_eq!(x.seen().len(), 90);
    for m in [x, y1, y2] {
        m.close().await?;
    }
    c.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn t40_committed_offsets_survive_a_leader_crash_and_the_group_resumes_exactly_there() -> anyhow::Result<()> {
    let mut c = InProcessCluster::start(3).await?;
    let client = c.client().await?;
    client.create_topic("t", 2).await?;
    for p in 0..2 {
        produce(&client, "t", p, 5).await?;
    }
    // Manual commits: the test decides what is committed.
    let cfg = || config("ledger", "t", Duration::from_secs(4), None);
    let m = Member::join(&client, cfg()).await?;
    wait::until("m to see 10 records", SETTLE, || async { (m.seen().len() == 10).then_some(()) }).await?;
    m.commit().await?;
    let committed = |d: &busbar_client::DescribeGroupResponse| -> BTreeMap<u32, u64> {
        d.partitions.iter().filter(|p| p.has_committed).map(|p| (p.partition, p.committed)).collect()
    };
    assert_eq!(committed(&client.describe_group("ledger").await?), BTreeMap::from([(0, 5), (1, 5)]));

    // Kill the leader (the coordinator). The offsets are on the new one; m keeps its membership
    // (no rejoin, no Lost) and goes on where it was.
    let old = c.leader().await?;
    c.crash(old).await?;
    let client = c.client().await?;
    assert_eq!(committed(&client.describe_group("ledger").await?), BTreeMap::from([(0, 5), (1, 5)]));
    for p in 0..2 {
        produce(&client, "t", p, 2).await?;
    }
    wait::until("m to see 14 records", SETTLE, || async { (m.seen().len() == 14).then_some(()) }).await?;
    for p in 0..2 {
        assert_eq!(offsets_of(&m.seen(), p), (0..7).collect::<Vec<u64>>(), "partition {p}");
    }
    // Commits go to the new coordinator under the same membership.
    m.commit().await?;
    assert_eq!(committed(&client.describe_group("ledger").await?), BTreeMap::from([(0, 7), (1, 7)]));
    let d = client.describe_group("ledger").await?;
    assert_eq!(d.members.iter().map(|x| x.member_id.clone()).collect::<Vec<_>>(), vec![m.id.clone()]);
    assert!(m.events().iter().all(|e| matches!(e, GroupEvent::Assigned(_))), "{:?}", m.events());

    // m takes two more per partition without committing, then dies. The next member starts at
    // the committed offsets (7), not where m got to (9).
    for p in 0..2 {
        produce(&client, "t", p, 2).await?;
    }
    wait::until("m to see 18 records", SETTLE, || async { (m.seen().len() == 18).then_some(()) }).await?;
    m.kill().await;
    let n = Member::join(&client, cfg()).await?;
    wait::until("n to see 4 records", SETTLE, || async { (n.seen().len() >= 4).then_some(()) }).await?;
    for p in 0..2 {
        let offs = offsets_of(&n.seen(), p);
        assert_eq!(offs.first().copied(), Some(7), "partition {p}: the first record seen is the committed offset");
        assert_eq!(offs, vec![7, 8], "partition {p}");
    }
    n.close().await?;
    c.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn t50_lag_is_end_minus_committed_per_partition() -> anyhow::Result<()> {
    let c = InProcessCluster::start(3).await?;
    let client = c.client().await?;
    let admin = Admin::new(client.clone());
    admin.create_topic("t", 3).await?;
    let counts = [5usize, 7, 9];
    for (p, n) in counts.iter().enumerate() {
        produce(&client, "t", p as u32, *n).await?;
    }
    let m = Member::join(&client, config("reports", "t", Duration::from_secs(10), None)).await?;
    wait::until("m to see 21 records", SETTLE, || async { (m.seen().len() == 21).then_some(()) }).await?;
    // Nothing committed yet: the lag counts from each partition's start.
    let d = admin.describe_group("reports").await?;
    for p in &d.partitions {
        assert!(!p.has_committed, "{p:?}");
        assert_eq!(p.lag, counts[p.partition as usize] as u64, "{p:?}");
        assert_eq!(p.owner, m.id);
    }
    m.commit().await?;
    let extra = [3usize, 0, 2];
    for (p, n) in extra.iter().enumerate() {
        produce(&client, "t", p as u32, *n).await?;
    }
    let d = admin.describe_group("reports").await?;
    assert_eq!(d.partitions.len(), 3);
    for p in &d.partitions {
        let i = p.partition as usize;
        assert!(p.has_committed, "{p:?}");
        assert_eq!(p.committed, counts[i] as u64, "{p:?}");
        assert_eq!(p.end_offset, (counts[i] + extra[i]) as u64, "{p:?}");
        assert_eq!(p.lag, extra[i] as u64, "{p:?}");
    }
    // Committing what was delivered since brings the lag to zero.
    wait::until("m to see 26 records", SETTLE, || async { (m.seen().len() == 26).then_some(()) }).await?;
    m.commit().await?;
    let d = admin.describe_group("reports").await?;
    assert!(d.partitions.iter().all(|p| p.lag == 0 && p.committed == p.end_offset), "{:?}", d.partitions);
    assert_eq!(admin.list_groups().await?, vec!["reports".to_string()]);
    m.close().await?;
    c.shutdown().await;
    Ok(())
}

/// Retention removes records a member's fetch task had not reached yet: the member goes on from
/// the oldest record left (OFFSET_OUT_OF_RANGE, then the start offset as `DescribeTopic` reports
/// it, which needs no leader) instead of retrying the removed offset forever.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn t60_records_removed_by_retention_before_the_group_reached_them_are_skipped() -> anyhow::Result<()> {
    let c = InProcessCluster::start(3).await?;
    let client = c.client().await?;
    client.create_topic("ret", 1).await?;
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_millis() as i64;
    let old = now - 2 * 3_600_000;
    for i in 0..100 {
        client.produce("ret", 0, vec![Record::value(format!("old-{i}")).with_timestamp_ms(old)]).await?;
    }
    // One record per fetch: the member's queue holds 16 batches, so its fetch task stops a few
    // records in while the application does not poll.
    let mut cfg = config("ret-g", "ret", Duration::from_secs(10), None);
    cfg.max_poll_records = 1;
    let mut consumer = GroupConsumer::subscribe(client.clone(), cfg).await?;
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let first = loop {
        anyhow::ensure!(std::time::Instant::now() < deadline, "no record 20 s after subscribing");
        let got = consumer.poll(Duration::from_millis(200)).await?;
        if let Some(r) = got.into_iter().next() {
            break r;
        }
    };
    anyhow::ensure!(first.offset == 0, "the group starts at the earliest record");

    client.alter_topic_config("ret", &[("retention.ms".into(), "3600000".into())], &[]).await?;
    wait::until("retention to remove the old records", Duration::from_secs(20), || async {
        let d = client.describe_topic("ret").await.ok()?;
        (d.partitions.first()?.start_offset == 100).then_some(())
    })
    .await?;
    for i in 0..5 {
        client.produce("ret", 0, vec![Record::value(format!("new-{i}"))]).await?;
    }
    // What was fetched before the cut is still delivered; then the member skips to offset 100.
    let mut values = Vec::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !values.iter().any(|v: &String| v == "new-4") {
        anyhow::ensure!(std::time::Instant::now() < deadline, "no new record 30 s after the cut: {values:?}");
        for r in consumer.poll(Duration::from_millis(200)).await? {
            values.push(String::from_utf8_lossy(&r.value).to_string());
        }
    }
    let new: Vec<&String> = values.iter().filter(|v| v.starts_with("new-")).collect();
    assert_eq!(new, ["new-0", "new-1", "new-2", "new-3", "new-4"], "the records after the cut, in order, once");
    let old_seen = values.iter().filter(|v| v.starts_with("old-")).count();
    assert!(old_seen < 99, "the member skipped the removed records ({old_seen} old ones delivered)");
    consumer.close().await?;
    c.shutdown().await;
    Ok(())
}
