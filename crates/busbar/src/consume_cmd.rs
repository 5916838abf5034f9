//! `busbar consume`: reads partitions round-robin and prints one JSON line per record.
//!
//! While records keep coming, partitions are read in turn without waiting. When a whole round finds
//! nothing, every partition is long-polled at once and the first one with records wins, so a
//! record in any partition is printed as soon as it commits. Nothing is committed on the server:
//! a consume is a plain read.
//!
//! With `--group G` the command is instead a member of consumer group G: the group assigns it
//! partitions (all of them, when it is the only member), it resumes each at the group's committed
//! offset, and it commits what it has printed (every second, and when it stops).

use std::time::{Duration, Instant};

use anyhow::Context;
use base64::Engine;
use busbar_client::{Client, ConsumerRecord, FetchResponse, GroupConsumer, GroupConsumerConfig, StartFrom};
use clap::Args;
use futures::stream::{FuturesUnordered, StreamExt};
use serde::Serialize;

use crate::cli::Output;
use crate::common::{client_error, connect, write_stdout, Written};

/// Records asked for in one fetch.
const MAX_FETCH_RECORDS: u32 = 1000;
/// Longest single long poll; an idle consumer re-polls this often (the server caps a wait at 30 s).
const MAX_POLL: Duration = Duration::from_secs(5);

#[derive(Args, Debug)]
#[command(after_help = "Output (text and json alike): one JSON object per record, \
    {\"topic\",\"partition\",\"offset\",\"key\",\"value\",\"headers\":[{\"name\",\"value\"}],\"timestamp\"} \
    (timestamp in ms since the Unix epoch; key null when the record has none). A key, value or header \
    value that is not UTF-8 is base64, marked by \"key_encoding\", \"value_encoding\" or the header's \
    \"value_encoding\" set to \"base64\". Records of one partition come in offset order.\n\n\
    With --group G: consume as a member of consumer group G. Each partition resumes at the group's \
    committed offset (--from beginning|end says where a partition without one starts), and what is \
    printed is committed (every second, and on exit: idle timeout, --max, Ctrl-C). Members of one \
    group share the partitions; see `busbar group --help`.")]
pub struct ConsumeArgs {
    pub topic: String,
    /// Read only this partition (default: all of them).
    #[arg(long, conflicts_with = "group")]
    pub partition: Option<u32>,
    /// Consume as a member of this consumer group, resuming at its committed offsets and
    /// committing what is printed.
    #[arg(long)]
    pub group: Option<String>,
    /// With --group: the group gives this member's partitions to the others when it has not heard
    /// from it for this long (a crashed consumer).
    #[arg(long, default_value_t = 10_000, requires = "group")]
    pub session_timeout_ms: u64,
    /// Where to start in each partition read: beginning, end, or an offset. With --group: where a
    /// partition the group has no committed offset for starts (beginning or end).
    #[arg(long, default_value = "beginning", value_parser = parse_from)]
    pub from: StartAt,
    /// Stop after this many records.
    #[arg(long)]
    pub max: Option<u64>,
    /// Keep waiting for new records until interrupted (Ctrl-C), never stopping on idle.
    #[arg(long)]
    pub follow: bool,
    /// Without --follow: stop once no record has arrived for this long.
    #[arg(long, default_value_t = 2000)]
    pub idle_timeout_ms: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StartAt {
    Beginning,
    End,
    Offset(u64),
}

fn parse_from(s: &str) -> Result<StartAt, String> {
    match s {
        "beginning" => Ok(StartAt::Beginning),
        "end" => Ok(StartAt::End),
        n => n.parse().map(StartAt::Offset).map_err(|_| format!("{s:?} is not beginning, end or an offset")),
    }
}

#[derive(Serialize)]
struct JsonRecord<'a> {
    topic: &'a str,
    partition: u32,
    offset: u64,
    key: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    key_encoding: Option<&'static str>,
    value: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    value_encoding: Option<&'static str>,
    headers: Vec<JsonHeader<'a>>,
    timestamp: i64,
}

