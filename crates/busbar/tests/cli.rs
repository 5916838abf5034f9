//! The client commands of the `busbar` binary, run as real processes against real server processes:
//! topic admin, produce from stdin, consume as JSON lines, error reporting, and `busbar dev`.
//!
//! Each test starts its own single-node server (own port, own temp dir; killed on drop) or its own
//! `busbar dev` cluster. Every wait is bounded.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context};
use base64::Engine;
use busbar_client::Record;
use busbar_tests::process::{client_for, json_lines, run_cli_with_stdin, SingleServer};
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, BufReader};

const BIN: &str = env!("CARGO_BIN_EXE_busbar");
/// Bound on `busbar dev` forming its cluster, and on it stopping after SIGINT.
const DEV_READY: Duration = Duration::from_secs(60);
const DEV_STOP: Duration = Duration::from_secs(30);

type Server = SingleServer;

/// A single-node server for one test (its own port and data dir; killed on drop).
async fn server() -> anyhow::Result<Server> {
    SingleServer::start(Path::new(BIN), "busbar-cli-").await
}

/// Runs the binary, bounded, with the caller's BUSBAR_* settings cleared.
async fn run(args: &[&str], stdin: &[u8]) -> anyhow::Result<std::process::Output> {
    run_cli_with_stdin(Path::new(BIN), args, stdin).await
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

fn now_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread")]
async fn topic_produce_consume_round_trip_then_delete() -> anyhow::Result<()> {
    let s = server().await?;
    let created = s.ok(&["topic", "create", "rt", "--partitions", "2"], b"").await?;
    assert_eq!(created, vec![json!({"topic": "rt", "partitions": 2})]);

    let before = now_ms();
    let lines = [("k1", "v1"), ("k2", "v2 with: colon"), ("k3", "")];
    let stdin: String = lines.iter().map(|(k, v)| format!("{k}:{v}\n")).collect();
    let acks = s.ok(&["produce", "rt", "--key-separator", ":", "--header", "trace=abc"], stdin.as_bytes()).await?;
    assert_eq!(acks.len(), 3, "one ack per line: {acks:?}");
    for (ack, (k, _)) in acks.iter().zip(lines) {
        assert_eq!(ack["topic"], "rt");
        // The key's partition, as Kafka's default partitioner picks it.
        assert_eq!(ack["partition"], busbar_proto::partition::for_key(k.as_bytes(), 2), "{ack}");
        assert!(ack["offset"].is_u64(), "{ack}");
    }

    let records = s.ok(&["consume", "rt", "--from", "beginning", "--idle-timeout-ms", "1000"], b"").await?;
    assert_eq!(records.len(), 3, "{records:?}");
    let after = now_ms();
    for (i, (k, v)) in lines.iter().enumerate() {
        let ack = &acks[i];
        let r = records
            .iter()
            .find(|r| r["partition"] == ack["partition"] && r["offset"] == ack["offset"])
            .with_context(|| format!("no consumed record at the acknowledged {ack}"))?;
        assert_eq!(r["topic"], "rt");
        assert_eq!(r["key"], *k, "{r}");
        assert_eq!(r["value"], *v, "{r}");
        assert_eq!(r["headers"], json!([{"name": "trace", "value": "abc"}]), "{r}");
        assert!(r.get("value_encoding").is_none() && r.get("key_encoding").is_none(), "{r}");
        let ts = r["timestamp"].as_i64().context("timestamp")?;
        assert!(before - 60_000 <= ts && ts <= after + 60_000, "timestamp {ts} not near {before}..{after}");
    }
    // In order: within a partition, offsets increase and follow the input order.
    for p in 0..2u64 {
        let consumed: Vec<&Value> = records.iter().filter(|r| r["partition"] == p).map(|r| &r["key"]).collect();
        let produced: Vec<&str> = lines
            .iter()
            .filter(|(k, _)| u64::from(busbar_proto::partition::for_key(k.as_bytes(), 2)) == p)
            .map(|(k, _)| *k)
            .collect();
        assert_eq!(consumed, produced, "partition {p}");
    }

    let described = s.ok(&["topic", "describe", "rt"], b"").await?;
    assert_eq!(described.len(), 2, "{described:?}");
    let total: u64 = described.iter().map(|d| d["end_offset"].as_u64().unwrap_or(0)).sum();
    assert_eq!(total, 3, "{described:?}");

    let listed = s.ok(&["topic", "list"], b"").await?;
    assert!(listed.contains(&json!({"topic": "rt", "partitions": 2})), "{listed:?}");

    assert_eq!(s.ok(&["topic", "delete", "rt"], b"").await?, vec![json!({"deleted": "rt"})]);
    let gone = s.cli(&["topic", "describe", "rt"], b"").await?;
    assert_error(&gone, 3, "describe after delete");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn bytes_that_are_not_utf8_are_consumed_as_marked_base64() -> anyhow::Result<()> {
    let s = server().await?;
    s.ok(&["topic", "create", "bin"], b"").await?;
    // From stdin: the CLI sends lines as raw bytes.
    s.ok(&["produce", "bin", "--key-separator", "=", "--partition", "0"], b"\xffk=\x00\xfe\n").await?;
    // Through the client crate: a binary header value next to a text one.
    let client = client_for(vec![s.addr.clone()]).await?;
    let rec = Record {
        key: None,
        value: b"plain".to_vec(),
        headers: vec![("bin".into(), vec![0x80, 0x81]), ("txt".into(), b"ok".to_vec())],
        timestamp_ms: 0,
    };
    client.produce("bin", 0, vec![rec]).await?;

    let records = s.ok(&["consume", "bin", "--idle-timeout-ms", "500"], b"").await?;
    assert_eq!(records.len(), 2, "{records:?}");
    let b64 = |b: &[u8]| base64::engine::general_purpose::STANDARD.encode(b);
    let r = &records[0];
    assert_eq!((&r["key"], &r["key_encoding"]), (&json!(b64(b"\xffk")), &json!("base64")), "{r}");
    assert_eq!((&r["value"], &r["value_encoding"]), (&json!(b64(b"\x00\xfe")), &json!("base64")), "{r}");
    let r = &records[1];
    assert_eq!(r["key"], Value::Null, "{r}");
    assert_eq!(r["value"], "plain");
    assert!(r.get("value_encoding").is_none(), "{r}");
    let want = json!([
        {"name": "bin", "value": b64(&[0x80, 0x81]), "value_encoding": "base64"},
        {"name": "txt", "value": "ok"},
    ]);
    assert_eq!(r["headers"], want, "{r}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_inputs_exit_1_with_one_line_naming_the_code() -> anyhow::Result<()> {
    let s = server().await?;
    assert_error(&s.cli(&["topic", "create", "bad name!"], b"").await?, 17, "invalid topic name");
    assert_error(&s.cli(&["topic", "create", "zero", "--partitions", "0"], b"").await?, 37, "zero partitions");
    assert_error(&s.cli(&["produce", "nope", "value"], b"").await?, 3, "produce to an unknown topic");
    assert_error(&s.cli(&["produce", "nope"], b"a\nb\n").await?, 3, "produce lines to an unknown topic");
    s.ok(&["topic", "create", "small"], b"").await?;
    s.ok(&["produce", "small", "one"], b"").await?;
    assert_error(&s.cli(&["consume", "small", "--from", "999"], b"").await?, 1, "consume beyond the end");
    assert_error(&s.cli(&["consume", "small", "--partition", "5"], b"").await?, 3, "consume a missing partition");

    // A line without the separator is reported by number; the others are still written.
    let out = s.cli(&["produce", "small", "--key-separator", ":"], b"a:1\nno separator\nb:2\n").await?;
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(json_lines(&out)?.len(), 2, "the good lines are acknowledged");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("line 2"), "{stderr}");
    // Flag errors are clap's: exit 2.
    assert_eq!(s.cli(&["consume", "small", "--from", "nowhere"], b"").await?.status.code(), Some(2));
    Ok(())
}

/// Kills the `busbar dev` process and its nodes if the test ends early.
struct DevGuard {
    child: tokio::process::Child,
    pids: Vec<u32>,
}

impl Drop for DevGuard {
    fn drop(&mut self) {
        for pid in &self.pids {
            signal(*pid, rustix::process::Signal::KILL);
        }
        let _ = self.child.start_kill();
    }
}

fn signal(pid: u32, sig: rustix::process::Signal) {
    if let Some(pid) = i32::try_from(pid).ok().and_then(rustix::process::Pid::from_raw) {
        let _ = rustix::process::kill_process(pid, sig);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn dev_runs_a_three_node_cluster_and_sigint_stops_it() -> anyhow::Result<()> {
    let mut cmd = tokio::process::Command::new(BIN);
    cmd.args(["--output", "json", "dev", "--nodes", "3"])
        .env_remove("BUSBAR_BROKERS")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true);
    let mut child = cmd.spawn().context("spawning busbar dev")?;
    let stdout = child.stdout.take().context("no stdout pipe")?;
    let mut dev = DevGuard { child, pids: Vec::new() };
    let mut lines = BufReader::new(stdout).lines();

    let mut brokers = None;
    let mut dir = None;
    let ready = tokio::time::timeout(DEV_READY, async {
        while let Some(line) = lines.next_line().await? {
            let ev: Value = serde_json::from_str(&line).with_context(|| format!("not JSON: {line}"))?;
            match ev["event"].as_str() {
                Some("node") => dev.pids.push(ev["pid"].as_u64().context("pid")? as u32),
                Some("brokers") => {
                    brokers = ev["brokers"].as_str().map(str::to_string);
                    dir = ev["dir"].as_str().map(PathBuf::from);
                }
                Some("ready") => return anyhow::Ok(()),
                _ => {}
            }
        }
        bail!("busbar dev closed its output before it was ready")
    })
    .await;
    ready.context("busbar dev did not get ready in time")??;
    let brokers = brokers.context("no brokers line")?;
    let dir = dir.context("no dir")?;
    assert_eq!(dev.pids.len(), 3);
    assert_eq!(brokers.split(',').count(), 3, "{brokers}");
    assert!(dir.is_dir());

    let out = run(&["--brokers", &brokers, "--output", "json", "cluster", "status"], b"").await?;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let nodes = json_lines(&out)?;
    assert_eq!(nodes.len(), 3, "{nodes:?}");
    assert_eq!(nodes.iter().filter(|n| n["role"] == "leader").count(), 1, "{nodes:?}");
    assert!(nodes.iter().all(|n| n["reachable"] == true), "{nodes:?}");

    let dev_pid = dev.child.id().context("busbar dev has no pid")?;
    signal(dev_pid, rustix::process::Signal::INT);
    let status = tokio::time::timeout(DEV_STOP, dev.child.wait())
        .await
        .context("busbar dev did not stop within the bound after SIGINT")??;
    assert!(status.success(), "busbar dev exited with {status}");
    for pid in &dev.pids {
        assert!(!Path::new(&format!("/proc/{pid}")).exists(), "node process {pid} still exists");
    }
    assert!(!dir.exists(), "{} was not removed", dir.display());
    dev.pids.clear();
    Ok(())
}
