//! Cluster behaviour on real nodes inside the test process (real gRPC, WAL and sled; links cut
//! through the shared partition table). Numbered by category: t10 election, t20 failover,
//! t30 catch-up, t40 membership, t50 partitions.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use busbar_client::{Client, Record};
use busbar_raft::RaftConfig;
use busbar_server::Limits;
use busbar_tests::inprocess::{test_raft_config, InProcessCluster};
use busbar_tests::wait;
use openraft::ServerState;

/// (partition, offset) -> value of every acknowledged record.
type Acked = BTreeMap<(u32, u64), Vec<u8>>;

async fn produce_n(
    client: &Client,
    topic: &str,
    partitions: u32,
    from: usize,
    n: usize,
    acked: &mut Acked,
) -> anyhow::Result<()> {
    for i in from..from + n {
        let p = (i as u32) % partitions;
        let value = format!("v-{i}").into_bytes();
        let ack = client.produce(topic, p, vec![Record::value(value.clone())]).await?;
        acked.insert((p, ack.base_offset), value);
    }
    Ok(())
}

/// Every acknowledged record is on node `id`, at its offset.
async fn assert_has_all(
    c: &InProcessCluster,
    id: u64,
    topic: &str,
    partitions: u32,
    acked: &Acked,
) -> anyhow::Result<()> {
    for p in 0..partitions {
        let held: BTreeMap<u64, Vec<u8>> = c.dump(id, topic, p).await?.into_iter().collect();
        for ((ap, off), v) in acked.iter().filter(|((ap, _), _)| *ap == p) {
            let got = held.get(off);
            anyhow::ensure!(
                got == Some(v),
                "node {id}: acknowledged {topic}/{ap}@{off} = {:?}, holds {:?}",
                String::from_utf8_lossy(v),
                got.map(|g| String::from_utf8_lossy(g).to_string())
            );
        }
    }
    Ok(())
}

