//! The plain-HTTP lane: revocation lists and OCSP fetched with absolute-form requests, forwarded
//! with hop-by-hop headers removed and `Via` added; everything else on plain HTTP is refused.

use crate::support::*;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

const CRL_HOST: &str = "crl.test.example";

/// A plain HTTP origin: `/crl` serves a fixed CRL, `/headers` echoes the request headers, a
/// POST answers with the body length. Counts requests.
async fn http_origin() -> (SocketAddr, Arc<AtomicUsize>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let hits = Arc::new(AtomicUsize::new(0));
    let counter = hits.clone();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let counter = counter.clone();
            tokio::spawn(async move {
                let service = service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                    counter.fetch_add(1, Ordering::SeqCst);
                    async move {
                        let headers: String = req
                            .headers()
                            .iter()
                            .map(|(n, v)| format!("{n}: {}\n", v.to_str().unwrap_or("?")))
                            .collect();
                        let path = req.uri().path().to_owned();
                        let method = req.method().clone();
                        let language = req
                            .headers()
                            .get("accept-language")
                            .and_then(|v| v.to_str().ok())
                            .unwrap_or("none")
                            .to_owned();
                        let body = req.into_body().collect().await?.to_bytes();
                        let answer = match (method.as_str(), path.as_str()) {
                            ("POST", _) => format!("got {}", body.len()),
                            (_, "/headers") => headers,
                            (_, "/big-crl") => "C".repeat(3_000_000),
                            (_, "/huge-crl") => "H".repeat(12 * 1024 * 1024),
                            (_, "/vary-crl") => format!("CRL-{language}"),
                            _ => "CRL-DATA".to_owned(),
                        };
                        let cache_control = match path.as_str() {
                            "/cached-crl" | "/vary-crl" | "/huge-crl" => "public, max-age=300",
                            "/shared-only-if-public" => "max-age=300",
                            "/aged-crl" => "public, max-age=60",
                            "/private-crl" => "private, max-age=300",
                            "/no-cache-crl" => "no-cache, max-age=300",
                            _ => "no-store",
                        };
                        let mut response =
                            hyper::Response::builder().header("cache-control", cache_control);
                        if path == "/vary-crl" {
                            response = response.header("vary", "accept-language");
                        }
                        if path == "/aged-crl" {
                            response = response.header("age", "100");
                        }
                        let response = response.body(Full::new(Bytes::from(answer))).unwrap();
                        Ok::<_, hyper::Error>(response)
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tcp), service)
                    .await;
            });
        }
    });
    (addr, hits)
}

/// The usual config on the HTTP origin's port, and the plain-HTTP rule `test-crl` for
/// `CRL_HOST` there.
fn lane_config(http_port: u16) -> GatewayConfig {
    GatewayConfig::for_origin(http_port)
        .rule(
            Rule::new("test-crl")
                .category("revocation")
                .hosts(&[CRL_HOST])
                .ports(&[http_port])
                .set("plain_http", true)
                .private_addresses(&["127.0.0.1/32"]),
        )
        .resolve(CRL_HOST, "127.0.0.1")
}

#[tokio::test]
async fn a_schedule_that_lists_revocation_paces_the_lane() {
    let (origin, _) = http_origin().await;
    let port = origin.port();
    let schedule = "[[schedule]]\nname = \"crl\"\ndays = \"daily\"\nhours = \"00:00-00:00\"\ntime_zone = \"UTC\"\ndownload = \"1 MB/s\"\ncategories = [\"revocation\"]\n";
    let gw = Gateway::start(lane_config(port).extra(schedule)).await;
    let _ = rustls::crypto::ring::default_provider().install_default();
    let client = reqwest::Client::builder()
        .proxy(reqwest::Proxy::http(format!("http://{}", gw.addr)).unwrap())
        .timeout(std::time::Duration::from_secs(60))
        .build()
        .unwrap();
    // 3 MB at 1 MB/s: about 3 s; at least 2 s whatever the machine's load.
    let started = std::time::Instant::now();
    let body = client
        .get(format!("http://{CRL_HOST}:{port}/big-crl"))
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    let took = started.elapsed();
    assert_eq!(body.len(), 3_000_000);
    assert!(took >= std::time::Duration::from_secs(2), "{took:?}");
}

