//! `busbar cluster ...`

use busbar_client::{NodeRole, NodeStatus};
use serde_json::json;

use crate::cli::{ClusterCmd, Output};
use crate::common::{client_error, connect};

pub async fn run(brokers: &[String], output: Output, cmd: ClusterCmd) -> anyhow::Result<()> {
    let client = connect(brokers).await?;
    match cmd {
        ClusterCmd::Status => {
            let st = client.cluster_status().await.map_err(client_error)?;
            print_status(&st.nodes, output);
        }
        ClusterCmd::AddNode { id, addr } => {
            client.add_node(id, &addr).await.map_err(client_error)?;
            done(output, json!({"added": id, "addr": addr}), &format!("node {id} ({addr}) added as voter"));
        }
        ClusterCmd::RemoveNode { id } => {
            client.remove_node(id).await.map_err(client_error)?;
            done(output, json!({"removed": id}), &format!("node {id} removed"));
        }
    }
    Ok(())
}

fn done(output: Output, j: serde_json::Value, text: &str) {
    match output {
        Output::Json => println!("{j}"),
        Output::Text => println!("{text}"),
    }
}

fn role_name(n: &NodeStatus) -> &'static str {
    if !n.reachable {
        return "unknown";
    }
    match NodeRole::try_from(n.role).unwrap_or(NodeRole::RoleUnknown) {
        NodeRole::Leader => "leader",
        NodeRole::Follower => "follower",
        NodeRole::Learner => "learner",
        NodeRole::Candidate => "candidate",
        NodeRole::Shutdown => "shutdown",
        NodeRole::RoleUnknown => "unknown",
    }
}

fn opt(has: bool, v: u64) -> Option<u64> {
    has.then_some(v)
}

fn print_status(nodes: &[NodeStatus], output: Output) {
    match output {
        Output::Json => {
            for n in nodes {
                let j = json!({
                    "id": n.id,
                    "addr": n.addr,
                    "role": role_name(n),
                    "voter": n.voter,
                    "term": n.reachable.then_some(n.term),
                    "last_log_index": opt(n.has_last_log_index, n.last_log_index),
                    "applied_index": opt(n.has_applied_index, n.applied_index),
                    "reachable": n.reachable,
                    "disk_bytes": n.reachable.then_some(n.disk_bytes),
                    "apply_version": n.reachable.then_some(n.apply_version),
                    "max_apply_version": n.reachable.then_some(n.max_apply_version),
                    "acknowledged": n.acknowledged.iter().map(|(id, i)| (id.to_string(), *i)).collect::<std::collections::BTreeMap<_, _>>(),
                });
                println!("{j}");
            }
        }
        Output::Text => {
            println!(
                "{:<6} {:<24} {:<10} {:>6} {:>10} {:>10} {:>14}  REACHABLE",
                "ID", "ADDRESS", "ROLE", "TERM", "LAST_LOG", "APPLIED", "DISK_BYTES"
            );
            let show = |v: Option<u64>| v.map(|x| x.to_string()).unwrap_or_else(|| "-".into());
            for n in nodes {
                println!(
                    "{:<6} {:<24} {:<10} {:>6} {:>10} {:>10} {:>14}  {}",
                    n.id,
                    n.addr,
                    role_name(n),
                    if n.reachable { n.term.to_string() } else { "-".into() },
                    show(opt(n.has_last_log_index, n.last_log_index)),
                    show(opt(n.has_applied_index, n.applied_index)),
                    show(n.reachable.then_some(n.disk_bytes)),
                    if n.reachable { "yes" } else { "no" }
                );
            }
        }
    }
}
