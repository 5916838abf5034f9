//! Consumer groups through the raw `busbar.v1.Groups` API: members are simulated by the test
//! (join, heartbeat with the generation they applied, commit), so every step is observable.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use busbar_client::Record;
use busbar_proto::v1 as pb;
use busbar_proto::v1::groups_client::GroupsClient;
use busbar_tests::inprocess::InProcessCluster;
use tonic::transport::Channel;

type Tp = (String, u32);

async fn groups(c: &InProcessCluster) -> anyhow::Result<GroupsClient<Channel>> {
    let leader = c.leader().await?;
    Ok(GroupsClient::connect(format!("http://{}", c.addr(leader))).await?)
}

fn code(st: &tonic::Status) -> Option<i32> {
    st.metadata().get(busbar_proto::ERROR_CODE_KEY)?.to_str().ok()?.parse().ok()
}

fn set(list: &[pb::TopicPartition]) -> BTreeSet<Tp> {
    list.iter().map(|tp| (tp.topic.clone(), tp.partition)).collect()
}

/// A member as the test drives it: revokes at once (nothing to commit) and acknowledges.
struct Member {
    id: String,
    generation: u64,
    assigned: BTreeSet<Tp>,
}

async fn join(g: &mut GroupsClient<Channel>, group: &str, session_ms: u32) -> anyhow::Result<Member> {
    let r = g
        .join_group(pb::JoinGroupRequest {
            group: group.into(),
            member_id: String::new(),
            topics: vec!["t".into()],
            session_timeout_ms: session_ms,
        })
        .await?
        .into_inner();
    Ok(Member { id: r.member_id, generation: r.generation, assigned: set(&r.assigned) })
}

async fn heartbeat(g: &mut GroupsClient<Channel>, group: &str, m: &mut Member) -> Result<bool, tonic::Status> {
    let r = g
        .heartbeat(pb::HeartbeatRequest { group: group.into(), member_id: m.id.clone(), generation: m.generation })
        .await?
        .into_inner();
    m.generation = r.generation;
    m.assigned = set(&r.assigned);
    Ok(r.rebalancing)
}

