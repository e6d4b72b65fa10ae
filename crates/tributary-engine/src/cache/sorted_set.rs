//! The sorted set behind `zadd` / `zrank`: a skip list with spans (Redis's `zskiplist`), kept in
//! an arena of nodes addressed by `u32`, plus a member → score map.
//!
//! Order is by score, then by member bytes (as Redis). Every link carries a *span*: how many
//! level-0 steps it jumps. Summing spans along a search path gives a rank, so rank lookups,
//! rank ranges and score ranges are all O(log n) expected; `score` is O(1) through the map.
//!
//! Invariants (checked by `check_invariants` in tests):
//! - level 0 is strictly increasing by (score, member) and holds exactly `len` nodes;
//! - `backward` is the level-0 predecessor (`NIL` for the first node), `tail` the last node;
//! - for every level below `level`, a link's span is the rank distance it covers (to the end of
//!   the list for a `NIL` link);
//! - the map and the list hold the same (member, score) pairs; no score is NaN.

use std::collections::HashMap;
use std::ops::Bound;

use bytes::Bytes;

/// Skip-list height bound: 4^32 nodes is far above any collection limit.
const LEVELS_MAX: usize = 32;
const NIL: u32 = u32::MAX;
const HEAD: u32 = 0;

/// Direction of a range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Order {
    /// Lowest score first.
    Asc,
    /// Highest score first (a leaderboard's natural order).
    Desc,
}

#[derive(Clone, Copy)]
struct Link {
    next: u32,
    span: u32,
}

/// Links of the lowest levels live inside the node, beside the score, so one step of a search
/// touches one cache line; only one node in 4^LINKS_INLINE has links in `upper`.
const LINKS_INLINE: usize = 4;

#[repr(C)]
struct Node {
    score: f64,
    inline: [Link; LINKS_INLINE],
    backward: u32,
    height: u32,
    member: Bytes,
    upper: Box<[Link]>,
}

impl Node {
    fn new(score: f64, member: Bytes, height: usize) -> Node {
        let none = Link { next: NIL, span: 0 };
        Node {
            score,
            inline: [none; LINKS_INLINE],
            backward: NIL,
            height: height as u32,
            member,
            upper: vec![none; height.saturating_sub(LINKS_INLINE)].into_boxed_slice(),
        }
    }

    #[inline]
    fn height(&self) -> usize {
        self.height as usize
    }

    #[inline]
    fn link(&self, i: usize) -> Link {
        debug_assert!(i < self.height());
        if i < LINKS_INLINE { self.inline[i] } else { self.upper[i - LINKS_INLINE] }
    }

    #[inline]
    fn link_mut(&mut self, i: usize) -> &mut Link {
        debug_assert!(i < self.height());
        if i < LINKS_INLINE { &mut self.inline[i] } else { &mut self.upper[i - LINKS_INLINE] }
    }

    /// Whether this node sorts strictly before (score, member).
    #[inline]
    fn precedes(&self, score: f64, member: &[u8]) -> bool {
        self.score < score || (self.score == score && self.member.as_ref() < member)
    }
}

pub(crate) struct SortedSet {
    nodes: Vec<Node>,
    free: Vec<u32>,
    scores: HashMap<Bytes, f64>,
    level: usize,
    tail: u32,
    rng: u64,
}

impl Default for SortedSet {
    fn default() -> Self {
        Self::new()
    }
}

