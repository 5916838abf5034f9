//! Consumer groups through the `busbar` binary, run as real processes against a real server
//! process: `consume --group` resumes at the group's committed offsets and commits what it
//! printed; `group list|describe|reset-offsets|delete`; and the refusals while a group is active.
//!
//! Each test starts its own single-node server (own port, own temp dir; killed on drop). Every wait
//! is bounded.

use std::collections::BTreeSet;
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use anyhow::{bail, ensure, Context};
use busbar_tests::process::{client_for, run_cli_with_stdin, SingleServer};
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, BufReader};

const BIN: &str = env!("CARGO_BIN_EXE_busbar");
/// Bound on one CLI run.
const CLI_TIMEOUT: Duration = Duration::from_secs(30);

type Server = SingleServer;

/// A single-node server for one test (its own port and data dir; killed on drop).
async fn server() -> anyhow::Result<Server> {
    SingleServer::start(Path::new(BIN), "busbar-cli-groups-").await
}

/// Runs the binary, bounded, with the caller's BUSBAR_* settings cleared.
async fn run(args: &[&str], stdin: &[u8]) -> anyhow::Result<std::process::Output> {
    run_cli_with_stdin(Path::new(BIN), args, stdin).await
}

/// `group describe` as one JSON object.
async fn describe(s: &Server, group: &str) -> anyhow::Result<Value> {
    let mut lines = s.ok(&["group", "describe", group], b"").await?;
    ensure!(lines.len() == 1, "describe prints one JSON object: {lines:?}");
    lines.pop().context("no describe line")
}

/// Fails unless the command exited 1 with exactly one stderr line that names `code`.
fn assert_error(out: &std::process::Output, code: i32, what: &str) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(out.status.code(), Some(1), "{what}: exit status {}; stderr: {stderr}", out.status);
    assert_eq!(lines.len(), 1, "{what}: want one stderr line, got {lines:?}");
    assert!(lines[0].starts_with("error: "), "{what}: {:?}", lines[0]);
    assert!(lines[0].ends_with(&format!("(code {code})")), "{what}: want code {code} in {:?}", lines[0]);
}

/// (partition, offset) of consumed records, checking each is there once.
fn positions(records: &[Value]) -> anyhow::Result<BTreeSet<(u64, u64)>> {
    let mut set = BTreeSet::new();
    for r in records {
        let p = r["partition"].as_u64().with_context(|| format!("partition in {r}"))?;
        let o = r["offset"].as_u64().with_context(|| format!("offset in {r}"))?;
        ensure!(set.insert((p, o)), "record {p}/{o} printed twice");
    }
    Ok(set)
}

fn signal(pid: u32, sig: rustix::process::Signal) {
    if let Some(pid) = i32::try_from(pid).ok().and_then(rustix::process::Pid::from_raw) {
        let _ = rustix::process::kill_process(pid, sig);
    }
}

const CONSUME_G: [&str; 7] = ["consume", "t", "--group", "g", "--from", "beginning", "--idle-timeout-ms"];