/// Heartbeats every member until the group is stable (no rebalance in progress), checking after every
/// round that no member lost a partition other than those in `may_lose`.
async fn settle(
    g: &mut GroupsClient<Channel>,
    group: &str,
    members: &mut [Member],
    may_lose: &BTreeSet<Tp>,
) -> anyhow::Result<()> {
    for _ in 0..100 {
        let mut rebalancing = false;
        for m in members.iter_mut() {
            let before = m.assigned.clone();
            rebalancing |= heartbeat(g, group, m).await?;
            let lost: BTreeSet<Tp> = before.difference(&m.assigned).cloned().collect();
            anyhow::ensure!(lost.is_subset(may_lose), "member {} lost {lost:?}, which did not have to move", m.id);
        }
        if !rebalancing {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    anyhow::bail!("the group did not settle")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cooperative_rebalance_moves_only_what_must_move_and_expired_members_are_replaced() -> anyhow::Result<()> {
    let c = InProcessCluster::start(3).await?;
    let client = c.client().await?;
    client.create_topic("t", 6).await?;
    let mut g = groups(&c).await?;

    let mut members = Vec::new();
    for _ in 0..3 {
        members.push(join(&mut g, "email", 10_000).await?);
        settle(&mut g, "email", &mut members, &(0..6).map(|p| ("t".to_string(), p)).collect()).await?;
    }
    for m in &members {
        assert_eq!(m.assigned.len(), 2, "three members share six partitions two each: {:?}", m.assigned);
    }
    let before: Vec<BTreeSet<Tp>> = members.iter().map(|m| m.assigned.clone()).collect();

    // A fourth joins: exactly one partition moves (6 over 4 is 2,2,1,1); nobody else loses anything.
    members.push(join(&mut g, "email", 2_000).await?);
    let all: BTreeSet<Tp> = before.iter().flatten().cloned().collect();
    // Any one of them may be the one that moves, but only one may: checked below.
    settle(&mut g, "email", &mut members, &all).await?;
    let lost: usize = before.iter().zip(&members).map(|(b, m)| b.difference(&m.assigned).count()).sum();
    assert_eq!(lost, 1, "only the partition the new member gets moves");
    assert_eq!(members[3].assigned.len(), 1);
    let owned: Vec<Tp> = members.iter().flat_map(|m| m.assigned.iter().cloned()).collect();
    assert_eq!(owned.len(), 6);
    assert_eq!(owned.iter().collect::<BTreeSet<_>>().len(), 6, "no partition owned twice");

    // The fourth stops heartbeating: after its 2 s session it is removed and its partition goes to
    // one of the others; nothing is left unowned.
    let dead = members.pop().map(|m| m.id).unwrap_or_default();
    let mut desc = pb::DescribeGroupResponse::default();
    for _ in 0..100 {
        settle(&mut g, "email", &mut members, &BTreeSet::new()).await?;
        desc = g.describe_group(pb::DescribeGroupRequest { group: "email".into() }).await?.into_inner();
        if !desc.members.iter().any(|m| m.member_id == dead) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(!desc.members.iter().any(|m| m.member_id == dead), "the silent member was not removed");
    settle(&mut g, "email", &mut members, &BTreeSet::new()).await?;
    let owned: BTreeSet<Tp> = members.iter().flat_map(|m| m.assigned.iter().cloned()).collect();
    assert_eq!(owned.len(), 6, "every partition has an owner again");
    c.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn commits_are_fenced_survive_a_leader_crash_and_lag_adds_up() -> anyhow::Result<()> {
    let mut c = InProcessCluster::start(3).await?;
    let client = c.client().await?;
    client.create_topic("t", 2).await?;
    for i in 0..10 {
        client.produce("t", i % 2, vec![Record::value(format!("r{i}"))]).await?;
    }
    let mut g = groups(&c).await?;
    let mut m = join(&mut g, "analytics", 10_000).await?;
    settle(&mut g, "analytics", std::slice::from_mut(&mut m), &BTreeSet::new()).await?;
    assert_eq!(m.assigned.len(), 2);

    let commit = |generation: u64, member: String, p: u32, offset: u64| pb::CommitOffsetsRequest {
        group: "analytics".into(),
        member_id: member,
        generation,
        offsets: vec![pb::OffsetCommit { topic: "t".into(), partition: p, offset }],
    };
    g.commit_offsets(commit(m.generation, m.id.clone(), 0, 3)).await?;
    g.commit_offsets(commit(m.generation, m.id.clone(), 1, 5)).await?;
    // Fencing: a stale generation (22), an unknown member (25), an offset beyond the end (1).
    let stale = g.commit_offsets(commit(m.generation - 1, m.id.clone(), 0, 4)).await.err();
    assert_eq!(stale.as_ref().and_then(code), Some(22), "{stale:?}");
    let unknown = g.commit_offsets(commit(m.generation, "nobody".into(), 0, 4)).await.err();
    assert_eq!(unknown.as_ref().and_then(code), Some(25), "{unknown:?}");
    let beyond = g.commit_offsets(commit(m.generation, m.id.clone(), 0, 99)).await.err();
    assert_eq!(beyond.as_ref().and_then(code), Some(1), "{beyond:?}");

    // Lag = end - committed: partition 0 has 5 records, committed 3; partition 1 has 5, committed 5.
    let d = g.describe_group(pb::DescribeGroupRequest { group: "analytics".into() }).await?.into_inner();
    let lag: BTreeMap<u32, (u64, u64)> = d.partitions.iter().map(|p| (p.partition, (p.committed, p.lag))).collect();
    assert_eq!(lag[&0], (3, 2));
    assert_eq!(lag[&1], (5, 0));

    // Kill -9 the leader: the committed offsets are there on the new one, never older.
    let old = c.leader().await?;
    c.crash(old).await?;
    let mut g = groups(&c).await?;
    let d = g.describe_group(pb::DescribeGroupRequest { group: "analytics".into() }).await?.into_inner();
    let committed: BTreeMap<u32, u64> = d.partitions.iter().map(|p| (p.partition, p.committed)).collect();
    assert_eq!(committed, BTreeMap::from([(0, 3), (1, 5)]));
    // The member resumes with the new coordinator (a full session of grace, no rejoin needed).
    settle(&mut g, "analytics", std::slice::from_mut(&mut m), &BTreeSet::new()).await?;
    g.commit_offsets(commit(m.generation, m.id.clone(), 0, 4)).await?;

    // A reset while the group is active is refused (68); after the member leaves it works.
    let reset = |to| pb::ResetOffsetsRequest { group: "analytics".into(), topic: "t".into(), to: Some(to) };
    let active = g.reset_offsets(reset(pb::reset_offsets_request::To::Earliest(true))).await.err();
    assert_eq!(active.as_ref().and_then(code), Some(68), "{active:?}");
    g.leave_group(pb::LeaveGroupRequest { group: "analytics".into(), member_id: m.id.clone() }).await?;
    g.reset_offsets(reset(pb::reset_offsets_request::To::Earliest(true))).await?;
    let d = g.describe_group(pb::DescribeGroupRequest { group: "analytics".into() }).await?.into_inner();
    assert!(d.partitions.iter().all(|p| p.has_committed && p.committed == 0 && p.lag == 5), "{:?}", d.partitions);
    let listed = g.list_groups(pb::ListGroupsRequest {}).await?.into_inner().groups;
    assert_eq!(listed, vec!["analytics".to_string()]);
    g.delete_group(pb::DeleteGroupRequest { group: "analytics".into() }).await?;
    let gone = g.describe_group(pb::DescribeGroupRequest { group: "analytics".into() }).await.err();
    assert_eq!(gone.as_ref().and_then(code), Some(69));
    c.shutdown().await;
    Ok(())
}
