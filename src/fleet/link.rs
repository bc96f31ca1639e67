//! The connection to Redis, whichever way it is laid out ([`Topology`]): one endpoint through
//! a `ConnectionManager` (it reconnects by itself); a Redis Cluster through the cluster client
//! (it follows MOVED and ASK, and finds a promoted replica by the slots); a Sentinel set
//! through a connection to the primary the sentinels name, asked again after any failure
//! (a failover). Made lazily, so nothing connects before the first call; every call under a
//! timeout and timed. A script Redis does not know (it restarted, or a replica took over) is
//! loaded again and the call retried once.
//!
//! A call is a [`Batch`]: one pipeline on one endpoint; on a cluster, one pipeline per hash slot,
//! all sent at once, the answers put back in order. Each key names its slot by its hash tag, and
//! every script touches the keys of one slot only, so no call ever spans slots. A primary away
//! fails only its slots' commands: [`Link::query_each`] gives each command's answer apart.

use super::scripts;
use crate::config::FleetSettings;
use crate::config::fleet::Topology;
use prometheus_client::metrics::histogram::Histogram;
use redis::aio::{ConnectionManager, ConnectionManagerConfig, MultiplexedConnection};
use redis::cluster_async::ClusterConnection;
use redis::cluster_routing::Slot;
use redis::{Cmd, FromRedisValue, IntoConnectionInfo, Pipeline, ToRedisArgs, Value};
use std::sync::Mutex;
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

/// Commands sent together: built like a `redis::Pipeline` (`cmd`, `arg`, `ignore`,
/// `add_command`); answers of ignored commands are left out.
#[derive(Default)]
pub struct Batch {
    cmds: Vec<Cmd>,
    ignored: Vec<bool>,
}

impl Batch {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn add_command(&mut self, cmd: Cmd) -> &mut Self {
        self.cmds.push(cmd);
        self.ignored.push(false);
        self
    }

    pub fn cmd(&mut self, name: &str) -> &mut Self {
        self.add_command(redis::cmd(name))
    }

    /// An argument to the last command.
    pub fn arg<T: ToRedisArgs>(&mut self, arg: T) -> &mut Self {
        if let Some(cmd) = self.cmds.last_mut() {
            cmd.arg(arg);
        }
        self
    }

    /// Leaves the last command's answer out.
    pub fn ignore(&mut self) -> &mut Self {
        if let Some(last) = self.ignored.last_mut() {
            *last = true;
        }
        self
    }

    /// The answers of the commands not ignored, from one per command (`None`: none came; an
    /// empty list: none at all).
    fn answered(&self, mut values: Vec<Option<Value>>) -> Vec<Option<Value>> {
        values.resize(self.cmds.len(), None);
        values
            .into_iter()
            .zip(&self.ignored)
            .filter(|(_, ignored)| !**ignored)
            .map(|(value, _)| value)
            .collect()
    }

    /// All of it as one pipeline.
    fn pipeline(&self) -> Pipeline {
        let mut pipe = redis::pipe();
        for (cmd, ignored) in self.cmds.iter().zip(&self.ignored) {
            pipe.add_command(cmd.clone());
            if *ignored {
                pipe.ignore();
            }
        }
        pipe
    }

    /// The commands grouped by hash slot, in order within each group: a command without a key
    /// (`TIME`) goes with the first that has one, so it runs on the same node.
    fn by_slot(&self) -> Vec<Vec<usize>> {
        let mut groups: Vec<(Option<Slot>, Vec<usize>)> = Vec::new();
        let mut keyless = Vec::new();
        for (i, cmd) in self.cmds.iter().enumerate() {
            let Some(slot) = key_of(cmd).map(Slot::for_key) else {
                keyless.push(i);
                continue;
            };
            match groups.iter_mut().find(|(s, _)| *s == Some(slot)) {
                Some((_, group)) => group.push(i),
                None => groups.push((Some(slot), vec![i])),
            }
        }
        match groups.first_mut() {
            Some((_, first)) => {
                first.extend(keyless);
                first.sort_unstable();
            }
            None if !keyless.is_empty() => groups.push((None, keyless)),
            None => {}
        }
        groups.into_iter().map(|(_, group)| group).collect()
    }
}

