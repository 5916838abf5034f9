//! The operations surface (docs/operations.md): the HTTP admin port and `--auto-membership`, on
//! real nodes in this process (real gRPC, real storage, loopback ports picked by the kernel).
//!
//! - `/healthz` answers while the process is up; `/readyz` is 503 until the node is a voter that
//!   knows a leader (and, on a follower, has caught up with it), then 200.
//! - `/metrics` is valid Prometheus text and carries every series the operations runbook names.
//! - With `--auto-membership`, a node outside the initial voters joins by itself, leaves when it is
//!   stopped gracefully (also while it leads), and rejoins on restart; an initial voter never leaves;
//!   a dead voter is replaced by removing it, then starting it with an empty data dir.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::future::Future;
use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use busbar_proto::v1 as pb;
use busbar_proto::v1::busbar_client::BusbarClient;
use busbar_proto::v1::groups_client::GroupsClient;
use busbar_raft::RaftConfig;
use busbar_server::{ServerConfig, ServerHandle};
use busbar_types::NodeId;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

type Res<T> = anyhow::Result<T>;

/// Fast timing for tests: a leader is found within a second or two.
fn raft() -> RaftConfig {
    RaftConfig {
        heartbeat_ms: 100,
        election_timeout_min_ms: 500,
        election_timeout_max_ms: 1000,
        ..RaftConfig::default()
    }
}

/// Creates `topic` through the node that leads, retried until a leader takes it: on a busy machine
/// the first node to call itself leader can be deposed a moment later (TOPIC_ALREADY_EXISTS, 36,
/// means an earlier try did). Returns the leader, its address and a client connected to it.
async fn create_topic_on_a_leader(
    nodes: &BTreeMap<NodeId, Node>,
    topic: &str,
    partitions: u32,
) -> Res<(NodeId, String, BusbarClient<tonic::transport::Channel>)> {
    until("a leader that takes a write", Duration::from_secs(30), || async {
        let leader = leader_of(nodes)?;
        let addr = format!("http://{}", nodes[&leader].handle().ok()?.addr);
        let mut api = BusbarClient::connect(addr.clone()).await.ok()?;
        let created = api
            .create_topic(pb::CreateTopicRequest { name: topic.into(), partitions, config: Default::default() })
            .await;
        let code = |st: &tonic::Status| {
            st.metadata().get("busbar-error-code").and_then(|v| v.to_str().ok()).map(str::to_string)
        };
        match created {
            Ok(_) => Some((leader, addr, api)),
            Err(st) if code(&st).as_deref() == Some("36") => Some((leader, addr, api)),
            Err(_) => None,
        }
    })
    .await
}

async fn until<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> Res<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = check().await {
            return Ok(v);
        }
        if Instant::now() >= deadline {
            anyhow::bail!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A minimal HTTP/1.1 GET (status, body), bounded: enough to test our own admin port without
/// pulling an HTTP client into the dependencies.
async fn get(addr: SocketAddr, path: &str) -> Res<(u16, String)> {
    let fut = async {
        let mut s = TcpStream::connect(addr).await?;
        s.write_all(format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes()).await?;
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).await?;
        let text = String::from_utf8(buf)?;
        let (head, body) = text.split_once("\r\n\r\n").ok_or_else(|| anyhow::anyhow!("no header end in {text:?}"))?;
        let status: u16 = head
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| anyhow::anyhow!("no status in {head:?}"))?;
        anyhow::ensure!(!head.to_ascii_lowercase().contains("transfer-encoding: chunked"), "unexpected chunked body");
        Ok::<_, anyhow::Error>((status, body.to_string()))
    };
    tokio::time::timeout(Duration::from_secs(10), fut)
        .await
        .map_err(|_| anyhow::anyhow!("GET {path}: no answer in 10 s"))?
}

struct Node {
    cfg: ServerConfig,
    handle: Option<ServerHandle>,
}

impl Node {
    fn http(&self) -> Res<SocketAddr> {
        self.handle
            .as_ref()
            .and_then(|h| h.http_addr)
            .ok_or_else(|| anyhow::anyhow!("node {} not running", self.cfg.id))
    }

    fn handle(&self) -> Res<&ServerHandle> {
        self.handle.as_ref().ok_or_else(|| anyhow::anyhow!("node {} not running", self.cfg.id))
    }

    async fn start(&mut self) -> Res<()> {
        // Rebinding the same port keeps the node's advertised address across restarts.
        let l = TcpListener::bind(self.cfg.listen).await?;
        self.handle = Some(busbar_server::spawn(self.cfg.clone(), l).await?);
        Ok(())
    }

