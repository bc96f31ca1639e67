//! Bandwidth schedules end to end: real transfers through the gateway under a limit (wide
//! bounds only: the figures are benchmarks, not tests), the metrics of the budgets, a reload
//! that puts a limit on an open tunnel, and the `schedule` commands.

use crate::support::*;
use std::time::{Duration, Instant};

/// `[[schedule]]` in force all day, every day, for `extra` (limits, scope).
fn all_day(name: &str, extra: &str) -> String {
    format!(
        "[[schedule]]\nname = \"{name}\"\ndays = \"daily\"\nhours = \"00:00-00:00\"\ntime_zone = \"UTC\"\n{extra}\n"
    )
}

#[tokio::test]
async fn transfers_in_both_directions_keep_to_the_limit_in_force() {
    let pki = Pki::new();
    let origin = Origin::start(&pki).await;
    let schedule = all_day(
        "office",
        "upload = \"2 MB/s\"\ndownload = \"2 MB/s\"\napplies_to = \"each-branch\"",
    );
    let mut gw = Gateway::start(GatewayConfig::for_origin(origin.port()).extra(&schedule)).await;
    let _ = gw
        .wait_log(|l| {
            l["message"] == "bandwidth limit in force"
                && l["budget"] == "unassigned"
                && l["direction"] == "upload"
        })
        .await;
    let client = client(&pki, gw.addr);
    let base = format!("https://{ORIGIN_HOST}:{}", origin.port());

    // 4 MB up at 2 MB/s: about 2 s; at least 1.5 s whatever the machine's load.
    let body = payload(4_000_000, 7);
    let started = Instant::now();
    let answer = client
        .post(format!("{base}/upload"))
        .body(body.clone())
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let up = started.elapsed();
    assert_eq!(answer, format!("4000000 {}", sha256_hex(&body)));
    assert!(up >= Duration::from_millis(1_500), "upload took {up:?}");

    let started = Instant::now();
    let resp = client
        .get(format!("{base}/download?bytes=4000000"))
        .send()
        .await
        .unwrap();
    let hash = resp.headers()["x-sha256"].to_str().unwrap().to_owned();
    let got = resp.bytes().await.unwrap();
    let down = started.elapsed();
    assert_eq!(sha256_hex(&got), hash);
    assert!(
        down >= Duration::from_millis(1_500),
        "download took {down:?}"
    );

    let metrics = gw.metrics().await;
    for direction in ["upload", "download"] {
        let labels =
            format!("{{scope=\"each-branch\",budget=\"unassigned\",direction=\"{direction}\"}}");
        assert_eq!(
            metrics.value(&format!(
                "portcullis_throttle_limit_bytes_per_second{labels}"
            )),
            2_000_000.0
        );
        assert!(metrics.value(&format!("portcullis_throttled_bytes_total{labels}")) >= 4_000_000.0);
        assert!(metrics.value(&format!("portcullis_throttle_wait_seconds_total{labels}")) > 1.0);
    }
}

