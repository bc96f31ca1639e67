use super::*;

fn store() -> Learned {
    Learned::new(LearnedMetrics::default())
}

const SET: (&str, &str) = ("london", "storage");

#[test]
fn record_learns_new_names_once_and_enforce_only_counts_known_ones() {
    let learned = store();
    let host = "acct1.file.core.windows.net";
    assert!(!learned.knows("london", "storage", host, 443));
    assert_eq!(learned.note(SET, host, 443, Learn::Record, 4), Noted::New);
    assert_eq!(learned.note(SET, host, 443, Learn::Record, 4), Noted::Known);
    assert!(learned.knows("london", "storage", host, 443));
    // Per branch, rule and port.
    assert!(!learned.knows("paris", "storage", host, 443));
    assert!(!learned.knows("london", "other", host, 443));
    assert!(!learned.knows("london", "storage", host, 8443));
    // Enforce never learns.
    assert_eq!(
        learned.note(SET, "acct2.file.core.windows.net", 443, Learn::Enforce, 4),
        Noted::Unknown
    );
    assert_eq!(
        learned.note(SET, host, 443, Learn::Enforce, 4),
        Noted::Known
    );
    let rows = learned.rows(None);
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].seen.count, 3);
    let new = &learned.metrics.new_destinations;
    assert_eq!(
        new.get_or_create(&LearnedMetrics::labels("london", "storage"))
            .get(),
        1
    );
}

#[test]
fn a_full_set_learns_nothing_more_until_one_is_forgotten() {
    let learned = store();
    for i in 0..3 {
        let host = format!("a{i}.file.core.windows.net");
        assert_eq!(learned.note(SET, &host, 443, Learn::Record, 3), Noted::New);
    }
    assert_eq!(
        learned.note(SET, "a3.file.core.windows.net", 443, Learn::Record, 3),
        Noted::Full
    );
    assert!(
        learned
            .approve("london", "storage", "a3.file.core.windows.net", 443, 3)
            .is_err()
    );
    assert_eq!(
        learned.forget("london", None, "a0.file.core.windows.net", None),
        1
    );
    assert_eq!(
        learned.note(SET, "a3.file.core.windows.net", 443, Learn::Record, 3),
        Noted::New
    );
    // Approving what is known marks it approved without adding.
    assert_eq!(
        learned.approve("london", "storage", "a1.file.core.windows.net", 443, 3),
        Ok(false)
    );
    let rows = learned.rows(Some("london"));
    assert_eq!(rows.len(), 3);
    assert!(
        rows.iter()
            .any(|r| r.host == "a1.file.core.windows.net" && r.seen.approved)
    );
    // Forget by port, by rule, and nothing for a branch without sets.
    assert_eq!(
        learned.forget("london", Some("other"), "a1.file.core.windows.net", None),
        0
    );
    assert_eq!(
        learned.forget("london", None, "a1.file.core.windows.net", Some(80)),
        0
    );
    assert_eq!(
        learned.forget(
            "london",
            Some("storage"),
            "a1.file.core.windows.net",
            Some(443)
        ),
        1
    );
    assert_eq!(
        learned.forget("oslo", None, "a1.file.core.windows.net", None),
        0
    );
}

