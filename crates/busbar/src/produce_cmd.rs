//! `busbar produce`: writes records idempotently, from an argument or from standard input lines.
//!
//! Every batch carries this run's producer id and its partition's next sequence number, so a batch
//! resent after an indeterminate answer (leader killed mid-write) is written once: the broker
//! answers a resend with the original offsets. The partition is chosen here (the key's murmur2
//! partition, as the broker would, or partitions in turn for records without a key), because the
//! sequence numbers are per partition and must be known before sending.

use std::collections::HashMap;
use std::time::Duration;

use anyhow::{bail, Context};
use busbar_client::{codes, Client, ClientError, ProduceRequest};
use busbar_proto::v1 as pb;
use clap::Args;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader};
use tokio::sync::mpsc;

use crate::cli::Output;
use crate::common::{client_error, connect, write_stdout};

/// Bounds on one batch of stdin lines sent in one request (the server's default limit is 1 MiB).
const MAX_BATCH_RECORDS: usize = 500;
const MAX_BATCH_BYTES: usize = 512 * 1024;
/// Sends of the same batch (the first included) when the answer says it may not have been written.
/// Each send already follows leader redirects and retries an unreachable broker for a while.
const MAX_SEND_ATTEMPTS: u32 = 5;
const RESEND_PAUSE: Duration = Duration::from_millis(500);
/// Lines read ahead of the batch being sent.
const LINE_QUEUE: usize = 4096;
/// A longer stdin line is reported, not sent (the server would refuse it anyway: 1 MiB by default).
const MAX_LINE_BYTES: usize = 16 << 20;
/// Line numbers named in the final summary.
const MAX_LINES_NAMED: usize = 20;

#[derive(Args, Debug)]
#[command(after_help = "Each acknowledged record prints one line: with --output json \
    {\"topic\":..,\"partition\":..,\"offset\":..}. The command exits 1 if any record was not acknowledged, \
    naming its line on stderr.")]
pub struct ProduceArgs {
    pub topic: String,
    /// The value of the one record to write. Without it, every line of standard input is one record
    /// (an empty line is an empty value).
    pub value: Option<String>,
    /// The key of every record. Records with a key go to the key's partition (murmur2, as Kafka);
    /// records without one go to the partitions in turn.
    #[arg(long)]
    pub key: Option<String>,
    /// A header on every record; repeat the flag for more (order and repeats are kept).
    #[arg(long = "header", value_name = "NAME=VALUE", value_parser = parse_header)]
    pub headers: Vec<(String, String)>,
    /// Write every record to this partition instead of choosing one.
    #[arg(long)]
    pub partition: Option<u32>,
    /// Split each stdin line at the first SEP into key and value. A line without SEP is not sent; it
    /// is reported and the command exits 1 at the end.
    #[arg(long, value_name = "SEP", conflicts_with_all = ["key", "value"], value_parser = non_empty)]
    pub key_separator: Option<String>,
}

fn parse_header(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some(("", _)) => Err(format!("header {s:?} has an empty name")),
        Some((name, value)) => Ok((name.to_string(), value.to_string())),
        None => Err(format!("header {s:?} is not NAME=VALUE")),
    }
}

fn non_empty(s: &str) -> Result<String, String> {
    if s.is_empty() {
        return Err("the separator may not be empty".into());
    }
    Ok(s.to_string())
}

/// One acknowledged record, as printed with `--output json`.
#[derive(serde::Serialize)]
struct Ack<'a> {
    topic: &'a str,
    partition: u32,
    offset: u64,
}

/// One line of input, as read.
enum Input {
    Line { no: u64, bytes: Vec<u8> },
    TooLong { no: u64 },
    ReadError { no: u64, error: std::io::Error },
}

/// A record ready to be batched.
struct Item {
    line: u64,
    partition: u32,
    record: pb::Record,
    size: usize,
}

/// What became of one batch.
enum Sent {
    Acked,
    /// Refused for what is in it; later batches can still succeed.
    Refused(ClientError),
    /// Nothing later can succeed (unknown topic, cluster unreachable, outcome unknown): stop.
    Stop(ClientError),
}