#[tokio::test]
async fn schedules_out_of_hours_or_for_other_categories_leave_traffic_alone() {
    let pki = Pki::new();
    let origin = Origin::start(&pki).await;
    let schedules = format!(
        "[[schedule]]\nname = \"later\"\ndays = \"daily\"\nhours = \"{}\"\ntime_zone = \"UTC\"\nupload = \"1 MB/s\"\ndownload = \"1 MB/s\"\n\n{}",
        later_today(),
        all_day(
            "sync-only",
            "download = \"1 MB/s\"\napplies_to = \"all-branches\"\ncategories = [\"sync\"]"
        )
    );
    let gw = Gateway::start(GatewayConfig::for_origin(origin.port()).extra(&schedules)).await;
    let client = client(&pki, gw.addr);
    let resp = client
        .get(format!(
            "https://{ORIGIN_HOST}:{}/download?bytes=8000000",
            origin.port()
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.bytes().await.unwrap().len(), 8_000_000);
    let metrics = gw.metrics().await;
    // The storage tunnel passed no budget in force: none counted a byte or a wait.
    let each = "{scope=\"each-branch\",budget=\"unassigned\",direction=\"download\"}";
    let shared = "{scope=\"all-branches\",budget=\"*\",direction=\"download\"}";
    assert_eq!(
        metrics.value(&format!("portcullis_throttle_limit_bytes_per_second{each}")),
        0.0
    );
    assert_eq!(
        metrics.value(&format!(
            "portcullis_throttle_limit_bytes_per_second{shared}"
        )),
        1_000_000.0
    );
    for labels in [each, shared] {
        assert_eq!(
            metrics.value(&format!("portcullis_throttled_bytes_total{labels}")),
            0.0
        );
    }
}

#[tokio::test]
async fn a_reload_that_starts_a_window_slows_an_open_tunnel() {
    let pki = Pki::new();
    let origin = Origin::start(&pki).await;
    let schedule = |hours: &str| {
        format!(
            "[[schedule]]\nname = \"office\"\ndays = \"daily\"\nhours = \"{hours}\"\ntime_zone = \"UTC\"\ndownload = \"4 MB/s\"\n"
        )
    };
    let config = |hours: &str| GatewayConfig::for_origin(origin.port()).extra(&schedule(hours));
    let mut gw = Gateway::start(config(&later_today())).await;
    let client = client(&pki, gw.addr);
    let mut resp = client
        .get(format!(
            "https://{ORIGIN_HOST}:{}/download?bytes=64000000",
            origin.port()
        ))
        .send()
        .await
        .unwrap();
    // The tunnel runs free, then the client stops reading while the window begins.
    let mut read = 0;
    while read < 1_000_000 {
        read += resp.chunk().await.unwrap().unwrap().len();
    }
    std::fs::write(gw.config_path(), config("00:00-00:00").to_string()).unwrap();
    gw.signal("HUP");
    let _ = gw
        .wait_log(|l| l["message"] == "bandwidth limit in force" && l["direction"] == "download")
        .await;
    // 16 MB more at 4 MB/s: 4 s, less what socket buffers held before the limit (a few MB).
    let started = Instant::now();
    let mut more = 0;
    while more < 16_000_000 {
        more += resp.chunk().await.unwrap().unwrap().len();
    }
    let took = started.elapsed();
    assert!(took >= Duration::from_millis(1_500), "16 MB took {took:?}");
}

#[test]
fn the_schedule_command_prints_the_limits_in_force_and_the_week() {
    let (_dir, path) = temp_file(
        "schedules.toml",
        r#"
[[branch]]
name = "london"
sources = ["10.1.0.0/16"]

[[branch]]
name = "paris"
sources = ["10.2.0.0/16"]

[[schedule]]
name = "office-hours"
days = "mon-fri"
hours = "09:00-17:00"
time_zone = "Europe/London"
upload = "10 Mbit/s"
branches = ["london"]

[[schedule]]
name = "nightly-total"
days = "daily"
hours = "22:00-06:00"
time_zone = "Europe/London"
download = "100 Mbit/s"
applies_to = "all-branches"
"#,
    );
    let config = path.to_str().unwrap();
    let out = portcullis(&[
        "schedule",
        "--config",
        config,
        "--at",
        "2026-11-23T09:30[Europe/London]",
    ]);
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(
        text.contains("Limits in force at Mon 2026-11-23 09:30 GMT"),
        "{text}"
    );
    assert!(
        text.lines().any(|l| l.contains("each-branch london")
            && l.contains("upload")
            && l.contains("10 Mbit/s (1.25 MB/s)")
            && l.contains("office-hours")),
        "{text}"
    );
    assert!(
        text.contains("Next change: Mon 2026-11-23 17:00 GMT"),
        "{text}"
    );
    // Monday: night (B) until 06:00, office hours (A) 09:00-17:00, night again from 22:00.
    let monday = text.lines().find(|l| l.starts_with("  mon ")).unwrap();
    assert_eq!(
        &monday[6..],
        "BBBBBBBBBBBB......AAAAAAAAAAAAAAAA..........BBBB"
    );
    // Paris is not in office-hours: only the shared night budget, and not at 09:30.
    let out = portcullis(&[
        "schedule",
        "--config",
        config,
        "--at",
        "2026-11-23T09:30[Europe/London]",
        "--branch",
        "paris",
    ]);
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.contains("none: traffic runs unthrottled"), "{text}");
    assert!(!text.contains("office-hours"), "{text}");
    // Usage problems are exit 64 with what was expected.
    let out = portcullis(&["schedule", "--config", config, "--at", "tomorrow"]);
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("expected a time such as"));
    let out = portcullis(&["schedule", "--config", config, "--branch", "rome"]);
    assert_eq!(out.status.code(), Some(64));
}

#[test]
fn explain_names_the_limits_in_force_for_the_branch_and_category() {
    let (_dir, path) = temp_file(
        "explain.toml",
        r#"[resolver]
hosts_only = true
[resolver.hosts]
"acct.file.core.windows.net" = "20.60.1.2"
"management.azure.com" = "20.60.1.3"

[[branch]]
name = "london"
sources = ["10.1.0.0/16"]

[[schedule]]
name = "office"
days = "daily"
hours = "00:00-00:00"
upload = "10 Mbit/s"
branches = ["london"]

[[schedule]]
name = "total"
days = "daily"
hours = "00:00-00:00"
upload = "100 Mbit/s"
download = "200 Mbit/s"
applies_to = "all-branches"
"#,
    );
    let config = path.to_str().unwrap();
    let explain = |target: &str| {
        let out = portcullis(&["explain", "--config", config, "--from", "10.1.2.3", target]);
        String::from_utf8(out.stdout).unwrap()
    };
    let storage = explain("acct.file.core.windows.net:443");
    assert!(
        storage.contains("bandwidth: upload 10 Mbit/s (1.25 MB/s) (office, each-branch london) and 100 Mbit/s (12.5 MB/s) (total, all-branches *); download 200 Mbit/s (25 MB/s) (total, all-branches *)"),
        "{storage}"
    );
    // Management traffic is in no schedule's categories.
    let management = explain("management.azure.com:443");
    assert!(
        management.contains("bandwidth: upload not throttled now; download not throttled now"),
        "{management}"
    );
}

