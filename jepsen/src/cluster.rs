//! The cluster under test: busbar containers on a private docker bridge network with fixed IPs,
//! each with its data dir bind-mounted from the results dir. Every docker call is bounded.
//!
//! Clients run on the host and reach the nodes by their bridge IPs; every node advertises its IP,
//! so leader redirects work from the host. Network faults are iptables rules inside each
//! container's network namespace (entered from the host with `nsenter`), dropping only traffic
//! between nodes: the host still reaches every node, as a client outside the partition would.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use tokio::process::Command;

/// Bound on one ordinary docker (or nsenter) call.
const DOCKER_TIMEOUT: Duration = Duration::from_secs(60);
/// The uid the image runs as: the data dirs belong to it.
const NODE_UID: u32 = 65532;
/// The gRPC port inside every container.
pub const PORT: u16 = 9501;

/// Settings of every node, lowered from production values so that faults show quickly and log
/// compaction, snapshot transfer and catch-up happen many times in a short run.
#[derive(Clone, Debug)]
pub struct NodeSettings {
    pub image: String,
    pub snapshot_every: u64,
    pub logs_to_keep: u64,
}

#[derive(Clone, Debug)]
pub struct Node {
    pub id: u64,
    pub ip: String,
    pub container: String,
    pub data_dir: PathBuf,
}

impl Node {
    pub fn addr(&self) -> String {
        format!("{}:{PORT}", self.ip)
    }

    pub fn name(&self) -> String {
        format!("n{}", self.id)
    }
}