/// Three nodes with the given Raft settings (the tests that need snapshots and purges set their
/// pace) and writes that give up after 5 s.
async fn start_three(raft: RaftConfig) -> anyhow::Result<InProcessCluster> {
    InProcessCluster::start_with(3, raft, Limits { write_timeout: Duration::from_secs(5), ..Limits::default() }).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn t10_three_nodes_elect_exactly_one_leader() -> anyhow::Result<()> {
    let c = InProcessCluster::start(3).await?;
    let leader = c.leader().await?;
    let leaders: Vec<u64> = c
        .ids()
        .into_iter()
        .filter(|id| c.metrics(*id).map(|m| m.state == ServerState::Leader).unwrap_or(false))
        .collect();
    assert_eq!(leaders, vec![leader]);
    for id in c.ids() {
        assert_eq!(c.voters(id)?, vec![1, 2, 3], "node {id} membership");
    }
    // The cluster-status API reports every node, reachable, with the leader among them.
    let st = c.client().await?.cluster_status().await?;
    assert_eq!(st.nodes.len(), 3);
    assert!(st.nodes.iter().all(|n| n.reachable));
    assert_eq!(st.leader_id, leader);
    // Every member runs this build, so the leader moves the cluster to the newest apply version,
    // through the log: every node applies it.
    let newest = busbar_storage::apply_version::APPLY_VERSION;
    wait::until("every node at the newest apply version", Duration::from_secs(20), || async {
        let st = c.client().await.ok()?.cluster_status().await.ok()?;
        (st.nodes.len() == 3 && st.nodes.iter().all(|n| n.apply_version == newest && n.max_apply_version == newest))
            .then_some(())
    })
    .await?;
    c.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn t20_leader_crash_elects_new_leader_and_keeps_every_acknowledged_write() -> anyhow::Result<()> {
    let mut c = InProcessCluster::start(3).await?;
    let client = c.client().await?;
    client.create_topic("orders", 3).await?;
    let mut acked = Acked::new();
    produce_n(&client, "orders", 3, 0, 60, &mut acked).await?;

    let old = c.leader().await?;
    let crashed_at = Instant::now();
    c.crash(old).await?;
    let survivors: Vec<u64> = c.ids();
    let new = c.leader_among(&survivors).await?;
    let took = crashed_at.elapsed();
    assert_ne!(new, old);
    // A few election timeouts (max 1 s here), with room for a loaded machine.
    assert!(took < Duration::from_secs(10), "new leader took {took:?}");

    let client = c.client().await?;
    produce_n(&client, "orders", 3, 60, 60, &mut acked).await?;
    for id in &survivors {
        assert_has_all(&c, *id, "orders", 3, &acked).await?;
    }

    // The old leader comes back and catches up by log until every node is identical.
    c.restart(old).await?;
    c.wait_identical("orders", 3, Duration::from_secs(30)).await?;
    assert_has_all(&c, old, "orders", 3, &acked).await?;
    c.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn t30_follower_down_past_a_purge_catches_up_by_streamed_snapshot() -> anyhow::Result<()> {
    let raft = RaftConfig { snapshot_every: 40, logs_to_keep: 5, ..test_raft_config() };
    let mut c = start_three(raft).await?;
    let client = c.client().await?;
    client.create_topic("big", 2).await?;
    let leader = c.leader().await?;
    let follower = c.ids().into_iter().find(|id| *id != leader).unwrap_or(1);
    c.crash(follower).await?;

    // ~6 MiB in 200 batches of 32 KiB: several snapshots, several 1 MiB chunks each.
    let mut acked = Acked::new();
    let client = c.client().await?;
    for i in 0..200u32 {
        let p = i % 2;
        let value = format!("{i:08}").into_bytes().into_iter().cycle().take(32 * 1024).collect::<Vec<u8>>();
        let ack = client.produce("big", p, vec![Record::value(value.clone())]).await?;
        acked.insert((p, ack.base_offset), value);
    }
    // The leader has purged its log past everything the follower has.
    let follower_last = {
        // Its WAL on disk ends where it crashed; the purge must go beyond it.
        let m = c.metrics(leader)?;
        m.purged.map(|p| p.index).unwrap_or(0)
    };
    assert!(follower_last > 50, "leader should have purged its log (purged up to {follower_last})");

    c.restart(follower).await?;
    let snap = wait::until("the follower to install a snapshot", Duration::from_secs(60), || async {
        let m = c.metrics(follower).ok()?;
        m.snapshot.filter(|s| s.index >= 50)
    })
    .await?;
    assert!(snap.index >= 50);
    c.wait_identical("big", 2, Duration::from_secs(60)).await?;
    assert_has_all(&c, follower, "big", 2, &acked).await?;
    c.shutdown().await;
    Ok(())
}

/// One-record writes of 100 bytes merge into each partition's last stored batch (apply version 3),
/// their records in the varint encoding (version 4).
/// A follower that was down past a purge installs a snapshot taken while that batch was still
/// growing, with writes going on, and ends with the same records *and* the same stored batches as
/// the others (equal byte counts: each batch adds a header and a crc to its records' bytes).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn t35_a_snapshot_of_merged_tails_leaves_the_follower_with_the_same_batches() -> anyhow::Result<()> {
    let raft = RaftConfig { snapshot_every: 40, logs_to_keep: 5, ..test_raft_config() };
    let mut c = start_three(raft).await?;
    let newest = busbar_storage::apply_version::APPLY_VERSION;
    wait::until("every node at the newest apply version", Duration::from_secs(20), || async {
        let st = c.client().await.ok()?.cluster_status().await.ok()?;
        (st.nodes.len() == 3 && st.nodes.iter().all(|n| n.apply_version == newest)).then_some(())
    })
    .await?;
    let client = c.client().await?;
    client.create_topic("small", 2).await?;
    let leader = c.leader().await?;
    let follower = c.ids().into_iter().find(|id| *id != leader).unwrap_or(1);
    c.crash(follower).await?;
    let value = |i: usize| format!("{i:0>100}").into_bytes();
    let mut acked = Acked::new();
    for i in 0..300 {
        let p = (i % 2) as u32;
        let ack = client.produce("small", p, vec![Record::value(value(i))]).await?;
        acked.insert((p, ack.base_offset), value(i));
    }
    // More entries after the leader's last snapshot than share one store transaction (32), fewer
    // than make the next snapshot (40): the partitions' last batches in sled have grown past what
    // the snapshot names, and its export must cut them back.
    let mut next = 300;
    loop {
        let m = c.metrics(leader)?;
        let applied = m.last_applied.map(|l| l.index).unwrap_or(0);
        if applied.saturating_sub(m.snapshot.map(|s| s.index).unwrap_or(0)) >= 34 {
            break;
        }
        anyhow::ensure!(next < 400, "no snapshot point found (applied {applied}, snapshot {:?})", m.snapshot);
        let p = (next % 2) as u32;
        let ack = client.produce("small", p, vec![Record::value(value(next))]).await?;
        acked.insert((p, ack.base_offset), value(next));
        next += 1;
    }
    let purged = c.metrics(leader)?.purged.map(|p| p.index).unwrap_or(0);
    assert!(purged > 50, "leader should have purged its log (purged up to {purged})");

    let taken = c.metrics(leader)?.snapshot.map(|s| s.index).unwrap_or(0);
    c.restart(follower).await?;
    // No writes until it is installed: a later snapshot would not show the cut.
    let installed = wait::until("the follower to install the snapshot", Duration::from_secs(60), || async {
        c.metrics(follower).ok()?.snapshot.map(|s| s.index).filter(|i| *i >= taken)
    })
    .await?;
    assert_eq!(installed, taken, "the follower installed the snapshot taken before it came back");
    for i in next..next + 100 {
        let p = (i % 2) as u32;
        let ack = client.produce("small", p, vec![Record::value(value(i))]).await?;
        acked.insert((p, ack.base_offset), value(i));
    }
    c.wait_identical("small", 2, Duration::from_secs(60)).await?;
    assert_has_all(&c, follower, "small", 2, &acked).await?;
    assert!(installed >= 50, "the follower caught up by a snapshot (at {installed})");
    let stores: Vec<_> = c.ids().into_iter().map(|id| c.store_offsets(id, "small")).collect::<Result<_, _>>()?;
    for (id, s) in c.ids().into_iter().zip(&stores) {
        assert_eq!(s, &stores[0], "node {id}'s stored batches differ from node {}'s", c.ids()[0]);
    }
    for p in &stores[0] {
        let records = p.end_offset - p.start_offset;
        // 108 bytes per 100-byte record in the varint encoding (125 in bincode), plus 20 per stored
        // batch: one batch per record would be 128.
        assert!(p.bytes < records * 112, "partition {}: {} bytes for {records} records", p.partition, p.bytes);
    }
    c.shutdown().await;
    Ok(())
}

/// The apply version the current leader reports for itself.
async fn leader_apply_version(c: &InProcessCluster) -> anyhow::Result<u32> {
    let leader = c.leader().await?;
    let st = c.client_of(leader).await?.cluster_status().await?;
    st.nodes.iter().find(|n| n.id == leader).map(|n| n.apply_version).context("the leader is not in its own status")
}

/// Bytes the current leader stores for a topic (it has applied every write it acknowledged).
async fn leader_stored_bytes(c: &InProcessCluster, topic: &str) -> anyhow::Result<u64> {
    Ok(c.store_offsets(c.leader().await?, topic)?.iter().map(|p| p.bytes).sum())
}

/// Writes on both sides of the live raise to apply version 4: one-record writes proposed while the
/// cluster applies its first version are stored in bincode, one batch each, the ones after the
/// raise in varint, merged into the partitions' last batches. A member that was down while the
/// first were written (it held the raise back) comes back, the leader raises the version while
/// writes go on, through snapshots and purges; in the end every node holds every acknowledged
/// record, reads it back the same, and stores the same batches (equal byte counts).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn t37_writes_across_the_live_raise_to_varint_records_read_back_the_same_everywhere() -> anyhow::Result<()> {
    let raft = RaftConfig { snapshot_every: 40, logs_to_keep: 5, ..test_raft_config() };
    let mut c = start_three(raft).await?;
    let newest = busbar_storage::apply_version::APPLY_VERSION;
    let leader = c.leader().await?;
    let follower = c.ids().into_iter().find(|id| *id != leader).unwrap_or(1);
    // At once: a leader first looks at raising the version once it has led for two seconds, and a
    // member that does not answer holds the raise back.
    c.crash(follower).await?;
    let before = leader_apply_version(&c).await?;
    anyhow::ensure!(
        before < busbar_storage::apply_version::VARINT_RECORDS,
        "the cluster was at version {before} before the test could hold the raise back"
    );
    let client = c.client().await?;
    client.create_topic("mixed", 2).await?;
    let value = |i: usize| format!("{i:0>100}").into_bytes();
    let mut acked = Acked::new();
    let write = |i: usize| {
        let client = client.clone();
        async move {
            let p = (i % 2) as u32;
            let ack = client.produce("mixed", p, vec![Record::value(value(i))]).await?;
            anyhow::Ok(((p, ack.base_offset), value(i)))
        }
    };
    for i in 0..100 {
        let (k, v) = write(i).await?;
        acked.insert(k, v);
    }
    let held = leader_apply_version(&c).await?;
    assert_eq!(held, before, "the raise went ahead with a member down");
    // A fresh cluster applies at its first version: each write its own batch, 125 bytes for a
    // 100-byte record in bincode and 20 for the batch (varint would be 108 + 20).
    let first = leader_stored_bytes(&c, "mixed").await?;
    assert_eq!(first, 100 * 145, "the first 100 records are not one bincode batch each");

    c.restart(follower).await?;
    let mut next = 100;
    // Writes go on while the leader raises the version (every two seconds it looks).
    let raised = Instant::now();
    while leader_apply_version(&c).await? < newest {
        anyhow::ensure!(raised.elapsed() < Duration::from_secs(30), "the version was not raised in 30 s");
        let (k, v) = write(next).await?;
        acked.insert(k, v);
        next += 1;
    }
    let mid = leader_stored_bytes(&c, "mixed").await?;
    for i in next..next + 100 {
        let (k, v) = write(i).await?;
        acked.insert(k, v);
    }
    let last = leader_stored_bytes(&c, "mixed").await?.saturating_sub(mid);
    // Merged into 4 KiB tails, 20 bytes each: a bincode record would take 125.
    assert!(last < 100 * 112, "{last} bytes for the last 100 records: not varint?");
    c.wait_identical("mixed", 2, Duration::from_secs(60)).await?;
    for id in c.ids() {
        assert_has_all(&c, id, "mixed", 2, &acked).await?;
    }
    let stores: Vec<_> = c.ids().into_iter().map(|id| c.store_offsets(id, "mixed")).collect::<Result<_, _>>()?;
    for (id, s) in c.ids().into_iter().zip(&stores) {
        assert_eq!(s, &stores[0], "node {id}'s stored batches differ from node {}'s", c.ids()[0]);
    }
    c.shutdown().await;
    Ok(())
}

/// A snapshot names batches in the leader's store rather than copying them; the store keeps what
/// its snapshot names. Here a topic in the snapshot is deleted after it was taken, and the leader's
/// reclaimer runs, before a lagging follower needs the snapshot: it must still arrive whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn t31_a_snapshot_streams_whole_after_a_topic_in_it_was_deleted() -> anyhow::Result<()> {
    let raft = RaftConfig { snapshot_every: 20, logs_to_keep: 2, ..test_raft_config() };
    let mut c = start_three(raft).await?;
    let client = c.client().await?;
    client.create_topic("keep", 1).await?;
    client.create_topic("gone", 1).await?;
    let leader = c.leader().await?;
    let follower = c.ids().into_iter().find(|id| *id != leader).unwrap_or(1);
    c.crash(follower).await?;

    let client = c.client().await?;
    let mut acked = Acked::new();
    produce_n(&client, "keep", 1, 0, 15, &mut acked).await?;
    produce_n(&client, "gone", 1, 0, 15, &mut Acked::new()).await?;
    let snap = wait::until("the leader to take a snapshot", Duration::from_secs(20), || async {
        c.metrics(leader).ok()?.snapshot.filter(|s| s.index >= 15)
    })
    .await?;
    // Fewer entries than `snapshot_every` from here on: that snapshot stays the one to send.
    client.delete_topic("gone").await?;
    produce_n(&client, "keep", 1, 15, 1, &mut acked).await?;
    // The reclaimer runs every 500 ms; give it several turns at the deleted topic.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(c.metrics(leader)?.snapshot, Some(snap), "no newer snapshot was taken");

    c.restart(follower).await?;
    wait::until("the follower to install the snapshot", Duration::from_secs(30), || async {
        c.metrics(follower).ok()?.snapshot.filter(|s| s.index >= snap.index)
    })
    .await?;
    c.wait_identical("keep", 1, Duration::from_secs(30)).await?;
    assert_has_all(&c, follower, "keep", 1, &acked).await?;
    let follower_client = c.client_of(follower).await?;
    wait::until("the follower to apply the deletion", Duration::from_secs(30), || async {
        follower_client.describe_topic("gone").await.is_err().then_some(())
    })
    .await?;
    c.shutdown().await;
    Ok(())
}

