//! The connection to Redis: one `ConnectionManager` (it reconnects by itself), made lazily so
//! nothing connects before the first call, and every call under a timeout and timed. A
//! script Redis no longer knows (it restarted) is loaded again and the call retried once.

use super::scripts;
use crate::config::FleetSettings;
use prometheus_client::metrics::histogram::Histogram;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{FromRedisValue, IntoConnectionInfo, Pipeline};
use std::time::{Duration, Instant};

/// Why a call did not answer.
#[derive(Debug)]
pub enum Failure {
    Timeout,
    Redis(redis::RedisError),
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Failure::Timeout => f.write_str("no answer within the timeout"),
            // Redis errors name the command and the server's message, never the password.
            Failure::Redis(e) => write!(f, "{e}"),
        }
    }
}

pub struct Link {
    manager: ConnectionManager,
    timeout: Duration,
    duration: Histogram,
}

impl Link {
    /// Nothing connects until the first call.
    pub fn new(settings: &FleetSettings, duration: Histogram) -> Result<Self, String> {
        let mut info = settings
            .redis
            .url
            .0
            .as_str()
            .into_connection_info()
            .map_err(|e| format!("fleet.redis {}: {e}", settings.redis.shown))?;
        if let Some(password) = &settings.redis.password {
            let redis = info.redis_settings().clone().set_password(&password.0);
            info = info.set_redis_settings(redis);
        }
        let client = redis::Client::open(info)
            .map_err(|e| format!("fleet.redis {}: {e}", settings.redis.shown))?;
        let timeout = settings.refresh;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(timeout))
            .set_response_timeout(Some(timeout))
            .set_number_of_retries(1)
            .set_min_delay(Duration::from_millis(50))
            .set_max_delay(timeout);
        let manager = ConnectionManager::new_lazy_with_config(client, config)
            .map_err(|e| format!("fleet.redis {}: {e}", settings.redis.shown))?;
        Ok(Self {
            manager,
            timeout,
            duration,
        })
    }

    /// Runs `pipe` (one round trip) within the timeout.
    pub async fn query<T: FromRedisValue>(&self, pipe: &Pipeline) -> Result<T, Failure> {
        self.query_within(pipe, self.timeout).await
    }

    /// Runs `pipe` within `timeout`; NOSCRIPT loads the scripts and retries once.
    pub async fn query_within<T: FromRedisValue>(
        &self,
        pipe: &Pipeline,
        timeout: Duration,
    ) -> Result<T, Failure> {
        let started = Instant::now();
        let mut manager = self.manager.clone();
        let call = async {
            match pipe.query_async::<T>(&mut manager).await {
                Err(e)
                    if e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::NoScript) =>
                {
                    for script in scripts::all() {
                        script.load_async(&mut manager).await?;
                    }
                    pipe.query_async::<T>(&mut manager).await
                }
                other => other,
            }
        };
        let result = match tokio::time::timeout(timeout, call).await {
            Err(_) => Err(Failure::Timeout),
            Ok(result) => result.map_err(Failure::Redis),
        };
        self.duration.observe(started.elapsed().as_secs_f64());
        result
    }
}

/// `EVALSHA` of `script` on `key`; the caller adds the arguments, then the command to a
/// pipeline.
pub fn evalsha(script: &redis::Script, key: &str) -> redis::Cmd {
    evalsha_keys(script, &[key])
}

/// `EVALSHA` of `script` on `keys` (one hash slot: the same hash tag).
pub fn evalsha_keys(script: &redis::Script, keys: &[&str]) -> redis::Cmd {
    let mut cmd = redis::cmd("EVALSHA");
    cmd.arg(script.get_hash()).arg(keys.len());
    for key in keys {
        cmd.arg(*key);
    }
    cmd
}