impl SortedSet {
    pub(crate) fn new() -> SortedSet {
        let head = Node::new(f64::NEG_INFINITY, Bytes::new(), LEVELS_MAX);
        SortedSet {
            nodes: vec![head],
            free: Vec::new(),
            scores: HashMap::new(),
            level: 1,
            tail: NIL,
            rng: 0x9e37_79b9_7f4a_7c15,
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.scores.len()
    }

    pub(crate) fn score(&self, member: &[u8]) -> Option<f64> {
        self.scores.get(member).copied()
    }

    /// Insert `member` with `score`, or move it to `score`. Returns whether it is new.
    pub(crate) fn insert(&mut self, member: &[u8], score: f64) -> bool {
        debug_assert!(!score.is_nan(), "callers reject NaN scores");
        let score = score + 0.0; // -0.0 and 0.0 are one score: store one spelling
        if let Some(old) = self.scores.get_mut(member) {
            if *old == score {
                return false;
            }
            let old_score = *old;
            *old = score;
            let node = self.remove_node(old_score, member);
            let member = std::mem::take(&mut self.nodes[node as usize].member);
            self.release(node);
            self.insert_node(score, member);
            return false;
        }
        let member = Bytes::copy_from_slice(member);
        self.scores.insert(member.clone(), score);
        self.insert_node(score, member);
        true
    }

    pub(crate) fn remove(&mut self, member: &[u8]) -> bool {
        let Some(score) = self.scores.remove(member) else {
            return false;
        };
        let node = self.remove_node(score, member);
        self.release(node);
        true
    }

    /// 0-based rank of `member` in ascending order.
    pub(crate) fn rank(&self, member: &[u8]) -> Option<usize> {
        let score = self.score(member)?;
        let (count, _) =
            self.count_while(|n| n.score < score || (n.score == score && n.member.as_ref() <= member));
        debug_assert!(count > 0);
        Some(count - 1)
    }

    /// Members whose score is within (min, max).
    pub(crate) fn count_in(&self, min: Bound<f64>, max: Bound<f64>) -> usize {
        let (lo, hi) = self.score_ranks(min, max);
        hi.saturating_sub(lo)
    }

    /// Members at ranks `start..end` counted in `order` (rank 0 is the first in that order).
    pub(crate) fn range_by_rank(&self, start: usize, end: usize, order: Order) -> Vec<(Bytes, f64)> {
        let len = self.len();
        let (start, end) = (start.min(len), end.min(len));
        if start >= end {
            return Vec::new();
        }
        match order {
            Order::Asc => self.collect_ascending(start, end, Order::Asc),
            Order::Desc => self.collect_ascending(len - end, len - start, Order::Desc),
        }
    }

    /// Members with a score within (min, max), in `order`, skipping `offset` and taking at most
    /// `count`.
    pub(crate) fn range_by_score(
        &self,
        min: Bound<f64>,
        max: Bound<f64>,
        order: Order,
        offset: usize,
        count: usize,
    ) -> Vec<(Bytes, f64)> {
        let (lo, hi) = self.score_ranks(min, max);
        if lo >= hi {
            return Vec::new();
        }
        match order {
            Order::Asc => {
                let start = lo.saturating_add(offset).min(hi);
                let end = start.saturating_add(count).min(hi);
                self.collect_ascending(start, end, Order::Asc)
            }
            Order::Desc => {
                let end = hi.saturating_sub(offset).max(lo);
                let start = end.saturating_sub(count).max(lo);
                self.collect_ascending(start, end, Order::Desc)
            }
        }
    }

    /// Every (member, score), ascending.
    pub(crate) fn iter(&self) -> impl Iterator<Item = (&Bytes, f64)> + '_ {
        let mut x = self.nodes[HEAD as usize].link(0).next;
        std::iter::from_fn(move || {
            if x == NIL {
                return None;
            }
            let node = &self.nodes[x as usize];
            x = node.link(0).next;
            Some((&node.member, node.score))
        })
    }

    /// The ascending ranks `[lo, hi)` of the members within (min, max).
    fn score_ranks(&self, min: Bound<f64>, max: Bound<f64>) -> (usize, usize) {
        let lo = match min {
            Bound::Unbounded => 0,
            Bound::Included(m) => self.count_while(|n| n.score < m).0,
            Bound::Excluded(m) => self.count_while(|n| n.score <= m).0,
        };
        let hi = match max {
            Bound::Unbounded => self.len(),
            Bound::Included(m) => self.count_while(|n| n.score <= m).0,
            Bound::Excluded(m) => self.count_while(|n| n.score < m).0,
        };
        (lo, hi)
    }

    /// Ascending ranks `[start, end)`, returned in `order`. Requires `end <= len`.
    fn collect_ascending(&self, start: usize, end: usize, order: Order) -> Vec<(Bytes, f64)> {
        debug_assert!(end <= self.len());
        if start >= end {
            return Vec::new();
        }
        let mut out = Vec::with_capacity(end - start);
        let mut x = match order {
            Order::Asc => self.node_at(start),
            Order::Desc => self.node_at(end - 1),
        };
        for _ in start..end {
            let node = &self.nodes[x as usize];
            out.push((node.member.clone(), node.score));
            x = match order {
                Order::Asc => node.link(0).next,
                Order::Desc => node.backward,
            };
        }
        out
    }

