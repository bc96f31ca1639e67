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
                        let body = req.into_body().collect().await?.to_bytes();
                        let answer = match (method.as_str(), path.as_str()) {
                            ("POST", _) => format!("got {}", body.len()),
                            (_, "/headers") => headers,
                            (_, "/big-crl") => "C".repeat(3_000_000),
                            _ => "CRL-DATA".to_owned(),
                        };
                        let cache_control = match path.as_str() {
                            "/cached-crl" => "public, max-age=300",
                            _ => "no-store",
                        };
                        let response = hyper::Response::builder()
                            .header("cache-control", cache_control)
                            .body(Full::new(Bytes::from(answer)))
                            .unwrap();
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

fn lane_config(http_port: u16) -> String {
    let crl_rule = format!(
        "[[policy.allow]]\nname = \"test-crl\"\ncategory = \"revocation\"\nhosts = [\"{CRL_HOST}\"]\nports = [{http_port}]\nplain_http = true\nprivate_addresses = [\"127.0.0.1/32\"]\n\n"
    );
    config_for(
        http_port,
        &format!(
            "{crl_rule}{}",
            resolver_hosts(&format!("\"{CRL_HOST}\" = \"127.0.0.1\"\n"))
        ),
    )
}

#[tokio::test]
async fn a_schedule_that_lists_revocation_paces_the_lane() {
    let (origin, _) = http_origin().await;
    let port = origin.port();
    let schedule = "[[schedule]]\nname = \"crl\"\ndays = \"daily\"\nhours = \"00:00-00:00\"\ntime_zone = \"UTC\"\ndownload = \"1 MB/s\"\ncategories = [\"revocation\"]\n";
    let gw = Gateway::start(&format!("{}\n{schedule}", lane_config(port))).await;
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
    let mut gw = Gateway::start(&lane_config(port)).await;
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
    let gw = Gateway::start(&lane_config(port)).await;
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
    let mut gw = Gateway::start(&lane_config(port)).await;
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