    async fn stop(&mut self) {
        if let Some(h) = self.handle.take() {
            h.stop().await;
        }
    }

    fn voters(&self) -> Res<BTreeSet<NodeId>> {
        let m = self.handle()?.node.raft.metrics().borrow().clone();
        Ok(m.membership_config.membership().voter_ids().collect())
    }
}

async fn free_addr() -> Res<SocketAddr> {
    Ok(TcpListener::bind("127.0.0.1:0").await?.local_addr()?)
}

fn config(id: NodeId, listen: SocketAddr, dir: &Path) -> ServerConfig {
    let mut cfg = ServerConfig::single_node(id, listen, dir.join(format!("node-{id}")));
    cfg.raft = raft();
    cfg.limits.write_timeout = Duration::from_secs(5);
    cfg.http = Some(SocketAddr::from(([127, 0, 0, 1], 0)));
    cfg
}

/// `n` initial voters (ids 1..=n), each told the others with `--peers`; not started.
async fn cluster(n: NodeId, dir: &Path, auto_membership: bool) -> Res<BTreeMap<NodeId, Node>> {
    let mut addrs = BTreeMap::new();
    for id in 1..=n {
        addrs.insert(id, free_addr().await?);
    }
    let peers: BTreeMap<NodeId, String> = addrs.iter().map(|(id, a)| (*id, a.to_string())).collect();
    let mut nodes = BTreeMap::new();
    for (id, a) in addrs {
        let mut cfg = config(id, a, dir);
        cfg.peers = peers.clone();
        cfg.auto_membership = auto_membership;
        nodes.insert(id, Node { cfg, handle: None });
    }
    Ok(nodes)
}

fn leader_of(nodes: &BTreeMap<NodeId, Node>) -> Option<NodeId> {
    nodes.values().filter_map(|n| n.handle.as_ref()).find_map(|h| {
        let m = h.node.raft.metrics().borrow().clone();
        (m.state == openraft::ServerState::Leader).then_some(m.id)
    })
}