#[tokio::test(flavor = "multi_thread")]
async fn consume_with_a_group_resumes_at_its_commits_and_group_commands_manage_it() -> anyhow::Result<()> {
    let s = server().await?;
    s.ok(&["topic", "create", "t", "--partitions", "2"], b"").await?;
    let acks = s.ok(&["produce", "t"], b"a\nb\nc\nd\ne\nf\n").await?;
    assert_eq!(acks.len(), 6);
    let produced: BTreeSet<(u64, u64)> = positions(&acks)?;
    let consume: Vec<&str> = CONSUME_G.iter().copied().chain(["1500"]).collect();

    // First run: every record once, in the same JSON lines as a plain consume, and committed.
    let first = s.ok(&consume, b"").await?;
    assert_eq!(positions(&first)?, produced, "{first:?}");
    let plain = s.ok(&["consume", "t", "--idle-timeout-ms", "500"], b"").await?;
    let sorted = |mut v: Vec<Value>| {
        v.sort_by_key(|r| (r["partition"].as_u64(), r["offset"].as_u64()));
        v
    };
    assert_eq!(sorted(first.clone()), sorted(plain), "the same lines as a plain consume");
    // Second run of the same group: it resumes at the committed offsets, so nothing is new.
    let second = s.ok(&consume, b"").await?;
    assert!(second.is_empty(), "nothing new for the group: {second:?}");

    let d = describe(&s, "g").await?;
    assert_eq!(d["group"], "g");
    assert_eq!(d["members"], json!([]), "both runs left the group: {d}");
    let parts = d["partitions"].as_array().context("partitions")?;
    assert_eq!(parts.len(), 2, "{d}");
    for p in parts {
        assert_eq!(p["committed"], p["end_offset"], "committed = end: {p}");
        assert_eq!(p["lag"], 0, "{p}");
    }
    let total_end: u64 = parts.iter().filter_map(|p| p["end_offset"].as_u64()).sum();
    assert_eq!(total_end, 6);

    let listed = s.ok(&["group", "list"], b"").await?;
    assert_eq!(listed, vec![json!({"group": "g"})]);

    // Back to the start: the next run prints everything again.
    let reset = s.ok(&["group", "reset-offsets", "g", "--topic", "t", "--to", "earliest"], b"").await?;
    assert_eq!(reset.len(), 2, "{reset:?}");
    assert!(reset.iter().all(|r| r["committed"] == 0), "{reset:?}");
    let d = describe(&s, "g").await?;
    let lag: u64 = d["partitions"].as_array().context("partitions")?.iter().filter_map(|p| p["lag"].as_u64()).sum();
    assert_eq!(lag, 6, "{d}");
    let third = s.ok(&consume, b"").await?;
    assert_eq!(positions(&third)?, produced);
    // --to an offset, and to latest.
    s.ok(&["group", "reset-offsets", "g", "--topic", "t", "--to", "latest"], b"").await?;
    assert!(s.ok(&consume, b"").await?.is_empty());
    let beyond = s.cli(&["group", "reset-offsets", "g", "--topic", "t", "--to", "99"], b"").await?;
    assert_error(&beyond, 1, "reset beyond the end");

    // The text form names the columns and the group.
    let text = run(&["--brokers", &s.addr, "group", "describe", "g"], b"").await?;
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(text.contains("group g") && text.contains("LAG") && text.contains("COMMITTED"), "{text}");

    assert_eq!(s.ok(&["group", "delete", "g"], b"").await?, vec![json!({"deleted": "g"})]);
    assert_error(&s.cli(&["group", "describe", "g"], b"").await?, 69, "describe after delete");
    assert_error(&s.cli(&["group", "delete", "g"], b"").await?, 69, "delete twice");
    assert!(s.ok(&["group", "list"], b"").await?.is_empty());

    // A group consume of an unknown topic fails with its code; --from OFFSET and --partition do
    // not go with --group.
    assert_error(&s.cli(&["consume", "nope", "--group", "g"], b"").await?, 3, "unknown topic");
    let out = s.cli(&["consume", "t", "--group", "g", "--from", "3"], b"").await?;
    assert_eq!(out.status.code(), Some(1), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(s.cli(&["consume", "t", "--group", "g", "--partition", "0"], b"").await?.status.code(), Some(2));
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn an_active_group_cannot_be_reset_or_deleted_and_a_follower_commits_on_ctrl_c() -> anyhow::Result<()> {
    let s = server().await?;
    s.ok(&["topic", "create", "t", "--partitions", "2"], b"").await?;
    s.ok(&["produce", "t"], b"one\ntwo\n").await?;

    let args = s.args(&["consume", "t", "--group", "g", "--follow"]);
    let mut cmd = tokio::process::Command::new(BIN);
    cmd.args(&args)
        .env_remove("BUSBAR_BROKERS")
        .env_remove("BUSBAR_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let mut child = cmd.spawn().context("spawning busbar consume --follow")?;
    let stdout = child.stdout.take().context("no stdout pipe")?;
    let mut lines = BufReader::new(stdout).lines();
    let mut printed = Vec::new();
    let read_two = tokio::time::timeout(CLI_TIMEOUT, async {
        while printed.len() < 2 {
            match lines.next_line().await? {
                Some(l) => printed.push(serde_json::from_str::<Value>(&l).with_context(|| format!("not JSON: {l}"))?),
                None => bail!("the follower exited early"),
            }
        }
        anyhow::Ok(())
    })
    .await;
    read_two.context("the follower did not print the two records in time")??;

    // It is a member now: offsets cannot be reset under it, nor the group deleted.
    let d = describe(&s, "g").await?;
    assert_eq!(d["members"].as_array().map(Vec::len), Some(1), "{d}");
    let reset = s.cli(&["group", "reset-offsets", "g", "--topic", "t", "--to", "earliest"], b"").await?;
    assert_error(&reset, 68, "reset of an active group");
    assert_error(&s.cli(&["group", "delete", "g"], b"").await?, 68, "delete of an active group");

    // It follows: a new record is printed as it commits.
    s.ok(&["produce", "t", "three"], b"").await?;
    let third = tokio::time::timeout(CLI_TIMEOUT, lines.next_line()).await.context("no third line in time")??;
    let third: Value = serde_json::from_str(&third.context("the follower exited early")?)?;
    assert_eq!(third["value"], "three");

    // Ctrl-C: it commits what it printed, leaves, and exits 0.
    signal(child.id().context("no pid")?, rustix::process::Signal::INT);
    let status = tokio::time::timeout(CLI_TIMEOUT, child.wait()).await.context("the follower did not stop")??;
    assert!(status.success(), "the follower exited with {status}");
    let d = describe(&s, "g").await?;
    assert_eq!(d["members"], json!([]), "{d}");
    for p in d["partitions"].as_array().context("partitions")? {
        assert_eq!(p["lag"], 0, "everything printed was committed: {p}");
    }

    // Now the reset goes through, and the group reads everything again.
    s.ok(&["group", "reset-offsets", "g", "--topic", "t", "--to", "earliest"], b"").await?;
    let again = s.ok(&["consume", "t", "--group", "g", "--idle-timeout-ms", "1500"], b"").await?;
    assert_eq!(again.len(), 3, "{again:?}");

    // A client can see the same through the library.
    let client = client_for(vec![s.addr.clone()]).await?;
    assert_eq!(client.list_groups().await?, vec!["g".to_string()]);
    Ok(())
}
