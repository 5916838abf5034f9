//! `busbar dev`: a throwaway local cluster of `busbar server` child processes, for trying Busbar out.
//!
//! The nodes run this very binary on loopback ports the kernel hands out, with data and logs in one
//! temporary directory. The children get their own process group, so a Ctrl-C in the terminal reaches
//! only this process, which then stops them in order (SIGTERM, a bounded wait, SIGKILL) and deletes the
//! directory. A node that dies meanwhile (say, `kill -9` to watch a failover) is reported, and the
//! others keep running.

use std::fs::File;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use busbar_client::{Client, ClientOptions};
use clap::Args;
use serde_json::json;
use tokio::process::{Child, Command};
use tokio::signal::unix::{signal, Signal, SignalKind};

use crate::cli::Output;

/// Bound on the nodes starting and electing a first leader.
const FORMATION_TIMEOUT: Duration = Duration::from_secs(60);
/// Bound on the nodes stopping after SIGTERM before they are killed.
const STOP_TIMEOUT: Duration = Duration::from_secs(15);
/// How often the children are checked for having exited.
const WATCH_EVERY: Duration = Duration::from_millis(200);
/// Server settings a dev node must not inherit from the caller's environment.
const SERVER_ENV: &[&str] =
    &["BUSBAR_ID", "BUSBAR_LISTEN", "BUSBAR_ADVERTISE", "BUSBAR_DATA_DIR", "BUSBAR_PEERS", "BUSBAR_JOIN"];

#[derive(Args, Debug)]
#[command(after_help = "Prints each node's id, pid, address and log file, then the --brokers value to use \
    (with --output json: one event object per line). Ctrl-C or SIGTERM stops every node and deletes the \
    data. `kill -9 <pid>` of one node shows a failover; the others keep serving.")]
pub struct DevArgs {
    /// Number of nodes (voters).
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u64).range(1..=9))]
    pub nodes: u64,
}

struct Node {
    id: u64,
    addr: String,
    pid: u32,
    log: PathBuf,
    child: Child,
    exited: bool,
}

struct Signals {
    term: Signal,
    int: Signal,
}

impl Signals {
    async fn recv(&mut self) -> &'static str {
        tokio::select! {
            _ = self.term.recv() => "SIGTERM",
            _ = self.int.recv() => "SIGINT",
        }
    }
}

pub async fn run(output: Output, args: DevArgs) -> anyhow::Result<()> {
    // Installed first: a Ctrl-C from here on stops the cluster instead of orphaning it.
    let mut signals = Signals {
        term: signal(SignalKind::terminate()).context("installing the SIGTERM handler")?,
        int: signal(SignalKind::interrupt()).context("installing the SIGINT handler")?,
    };
    let exe = std::env::current_exe().context("locating the busbar binary")?;
    let dir = tempfile::Builder::new().prefix("busbar-dev-").tempdir().context("creating a temporary directory")?;
    let mut nodes = Vec::new();
    let result = match start(&exe, dir.path(), args.nodes, &mut nodes) {
        Ok(()) => supervise(output, dir.path(), &mut nodes, &mut signals).await,
        Err(e) => Err(e),
    };
    let stopped = stop(&mut nodes).await;
    let shown = dir.path().display().to_string();
    let removed = dir.close().with_context(|| format!("removing {shown}"));
    result?;
    stopped?;
    removed?;
    match output {
        Output::Json => println!("{}", json!({"event": "stopped", "dir": shown})),
        Output::Text => println!("stopped every node and removed {shown}"),
    }
    Ok(())
}

/// Ports the kernel hands out, all held at once so they differ. A port is free when this returns;
/// another process could take it before the node binds it, which the node then reports.
fn free_addrs(n: u64) -> anyhow::Result<Vec<String>> {
    let listeners = (0..n)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0").context("binding a free port"))
        .collect::<anyhow::Result<Vec<_>>>()?;
    listeners.iter().map(|l| Ok(l.local_addr().context("reading a bound port")?.to_string())).collect()
}

fn start(exe: &std::path::Path, dir: &std::path::Path, n: u64, nodes: &mut Vec<Node>) -> anyhow::Result<()> {
    let addrs = free_addrs(n)?;
    let peers = addrs.iter().enumerate().map(|(i, a)| format!("{}={a}", i + 1)).collect::<Vec<_>>().join(",");
    for (i, addr) in addrs.into_iter().enumerate() {
        let id = i as u64 + 1;
        let data_dir = dir.join(format!("node-{id}"));
        let log = dir.join(format!("node-{id}.log"));
        let out = File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        let err = out.try_clone().context("sharing the log file")?;
        let mut cmd = Command::new(exe);
        cmd.arg("server")
            .args(["--id", &id.to_string(), "--listen", &addr, "--peers", &peers])
            .arg("--data-dir")
            .arg(&data_dir)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .env("NO_COLOR", "1")
            // Its own process group: the terminal's Ctrl-C reaches us, and we stop the nodes in order.
            .process_group(0)
            .kill_on_drop(true);
        for k in SERVER_ENV {
            cmd.env_remove(k);
        }
        let child = cmd.spawn().with_context(|| format!("starting node {id} ({})", exe.display()))?;
        let pid = child.id().context("a just-started node has no pid")?;
        nodes.push(Node { id, addr, pid, log, child, exited: false });
    }
    Ok(())
}