/// The key a command of the fleet's works on (`None`: it has none, like `TIME`).
pub fn key_of(cmd: &Cmd) -> Option<Vec<u8>> {
    let args: Vec<&[u8]> = cmd
        .args_iter()
        .map(|arg| match arg {
            redis::Arg::Simple(bytes) => bytes,
            _ => &[],
        })
        .collect();
    let name = args.first()?.to_ascii_uppercase();
    match name.as_slice() {
        b"EVALSHA" | b"EVAL" => {
            let keys: usize = std::str::from_utf8(args.get(2)?).ok()?.parse().ok()?;
            (keys > 0).then(|| args.get(3).map(|k| k.to_vec()))?
        }
        b"TIME" | b"PING" => None,
        _ => args.get(1).map(|k| k.to_vec()),
    }
}

enum Connection {
    Single(ConnectionManager),
    Cluster(Cluster),
    Sentinel(Sentinel),
}

/// A Redis Cluster: the client, made at the first call, and since when calls fail.
struct Cluster {
    client: redis::cluster::ClusterClient,
    connection: Mutex<Option<ClusterConnection>>,
    failing_since: Mutex<Option<Instant>>,
    /// Failing this long, the connection is made anew from the seed nodes (a cluster that was
    /// all down, or moved to other addresses).
    renew_after: Duration,
}

impl Cluster {
    fn connection(&self) -> ClusterConnection {
        let mut held = self.connection.lock().unwrap_or_else(|e| e.into_inner());
        held.get_or_insert_with(|| {
            // Connects in the background; calls wait for it (within their timeout).
            self.client
                .get_pending_async_connection_with_config(redis::cluster::ClusterConfig::new())
        })
        .clone()
    }

    /// Notes how a call went; failing for `renew_after`, the next call starts from the seeds.
    fn answered(&self, ok: bool) {
        let mut since = self.failing_since.lock().unwrap_or_else(|e| e.into_inner());
        match (*since, ok) {
            (_, true) => *since = None,
            (None, false) => *since = Some(Instant::now()),
            (Some(at), false) if at.elapsed() >= self.renew_after => {
                *since = None;
                *self.connection.lock().unwrap_or_else(|e| e.into_inner()) = None;
            }
            (Some(_), false) => {}
        }
    }
}

/// A Sentinel set: the sentinels' client, and the connection to the primary they named last
/// (with a number, so a failed call forgets only the connection it used).
struct Sentinel {
    client: tokio::sync::Mutex<redis::sentinel::SentinelClient>,
    config: redis::AsyncConnectionConfig,
    current: Mutex<Option<(u64, MultiplexedConnection)>>,
    /// The primary's address the sentinels named last, for saying when it changes.
    primary: Mutex<String>,
}

impl Sentinel {
    /// The primary's connection: the one held, or a new one to the primary the sentinels name
    /// now.
    async fn connection(&self) -> redis::RedisResult<(u64, MultiplexedConnection)> {
        if let Some(held) = self.held() {
            return Ok(held);
        }
        let mut client = self.client.lock().await;
        // Another call may have connected while this one waited.
        if let Some(held) = self.held() {
            return Ok(held);
        }
        let primary = client.async_get_client().await?;
        let address = primary.get_connection_info().addr().to_string();
        let connection = primary
            .get_multiplexed_async_connection_with_config(&self.config)
            .await?;
        let mut current = self.current.lock().unwrap_or_else(|e| e.into_inner());
        let number = current.as_ref().map_or(0, |(n, _)| n + 1);
        *current = Some((number, connection.clone()));
        let mut named = self.primary.lock().unwrap_or_else(|e| e.into_inner());
        if *named != address {
            if !named.is_empty() {
                tracing::info!(
                    primary = %address,
                    was = %named,
                    "fleet: the sentinels name a new Redis primary; calls go to it"
                );
            }
            *named = address;
        }
        Ok((number, connection))
    }