async fn ready(n: &Node) -> Option<()> {
    matches!(get(n.http().ok()?, "/readyz").await, Ok((200, _))).then_some(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn readyz_is_503_without_a_leader_and_200_once_there_is_one() -> Res<()> {
    let dir = tempfile::tempdir()?;
    let mut nodes = cluster(2, dir.path(), false).await?;
    // Node 1 alone cannot win an election in a two-voter cluster: no leader while node 2 is down.
    nodes.get_mut(&1).ok_or_else(|| anyhow::anyhow!("no node 1"))?.start().await?;
    let n1 = &nodes[&1];
    let (code, body) = get(n1.http()?, "/healthz").await?;
    assert_eq!((code, body.as_str()), (200, "ok\n"));
    // Several election timeouts (500-1000 ms) pass without a leader.
    let deadline = Instant::now() + Duration::from_millis(2500);
    while Instant::now() < deadline {
        let (code, body) = get(n1.http()?, "/readyz").await?;
        assert_eq!(code, 503, "ready without a leader: {body}");
        assert!(body.starts_with("not ready: "), "{body}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    nodes.get_mut(&2).ok_or_else(|| anyhow::anyhow!("no node 2"))?.start().await?;
    for id in [1, 2] {
        let n = &nodes[&id];
        until(&format!("node {id} /readyz 200"), Duration::from_secs(30), || ready(n)).await?;
    }
    let (code, _) = get(nodes[&1].http()?, "/nope").await?;
    assert_eq!(code, 404);
    for n in nodes.values_mut() {
        n.stop().await;
    }
    Ok(())
}

/// Checks the text against the exposition format's rules that scrapers enforce: every sample
/// belongs to a family declared (HELP, TYPE) before it, a family's samples are contiguous and
/// declared once, names and labels are well-formed, values parse, a series appears once, and each
/// histogram's buckets are cumulative and end in `+Inf` equal to `_count`. Returns value by series.
fn parse_exposition(text: &str) -> Res<HashMap<String, f64>> {
    let valid_name = |s: &str| {
        !s.is_empty()
            && s.chars()
                .enumerate()
                .all(|(i, c)| c == '_' || c == ':' || c.is_ascii_alphabetic() || (i > 0 && c.is_ascii_digit()))
    };
    let mut types: HashMap<String, String> = HashMap::new();
    let mut finished: BTreeSet<String> = BTreeSet::new();
    let mut current: Option<String> = None;
    let mut series = HashMap::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# ") {
            let mut parts = rest.splitn(3, ' ');
            let (kind, name) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
            anyhow::ensure!(valid_name(name), "bad family name in {line:?}");
            if current.as_deref() != Some(name) {
                if let Some(c) = current.take() {
                    finished.insert(c);
                }
                anyhow::ensure!(!finished.contains(name), "family {name} declared twice or not contiguous");
                current = Some(name.to_string());
            }
            if kind == "TYPE" {
                let t = parts.next().unwrap_or("");
                anyhow::ensure!(["gauge", "counter", "histogram"].contains(&t), "type {t:?} in {line:?}");
                anyhow::ensure!(types.insert(name.to_string(), t.to_string()).is_none(), "two TYPE lines for {name}");
            } else {
                anyhow::ensure!(kind == "HELP", "unknown comment {line:?}");
            }
            continue;
        }
        anyhow::ensure!(!line.is_empty(), "empty line");
        let (key, value) = line.rsplit_once(' ').ok_or_else(|| anyhow::anyhow!("no value in {line:?}"))?;
        let v: f64 = value.parse().map_err(|_| anyhow::anyhow!("bad value in {line:?}"))?;
        let name = key.split('{').next().unwrap_or("");
        anyhow::ensure!(valid_name(name), "bad metric name in {line:?}");
        if let Some(labels) = key.strip_prefix(name).filter(|l| !l.is_empty()) {
            let inner = labels
                .strip_prefix('{')
                .and_then(|l| l.strip_suffix('}'))
                .ok_or_else(|| anyhow::anyhow!("bad labels in {line:?}"))?;
            for pair in inner.split("\",").map(|p| p.trim_end_matches('"')) {
                let (k, v) = pair.split_once("=\"").ok_or_else(|| anyhow::anyhow!("bad label {pair:?} in {line:?}"))?;
                anyhow::ensure!(valid_name(k) && !k.starts_with("__"), "bad label name in {line:?}");
                anyhow::ensure!(!v.contains('\n'), "raw newline in a label value");
            }
        }
        let family = current.clone().ok_or_else(|| anyhow::anyhow!("sample before any TYPE: {line:?}"))?;
        let ok = match types.get(&family).map(String::as_str) {
            Some("histogram") => [format!("{family}_bucket"), format!("{family}_sum"), format!("{family}_count")]
                .contains(&name.to_string()),
            Some(_) => name == family,
            None => false,
        };
        anyhow::ensure!(ok, "sample {name} outside its family (current {family})");
        anyhow::ensure!(series.insert(key.to_string(), v).is_none(), "series {key} appears twice");
    }
    for (family, t) in &types {
        if t != "histogram" {
            continue;
        }
        let mut buckets: Vec<(f64, f64)> = series
            .iter()
            .filter_map(|(k, v)| {
                let le = k.strip_prefix(&format!("{family}_bucket{{le=\""))?.strip_suffix("\"}")?;
                Some((if le == "+Inf" { f64::INFINITY } else { le.parse().ok()? }, *v))
            })
            .collect();
        buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
        anyhow::ensure!(buckets.last().map(|b| b.0) == Some(f64::INFINITY), "{family}: no +Inf bucket");
        anyhow::ensure!(buckets.windows(2).all(|w| w[0].1 <= w[1].1), "{family}: buckets not cumulative");
        let count = series.get(&format!("{family}_count")).copied();
        anyhow::ensure!(count == buckets.last().map(|b| b.1), "{family}: _count differs from the +Inf bucket");
    }
    Ok(series)
}

fn value(series: &HashMap<String, f64>, key: &str) -> Res<f64> {
    series.get(key).copied().ok_or_else(|| {
        let mut keys: Vec<&String> = series.keys().collect();
        keys.sort();
        anyhow::anyhow!("no series {key}; have {keys:?}")
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn metrics_carry_raft_requests_partitions_groups_and_storage() -> Res<()> {
    let dir = tempfile::tempdir()?;
    let mut nodes = cluster(3, dir.path(), false).await?;
    for n in nodes.values_mut() {
        // Small, so this test sees a snapshot taken.
        n.cfg.raft.snapshot_every = 10;
        n.cfg.raft.logs_to_keep = 5;
        n.start().await?;
    }
    let (leader, addr, mut api) = create_topic_on_a_leader(&nodes, "orders", 2).await?;
    let follower = *nodes.keys().find(|id| **id != leader).ok_or_else(|| anyhow::anyhow!("no follower"))?;
    for i in 0..20u32 {
        let rec = pb::Record { value: format!("v{i}").into_bytes().into(), ..Default::default() };
        api.produce(pb::ProduceRequest {
            topic: "orders".into(),
            partition: Some(i % 2),
            records: vec![rec],
            ..Default::default()
        })
        .await?;
    }
    api.fetch(pb::FetchRequest {
        topic: "orders".into(),
        partition: 0,
        offset: 0,
        max_records: 100,
        ..Default::default()
    })
    .await?;
    let mut groups = GroupsClient::connect(addr).await?;
    let joined = groups
        .join_group(pb::JoinGroupRequest {
            group: "billing".into(),
            member_id: String::new(),
            topics: vec!["orders".into()],
            session_timeout_ms: 30_000,
        })
        .await?
        .into_inner();
    groups
        .commit_offsets(pb::CommitOffsetsRequest {
            group: "billing".into(),
            member_id: joined.member_id,
            generation: joined.generation,
            offsets: vec![pb::OffsetCommit { topic: "orders".into(), partition: 0, offset: 4 }],
        })
        .await?;

    // The follower applies what the leader committed; its series say so too.
    let f_http = nodes[&follower].http()?;
    let fs = until("the follower's metrics to show the group commit", Duration::from_secs(30), || async {
        let (code, text) = get(f_http, "/metrics").await.ok()?;
        let s = parse_exposition(&text).ok()?;
        (code == 200
            && s.contains_key(r#"busbar_group_committed_offset{group="billing",topic="orders",partition="0"}"#))
        .then_some(s)
    })
    .await?;
    assert_eq!(value(&fs, r#"busbar_raft_state{state="follower"}"#)?, 1.0);
    assert_eq!(value(&fs, "busbar_raft_leader_id")?, leader as f64);

    let (code, text) = get(nodes[&leader].http()?, "/metrics").await?;
    assert_eq!(code, 200);
    let s = parse_exposition(&text)?;
    assert_eq!(value(&s, "busbar_node_id")?, leader as f64);
    assert_eq!(value(&s, r#"busbar_raft_state{state="leader"}"#)?, 1.0);
    assert_eq!(value(&s, r#"busbar_raft_state{state="follower"}"#)?, 0.0);
    assert_eq!(value(&s, "busbar_raft_leader_id")?, leader as f64);
    assert!(value(&s, "busbar_raft_term")? >= 1.0);
    assert_eq!(value(&s, "busbar_raft_voters")?, 3.0);
    assert_eq!(value(&s, "busbar_raft_is_voter")?, 1.0);
    let last = value(&s, "busbar_raft_last_log_index")?;
    let applied = value(&s, "busbar_raft_applied_index")?;
    let commit = value(&s, "busbar_raft_commit_index")?;
    assert!(applied <= commit && commit <= last && last >= 22.0, "applied {applied} commit {commit} last {last}");
    assert!(value(&s, "busbar_raft_snapshot_index")? >= 10.0);
    for f in nodes.keys().filter(|id| **id != leader) {
        let lag = value(&s, &format!(r#"busbar_raft_replication_lag_entries{{follower="{f}"}}"#))?;
        assert!(lag <= last, "lag {lag}");
        value(&s, &format!(r#"busbar_raft_replication_matched_index{{follower="{f}"}}"#))?;
    }
    assert!(value(&s, "busbar_raft_millis_since_quorum_ack")? < 10_000.0);
    // Counters are per process: this test's three nodes share them.
    assert!(value(&s, "busbar_produce_request_duration_seconds_count")? >= 20.0);
    assert!(value(&s, "busbar_fetch_request_duration_seconds_count")? >= 1.0);
    assert!(value(&s, r#"busbar_produce_request_duration_seconds_bucket{le="+Inf"}"#)? >= 20.0);
    assert!(value(&s, "busbar_produce_request_duration_seconds_sum")? > 0.0);
    assert_eq!(value(&s, "busbar_topics")?, 1.0);
    assert_eq!(value(&s, "busbar_partitions")?, 2.0);
    for p in 0..2 {
        assert_eq!(value(&s, &format!(r#"busbar_partition_start_offset{{topic="orders",partition="{p}"}}"#))?, 0.0);
        assert_eq!(value(&s, &format!(r#"busbar_partition_end_offset{{topic="orders",partition="{p}"}}"#))?, 10.0);
    }
    assert_eq!(value(&s, r#"busbar_group_committed_offset{group="billing",topic="orders",partition="0"}"#)?, 4.0);
    assert_eq!(value(&s, r#"busbar_group_lag{group="billing",topic="orders",partition="0"}"#)?, 6.0);
    // Partition 1 has no commit yet: a lag of everything, no committed series.
    assert_eq!(value(&s, r#"busbar_group_lag{group="billing",topic="orders",partition="1"}"#)?, 10.0);
    assert!(!s.contains_key(r#"busbar_group_committed_offset{group="billing",topic="orders",partition="1"}"#));
    assert_eq!(value(&s, r#"busbar_group_members{group="billing"}"#)?, 1.0);
    assert!(value(&s, r#"busbar_storage_bytes{kind="raft_log"}"#)? > 0.0);
    assert!(value(&s, r#"busbar_storage_bytes{kind="state"}"#)? > 0.0);
    assert!(value(&s, r#"busbar_storage_bytes{kind="snapshots"}"#)? > 0.0);
    let batch_bytes = value(&s, r#"busbar_batch_file_bytes{kind="all"}"#)?;
    assert!(batch_bytes > 0.0 && value(&s, r#"busbar_batch_file_bytes{kind="live"}"#)? == batch_bytes);
    assert_eq!(value(&s, "busbar_compaction_freed_bytes_total")?, 0.0);
    assert_eq!(value(&s, r#"busbar_metrics_series_capped{family="partition"}"#)?, 0.0);
    assert_eq!(value(&s, r#"busbar_metrics_series_capped{family="group"}"#)?, 0.0);
    assert_eq!(value(&s, "busbar_metrics_render_errors")?, 0.0);
    for n in nodes.values_mut() {
        n.stop().await;
    }
    Ok(())
}

async fn wait_voters(nodes: &BTreeMap<NodeId, Node>, on: NodeId, want: &[NodeId]) -> Res<()> {
    let want: BTreeSet<NodeId> = want.iter().copied().collect();
    let n = &nodes[&on];
    until(&format!("node {on} to see voters {want:?}"), Duration::from_secs(60), || async {
        let m = n.handle().ok()?.node.raft.metrics().borrow().clone();
        let joint = m.membership_config.membership().get_joint_config().len() > 1;
        (!joint && n.voters().ok()? == want).then_some(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn auto_membership_joins_leaves_on_graceful_stop_and_rejoins() -> Res<()> {
    let dir = tempfile::tempdir()?;
    let mut nodes = cluster(3, dir.path(), true).await?;
    for n in nodes.values_mut() {
        n.start().await?;
    }
    until("a leader", Duration::from_secs(30), || async { leader_of(&nodes) }).await?;
    // Node 4 is told only the initial voters' addresses, as a StatefulSet pod past the initial
    // replicas is (cli.rs turns `--peers` without this id into this config).
    let joins: Vec<String> = nodes.values().map(|n| n.cfg.listen.to_string()).collect();
    let mut cfg4 = config(4, free_addr().await?, dir.path());
    cfg4.peers = BTreeMap::new();
    cfg4.join = Some(joins.join(","));
    cfg4.auto_membership = true;
    nodes.insert(4, Node { cfg: cfg4, handle: None });
    nodes.get_mut(&4).ok_or_else(|| anyhow::anyhow!("no node 4"))?.start().await?;
    wait_voters(&nodes, 1, &[1, 2, 3, 4]).await?;
    let n4 = &nodes[&4];
    until("node 4 /readyz 200", Duration::from_secs(30), || ready(n4)).await?;

    // A graceful stop of a joined node leaves first: the membership shrinks before it is gone.
    nodes.get_mut(&4).ok_or_else(|| anyhow::anyhow!("no node 4"))?.stop().await;
    wait_voters(&nodes, 1, &[1, 2, 3]).await?;

    // Restarted with its data, it rejoins by itself.
    nodes.get_mut(&4).ok_or_else(|| anyhow::anyhow!("no node 4"))?.start().await?;
    wait_voters(&nodes, 1, &[1, 2, 3, 4]).await?;

    // Leaving while leading: node 4 takes the lead, then stops; the others elect a leader and the
    // membership is back to the initial voters.
    let raft4 = nodes[&4].handle()?.node.raft.clone();
    // Taking the lead is an election node 4 starts. Its first tries are refused while the others
    // hold the leader's lease, but its higher term deposes that leader. If nodes 1-3 were free to
    // elect meanwhile, one of them could win at a lower term with node 4 refusing its entries:
    // node 4's log then falls behind and it can never win, and each of its retries deposes the
    // next leader (this livelock failed the test for a minute at a time on a loaded machine).
    // So nodes 1-3 do not start elections until node 4 leads, once node 4 holds every entry they
    // hold (nothing is written meanwhile: no leader among them appends a blank entry either).
    let initial: Vec<_> =
        [1, 2, 3].iter().map(|id| nodes[id].handle().map(|h| h.node.raft.clone())).collect::<Result<_, _>>()?;
    until("node 4 to hold every entry", Duration::from_secs(30), || {
        let newest = initial.iter().map(|r| r.metrics().borrow().last_log_index).max().flatten();
        let held = raft4.metrics().borrow().last_log_index;
        async move { (held >= newest).then_some(()) }
    })
    .await?;
    for raft in &initial {
        raft.runtime_config().elect(false);
    }
    until("node 4 to lead", Duration::from_secs(30), || {
        let raft4 = raft4.clone();
        async move {
            if raft4.metrics().borrow().state == openraft::ServerState::Leader {
                return Some(());
            }
            let _ = raft4.trigger().elect().await;
            tokio::time::sleep(Duration::from_millis(500)).await;
            None
        }
    })
    .await?;
    for raft in &initial {
        raft.runtime_config().elect(true);
    }
    nodes.get_mut(&4).ok_or_else(|| anyhow::anyhow!("no node 4"))?.stop().await;
    wait_voters(&nodes, 1, &[1, 2, 3]).await?;
    let rest: BTreeMap<NodeId, Node> = nodes.into_iter().filter(|(id, _)| *id != 4).collect();
    let mut nodes = rest;
    until("a leader among 1-3", Duration::from_secs(30), || async { leader_of(&nodes) }).await?;

    // An initial voter stopped gracefully stays a member (a restart must not shrink the core).
    nodes.get_mut(&2).ok_or_else(|| anyhow::anyhow!("no node 2"))?.stop().await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    wait_voters(&nodes, 1, &[1, 2, 3]).await?;
    nodes.get_mut(&2).ok_or_else(|| anyhow::anyhow!("no node 2"))?.start().await?;
    let n2 = &nodes[&2];
    until("node 2 /readyz 200 after its restart", Duration::from_secs(30), || ready(n2)).await?;
    for n in nodes.values_mut() {
        n.stop().await;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_dead_voter_is_replaced_by_removing_it_then_starting_it_empty() -> Res<()> {
    let dir = tempfile::tempdir()?;
    let mut nodes = cluster(3, dir.path(), true).await?;
    for n in nodes.values_mut() {
        n.start().await?;
    }
    let (leader, addr, mut api) = create_topic_on_a_leader(&nodes, "t", 1).await?;
    let records = (0..5).map(|i| pb::Record { value: vec![i].into(), ..Default::default() }).collect();
    api.produce(pb::ProduceRequest { topic: "t".into(), partition: Some(0), records, ..Default::default() }).await?;

    // A follower's disk dies: the process is gone and its data with it.
    let victim = *nodes.keys().find(|id| **id != leader).ok_or_else(|| anyhow::anyhow!("no follower"))?;
    let v = nodes.get_mut(&victim).ok_or_else(|| anyhow::anyhow!("no node {victim}"))?;
    if let Some(h) = v.handle.take() {
        h.crash().await;
    }
    std::fs::remove_dir_all(&v.cfg.data_dir)?;
    // The runbook: remove it first...
    let mut cluster_api = busbar_proto::v1::cluster_client::ClusterClient::connect(addr).await?;
    cluster_api.remove_node(pb::RemoveNodeRequest { id: victim }).await?;
    let rest: Vec<NodeId> = nodes.keys().copied().filter(|id| *id != victim).collect();
    wait_voters(&nodes, leader, &rest).await?;
    // ...then start it empty: it asks to be added, catches up and votes again.
    nodes.get_mut(&victim).ok_or_else(|| anyhow::anyhow!("no node {victim}"))?.start().await?;
    wait_voters(&nodes, leader, &[1, 2, 3]).await?;
    let n = &nodes[&victim];
    until("the replaced node to hold the records", Duration::from_secs(30), || async {
        let offsets = n.handle().ok()?.node.store.partition_offsets("t").ok()?;
        (offsets.first()?.end_offset == 5).then_some(())
    })
    .await?;
    until("the replaced node /readyz 200", Duration::from_secs(30), || ready(n)).await?;
    for n in nodes.values_mut() {
        n.stop().await;
    }
    Ok(())
}