struct Run {
    client: Client,
    output: Output,
    topic: String,
    producer_id: u64,
    partitions: u32,
    fixed: Option<u32>,
    /// The partition records without a key go to; moves on after each batch.
    keyless: u32,
    /// The next sequence number of each partition this run wrote to.
    sequences: HashMap<u32, u64>,
    key: Option<Vec<u8>>,
    separator: Option<Vec<u8>>,
    headers: Vec<pb::Header>,
    /// Lines not acknowledged, with why.
    failed: Vec<(u64, String)>,
    records: u64,
    /// Report failures as they happen (stdin mode), or only through the returned error (one VALUE).
    report_each: bool,
}

pub async fn run(brokers: &[String], output: Output, args: ProduceArgs) -> anyhow::Result<()> {
    let client = connect(brokers).await?;
    let described = client.describe_topic(&args.topic).await.map_err(client_error)?;
    let partitions = described.topic.map(|t| t.partitions).unwrap_or(0);
    if partitions == 0 {
        bail!("topic {} has no partitions", args.topic);
    }
    let producer_id = client.init_producer_id().await.map_err(client_error)?;
    let (tx, rx) = mpsc::channel(LINE_QUEUE);
    let report_each = args.value.is_none();
    match args.value {
        Some(v) => {
            // The queue is empty, so this cannot wait; the receiver is alive.
            let _ = tx.send(Input::Line { no: 1, bytes: v.into_bytes() }).await;
            drop(tx);
        }
        None => {
            tokio::spawn(read_lines(tx));
        }
    }
    let mut run = Run {
        client,
        output,
        topic: args.topic,
        producer_id,
        partitions,
        fixed: args.partition,
        keyless: (producer_id % u64::from(partitions)) as u32,
        sequences: HashMap::new(),
        key: args.key.map(String::into_bytes),
        separator: args.key_separator.map(String::into_bytes),
        headers: args
            .headers
            .into_iter()
            .map(|(name, value)| pb::Header { name, value: value.into_bytes().into() })
            .collect(),
        failed: Vec::new(),
        records: 0,
        report_each,
    };
    let stopped = run.pump(rx).await?;
    if !report_each {
        // One record: its error is the one line.
        if let Some((_, e)) = run.failed.first() {
            bail!("{e}");
        }
        return match stopped {
            Some((_, e)) => Err(client_error(e)),
            None => Ok(()),
        };
    }
    if let Some((line, e)) = stopped {
        bail!(
            "stopped at line {line}: {}; that line and every later one were not sent or not acknowledged",
            client_error(e)
        );
    }
    if !run.failed.is_empty() {
        let mut named: Vec<String> = run.failed.iter().take(MAX_LINES_NAMED).map(|(l, _)| l.to_string()).collect();
        if run.failed.len() > MAX_LINES_NAMED {
            named.push("...".into());
        }
        let lines = if run.failed.len() == 1 { "line" } else { "lines" };
        bail!("{} of {} record(s) not acknowledged ({lines} {})", run.failed.len(), run.records, named.join(", "));
    }
    Ok(())
}

/// Reads stdin line by line (bytes, so any value can be sent) into `tx`.
async fn read_lines(tx: mpsc::Sender<Input>) {
    let mut reader = BufReader::new(tokio::io::stdin());
    let mut no = 0u64;
    loop {
        no += 1;
        let mut buf = Vec::new();
        let limit = (MAX_LINE_BYTES + 2) as u64; // room for "\r\n"
        let input = match (&mut reader).take(limit).read_until(b'\n', &mut buf).await {
            Ok(0) => return,
            Ok(_) if buf.len() as u64 == limit && buf.last() != Some(&b'\n') => {
                // Skip the rest of the line, bounded by what memory a chunk takes.
                if let Err(error) = skip_line(&mut reader).await {
                    let _ = tx.send(Input::ReadError { no, error }).await;
                    return;
                }
                Input::TooLong { no }
            }
            Ok(_) => {
                if buf.last() == Some(&b'\n') {
                    buf.pop();
                    if buf.last() == Some(&b'\r') {
                        buf.pop();
                    }
                }
                Input::Line { no, bytes: buf }
            }
            Err(error) => {
                let _ = tx.send(Input::ReadError { no, error }).await;
                return;
            }
        };
        if tx.send(input).await.is_err() {
            return; // the sender stopped
        }
    }
}