    fn held(&self) -> Option<(u64, MultiplexedConnection)> {
        self.current
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// After a failed call: the next one asks the sentinels again (a failover, or a primary
    /// that became a replica).
    fn forget(&self, number: u64) {
        let mut current = self.current.lock().unwrap_or_else(|e| e.into_inner());
        if current.as_ref().is_some_and(|(n, _)| *n == number) {
            *current = None;
        }
    }
}

pub struct Link {
    connection: Connection,
    timeout: Duration,
    duration: Histogram,
}

impl Link {
    /// Nothing connects until the first call.
    pub fn new(settings: &FleetSettings, duration: Histogram) -> Result<Self, String> {
        let timeout = settings.refresh;
        let problem = |e: redis::RedisError| format!("fleet.redis {}: {e}", settings.redis.shown);
        let connection = match &settings.redis.topology {
            Topology::Single => Connection::Single(single(settings, timeout).map_err(problem)?),
            Topology::Cluster { seeds } => {
                Connection::Cluster(cluster(settings, seeds, timeout).map_err(problem)?)
            }
            Topology::Sentinel {
                master,
                sentinels,
                password,
            } => Connection::Sentinel(
                sentinel(settings, master, sentinels, password.as_ref(), timeout)
                    .map_err(problem)?,
            ),
        };
        Ok(Self {
            connection,
            timeout,
            duration,
        })
    }

    /// Runs `batch` (one round trip) within the timeout.
    pub async fn query<T: FromRedisValue>(&self, batch: &Batch) -> Result<T, Failure> {
        self.query_within(batch, self.timeout).await
    }

    /// Runs `batch` within `timeout`; NOSCRIPT loads the scripts and retries once.
    pub async fn query_within<T: FromRedisValue>(
        &self,
        batch: &Batch,
        timeout: Duration,
    ) -> Result<T, Failure> {
        let started = Instant::now();
        let call = async {
            match &self.connection {
                Connection::Single(manager) => {
                    with_scripts(&mut manager.clone(), &batch.pipeline())
                        .await
                        .map_err(Failure::Redis)
                }
                Connection::Cluster(cluster) => {
                    let (values, failure) = by_slot(&cluster.connection(), batch, timeout).await;
                    if let Some(failure) = failure {
                        return Err(failure);
                    }
                    let answers = batch.answered(values).into_iter().flatten().collect();
                    T::from_redis_value(Value::Array(answers)).map_err(|e| Failure::Redis(e.into()))
                }
                Connection::Sentinel(sentinel) => {
                    let (number, mut connection) =
                        sentinel.connection().await.map_err(Failure::Redis)?;
                    let result = with_scripts(&mut connection, &batch.pipeline()).await;
                    if result.is_err() {
                        sentinel.forget(number);
                    }
                    result.map_err(Failure::Redis)
                }
            }
        };
        let result = tokio::time::timeout(timeout, call).await;
        if let Connection::Cluster(cluster) = &self.connection {
            cluster.answered(matches!(result, Ok(Ok(_))));
        }
        let result = match result {
            Err(_) => {
                if let Connection::Sentinel(sentinel) = &self.connection
                    && let Some((number, _)) = sentinel.held()
                {
                    // A primary that went silent: ask the sentinels at the next call.
                    sentinel.forget(number);
                }
                Err(Failure::Timeout)
            }
            Ok(result) => result,
        };
        self.duration.observe(started.elapsed().as_secs_f64());
        result
    }

    /// Runs `batch` within the timeout: each command's answer (ignored ones left out), `None`
    /// for those whose part did not answer, and why. On a cluster a primary away fails only
    /// the commands of its slots; elsewhere a call answers whole or not at all.
    pub async fn query_each(&self, batch: &Batch) -> (Vec<Option<Value>>, Option<Failure>) {
        let Connection::Cluster(cluster) = &self.connection else {
            return match self.query::<Vec<Value>>(batch).await {
                Ok(values) => (values.into_iter().map(Some).collect(), None),
                Err(failure) => (batch.answered(Vec::new()), Some(failure)),
            };
        };
        let started = Instant::now();
        let (values, failure) = by_slot(&cluster.connection(), batch, self.timeout).await;
        cluster.answered(values.iter().any(Option::is_some) || failure.is_none());
        self.duration.observe(started.elapsed().as_secs_f64());
        (batch.answered(values), failure)
    }
}

fn is_noscript(e: &redis::RedisError) -> bool {
    e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::NoScript)
}

