//! [`SubjectTrie`]: which subscriptions does a subject match, for a million subscriptions at once.
//!
//! Layout, chosen for memory (a million wildcard subscriptions in well under 300 MB):
//!
//! - Nodes live in one `Vec<Node>` and name each other by `u32`. A node is 24 bytes and owns no
//!   heap memory of its own.
//! - Literal edges of every node live in one shared hash table of `(parent, child)` pairs (8 bytes
//!   each), hashed by the parent id and the child's token text. There is no per-node child map, so
//!   a node with one child costs the same as a node with ten thousand.
//! - The token text of each literal node lives in one byte arena, compacted when half of it is
//!   garbage. No `String` per node.
//! - A `*` child is a field of its parent. A trailing `>` is not a node at all: its subscriptions
//!   hang off the node before it (`rest`), as do subscriptions that end at a node (`exact`).
//! - Subscription lists live in a slab; a list with one entry keeps it inline.
//!
//! An MQTT filter `a/#` (which also matches `a`) is stored twice, in `rest` and `exact` of the
//! node for `a`. The two lists match disjoint subjects (`a` versus `a.…`), so every subscription
//! is still reported at most once per subject.
//!
//! The trie is a plain single-threaded structure; the [`Broker`](super::Broker) puts it behind a
//! lock.

use std::hash::{BuildHasher, Hasher};

use hashbrown::{DefaultHashBuilder, HashTable};
use tributary_core::{Subject, SubjectPattern, Token};

/// Identifies one subscription in a [`SubjectTrie`] and in a [`Broker`](super::Broker).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SubscriptionId(pub u64);

type NodeId = u32;
type ListId = u32;
const NONE: u32 = u32::MAX;
const ROOT: NodeId = 0;
/// Text arena garbage below this many bytes is never worth a compaction.
const TEXT_GARBAGE_BYTES_MIN: usize = 64 * 1024;

#[derive(Clone, Copy, Debug)]
struct Node {
    /// Token text of the literal edge into this node (`text_len == 0` for the root and `*` nodes;
    /// a literal token is never empty).
    text_start: u32,
    text_len: u32,
    /// The `*` child.
    one: NodeId,
    /// Subscriptions whose pattern ends at this node.
    exact: ListId,
    /// Subscriptions whose pattern is this node's path followed by `>`.
    rest: ListId,
    literal_children: u32,
}

impl Node {
    const EMPTY: Node =
        Node { text_start: 0, text_len: 0, one: NONE, exact: NONE, rest: NONE, literal_children: 0 };

    fn is_prunable(&self) -> bool {
        self.literal_children == 0 && self.one == NONE && self.exact == NONE && self.rest == NONE
    }
}

const _: () = assert!(size_of::<Node>() == 24);

#[derive(Clone, Copy, Debug)]
struct Edge {
    parent: NodeId,
    child: NodeId,
}

#[derive(Clone, Debug)]
struct Entry<T> {
    id: SubscriptionId,
    value: T,
}

#[derive(Clone, Debug)]
enum EntryList<T> {
    One(Entry<T>),
    /// Two or more entries; an empty `Many` marks a free slab slot.
    Many(Vec<Entry<T>>),
}

impl<T> EntryList<T> {
    fn as_slice(&self) -> &[Entry<T>] {
        match self {
            EntryList::One(entry) => std::slice::from_ref(entry),
            EntryList::Many(entries) => entries,
        }
    }
}

/// A subject trie: subscription patterns (`*`, `>`, MQTT `+`/`#`) to subscriber values.
///
/// `match_subject` reports every subscription whose pattern matches, exactly once, with the same
/// answer as [`SubjectPattern::matches`] for each pattern.
pub struct SubjectTrie<T> {
    nodes: Vec<Node>,
    free_nodes: Vec<NodeId>,
    edges: HashTable<Edge>,
    text: Vec<u8>,
    text_garbage: usize,
    lists: Vec<EntryList<T>>,
    free_lists: Vec<ListId>,
    hasher: DefaultHashBuilder,
    len: usize,
}