    /// How many nodes, from the first, satisfy `pred` (which must hold for a prefix of the list
    /// and fail for the rest), and the last of them (`HEAD` when none).
    #[inline]
    fn count_while(&self, pred: impl Fn(&Node) -> bool) -> (usize, u32) {
        let mut x = HEAD;
        let mut count = 0usize;
        for i in (0..self.level).rev() {
            loop {
                let link = self.nodes[x as usize].link(i);
                if link.next != NIL && pred(&self.nodes[link.next as usize]) {
                    count += link.span as usize;
                    x = link.next;
                } else {
                    break;
                }
            }
        }
        (count, x)
    }

    /// The node at 0-based ascending `rank`. Requires `rank < len`.
    fn node_at(&self, rank: usize) -> u32 {
        debug_assert!(rank < self.len());
        let target = rank + 1; // the head is rank 0 of the walk
        let mut x = HEAD;
        let mut traversed = 0usize;
        for i in (0..self.level).rev() {
            loop {
                let link = self.nodes[x as usize].link(i);
                if link.next != NIL && traversed + link.span as usize <= target {
                    traversed += link.span as usize;
                    x = link.next;
                } else {
                    break;
                }
            }
            if traversed == target {
                return x;
            }
        }
        unreachable!("rank {rank} is below len {}", self.len())
    }

    fn random_level(&mut self) -> usize {
        // xorshift64: levels need not be unpredictable, only geometric with p = 1/4.
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        (1 + (self.rng.trailing_zeros() / 2) as usize).min(LEVELS_MAX)
    }

    /// Add a node for (score, member), which must not be in the list.
    #[allow(clippy::needless_range_loop)] // `i` indexes three arrays in step
    fn insert_node(&mut self, score: f64, member: Bytes) {
        let mut update = [HEAD; LEVELS_MAX];
        let mut rank = [0u32; LEVELS_MAX];
        let mut x = HEAD;
        for i in (0..self.level).rev() {
            rank[i] = if i == self.level - 1 { 0 } else { rank[i + 1] };
            loop {
                let link = self.nodes[x as usize].link(i);
                if link.next != NIL && self.nodes[link.next as usize].precedes(score, &member) {
                    rank[i] += link.span;
                    x = link.next;
                } else {
                    break;
                }
            }
            update[i] = x;
        }
        let level = self.random_level();
        if level > self.level {
            let len = self.len() as u32 - 1; // the map already counts the new member
            for i in self.level..level {
                rank[i] = 0;
                update[i] = HEAD;
                self.nodes[HEAD as usize].link_mut(i).span = len;
            }
            self.level = level;
        }
        let new = self.alloc(score, member, level);
        for i in 0..level {
            let prev = self.nodes[update[i] as usize].link_mut(i);
            let (prev_next, prev_span) = (prev.next, prev.span);
            prev.next = new;
            prev.span = rank[0] - rank[i] + 1;
            *self.nodes[new as usize].link_mut(i) =
                Link { next: prev_next, span: prev_span - (rank[0] - rank[i]) };
        }
        for i in level..self.level {
            self.nodes[update[i] as usize].link_mut(i).span += 1;
        }
        let next = self.nodes[new as usize].link(0).next;
        self.nodes[new as usize].backward = if update[0] == HEAD { NIL } else { update[0] };
        if next == NIL {
            self.tail = new;
        } else {
            self.nodes[next as usize].backward = new;
        }
    }

    /// Take the node for (score, member) out of the list and return it, still allocated.
    #[allow(clippy::needless_range_loop)] // `i` indexes two arrays in step
    fn remove_node(&mut self, score: f64, member: &[u8]) -> u32 {
        let mut update = [HEAD; LEVELS_MAX];
        let mut x = HEAD;
        for i in (0..self.level).rev() {
            loop {
                let link = self.nodes[x as usize].link(i);
                if link.next != NIL && self.nodes[link.next as usize].precedes(score, member) {
                    x = link.next;
                } else {
                    break;
                }
            }
            update[i] = x;
        }
        let node = self.nodes[update[0] as usize].link(0).next;
        assert!(
            node != NIL
                && self.nodes[node as usize].score == score
                && self.nodes[node as usize].member.as_ref() == member,
            "sorted set map and list disagree"
        );
        for i in 0..self.level {
            let node_link = (i < self.nodes[node as usize].height()).then(|| self.nodes[node as usize].link(i));
            let prev = self.nodes[update[i] as usize].link_mut(i);
            match node_link {
                Some(link) if prev.next == node => {
                    prev.span = prev.span + link.span - 1;
                    prev.next = link.next;
                }
                _ => prev.span -= 1,
            }
        }
        let (next, backward) = (self.nodes[node as usize].link(0).next, self.nodes[node as usize].backward);
        if next == NIL {
            self.tail = backward;
        } else {
            self.nodes[next as usize].backward = backward;
        }
        while self.level > 1 && self.nodes[HEAD as usize].link(self.level - 1).next == NIL {
            self.level -= 1;
        }
        node
    }

