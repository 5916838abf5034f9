//! `busbar topic ...`

use serde_json::json;

use crate::cli::{Output, TopicCmd};
use crate::common::{client_error, connect};

pub async fn run(brokers: &[String], output: Output, cmd: TopicCmd) -> anyhow::Result<()> {
    let client = connect(brokers).await?;
    match cmd {
        TopicCmd::Create { name, partitions, config } => {
            let config = key_values(&config)?;
            client.create_topic_with_config(&name, partitions, &config).await.map_err(client_error)?;
            match output {
                Output::Json => println!("{}", json!({"topic": name, "partitions": partitions})),
                Output::Text => println!("created topic {name} with {partitions} partition(s)"),
            }
        }
        TopicCmd::Alter { name, config, delete_config } => {
            let set = key_values(&config)?;
            if set.is_empty() && delete_config.is_empty() {
                anyhow::bail!("nothing to change: give --config KEY=VALUE or --delete-config KEY");
            }
            let eff = client.alter_topic_config(&name, &set, &delete_config).await.map_err(client_error)?;
            let eff: std::collections::BTreeMap<_, _> = eff.into_iter().collect();
            match output {
                Output::Json => println!("{}", json!({"topic": name, "config": eff})),
                Output::Text => {
                    println!("topic {name} configuration:");
                    for (k, v) in &eff {
                        println!("  {k}={v}");
                    }
                }
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
            let config: std::collections::BTreeMap<_, _> = d.config.into_iter().collect();
            let mut parts = d.partitions;
            parts.sort_by_key(|p| p.partition);
            match output {
                Output::Json => {
                    // One object per partition, each with the topic's effective config, so every
                    // line has the same shape.
                    for p in &parts {
                        let j = json!({
                            "topic": name,
                            "partition": p.partition,
                            "start_offset": p.start_offset,
                            "end_offset": p.end_offset,
                            "size_bytes": p.size_bytes,
                            "config": config,
                        });
                        println!("{j}");
                    }
                }
                Output::Text => {
                    println!("topic {name}: {} partition(s)", parts.len());
                    let shown: Vec<String> = config.iter().map(|(k, v)| format!("{k}={v}")).collect();
                    let shown =
                        if shown.is_empty() { "(cluster defaults: keep forever)".to_string() } else { shown.join(" ") };
                    println!("config: {shown}");
                    println!(
                        "{:>10} {:>14} {:>14} {:>14} {:>14}",
                        "PARTITION", "START_OFFSET", "END_OFFSET", "RECORDS", "SIZE_BYTES"
                    );
                    for p in &parts {
                        let records = p.end_offset.saturating_sub(p.start_offset);
                        println!(
                            "{:>10} {:>14} {:>14} {:>14} {:>14}",
                            p.partition, p.start_offset, p.end_offset, records, p.size_bytes
                        );
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

/// Parses `KEY=VALUE` arguments; the server validates keys and values.
fn key_values(args: &[String]) -> anyhow::Result<Vec<(String, String)>> {
    args.iter()
        .map(|a| match a.split_once('=') {
            Some((k, v)) if !k.trim().is_empty() => Ok((k.trim().to_string(), v.trim().to_string())),
            _ => anyhow::bail!("--config takes KEY=VALUE; got {a:?}"),
        })
        .collect()
}