/// Runs a command with a bound; returns stdout, or an error with stderr.
pub async fn run_cmd(program: &str, args: &[&str], timeout: Duration) -> anyhow::Result<String> {
    let mut cmd = Command::new(program);
    cmd.args(args).stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).kill_on_drop(true);
    let out = tokio::time::timeout(timeout, cmd.output())
        .await
        .map_err(|_| anyhow!("{program} {} timed out after {timeout:?}", args.join(" ")))?
        .with_context(|| format!("running {program}"))?;
    if !out.status.success() {
        bail!("{program} {} failed ({}): {}", args.join(" "), out.status, String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

pub async fn docker(args: &[&str]) -> anyhow::Result<String> {
    run_cmd("docker", args, DOCKER_TIMEOUT).await
}

/// The containers and network of one run, and the ids it has used.
pub struct Cluster {
    pub run_id: String,
    pub network: String,
    /// The first three octets of the network's /24, e.g. "10.231.7".
    subnet_prefix: String,
    settings: NodeSettings,
    data_root: PathBuf,
    /// Every node ever started, by id (removed ones stay, for logs and cleanup).
    pub nodes: BTreeMap<u64, Node>,
    /// Ids in the membership, as far as the harness changed it.
    pub members: Vec<u64>,
    next_id: u64,
}

impl Cluster {
    /// Creates the network (trying a few /24 subnets until docker accepts one).
    pub async fn create(run_id: &str, data_root: &Path, settings: NodeSettings) -> anyhow::Result<Self> {
        let network = format!("{run_id}-net");
        let seed = u64::from(std::process::id()) ^ crate::rng::time_seed();
        let mut last = None;
        for i in 0..16u64 {
            let x = (seed.wrapping_add(i.wrapping_mul(7919))) % (56 * 256);
            let prefix = format!("10.{}.{}", 200 + x / 256, x % 256);
            let subnet = format!("{prefix}.0/24");
            match docker(&[
                "network",
                "create",
                "--driver",
                "bridge",
                "--subnet",
                &subnet,
                "--label",
                &label(run_id),
                &network,
            ])
            .await
            {
                Ok(_) => {
                    return Ok(Self {
                        run_id: run_id.to_string(),
                        network,
                        subnet_prefix: prefix,
                        settings,
                        data_root: data_root.to_path_buf(),
                        nodes: BTreeMap::new(),
                        members: Vec::new(),
                        next_id: 1,
                    })
                }
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| anyhow!("no subnet tried")))
    }

    fn new_node(&mut self) -> anyhow::Result<Node> {
        let id = self.next_id;
        self.next_id += 1;
        if id > 200 {
            bail!("ran out of node ids (more than 200 nodes in one run)");
        }
        let data_dir = self.data_root.join(format!("n{id}"));
        std::fs::create_dir_all(&data_dir)?;
        std::os::unix::fs::chown(&data_dir, Some(NODE_UID), Some(NODE_UID))
            .with_context(|| format!("chown {}", data_dir.display()))?;
        let node = Node {
            id,
            ip: format!("{}.{}", self.subnet_prefix, 10 + id),
            container: format!("{}-n{id}", self.run_id),
            data_dir,
        };
        self.nodes.insert(id, node.clone());
        Ok(node)
    }

    /// Starts the initial `n` voters (ids 1..=n).
    pub async fn start_initial(&mut self, n: usize) -> anyhow::Result<()> {
        let nodes: Vec<Node> = (0..n).map(|_| self.new_node()).collect::<anyhow::Result<_>>()?;
        let peers = peers_env(&nodes);
        for node in &nodes {
            self.run_container(node, &peers).await?;
            self.members.push(node.id);
        }
        Ok(())
    }

    /// A fresh node with a new id and an empty data dir that joins through the current members
    /// (`--auto-membership` with an id outside `--peers`).
    pub async fn start_fresh(&mut self) -> anyhow::Result<Node> {
        let via: Vec<Node> = self.members.iter().filter_map(|id| self.nodes.get(id).cloned()).collect();
        let node = self.new_node()?;
        self.run_container(&node, &peers_env(&via)).await?;
        self.members.push(node.id);
        Ok(node)
    }

    async fn run_container(&self, node: &Node, peers: &str) -> anyhow::Result<()> {
        let s = &self.settings;
        let env = [
            format!("BUSBAR_ID={}", node.id),
            format!("BUSBAR_PEERS={peers}"),
            format!("BUSBAR_ADVERTISE={}", node.addr()),
            "BUSBAR_AUTO_MEMBERSHIP=true".to_string(),
            "BUSBAR_LISTEN=0.0.0.0:9501".to_string(),
            "BUSBAR_HTTP=0.0.0.0:9601".to_string(),
            "BUSBAR_DATA_DIR=/data".to_string(),
            // Plain text logs (no colour codes) in `docker logs` and the results.
            "NO_COLOR=1".to_string(),
            "BUSBAR_HEARTBEAT_MS=200".to_string(),
            "BUSBAR_ELECTION_TIMEOUT_MIN_MS=1000".to_string(),
            "BUSBAR_ELECTION_TIMEOUT_MAX_MS=2000".to_string(),
            "BUSBAR_WRITE_TIMEOUT_MS=5000".to_string(),
            format!("BUSBAR_SNAPSHOT_EVERY={}", s.snapshot_every),
            format!("BUSBAR_LOGS_TO_KEEP={}", s.logs_to_keep),
        ];
        let volume = format!("{}:/data", node.data_dir.display());
        let hostname = node.name();
        let lbl = label(&self.run_id);
        let mut args: Vec<&str> = vec![
            "run",
            "-d",
            "--name",
            &node.container,
            "--hostname",
            &hostname,
            "--network",
            &self.network,
            "--ip",
            &node.ip,
            "--label",
            &lbl,
            "-v",
            &volume,
        ];
        for e in &env {
            args.push("-e");
            args.push(e);
        }
        args.push(&s.image);
        docker(&args).await.with_context(|| format!("starting {}", node.container))?;
        Ok(())
    }

    /// Nodes in the membership, in id order.
    pub fn member_nodes(&self) -> Vec<Node> {
        self.members.iter().filter_map(|id| self.nodes.get(id).cloned()).collect()
    }

    pub fn member_addrs(&self) -> Vec<String> {
        self.member_nodes().iter().map(Node::addr).collect()
    }

    /// Removes a node from the harness's view of the membership (after the cluster removed it).
    pub fn forget_member(&mut self, id: u64) {
        self.members.retain(|m| *m != id);
    }

    /// Every container and the network of this run, and every rule the partition nemesis left.
    pub async fn destroy(&self) {
        for node in self.nodes.values() {
            let _ = docker(&["rm", "-f", "-v", &node.container]).await;
        }
        let _ = docker(&["network", "rm", &self.network]).await;
    }

    /// Writes `docker logs` of every node ever started into `dir/<container>.log`.
    pub async fn save_logs(&self, dir: &Path) {
        for node in self.nodes.values() {
            let path = dir.join(format!("n{}.log", node.id));
            let mut cmd = Command::new("docker");
            cmd.args(["logs", "--timestamps", &node.container]).stdin(Stdio::null()).kill_on_drop(true);
            match tokio::time::timeout(DOCKER_TIMEOUT, cmd.output()).await {
                Ok(Ok(out)) => {
                    let mut text = out.stdout;
                    text.extend_from_slice(&out.stderr);
                    let _ = std::fs::write(&path, text);
                }
                Ok(Err(e)) => eprintln!("docker logs {}: {e}", node.container),
                Err(_) => eprintln!("docker logs {}: timed out", node.container),
            }
        }
    }
}

pub fn label(run_id: &str) -> String {
    format!("busbar-jepsen={run_id}")
}

fn peers_env(nodes: &[Node]) -> String {
    nodes.iter().map(|n| format!("{}={}", n.id, n.addr())).collect::<Vec<_>>().join(",")
}

/// SIGKILL.
pub async fn kill(node: &Node) -> anyhow::Result<()> {
    docker(&["kill", "-s", "KILL", &node.container]).await.map(|_| ())
}

pub async fn start(node: &Node) -> anyhow::Result<()> {
    docker(&["start", &node.container]).await.map(|_| ())
}

pub async fn pause(node: &Node) -> anyhow::Result<()> {
    docker(&["pause", &node.container]).await.map(|_| ())
}

pub async fn unpause(node: &Node) -> anyhow::Result<()> {
    docker(&["unpause", &node.container]).await.map(|_| ())
}

pub async fn remove(node: &Node) -> anyhow::Result<()> {
    docker(&["rm", "-f", "-v", &node.container]).await.map(|_| ())
}

/// "running", "paused", "exited", ... or "missing".
pub async fn state(node: &Node) -> String {
    match docker(&["inspect", "-f", "{{.State.Status}}", &node.container]).await {
        Ok(s) => s.trim().to_string(),
        Err(_) => "missing".to_string(),
    }
}

/// The exit code of a stopped container.
pub async fn exit_code(node: &Node) -> Option<i64> {
    docker(&["inspect", "-f", "{{.State.ExitCode}}", &node.container]).await.ok()?.trim().parse().ok()
}

/// The last lines of a node's log.
pub async fn log_tail(node: &Node, lines: usize) -> String {
    let n = lines.to_string();
    let mut cmd = Command::new("docker");
    cmd.args(["logs", "--tail", &n, &node.container]).stdin(Stdio::null()).kill_on_drop(true);
    match tokio::time::timeout(DOCKER_TIMEOUT, cmd.output()).await {
        Ok(Ok(out)) => {
            let mut s = String::from_utf8_lossy(&out.stdout).into_owned();
            s.push_str(&String::from_utf8_lossy(&out.stderr));
            strip_ansi(&s)
        }
        _ => String::new(),
    }
}

async fn pid(node: &Node) -> anyhow::Result<String> {
    let pid = docker(&["inspect", "-f", "{{.State.Pid}}", &node.container]).await?.trim().to_string();
    if pid.is_empty() || pid == "0" {
        bail!("{} is not running", node.container);
    }
    Ok(pid)
}

/// Drops every packet from `peers` (node IPs) arriving at `node`. Applied on both sides, this
/// cuts the links both ways; traffic with the host (clients) is untouched.
pub async fn drop_from(node: &Node, peers: &[String]) -> anyhow::Result<()> {
    let pid = pid(node).await?;
    for ip in peers {
        run_cmd(
            "nsenter",
            &["-t", &pid, "-n", "iptables", "-w", "5", "-A", "INPUT", "-s", ip, "-j", "DROP"],
            DOCKER_TIMEOUT,
        )
        .await?;
    }
    Ok(())
}

/// Removes every rule `drop_from` added. A stopped container has no namespace, hence no rules.
pub async fn heal_network(node: &Node) -> anyhow::Result<()> {
    let Ok(pid) = pid(node).await else { return Ok(()) };
    run_cmd("nsenter", &["-t", &pid, "-n", "iptables", "-w", "5", "-F", "INPUT"], DOCKER_TIMEOUT).await.map(|_| ())
}

/// Checks that docker, nsenter and iptables work here, before a run depends on them.
pub async fn preflight(image: &str) -> anyhow::Result<()> {
    docker(&["info", "--format", "{{.ServerVersion}}"]).await.context("the docker engine does not answer")?;
    docker(&["image", "inspect", "-f", "{{.Id}}", image])
        .await
        .with_context(|| format!("image {image} not found (build it: bash scripts/build-image.sh)"))?;
    for tool in ["nsenter", "iptables"] {
        run_cmd("sh", &["-c", &format!("command -v {tool}")], Duration::from_secs(5))
            .await
            .with_context(|| format!("{tool} not found (bash scripts/setup.sh installs it)"))?;
    }
    Ok(())
}

/// Removes terminal colour sequences (ESC [ ... letter).
fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' && chars.peek() == Some(&'[') {
            for d in chars.by_ref() {
                if d.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}
