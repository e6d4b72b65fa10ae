use std::time::{Duration, Instant};

use super::*;

fn schema() -> SearchSchema {
    SearchSchema { text_fields: vec!["text".into(), "title".into()], filter_fields: vec!["channel".into()] }
}

fn doc(id: &str, channel: &str, text: &str) -> Document {
    Document { id: id.into(), text: vec![("text".into(), text.into())], filters: vec![("channel".into(), channel.into())] }
}

fn query(text: &str, channels: &[&str]) -> SearchQuery {
    SearchQuery { text: text.into(), filter: Some(("channel".into(), channels.iter().map(|c| c.to_string()).collect())), offset: 0, limit: 10 }
}

fn ids(page: &SearchPage) -> Vec<String> {
    let mut ids: Vec<String> = page.hits.iter().map(|h| h.id.clone()).collect();
    ids.sort();
    ids
}

/// A long interval: only explicit commits make changes visible.
fn manual() -> SearchConfig {
    SearchConfig { commit_interval_ms: 60_000, commit_docs: 1_000_000 }
}

#[test]
fn documents_are_found_by_words_only_within_the_scope_asked_for() {
    let dir = tempfile::tempdir().unwrap();
    let searches = Searches::open(dir.path());
    let index = searches.index("chat", schema(), manual()).unwrap();
    index.upsert(doc("a/1", "a", "Deploy the release tonight"), (0, 0)).unwrap();
    index.upsert(doc("b/1", "b", "the deploy failed"), (0, 1)).unwrap();
    index.upsert(doc("a/2", "a", "lunch?"), (0, 2)).unwrap();
    assert_eq!(index.search(&query("deploy", &["a", "b"])).unwrap().total, 0, "nothing is visible before a commit");
    index.commit().unwrap();
    assert_eq!(ids(&index.search(&query("deploy", &["a", "b"])).unwrap()), vec!["a/1", "b/1"]);
    assert_eq!(ids(&index.search(&query("DEPLOY", &["a"])).unwrap()), vec!["a/1"], "case does not matter; the scope does");
    assert_eq!(ids(&index.search(&query("deploy failed", &["a", "b"])).unwrap()), vec!["b/1"], "every word must match");
    assert_eq!(index.search(&query("deploy", &[])).unwrap().total, 0, "an empty scope matches nothing");
    let unscoped = SearchQuery { text: "lunch".into(), filter: None, offset: 0, limit: 10 };
    assert_eq!(ids(&index.search(&unscoped).unwrap()), vec!["a/2"]);
    assert_eq!(index.documents(), 3);
}

#[test]
fn an_upsert_replaces_and_a_delete_removes() {
    let dir = tempfile::tempdir().unwrap();
    let searches = Searches::open(dir.path());
    let index = searches.index("chat", schema(), manual()).unwrap();
    index.upsert(doc("a/1", "a", "old words"), (0, 0)).unwrap();
    index.upsert(doc("a/2", "a", "more old words"), (0, 1)).unwrap();
    index.upsert(doc("a/1", "a", "new words"), (0, 2)).unwrap();
    index.delete("a/2", (0, 3)).unwrap();
    index.commit().unwrap();
    assert_eq!(index.search(&query("old", &["a"])).unwrap().total, 0);
    assert_eq!(ids(&index.search(&query("new", &["a"])).unwrap()), vec!["a/1"]);
    assert_eq!(index.documents(), 1);
}