#[tokio::test]
async fn revocation_requests_are_forwarded_with_clean_headers() {
    let (origin, hits) = http_origin().await;
    let port = origin.port();
    let mut gw = Gateway::start(lane_config(port)).await;
    let url = format!("http://{CRL_HOST}:{port}");

    let reply = raw_request(
        gw.addr,
        format!("GET {url}/crl HTTP/1.1\r\nHost: {CRL_HOST}\r\n\r\n").as_bytes(),
    )
    .await;
    assert_eq!((reply.status, reply.body.as_str()), (200, "CRL-DATA"));
    assert_eq!(reply.header("via"), Some("1.1 portcullis"));
    let client = reply.client.unwrap().to_string();
    let line = gw.access_line(|l| l["client"] == client.as_str()).await;
    assert_eq!(
        (
            line["end"].as_str(),
            line["rule"].as_str(),
            line["status"].as_u64()
        ),
        (Some("forwarded"), Some("test-crl"), Some(200))
    );
    assert_eq!(line["bytes_down"], 8);

    let request = format!(
        "GET {url}/headers HTTP/1.1\r\nHost: {CRL_HOST}\r\nProxy-Authorization: Basic eDp5\r\nConnection: keep-alive, X-Hop\r\nX-Hop: 1\r\nX-Keep: 2\r\n\r\n"
    );
    let seen = raw_request(gw.addr, request.as_bytes())
        .await
        .body
        .to_ascii_lowercase();
    assert!(
        seen.contains("x-keep: 2") && seen.contains("via: 1.1 portcullis"),
        "{seen}"
    );
    assert!(seen.contains(&format!("host: {CRL_HOST}:{port}")), "{seen}");
    for hop in ["proxy-authorization", "x-hop", "connection"] {
        assert!(!seen.contains(hop), "{hop} was forwarded: {seen}");
    }

    let reply = raw_request(
        gw.addr,
        format!("HEAD {url}/crl HTTP/1.1\r\n\r\n").as_bytes(),
    )
    .await;
    assert_eq!((reply.status, reply.body.as_str()), (200, ""));

    let ocsp = format!(
        "POST {url}/ocsp HTTP/1.1\r\nContent-Type: application/ocsp-request\r\nContent-Length: 100\r\n\r\n{}",
        "o".repeat(100)
    );
    let reply = raw_request(gw.addr, ocsp.as_bytes()).await;
    assert_eq!((reply.status, reply.body.as_str()), (200, "got 100"));
    assert_eq!(hits.load(Ordering::SeqCst), 4);
}