impl<T> Default for SubjectTrie<T> {
    fn default() -> Self {
        SubjectTrie::new()
    }
}

fn split_rest(pattern: &SubjectPattern) -> (&[Token], bool) {
    match pattern.tokens().split_last() {
        Some((Token::Rest, body)) => (body, true),
        _ => (pattern.tokens(), false),
    }
}

impl<T> SubjectTrie<T> {
    pub fn new() -> SubjectTrie<T> {
        SubjectTrie {
            nodes: vec![Node::EMPTY],
            free_nodes: Vec::new(),
            edges: HashTable::new(),
            text: Vec::new(),
            text_garbage: 0,
            lists: Vec::new(),
            free_lists: Vec::new(),
            hasher: DefaultHashBuilder::default(),
            len: 0,
        }
    }

    /// Subscriptions held.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Nodes in use, the root included (1 for an empty trie: removal prunes).
    pub fn node_count(&self) -> usize {
        self.nodes.len() - self.free_nodes.len()
    }

    /// Heap bytes held by the trie's own tables (allocator overhead not included).
    pub fn heap_bytes_estimate(&self) -> usize {
        let many: usize = self
            .lists
            .iter()
            .map(|l| match l {
                EntryList::One(_) => 0,
                EntryList::Many(v) => v.capacity() * size_of::<Entry<T>>(),
            })
            .sum();
        self.nodes.capacity() * size_of::<Node>()
            + self.free_nodes.capacity() * 4
            + self.edges.capacity() * (size_of::<Edge>() + 1)
            + self.text.capacity()
            + self.lists.capacity() * size_of::<EntryList<T>>()
            + self.free_lists.capacity() * 4
            + many
    }

    fn text_of(&self, node: NodeId) -> &[u8] {
        let n = &self.nodes[node as usize];
        &self.text[n.text_start as usize..(n.text_start + n.text_len) as usize]
    }

    fn edge_hash(&self, parent: NodeId, token: &[u8]) -> u64 {
        edge_hash(&self.hasher, parent, token)
    }

    fn literal_child(&self, parent: NodeId, token: &[u8]) -> Option<NodeId> {
        let hash = self.edge_hash(parent, token);
        self.edges.find(hash, |e| e.parent == parent && self.text_of(e.child) == token).map(|e| e.child)
    }

    /// Add a subscription. `id` must not already be in the trie under the same pattern.
    pub fn insert(&mut self, pattern: &SubjectPattern, id: SubscriptionId, value: T)
    where
        T: Clone,
    {
        let (body, rest) = split_rest(pattern);
        let mut node = ROOT;
        for token in body {
            node = match token {
                Token::One => {
                    let one = self.nodes[node as usize].one;
                    if one != NONE {
                        one
                    } else {
                        let child = self.alloc_node(b"");
                        self.nodes[node as usize].one = child;
                        child
                    }
                }
                Token::Literal(literal) => match self.literal_child(node, literal.as_bytes()) {
                    Some(child) => child,
                    None => self.add_literal_child(node, literal.as_bytes()),
                },
                Token::Rest => unreachable!("SubjectPattern allows > only last"),
            };
        }
        if rest {
            if pattern.matches_parent() {
                let list = self.nodes[node as usize].exact;
                let list = self.push_entry(list, Entry { id, value: value.clone() });
                self.nodes[node as usize].exact = list;
            }
            let list = self.nodes[node as usize].rest;
            let list = self.push_entry(list, Entry { id, value });
            self.nodes[node as usize].rest = list;
        } else {
            let list = self.nodes[node as usize].exact;
            let list = self.push_entry(list, Entry { id, value });
            self.nodes[node as usize].exact = list;
        }
        self.len += 1;
    }