async fn skip_line<R: tokio::io::AsyncBufRead + Unpin>(reader: &mut R) -> std::io::Result<()> {
    loop {
        let chunk = reader.fill_buf().await?;
        if chunk.is_empty() {
            return Ok(());
        }
        match chunk.iter().position(|b| *b == b'\n') {
            Some(i) => {
                reader.consume(i + 1);
                return Ok(());
            }
            None => {
                let n = chunk.len();
                reader.consume(n);
            }
        }
    }
}

impl Run {
    /// Sends everything that arrives on `rx`, in order, batching lines that are already waiting.
    /// Returns the line and error that stopped it early, if one did.
    async fn pump(&mut self, mut rx: mpsc::Receiver<Input>) -> anyhow::Result<Option<(u64, ClientError)>> {
        let mut carry: Option<Item> = None;
        loop {
            let first = match carry.take() {
                Some(item) => item,
                None => match rx.recv().await {
                    Some(input) => match self.item(input)? {
                        Some(item) => item,
                        None => continue,
                    },
                    None => return Ok(None),
                },
            };
            let partition = first.partition;
            let mut bytes = first.size;
            let mut batch = vec![first];
            // Only lines already read join the batch: an interactive producer is never kept waiting.
            while batch.len() < MAX_BATCH_RECORDS {
                let Ok(input) = rx.try_recv() else { break };
                let Some(item) = self.item(input)? else { continue };
                if item.partition != partition || bytes + item.size > MAX_BATCH_BYTES {
                    carry = Some(item);
                    break;
                }
                bytes += item.size;
                batch.push(item);
            }
            if let Some(stop) = self.send_split(partition, batch).await? {
                return Ok(Some(stop));
            }
            self.keyless = (self.keyless + 1) % self.partitions;
        }
    }

    /// Turns one input line into a record, or records why it cannot be sent.
    fn item(&mut self, input: Input) -> anyhow::Result<Option<Item>> {
        let (no, bytes) = match input {
            Input::Line { no, bytes } => (no, bytes),
            Input::TooLong { no } => {
                self.records += 1;
                self.fail(no, format!("line is longer than {MAX_LINE_BYTES} bytes"));
                return Ok(None);
            }
            Input::ReadError { no, error } => {
                return Err(anyhow::Error::new(error).context(format!("reading line {no} of standard input")));
            }
        };
        self.records += 1;
        let (key, value) = match &self.separator {
            Some(sep) => match find(&bytes, sep) {
                Some(i) => (Some(bytes[..i].to_vec()), bytes[i + sep.len()..].to_vec()),
                None => {
                    let shown = String::from_utf8_lossy(sep).into_owned();
                    self.fail(no, format!("no key separator {shown:?} in the line"));
                    return Ok(None);
                }
            },
            None => (self.key.clone(), bytes),
        };
        let partition = match (self.fixed, &key) {
            (Some(p), _) => p,
            (None, Some(k)) => busbar_proto::partition::for_key(k, self.partitions),
            (None, None) => self.keyless,
        };
        let size = value.len()
            + key.as_ref().map_or(0, Vec::len)
            + self.headers.iter().map(|h| h.name.len() + h.value.len()).sum::<usize>()
            + 32;
        let record = pb::Record {
            key: key.map(Into::into),
            value: value.into(),
            headers: self.headers.clone(),
            timestamp_ms: 0,
        };
        Ok(Some(Item { line: no, partition, record, size }))
    }

    fn fail(&mut self, line: u64, why: String) {
        if self.report_each {
            eprintln!("line {line} not acknowledged: {why}");
        }
        self.failed.push((line, why));
    }

