//! Topic names and their validation rule.

use std::fmt;

use serde::{Deserialize, Serialize};

/// Kafka's limit: a topic name is 1 to 249 characters of `[a-zA-Z0-9._-]`.
pub const MAX_TOPIC_NAME_LEN: usize = 249;

/// A validated topic name. Construct with [`TopicName::new`], which applies Kafka's rule, so every
/// name that exists in the cluster is also a valid Kafka topic name.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct TopicName(String);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TopicNameError {
    #[error("topic name is empty")]
    Empty,
    #[error("topic name is {0} characters long; the limit is {MAX_TOPIC_NAME_LEN}")]
    TooLong(usize),
    #[error("topic name {name:?} contains {ch:?}; only ASCII letters, digits, '.', '_' and '-' are allowed")]
    BadChar { name: String, ch: char },
    #[error("topic name may not be \".\" or \"..\"")]
    Dots,
}

impl TopicName {
    pub fn new(name: impl Into<String>) -> Result<Self, TopicNameError> {
        let name = name.into();
        if name.is_empty() {
            return Err(TopicNameError::Empty);
        }
        if name.len() > MAX_TOPIC_NAME_LEN {
            return Err(TopicNameError::TooLong(name.len()));
        }
        if name == "." || name == ".." {
            return Err(TopicNameError::Dots);
        }
        if let Some(ch) = name.chars().find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))) {
            return Err(TopicNameError::BadChar { name, ch });
        }
        Ok(Self(name))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for TopicName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kafka_rule() {
        assert!(TopicName::new("orders.v1_eu-west").is_ok());
        assert_eq!(TopicName::new(""), Err(TopicNameError::Empty));
        assert_eq!(TopicName::new("a".repeat(250)), Err(TopicNameError::TooLong(250)));
        assert!(TopicName::new("a".repeat(249)).is_ok());
        assert!(matches!(TopicName::new("a b"), Err(TopicNameError::BadChar { ch: ' ', .. })));
        assert!(matches!(TopicName::new("é"), Err(TopicNameError::BadChar { .. })));
        assert_eq!(TopicName::new(".."), Err(TopicNameError::Dots));
    }
}