    fn alloc(&mut self, score: f64, member: Bytes, level: usize) -> u32 {
        let node = Node::new(score, member, level);
        match self.free.pop() {
            Some(i) => {
                self.nodes[i as usize] = node;
                i
            }
            None => {
                let i = u32::try_from(self.nodes.len()).expect("sorted set arena is bounded by CACHE_COLLECTION_LEN_MAX");
                assert!(i != NIL);
                self.nodes.push(node);
                i
            }
        }
    }

    fn release(&mut self, node: u32) {
        let n = &mut self.nodes[node as usize];
        n.member = Bytes::new();
        n.upper = Box::new([]);
        n.height = 0;
        self.free.push(node);
    }

    /// Panic if any invariant of the module doc is broken.
    #[cfg(test)]
    pub(crate) fn check_invariants(&self) {
        let mut position = HashMap::new(); // node -> ascending position, head = 0
        position.insert(HEAD, 0usize);
        let (mut x, mut prev, mut count) = (self.nodes[0].link(0).next, NIL, 0usize);
        while x != NIL {
            count += 1;
            position.insert(x, count);
            let node = &self.nodes[x as usize];
            assert!(!node.score.is_nan());
            assert_eq!(node.backward, prev, "backward link of node {count}");
            if prev != NIL {
                let p = &self.nodes[prev as usize];
                assert!(p.precedes(node.score, &node.member), "level 0 out of order at {count}");
            }
            assert_eq!(self.scores.get(&node.member), Some(&node.score), "map disagrees with list");
            assert!(node.height() <= self.level);
            prev = x;
            x = node.link(0).next;
        }
        assert_eq!(self.tail, prev);
        assert_eq!(count, self.len());
        for i in 0..self.level {
            let mut x = HEAD;
            loop {
                let link = self.nodes[x as usize].link(i);
                let here = position[&x];
                let there = if link.next == NIL { count } else { position[&link.next] };
                assert!(link.next == NIL || there > here, "level {i} goes backwards");
                assert_eq!(link.span as usize, there - here, "span at level {i} from position {here}");
                if link.next == NIL {
                    break;
                }
                x = link.next;
            }
        }
        assert!(self.level == 1 || self.nodes[0].link(self.level - 1).next != NIL);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// The model: a Vec sorted by (score, member).
    #[derive(Default)]
    struct Model(Vec<(f64, Vec<u8>)>);

    impl Model {
        fn insert(&mut self, member: &[u8], score: f64) -> bool {
            let new = self.remove(member).is_none();
            let at = self.0.partition_point(|(s, m)| *s < score || (*s == score && m.as_slice() < member));
            self.0.insert(at, (score + 0.0, member.to_vec()));
            new
        }
        fn remove(&mut self, member: &[u8]) -> Option<f64> {
            let at = self.0.iter().position(|(_, m)| m == member)?;
            Some(self.0.remove(at).0)
        }
        fn in_bounds(score: f64, min: Bound<f64>, max: Bound<f64>) -> bool {
            (match min {
                Bound::Unbounded => true,
                Bound::Included(m) => score >= m,
                Bound::Excluded(m) => score > m,
            }) && (match max {
                Bound::Unbounded => true,
                Bound::Included(m) => score <= m,
                Bound::Excluded(m) => score < m,
            })
        }
    }

    #[derive(Debug, Clone)]
    enum Op {
        Insert(u8, i8),
        Remove(u8),
    }

    fn op() -> impl Strategy<Value = Op> {
        // Few members and few scores, so updates, ties and removals are frequent.
        prop_oneof![
            3 => (0u8..40, -8i8..8).prop_map(|(m, s)| Op::Insert(m, s)),
            1 => (0u8..40).prop_map(Op::Remove),
        ]
    }

    fn bound() -> impl Strategy<Value = Bound<f64>> {
        prop_oneof![
            Just(Bound::Unbounded),
            (-9i8..9).prop_map(|s| Bound::Included(f64::from(s) / 2.0)),
            (-9i8..9).prop_map(|s| Bound::Excluded(f64::from(s) / 2.0)),
        ]
    }

    fn member(m: u8) -> Vec<u8> {
        format!("m{m:02}").into_bytes()
    }

    fn pairs(v: &[(Bytes, f64)]) -> Vec<(f64, Vec<u8>)> {
        v.iter().map(|(m, s)| (*s, m.to_vec())).collect()
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

        #[test]
        fn sorted_set_matches_a_sorted_vec_model(
            ops in prop::collection::vec(op(), 1..200),
            min in bound(),
            max in bound(),
            offset in 0usize..6,
            count in 0usize..12,
        ) {
            let (mut set, mut model) = (SortedSet::new(), Model::default());
            for op in &ops {
                match *op {
                    Op::Insert(m, s) => {
                        let score = f64::from(s) / 2.0;
                        prop_assert_eq!(set.insert(&member(m), score), model.insert(&member(m), score));
                    }
                    Op::Remove(m) => {
                        prop_assert_eq!(set.remove(&member(m)), model.remove(&member(m)).is_some());
                    }
                }
                set.check_invariants();
            }
            let len = model.0.len();
            prop_assert_eq!(set.len(), len);
            for (rank, (score, m)) in model.0.iter().enumerate() {
                prop_assert_eq!(set.rank(m), Some(rank));
                prop_assert_eq!(set.score(m), Some(*score));
            }
            prop_assert_eq!(set.rank(b"absent"), None);
            prop_assert_eq!(pairs(&set.range_by_rank(0, usize::MAX, Order::Asc)), model.0.clone());
            let reversed: Vec<_> = model.0.iter().rev().cloned().collect();
            prop_assert_eq!(pairs(&set.range_by_rank(0, len, Order::Desc)), reversed.clone());
            let (a, b) = (offset.min(len), (offset + count).min(len));
            prop_assert_eq!(pairs(&set.range_by_rank(offset, offset + count, Order::Asc)), model.0[a..b].to_vec());
            prop_assert_eq!(pairs(&set.range_by_rank(offset, offset + count, Order::Desc)), reversed[a..b].to_vec());

            let within: Vec<_> = model.0.iter().filter(|(s, _)| Model::in_bounds(*s, min, max)).cloned().collect();
            prop_assert_eq!(set.count_in(min, max), within.len());
            let asc: Vec<_> = within.iter().skip(offset).take(count).cloned().collect();
            prop_assert_eq!(pairs(&set.range_by_score(min, max, Order::Asc, offset, count)), asc);
            let desc: Vec<_> = within.iter().rev().skip(offset).take(count).cloned().collect();
            prop_assert_eq!(pairs(&set.range_by_score(min, max, Order::Desc, offset, count)), desc);
            let all: Vec<_> = set.iter().map(|(m, s)| (s, m.to_vec())).collect();
            prop_assert_eq!(all, model.0.clone());
        }
    }

    #[test]
    fn ties_are_broken_by_member_bytes() {
        let mut set = SortedSet::new();
        for m in [&b"carol"[..], b"alice", b"bob"] {
            set.insert(m, 1.0);
        }
        let names: Vec<_> = set.range_by_rank(0, 3, Order::Asc).into_iter().map(|(m, _)| m).collect();
        assert_eq!(names, [&b"alice"[..], b"bob", b"carol"]);
    }

    #[test]
    fn negative_zero_and_zero_are_the_same_score() {
        let mut set = SortedSet::new();
        set.insert(b"a", -0.0);
        assert!(!set.insert(b"a", 0.0));
        set.insert(b"b", 0.0);
        assert_eq!(set.rank(b"b"), Some(1));
        set.check_invariants();
    }

    #[test]
    fn a_large_set_keeps_its_invariants_through_churn() {
        let mut set = SortedSet::new();
        let mut x = 12345u64;
        for i in 0..20_000u64 {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            let m = format!("p{}", x % 5000);
            if i % 3 == 0 {
                set.remove(m.as_bytes());
            } else {
                set.insert(m.as_bytes(), (x >> 40) as f64 % 1000.0);
            }
        }
        set.check_invariants();
        let all = set.range_by_rank(0, usize::MAX, Order::Asc);
        for (rank, (m, _)) in all.iter().enumerate().step_by(97) {
            assert_eq!(set.rank(m), Some(rank));
        }
    }
}