#[derive(Serialize)]
struct JsonHeader<'a> {
    name: &'a str,
    value: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    value_encoding: Option<&'static str>,
}

/// UTF-8 as is; anything else as base64, with the marker saying so.
fn text_or_base64(bytes: &[u8]) -> (String, Option<&'static str>) {
    match std::str::from_utf8(bytes) {
        Ok(s) => (s.to_string(), None),
        Err(_) => (base64::engine::general_purpose::STANDARD.encode(bytes), Some("base64")),
    }
}

/// One record as the JSON line both kinds of consume print.
struct RecordLine<'a> {
    topic: &'a str,
    partition: u32,
    offset: u64,
    key: Option<&'a [u8]>,
    value: &'a [u8],
    timestamp: i64,
}

impl RecordLine<'_> {
    fn push_to<'h>(&self, text: &mut String, headers: impl Iterator<Item = (&'h str, &'h [u8])>) -> anyhow::Result<()> {
        let (key, key_encoding) = match self.key.map(text_or_base64) {
            Some((k, enc)) => (Some(k), enc),
            None => (None, None),
        };
        let (value, value_encoding) = text_or_base64(self.value);
        let headers = headers
            .map(|(name, v)| {
                let (value, value_encoding) = text_or_base64(v);
                JsonHeader { name, value, value_encoding }
            })
            .collect();
        let j = JsonRecord {
            topic: self.topic,
            partition: self.partition,
            offset: self.offset,
            key,
            key_encoding,
            value,
            value_encoding,
            headers,
            timestamp: self.timestamp,
        };
        text.push_str(&serde_json::to_string(&j).context("encoding a record as JSON")?);
        text.push('\n');
        Ok(())
    }
}

fn group_record_line(r: &ConsumerRecord, text: &mut String) -> anyhow::Result<()> {
    let line = RecordLine {
        topic: &r.topic,
        partition: r.partition,
        offset: r.offset,
        key: r.key.as_deref(),
        value: &r.value,
        timestamp: r.timestamp_ms,
    };
    line.push_to(text, r.headers.iter().map(|(n, v)| (n.as_str(), &v[..])))
}

/// How a group consume ended.
enum GroupStop {
    /// Idle timeout, --max reached, or Ctrl-C: commit what was printed and leave.
    Done,
    /// The reader went away mid-batch: leave without committing that batch.
    ReaderGone,
    Failed(anyhow::Error),
}

/// How often a group consume commits what it has printed while it runs.
const GROUP_COMMIT_INTERVAL: Duration = Duration::from_secs(1);

