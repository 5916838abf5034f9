//! Clusters of real `busbar server` processes: formation, SIGKILL of a leader under load, catch-up
//! by snapshot, membership changes, graceful restart, a corrupt WAL, and the no-flags defaults.
//!
//! Each test owns its processes, ports and temp dir (see `busbar_tests::process`); the node logs are
//! printed when a test fails. Timeouts bound every wait; none of them is a sleep that must be "long
//! enough".

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context};
use busbar_client::Record;
use busbar_tests::process::{
    check_acked_present, duplicates, end_offset, json_lines, read_lossy, read_partition, run_cli, tail,
    wait_end_offset, ClusterOptions, Proc, ProcessCluster, Producer,
};
use busbar_tests::wait;

const BIN: &str = env!("CARGO_BIN_EXE_busbar");

/// Bound on a freshly started cluster electing its first leader (processes must start, too).
const FORMATION: Duration = Duration::from_secs(30);
/// Bound on a graceful stop (SIGTERM to exit).
const GRACEFUL_STOP: Duration = Duration::from_secs(20);
/// Bound on replication / catch-up waits.
const CATCH_UP: Duration = Duration::from_secs(60);

fn addrs(c: &ProcessCluster, ids: &[u64]) -> anyhow::Result<Vec<String>> {
    ids.iter().map(|id| c.addr(*id)).collect()
}

/// A partition as one node holds it: (offset, value), in offset order.
type Held = Vec<(u64, Vec<u8>)>;

/// Reads the partition from every node and fails unless they hold the very same records.
async fn assert_identical(
    client: &busbar_client::Client,
    c: &ProcessCluster,
    ids: &[u64],
    topic: &str,
) -> anyhow::Result<Held> {
    let mut first: Option<(u64, Held)> = None;
    for id in ids {
        let held = read_partition(client, &c.addr(*id)?, topic, 0).await?;
        match &first {
            None => first = Some((*id, held)),
            Some((fid, f)) => {
                let diverge = f.iter().zip(&held).position(|(a, b)| a != b);
                ensure!(
                    *f == held,
                    "node {id} holds {} records, node {fid} holds {}; first difference at position {:?}",
                    held.len(),
                    f.len(),
                    diverge
                );
            }
        }
    }
    Ok(first.map(|(_, f)| f).unwrap_or_default())
}

