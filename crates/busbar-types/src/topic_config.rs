//! Per-topic configuration, with Kafka's key names and meanings: `retention.ms`, `retention.bytes`
//! (per partition) and `max.message.bytes`. A key not set on a topic takes the cluster default.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

pub const RETENTION_MS: &str = "retention.ms";
pub const RETENTION_BYTES: &str = "retention.bytes";
pub const MAX_MESSAGE_BYTES: &str = "max.message.bytes";
pub const KEYS: [&str; 3] = [RETENTION_MS, RETENTION_BYTES, MAX_MESSAGE_BYTES];

/// The keys set on a topic. `None`: not set (the cluster default applies). For the retention keys,
/// `Some(-1)` means "keep forever", as in Kafka.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TopicConfig {
    pub retention_ms: Option<i64>,
    pub retention_bytes: Option<i64>,
    pub max_message_bytes: Option<u32>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    #[error("unknown topic config key {0:?}; known keys: retention.ms, retention.bytes, max.message.bytes")]
    UnknownKey(String),
    #[error("invalid value {value:?} for {key}: {why}")]
    InvalidValue { key: String, value: String, why: &'static str },
}

impl TopicConfig {
    /// Sets or clears (`None`) one key from its text form, validating it.
    pub fn set(&mut self, key: &str, value: Option<&str>) -> Result<(), ConfigError> {
        let bad = |why| ConfigError::InvalidValue { key: key.to_string(), value: value.unwrap_or("").to_string(), why };
        match key {
            RETENTION_MS | RETENTION_BYTES => {
                let v = match value {
                    None => None,
                    Some(v) => {
                        let n: i64 = v.trim().parse().map_err(|_| bad("not a whole number"))?;
                        if n < -1 || n == 0 {
                            return Err(bad("must be -1 (keep forever) or positive"));
                        }
                        Some(n)
                    }
                };
                if key == RETENTION_MS {
                    self.retention_ms = v;
                } else {
                    self.retention_bytes = v;
                }
            }
            MAX_MESSAGE_BYTES => {
                self.max_message_bytes = match value {
                    None => None,
                    Some(v) => {
                        let n: u32 = v.trim().parse().map_err(|_| bad("not a whole number of bytes"))?;
                        if n == 0 {
                            return Err(bad("must be positive"));
                        }
                        Some(n)
                    }
                };
            }
            other => return Err(ConfigError::UnknownKey(other.to_string())),
        }
        Ok(())
    }

    /// Builds a config from `key=value` pairs.
    pub fn from_pairs<'a>(pairs: impl IntoIterator<Item = (&'a str, &'a str)>) -> Result<Self, ConfigError> {
        let mut c = TopicConfig::default();
        for (k, v) in pairs {
            c.set(k, Some(v))?;
        }
        Ok(c)
    }

    /// The keys that are set, in text form.
    pub fn to_map(&self) -> BTreeMap<String, String> {
        let mut m = BTreeMap::new();
        if let Some(v) = self.retention_ms {
            m.insert(RETENTION_MS.to_string(), v.to_string());
        }
        if let Some(v) = self.retention_bytes {
            m.insert(RETENTION_BYTES.to_string(), v.to_string());
        }
        if let Some(v) = self.max_message_bytes {
            m.insert(MAX_MESSAGE_BYTES.to_string(), v.to_string());
        }
        m
    }

    /// This config with every unset key taken from `defaults`.
    pub fn or(&self, defaults: &TopicConfig) -> TopicConfig {
        TopicConfig {
            retention_ms: self.retention_ms.or(defaults.retention_ms),
            retention_bytes: self.retention_bytes.or(defaults.retention_bytes),
            max_message_bytes: self.max_message_bytes.or(defaults.max_message_bytes),
        }
    }

    /// Retention by time in effect, if any (`-1` and unset mean none).
    pub fn retention_ms(&self) -> Option<u64> {
        self.retention_ms.filter(|v| *v > 0).map(|v| v as u64)
    }

    pub fn retention_bytes(&self) -> Option<u64> {
        self.retention_bytes.filter(|v| *v > 0).map(|v| v as u64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_validates_and_merges() {
        let c = TopicConfig::from_pairs([("retention.ms", "60000"), ("retention.bytes", "-1")]).unwrap();
        assert_eq!(c.retention_ms(), Some(60_000));
        assert_eq!(c.retention_bytes(), None);
        assert!(matches!(TopicConfig::from_pairs([("retention.hours", "1")]), Err(ConfigError::UnknownKey(_))));
        assert!(TopicConfig::from_pairs([("retention.ms", "soon")]).is_err());
        assert!(TopicConfig::from_pairs([("retention.ms", "0")]).is_err());
        assert!(TopicConfig::from_pairs([("retention.ms", "-2")]).is_err());
        assert!(TopicConfig::from_pairs([("max.message.bytes", "0")]).is_err());
        let defaults = TopicConfig { retention_bytes: Some(1000), max_message_bytes: Some(10), ..Default::default() };
        let eff = c.or(&defaults);
        assert_eq!(eff.retention_bytes, Some(-1), "a key set on the topic wins over the default");
        assert_eq!(eff.max_message_bytes, Some(10));
        let mut c2 = c;
        c2.set("retention.ms", None).unwrap();
        assert_eq!(c2.retention_ms, None);
        assert_eq!(c.to_map().len(), 2);
    }
}
