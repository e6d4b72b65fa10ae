//! Pub/sub (in progress).

mod trie;

pub use trie::{SubjectTrie, SubscriptionId};