fn batch_files(c: &InProcessCluster, id: u64) -> usize {
    std::fs::read_dir(c.data_dir(id).join("state").join("batches"))
        .map(|d| d.filter(|e| e.as_ref().is_ok_and(|e| e.file_name().to_string_lossy().ends_with(".batches"))).count())
        .unwrap_or(0)
}

/// Batch files interleave every topic's batches. Deleting a topic whose batches share files with a
/// retained one used to free nothing; each node's compaction now copies the retained batches out
/// and the files go, on every node, with every acknowledged record still there (also after a
/// restart, which reads the moved references back).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn t32_a_deleted_topic_sharing_batch_files_with_a_kept_one_gives_its_space_back() -> anyhow::Result<()> {
    let raft = RaftConfig {
        batch_file_bytes: 16 << 10,
        compact_every_ms: 200,
        snapshot_every: 20,
        logs_to_keep: 2,
        ..test_raft_config()
    };
    let mut c = start_three(raft).await?;
    let client = c.client().await?;
    client.create_topic("keep", 1).await?;
    client.create_topic("bulk", 1).await?;
    let mut acked = Acked::new();
    let filler = vec![b'f'; 2048];
    for i in 0..80 {
        client.produce("bulk", 0, vec![Record::value(filler.clone())]).await?;
        if i % 4 == 0 {
            produce_n(&client, "keep", 1, i, 1, &mut acked).await?;
        }
    }
    c.wait_identical("keep", 1, Duration::from_secs(30)).await?;
    for id in c.ids() {
        anyhow::ensure!(batch_files(&c, id) >= 8, "node {id}: {} batch files for 160 KiB", batch_files(&c, id));
    }
    client.delete_topic("bulk").await?;
    // Enough entries for a newer snapshot, which releases what the last one named of "bulk".
    produce_n(&client, "keep", 1, 100, 30, &mut acked).await?;
    for id in c.ids() {
        wait::until(&format!("node {id} to compact its batch files"), Duration::from_secs(30), || async {
            (batch_files(&c, id) <= 3).then_some(())
        })
        .await?;
    }
    c.wait_identical("keep", 1, Duration::from_secs(30)).await?;
    for id in c.ids() {
        assert_has_all(&c, id, "keep", 1, &acked).await?;
    }
    let leader = c.leader().await?;
    let follower = c.ids().into_iter().find(|id| *id != leader).unwrap_or(1);
    c.crash(follower).await?;
    c.restart(follower).await?;
    produce_n(&c.client().await?, "keep", 1, 200, 5, &mut acked).await?;
    c.wait_identical("keep", 1, Duration::from_secs(30)).await?;
    assert_has_all(&c, follower, "keep", 1, &acked).await?;
    c.shutdown().await;
    Ok(())
}

