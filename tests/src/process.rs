//! Clusters of real `busbar server` processes: killed with SIGKILL, stopped with SIGTERM, restarted
//! on the same data dir, joined by new nodes.
//!
//! Every node gets a loopback port picked by the kernel (bind port 0, read it, drop the listener) and
//! its own data dir in a temp dir. Each start of a node ("incarnation") logs to its own file,
//! `logs/node-<id>.<incarnation>.log`, so a test can read what one run of a node said. Unless the test
//! calls [`ProcessCluster::finish`], the tail of every log is printed when the cluster is dropped, so
//! a failing test (by panic or by `?`) shows what the nodes did. Every child is killed on drop.
//!
//! Set `BUSBAR_TEST_KEEP_DIR=1` to keep the temp dirs (data and full logs) after the tests.
//!
//! Every wait is bounded: a node that does not come up, exit or agree fails the test with a message
//! naming what was awaited.

use std::collections::{BTreeMap, HashMap};
use std::fs::{self, File};
use std::io::Read;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, Context};
use busbar_client::{Client, ClientOptions, NodeRole, NodeStatus, Record};
use busbar_proto::v1 as pb;
use busbar_proto::v1::cluster_client::ClusterClient;
use tonic::transport::Endpoint;

use crate::wait;

/// Set (to anything) to keep every cluster's temp dir (data and logs) after the test.
pub const KEEP_DIR_ENV: &str = "BUSBAR_TEST_KEEP_DIR";
/// Lines of each log printed when a test fails.
const LOG_TAIL_LINES: usize = 60;
/// Bound on one status probe of one node.
const PROBE_TIMEOUT: Duration = Duration::from_millis(1500);
/// Bound on one CLI invocation.
const CLI_TIMEOUT: Duration = Duration::from_secs(30);
/// Largest number of fetch round trips when reading a whole partition (each returns >= 1 record).
const MAX_FETCH_ROUNDS: usize = 1_000_000;

/// Environment variables the server and CLI read; cleared so the caller's environment cannot leak in.
const BUSBAR_ENV: &[&str] = &[
    "BUSBAR_BROKERS",
    "BUSBAR_OUTPUT",
    "BUSBAR_LOG_FORMAT",
    "BUSBAR_ID",
    "BUSBAR_LISTEN",
    "BUSBAR_ADVERTISE",
    "BUSBAR_DATA_DIR",
    "BUSBAR_PEERS",
    "BUSBAR_JOIN",
    "BUSBAR_HEARTBEAT_MS",
    "BUSBAR_ELECTION_TIMEOUT_MIN_MS",
    "BUSBAR_ELECTION_TIMEOUT_MAX_MS",
    "BUSBAR_SNAPSHOT_EVERY",
    "BUSBAR_LOGS_TO_KEEP",
    "BUSBAR_MAX_RECORD_BYTES",
    "BUSBAR_MAX_BATCH_BYTES",
    "BUSBAR_WRITE_TIMEOUT_MS",
    "BUSBAR_RETENTION_MS",
    "BUSBAR_RETENTION_BYTES",
    "BUSBAR_RETENTION_CHECK_MS",
    "BUSBAR_HTTP",
    "BUSBAR_ID_FROM_HOSTNAME",
    "BUSBAR_AUTO_MEMBERSHIP",
    "BUSBAR_LOG",
];

/// Flags given to every node of a cluster.
#[derive(Clone, Debug)]
pub struct ClusterOptions {
    pub heartbeat_ms: u64,
    pub election_timeout_min_ms: u64,
    pub election_timeout_max_ms: u64,
    pub snapshot_every: Option<u64>,
    pub logs_to_keep: Option<u64>,
}

impl Default for ClusterOptions {
    /// Fast failover for tests: a leader's loss is noticed within a second.
    fn default() -> Self {
        Self {
            heartbeat_ms: 100,
            election_timeout_min_ms: 500,
            election_timeout_max_ms: 1000,
            snapshot_every: None,
            logs_to_keep: None,
        }
    }
}

impl ClusterOptions {
    pub fn election_timeout_max(&self) -> Duration {
        Duration::from_millis(self.election_timeout_max_ms)
    }
}