async fn run_group(brokers: &[String], group: String, args: ConsumeArgs) -> anyhow::Result<()> {
    let start = match args.from {
        StartAt::Beginning => StartFrom::Earliest,
        StartAt::End => StartFrom::Latest,
        StartAt::Offset(_) => anyhow::bail!(
            "with --group, --from is beginning or end (where a partition without a committed offset starts); \
             to move a group's offsets use `busbar group reset-offsets`"
        ),
    };
    let client = connect(brokers).await?;
    // An unknown topic is an error with its code, not a member waiting for partitions forever.
    client.describe_topic(&args.topic).await.map_err(client_error)?;
    let mut cfg = GroupConsumerConfig::new(group, [args.topic.clone()]);
    cfg.start = start;
    cfg.session_timeout = Duration::from_millis(args.session_timeout_ms);
    // Records count as consumed once printed (the next poll), so auto-commit commits only those.
    cfg.auto_commit_interval = Some(GROUP_COMMIT_INTERVAL);
    cfg.max_poll_records = MAX_FETCH_RECORDS as usize;
    let mut consumer = GroupConsumer::subscribe(client, cfg).await.map_err(client_error)?;

    let idle = (!args.follow).then(|| Duration::from_millis(args.idle_timeout_ms));
    let mut left = args.max;
    let mut last_record = Instant::now();
    let ctrl_c = tokio::signal::ctrl_c();
    tokio::pin!(ctrl_c);
    let stop = loop {
        if left == Some(0) {
            break GroupStop::Done;
        }
        let wait = match idle {
            None => MAX_POLL,
            Some(limit) => match limit.checked_sub(last_record.elapsed()) {
                Some(l) if !l.is_zero() => l.min(MAX_POLL),
                _ => break GroupStop::Done,
            },
        };
        let n = left.map_or(MAX_FETCH_RECORDS as usize, |n| {
            usize::try_from(n).unwrap_or(usize::MAX).min(MAX_FETCH_RECORDS as usize)
        });
        let polled = tokio::select! {
            r = consumer.poll_up_to(n, wait) => r,
            // Ctrl-C is how --follow ends: a normal stop.
            _ = &mut ctrl_c => break GroupStop::Done,
        };
        let records = match polled {
            Ok(r) => r,
            Err(e) => break GroupStop::Failed(client_error(e)),
        };
        if records.is_empty() {
            continue;
        }
        last_record = Instant::now();
        let mut text = String::new();
        if let Err(e) = records.iter().try_for_each(|r| group_record_line(r, &mut text)) {
            break GroupStop::Failed(e);
        }
        if let Some(n) = left.as_mut() {
            *n = n.saturating_sub(records.len() as u64);
        }
        match write_stdout(&text) {
            Ok(Written::Ok) => {}
            Ok(Written::ReaderGone) => break GroupStop::ReaderGone,
            Err(e) => break GroupStop::Failed(e),
        }
    };
    match stop {
        GroupStop::Done => consumer.close().await.map_err(client_error),
        GroupStop::ReaderGone => {
            let _ = consumer.leave().await;
            Ok(())
        }
        GroupStop::Failed(e) => {
            // Leave, so the group need not wait a session timeout for this member's partitions.
            let _ = consumer.leave().await;
            Err(e)
        }
    }
}

struct Cursor {
    partition: u32,
    offset: u64,
}

struct Consumer {
    client: Client,
    topic: String,
    cursors: Vec<Cursor>,
    /// Records still to print, when --max was given.
    left: Option<u64>,
}

enum Step {
    Continue,
    Done,
}

pub async fn run(brokers: &[String], _output: Output, args: ConsumeArgs) -> anyhow::Result<()> {
    if let Some(group) = args.group.clone() {
        return run_group(brokers, group, args).await;
    }
    let client = connect(brokers).await?;
    // ListOffsets, not DescribeTopic: it is linearizable, so `--from end` starts after every record
    // whose produce was acknowledged before this command (DescribeTopic answers from any node).
    let mut offsets = client.list_offsets(&args.topic).await.map_err(client_error)?;
    offsets.sort_by_key(|p| p.partition);
    if let Some(p) = args.partition {
        offsets.retain(|o| o.partition == p);
        if offsets.is_empty() {
            // Let the broker say what is wrong with the partition, with its code.
            client.fetch(&args.topic, p, 0, 1).await.map_err(client_error)?;
            anyhow::bail!("topic {} has no partition {p}", args.topic);
        }
    }
    let cursors = offsets
        .iter()
        .map(|o| Cursor {
            partition: o.partition,
            offset: match args.from {
                StartAt::Beginning => o.start_offset,
                StartAt::End => o.end_offset,
                StartAt::Offset(n) => n,
            },
        })
        .collect();
    let mut consumer = Consumer { client, topic: args.topic.clone(), cursors, left: args.max };
    let idle = (!args.follow).then(|| Duration::from_millis(args.idle_timeout_ms));
    tokio::select! {
        r = consumer.run(idle) => r,
        // Ctrl-C is how --follow ends: a normal stop, everything printed is complete lines.
        _ = tokio::signal::ctrl_c() => Ok(()),
    }
}

