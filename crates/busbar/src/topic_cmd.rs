//! `busbar topic ...`

use serde_json::json;

use crate::cli::{Output, TopicCmd};
use crate::common::{client_error, connect};

pub async fn run(brokers: &[String], output: Output, cmd: TopicCmd) -> anyhow::Result<()> {
    let client = connect(brokers).await?;
    match cmd {
        TopicCmd::Create { name, partitions } => {
            client.create_topic(&name, partitions).await.map_err(client_error)?;
            match output {
                Output::Json => println!("{}", json!({"topic": name, "partitions": partitions})),
                Output::Text => println!("created topic {name} with {partitions} partition(s)"),
            }
        }
        TopicCmd::List => {
            let mut topics = client.list_topics().await.map_err(client_error)?;
            topics.sort_by(|a, b| a.name.cmp(&b.name));
            match output {
                Output::Json => {
                    for t in &topics {
                        println!("{}", json!({"topic": t.name, "partitions": t.partitions}));
                    }
                }
                Output::Text => {
                    println!("{:<40} {:>10}", "TOPIC", "PARTITIONS");
                    for t in &topics {
                        println!("{:<40} {:>10}", t.name, t.partitions);
                    }
                }
            }
        }
        TopicCmd::Describe { name } => {
            let d = client.describe_topic(&name).await.map_err(client_error)?;
            let mut parts = d.partitions;
            parts.sort_by_key(|p| p.partition);
            match output {
                Output::Json => {
                    for p in &parts {
                        let j = json!({
                            "topic": name,
                            "partition": p.partition,
                            "start_offset": p.start_offset,
                            "end_offset": p.end_offset,
                        });
                        println!("{j}");
                    }
                }
                Output::Text => {
                    println!("topic {name}: {} partition(s)", parts.len());
                    println!("{:>10} {:>14} {:>14} {:>14}", "PARTITION", "START_OFFSET", "END_OFFSET", "RECORDS");
                    for p in &parts {
                        let records = p.end_offset.saturating_sub(p.start_offset);
                        println!("{:>10} {:>14} {:>14} {:>14}", p.partition, p.start_offset, p.end_offset, records);
                    }
                }
            }
        }
        TopicCmd::Delete { name } => {
            client.delete_topic(&name).await.map_err(client_error)?;
            match output {
                Output::Json => println!("{}", json!({"deleted": name})),
                Output::Text => println!("deleted topic {name}"),
            }
        }
    }
    Ok(())
}