fn copy_dir(from: &std::path::Path, to: &std::path::Path) -> std::io::Result<()> {
    std::fs::create_dir_all(to)?;
    for e in std::fs::read_dir(from)? {
        let e = e?;
        if e.file_type()?.is_dir() {
            copy_dir(&e.path(), &to.join(e.file_name()))?;
        } else {
            std::fs::copy(e.path(), to.join(e.file_name()))?;
        }
    }
    Ok(())
}

/// A node whose state machine is behind the point its log was purged to (state/ damaged or put
/// back from an older copy: found by the jepsen disk nemesis truncating sled's file) refuses to
/// start, naming both points. Before, openraft stopped at once (it cannot re-apply entries the log
/// no longer holds) while the node went on serving reads from its stale store.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn t33_a_store_behind_its_purged_log_refuses_to_start() -> anyhow::Result<()> {
    let raft = RaftConfig { snapshot_every: 20, logs_to_keep: 2, ..test_raft_config() };
    let mut c = start_three(raft).await?;
    let client = c.client().await?;
    client.create_topic("t", 1).await?;
    let leader = c.leader().await?;
    let victim = c.ids().into_iter().find(|id| *id != leader).unwrap_or(1);
    client.produce("t", 0, vec![Record::value("before")]).await?;
    c.wait_identical("t", 1, Duration::from_secs(10)).await?;
    c.stop(victim).await?;
    let old = c.data_dir(victim).with_extension("old-state");
    copy_dir(&c.data_dir(victim).join("state"), &old)?;
    let old_applied = c.metrics(leader)?.last_applied.map(|l| l.index).unwrap_or(0);
    c.restart(victim).await?;
    for i in 0..100 {
        client.produce("t", 0, vec![Record::value(format!("r{i}"))]).await?;
    }
    wait::until("the victim's log purged past its old state", Duration::from_secs(30), || async {
        let purged = c.metrics(victim).ok()?.purged?.index;
        (purged > old_applied).then_some(())
    })
    .await?;
    c.stop(victim).await?;
    let state = c.data_dir(victim).join("state");
    std::fs::remove_dir_all(&state)?;
    copy_dir(&old, &state)?;
    // The stopped instance may hold its storage a moment longer: until then a start fails on that.
    let deadline = Instant::now() + Duration::from_secs(20);
    let refusal = loop {
        match c.try_restart(victim).await? {
            Ok(()) => anyhow::bail!("a node whose store is behind its purged log started"),
            Err(e) if e.contains("was purged up to index") => break e,
            Err(e) if Instant::now() < deadline => {
                eprintln!("t33: not the refusal yet: {e}");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => anyhow::bail!("the start failed, but not for its store being behind its log: {e}"),
        }
    };
    assert!(refusal.contains("wipe its data directory"), "{refusal}");
    c.shutdown().await;
    Ok(())
}