/// Loads every script (on a cluster: on every primary).
async fn load_scripts<C: redis::aio::ConnectionLike>(connection: &mut C) -> redis::RedisResult<()> {
    for script in scripts::all() {
        script.load_async(connection).await?;
    }
    Ok(())
}

/// `pipe` on one connection; NOSCRIPT loads the scripts and runs it again.
async fn with_scripts<C, T>(connection: &mut C, pipe: &Pipeline) -> redis::RedisResult<T>
where
    C: redis::aio::ConnectionLike,
    T: FromRedisValue,
{
    match pipe.query_async::<T>(connection).await {
        Err(e) if is_noscript(&e) => {
            load_scripts(connection).await?;
            pipe.query_async::<T>(connection).await
        }
        other => other,
    }
}

/// `batch` on a cluster: one pipeline per slot, all at once (the cluster client sends each to
/// its slot's primary, following MOVED and ASK), each within `timeout`; a slot answering
/// NOSCRIPT gets the scripts and runs again. Every command's answer, `None` where its slot did
/// not answer (a primary away: the others' answers still count), and the first failure.
async fn by_slot(
    connection: &ClusterConnection,
    batch: &Batch,
    timeout: Duration,
) -> (Vec<Option<Value>>, Option<Failure>) {
    let deadline = tokio::time::Instant::now() + timeout;
    let groups = batch.by_slot();
    let pipelines: Vec<Pipeline> = groups
        .iter()
        .map(|group| {
            let mut pipe = redis::pipe();
            for &i in group {
                pipe.add_command(batch.cmds[i].clone());
            }
            pipe
        })
        .collect();
    let run = |pipe: &Pipeline| {
        let mut connection = connection.clone();
        let pipe = pipe.clone();
        async move {
            match tokio::time::timeout_at(deadline, pipe.query_async::<Vec<Value>>(&mut connection))
                .await
            {
                Err(_) => Err(Failure::Timeout),
                Ok(answer) => answer.map_err(Failure::Redis),
            }
        }
    };
    let noscript =
        |a: &Result<Vec<Value>, Failure>| matches!(a, Err(Failure::Redis(e)) if is_noscript(e));
    let mut answers: Vec<Result<Vec<Value>, Failure>> =
        futures_util::future::join_all(pipelines.iter().map(run)).await;
    if answers.iter().any(noscript) {
        let loaded = tokio::time::timeout_at(deadline, load_scripts(&mut connection.clone())).await;
        if let Ok(Ok(())) = loaded {
            for (pipe, answer) in pipelines.iter().zip(answers.iter_mut()) {
                if noscript(answer) {
                    *answer = run(pipe).await;
                }
            }
        }
    }
    let mut values: Vec<Option<Value>> = vec![None; batch.cmds.len()];
    let mut failure = None;
    for (group, answer) in groups.iter().zip(answers) {
        match answer {
            Ok(answer) => {
                for (&i, value) in group.iter().zip(answer) {
                    values[i] = Some(value);
                }
            }
            Err(e) => {
                failure.get_or_insert(e);
            }
        }
    }
    (values, failure)
}

/// The client of one endpoint, with the password file's password and `fleet.user`.
fn single(settings: &FleetSettings, timeout: Duration) -> redis::RedisResult<ConnectionManager> {
    let mut info = settings.redis.url.0.as_str().into_connection_info()?;
    let mut redis = info.redis_settings().clone();
    if let Some(password) = &settings.redis.password {
        redis = redis.set_password(&password.0);
    }
    if let Some(user) = &settings.redis.user {
        redis = redis.set_username(user);
    }
    info = info.set_redis_settings(redis);
    let client = redis::Client::open(info)?;
    let config = ConnectionManagerConfig::new()
        .set_connection_timeout(Some(timeout))
        .set_response_timeout(Some(timeout))
        .set_number_of_retries(1)
        .set_min_delay(Duration::from_millis(50))
        .set_max_delay(timeout);
    ConnectionManager::new_lazy_with_config(client, config)
}

