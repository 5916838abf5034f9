//! `busbar group ...`: consumer groups seen from outside (list, describe with lag, reset offsets,
//! delete). Consuming as a member of a group is `busbar consume TOPIC --group G`.

use busbar_client::{DescribeGroupResponse, ResetTo};
use clap::Subcommand;
use serde_json::{json, Value};

use crate::cli::Output;
use crate::common::{client_error, connect};

#[derive(Subcommand, Debug)]
pub enum GroupCmd {
    /// Every consumer group.
    List,
    /// A group's members and their partitions, and per partition the committed offset, end
    /// offset and lag (end minus committed).
    Describe { group: String },
    /// Move a group's committed offsets in every partition of a topic. Only while the group has no
    /// members (code 68 otherwise).
    ResetOffsets {
        group: String,
        #[arg(long)]
        topic: String,
        /// earliest (the oldest record kept), latest (the end: skip everything there is), or an offset.
        #[arg(long, value_parser = parse_to)]
        to: ResetTo,
    },
    /// Delete a group and its committed offsets. Only while the group has no members (code 68).
    Delete { group: String },
}

fn parse_to(s: &str) -> Result<ResetTo, String> {
    match s {
        "earliest" => Ok(ResetTo::Earliest),
        "latest" => Ok(ResetTo::Latest),
        n => n.parse().map(ResetTo::Offset).map_err(|_| format!("{s:?} is not earliest, latest or an offset")),
    }
}

fn tp_list(tps: &[busbar_proto::v1::TopicPartition]) -> Vec<Value> {
    tps.iter().map(|tp| json!({"topic": tp.topic, "partition": tp.partition})).collect()
}

fn tp_text(tps: &[busbar_proto::v1::TopicPartition]) -> String {
    if tps.is_empty() {
        return "-".into();
    }
    tps.iter().map(|tp| format!("{}/{}", tp.topic, tp.partition)).collect::<Vec<_>>().join(",")
}

/// The whole group as one JSON object (one line), so a script reads it with one parse.
fn describe_json(d: &DescribeGroupResponse) -> Value {
    let members: Vec<Value> = d
        .members
        .iter()
        .map(|m| {
            json!({
                "member_id": m.member_id,
                "topics": m.topics,
                "session_timeout_ms": m.session_timeout_ms,
                "assigned": tp_list(&m.assigned),
                "revoking": tp_list(&m.revoking),
            })
        })
        .collect();
    let partitions: Vec<Value> = d
        .partitions
        .iter()
        .map(|p| {
            json!({
                "topic": p.topic,
                "partition": p.partition,
                "committed": p.has_committed.then_some(p.committed),
                "start_offset": p.start_offset,
                "end_offset": p.end_offset,
                "lag": p.lag,
                "owner": (!p.owner.is_empty()).then_some(&p.owner),
            })
        })
        .collect();
    json!({
        "group": d.group,
        "generation": d.generation,
        "rebalancing": d.rebalancing,
        "members": members,
        "partitions": partitions,
    })
}

fn describe_text(d: &DescribeGroupResponse) {
    let state = if d.rebalancing { "rebalancing" } else { "stable" };
    println!("group {}: generation {}, {} member(s), {state}", d.group, d.generation, d.members.len());
    if !d.members.is_empty() {
        println!();
        println!("{:<48} {:<24} ASSIGNED (REVOKING)", "MEMBER", "TOPICS");
        for m in &d.members {
            let revoking = if m.revoking.is_empty() { String::new() } else { format!(" ({})", tp_text(&m.revoking)) };
            println!("{:<48} {:<24} {}{revoking}", m.member_id, m.topics.join(","), tp_text(&m.assigned));
        }
    }
    println!();
    println!("{:<24} {:>9} {:>12} {:>12} {:>10}  OWNER", "TOPIC", "PARTITION", "COMMITTED", "END_OFFSET", "LAG");
    for p in &d.partitions {
        let committed = if p.has_committed { p.committed.to_string() } else { "-".into() };
        let owner = if p.owner.is_empty() { "-" } else { p.owner.as_str() };
        println!("{:<24} {:>9} {:>12} {:>12} {:>10}  {owner}", p.topic, p.partition, committed, p.end_offset, p.lag);
    }
}

pub async fn run(brokers: &[String], output: Output, cmd: GroupCmd) -> anyhow::Result<()> {
    let client = connect(brokers).await?;
    match cmd {
        GroupCmd::List => {
            let mut groups = client.list_groups().await.map_err(client_error)?;
            groups.sort();
            match output {
                Output::Json => {
                    for g in &groups {
                        println!("{}", json!({ "group": g }));
                    }
                }
                Output::Text => {
                    println!("GROUP");
                    for g in &groups {
                        println!("{g}");
                    }
                }
            }
        }
        GroupCmd::Describe { group } => {
            let d = client.describe_group(&group).await.map_err(client_error)?;
            match output {
                Output::Json => println!("{}", describe_json(&d)),
                Output::Text => describe_text(&d),
            }
        }
        GroupCmd::ResetOffsets { group, topic, to } => {
            client.reset_group_offsets(&group, &topic, to).await.map_err(client_error)?;
            // Show where the group now stands in that topic.
            let d = client.describe_group(&group).await.map_err(client_error)?;
            let mut parts: Vec<_> = d.partitions.iter().filter(|p| p.topic == topic).collect();
            parts.sort_by_key(|p| p.partition);
            match output {
                Output::Json => {
                    for p in parts {
                        let j = json!({
                            "group": group,
                            "topic": p.topic,
                            "partition": p.partition,
                            "committed": p.committed,
                            "lag": p.lag,
                        });
                        println!("{j}");
                    }
                }
                Output::Text => {
                    println!("group {group}, topic {topic}: offsets reset");
                    println!("{:>9} {:>12} {:>10}", "PARTITION", "COMMITTED", "LAG");
                    for p in parts {
                        println!("{:>9} {:>12} {:>10}", p.partition, p.committed, p.lag);
                    }
                }
            }
        }
        GroupCmd::Delete { group } => {
            client.delete_group(&group).await.map_err(client_error)?;
            match output {
                Output::Json => println!("{}", json!({ "deleted": group })),
                Output::Text => println!("deleted group {group}"),
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn to_parses() {
        assert_eq!(parse_to("earliest"), Ok(ResetTo::Earliest));
        assert_eq!(parse_to("latest"), Ok(ResetTo::Latest));
        assert_eq!(parse_to("17"), Ok(ResetTo::Offset(17)));
        assert!(parse_to("beginning").is_err());
        assert!(parse_to("-1").is_err());
    }
}