#[tokio::test]
async fn everything_else_in_plain_http_is_refused() {
    let (origin, hits) = http_origin().await;
    let port = origin.port();
    let gw = Gateway::start(lane_config(port)).await;
    let table = [
        (
            format!("POST http://{CRL_HOST}:{port}/x HTTP/1.1\r\nContent-Length: 1\r\n\r\nx"),
            405,
            "method not allowed: only CONNECT",
        ),
        (
            format!("PUT http://{CRL_HOST}:{port}/x HTTP/1.1\r\n\r\n"),
            405,
            "method not allowed: only CONNECT",
        ),
        (
            format!("GET http://evil.example:{port}/ HTTP/1.1\r\n\r\n"),
            403,
            "host not allowed",
        ),
        (
            format!("GET http://{ORIGIN_HOST}:{port}/ HTTP/1.1\r\n\r\n"),
            403,
            "not allowed as plain HTTP",
        ),
        (
            format!("CONNECT {CRL_HOST}:{port} HTTP/1.1\r\n\r\n"),
            403,
            "plain-HTTP host: only GET, HEAD or OCSP POST through the proxy",
        ),
        (
            format!("GET http://{CRL_HOST}:{port}/crl HTTP/1.1\r\nContent-Length: 3\r\n\r\nabc"),
            400,
            "GET and HEAD carry no body",
        ),
        (
            format!(
                "GET http://{CRL_HOST}:{port}/crl HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"
            ),
            400,
            "chunked request bodies are not forwarded",
        ),
        // Ambiguous framing (RFC 9112 section 6.3) is refused, never forwarded (issue 13).
        (
            format!(
                "GET http://{CRL_HOST}:{port}/crl HTTP/1.1\r\nContent-Length: 0\r\nContent-Length: 5\r\n\r\n"
            ),
            400,
            "more than one Content-Length",
        ),
        (
            format!("GET http://{CRL_HOST}:{port}/crl HTTP/1.1\r\nContent-Length: +0\r\n\r\n"),
            400,
            "malformed Content-Length",
        ),
        (
            format!(
                "POST http://{CRL_HOST}:{port}/ocsp HTTP/1.1\r\nContent-Type: application/ocsp-request\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\nx"
            ),
            400,
            "more than one Content-Length",
        ),
        (
            format!(
                "POST http://{CRL_HOST}:{port}/ocsp HTTP/1.1\r\nContent-Type: application/ocsp-request\r\nContent-Length: 1, 1\r\n\r\nx"
            ),
            400,
            "malformed Content-Length",
        ),
    ];
    for (request, status, reason) in table {
        let reply = raw_request(gw.addr, request.as_bytes()).await;
        assert_eq!(
            (reply.status, reply.header("portcullis-error")),
            (status, Some(reason)),
            "{request:?}"
        );
    }
    assert_eq!(hits.load(Ordering::SeqCst), 0, "nothing reached the origin");
}

#[tokio::test]
async fn a_fresh_crl_is_served_from_the_cache_without_reaching_the_origin() {
    let (origin, hits) = http_origin().await;
    let port = origin.port();
    let mut gw = Gateway::start(lane_config(port)).await;
    let fetch = |path: &str| format!("GET http://{CRL_HOST}:{port}{path} HTTP/1.1\r\n\r\n");

    for _ in 0..3 {
        let reply = raw_request(gw.addr, fetch("/cached-crl").as_bytes()).await;
        assert_eq!((reply.status, reply.body.as_str()), (200, "CRL-DATA"));
    }
    assert_eq!(
        hits.load(Ordering::SeqCst),
        1,
        "max-age=300: fetched once, then from the cache"
    );
    let line = gw.access_line(|l| l["end"] == "cache_hit").await;
    assert_eq!(
        (line["status"].as_u64(), line["bytes_down"].as_u64()),
        (Some(200), Some(8))
    );

    for _ in 0..2 {
        raw_request(gw.addr, fetch("/nostore").as_bytes()).await;
    }
    assert_eq!(
        hits.load(Ordering::SeqCst),
        3,
        "no-store answers are not cached"
    );
}

#[tokio::test]
async fn a_connect_to_a_plain_http_host_is_refused_before_any_lookup() {
    let (origin, _) = http_origin().await;
    let port = origin.port();
    // crl.other.example is under a plain_http rule but has no address: a lookup would fail.
    let config = lane_config(port).change_rule("test-crl", |rule| {
        rule.hosts(&[CRL_HOST, "crl.other.example"])
    });
    let mut gw = Gateway::start(config).await;
    let reply = raw_request(
        gw.addr,
        format!("CONNECT crl.other.example:{port} HTTP/1.1\r\n\r\n").as_bytes(),
    )
    .await;
    assert_eq!(
        (reply.status, reply.header("portcullis-error")),
        (
            403,
            Some("plain-HTTP host: only GET, HEAD or OCSP POST through the proxy")
        )
    );
    let line = gw.access_line(|l| l["host"] == "crl.other.example").await;
    assert_eq!(
        (line["verdict"].as_str(), line["end"].as_str()),
        (Some("deny"), Some("policy_denied")),
        "the verdict agrees with the outcome"
    );
}

