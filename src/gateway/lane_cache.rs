//! A small shared cache of revocation answers, so a branch's many servers fetch a list once.
//! What may be stored and served is decided by RFC 9111's rules for shared caches, through the
//! `http-cache-semantics` crate (Vary, requests with Authorization, Age and Date, no-cache,
//! private, s-maxage); only `200` answers to `GET` are kept. Bounded in entries and bytes: an
//! answer is collected while it streams only when its length is known and a reservation for it
//! fits, and only one fetch per URL collects at a time, so slow clients never make the cache
//! hold many copies. Stored bodies are shared by reference.

use bytes::Bytes;
use http_cache_semantics::{BeforeRequest, CacheOptions, CachePolicy};
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

/// Most answers kept.
const ENTRIES: usize = 256;
/// Most body bytes kept and being collected, in all.
const BYTES: usize = 32 * 1024 * 1024;
/// Largest single answer kept.
pub const MAX_ENTRY_BYTES: usize = 16 * 1024 * 1024;

/// A stored answer.
pub struct Stored {
    policy: CachePolicy,
    pub body: Bytes,
}

/// A stored answer that may be served for a request now, with its response head as the cache
/// serves it (an `Age` header added).
pub struct Hit {
    pub parts: http::response::Parts,
    pub body: Bytes,
}

#[derive(Default)]
pub struct LaneCache {
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    entries: HashMap<String, Arc<Stored>>,
    /// URLs with a fetch collecting its answer now.
    collecting: HashSet<String>,
    /// Bytes reserved by those fetches.
    reserved: usize,
}

impl State {
    fn stored_bytes(&self) -> usize {
        self.entries.values().map(|s| s.body.len()).sum()
    }
}

/// The cache's rules: a shared cache, no heuristic freshness (a revocation list without
/// explicit freshness is fetched again).
fn options() -> CacheOptions {
    CacheOptions {
        shared: true,
        cache_heuristic: 0.0,
        ..CacheOptions::default()
    }
}

/// The right to collect one answer for `key`, released when dropped.
pub struct Collecting<'a> {
    cache: &'a LaneCache,
    key: String,
    bytes: usize,
}

impl LaneCache {
    /// A stored answer that is fresh for `request` now (same URL, matching `Vary`, allowed for
    /// this request).
    pub fn lookup(&self, key: &str, request: &http::Request<()>) -> Option<Hit> {
        let stored = {
            let state = self.state.lock().unwrap_or_else(|e| e.into_inner());
            state.entries.get(key)?.clone()
        };
        match stored.policy.before_request(request, SystemTime::now()) {
            BeforeRequest::Fresh(parts) => Some(Hit {
                parts,
                body: stored.body.clone(),
            }),
            BeforeRequest::Stale { .. } => None,
        }
    }

    /// Whether the answer to `request` may be stored, and the right to collect it: `None` when
    /// the rules forbid storing it, its length is unknown or too large, another fetch collects
    /// this URL already, or the cache has no room.
    pub fn start_collecting(
        &self,
        key: &str,
        request: &http::Request<()>,
        response: &http::response::Parts,
        length: Option<u64>,
    ) -> Option<(Collecting<'_>, CachePolicy)> {
        if request.method() != http::Method::GET || response.status != http::StatusCode::OK {
            return None;
        }
        let length = usize::try_from(length?)
            .ok()
            .filter(|&l| l <= MAX_ENTRY_BYTES)?;
        let policy = CachePolicy::new_options(request, response, SystemTime::now(), options());
        if !policy.is_storable() || policy.time_to_live(SystemTime::now()).is_zero() {
            return None;
        }
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        // Room: drop stale entries first.
        let now = SystemTime::now();
        state.entries.retain(|_, s| !s.policy.is_stale(now));
        let in_use = state.stored_bytes() + state.reserved;
        let replaced = state.entries.get(key).map_or(0, |s| s.body.len());
        if state.collecting.contains(key)
            || in_use - replaced + length > BYTES
            || (state.entries.len() >= ENTRIES && replaced == 0)
        {
            return None;
        }
        state.collecting.insert(key.to_owned());
        state.reserved += length;
        Some((
            Collecting {
                cache: self,
                key: key.to_owned(),
                bytes: length,
            },
            policy,
        ))
    }
}

impl Collecting<'_> {
    /// The whole answer arrived: store it.
    pub fn store(self, policy: CachePolicy, body: Bytes) {
        if body.len() == self.bytes {
            let mut state = self.cache.state.lock().unwrap_or_else(|e| e.into_inner());
            state
                .entries
                .insert(self.key.clone(), Arc::new(Stored { policy, body }));
        }
    }
}

