//! Finding the leader and keeping one connection to it, for the producer and the consumer's
//! metadata reads. Writes must reach the leader; asking it also gives read-your-writes for topic
//! metadata right after a topic is created (followers apply the creation a moment later).

use busbar_proto::v1 as pb;
use tonic::transport::Channel;

use crate::client::Client;
use crate::error::ClientError;

/// Finds the leader when the client has no belief about it. The belief itself is the client's
/// leader hint, shared by every user of the client (its clones, producers, consumers). Concurrent
/// users may each rediscover it after a failure; that costs a few extra metadata calls, never a
/// wrong answer (a non-leader redirects). Its channel is the client's kept one, asked for per call
/// (a channel kept here would outlive its connection).
pub(crate) struct LeaderCache {
    client: Client,
}

impl LeaderCache {
    pub(crate) fn new(client: Client) -> Self {
        Self { client }
    }

    /// A channel to the leader, or failing that to a broker that will redirect or say there is none.
    pub(crate) async fn channel(&self) -> Result<(String, Channel), ClientError> {
        let hint = self.client.leader_hint();
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
        self.client.set_leader_hint(&addr);
        Ok((addr, ch))
    }

    /// A NOT_LEADER answer named the leader: go there next.
    pub(crate) fn redirect(&self, addr: &str) {
        self.client.set_leader_hint(addr);
    }

    /// `addr` failed or is no longer the leader (see [`Client::forget_leader_hint`]).
    pub(crate) fn forget(&self, addr: &str) {
        self.client.forget_leader_hint(addr);
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