#[tokio::test]
async fn the_cache_follows_the_shared_cache_rules() {
    let (origin, hits) = http_origin().await;
    let port = origin.port();
    let gw = Gateway::start(lane_config(port)).await;
    let get = |path: &str, headers: &str| {
        format!("GET http://{CRL_HOST}:{port}{path} HTTP/1.1\r\n{headers}\r\n")
    };
    let hits_for = |before: usize| hits.load(Ordering::SeqCst) - before;

    // Vary: the answer cached for one Accept-Language is not served for another.
    let before = hits.load(Ordering::SeqCst);
    for (language, want) in [("de", "CRL-de"), ("fr", "CRL-fr"), ("fr", "CRL-fr")] {
        let reply = raw_request(
            gw.addr,
            get("/vary-crl", &format!("Accept-Language: {language}\r\n")).as_bytes(),
        )
        .await;
        assert_eq!(reply.body, want, "{language}");
    }
    assert_eq!(
        hits_for(before),
        2,
        "de fetched, fr fetched, fr from the cache"
    );

    // An answer fetched with Authorization is not served to anyone else unless it is public.
    let before = hits.load(Ordering::SeqCst);
    raw_request(
        gw.addr,
        get("/shared-only-if-public", "Authorization: Basic eDp5\r\n").as_bytes(),
    )
    .await;
    raw_request(gw.addr, get("/shared-only-if-public", "").as_bytes()).await;
    assert_eq!(
        hits_for(before),
        2,
        "not stored: fetched with credentials, not public"
    );

    // Already older than its max-age (Age: 100 > 60), private, no-cache: fetched every time.
    for path in ["/aged-crl", "/private-crl", "/no-cache-crl"] {
        let before = hits.load(Ordering::SeqCst);
        for _ in 0..2 {
            let reply = raw_request(gw.addr, get(path, "").as_bytes()).await;
            assert_eq!(reply.status, 200);
        }
        assert_eq!(
            hits_for(before),
            2,
            "{path} must not be served from the cache"
        );
    }

    // A stored answer is served with its age.
    raw_request(gw.addr, get("/cached-crl", "").as_bytes()).await;
    let reply = raw_request(gw.addr, get("/cached-crl", "").as_bytes()).await;
    assert!(reply.header("age").is_some(), "{:?}", reply.headers);
}

#[tokio::test]
async fn slow_lane_readers_hold_little_memory_and_a_stalled_one_is_cut() {
    let (origin, _) = http_origin().await;
    let port = origin.port();
    let mut gw = Gateway::start(lane_config(port).timeout("idle", "1s")).await;
    let request = format!("GET http://{CRL_HOST}:{port}/huge-crl HTTP/1.1\r\n\r\n");
    let before = gw.rss_kib();
    // 40 clients reading a 12 MiB list slowly: 16 KiB every 50 ms.
    let readers: Vec<_> = (0..40)
        .map(|_| {
            let request = request.clone();
            let addr = gw.addr;
            tokio::spawn(async move {
                use tokio::io::{AsyncReadExt, AsyncWriteExt};
                let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
                tcp.write_all(request.as_bytes()).await.unwrap();
                let mut buf = vec![0u8; 16 * 1024];
                let mut got = 0;
                for _ in 0..40 {
                    match tcp.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => got += n,
                    }
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                }
                got
            })
        })
        .collect();
    let mut peak = 0;
    for _ in 0..20 {
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        peak = peak.max(gw.rss_kib());
    }
    for reader in readers {
        assert!(reader.await.unwrap() > 0, "every slow reader got bytes");
    }
    let growth = peak.saturating_sub(before);
    assert!(
        growth < 64 * 1024,
        "RSS grew {growth} KiB for 40 slow readers of a 12 MiB answer"
    );
    // A client that stops reading is cut once no byte moves for timeouts.idle.
    let mut stalled = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    tokio::io::AsyncWriteExt::write_all(&mut stalled, request.as_bytes())
        .await
        .unwrap();
    let client = stalled.local_addr().unwrap().to_string();
    let line = gw.access_line(|l| l["client"] == client.as_str()).await;
    assert_eq!(
        (line["end"].as_str(), line["reason"].as_str()),
        (
            Some("idle_timeout"),
            Some("client stopped reading the response")
        )
    );
}