impl Drop for Collecting<'_> {
    fn drop(&mut self) {
        let mut state = self.cache.state.lock().unwrap_or_else(|e| e.into_inner());
        state.collecting.remove(&self.key);
        state.reserved = state.reserved.saturating_sub(self.bytes);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(headers: &[(&str, &str)]) -> http::Request<()> {
        let mut builder = http::Request::get("http://crl.example/x.crl");
        for (name, value) in headers {
            builder = builder.header(*name, *value);
        }
        builder.body(()).unwrap()
    }

    fn response(headers: &[(&str, &str)]) -> http::response::Parts {
        let mut builder = http::Response::builder().status(200);
        for (name, value) in headers {
            builder = builder.header(*name, *value);
        }
        builder.body(()).unwrap().into_parts().0
    }

    /// Stores `body` as the answer to `req` with `res`; whether it was allowed.
    fn store(cache: &LaneCache, req: &http::Request<()>, res: &http::response::Parts) -> bool {
        match cache.start_collecting("k", req, res, Some(4)) {
            Some((collecting, policy)) => {
                collecting.store(policy, Bytes::from_static(b"CRL!"));
                true
            }
            None => false,
        }
    }

    #[test]
    fn fresh_answers_are_served_and_vary_keeps_variants_apart() {
        let cache = LaneCache::default();
        let de = request(&[("accept-language", "de")]);
        let fr = request(&[("accept-language", "fr")]);
        let res = response(&[
            ("cache-control", "public, max-age=300"),
            ("vary", "accept-language"),
        ]);
        assert!(store(&cache, &de, &res));
        let hit = cache.lookup("k", &de).expect("fresh for the same variant");
        assert_eq!(hit.body, Bytes::from_static(b"CRL!"));
        assert!(hit.parts.headers.contains_key("age"), "served with Age");
        assert!(cache.lookup("k", &fr).is_none(), "another Accept-Language");
    }

    #[test]
    fn answers_fetched_with_credentials_are_not_shared() {
        let cache = LaneCache::default();
        let with_auth = request(&[("authorization", "Basic eDp5")]);
        let res = response(&[("cache-control", "max-age=300")]);
        assert!(!store(&cache, &with_auth, &res), "RFC 9111 3.5");
        // Explicitly shareable despite Authorization: public (or s-maxage).
        let res = response(&[("cache-control", "public, max-age=300")]);
        assert!(store(&cache, &with_auth, &res));
        assert!(cache.lookup("k", &request(&[])).is_some());
    }

    #[test]
    fn private_no_cache_no_store_and_old_answers_are_not_kept() {
        let cache = LaneCache::default();
        for cache_control in ["private, max-age=300", "no-store", "no-cache"] {
            let res = response(&[("cache-control", cache_control)]);
            let stored =
                store(&cache, &request(&[]), &res) && cache.lookup("k", &request(&[])).is_some();
            assert!(!stored, "{cache_control}");
        }
        // max-age=60 but already 100 s old (Age): stale on arrival.
        let res = response(&[("cache-control", "max-age=60"), ("age", "100")]);
        assert!(!store(&cache, &request(&[]), &res));
        // Expires before the answer's own Date: stale (Expires counts from Date, so an origin
        // clock that runs off does not matter).
        let now = httpdate::fmt_http_date(SystemTime::now());
        let hour_ago =
            httpdate::fmt_http_date(SystemTime::now() - std::time::Duration::from_secs(3600));
        let res = response(&[("date", &now), ("expires", &hour_ago)]);
        assert!(!store(&cache, &request(&[]), &res));
        // Expires 300 s after a Date an hour in the past: 300 s fresh from arrival.
        let later =
            httpdate::fmt_http_date(SystemTime::now() - std::time::Duration::from_secs(3600 - 300));
        let res = response(&[("date", &hour_ago), ("expires", &later)]);
        assert!(store(&cache, &request(&[]), &res));
        // No freshness at all: not kept (no heuristic freshness for revocation lists).
        let res = response(&[("last-modified", &hour_ago)]);
        assert!(!store(&cache, &request(&[]), &res));
    }

    #[test]
    fn one_fetch_per_url_collects_and_the_bytes_are_bounded() {
        let cache = LaneCache::default();
        let req = request(&[]);
        let res = response(&[("cache-control", "max-age=300")]);
        let first = cache.start_collecting("k", &req, &res, Some(10));
        assert!(first.is_some());
        assert!(
            cache.start_collecting("k", &req, &res, Some(10)).is_none(),
            "a second fetch of the same URL streams without collecting"
        );
        assert!(
            cache
                .start_collecting("big", &req, &res, Some(MAX_ENTRY_BYTES as u64 + 1))
                .is_none()
        );
        assert!(
            cache
                .start_collecting("unknown", &req, &res, None)
                .is_none()
        );
        let a = cache.start_collecting("a", &req, &res, Some(MAX_ENTRY_BYTES as u64));
        let b = cache.start_collecting("b", &req, &res, Some(MAX_ENTRY_BYTES as u64));
        assert!(a.is_some() && b.is_none(), "32 MiB in all");
        drop((first, a));
        assert!(
            cache
                .start_collecting("b", &req, &res, Some(MAX_ENTRY_BYTES as u64))
                .is_some()
        );
    }
}
