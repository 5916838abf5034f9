//! The TCP connection under each of the client's channels, made once.
//!
//! A tonic `Channel` reconnects by itself when its connection closes, one queued request at a time:
//! each request waiting on a channel to a broker that vanished makes its own connect attempt, up to
//! the connect timeout each, one after another, and the request timeout does not bound that wait
//! (it applies below the channel's queue). The connector here connects once; asked again, it fails
//! at once. So a call on a channel whose connection is gone fails at once with
//! `tonic::ConnectError`, which the client knows was never sent (`error::never_sent`), and the
//! client's own retry loop (bounded, trying the other brokers) goes on. The [`Link`] tells the
//! client's channel cache that the connection is gone, so the next call gets a new channel.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use hyper::rt::{Read, ReadBufCursor, Write};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tonic::codegen::http::Uri;
use tonic::codegen::Service;

/// Whether a channel's one connection is gone (closed by either side, or never made).
#[derive(Debug, Default)]
pub(crate) struct Link {
    used: AtomicBool,
    closed: AtomicBool,
}

impl Link {
    pub(crate) fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }
}

/// Connects to the endpoint's address the first time it is called, and fails every later call.
#[derive(Clone, Debug, Default)]
pub(crate) struct ConnectOnce {
    link: Arc<Link>,
}

impl ConnectOnce {
    pub(crate) fn link(&self) -> Arc<Link> {
        self.link.clone()
    }
}

impl Service<Uri> for ConnectOnce {
    type Response = LinkedIo;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = io::Result<LinkedIo>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let link = self.link.clone();
        Box::pin(async move {
            let authority = uri.authority().map(|a| a.as_str().to_string());
            if link.used.swap(true, Ordering::AcqRel) {
                link.closed.store(true, Ordering::Release);
                return Err(io::Error::new(
                    io::ErrorKind::NotConnected,
                    format!("the connection to {} closed", authority.as_deref().unwrap_or("the broker")),
                ));
            }
            let connected = async {
                let authority = authority
                    .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, format!("no address in {uri}")))?;
                let stream = TcpStream::connect(authority).await?;
                // Requests and answers are small and latency-bound.
                stream.set_nodelay(true)?;
                Ok(stream)
            };
            match connected.await {
                Ok(stream) => Ok(LinkedIo { io: TokioIo::new(stream), link }),
                Err(e) => {
                    link.closed.store(true, Ordering::Release);
                    Err(e)
                }
            }
        })
    }
}

/// The connection's socket; marks its [`Link`] closed when HTTP/2 is done with it.
pub(crate) struct LinkedIo {
    io: TokioIo<TcpStream>,
    link: Arc<Link>,
}

impl Drop for LinkedIo {
    fn drop(&mut self) {
        self.link.closed.store(true, Ordering::Release);
    }
}

impl Read for LinkedIo {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: ReadBufCursor<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_read(cx, buf)
    }
}

impl Write for LinkedIo {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use busbar_proto::v1 as pb;
    use busbar_proto::v1::busbar_client::BusbarClient;
    use tonic::transport::Endpoint;

    use super::*;

    /// A channel whose connection the broker closed says so through its link, and fails its next
    /// call at once as never sent, rather than connecting again (the listener would accept).
    #[tokio::test]
    async fn a_call_after_the_connection_closed_fails_at_once_as_never_sent() -> Result<(), Box<dyn std::error::Error>>
    {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let connector = ConnectOnce::default();
        let link = connector.link();
        let endpoint = Endpoint::from_shared(format!("http://{addr}"))?;
        let (ch, accepted) = tokio::join!(endpoint.connect_with_connector(connector), listener.accept());
        let ch = ch?;
        assert!(!link.is_closed());
        drop(accepted?);
        let deadline = Instant::now() + Duration::from_secs(10);
        while !link.is_closed() {
            assert!(Instant::now() < deadline, "the link never saw the connection close");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let mut api = BusbarClient::new(ch);
        let st = match tokio::time::timeout(Duration::from_secs(5), api.metadata(pb::MetadataRequest {})).await {
            Err(_) => return Err("the call waited instead of failing at once".into()),
            Ok(Ok(r)) => return Err(format!("answered on a closed connection: {r:?}").into()),
            Ok(Err(st)) => st,
        };
        assert!(crate::error::never_sent(&st), "{st:?}");
        Ok(())
    }
}
