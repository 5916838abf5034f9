//! Finding the leader and keeping one connection to it, for the producer and the consumer's
//! metadata reads. Writes must reach the leader; asking it also gives read-your-writes for topic
//! metadata right after a topic is created (followers apply the creation a moment later).

use std::sync::{Mutex, MutexGuard, PoisonError};

use busbar_proto::v1 as pb;
use tonic::transport::Channel;

use crate::client::Client;
use crate::error::ClientError;

#[derive(Default)]
struct Cached {
    /// Where the leader is believed to be (from a redirect or from metadata). Its channel is the
    /// client's kept one, asked for per call (a channel kept here would outlive its connection).
    addr: Option<String>,
}

/// A shared belief about the leader. Concurrent users may each rediscover it after a failure; that
/// costs a few extra metadata calls, never a wrong answer (a non-leader redirects).
pub(crate) struct LeaderCache {
    client: Client,
    cached: Mutex<Cached>,
}

impl LeaderCache {
    pub(crate) fn new(client: Client) -> Self {
        Self { client, cached: Mutex::new(Cached::default()) }
    }

    fn lock(&self) -> MutexGuard<'_, Cached> {
        // The guarded data is two plain fields, always consistent: a panic elsewhere cannot have
        // left it half-written.
        self.cached.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A channel to the leader, or failing that to a broker that will redirect or say there is none.
    pub(crate) async fn channel(&self) -> Result<(String, Channel), ClientError> {
        let hint = self.lock().addr.clone();
        let (addr, ch) = match hint {
            Some(addr) => match self.client.channel_to(&addr).await {
                Ok(ch) => (addr, ch),
                Err(e) => {
                    self.forget(&addr);
                    return Err(ClientError::NoBroker { brokers: vec![addr], last: e });
                }
            },
            None => self.discover().await?,
        };
        self.lock().addr = Some(addr.clone());
        Ok((addr, ch))
    }

    /// A NOT_LEADER answer named the leader: go there next.
    pub(crate) fn redirect(&self, addr: &str) {
        self.lock().addr = Some(addr.to_string());
    }

    /// `addr` failed or is no longer the leader. Only forgotten if still current, so a failure of
    /// an old attempt does not discard a leader someone else has just found.
    pub(crate) fn forget(&self, addr: &str) {
        let mut c = self.lock();
        if c.addr.as_deref() == Some(addr) {
            *c = Cached::default();
        }
    }

    /// Asks every broker at once who leads and takes the answer most of them give: a deposed
    /// leader cut off from the others may still name itself, but the majority has moved on.
    async fn discover(&self) -> Result<(String, Channel), ClientError> {
        let brokers = self.client.brokers().to_vec();
        let asks = brokers.iter().map(|b| async move {
            let ch = self.client.channel_to(b).await?;
            let m = self
                .client
                .api(ch.clone())
                .metadata(pb::MetadataRequest {})
                .await
                .map_err(|st| format!("{b}: {st}"))?;
            Ok::<_, String>((b.clone(), ch, m.into_inner()))
        });
        let answers = futures::future::join_all(asks).await;
        let mut votes: Vec<(String, usize)> = Vec::new();
        let mut any: Option<(String, Channel)> = None;
        let mut last = String::from("no broker answered");
        for a in &answers {
            match a {
                Ok((b, ch, m)) => {
                    if any.is_none() {
                        any = Some((b.clone(), ch.clone()));
                    }
                    if m.has_leader && !m.leader_addr.is_empty() {
                        match votes.iter_mut().find(|(l, _)| *l == m.leader_addr) {
                            Some((_, n)) => *n += 1,
                            None => votes.push((m.leader_addr.clone(), 1)),
                        }
                    }
                }
                Err(e) => last = e.clone(),
            }
        }
        // Most votes first; ties keep the order of the broker list.
        votes.sort_by_key(|v| std::cmp::Reverse(v.1));
        for (leader, _) in votes {
            let known = answers.iter().flatten().find(|(b, _, _)| *b == leader).map(|(_, ch, _)| ch.clone());
            match known {
                Some(ch) => return Ok((leader, ch)),
                None => match self.client.channel_to(&leader).await {
                    Ok(ch) => return Ok((leader, ch)),
                    Err(e) => last = e,
                },
            }
        }
        // Nobody knows a leader (an election is under way): any broker will say so, and the
        // caller backs off and asks again.
        any.ok_or(ClientError::NoBroker { brokers, last })
    }
}