    /// Remove the subscription `id` that was inserted with `pattern`, pruning nodes left empty.
    ///
    /// The pattern is asked for, rather than looked up by id, so that the trie does not keep a
    /// copy of every pattern: the caller already holds it.
    pub fn remove(&mut self, pattern: &SubjectPattern, id: SubscriptionId) -> Option<T> {
        let (body, rest) = split_rest(pattern);
        let mut path: Vec<NodeId> = Vec::with_capacity(body.len() + 1);
        let mut node = ROOT;
        path.push(node);
        for token in body {
            node = match token {
                Token::One => self.nodes[node as usize].one,
                Token::Literal(literal) => self.literal_child(node, literal.as_bytes())?,
                Token::Rest => unreachable!("SubjectPattern allows > only last"),
            };
            if node == NONE {
                return None;
            }
            path.push(node);
        }
        let removed = if rest {
            let removed = self.remove_entry(node, true, id);
            if removed.is_some() && pattern.matches_parent() {
                self.remove_entry(node, false, id);
            }
            removed
        } else {
            self.remove_entry(node, false, id)
        }?;
        self.len -= 1;
        for depth in (1..path.len()).rev() {
            let child = path[depth];
            if !self.nodes[child as usize].is_prunable() {
                break;
            }
            let parent = path[depth - 1];
            match &body[depth - 1] {
                Token::One => self.nodes[parent as usize].one = NONE,
                Token::Literal(literal) => {
                    let hash = self.edge_hash(parent, literal.as_bytes());
                    let entry = self
                        .edges
                        .find_entry(hash, |e| e.parent == parent && e.child == child)
                        .unwrap_or_else(|_| panic!("trie edge {parent}->{child} missing"));
                    entry.remove();
                    self.nodes[parent as usize].literal_children -= 1;
                }
                Token::Rest => unreachable!(),
            }
            self.free_node(child);
        }
        self.maybe_compact_text();
        Some(removed)
    }

    /// Append to `out` the value of every subscription matching `subject`, each once.
    pub fn match_subject(&self, subject: &Subject, out: &mut Vec<T>)
    where
        T: Clone,
    {
        self.for_each_match(subject, |_, value| out.push(value.clone()));
    }

    /// Call `visit` for every subscription matching `subject`, each once.
    pub fn for_each_match(&self, subject: &Subject, mut visit: impl FnMut(SubscriptionId, &T)) {
        let mut frontier: Vec<NodeId> = Vec::with_capacity(8);
        let mut next: Vec<NodeId> = Vec::with_capacity(8);
        frontier.push(ROOT);
        for token in subject.tokens() {
            let token = token.as_bytes();
            next.clear();
            for &node_id in &frontier {
                let node = &self.nodes[node_id as usize];
                if node.rest != NONE {
                    for entry in self.lists[node.rest as usize].as_slice() {
                        visit(entry.id, &entry.value);
                    }
                }
                if node.literal_children > 0
                    && let Some(child) = self.literal_child(node_id, token)
                {
                    next.push(child);
                }
                if node.one != NONE {
                    next.push(node.one);
                }
            }
            std::mem::swap(&mut frontier, &mut next);
            if frontier.is_empty() {
                return;
            }
        }
        for &node_id in &frontier {
            let exact = self.nodes[node_id as usize].exact;
            if exact != NONE {
                for entry in self.lists[exact as usize].as_slice() {
                    visit(entry.id, &entry.value);
                }
            }
        }
    }

    fn add_literal_child(&mut self, parent: NodeId, token: &[u8]) -> NodeId {
        let child = self.alloc_node(token);
        let hash = self.edge_hash(parent, token);
        let (nodes, text, hasher) = (&self.nodes, &self.text, &self.hasher);
        self.edges.insert_unique(hash, Edge { parent, child }, |e| {
            let n = &nodes[e.child as usize];
            edge_hash(hasher, e.parent, &text[n.text_start as usize..(n.text_start + n.text_len) as usize])
        });
        self.nodes[parent as usize].literal_children += 1;
        child
    }