#[test]
fn hits_are_paged_and_bad_queries_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let searches = Searches::open(dir.path());
    let index = searches.index("chat", schema(), manual()).unwrap();
    for i in 0..25 {
        index.upsert(doc(&format!("a/{i}"), "a", &format!("hello number {i}")), (0, i)).unwrap();
    }
    index.commit().unwrap();
    let mut seen = Vec::new();
    for page in 0..3 {
        let result = index.search(&SearchQuery { offset: page * 10, ..query("hello", &["a"]) }).unwrap();
        assert_eq!(result.total, 25);
        seen.extend(result.hits.into_iter().map(|h| h.id));
    }
    seen.sort();
    seen.dedup();
    assert_eq!(seen.len(), 25, "three pages cover every hit once");
    for bad in [
        SearchQuery { limit: 0, ..query("hello", &["a"]) },
        SearchQuery { limit: SEARCH_PAGE_MAX + 1, ..query("hello", &["a"]) },
        SearchQuery { offset: SEARCH_DEPTH_MAX, ..query("hello", &["a"]) },
        query(&"x".repeat(QUERY_BYTES_MAX + 1), &["a"]),
        query("   ", &["a"]),
        SearchQuery { filter: Some(("nope".into(), vec!["a".into()])), ..query("hello", &[]) },
    ] {
        assert!(matches!(index.search(&bad), Err(SearchError::Invalid(_))), "{bad:?}");
    }
    // Query syntax a user may type by accident is read leniently, not refused.
    assert_eq!(index.search(&query("hello AND (", &["a"])).unwrap().total, 25);
    assert!(matches!(index.upsert(Document { id: String::new(), ..doc("x", "a", "y") }, (0, 99)), Err(SearchError::Invalid(_))));
    let stray = Document { text: vec![("body".into(), "x".into())], ..doc("x", "a", "y") };
    assert!(matches!(index.upsert(stray, (0, 99)), Err(SearchError::Invalid(_))));
}