/// A node whose Raft stops on a fatal error stops serving too, rather than answer reads from a store
/// nothing updates any more. The error here: an entry asking for an apply version no build has,
/// which stops the state machine of every node that applies it. The leader applies it first; a
/// follower only once it hears the entry committed, which a leader that stops at once may never
/// tell it: only the leader is certain to stop.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn t34_a_node_whose_raft_stops_stops_serving() -> anyhow::Result<()> {
    let mut c = InProcessCluster::start(3).await?;
    let client = c.client().await?;
    client.create_topic("t", 1).await?;
    client.produce("t", 0, vec![Record::value("before")]).await?;
    let leader = c.leader().await?;
    let unknown = busbar_types::Command::SetApplyVersion { version: busbar_storage::apply_version::APPLY_VERSION + 1 };
    // Applying it fails, so the write never returns an answer: not waited for.
    let raft = c.raft(leader)?;
    tokio::spawn(async move { raft.client_write(unknown).await });
    wait::until("the leader to stop serving", Duration::from_secs(20), || async {
        (!c.serving(leader).ok()?).then_some(())
    })
    .await?;
    let read = client.fetch_from(&c.addr(leader), "t", 0, 0, 10).await;
    assert!(read.is_err(), "a stopped node answered a read: {read:?}");
    match c.take_ended(leader).await? {
        Err(e) if e.contains("raft stopped") && e.contains("apply version") => {}
        other => anyhow::bail!("the leader ended {other:?}, not for its raft stopping"),
    }
    c.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn t40_membership_3_to_5_to_3_under_writes_loses_nothing() -> anyhow::Result<()> {
    let mut c = InProcessCluster::start(3).await?;
    let client = c.client().await?;
    client.create_topic("m", 2).await?;

    let stop = Arc::new(AtomicBool::new(false));
    let acks = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let writer = {
        let client = client.clone();
        let stop = stop.clone();
        let acks = acks.clone();
        tokio::spawn(async move {
            let mut acked = Acked::new();
            let mut i = 0usize;
            while !stop.load(Ordering::Relaxed) {
                let p = (i % 2) as u32;
                let value = format!("w-{i}").into_bytes();
                match client.produce("m", p, vec![Record::value(value.clone())]).await {
                    Ok(ack) => {
                        acked.insert((p, ack.base_offset), value);
                        acks.fetch_add(1, Ordering::Relaxed);
                    }
                    // Indeterminate during a membership change is allowed; it is not acknowledged.
                    Err(e) if e.is_indeterminate() => {}
                    Err(e) => return Err(anyhow::anyhow!("write {i} failed: {e}")),
                }
                i += 1;
            }
            Ok(acked)
        })
    };

    // Writes flow before the changes begin...
    wait::until("the writer to get going", Duration::from_secs(20), || async {
        (acks.load(Ordering::Relaxed) >= 5).then_some(())
    })
    .await?;
    c.start_joining(4, 1).await?;
    c.start_joining(5, 2).await?;
    let leader = c.leader().await?;
    wait::until("five voters", Duration::from_secs(60), || async { (c.voters(leader).ok()?.len() == 5).then_some(()) })
        .await?;

    let admin = c.client().await?;
    admin.remove_node(4).await?;
    admin.remove_node(5).await?;
    c.stop(4).await?;
    c.stop(5).await?;
    // Metrics are published asynchronously after the change commits: wait for them, bounded.
    wait::until("the leader's membership to be voters 1, 2, 3", Duration::from_secs(20), || async {
        let leader = c.leader().await.ok()?;
        (c.voters(leader).ok()? == vec![1, 2, 3]).then_some(())
    })
    .await?;

    // ...and go on after them.
    let before = acks.load(Ordering::Relaxed);
    wait::until("writes to go on after the membership changes", Duration::from_secs(20), || async {
        (acks.load(Ordering::Relaxed) >= before + 5).then_some(())
    })
    .await?;
    stop.store(true, Ordering::Relaxed);
    let acked = writer.await??;
    c.wait_identical("m", 2, Duration::from_secs(30)).await?;
    for id in c.ids() {
        assert_has_all(&c, id, "m", 2, &acked).await?;
    }
    c.shutdown().await;
    Ok(())
}