    fn alloc_node(&mut self, token: &[u8]) -> NodeId {
        assert!(self.text.len() + token.len() < u32::MAX as usize, "trie text arena over 4 GiB");
        let node = Node { text_start: self.text.len() as u32, text_len: token.len() as u32, ..Node::EMPTY };
        self.text.extend_from_slice(token);
        if let Some(id) = self.free_nodes.pop() {
            self.nodes[id as usize] = node;
            id
        } else {
            assert!(self.nodes.len() < NONE as usize, "trie over u32::MAX nodes");
            self.nodes.push(node);
            (self.nodes.len() - 1) as NodeId
        }
    }

    fn free_node(&mut self, id: NodeId) {
        debug_assert!(id != ROOT);
        self.text_garbage += self.nodes[id as usize].text_len as usize;
        self.nodes[id as usize] = Node::EMPTY;
        self.free_nodes.push(id);
    }

    fn maybe_compact_text(&mut self) {
        if self.text_garbage < TEXT_GARBAGE_BYTES_MIN || self.text_garbage * 2 < self.text.len() {
            return;
        }
        let mut text = Vec::with_capacity(self.text.len() - self.text_garbage);
        for node in &mut self.nodes {
            if node.text_len > 0 {
                let start = node.text_start as usize;
                node.text_start = text.len() as u32;
                text.extend_from_slice(&self.text[start..start + node.text_len as usize]);
            }
        }
        // Edge hashes depend on token text, not on where it lives, so the table stays valid.
        self.text = text;
        self.text_garbage = 0;
    }

    fn push_entry(&mut self, list: ListId, entry: Entry<T>) -> ListId {
        if list == NONE {
            let slot = EntryList::One(entry);
            return if let Some(id) = self.free_lists.pop() {
                self.lists[id as usize] = slot;
                id
            } else {
                assert!(self.lists.len() < NONE as usize, "trie over u32::MAX lists");
                self.lists.push(slot);
                (self.lists.len() - 1) as ListId
            };
        }
        let slot = &mut self.lists[list as usize];
        debug_assert!(slot.as_slice().iter().all(|e| e.id != entry.id), "duplicate subscription id");
        match slot {
            EntryList::Many(entries) => entries.push(entry),
            EntryList::One(_) => {
                let EntryList::One(first) = std::mem::replace(slot, EntryList::Many(Vec::new())) else {
                    unreachable!()
                };
                *slot = EntryList::Many(vec![first, entry]);
            }
        }
        list
    }

    fn remove_entry(&mut self, node: NodeId, rest: bool, id: SubscriptionId) -> Option<T> {
        let node_ref = &mut self.nodes[node as usize];
        let list_ref = if rest { &mut node_ref.rest } else { &mut node_ref.exact };
        let list = *list_ref;
        if list == NONE {
            return None;
        }
        let slot = &mut self.lists[list as usize];
        let (value, now_empty) = match slot {
            EntryList::One(entry) if entry.id == id => {
                let EntryList::One(entry) = std::mem::replace(slot, EntryList::Many(Vec::new())) else {
                    unreachable!()
                };
                (entry.value, true)
            }
            EntryList::One(_) => return None,
            EntryList::Many(entries) => {
                let at = entries.iter().position(|e| e.id == id)?;
                let value = entries.swap_remove(at).value;
                if entries.len() == 1 {
                    let last = entries.pop().expect("one entry left");
                    *slot = EntryList::One(last);
                } else if entries.capacity() > 4 * entries.len() {
                    entries.shrink_to(2 * entries.len());
                }
                (value, false)
            }
        };
        if now_empty {
            *list_ref = NONE;
            self.free_lists.push(list);
        }
        Some(value)
    }
}

