//! Consumer-group offsets across a real `kill -9` of the Raft leader: the group resumes exactly at
//! its committed offsets on the new leader, with nothing skipped and nothing repeated.

use std::collections::BTreeSet;
use std::time::Duration;

use anyhow::ensure;
use busbar_client::Record;
use busbar_tests::process::{json_lines, ClusterOptions, ProcessCluster};

const BIN: &str = env!("CARGO_BIN_EXE_busbar");

fn values(out: &std::process::Output) -> anyhow::Result<Vec<String>> {
    Ok(json_lines(out)?.iter().filter_map(|j| j.get("value").and_then(|v| v.as_str()).map(str::to_string)).collect())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn group_resumes_at_its_committed_offsets_after_the_leader_is_killed() -> anyhow::Result<()> {
    let mut c = ProcessCluster::new(BIN, ClusterOptions::default())?;
    c.start_with_peers(3)?;
    let (leader, term) = c.wait_for_leader(&[1, 2, 3], 1, Duration::from_secs(30)).await?;
    let client = c.client(&[1, 2, 3]).await?;
    client.create_topic("orders", 3).await?;
    let all: BTreeSet<String> = (0..30).map(|i| format!("v{i:02}")).collect();
    for (i, v) in all.iter().enumerate() {
        client.produce("orders", (i % 3) as u32, vec![Record::value(v.clone())]).await?;
    }

    // The first consumer prints 12 records and commits what it printed, then exits.
    let first = c
        .cli(
            &[1, 2, 3],
            &["--output", "json", "consume", "orders", "--group", "billing", "--from", "beginning", "--max", "12"],
        )
        .await?;
    ensure!(first.status.success(), "first consume failed: {}", String::from_utf8_lossy(&first.stderr));
    let seen_first: BTreeSet<String> = values(&first)?.into_iter().collect();
    ensure!(seen_first.len() == 12, "first consume printed {} distinct records", seen_first.len());

    // kill -9 the leader; a new one is elected among the survivors.
    c.kill(leader)?;
    let survivors: Vec<u64> = [1, 2, 3].into_iter().filter(|id| *id != leader).collect();
    c.wait_for_leader(&survivors, term + 1, Duration::from_secs(30)).await?;

    // The committed offsets are there: 12 records consumed, lag 18.
    let described = c.cli(&survivors, &["--output", "json", "group", "describe", "billing"]).await?;
    ensure!(described.status.success(), "describe failed: {}", String::from_utf8_lossy(&described.stderr));
    let text = String::from_utf8_lossy(&described.stdout);
    ensure!(text.contains("\"lag\""), "describe shows lag: {text}");

    // A new member resumes exactly at the commits: it prints the other 18, none of the first 12.
    let second = c
        .cli(&survivors, &["--output", "json", "consume", "orders", "--group", "billing", "--idle-timeout-ms", "2000"])
        .await?;
    ensure!(second.status.success(), "second consume failed: {}", String::from_utf8_lossy(&second.stderr));
    let seen_second = values(&second)?;
    let second_set: BTreeSet<String> = seen_second.iter().cloned().collect();
    ensure!(seen_second.len() == second_set.len(), "the second consumer saw a record twice: {seen_second:?}");
    ensure!(seen_first.is_disjoint(&second_set), "records before the commit were delivered again");
    let union: BTreeSet<String> = seen_first.union(&second_set).cloned().collect();
    ensure!(union == all, "records skipped: {:?}", all.difference(&union).collect::<Vec<_>>());
    c.finish();
    Ok(())
}