#[test]
fn overlapping_windows_for_one_budget_are_a_config_error_naming_both() {
    let (_dir, path) = temp_file(
        "overlap.toml",
        r#"[[schedule]]
name = "day"
days = "mon-fri"
hours = "08:00-18:00"
time_zone = "Europe/London"
upload = "10 Mbit/s"

[[schedule]]
name = "new-york-morning"
days = "mon"
hours = "09:00-10:00"
time_zone = "America/New_York"
upload = "5 Mbit/s"
download = "5 Mbit/s"

[[schedule]]
name = "shared"
days = "mon"
hours = "09:00-10:00"
time_zone = "America/New_York"
upload = "50 Mbit/s"
applies_to = "all-branches"
"#,
    );
    let out = portcullis(&["check-config", path.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(64));
    let err = String::from_utf8(out.stderr).unwrap();
    // 09:00 in New York is 14:00 in London: inside "day". The all-branches one is its own budget.
    assert!(
        err.contains("overlap.toml:8:1: schedule[1]: schedule \"new-york-morning\"")
            && err.contains("overlaps schedule \"day\"")
            && err.contains("each-branch upload budget"),
        "{err}"
    );
    assert!(!err.contains("\"shared\""), "{err}");
}

#[test]
fn import_afs_turns_cmdlet_output_into_schedules() {
    let dir = tempfile::tempdir().unwrap();
    let limits = dir.path().join("limits.txt");
    std::fs::write(
        &limits,
        "Day       : {Monday, Tuesday, Wednesday, Thursday, Friday}\nStartHour : 9\nEndHour   : 17\nLimitKbps : 10000\n",
    )
    .unwrap();
    let out = portcullis(&["schedule", "import-afs", limits.to_str().unwrap()]);
    assert!(out.status.success());
    let toml = String::from_utf8(out.stdout).unwrap();
    let config = dir.path().join("imported.toml");
    std::fs::write(&config, &toml).unwrap();
    let check = portcullis(&["check-config", config.to_str().unwrap()]);
    assert!(
        check.status.success(),
        "{}",
        String::from_utf8_lossy(&check.stderr)
    );
    assert!(toml.contains("upload = \"1250000 B/s\""), "{toml}");
    std::fs::write(&limits, "Day : {Monday}\nStartHour : 25\n").unwrap();
    let out = portcullis(&["schedule", "import-afs", limits.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("limits.txt:2: StartHour"));
}

#[test]
fn import_afs_reads_what_windows_powershell_writes() {
    // `Get-StorageSyncNetworkLimit | Format-List > limits.txt` in Windows PowerShell 5.1:
    // UTF-16LE after a byte-order mark, CRLF line ends, a blank line around each record.
    let cmdlet = "\r\n\r\nId             : 4b8a9c3e-0000-4000-8000-000000000001\r\nDay            : {Monday, Tuesday, Wednesday, Thursday, Friday}\r\nStartHour      : 9\r\nEndHour        : 17\r\nLimitKbps      : 10000\r\n\r\n\r\n";
    let mut bytes = vec![0xFF, 0xFE];
    bytes.extend(cmdlet.encode_utf16().flat_map(u16::to_le_bytes));
    let dir = tempfile::tempdir().unwrap();
    let limits = dir.path().join("limits.txt");
    std::fs::write(&limits, &bytes).unwrap();
    let out = portcullis(&["schedule", "import-afs", limits.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let toml = String::from_utf8(out.stdout).unwrap();
    assert!(toml.contains("days = \"mon-fri\""), "{toml}");
    assert!(toml.contains("upload = \"1250000 B/s\""), "{toml}");
    // Cut short by one byte: refused, with what is wrong.
    std::fs::write(&limits, &bytes[..bytes.len() - 1]).unwrap();
    let out = portcullis(&["schedule", "import-afs", limits.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(64));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr
            .contains("limits.txt: UTF-16LE (by its byte-order mark) with an odd number of bytes"),
        "{stderr}"
    );
    // Neither UTF-8 nor marked UTF-16 (Latin-1).
    std::fs::write(&limits, b"Day : Montag\xE9\n").unwrap();
    let out = portcullis(&["schedule", "import-afs", limits.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(64));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("limits.txt: byte 12: not UTF-8, and no UTF-16 byte-order mark"),
        "{stderr}"
    );
}