#[test]
fn the_state_file_round_trips_and_a_leftover_temporary_file_is_ignored() {
    let dir = std::env::temp_dir().join(format!("portcullis-learned-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let path = dir.join(FILE_NAME);
    let learned = store();
    learned.note(SET, "acct1.file.core.windows.net", 443, Learn::Record, 8);
    learned
        .approve("paris", "storage", "acct2.file.core.windows.net", 443, 8)
        .unwrap();
    let rows = learned.rows(None);
    save(&path, &rows);
    // A crash mid-write leaves a partial temporary file beside the complete one.
    std::fs::write(
        state_file::temporary(&path),
        b"{\"format\": \"portcullis-le",
    )
    .unwrap();
    let loaded = state_file::load(&path).unwrap();
    assert_eq!(loaded.len(), 2);
    for (a, b) in loaded.iter().zip(&rows) {
        assert_eq!((&a.branch, &a.rule, &a.host), (&b.branch, &b.rule, &b.host));
        assert_eq!(a.seen, b.seen);
    }
    // Saving again replaces the leftover.
    save(&path, &loaded);
    assert!(!state_file::temporary(&path).exists());
    assert_eq!(
        state_file::load(&dir.join("none.json")).unwrap(),
        Vec::new()
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

fn save(path: &Path, rows: &[Row]) {
    state_file::save(path, rows).unwrap();
}

#[test]
fn a_damaged_state_file_is_refused_with_its_place() {
    let err = state_file::parse(
        "{\n  \"format\": \"portcullis-learned-1\",\n  \"destinations\": [\n    {\"branch\": 1}\n",
    )
    .unwrap_err();
    assert!(err.starts_with("line 4 column "), "{err}");
    let err = state_file::parse("{\"format\": \"other\", \"destinations\": []}").unwrap_err();
    assert!(err.contains("expected \"portcullis-learned-1\""), "{err}");
    let text = "{\"format\": \"portcullis-learned-1\", \"destinations\": [{\"branch\": \"a\", \"rule\": \"r\", \"host\": \"bad host\", \"port\": 443, \"first_seen\": \"2026-12-01T00:00:00Z\", \"last_seen\": \"2026-12-01T00:00:00Z\", \"count\": 1}]}";
    let err = state_file::parse(text).unwrap_err();
    assert!(
        err.starts_with("destinations[0]: host \"bad host\""),
        "{err}"
    );
}

#[test]
fn the_lock_is_exclusive() {
    let dir = std::env::temp_dir().join(format!("portcullis-lock-{}", std::process::id()));
    let held = state_file::lock(&dir).unwrap();
    let err = state_file::lock(&dir).unwrap_err();
    assert!(err.contains("another process holds it"), "{err}");
    drop(held);
    drop(state_file::lock(&dir).unwrap());
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn merging_with_redis_keeps_what_was_not_shared_yet_and_drops_what_was_forgotten() {
    let learned = store();
    learned.note(SET, "a.file.core.windows.net", 443, Learn::Record, 8);
    learned.note(SET, "b.file.core.windows.net", 443, Learn::Record, 8);
    let (unshared, forgotten) = learned.unshared();
    assert_eq!((unshared.len(), forgotten.len()), (2, 0));
    learned.shared(&unshared, 0);
    assert!(learned.unshared().0.is_empty());
    // Learned here after the push: not in Redis yet, kept.
    learned.note(SET, "c.file.core.windows.net", 443, Learn::Record, 8);
    // Redis: another replica learned d, an operator forgot b on another replica.
    let mut redis: Vec<Row> = unshared
        .into_iter()
        .filter(|r| r.host.starts_with('a'))
        .collect();
    let mut d = redis[0].clone();
    d.host = "d.file.core.windows.net".into();
    redis.push(d);
    assert_eq!(learned.merge_shared(redis), (1, 1));
    let hosts: Vec<String> = learned.rows(None).into_iter().map(|r| r.host).collect();
    assert_eq!(
        hosts,
        [
            "a.file.core.windows.net",
            "c.file.core.windows.net",
            "d.file.core.windows.net"
        ]
    );
    // Forgetting what Redis holds queues it for Redis; what it never held is not queued.
    learned.forget("london", None, "a.file.core.windows.net", None);
    learned.forget("london", None, "c.file.core.windows.net", None);
    let (unshared, forgotten) = learned.unshared();
    assert_eq!(forgotten.len(), 1);
    assert_eq!(forgotten[0].host, "a.file.core.windows.net");
    assert!(unshared.is_empty());
    learned.shared(&[], 1);
    assert!(learned.unshared().1.is_empty());
}
