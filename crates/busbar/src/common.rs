//! What the client commands share: connecting, error wording, and writing to stdout.

use std::io::Write;

use busbar_client::{Client, ClientError};

/// A client error as the CLI reports it: the server's message and its numbered code, so a script can
/// tell "unknown topic" (code 3) from "offset out of range" (code 1) without parsing prose.
pub fn client_error(e: ClientError) -> anyhow::Error {
    match e {
        ClientError::Api { code, message, .. } => anyhow::anyhow!("{message} (code {code})"),
        other => anyhow::Error::new(other),
    }
}

pub async fn connect(brokers: &[String]) -> anyhow::Result<Client> {
    Client::connect(brokers.iter().cloned()).await.map_err(client_error)
}

/// Output ends early when the reader went away (`busbar consume ... | head`): not an error.
pub enum Written {
    Ok,
    ReaderGone,
}

/// Writes whole lines to stdout at once and flushes them, so a pipe sees each record as it comes.
pub fn write_stdout(text: &str) -> anyhow::Result<Written> {
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Ok(()) => Ok(Written::Ok),
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(Written::ReaderGone),
        Err(e) => Err(anyhow::Error::new(e).context("writing to stdout")),
    }
}