impl Consumer {
    async fn run(&mut self, idle: Option<Duration>) -> anyhow::Result<()> {
        if self.cursors.is_empty() || self.left == Some(0) {
            return Ok(());
        }
        let mut last_record = Instant::now();
        loop {
            // A round without waiting, while there are records to read.
            let mut got = false;
            for i in 0..self.cursors.len() {
                let c = &self.cursors[i];
                let r = self
                    .client
                    .fetch(&self.topic, c.partition, c.offset, self.batch_size())
                    .await
                    .map_err(client_error)?;
                got |= !r.records.is_empty();
                if let Step::Done = self.emit(i, r)? {
                    return Ok(());
                }
            }
            if got {
                last_record = Instant::now();
                continue;
            }
            let wait = match idle {
                None => MAX_POLL,
                Some(limit) => match limit.checked_sub(last_record.elapsed()) {
                    Some(left) if !left.is_zero() => left.min(MAX_POLL),
                    _ => return Ok(()),
                },
            };
            // Nothing anywhere: long-poll every partition at once; the first with records wins and
            // the other polls are dropped (a read commits nothing, so nothing is lost).
            let mut polls: FuturesUnordered<_> = self
                .cursors
                .iter()
                .enumerate()
                .map(|(i, c)| {
                    let (client, topic, batch) = (self.client.clone(), self.topic.clone(), self.batch_size());
                    let (partition, offset) = (c.partition, c.offset);
                    async move { (i, client.fetch_wait(&topic, partition, offset, batch, wait).await) }
                })
                .collect();
            let mut found = None;
            while let Some((i, r)) = polls.next().await {
                let r = r.map_err(client_error)?;
                if !r.records.is_empty() {
                    found = Some((i, r));
                    break;
                }
            }
            drop(polls);
            if let Some((i, r)) = found {
                last_record = Instant::now();
                if let Step::Done = self.emit(i, r)? {
                    return Ok(());
                }
            }
        }
    }

    fn batch_size(&self) -> u32 {
        match self.left {
            Some(n) => u32::try_from(n).unwrap_or(u32::MAX).min(MAX_FETCH_RECORDS),
            None => MAX_FETCH_RECORDS,
        }
    }

    /// Prints the records of one fetch and moves that partition's cursor past them.
    fn emit(&mut self, i: usize, r: FetchResponse) -> anyhow::Result<Step> {
        let partition = self.cursors[i].partition;
        let mut text = String::new();
        let mut done = false;
        for c in r.records {
            if self.left == Some(0) {
                done = true;
                break;
            }
            // Offsets of one partition strictly increase; a server answering otherwise is broken.
            if c.offset < self.cursors[i].offset {
                anyhow::bail!(
                    "partition {partition}: the broker returned offset {} for a read from {}",
                    c.offset,
                    self.cursors[i].offset
                );
            }
            self.cursors[i].offset = c.offset + 1;
            let rec = c.record.unwrap_or_default();
            let headers = rec.headers.iter().map(|h| (h.name.as_str(), &h.value[..]));
            let line = RecordLine {
                topic: &self.topic,
                partition,
                offset: c.offset,
                key: rec.key.as_deref(),
                value: &rec.value,
                timestamp: rec.timestamp_ms,
            };
            line.push_to(&mut text, headers)?;
            if let Some(n) = self.left.as_mut() {
                *n -= 1;
            }
        }
        if self.left == Some(0) {
            done = true;
        }
        match write_stdout(&text)? {
            Written::ReaderGone => Ok(Step::Done),
            Written::Ok if done => Ok(Step::Done),
            Written::Ok => Ok(Step::Continue),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn from_parses() {
        assert_eq!(parse_from("beginning"), Ok(StartAt::Beginning));
        assert_eq!(parse_from("end"), Ok(StartAt::End));
        assert_eq!(parse_from("42"), Ok(StartAt::Offset(42)));
        assert!(parse_from("-1").is_err());
        assert!(parse_from("start").is_err());
    }

    #[test]
    fn non_utf8_is_base64_and_marked() {
        assert_eq!(text_or_base64(b"hi"), ("hi".to_string(), None));
        assert_eq!(text_or_base64(&[0xff, 0x00]), ("/wA=".to_string(), Some("base64")));
    }
}