async fn supervise(
    output: Output,
    dir: &std::path::Path,
    nodes: &mut [Node],
    signals: &mut Signals,
) -> anyhow::Result<()> {
    let brokers = nodes.iter().map(|n| n.addr.as_str()).collect::<Vec<_>>().join(",");
    match output {
        Output::Json => {
            for n in nodes.iter() {
                let data_dir = dir.join(format!("node-{}", n.id));
                let j = json!({"event": "node", "id": n.id, "pid": n.pid, "addr": n.addr,
                    "data_dir": data_dir.display().to_string(), "log": n.log.display().to_string()});
                println!("{j}");
            }
            println!("{}", json!({"event": "brokers", "brokers": brokers, "dir": dir.display().to_string()}));
        }
        Output::Text => {
            println!("busbar dev: {} node(s), data and logs in {}", nodes.len(), dir.display());
            for n in nodes.iter() {
                println!("node {}: pid {}, {}, log {}", n.id, n.pid, n.addr, n.log.display());
            }
            println!("brokers: {brokers}");
            println!("waiting for a leader...");
        }
    }
    let leader = tokio::select! {
        sig = signals.recv() => {
            eprintln!("{sig} received before the cluster formed; stopping the nodes");
            return Ok(());
        }
        r = wait_for_leader(&brokers, nodes) => r?,
    };
    match output {
        Output::Json => println!("{}", json!({"event": "ready", "leader": leader})),
        Output::Text => {
            println!("ready: node {leader} leads. In another terminal:");
            println!("  export BUSBAR_BROKERS={brokers}");
            println!("Ctrl-C stops every node and deletes {}", dir.display());
        }
    }
    loop {
        tokio::select! {
            sig = signals.recv() => {
                if output == Output::Text {
                    println!("{sig} received: stopping the nodes");
                }
                return Ok(());
            }
            _ = tokio::time::sleep(WATCH_EVERY) => {}
        }
        for n in nodes.iter_mut().filter(|n| !n.exited) {
            if let Some(status) = n.child.try_wait().with_context(|| format!("checking node {}", n.id))? {
                n.exited = true;
                report_exit(output, n, &status.to_string());
            }
        }
        if nodes.iter().all(|n| n.exited) {
            bail!("every node has exited; their logs were in {}", dir.display());
        }
    }
}

fn report_exit(output: Output, n: &Node, status: &str) {
    match output {
        Output::Json => {
            println!("{}", json!({"event": "exited", "id": n.id, "pid": n.pid, "status": status}));
        }
        Output::Text => {
            eprintln!("node {} (pid {}, {}) exited: {status}; its log: {}", n.id, n.pid, n.addr, n.log.display());
        }
    }
}

/// Waits (bounded) until every node answers and one of them leads; fails if a node exits first.
async fn wait_for_leader(brokers: &str, nodes: &mut [Node]) -> anyhow::Result<u64> {
    let opts = ClientOptions {
        connect_timeout: Duration::from_millis(500),
        request_timeout: Duration::from_secs(3),
        max_retries: 0,
        ..ClientOptions::default()
    };
    let deadline = Instant::now() + FORMATION_TIMEOUT;
    loop {
        for n in nodes.iter_mut() {
            if let Some(status) = n.child.try_wait().with_context(|| format!("checking node {}", n.id))? {
                n.exited = true;
                bail!("node {} exited while the cluster formed ({status}); see {}", n.id, n.log.display());
            }
        }
        if let Ok(client) = Client::connect_with(brokers.split(','), opts.clone()).await {
            if let Ok(st) = client.cluster_status().await {
                let all_up = st.nodes.len() == nodes.len() && st.nodes.iter().all(|s| s.reachable);
                if st.has_leader && all_up {
                    return Ok(st.leader_id);
                }
            }
        }
        if Instant::now() >= deadline {
            bail!("no leader within {FORMATION_TIMEOUT:?}; the node logs are next to the data");
        }
        tokio::time::sleep(WATCH_EVERY).await;
    }
}

/// SIGTERM to every running node, a bounded wait, then SIGKILL for any still running.
async fn stop(nodes: &mut [Node]) -> anyhow::Result<()> {
    for n in nodes.iter_mut().filter(|n| !n.exited) {
        let pid = i32::try_from(n.pid).ok().and_then(rustix::process::Pid::from_raw);
        if let Some(pid) = pid {
            // It may have just exited by itself: then there is nothing to signal.
            let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
        }
    }
    let deadline = tokio::time::Instant::now() + STOP_TIMEOUT;
    let mut forced = Vec::new();
    for n in nodes.iter_mut().filter(|n| !n.exited) {
        match tokio::time::timeout_at(deadline, n.child.wait()).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => return Err(anyhow::Error::new(e).context(format!("waiting for node {}", n.id))),
            Err(_) => {
                n.child.kill().await.with_context(|| format!("killing node {}", n.id))?;
                forced.push(n.id);
            }
        }
        n.exited = true;
    }
    if !forced.is_empty() {
        eprintln!("node(s) {forced:?} did not stop within {STOP_TIMEOUT:?} of SIGTERM and were killed");
    }
    Ok(())
}
