//! `policy.service_tags_file` and a rule's `service_tags`: an address a name resolves to must lie
//! in the listed tags' prefixes (IPv4 and IPv6), a reload takes a new file, check-config and the
//! metrics show its changeNumber, and a malformed file is a config error with its position.

use crate::support::*;

/// A service tags file in Microsoft's format: `Storage.Test` holds the origin's address, and
/// `Storage.Elsewhere` holds `elsewhere_v4` and a documentation IPv6 range.
fn tags_file(change: u64, elsewhere_v4: &str) -> String {
    format!(
        r#"{{"changeNumber": {change}, "cloud": "Public", "values": [
  {{"name": "Storage.Test", "id": "Storage.Test", "properties": {{"changeNumber": 1, "region": "test",
    "platform": "Azure", "systemService": "AzureStorage", "addressPrefixes": ["127.0.0.0/24", "::1/128"]}}}},
  {{"name": "Storage.Elsewhere", "id": "Storage.Elsewhere", "properties": {{"changeNumber": 1,
    "addressPrefixes": ["{elsewhere_v4}", "2001:db8::/32"]}}}}
]}}"#
    )
}

/// The test origin's rule limited to `Storage.Test`, and the rule `elsewhere` (IPv4 and IPv6
/// names) to `Storage.Elsewhere`, with the tags file at `tags_path`.
fn config(port: u16, tags_path: &str) -> GatewayConfig {
    GatewayConfig::for_origin(port)
        .origin_rule(|rule| rule.set("service_tags", ["Storage.Test"]))
        .policy("service_tags_file", tags_path)
        .rule(
            Rule::new("elsewhere")
                .category("storage")
                .hosts(&[
                    "share2.file.core.windows.net",
                    "share6.file.core.windows.net",
                ])
                .ports(&[port])
                .private_addresses(&["127.0.0.1/32", "::1/128"])
                .set("service_tags", ["Storage.Elsewhere"]),
        )
        .resolve("share2.file.core.windows.net", "127.0.0.1")
        .resolve("share6.file.core.windows.net", "::1")
}

#[tokio::test]
async fn addresses_outside_a_rules_service_tags_are_refused_and_a_reload_takes_a_new_file() {
    let origin = TcpOrigin::start(b"").await;
    let port = origin.addr.port();
    let (dir, tags) = temp_file("ServiceTags_Public.json", &tags_file(312, "203.0.113.0/24"));
    let tags = tags.to_str().unwrap().to_owned();
    let text = config(port, &tags).to_string();
    let mut gw = Gateway::start(&text).await;

    // In its rule's tag: served.
    let (_tunnel, ok) =
        connect_from(gw.addr, "127.0.0.1", &format!("{ORIGIN_HOST}:{port}"), "").await;
    assert_eq!(ok.status, 200, "{ok:?}");
    // Outside (IPv4 and IPv6): refused as a forbidden destination, before any dial.
    for host in [
        "share2.file.core.windows.net",
        "share6.file.core.windows.net",
    ] {
        let (_, refused) = connect_from(gw.addr, "127.0.0.1", &format!("{host}:{port}"), "").await;
        assert_eq!(
            (refused.status, refused.header("portcullis-error")),
            (
                403,
                Some("destination address outside service tag Storage.Elsewhere")
            ),
            "{host}: {refused:?}"
        );
        let line = gw.access_line(|l| l["host"] == host).await;
        assert_eq!(line["end"], "destination_forbidden", "{line}");
    }
    gw.metrics()
        .await
        .assert_value("portcullis_service_tags_change_number", 312.0);

    // explain shows the check per address; check-config the file's edition.
    let (_cdir, path) = temp_file("portcullis.toml", &text);
    let path = path.to_str().unwrap();
    let explained = portcullis(&[
        "explain",
        "--config",
        path,
        &format!("share2.file.core.windows.net:{port}"),
    ]);
    let out = String::from_utf8_lossy(&explained.stdout);
    assert!(
        out.contains("127.0.0.1  refused: outside service tag Storage.Elsewhere"),
        "{out}"
    );
    let explained = portcullis(&[
        "explain",
        "--config",
        path,
        &format!("{ORIGIN_HOST}:{port}"),
    ]);
    let out = String::from_utf8_lossy(&explained.stdout);
    assert!(
        out.contains("127.0.0.1  ok (in service tag Storage.Test)"),
        "{out}"
    );
    let checked = portcullis(&["check-config", path]);
    let out = String::from_utf8_lossy(&checked.stdout);
    assert!(
        out.contains(&format!(
            "service_tags_file: {tags} (changeNumber 312, cloud Public, 2 tags)"
        )) && out.contains("    service_tags: Storage.Elsewhere\n"),
        "{out}"
    );

    // Next week's file puts the address in Storage.Elsewhere: a reload applies it.
    std::fs::write(
        dir.path().join("ServiceTags_Public.json"),
        tags_file(313, "127.0.0.1/32"),
    )
    .unwrap();
    gw.reload("reload applied").await;
    let (_tunnel2, now_ok) = connect_from(
        gw.addr,
        "127.0.0.1",
        &format!("share2.file.core.windows.net:{port}"),
        "",
    )
    .await;
    assert_eq!(now_ok.status, 200, "{now_ok:?}");
    gw.metrics()
        .await
        .assert_value("portcullis_service_tags_change_number", 313.0);
}

#[test]
fn a_bad_service_tags_file_or_tag_is_a_config_error_with_its_place() {
    let (_dir, tags) = temp_file("tags.json", "{\"changeNumber\": 1,\n  \"cloud\": 5 }");
    let tags = tags.to_str().unwrap().to_owned();
    let (_cdir, path) = temp_file("portcullis.toml", &config(443, &tags).to_string());
    let out = portcullis(&["check-config", path.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{err}");
    assert!(
        err.contains(&format!("policy.service_tags_file: {tags}:2:")),
        "{err}"
    );

    let (_dir2, tags) = temp_file("tags.json", &tags_file(1, "203.0.113.0/24"));
    let text = config(443, tags.to_str().unwrap()).change_rule("elsewhere", |rule| {
        rule.set("service_tags", ["Storage.Elsewher"])
    });
    let (_cdir2, path) = temp_file("portcullis.toml", &text.to_string());
    let out = portcullis(&["check-config", path.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{err}");
    assert!(
        err.contains("policy.allow[1].service_tags[0]: unknown service tag \"Storage.Elsewher\" (did you mean \"Storage.Elsewhere\"?)"),
        "{err}"
    );
}