/// One running (or stopped) `busbar` child process and the file its output goes to.
pub struct Proc {
    child: Child,
    log: PathBuf,
    exited: Option<ExitStatus>,
}

impl Proc {
    /// Spawns `bin args...` in `cwd`, stdout and stderr appended to `log`.
    pub fn spawn(bin: &Path, args: &[String], cwd: &Path, log: &Path) -> anyhow::Result<Self> {
        let out = File::options()
            .create(true)
            .append(true)
            .open(log)
            .with_context(|| format!("opening log {}", log.display()))?;
        let err = out.try_clone().context("cloning the log handle")?;
        let mut cmd = Command::new(bin);
        cmd.args(args).current_dir(cwd).stdin(Stdio::null()).stdout(out).stderr(err);
        for k in BUSBAR_ENV {
            cmd.env_remove(k);
        }
        // Plain text in the log files (tracing-subscriber honours NO_COLOR).
        cmd.env("NO_COLOR", "1");
        let child = cmd.spawn().with_context(|| format!("spawning {} {}", bin.display(), args.join(" ")))?;
        Ok(Self { child, log: log.to_path_buf(), exited: None })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// The exit status if the process has exited.
    pub fn try_status(&mut self) -> anyhow::Result<Option<ExitStatus>> {
        if self.exited.is_none() {
            self.exited = self.child.try_wait().context("polling a child")?;
        }
        Ok(self.exited)
    }

    /// SIGKILL, then reap.
    pub fn kill(&mut self) -> anyhow::Result<ExitStatus> {
        if let Some(st) = self.try_status()? {
            return Ok(st);
        }
        self.child.kill().context("SIGKILL")?;
        let st = self.child.wait().context("reaping a killed child")?;
        self.exited = Some(st);
        Ok(st)
    }

    /// Sends SIGTERM (graceful stop); does not wait.
    pub fn signal_term(&mut self) -> anyhow::Result<()> {
        if self.try_status()?.is_some() {
            return Ok(());
        }
        let st =
            Command::new("kill").args(["-TERM", &self.pid().to_string()]).status().context("running kill -TERM")?;
        if !st.success() {
            bail!("kill -TERM {} failed: {st}", self.pid());
        }
        Ok(())
    }

    /// Waits (bounded) for the process to exit on its own.
    pub async fn wait_exit(&mut self, timeout: Duration) -> anyhow::Result<ExitStatus> {
        let pid = self.pid();
        let mut err = None;
        let st = wait::until(&format!("process {pid} to exit"), timeout, || {
            let r = self.try_status();
            let out = match r {
                Ok(s) => s,
                Err(e) => {
                    err = Some(e);
                    Some(ExitStatus::default())
                }
            };
            async move { out }
        })
        .await?;
        match err {
            Some(e) => Err(e),
            None => Ok(st),
        }
    }

    /// SIGTERM, then a bounded wait for the exit.
    pub async fn terminate(&mut self, timeout: Duration) -> anyhow::Result<ExitStatus> {
        self.signal_term()?;
        self.wait_exit(timeout).await
    }

    pub fn read_log(&self) -> anyhow::Result<String> {
        read_lossy(&self.log)
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if self.exited.is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

struct Node {
    addr: String,
    data_dir: PathBuf,
    /// The `server` arguments of its first start; a restart repeats them.
    args: Vec<String>,
    incarnation: u32,
    proc: Option<Proc>,
}

/// A cluster of `busbar server` processes on loopback ports, with data and logs in one temp dir.
pub struct ProcessCluster {
    bin: PathBuf,
    opts: ClusterOptions,
    dir: tempfile::TempDir,
    nodes: BTreeMap<u64, Node>,
    finished: bool,
}

impl ProcessCluster {
    /// An empty cluster; `bin` is the `busbar` binary (`env!("CARGO_BIN_EXE_busbar")`).
    pub fn new(bin: impl Into<PathBuf>, opts: ClusterOptions) -> anyhow::Result<Self> {
        let dir = tempfile::Builder::new().prefix("busbar-proc-").tempdir().context("creating the temp dir")?;
        fs::create_dir_all(dir.path().join("logs")).context("creating the logs dir")?;
        Ok(Self { bin: bin.into(), opts, dir, nodes: BTreeMap::new(), finished: false })
    }

    pub fn bin(&self) -> &Path {
        &self.bin
    }

    pub fn options(&self) -> &ClusterOptions {
        &self.opts
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Starts nodes `1..=n`, each told the whole voter set with `--peers`.
    pub fn start_with_peers(&mut self, n: u64) -> anyhow::Result<()> {
        let ids: Vec<u64> = (1..=n).collect();
        let addrs: Vec<(u64, String)> = ids.iter().map(|id| Ok((*id, free_addr()?))).collect::<anyhow::Result<_>>()?;
        let peers = addrs.iter().map(|(id, a)| format!("{id}={a}")).collect::<Vec<_>>().join(",");
        for (id, addr) in addrs {
            self.start_new(id, addr, vec!["--peers".into(), peers.clone()])?;
        }
        Ok(())
    }

    /// Starts a new node `id` that joins the running cluster through `via` (`--join`).
    pub fn start_joining(&mut self, id: u64, via: &str) -> anyhow::Result<()> {
        let addr = free_addr()?;
        self.start_new(id, addr, vec!["--join".into(), via.to_string()])
    }

    fn start_new(&mut self, id: u64, addr: String, formation: Vec<String>) -> anyhow::Result<()> {
        if self.nodes.contains_key(&id) {
            bail!("node {id} exists already");
        }
        let data_dir = self.dir.path().join(format!("node-{id}"));
        let mut args: Vec<String> = vec![
            "server".into(),
            "--id".into(),
            id.to_string(),
            "--listen".into(),
            addr.clone(),
            "--data-dir".into(),
            data_dir.display().to_string(),
        ];
        args.extend(formation);
        let o = &self.opts;
        args.extend([
            "--heartbeat-ms".into(),
            o.heartbeat_ms.to_string(),
            "--election-timeout-min-ms".into(),
            o.election_timeout_min_ms.to_string(),
            "--election-timeout-max-ms".into(),
            o.election_timeout_max_ms.to_string(),
        ]);
        if let Some(n) = o.snapshot_every {
            args.extend(["--snapshot-every".into(), n.to_string()]);
        }
        if let Some(n) = o.logs_to_keep {
            args.extend(["--logs-to-keep".into(), n.to_string()]);
        }
        self.nodes.insert(id, Node { addr, data_dir, args, incarnation: 0, proc: None });
        self.restart(id)
    }

    /// Starts node `id` again with the same flags and data dir. It must not be running.
    pub fn restart(&mut self, id: u64) -> anyhow::Result<()> {
        let logs = self.dir.path().join("logs");
        let cwd = self.dir.path().to_path_buf();
        let bin = self.bin.clone();
        let node = self.node_mut(id)?;
        if let Some(p) = node.proc.as_mut() {
            if p.try_status()?.is_none() {
                bail!("node {id} is still running");
            }
        }
        node.incarnation += 1;
        let log = logs.join(format!("node-{id}.{}.log", node.incarnation));
        node.proc = Some(Proc::spawn(&bin, &node.args, &cwd, &log)?);
        Ok(())
    }

    /// SIGKILL: the node gets no chance to flush anything.
    pub fn kill(&mut self, id: u64) -> anyhow::Result<()> {
        self.proc_mut(id)?.kill()?;
        Ok(())
    }

    /// SIGTERM, then a bounded wait for the exit; returns the exit status.
    pub async fn terminate(&mut self, id: u64, timeout: Duration) -> anyhow::Result<ExitStatus> {
        self.proc_mut(id)?.terminate(timeout).await.with_context(|| format!("stopping node {id}"))
    }

    /// Sends SIGTERM to node `id` without waiting.
    pub fn signal_term(&mut self, id: u64) -> anyhow::Result<()> {
        self.proc_mut(id)?.signal_term()
    }

    /// Waits (bounded) for node `id` to exit by itself.
    pub async fn wait_exit(&mut self, id: u64, timeout: Duration) -> anyhow::Result<ExitStatus> {
        self.proc_mut(id)?.wait_exit(timeout).await.with_context(|| format!("node {id}"))
    }

    fn node(&self, id: u64) -> anyhow::Result<&Node> {
        self.nodes.get(&id).with_context(|| format!("no node {id}"))
    }

    fn node_mut(&mut self, id: u64) -> anyhow::Result<&mut Node> {
        self.nodes.get_mut(&id).with_context(|| format!("no node {id}"))
    }

    fn proc_mut(&mut self, id: u64) -> anyhow::Result<&mut Proc> {
        self.node_mut(id)?.proc.as_mut().with_context(|| format!("node {id} was never started"))
    }

    pub fn addr(&self, id: u64) -> anyhow::Result<String> {
        Ok(self.node(id)?.addr.clone())
    }

    pub fn data_dir(&self, id: u64) -> anyhow::Result<PathBuf> {
        Ok(self.node(id)?.data_dir.clone())
    }

    pub fn ids(&self) -> Vec<u64> {
        self.nodes.keys().copied().collect()
    }

    /// Nodes whose process is running (it has not exited).
    pub fn running(&mut self) -> anyhow::Result<Vec<u64>> {
        let mut out = Vec::new();
        for (id, n) in &mut self.nodes {
            if let Some(p) = n.proc.as_mut() {
                if p.try_status()?.is_none() {
                    out.push(*id);
                }
            }
        }
        Ok(out)
    }

    /// Fails if any of `ids` has exited: a node that died on its own is a finding, not a timeout.
    pub fn check_running(&mut self, ids: &[u64]) -> anyhow::Result<()> {
        for id in ids {
            if let Some(st) = self.proc_mut(*id)?.try_status()? {
                bail!("node {id} exited unexpectedly with {st}");
            }
        }
        Ok(())
    }

    /// What the current incarnation of node `id` has logged so far.
    pub fn log(&self, id: u64) -> anyhow::Result<String> {
        self.node(id)?.proc.as_ref().with_context(|| format!("node {id} was never started"))?.read_log()
    }

    /// A client over the given nodes, once one of them answers (bounded).
    pub async fn client(&self, ids: &[u64]) -> anyhow::Result<Client> {
        let addrs = ids.iter().map(|id| self.addr(*id)).collect::<anyhow::Result<Vec<_>>>()?;
        client_for(addrs).await
    }

    /// Waits until exactly one of `ids` leads, with a term >= `min_term`, and every other one of them
    /// follows it in the same term. Returns (leader, term).
    pub async fn wait_for_leader(&self, ids: &[u64], min_term: u64, timeout: Duration) -> anyhow::Result<(u64, u64)> {
        let addrs = ids.iter().map(|id| Ok((*id, self.addr(*id)?))).collect::<anyhow::Result<Vec<_>>>()?;
        let what = format!("one leader among nodes {ids:?} in a term >= {min_term}, followed by all of them");
        wait::until(&what, timeout, || {
            let addrs = addrs.clone();
            async move {
                let mut st = Vec::new();
                for (id, addr) in &addrs {
                    st.push((*id, probe_status(addr).await.ok()?));
                }
                agreed_leader(&st, min_term)
            }
        })
        .await
    }

    /// Runs the real CLI, `busbar --brokers <brokers> <args>`, bounded.
    pub async fn cli(&self, brokers: &[u64], args: &[&str]) -> anyhow::Result<std::process::Output> {
        let brokers = brokers.iter().map(|id| self.addr(*id)).collect::<anyhow::Result<Vec<_>>>()?.join(",");
        let mut all = vec!["--brokers", brokers.as_str()];
        all.extend_from_slice(args);
        run_cli(&self.bin, &all, self.dir.path()).await
    }

    /// Marks the test as passed: the logs are not printed on drop.
    pub fn finish(&mut self) {
        self.finished = true;
    }

    /// Prints the last lines of every node's every log, oldest incarnation first.
    pub fn dump_logs(&self) {
        for (id, n) in &self.nodes {
            for inc in 1..=n.incarnation {
                let path = self.dir.path().join("logs").join(format!("node-{id}.{inc}.log"));
                eprintln!("----- node {id}, start #{inc} ({}) -----", path.display());
                match read_lossy(&path) {
                    Ok(text) => eprintln!("{}", tail(&text, LOG_TAIL_LINES)),
                    Err(e) => eprintln!("(unreadable: {e:#})"),
                }
            }
        }
    }
}

impl Drop for ProcessCluster {
    fn drop(&mut self) {
        for n in self.nodes.values_mut() {
            if let Some(p) = n.proc.as_mut() {
                let _ = p.kill();
            }
        }
        if !self.finished || std::thread::panicking() {
            eprintln!("===== test did not finish: node logs (tail) in {} =====", self.dir.path().display());
            self.dump_logs();
        }
        if std::env::var_os(KEEP_DIR_ENV).is_some() {
            self.dir.disable_cleanup(true);
            eprintln!("{KEEP_DIR_ENV} set: keeping {}", self.dir.path().display());
        }
    }
}

/// A loopback address with a port the kernel just handed out. The port is free when this returns;
/// another process could take it before the node binds it, which the node reports at startup.
pub fn free_addr() -> anyhow::Result<String> {
    let l = TcpListener::bind("127.0.0.1:0").context("binding port 0")?;
    Ok(l.local_addr().context("reading the bound address")?.to_string())
}

pub fn read_lossy(path: &Path) -> anyhow::Result<String> {
    let mut bytes = Vec::new();
    File::open(path)
        .and_then(|mut f| f.read_to_end(&mut bytes))
        .with_context(|| format!("reading {}", path.display()))?;
    Ok(String::from_utf8_lossy(&bytes).into_owned())
}

pub fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// Runs `bin args...` in `cwd` with a bound, the BUSBAR_* environment cleared.
pub async fn run_cli(bin: &Path, args: &[&str], cwd: &Path) -> anyhow::Result<std::process::Output> {
    let mut cmd = tokio::process::Command::new(bin);
    cmd.args(args).current_dir(cwd).stdin(Stdio::null()).kill_on_drop(true);
    for k in BUSBAR_ENV {
        cmd.env_remove(k);
    }
    match tokio::time::timeout(CLI_TIMEOUT, cmd.output()).await {
        Ok(out) => out.with_context(|| format!("running busbar {}", args.join(" "))),
        Err(_) => bail!("busbar {} did not finish within {CLI_TIMEOUT:?}", args.join(" ")),
    }
}

/// Parses `--output json` output: one JSON object per line.
pub fn json_lines(out: &std::process::Output) -> anyhow::Result<Vec<serde_json::Value>> {
    let stdout = String::from_utf8_lossy(&out.stdout);
    stdout
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).with_context(|| format!("not a JSON line: {l:?}")))
        .collect()
}

/// A client over `addrs` with the default bounds, once one of them answers.
pub async fn client_for(addrs: Vec<String>) -> anyhow::Result<Client> {
    let opts = ClientOptions::default();
    let what = format!("a broker among {addrs:?} to accept a connection");
    wait::until(&what, Duration::from_secs(20), || {
        let (addrs, opts) = (addrs.clone(), opts.clone());
        async move { Client::connect_with(addrs, opts).await.ok() }
    })
    .await
}

/// One node's own view of itself, bounded.
pub async fn probe_status(addr: &str) -> anyhow::Result<NodeStatus> {
    let ep = Endpoint::from_shared(format!("http://{addr}"))?.connect_timeout(PROBE_TIMEOUT).timeout(PROBE_TIMEOUT);
    let fut = async {
        let ch = ep.connect().await?;
        let st = ClusterClient::new(ch).local_status(pb::LocalStatusRequest {}).await?.into_inner();
        anyhow::Ok(st)
    };
    match tokio::time::timeout(PROBE_TIMEOUT, fut).await {
        Ok(r) => r.with_context(|| format!("status of {addr}")),
        Err(_) => bail!("status of {addr}: no answer within {PROBE_TIMEOUT:?}"),
    }
}

/// The leader all of `st` agree on: exactly one leads in a term >= `min_term`; the others follow it
/// in that term.
fn agreed_leader(st: &[(u64, NodeStatus)], min_term: u64) -> Option<(u64, u64)> {
    let leaders: Vec<&(u64, NodeStatus)> = st.iter().filter(|(_, s)| s.role == NodeRole::Leader as i32).collect();
    let [(leader, ls)] = leaders.as_slice() else { return None };
    if ls.term < min_term {
        return None;
    }
    let all_follow = st.iter().all(|(_, s)| s.term == ls.term && s.has_leader && s.leader_id == *leader);
    all_follow.then_some((*leader, ls.term))
}

/// Every record of one partition as one node holds it, read with `fetch_from` (bounded rounds).
pub async fn read_partition(
    client: &Client,
    addr: &str,
    topic: &str,
    partition: u32,
) -> anyhow::Result<Vec<(u64, Vec<u8>)>> {
    let mut out = Vec::new();
    let mut offset = 0;
    for _ in 0..MAX_FETCH_ROUNDS {
        let r = client
            .fetch_from(addr, topic, partition, offset, 10_000)
            .await
            .with_context(|| format!("fetching {topic}/{partition} at {offset} from {addr}"))?;
        if offset >= r.end_offset {
            return Ok(out);
        }
        if r.records.is_empty() {
            bail!("{addr}: fetch at {offset} returned no records below the end offset {}", r.end_offset);
        }
        for c in r.records {
            if c.offset < offset {
                bail!("{addr}: offset {} returned for a fetch at {offset}", c.offset);
            }
            offset = c.offset + 1;
            out.push((c.offset, c.record.map(|r| r.value.to_vec()).unwrap_or_default()));
        }
    }
    bail!("{addr}: reading {topic}/{partition} took more than {MAX_FETCH_ROUNDS} fetches")
}

/// The end offset (next offset to assign) of a partition on one node; `None` if it cannot say (the
/// node is down or does not know the topic yet).
pub async fn end_offset(client: &Client, addr: &str, topic: &str, partition: u32) -> Option<u64> {
    client.fetch_from(addr, topic, partition, 0, 1).await.ok().map(|r| r.end_offset)
}

/// Waits (bounded) until the partition on every one of `addrs` ends at `end` or beyond.
pub async fn wait_end_offset(
    client: &Client,
    addrs: &[String],
    topic: &str,
    partition: u32,
    end: u64,
    timeout: Duration,
) -> anyhow::Result<()> {
    for addr in addrs {
        let what = format!("{addr} to hold {topic}/{partition} up to offset {end}");
        wait::until(&what, timeout, || async move {
            end_offset(client, addr, topic, partition).await.filter(|e| *e >= end).map(|_| ())
        })
        .await?;
    }
    Ok(())
}

/// Fails unless every acknowledged (offset, value) is in `held` at exactly that offset.
pub fn check_acked_present(node: &str, held: &[(u64, Vec<u8>)], acked: &[(u64, Vec<u8>)]) -> anyhow::Result<()> {
    let by_offset: HashMap<u64, &Vec<u8>> = held.iter().map(|(o, v)| (*o, v)).collect();
    let mut bad = Vec::new();
    for (o, v) in acked {
        match by_offset.get(o) {
            Some(h) if *h == v => {}
            Some(h) => bad.push(format!(
                "offset {o}: acked {:?}, holds {:?}",
                String::from_utf8_lossy(short(v)),
                String::from_utf8_lossy(short(h))
            )),
            None => bad.push(format!("offset {o}: acked {:?}, missing", String::from_utf8_lossy(short(v)))),
        }
    }
    if !bad.is_empty() {
        bail!(
            "{node} lost or changed {} of {} acknowledged records (holds {}); first: {:?}",
            bad.len(),
            acked.len(),
            held.len(),
            &bad[..bad.len().min(5)]
        );
    }
    Ok(())
}

fn short(v: &[u8]) -> &[u8] {
    &v[..v.len().min(40)]
}

/// Values written more than once (at different offsets) in `held`: the trace of a retried write.
pub fn duplicates(held: &[(u64, Vec<u8>)]) -> Vec<(Vec<u8>, Vec<u64>)> {
    let mut seen: HashMap<&Vec<u8>, Vec<u64>> = HashMap::new();
    for (o, v) in held {
        seen.entry(v).or_default().push(*o);
    }
    let mut d: Vec<(Vec<u8>, Vec<u64>)> =
        seen.into_iter().filter(|(_, os)| os.len() > 1).map(|(v, os)| (v.clone(), os)).collect();
    d.sort_by_key(|(_, os)| os[0]);
    d
}

/// What a [`Producer`] saw.
#[derive(Debug, Default)]
pub struct ProducerReport {
    /// Acknowledged records, in the order they were acknowledged.
    pub acked: Vec<(u64, Vec<u8>)>,
    /// Batches whose outcome is unknown (they may have been written).
    pub indeterminate: usize,
    /// Batches that failed; the first few errors.
    pub failed: usize,
    pub errors: Vec<String>,
}

/// Writes batches of two unique values to one partition, one batch at a time, until stopped; keeps
/// every acknowledged (offset, value).
pub struct Producer {
    stop: Arc<AtomicBool>,
    report: Arc<Mutex<ProducerReport>>,
    task: tokio::task::JoinHandle<()>,
}

/// Bound on the batches one producer writes (far above what a test needs).
const MAX_PRODUCER_BATCHES: u64 = 1_000_000;
/// Errors kept in a report.
const MAX_KEPT_ERRORS: usize = 20;

impl Producer {
    pub fn spawn(client: Client, topic: &str, partition: u32, prefix: &str) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let report = Arc::new(Mutex::new(ProducerReport::default()));
        let (topic, prefix) = (topic.to_string(), prefix.to_string());
        let task = tokio::spawn({
            let (stop, report) = (stop.clone(), report.clone());
            async move {
                for seq in 0..MAX_PRODUCER_BATCHES {
                    if stop.load(Ordering::Relaxed) {
                        return;
                    }
                    let values: Vec<Vec<u8>> = (0..2).map(|i| format!("{prefix}-{seq}-{i}").into_bytes()).collect();
                    let recs = values.iter().cloned().map(Record::value).collect();
                    let res = client.produce(&topic, partition, recs).await;
                    let mut r = report.lock().unwrap_or_else(|e| e.into_inner());
                    match res {
                        Ok(ack) if ack.count as usize == values.len() => {
                            for (i, v) in values.into_iter().enumerate() {
                                r.acked.push((ack.base_offset + i as u64, v));
                            }
                        }
                        Ok(ack) => {
                            r.failed += 1;
                            r.errors.push(format!("acknowledged {} records of {}", ack.count, values.len()));
                        }
                        Err(e) => {
                            if e.is_indeterminate() {
                                r.indeterminate += 1;
                            } else {
                                r.failed += 1;
                            }
                            if r.errors.len() < MAX_KEPT_ERRORS {
                                r.errors.push(e.to_string());
                            }
                        }
                    }
                }
            }
        });
        Self { stop, report, task }
    }

    pub fn acked_count(&self) -> usize {
        self.report.lock().unwrap_or_else(|e| e.into_inner()).acked.len()
    }

    /// Waits (bounded) until `n` more records than now are acknowledged.
    pub async fn wait_for_more(&self, n: usize, timeout: Duration) -> anyhow::Result<()> {
        let target = self.acked_count() + n;
        wait::until(&format!("{target} acknowledged writes"), timeout, || async move {
            (self.acked_count() >= target).then_some(())
        })
        .await
        .with_context(|| {
            let r = self.report.lock().unwrap_or_else(|e| e.into_inner());
            format!(
                "{} acknowledged, {} indeterminate and {} failed batches; first errors: {:?}",
                r.acked.len(),
                r.indeterminate,
                r.failed,
                r.errors
            )
        })
    }

    /// Stops after the batch in flight (bounded) and returns what was seen.
    pub async fn stop(self) -> anyhow::Result<ProducerReport> {
        self.stop.store(true, Ordering::Relaxed);
        // One produce call is bounded by the client's retries and timeouts (well under 2 minutes).
        tokio::time::timeout(Duration::from_secs(120), self.task)
            .await
            .context("the producer did not stop within 120 s")?
            .context("the producer task failed")?;
        let mut r = self.report.lock().unwrap_or_else(|e| e.into_inner());
        let report = std::mem::take(&mut *r);
        // One producer, one batch at a time: acknowledged offsets strictly increase.
        if let Some(w) = report.acked.windows(2).find(|w| w[1].0 <= w[0].0) {
            bail!("acknowledged offsets went backwards: {} then {}", w[0].0, w[1].0);
        }
        Ok(report)
    }
}

/// Runs `bin args...` with `stdin` on standard input, bounded, the BUSBAR_* environment cleared.
pub async fn run_cli_with_stdin(bin: &Path, args: &[&str], stdin: &[u8]) -> anyhow::Result<std::process::Output> {
    use tokio::io::AsyncWriteExt;
    let mut cmd = tokio::process::Command::new(bin);
    cmd.args(args).stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped()).kill_on_drop(true);
    for k in BUSBAR_ENV {
        cmd.env_remove(k);
    }
    let mut child = cmd.spawn().context("spawning busbar")?;
    let mut input = child.stdin.take().context("no stdin pipe")?;
    // A command that fails early stops reading; its exit status and stderr then tell the story.
    let _ = input.write_all(stdin).await;
    drop(input);
    match tokio::time::timeout(CLI_TIMEOUT, child.wait_with_output()).await {
        Ok(out) => out.with_context(|| format!("running busbar {}", args.join(" "))),
        Err(_) => bail!("busbar {} did not finish within {CLI_TIMEOUT:?}", args.join(" ")),
    }
}

