use super::shared::{Held, Kind, Stamped};
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
    save(&path, &learned.stored());
    // Without the fleet a file holds nothing of it (the same file as before fleet mode).
    let text = std::fs::read_to_string(&path).unwrap();
    assert!(!text.contains("fleet_"), "{text}");
    // A crash mid-write leaves a partial temporary file beside the complete one.
    std::fs::write(
        state_file::temporary(&path),
        b"{\"format\": \"portcullis-le",
    )
    .unwrap();
    let loaded = state_file::load(&path).unwrap();
    assert_eq!(loaded.rows.len(), 2);
    for (a, b) in loaded.rows.iter().zip(&rows) {
        assert_eq!((&a.branch, &a.rule, &a.host), (&b.branch, &b.rule, &b.host));
        assert_eq!(a.seen, b.seen);
    }
    // Saving again replaces the leftover.
    save(&path, &loaded);
    assert!(!state_file::temporary(&path).exists());
    assert_eq!(
        state_file::load(&dir.join("none.json")).unwrap(),
        state_file::Stored::default()
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

fn save(path: &Path, stored: &state_file::Stored) {
    state_file::save(path, stored).unwrap();
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

/// A store in fleet mode.
fn fleet_store() -> Learned {
    let learned = store();
    learned.fleet_mode(true);
    learned
}

const T0: i64 = 1_795_392_000_000;
const DAY: i64 = 86_400_000;

fn place(host: &str) -> Place {
    Place::new("london", "storage", host, 443)
}

fn present(host: &str, stamp: i64, approved: bool) -> Stamped {
    Stamped {
        place: place(host),
        stamp,
        held: Held::Present {
            first_seen: 1_795_000_000,
            approved,
        },
    }
}

fn forgotten(host: &str, stamp: i64) -> Stamped {
    Stamped {
        place: place(host),
        stamp,
        held: Held::Forgotten,
    }
}

fn hosts(learned: &Learned) -> Vec<String> {
    learned.rows(None).into_iter().map(|r| r.host).collect()
}

/// Learns each host here and has Redis stamp it at `stamp`.
fn learned_and_stamped(learned: &Learned, hosts: &[&str], stamp: i64) {
    for host in hosts {
        learned.note(SET, host, 443, Learn::Record, 8);
    }
    let changes = learned.changes();
    let stamps = vec![stamp; changes.len()];
    learned.stamped(&changes, &stamps);
    assert!(learned.changes().is_empty());
}

#[test]
fn changes_made_here_wait_for_their_stamp_forgets_first_and_a_newer_change_stays_pending() {
    let learned = fleet_store();
    learned.note(SET, "a.example", 443, Learn::Record, 8);
    learned
        .approve("london", "storage", "b.example", 443, 8)
        .unwrap();
    let changes = learned.changes();
    let kinds: Vec<(String, Kind)> = changes
        .iter()
        .map(|c| (c.place.host.clone(), c.kind))
        .collect();
    assert_eq!(
        kinds,
        [
            ("a.example".into(), Kind::Learn),
            ("b.example".into(), Kind::Approve)
        ]
    );
    // a is approved after the push was sent: Redis's answer for the learn leaves it pending.
    learned
        .approve("london", "storage", "a.example", 443, 8)
        .unwrap();
    learned.stamped(&changes, &[T0, T0]);
    let left = learned.changes();
    assert_eq!(left.len(), 1);
    assert_eq!(
        (left[0].place.host.as_str(), left[0].kind),
        ("a.example", Kind::Approve)
    );
    // Forgotten, then approved again here: the forget goes first, the approval wins.
    learned.forget("london", None, "b.example", None);
    learned
        .approve("london", "storage", "b.example", 443, 8)
        .unwrap();
    let kinds: Vec<(String, Kind)> = learned
        .changes()
        .iter()
        .map(|c| (c.place.host.clone(), c.kind))
        .collect();
    assert_eq!(
        kinds,
        [
            ("b.example".into(), Kind::Forget),
            ("a.example".into(), Kind::Approve),
            ("b.example".into(), Kind::Approve),
        ]
    );
    // Without the fleet nothing is kept for Redis.
    let alone = store();
    alone.note(SET, "a.example", 443, Learn::Record, 8);
    alone.forget("london", None, "a.example", None);
    assert!(alone.changes().is_empty());
    assert!(alone.stored().forgotten.is_empty());
}

#[test]
fn a_newer_forget_in_redis_wins_over_the_state_a_replica_kept_and_an_older_one_does_not() {
    let learned = fleet_store();
    learned_and_stamped(&learned, &["a.example", "b.example", "c.example"], T0);
    // While this replica was away: a forgotten, b approved, c unchanged; d learned elsewhere.
    let redis = vec![
        forgotten("a.example", T0 + 5),
        present("b.example", T0 + 6, true),
        present("c.example", T0, false),
        present("d.example", T0 + 7, false),
    ];
    let done = learned.reconcile(redis, T0 + 10);
    assert_eq!((done.added, done.removed), (1, 1));
    assert!(done.refill.is_empty() && done.sweep.is_empty() && !done.stale);
    assert_eq!(hosts(&learned), ["b.example", "c.example", "d.example"]);
    assert!(
        learned
            .rows(None)
            .iter()
            .any(|r| r.host == "b.example" && r.seen.approved)
    );
    // The tombstone is kept here too (for refilling an emptied Redis), and saved.
    assert_eq!(
        learned.stored().forgotten,
        [(
            place("a.example"),
            Tomb {
                stamp: T0 + 5,
                pending: None
            }
        )]
    );
    // An older tombstone loses to a newer approval held here: Redis gets the approval back.
    let done = learned.reconcile(
        vec![
            forgotten("b.example", T0 + 1),
            present("c.example", T0, false),
            present("d.example", T0 + 7, false),
            forgotten("a.example", T0 + 5),
        ],
        T0 + 11,
    );
    assert_eq!((done.added, done.removed), (0, 0));
    assert_eq!(done.refill, [present("b.example", T0 + 6, true)]);
    // A tie goes to the tombstone.
    let done = learned.reconcile(
        vec![
            forgotten("c.example", T0),
            present("b.example", T0 + 6, true),
            present("d.example", T0 + 7, false),
            forgotten("a.example", T0 + 5),
        ],
        T0 + 12,
    );
    assert_eq!(done.removed, 1);
    assert_eq!(hosts(&learned), ["b.example", "d.example"]);
}

#[test]
fn an_emptied_redis_is_refilled_and_nothing_is_dropped() {
    let learned = fleet_store();
    learned_and_stamped(&learned, &["a.example", "b.example"], T0);
    learned.reconcile(
        vec![
            present("a.example", T0, false),
            forgotten("b.example", T0 + 1),
        ],
        T0 + 2,
    );
    assert_eq!(hosts(&learned), ["a.example"]);
    // Learned here, not pushed yet: stays pending, not refilled.
    learned.note(SET, "c.example", 443, Learn::Record, 8);
    let mut done = learned.reconcile(Vec::new(), T0 + 3);
    assert_eq!(
        (done.added, done.removed),
        (0, 0),
        "an empty Redis forgets nothing"
    );
    done.refill.sort_by(|a, b| a.place.cmp(&b.place));
    assert_eq!(
        done.refill,
        [
            present("a.example", T0, false),
            forgotten("b.example", T0 + 1)
        ]
        .map(|mut s| {
            if let Held::Present { first_seen, .. } = &mut s.held {
                *first_seen = learned.rows(None)[0].seen.first_seen;
            }
            s
        })
    );
    assert_eq!(hosts(&learned), ["a.example", "c.example"]);
    assert_eq!(learned.changes().len(), 1);
}

#[test]
fn a_replica_away_longer_than_tombstones_live_drops_what_redis_lacks_and_old_tombstones_go() {
    let learned = fleet_store();
    learned_and_stamped(&learned, &["a.example", "b.example"], T0);
    learned.reconcile(
        vec![
            present("a.example", T0, false),
            present("b.example", T0, false),
        ],
        T0 + 1,
    );
    // 91 days later: b's tombstone may have been swept; a is still in Redis.
    let later = T0 + 91 * DAY;
    let done = learned.reconcile(vec![present("a.example", T0, false)], later);
    assert!(done.stale);
    assert_eq!(done.removed, 1);
    assert!(done.refill.is_empty());
    assert_eq!(hosts(&learned), ["a.example"]);
    // Back in touch: a tombstone past its time is swept from Redis and not kept here, but it
    // still removes an older entry on its way out.
    let done = learned.reconcile(
        vec![forgotten("a.example", later - 91 * DAY + 1)],
        later + 1,
    );
    assert!(!done.stale);
    assert_eq!(done.removed, 1);
    assert_eq!(done.sweep, [forgotten("a.example", later - 91 * DAY + 1)]);
    assert!(learned.stored().forgotten.is_empty());
}

#[test]
fn fleet_state_round_trips_through_the_file_with_pending_changes_kept() {
    let dir = std::env::temp_dir().join(format!("portcullis-fleet-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let path = dir.join(FILE_NAME);
    let learned = fleet_store();
    learned_and_stamped(&learned, &["a.example", "b.example"], T0 + 123);
    learned.reconcile(
        vec![
            present("a.example", T0 + 123, false),
            forgotten("z.example", T0 + 50),
        ],
        T0 + 200,
    );
    learned.note(SET, "c.example", 443, Learn::Record, 8);
    learned.forget("london", None, "b.example", None);
    save(&path, &learned.stored());
    let text = std::fs::read_to_string(&path).unwrap();
    assert!(
        text.contains("\"fleet_stamp\": \"2026-11-23T00:00:00.123Z\""),
        "{text}"
    );
    let again = fleet_store();
    again.insert(state_file::load(&path).unwrap());
    assert_eq!(hosts(&again), ["a.example", "c.example"]);
    let kinds: Vec<(String, Kind)> = again
        .changes()
        .iter()
        .map(|c| (c.place.host.clone(), c.kind))
        .collect();
    assert_eq!(
        kinds,
        [
            ("b.example".into(), Kind::Forget),
            ("c.example".into(), Kind::Learn)
        ]
    );
    let stored = again.stored();
    assert_eq!(stored.synced, Some(T0 + 200));
    assert_eq!(stored.forgotten.len(), 2);
    assert_eq!(stored.rows[0].seen.stamp, T0 + 123);
    std::fs::remove_dir_all(&dir).unwrap();
}