/// "The one hazard" (docs/operations.md): a member's disk is lost and the node is started empty under
/// its id. It would be a voter that forgot what it acknowledged (and the leader would stop
/// replicating to it), so it refuses to start, naming the fix, until the id is removed; then it
/// joins empty and catches up.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn t41_an_empty_disk_under_a_members_id_refuses_to_start_until_the_id_is_removed() -> anyhow::Result<()> {
    let mut c = InProcessCluster::start(3).await?;
    let client = c.client().await?;
    client.create_topic("h", 2).await?;
    let mut acked = Acked::new();
    produce_n(&client, "h", 2, 0, 20, &mut acked).await?;
    let leader = c.leader().await?;
    let lost = c.ids().into_iter().find(|id| *id != leader).context("a follower")?;
    // The leader publishes what each member acknowledged.
    wait::until("the leader to report the follower's acknowledgements", Duration::from_secs(20), || async {
        let st = client.cluster_status().await.ok()?;
        let l = st.nodes.iter().find(|n| n.id == leader)?;
        (l.acknowledged.get(&lost).copied().unwrap_or(0) > 0).then_some(())
    })
    .await?;

    c.stop(lost).await?;
    let refused = c.restart_wiped(lost).await?;
    let err = refused.err().context("an empty disk under a member's id started")?;
    assert!(
        err.contains("empty data directory") && err.contains(&format!("cluster remove-node {lost}")),
        "the refusal must say what happened and what to do: {err}"
    );
    assert!(!c.running(lost));
    // The others carry on.
    produce_n(&client, "h", 2, 20, 10, &mut acked).await?;

    // The runbook: remove the id, then start the node empty; it joins and catches up.
    client.remove_node(lost).await?;
    wait::until("the leader to drop the removed member", Duration::from_secs(20), || async {
        let st = client.cluster_status().await.ok()?;
        let l = st.nodes.iter().find(|n| n.id == leader)?;
        (!l.acknowledged.contains_key(&lost)).then_some(())
    })
    .await?;
    c.start_joining(lost, leader).await?;
    c.wait_identical("h", 2, Duration::from_secs(60)).await?;
    assert_has_all(&c, lost, "h", 2, &acked).await?;
    c.shutdown().await;
    Ok(())
}