#[test]
fn the_background_committer_makes_changes_visible_within_its_interval() {
    let dir = tempfile::tempdir().unwrap();
    let searches = Searches::open(dir.path());
    let index = searches.index("chat", schema(), SearchConfig { commit_interval_ms: 50, commit_docs: 1_000_000 }).unwrap();
    index.upsert(doc("a/1", "a", "eventually visible"), (0, 0)).unwrap();
    let began = Instant::now();
    while index.search(&query("eventually", &["a"])).unwrap().total == 0 {
        assert!(began.elapsed() < Duration::from_secs(5), "the committer never committed");
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(index.commits() >= 1);
    assert_eq!(index.checkpoint(), Checkpoint::from([(0, 1)]));

    let by_count = searches.index("counted", schema(), SearchConfig { commit_interval_ms: 60_000, commit_docs: 3 }).unwrap();
    for i in 0..3 {
        by_count.upsert(doc(&format!("a/{i}"), "a", "counted"), (0, i)).unwrap();
    }
    let began = Instant::now();
    while by_count.search(&query("counted", &["a"])).unwrap().total < 3 {
        assert!(began.elapsed() < Duration::from_secs(5), "commit_docs did not trigger a commit");
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn a_crash_keeps_the_last_commit_and_its_checkpoint_says_where_to_replay_from() {
    let dir = tempfile::tempdir().unwrap();
    {
        let searches = Searches::open(dir.path());
        let index = searches.index("chat", schema(), manual()).unwrap();
        index.upsert(doc("a/1", "a", "committed"), (0, 10)).unwrap();
        index.upsert(doc("b/1", "b", "committed too"), (1, 4)).unwrap();
        index.advance((0, 11)).unwrap();
        index.commit().unwrap();
        assert_eq!(index.checkpoint(), Checkpoint::from([(0, 12), (1, 5)]));
        index.upsert(doc("a/2", "a", "lost in the crash"), (0, 12)).unwrap();
        index.delete("a/1", (0, 13)).unwrap();
        index.abandon();
        assert!(matches!(index.upsert(doc("a/3", "a", "x"), (0, 14)), Err(SearchError::Closed { .. })));
    }
    let searches = Searches::open(dir.path());
    let index = searches.index("chat", schema(), manual()).unwrap();
    assert_eq!(index.checkpoint(), Checkpoint::from([(0, 12), (1, 5)]), "the replay starts after the last commit");
    assert_eq!(ids(&index.search(&query("committed", &["a", "b"])).unwrap()), vec!["a/1", "b/1"]);
    assert_eq!(index.search(&query("lost", &["a"])).unwrap().total, 0);
    // Replaying from the checkpoint brings the lost changes back; replaying twice is harmless.
    for _ in 0..2 {
        index.upsert(doc("a/2", "a", "lost in the crash"), (0, 12)).unwrap();
        index.delete("a/1", (0, 13)).unwrap();
    }
    index.commit().unwrap();
    assert_eq!(ids(&index.search(&query("crash", &["a"])).unwrap()), vec!["a/2"]);
    assert_eq!(ids(&index.search(&query("committed", &["a", "b"])).unwrap()), vec!["b/1"]);
    assert_eq!(index.checkpoint(), Checkpoint::from([(0, 14), (1, 5)]));
}

#[test]
fn the_edits_of_one_record_are_committed_together_or_not_at_all() {
    let dir = tempfile::tempdir().unwrap();
    let searches = Searches::open(dir.path());
    // A commit every 2 changes: three edits of one record must still land in one commit, so a
    // checkpoint past the record never covers part of it.
    let index = searches.index("chat", schema(), SearchConfig { commit_interval_ms: 60_000, commit_docs: 2 }).unwrap();
    index.upsert(doc("a/0", "a", "older"), (0, 4)).unwrap();
    let edits = vec![Edit::Upsert(doc("a/1", "a", "together")), Edit::Upsert(doc("a/2", "a", "together")), Edit::Delete("a/0".into()), Edit::Upsert(doc("a/3", "a", "together"))];
    index.record(edits, (0, 5)).unwrap();
    let began = Instant::now();
    loop {
        let total = index.search(&query("together", &["a"])).unwrap().total;
        if total > 0 {
            assert_eq!(total, 3, "a commit holds the whole record");
            break;
        }
        assert!(began.elapsed() < Duration::from_secs(5), "commit_docs did not trigger a commit");
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(index.checkpoint(), Checkpoint::from([(0, 6)]));
    assert_eq!(index.search(&query("older", &["a"])).unwrap().total, 0);
    // A record with a bad document is refused whole: nothing of it is handed in.
    let bad = Document { id: "a/9".into(), text: vec![("nope".into(), "x".into())], filters: vec![] };
    assert!(matches!(index.record(vec![Edit::Upsert(doc("a/8", "a", "partial")), Edit::Upsert(bad)], (0, 6)), Err(SearchError::Invalid(_))));
    index.commit().unwrap();
    assert_eq!(index.search(&query("partial", &["a"])).unwrap().total, 0);
    assert_eq!(index.checkpoint(), Checkpoint::from([(0, 6)]));
}

#[test]
fn a_clean_close_commits_and_another_schema_rebuilds_from_scratch() {
    let dir = tempfile::tempdir().unwrap();
    {
        let searches = Searches::open(dir.path());
        let index = searches.index("chat", schema(), manual()).unwrap();
        index.upsert(doc("a/1", "a", "kept by close"), (0, 0)).unwrap();
        searches.close().unwrap();
        assert!(matches!(index.commit(), Err(SearchError::Closed { .. })));
    }
    {
        let searches = Searches::open(dir.path());
        let index = searches.index("chat", schema(), manual()).unwrap();
        assert_eq!(index.search(&query("kept", &["a"])).unwrap().total, 1);
        assert_eq!(index.checkpoint(), Checkpoint::from([(0, 1)]));
        assert!(matches!(searches.index("chat", SearchSchema { text_fields: vec!["text".into()], filter_fields: vec![] }, manual()), Err(SearchError::Invalid(_))));
        assert_eq!(searches.list(), vec!["chat"]);
    }
    let searches = Searches::open(dir.path());
    let other = SearchSchema { text_fields: vec!["text".into()], filter_fields: vec!["channel".into(), "sender".into()] };
    let index = searches.index("chat", other, manual()).unwrap();
    assert_eq!(index.checkpoint(), Checkpoint::new(), "a new schema starts empty: the caller replays its whole log");
    assert_eq!(index.documents(), 0);
    for bad in ["", ".hidden", "a/b", &"x".repeat(INDEX_NAME_BYTES_MAX + 1)] {
        assert!(matches!(searches.index(bad, schema(), manual()), Err(SearchError::Invalid(_))), "{bad:?}");
    }
    let duplicate = SearchSchema { text_fields: vec!["id".into()], filter_fields: vec![] };
    assert!(matches!(searches.index("dup", duplicate, manual()), Err(SearchError::Invalid(_))));
}