/// The cluster client from the seed nodes; every call bounded by `timeout` (retries and
/// redirections included).
fn cluster(
    settings: &FleetSettings,
    seeds: &[crate::config::fleet::Secret],
    timeout: Duration,
) -> redis::RedisResult<Cluster> {
    let mut builder = redis::cluster::ClusterClient::builder(seeds.iter().map(|s| s.0.as_str()))
        .connection_timeout(timeout)
        .response_timeout(timeout)
        .retries(3)
        .min_retry_wait(10)
        .max_retry_wait(timeout.as_millis() as u64 / 2);
    if let Some(password) = &settings.redis.password {
        builder = builder.password(&password.0);
    }
    if let Some(user) = &settings.redis.user {
        builder = builder.username(user);
    }
    Ok(Cluster {
        client: builder.build()?,
        connection: Mutex::new(None),
        failing_since: Mutex::new(None),
        renew_after: settings.lease.max(Duration::from_secs(5)),
    })
}

/// The sentinels' client: their own credentials from their URLs (or the sentinel password
/// file), the primary's from `fleet.user` and `redis_password_file`, TLS to both when the
/// sentinels' URLs say `rediss://`.
fn sentinel(
    settings: &FleetSettings,
    master: &str,
    sentinels: &[crate::config::fleet::Secret],
    password: Option<&crate::config::fleet::Secret>,
    timeout: Duration,
) -> redis::RedisResult<Sentinel> {
    let mut nodes = Vec::new();
    for url in sentinels {
        let mut info = url.0.as_str().into_connection_info()?;
        if let Some(password) = password {
            let redis = info.redis_settings().clone().set_password(&password.0);
            info = info.set_redis_settings(redis);
        }
        nodes.push(info);
    }
    let mut primary = redis::RedisConnectionInfo::default();
    if let Some(password) = &settings.redis.password {
        primary = primary.set_password(&password.0);
    }
    if let Some(user) = &settings.redis.user {
        primary = primary.set_username(user);
    }
    let mut node =
        redis::sentinel::SentinelNodeConnectionInfo::default().set_redis_connection_info(primary);
    if settings.redis.tls {
        node = node.set_tls_mode(redis::TlsMode::Secure);
    }
    let client = redis::sentinel::SentinelClient::build(
        nodes,
        master,
        Some(node),
        redis::sentinel::SentinelServerType::Master,
    )?;
    Ok(Sentinel {
        client: tokio::sync::Mutex::new(client),
        config: redis::AsyncConnectionConfig::new()
            .set_connection_timeout(Some(timeout))
            .set_response_timeout(Some(timeout)),
        current: Mutex::new(None),
        primary: Mutex::new(String::new()),
    })
}

/// `EVALSHA` of `script` on `key`; the caller adds the arguments, then the command to a
/// batch.
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_batch_splits_by_slot_with_keyless_commands_beside_the_first_key() {
        let mut batch = Batch::new();
        batch.cmd("TIME");
        batch.cmd("HGETALL").arg("portcullis:{learned}");
        batch.add_command(evalsha_keys(
            &scripts::LEARNED_CHANGE,
            &["portcullis:{learned}", "portcullis:{learned}:version"],
        ));
        batch
            .cmd("HDEL")
            .arg("portcullis:{tunnels:a}")
            .arg("gw")
            .ignore();
        batch.add_command(evalsha(&scripts::SET_TUNNELS, "portcullis:{tunnels:b}"));
        let groups = batch.by_slot();
        assert_eq!(groups.len(), 3, "{groups:?}");
        assert_eq!(groups[0], [0, 1, 2]);
        assert_eq!(
            key_of(&batch.cmds[2]).as_deref(),
            Some(&b"portcullis:{learned}"[..])
        );
        let mut alone = Batch::new();
        alone.cmd("TIME");
        assert_eq!(alone.by_slot(), [[0]]);
        assert!(Batch::new().by_slot().is_empty());
    }
}