fn edge_hash(hasher: &DefaultHashBuilder, parent: NodeId, token: &[u8]) -> u64 {
    let mut h = hasher.build_hasher();
    h.write_u32(parent);
    h.write(token);
    h.finish()
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use proptest::prelude::*;

    use super::*;

    fn pattern(text: &str) -> SubjectPattern {
        SubjectPattern::parse(text).unwrap()
    }

    fn subject(text: &str) -> Subject {
        Subject::parse(text).unwrap()
    }

    fn matched(trie: &SubjectTrie<u64>, subject_text: &str) -> Vec<u64> {
        let mut out = Vec::new();
        trie.match_subject(&subject(subject_text), &mut out);
        out.sort_unstable();
        out
    }

    #[test]
    fn wildcards_and_literals_match_as_the_reference_does() {
        let mut trie = SubjectTrie::new();
        let patterns = ["orders.eu.created", "orders.*.created", "orders.>", ">", "*.*", "orders.*"];
        for (i, p) in patterns.iter().enumerate() {
            trie.insert(&pattern(p), SubscriptionId(i as u64), i as u64);
        }
        assert_eq!(matched(&trie, "orders.eu.created"), vec![0, 1, 2, 3]);
        assert_eq!(matched(&trie, "orders.eu"), vec![2, 3, 4, 5]);
        assert_eq!(matched(&trie, "orders"), vec![3]);
        assert_eq!(matched(&trie, "billing.eu.created"), vec![3]);
    }

    #[test]
    fn mqtt_hash_filter_matches_its_parent_once() {
        let mut trie = SubjectTrie::new();
        let filter = SubjectPattern::from_mqtt_filter("sensors/#").unwrap();
        trie.insert(&filter, SubscriptionId(7), 7);
        assert_eq!(matched(&trie, "sensors"), vec![7]);
        assert_eq!(matched(&trie, "sensors.a"), vec![7]);
        assert_eq!(matched(&trie, "sensors.a.b"), vec![7]);
        assert_eq!(matched(&trie, "other"), Vec::<u64>::new());
        assert_eq!(trie.remove(&filter, SubscriptionId(7)), Some(7));
        assert_eq!(matched(&trie, "sensors"), Vec::<u64>::new());
        assert_eq!(trie.node_count(), 1);
    }

    #[test]
    fn many_subscriptions_on_one_pattern_are_each_reported_and_removed() {
        let mut trie = SubjectTrie::new();
        let p = pattern("a.*");
        for i in 0..10 {
            trie.insert(&p, SubscriptionId(i), i);
        }
        assert_eq!(matched(&trie, "a.b"), (0..10).collect::<Vec<_>>());
        assert_eq!(trie.remove(&p, SubscriptionId(3)), Some(3));
        assert_eq!(trie.remove(&p, SubscriptionId(3)), None);
        assert_eq!(matched(&trie, "a.b").len(), 9);
        for i in (0..10).filter(|i| *i != 3) {
            assert_eq!(trie.remove(&p, SubscriptionId(i)), Some(i));
        }
        assert!(trie.is_empty());
        assert_eq!(trie.node_count(), 1);
    }

    #[test]
    fn removing_an_unknown_subscription_changes_nothing() {
        let mut trie = SubjectTrie::new();
        trie.insert(&pattern("a.b"), SubscriptionId(1), 1);
        assert_eq!(trie.remove(&pattern("a.c"), SubscriptionId(1)), None);
        assert_eq!(trie.remove(&pattern("a.b"), SubscriptionId(2)), None);
        assert_eq!(trie.remove(&pattern("a.>"), SubscriptionId(1)), None);
        assert_eq!(matched(&trie, "a.b"), vec![1]);
    }

    #[test]
    fn churn_compacts_the_token_arena_and_keeps_matching() {
        let mut trie = SubjectTrie::new();
        for round in 0..3u64 {
            let patterns: Vec<_> =
                (0..20_000u64).map(|i| pattern(&format!("t.{}-{round}-long-token.*", i))).collect();
            for (i, p) in patterns.iter().enumerate() {
                trie.insert(p, SubscriptionId(i as u64), i as u64);
            }
            assert_eq!(matched(&trie, &format!("t.17-{round}-long-token.x")), vec![17]);
            for (i, p) in patterns.iter().enumerate() {
                assert_eq!(trie.remove(p, SubscriptionId(i as u64)), Some(i as u64));
            }
            assert_eq!(trie.node_count(), 1);
        }
        assert!(trie.text.len() < 2 * TEXT_GARBAGE_BYTES_MIN);
    }

    fn token_strategy() -> impl Strategy<Value = &'static str> {
        prop_oneof![Just("a"), Just("b"), Just("c")]
    }

    fn subject_strategy() -> impl Strategy<Value = String> {
        prop::collection::vec(token_strategy(), 1..5).prop_map(|t| t.join("."))
    }

    /// A NATS pattern or an MQTT filter over a three-letter alphabet, so that patterns overlap a lot.
    fn pattern_strategy() -> impl Strategy<Value = SubjectPattern> {
        let level = prop_oneof![3 => token_strategy(), 2 => Just("*")];
        (prop::collection::vec(level, 1..5), any::<bool>(), any::<bool>()).prop_map(|(levels, rest, mqtt)| {
            let mut levels: Vec<&str> = levels;
            if mqtt {
                let mut mqtt_levels: Vec<&str> =
                    levels.iter().map(|l| if *l == "*" { "+" } else { *l }).collect();
                if rest {
                    mqtt_levels.push("#");
                }
                SubjectPattern::from_mqtt_filter(&mqtt_levels.join("/")).unwrap()
            } else {
                if rest {
                    levels.push(">");
                }
                SubjectPattern::parse(&levels.join(".")).unwrap()
            }
        })
    }

    fn check_against_reference(
        trie: &SubjectTrie<u64>,
        live: &[(u64, SubjectPattern)],
        subjects: &[String],
    ) -> Result<(), TestCaseError> {
        for s in subjects {
            let subject = subject(s);
            let mut got = Vec::new();
            trie.match_subject(&subject, &mut got);
            let got_len = got.len();
            let got: BTreeSet<u64> = got.into_iter().collect();
            prop_assert_eq!(got_len, got.len(), "a subscription was reported twice for {}", s);
            let want: BTreeSet<u64> =
                live.iter().filter(|(_, p)| p.matches(&subject)).map(|(id, _)| *id).collect();
            prop_assert_eq!(got, want, "subject {}", s);
        }
        Ok(())
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]
        #[test]
        fn trie_matches_exactly_what_subject_pattern_matches(
            patterns in prop::collection::vec(pattern_strategy(), 1..40),
            subjects in prop::collection::vec(subject_strategy(), 1..30),
            removals in prop::collection::vec(any::<bool>(), 40),
        ) {
            let mut trie = SubjectTrie::new();
            let mut live: Vec<(u64, SubjectPattern)> = Vec::new();
            for (i, p) in patterns.into_iter().enumerate() {
                trie.insert(&p, SubscriptionId(i as u64), i as u64);
                live.push((i as u64, p));
            }
            check_against_reference(&trie, &live, &subjects)?;

            let (gone, kept): (Vec<_>, Vec<_>) =
                live.into_iter().partition(|(id, _)| removals[*id as usize]);
            for (id, p) in &gone {
                prop_assert_eq!(trie.remove(p, SubscriptionId(*id)), Some(*id));
            }
            prop_assert_eq!(trie.len(), kept.len());
            check_against_reference(&trie, &kept, &subjects)?;

            for (id, p) in &kept {
                prop_assert_eq!(trie.remove(p, SubscriptionId(*id)), Some(*id));
            }
            prop_assert_eq!(trie.node_count(), 1, "removal prunes every node but the root");
            prop_assert_eq!(trie.edges.len(), 0);
        }
    }
}