/// A node that answers for itself like a build from before apply versions (max_apply_version 0).
struct OldBuild;

#[tonic::async_trait]
impl busbar_proto::v1::cluster_server::Cluster for OldBuild {
    async fn local_status(
        &self,
        _: tonic::Request<busbar_proto::v1::LocalStatusRequest>,
    ) -> Result<tonic::Response<busbar_proto::v1::NodeStatus>, tonic::Status> {
        Ok(tonic::Response::new(busbar_proto::v1::NodeStatus { id: 9, ..Default::default() }))
    }
    async fn status(
        &self,
        _: tonic::Request<busbar_proto::v1::ClusterStatusRequest>,
    ) -> Result<tonic::Response<busbar_proto::v1::ClusterStatusResponse>, tonic::Status> {
        Err(tonic::Status::unimplemented("old build"))
    }
    async fn add_node(
        &self,
        _: tonic::Request<busbar_proto::v1::AddNodeRequest>,
    ) -> Result<tonic::Response<busbar_proto::v1::AddNodeResponse>, tonic::Status> {
        Err(tonic::Status::unimplemented("old build"))
    }
    async fn remove_node(
        &self,
        _: tonic::Request<busbar_proto::v1::RemoveNodeRequest>,
    ) -> Result<tonic::Response<busbar_proto::v1::RemoveNodeResponse>, tonic::Status> {
        Err(tonic::Status::unimplemented("old build"))
    }
}

