//! The errors of the stream layer (topics, partitions, consumer groups).

use tributary_log::LogError;

#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    #[error("topic {0:?} does not exist")]
    TopicNotFound(String),
    #[error("topic {name:?} already exists with a different configuration ({existing})")]
    TopicExists { name: String, existing: String },
    #[error("topic {topic:?} has no partition {partition} (it has {partitions})")]
    PartitionNotFound { topic: String, partition: u32, partitions: u32 },
    #[error("{0}")]
    Invalid(String),
    /// A record was over a size limit of the backend (which the message names); nothing of the
    /// request was written.
    #[error("{0}")]
    TooLarge(String),
    #[error("member {member:?} is not in group {group:?} (expired after its session timeout, or never joined): join again")]
    UnknownMember { group: String, member: String },
    #[error("group {group:?} rebalanced to generation {current}; member {member:?} is at {given}: heartbeat to get the new assignment")]
    StaleGeneration { group: String, member: String, given: u64, current: u64 },
    #[error("member {member:?} of group {group:?} does not own partition {partition} in generation {generation}")]
    NotAssigned { group: String, member: String, partition: u32, generation: u64 },
    /// A conditional append ([`StreamStore::produce_at`](crate::stream::StreamStore::produce_at))
    /// found the partition ending at `end`, not at `expected`: another writer appended first.
    /// The first `appended` records went in, from `expected` on; the rest did not (on the
    /// embedded engine a refused append writes nothing, so `appended` is 0).
    #[error("partition {partition} of topic {topic:?} ends at {end}, not at {expected} as the append expected; {appended} of its records went in")]
    EndMoved { topic: String, partition: u32, expected: u64, end: u64, appended: usize },
    #[error("partition {partition} of topic {topic:?}: {source}")]
    Partition { topic: String, partition: u32, source: LogError },
    #[error(transparent)]
    Log(#[from] LogError),
    #[error("{context}: {source}")]
    Io { context: String, source: std::io::Error },
    /// A distributed backend could not answer (connection lost, timeout, an unexpected reply).
    /// Whether a write took effect is unknown.
    #[error("{backend} backend: {message}")]
    Backend { backend: &'static str, message: String },
}

pub type Result<T, E = StreamError> = std::result::Result<T, E>;