/// Offset-contiguous from 0: a partition never has holes.
fn check_contiguous(node: &str, held: &[(u64, Vec<u8>)]) -> anyhow::Result<()> {
    if let Some((i, (o, _))) = held.iter().enumerate().find(|(i, (o, _))| *o != *i as u64) {
        anyhow::bail!("{node}: position {i} holds offset {o}");
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_peers_elect_one_leader_and_cli_status_shows_it() -> anyhow::Result<()> {
    let mut c = ProcessCluster::new(BIN, ClusterOptions::default())?;
    c.start_with_peers(3)?;
    let (leader, term) = c.wait_for_leader(&[1, 2, 3], 1, FORMATION).await?;

    // The real CLI, through the three brokers. An election may still be settling on this busy
    // machine, so the expected shape is awaited (bounded); the shape of every line is checked strictly.
    let last = Mutex::new(String::new());
    let nodes = wait::until("`cluster status` to show one leader and two followers", Duration::from_secs(15), || {
        let (c, last) = (&c, &last);
        async move {
            let out = c.cli(&[1, 2, 3], &["cluster", "status", "--output", "json"]).await.ok()?;
            *last.lock().unwrap_or_else(|e| e.into_inner()) =
                format!("{:?} {}", out.status, String::from_utf8_lossy(&out.stdout));
            if !out.status.success() {
                return None;
            }
            let nodes = json_lines(&out).ok()?;
            let roles: Vec<&str> = nodes.iter().filter_map(|n| n["role"].as_str()).collect();
            let leaders = roles.iter().filter(|r| **r == "leader").count();
            let followers = roles.iter().filter(|r| **r == "follower").count();
            (nodes.len() == 3 && leaders == 1 && followers == 2).then_some(nodes)
        }
    })
    .await
    .with_context(|| format!("last output: {}", last.lock().unwrap_or_else(|e| e.into_inner())))?;

    let ids: BTreeSet<u64> = nodes.iter().filter_map(|n| n["id"].as_u64()).collect();
    ensure!(ids == BTreeSet::from([1, 2, 3]), "status lists ids {ids:?}");
    for n in &nodes {
        let id = n["id"].as_u64().context("id")?;
        ensure!(n["addr"].as_str() == Some(c.addr(id)?.as_str()), "node {id} address: {n}");
        ensure!(n["reachable"] == serde_json::json!(true), "node {id} not reachable: {n}");
        ensure!(n["voter"] == serde_json::json!(true), "node {id} not a voter: {n}");
        ensure!(n["term"].as_u64().is_some_and(|t| t >= term), "node {id} term: {n}");
        ensure!(n["last_log_index"].as_u64().is_some(), "node {id} has no log: {n}");
        ensure!(n["applied_index"].as_u64().is_some(), "node {id} applied nothing: {n}");
    }
    let terms: BTreeSet<u64> = nodes.iter().filter_map(|n| n["term"].as_u64()).collect();
    ensure!(terms.len() == 1, "nodes disagree on the term: {terms:?}");
    // The leader the CLI names is the one the nodes agreed on (no election in between).
    if terms.contains(&term) {
        let named = nodes.iter().find(|n| n["role"] == "leader").and_then(|n| n["id"].as_u64());
        ensure!(named == Some(leader), "CLI names leader {named:?}, the nodes agreed on {leader}");
    }
    c.finish();
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leader_killed_under_writes_loses_no_acknowledged_record_and_rejoins() -> anyhow::Result<()> {
    let mut c = ProcessCluster::new(BIN, ClusterOptions::default())?;
    c.start_with_peers(3)?;
    let (old_leader, old_term) = c.wait_for_leader(&[1, 2, 3], 1, FORMATION).await?;
    let client = c.client(&[1, 2, 3]).await?;
    client.create_topic("t", 1).await?;
    let producer = Producer::spawn(client.clone(), "t", 0, "w");
    producer.wait_for_more(50, Duration::from_secs(30)).await?;

    let killed_at = Instant::now();
    c.kill(old_leader)?;
    let survivors: Vec<u64> = [1, 2, 3].into_iter().filter(|id| *id != old_leader).collect();
    // "A few election timeouts": followers notice within one, the vote takes a round trip, and a
    // split vote costs another.
    let bound = c.options().election_timeout_max() * 5;
    let (new_leader, new_term) = c
        .wait_for_leader(&survivors, old_term + 1, bound)
        .await
        .with_context(|| format!("no new leader within {bound:?} of killing leader {old_leader}"))?;
    eprintln!("node {new_leader} leads term {new_term}, {:?} after node {old_leader} was killed", killed_at.elapsed());
    producer.wait_for_more(50, Duration::from_secs(30)).await.context("writes did not resume")?;
    let report = producer.stop().await?;
    eprintln!(
        "acked {} records, {} indeterminate and {} failed batches: {:?}",
        report.acked.len(),
        report.indeterminate,
        report.failed,
        report.errors
    );
    let max_acked = report.acked.last().map(|(o, _)| *o).context("nothing acknowledged")?;

    let survivor_addrs = addrs(&c, &survivors)?;
    wait_end_offset(&client, &survivor_addrs, "t", 0, max_acked + 1, CATCH_UP).await?;
    for id in &survivors {
        let held = read_partition(&client, &c.addr(*id)?, "t", 0).await?;
        check_contiguous(&format!("node {id}"), &held)?;
        check_acked_present(&format!("node {id}"), &held, &report.acked)?;
    }

    c.restart(old_leader)?;
    let end = end_offset(&client, &c.addr(new_leader)?, "t", 0).await.context("leader's end offset")?;
    wait_end_offset(&client, &addrs(&c, &[old_leader])?, "t", 0, end, CATCH_UP).await?;
    let held = assert_identical(&client, &c, &[1, 2, 3], "t").await?;
    ensure!(held.len() as u64 == end, "nodes hold {} records, the leader's end offset was {end}", held.len());
    check_acked_present("every node", &held, &report.acked)?;
    let dups = duplicates(&held);
    if !dups.is_empty() {
        // Not asserted: see the report on the client's retry of transport errors.
        eprintln!("values written twice (a retried write): {} e.g. {:?}", dups.len(), &dups[..dups.len().min(3)]);
    }
    c.wait_for_leader(&[1, 2, 3], new_term, FORMATION).await.context("the restarted node does not follow")?;
    c.finish();
    Ok(())
}

/// 1 KiB, unique and recognisable.
fn kib_value(batch: u64, i: u64) -> Vec<u8> {
    let mut v = format!("s{batch:06}-{i:02}-").into_bytes();
    v.resize(1024, b'a' + (batch % 26) as u8);
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn follower_behind_purged_log_catches_up_by_multi_chunk_snapshot() -> anyhow::Result<()> {
    // openraft gives an AppendEntries RPC one heartbeat interval to complete, and catching up after
    // the snapshot sends 64 entries of 32 KiB (2 MiB) per RPC: the product's default heartbeat
    // (250 ms) rather than the tests' fast 100 ms, so a loaded machine does not stall replication.
    // Failover speed plays no part here.
    let opts = ClusterOptions {
        heartbeat_ms: 250,
        election_timeout_min_ms: 1000,
        election_timeout_max_ms: 2000,
        snapshot_every: Some(200),
        logs_to_keep: Some(50),
    };
    let mut c = ProcessCluster::new(BIN, opts)?;
    c.start_with_peers(3)?;
    let (leader, _) = c.wait_for_leader(&[1, 2, 3], 1, FORMATION).await?;
    let lagging = [1, 2, 3].into_iter().find(|id| *id != leader).context("a follower")?;
    let client = c.client(&[1, 2, 3]).await?;
    client.create_topic("s", 1).await?;
    let mut acked = Vec::new();
    for b in 0..5 {
        let ack = client.produce("s", 0, vec![Record::value(kib_value(b, 0))]).await?;
        acked.push((ack.base_offset, kib_value(b, 0)));
    }
    wait_end_offset(&client, &addrs(&c, &[lagging])?, "s", 0, 5, CATCH_UP).await?;
    c.kill(lagging)?;

    // 320 entries of 32 KiB (10 MiB): past two snapshot points (every 200 entries), the log purged
    // to 50 entries below them, far past the lagging follower; the snapshot is many 1 MiB chunks.
    const BATCHES: u64 = 320;
    const PER_BATCH: u64 = 32;
    let started = Instant::now();
    for b in 5..5 + BATCHES {
        let values: Vec<Vec<u8>> = (0..PER_BATCH).map(|i| kib_value(b, i)).collect();
        let ack = client.produce("s", 0, values.iter().cloned().map(Record::value).collect()).await?;
        ensure!(ack.count as u64 == PER_BATCH, "batch {b}: {} of {PER_BATCH} acknowledged", ack.count);
        for (i, v) in values.into_iter().enumerate() {
            acked.push((ack.base_offset + i as u64, v));
        }
    }
    eprintln!("wrote {} MiB in {:?}", BATCHES * PER_BATCH / 1024, started.elapsed());
    let end = acked.last().map(|(o, _)| o + 1).context("nothing acknowledged")?;

    c.restart(lagging)?;
    wait_end_offset(&client, &addrs(&c, &[lagging])?, "s", 0, end, CATCH_UP).await?;
    let log = c.log(lagging)?;
    ensure!(
        log.contains("installed snapshot"),
        "node {lagging} caught up without installing a snapshot; its log:\n{}",
        tail(&log, 40)
    );
    // Several 1 MiB chunks were streamed, not one: the install logs the stream's size.
    let snap_bytes = log
        .lines()
        .filter(|l| l.contains("installed snapshot"))
        .filter_map(|l| l.split("bytes=").nth(1)?.split(|c: char| !c.is_ascii_digit()).next()?.parse::<u64>().ok())
        .max();
    ensure!(
        snap_bytes.is_some_and(|b| b > 3 << 20),
        "node {lagging} installed no snapshot of several MiB: largest {snap_bytes:?} bytes; its log:\n{}",
        tail(&log, 40)
    );
    // The received stream is not kept: a node holds its snapshot as a manifest of its store.
    let snaps = c.data_dir(lagging)?.join("snapshots");
    let largest_file = std::fs::read_dir(&snaps)
        .with_context(|| format!("listing {}", snaps.display()))?
        .flatten()
        .filter_map(|e| e.metadata().ok().map(|m| m.len()))
        .max()
        .unwrap_or(0);
    ensure!(largest_file < 1 << 20, "{} holds a file of {largest_file} bytes after the install", snaps.display());

    let held = assert_identical(&client, &c, &[1, 2, 3], "s").await?;
    check_contiguous("every node", &held)?;
    ensure!(held.len() as u64 == end, "nodes hold {} records, {end} were written", held.len());
    check_acked_present("every node", &held, &acked)?;
    c.finish();
    Ok(())
}

/// Voters in a `cluster status` answer, once every listed node is reachable and one leads.
async fn settled_voters(client: &busbar_client::Client) -> Option<BTreeSet<u64>> {
    let st = client.cluster_status().await.ok()?;
    let all_reachable = st.nodes.iter().all(|n| n.reachable);
    (st.has_leader && all_reachable).then(|| st.nodes.iter().filter(|n| n.voter).map(|n| n.id).collect())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn membership_grows_to_five_and_shrinks_to_three_under_writes() -> anyhow::Result<()> {
    let mut c = ProcessCluster::new(BIN, ClusterOptions::default())?;
    c.start_with_peers(3)?;
    c.wait_for_leader(&[1, 2, 3], 1, FORMATION).await?;
    let client = c.client(&[1, 2, 3]).await?;
    client.create_topic("m", 1).await?;
    let producer = Producer::spawn(client.clone(), "m", 0, "m");
    producer.wait_for_more(20, Duration::from_secs(30)).await?;

    c.start_joining(4, &c.addr(1)?)?;
    c.start_joining(5, &c.addr(2)?)?;
    let five = BTreeSet::from([1, 2, 3, 4, 5]);
    wait::until("cluster status to show 5 voters", CATCH_UP, || async {
        settled_voters(&client).await.filter(|v| *v == five)
    })
    .await?;
    c.check_running(&[1, 2, 3, 4, 5])?;
    producer.wait_for_more(20, Duration::from_secs(30)).await.context("writes stalled with 5 voters")?;

    // The joined nodes hold the log too, not only the membership.
    let end = end_offset(&client, &c.addr(1)?, "m", 0).await.context("end offset")?;
    wait_end_offset(&client, &addrs(&c, &[4, 5])?, "m", 0, end, CATCH_UP).await?;

    for id in [4u64, 5] {
        let id_s = id.to_string();
        let out = c.cli(&[1, 2, 3], &["cluster", "remove-node", &id_s, "--output", "json"]).await?;
        ensure!(out.status.success(), "remove-node {id}: {} {}", out.status, String::from_utf8_lossy(&out.stderr));
        let lines = json_lines(&out)?;
        ensure!(lines == vec![serde_json::json!({"removed": id})], "remove-node {id} printed {lines:?}");
        let st = c.terminate(id, GRACEFUL_STOP).await?;
        ensure!(st.success(), "removed node {id} did not stop cleanly: {st}");
    }
    let three = BTreeSet::from([1, 2, 3]);
    let out = wait::until("cluster status to show exactly nodes 1, 2, 3 as voters", CATCH_UP, || async {
        let out = c.cli(&[1, 2, 3], &["cluster", "status", "--output", "json"]).await.ok()?;
        let nodes = json_lines(&out).ok()?;
        let ids: BTreeSet<u64> = nodes.iter().filter_map(|n| n["id"].as_u64()).collect();
        let ok = ids == three
            && nodes.iter().all(|n| n["voter"] == serde_json::json!(true) && n["reachable"] == serde_json::json!(true))
            && nodes.iter().filter(|n| n["role"] == "leader").count() == 1;
        ok.then_some(nodes)
    })
    .await?;
    ensure!(out.len() == 3, "status lists {out:?}");

    producer.wait_for_more(20, Duration::from_secs(30)).await.context("writes stalled after shrinking")?;
    let report = producer.stop().await?;
    eprintln!(
        "acked {} records, {} indeterminate and {} failed batches: {:?}",
        report.acked.len(),
        report.indeterminate,
        report.failed,
        report.errors
    );
    let max_acked = report.acked.last().map(|(o, _)| *o).context("nothing acknowledged")?;
    wait_end_offset(&client, &addrs(&c, &[1, 2, 3])?, "m", 0, max_acked + 1, CATCH_UP).await?;
    let held = assert_identical(&client, &c, &[1, 2, 3], "m").await?;
    check_contiguous("every node", &held)?;
    check_acked_present("every node", &held, &report.acked)?;
    c.check_running(&[1, 2, 3])?;
    c.finish();
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_restart_of_all_nodes_keeps_data_and_does_not_reinitialize() -> anyhow::Result<()> {
    let mut c = ProcessCluster::new(BIN, ClusterOptions::default())?;
    c.start_with_peers(3)?;
    let (_, term_before) = c.wait_for_leader(&[1, 2, 3], 1, FORMATION).await?;
    let client = c.client(&[1, 2, 3]).await?;
    client.create_topic("r", 1).await?;
    let mut acked = Vec::new();
    for b in 0..30u64 {
        let v = format!("before-{b}").into_bytes();
        let ack = client.produce("r", 0, vec![Record::value(v.clone())]).await?;
        acked.push((ack.base_offset, v));
    }
    let end_before = acked.len() as u64;
    // Followers apply what the leader acknowledged a moment later; the stop must not race that, so
    // the test does not depend on a flush of unapplied entries (restart replays the log anyway).
    wait_end_offset(&client, &addrs(&c, &[1, 2, 3])?, "r", 0, end_before, CATCH_UP).await?;

    // SIGTERM to all three at once, as a rolling shutdown of the whole cluster would not be.
    for id in [1, 2, 3] {
        c.signal_term(id)?;
    }
    for id in [1, 2, 3] {
        let st = c.wait_exit(id, GRACEFUL_STOP).await?;
        ensure!(st.success(), "node {id} exited with {st} on SIGTERM");
        let log = c.log(id)?;
        ensure!(log.contains("stopped cleanly"), "node {id} did not log a clean stop:\n{}", tail(&log, 20));
    }

    for id in [1, 2, 3] {
        c.restart(id)?;
    }
    let (_, term_after) = c.wait_for_leader(&[1, 2, 3], 1, FORMATION).await?;
    // The vote survived (openraft lets a leader whose vote is committed resume in its own term).
    ensure!(term_after >= term_before, "term went from {term_before} back to {term_after} across the restart");
    for id in [1, 2, 3] {
        let what = format!("node {id} to log that it found its raft state");
        let c = &c;
        wait::until(&what, Duration::from_secs(10), || async move {
            c.log(id).ok().filter(|l| l.contains("raft state found on disk; not initializing")).map(|_| ())
        })
        .await?;
        let log = c.log(id)?;
        ensure!(!log.contains("initialized the cluster"), "node {id} initialized again:\n{}", tail(&log, 20));
    }

    let client = c.client(&[1, 2, 3]).await?;
    wait_end_offset(&client, &addrs(&c, &[1, 2, 3])?, "r", 0, end_before, CATCH_UP).await?;
    for b in 0..10u64 {
        let v = format!("after-{b}").into_bytes();
        let ack = client.produce("r", 0, vec![Record::value(v.clone())]).await?;
        acked.push((ack.base_offset, v));
    }
    ensure!(acked[end_before as usize].0 == end_before, "writes after the restart start at {:?}", acked.get(30));
    let end = acked.len() as u64;
    wait_end_offset(&client, &addrs(&c, &[1, 2, 3])?, "r", 0, end, CATCH_UP).await?;
    let held = assert_identical(&client, &c, &[1, 2, 3], "r").await?;
    ensure!(held == acked, "nodes hold {} records, {} acknowledged, or in another order", held.len(), acked.len());
    c.finish();
    Ok(())
}

/// Byte ranges `(start, payload_len)` of the frames of a WAL segment: `[crc u32][len u32][index u64]`
/// then the payload.
fn wal_frames(bytes: &[u8]) -> anyhow::Result<Vec<(usize, usize)>> {
    let mut frames = Vec::new();
    let mut off = 0;
    while off + 16 <= bytes.len() {
        let mut len = [0u8; 4];
        len.copy_from_slice(&bytes[off + 4..off + 8]);
        let len = u32::from_le_bytes(len) as usize;
        ensure!(off + 16 + len <= bytes.len(), "frame at {off} runs past the end");
        frames.push((off, len));
        off += 16 + len;
    }
    ensure!(off == bytes.len(), "{} trailing bytes", bytes.len() - off);
    Ok(frames)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupt_wal_segment_makes_server_exit_naming_the_file() -> anyhow::Result<()> {
    let mut c = ProcessCluster::new(BIN, ClusterOptions::default())?;
    c.start_with_peers(1)?;
    c.wait_for_leader(&[1], 1, FORMATION).await?;
    let client = c.client(&[1]).await?;
    client.create_topic("c", 1).await?;
    for b in 0..40u64 {
        client.produce("c", 0, vec![Record::value(format!("rec-{b}").repeat(20))]).await?;
    }
    let st = c.terminate(1, GRACEFUL_STOP).await?;
    ensure!(st.success(), "node 1 exited with {st} on SIGTERM");

    // There is no flag for the WAL segment size (64 MiB), so this log has a single segment: damage in
    // its middle, with valid frames after it, is corruption and not a torn tail. With several
    // segments, a middle one is taken.
    let segs = wal_segments(&c, 1)?;
    let seg = segs.get(segs.len() / 2).context("no WAL segment")?.clone();
    let mut bytes = std::fs::read(&seg)?;
    let frames = wal_frames(&bytes).with_context(|| format!("parsing {}", seg.display()))?;
    ensure!(frames.len() >= 10, "{} holds only {} frames", seg.display(), frames.len());
    let (start, len) = frames[frames.len() / 2];
    // A payload byte: the frame's checksum no longer matches, and the frames after it are intact.
    let at = start + 16 + len / 2;
    bytes[at] ^= 0x5a;
    std::fs::write(&seg, &bytes)?;

    c.restart(1)?;
    assert_refuses_to_start(&mut c, 1, &seg, "corrupt").await?;
    c.finish();
    Ok(())
}

/// Node `id`'s WAL segment files, oldest first.
fn wal_segments(c: &ProcessCluster, id: u64) -> anyhow::Result<Vec<PathBuf>> {
    let wal = c.data_dir(id)?.join("raft-log");
    let mut segs: Vec<PathBuf> = std::fs::read_dir(&wal)
        .with_context(|| format!("listing {}", wal.display()))?
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "seg"))
        .collect();
    segs.sort();
    Ok(segs)
}

/// Node `id`, just restarted, exits with a failure, and its error line names `seg` and says `why`.
async fn assert_refuses_to_start(c: &mut ProcessCluster, id: u64, seg: &Path, why: &str) -> anyhow::Result<()> {
    let st = c.wait_exit(id, Duration::from_secs(15)).await.context("a node with a damaged WAL kept running")?;
    ensure!(!st.success(), "exited with {st} despite a damaged WAL");
    let log = c.log(id)?;
    let name = seg.file_name().and_then(|n| n.to_str()).context("segment name")?;
    let error_line = log.lines().find(|l| l.contains("error")).unwrap_or("");
    ensure!(
        log.contains(why) && log.contains(&format!("raft-log/{name}")),
        "stderr does not name raft-log/{name} and say {why:?}:\n{}",
        tail(&log, 20)
    );
    ensure!(error_line.contains(name), "the error line does not name {name}: {error_line:?}");
    Ok(())
}

/// A follower killed under writes loses the tail of its WAL: its last segment is cut halfway, at a
/// frame boundary, so what is left parses as a whole log. Those entries were synced and
/// acknowledged, and the WAL's synced mark says so: the node refuses to start, naming the segment,
/// rather than vote as if it had never had them (docs/jepsen.md, findings 3 and 4). The two others
/// go on committing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn follower_whose_wal_lost_synced_entries_refuses_to_start() -> anyhow::Result<()> {
    // The mark trails the log by at most 200 ms: give it several periods to cover the first half.
    let (mut c, producer, follower, seg) = follower_wal_cut_in_half(Duration::from_secs(1)).await?;
    c.restart(follower)?;
    assert_refuses_to_start(&mut c, follower, &seg, "synced mark").await?;
    producer.wait_for_more(100, Duration::from_secs(30)).await.context("the other two stopped committing")?;
    producer.stop().await?;
    c.finish();
    Ok(())
}

/// The same cut where the synced mark cannot see it (its file gone, as if the cut fell within its
/// last 200 ms) and with the state machine's store gone too, so the node holds only the cut log:
/// the leader still says the node acknowledged entries above its end, and the node refuses to
/// start (finding 4's residual), instead of starting as a voter that forgot them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn follower_whose_wal_lost_acknowledged_entries_past_its_mark_refuses_to_start() -> anyhow::Result<()> {
    let (mut c, producer, follower, _) = follower_wal_cut_in_half(Duration::ZERO).await?;
    let data = c.data_dir(follower)?;
    std::fs::remove_file(data.join("raft-log").join("synced"))?;
    std::fs::remove_dir_all(data.join("state"))?;

    c.restart(follower)?;
    let st = c
        .wait_exit(follower, Duration::from_secs(15))
        .await
        .context("a node that lost acknowledged entries kept running")?;
    ensure!(!st.success(), "exited with {st}");
    let log = c.log(follower)?;
    ensure!(
        log.contains("acknowledged log entries up to index")
            && log.contains(&format!("cluster remove-node {follower}")),
        "the refusal does not say what was lost and what to do:\n{}",
        tail(&log, 20)
    );
    producer.wait_for_more(100, Duration::from_secs(30)).await.context("the other two stopped committing")?;
    producer.stop().await?;
    c.finish();
    Ok(())
}

/// A 3-node cluster under writes (the producer keeps going) whose follower, `settle` after 300
/// records, is killed and has its last WAL segment cut halfway at a frame boundary. Returns the
/// cluster, the producer, the follower and the segment.
async fn follower_wal_cut_in_half(settle: Duration) -> anyhow::Result<(ProcessCluster, Producer, u64, PathBuf)> {
    let mut c = ProcessCluster::new(BIN, ClusterOptions::default())?;
    c.start_with_peers(3)?;
    let (leader, _) = c.wait_for_leader(&[1, 2, 3], 1, FORMATION).await?;
    let client = c.client(&[1, 2, 3]).await?;
    client.create_topic("t", 1).await?;
    let producer = Producer::spawn(client.clone(), "t", 0, "w");
    producer.wait_for_more(300, Duration::from_secs(30)).await?;
    let follower = [1, 2, 3].into_iter().find(|id| *id != leader).context("no follower")?;
    tokio::time::sleep(settle).await;
    c.kill(follower)?;
    let seg = wal_segments(&c, follower)?.pop().context("no WAL segment")?;
    let bytes = std::fs::read(&seg)?;
    // A kill can leave a torn frame at the very end: cut among the whole frames before it.
    let frames =
        wal_frames(&bytes[..whole_frames_len(&bytes)]).with_context(|| format!("parsing {}", seg.display()))?;
    ensure!(frames.len() >= 20, "{} holds only {} frames", seg.display(), frames.len());
    let (cut, _) = frames[frames.len() / 2];
    std::fs::OpenOptions::new().write(true).open(&seg)?.set_len(cut as u64)?;
    Ok((c, producer, follower, seg))
}

/// How many bytes from the start of a segment are whole frames (what follows is a torn append).
fn whole_frames_len(bytes: &[u8]) -> usize {
    let mut off = 0;
    while off + 16 <= bytes.len() {
        let len = u32::from_le_bytes([bytes[off + 4], bytes[off + 5], bytes[off + 6], bytes[off + 7]]) as usize;
        if off + 16 + len > bytes.len() {
            break;
        }
        off += 16 + len;
    }
    off
}

/// The default address of `busbar server` and of the CLI's `--brokers`.
const DEFAULT_ADDR: &str = "127.0.0.1:9501";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_without_flags_runs_a_single_node_cluster_on_the_defaults() -> anyhow::Result<()> {
    let cwd = tempfile::tempdir()?;
    let log = cwd.path().join("server.log");
    ensure!(
        std::net::TcpListener::bind(DEFAULT_ADDR).is_ok(),
        "{DEFAULT_ADDR} is in use by another process: this test needs it"
    );
    let mut server = Proc::spawn(Path::new(BIN), &["server".to_string()], cwd.path(), &log)?;
    let res = defaults_body(&mut server, cwd.path()).await;
    if res.is_err() {
        eprintln!("----- server log -----\n{}", tail(&read_lossy(&log).unwrap_or_default(), 60));
    }
    res
}

async fn defaults_body(server: &mut Proc, cwd: &Path) -> anyhow::Result<()> {
    let bin = Path::new(BIN);
    let last = Mutex::new(String::new());
    let nodes = wait::until("`busbar cluster status` to show one leader", FORMATION, || {
        let last = &last;
        async move {
            // No --brokers: the CLI's default is the server's default address.
            let out = run_cli(bin, &["cluster", "status", "--output", "json"], cwd).await.ok()?;
            *last.lock().unwrap_or_else(|e| e.into_inner()) =
                format!("{:?} {}", out.status, String::from_utf8_lossy(&out.stderr));
            let nodes = json_lines(&out).ok()?;
            (nodes.len() == 1 && nodes[0]["role"] == "leader").then_some(nodes)
        }
    })
    .await
    .with_context(|| format!("last answer: {}", last.lock().unwrap_or_else(|e| e.into_inner())))?;
    let n = &nodes[0];
    ensure!(n["id"] == 1 && n["addr"] == DEFAULT_ADDR && n["voter"] == true && n["reachable"] == true, "{n}");
    let data = cwd.join("busbar-data");
    ensure!(data.join("raft-log").is_dir(), "no {}/raft-log", data.display());

    let st = server.terminate(GRACEFUL_STOP).await?;
    ensure!(st.success(), "exited with {st} on SIGTERM");
    Ok(())
}