/// A node whose build cannot apply what the cluster's can is refused before it becomes a learner
/// (it would take a newer snapshot or entries with older rules and diverge), and so is one that
/// cannot be asked; the membership does not change.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn t42_a_node_on_an_older_build_or_unreachable_is_not_added() -> anyhow::Result<()> {
    let c = InProcessCluster::start(3).await?;
    let client = c.client().await?;
    let old = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let old_addr = old.local_addr()?.to_string();
    let stub = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(busbar_proto::v1::cluster_server::ClusterServer::new(OldBuild))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(old)),
    );
    let refused = client.add_node(9, &old_addr).await.err().context("an old build was added")?;
    assert_eq!(refused.code(), Some(busbar_client::codes::INVALID_REQUEST), "{refused}");
    assert!(refused.to_string().contains("upgrade it before adding it"), "{refused}");
    stub.abort();
    // Nothing listens there now.
    let unreachable = client.add_node(9, &old_addr).await.err().context("an unreachable node was added")?;
    assert!(unreachable.to_string().contains("start it before adding it"), "{unreachable}");
    let leader = c.leader().await?;
    let m = c.metrics(leader)?;
    assert!(m.membership_config.membership().get_node(&9).is_none(), "node 9 got into the membership");
    c.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn t50_leader_cut_off_in_a_minority_cannot_commit_and_its_write_never_appears() -> anyhow::Result<()> {
    let mut limits = Limits { write_timeout: Duration::from_secs(2), ..Limits::default() };
    limits.max_batch_records = 1000;
    let c = InProcessCluster::start_with(3, test_raft_config(), limits).await?;
    let client = c.client().await?;
    client.create_topic("p", 1).await?;
    let mut acked = Acked::new();
    produce_n(&client, "p", 1, 0, 10, &mut acked).await?;

    let old = c.leader().await?;
    let majority: Vec<u64> = c.ids().into_iter().filter(|id| *id != old).collect();
    c.partitions.isolate(old, majority.clone());

    // The isolated leader takes the write but cannot commit it: the client hears "indeterminate"
    // (or "not leader" once it steps down), never success.
    let isolated = c.client_of(old).await?;
    let pending = isolated.produce("p", 0, vec![Record::value(b"from-the-minority".to_vec())]).await;
    assert!(pending.is_err(), "a leader without a quorum acknowledged a write: {pending:?}");

    // The majority elects a new leader and goes on.
    let new = c.leader_among(&majority).await?;
    assert_ne!(new, old);
    let majority_client = Client::connect(majority.iter().map(|id| c.addr(*id))).await?;
    produce_n(&majority_client, "p", 1, 10, 10, &mut acked).await?;

    c.partitions.heal();
    c.wait_identical("p", 1, Duration::from_secs(30)).await?;
    for id in c.ids() {
        let held = c.dump(id, "p", 0).await?;
        assert!(
            !held.iter().any(|(_, v)| v == b"from-the-minority"),
            "node {id} shows the minority's uncommitted write"
        );
        assert_has_all(&c, id, "p", 1, &acked).await?;
    }
    c.shutdown().await;
    Ok(())
}

/// Regression (found by jepsen/, see docs/jepsen.md): a client retried "no leader known" answers
/// by connecting to its brokers in order again, so while its first broker was a node that knows no
/// leader (cut off, or removed from the cluster and still running), every retry asked that node
/// and the call failed although the rest of the cluster had a leader. Each retry must start at the
/// next broker.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn t55_a_client_whose_first_broker_knows_no_leader_reaches_the_others() -> anyhow::Result<()> {
    let c = InProcessCluster::start(3).await?;
    c.client().await?.create_topic("q", 1).await?;
    let leader = c.leader().await?;
    let Some(cut_off) = c.ids().into_iter().find(|id| *id != leader) else { anyhow::bail!("no follower") };
    let others: Vec<u64> = c.ids().into_iter().filter(|id| *id != cut_off).collect();
    c.partitions.isolate(cut_off, others.clone());
    wait::until("the cut-off node to know no leader", Duration::from_secs(20), || async {
        c.metrics(cut_off).ok().filter(|m| m.current_leader.is_none()).map(|_| ())
    })
    .await?;
    let brokers: Vec<String> = std::iter::once(cut_off).chain(others).map(|id| c.addr(id)).collect();
    let client = Client::connect(brokers).await?;
    let r = tokio::time::timeout(
        Duration::from_secs(15),
        client.produce("q", 0, vec![Record::value(b"reaches-the-leader".to_vec())]),
    )
    .await;
    assert!(matches!(r, Ok(Ok(_))), "the write did not reach the leader through the other brokers: {r:?}");
    c.partitions.heal();
    c.shutdown().await;
    Ok(())
}