/// One single-node `busbar server` process with its own port and data dir, for CLI tests; killed on
/// drop.
pub struct SingleServer {
    pub proc: Proc,
    pub addr: String,
    bin: PathBuf,
    _dir: tempfile::TempDir,
}

impl SingleServer {
    /// Starts it and waits (bounded) until it leads.
    pub async fn start(bin: &Path, prefix: &str) -> anyhow::Result<Self> {
        let dir = tempfile::Builder::new().prefix(prefix).tempdir()?;
        let addr = free_addr()?;
        let args: Vec<String> =
            ["server", "--id", "1", "--listen", &addr, "--data-dir", "data"].iter().map(|s| s.to_string()).collect();
        let mut proc = Proc::spawn(bin, &args, dir.path(), &dir.path().join("server.log"))?;
        let leads = crate::wait::until(&format!("the server on {addr} to lead"), Duration::from_secs(30), || {
            let addr = addr.clone();
            async move {
                probe_status(&addr).await.ok().filter(|s| s.role == busbar_client::NodeRole::Leader as i32).map(|_| ())
            }
        })
        .await;
        if let Err(e) = leads {
            let log = proc.read_log().unwrap_or_default();
            let _ = proc.kill();
            bail!("{e:#}\nserver log (tail):\n{}", tail(&log, 40));
        }
        Ok(Self { proc, addr, bin: bin.to_path_buf(), _dir: dir })
    }

    /// `--brokers <this server> --output json` followed by `args`.
    pub fn args<'a>(&'a self, args: &[&'a str]) -> Vec<&'a str> {
        let mut all = vec!["--brokers", self.addr.as_str(), "--output", "json"];
        all.extend_from_slice(args);
        all
    }

    /// `busbar --brokers <this server> --output json <args>`, with `stdin` on standard input.
    pub async fn cli(&self, args: &[&str], stdin: &[u8]) -> anyhow::Result<std::process::Output> {
        run_cli_with_stdin(&self.bin, &self.args(args), stdin).await
    }

    /// Like [`SingleServer::cli`]; fails unless the command succeeded. Returns its JSON lines.
    pub async fn ok(&self, args: &[&str], stdin: &[u8]) -> anyhow::Result<Vec<serde_json::Value>> {
        let out = self.cli(args, stdin).await?;
        anyhow::ensure!(
            out.status.success(),
            "busbar {} failed ({}): {}\nserver log (tail):\n{}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr),
            tail(&self.proc.read_log().unwrap_or_default(), 30)
        );
        json_lines(&out)
    }
}