    /// Sends a batch; if the broker refuses it for its content, sends its records one by one so
    /// only the offending ones fail.
    async fn send_split(&mut self, partition: u32, batch: Vec<Item>) -> anyhow::Result<Option<(u64, ClientError)>> {
        let first_line = batch.first().map_or(0, |i| i.line);
        match self.send(partition, &batch).await? {
            Sent::Acked => Ok(None),
            Sent::Stop(e) => Ok(Some((first_line, e))),
            Sent::Refused(e) if batch.len() == 1 => {
                self.fail(first_line, client_error(e).to_string());
                Ok(None)
            }
            Sent::Refused(_) => {
                for item in batch {
                    let line = item.line;
                    match self.send(partition, std::slice::from_ref(&item)).await? {
                        Sent::Acked => {}
                        Sent::Refused(e) => self.fail(line, client_error(e).to_string()),
                        Sent::Stop(e) => return Ok(Some((line, e))),
                    }
                }
                Ok(None)
            }
        }
    }

    /// Sends one batch with the partition's next sequence number, resending the same request while
    /// the answer leaves its fate open.
    async fn send(&mut self, partition: u32, batch: &[Item]) -> anyhow::Result<Sent> {
        let sequence = self.sequences.get(&partition).copied().unwrap_or(0);
        let req = ProduceRequest {
            topic: self.topic.clone(),
            partition: Some(partition),
            records: batch.iter().map(|i| i.record.clone()).collect(),
            producer_id: self.producer_id,
            sequence,
        };
        let mut attempt = 1;
        let resp = loop {
            match self.client.produce_request(req.clone()).await {
                Ok(resp) => break resp,
                Err(e) if may_resend(&e) && attempt < MAX_SEND_ATTEMPTS => {
                    attempt += 1;
                    tokio::time::sleep(RESEND_PAUSE).await;
                }
                Err(e) if refused_for_content(&e) => return Ok(Sent::Refused(e)),
                Err(e) => return Ok(Sent::Stop(e)),
            }
        };
        if resp.count as usize != batch.len() || resp.partition != partition {
            bail!(
                "the broker acknowledged {} record(s) in partition {} for a batch of {} sent to partition {partition}",
                resp.count,
                resp.partition,
                batch.len()
            );
        }
        self.sequences.insert(partition, sequence + 1);
        let mut text = String::new();
        for i in 0..batch.len() as u64 {
            let offset = resp.base_offset + i;
            let line = match self.output {
                Output::Json => serde_json::to_string(&Ack { topic: &self.topic, partition, offset })
                    .context("encoding an acknowledgement")?,
                Output::Text => format!("{} partition {partition} offset {offset}", self.topic),
            };
            text.push_str(&line);
            text.push('\n');
        }
        // A reader that went away does not undo the writes; keep producing.
        write_stdout(&text).context("printing acknowledgements")?;
        Ok(Sent::Acked)
    }
}

/// The batch may not have been written, or it was and the answer was lost: resending the same
/// request (same producer id and sequence) is safe either way.
fn may_resend(e: &ClientError) -> bool {
    match e {
        ClientError::NoBroker { .. } => true,
        ClientError::Api { code, .. } => matches!(
            *code,
            codes::INDETERMINATE
                | codes::REQUEST_TIMED_OUT
                | codes::NOT_LEADER
                | codes::LEADER_NOT_AVAILABLE
                | codes::SHUTTING_DOWN
        ),
        _ => false,
    }
}

/// CORRUPT_MESSAGE, RECORD_TOO_LARGE, RECORD_LIST_TOO_LARGE, INVALID_REQUEST: the batch's content
/// was refused and it was not written (its sequence number is still free).
fn refused_for_content(e: &ClientError) -> bool {
    matches!(e.code(), Some(2 | 10 | 18 | 42))
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_and_separators_parse() {
        assert_eq!(parse_header("a=b=c"), Ok(("a".into(), "b=c".into())));
        assert_eq!(parse_header("a="), Ok(("a".into(), String::new())));
        assert!(parse_header("=b").is_err());
        assert!(parse_header("ab").is_err());
        assert_eq!(find(b"k::v", b"::"), Some(1));
        assert_eq!(find(b"kv", b":"), None);
        assert!(non_empty("").is_err());
    }
}
