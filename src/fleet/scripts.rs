//! The Lua scripts Redis runs for the fleet, each atomic. Times come only from Redis's `TIME`
//! and lease lengths, never from a replica's clock, so clock skew between replicas does not
//! matter. Limits: every entry is "values... expires_ms" in one hash field per replica; a field
//! past its expiry is dropped by the next script that reads the hash, and every key expires as
//! a whole when no replica touches it for two leases. Learned destinations: one field per
//! destination, "stamp state" where the stamp is Redis's clock when the change arrived (the
//! fleet's `learned` module says why). A replica's name: one key holding its instance id.

use redis::Script;
use std::sync::LazyLock;

/// Redis's clock in ms, read in a script.
const NOW: &str = "local t = redis.call('TIME')\n\
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)\n";

/// One budget's share. KEYS[1] the budget's hash; ARGV: replica, wants, weight, limit,
/// lease_ms. Writes the caller's entry, drops expired ones, and divides the limit max-min
/// fairly by weight (Doorman's FairShare): each replica gets min(wants, lambda * weight) with
/// lambda such that the total is the limit; what is left when every want is met is divided by
/// weight, so the shares always sum to the limit. Returns the caller's share (bytes/s).
pub static SHARE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(&format!(
        "{NOW}{}",
        r#"
local key, me = KEYS[1], ARGV[1]
local limit, lease = tonumber(ARGV[4]), tonumber(ARGV[5])
redis.call('HSET', key, me, ARGV[2] .. ' ' .. ARGV[3] .. ' ' .. (now + lease))
redis.call('PEXPIRE', key, 2 * lease)
local all = redis.call('HGETALL', key)
local names, wants, weights = {}, {}, {}
for i = 1, #all, 2 do
  local d, w, e = string.match(all[i + 1], '^(%S+) (%S+) (%S+)$')
  if e == nil or tonumber(e) <= now or tonumber(d) == nil or tonumber(w) == nil then
    redis.call('HDEL', key, all[i])
  else
    names[#names + 1] = all[i]
    wants[#wants + 1] = math.max(0, tonumber(d))
    weights[#weights + 1] = math.max(1e-6, tonumber(w))
  end
end
local n = #names
local got, open = {}, {}
local left, wsum, total = limit, 0, 0
for i = 1, n do open[i] = true; wsum = wsum + weights[i]; total = total + weights[i] end
-- Water-filling: cap those whose wants are below their weighted level, then raise the level.
while wsum > 0 and left > 0 do
  local level = left / wsum
  local capped = false
  for i = 1, n do
    if open[i] and wants[i] <= level * weights[i] then
      got[i] = wants[i]; left = left - wants[i]; wsum = wsum - weights[i]
      open[i] = false; capped = true
    end
  end
  if not capped then
    for i = 1, n do
      if open[i] then got[i] = level * weights[i]; open[i] = false end
    end
    left = 0
  end
end
local mine = 0
for i = 1, n do
  local share = got[i] or 0
  if left > 0 then share = share + left * weights[i] / total end
  if names[i] == me then mine = share end
end
return math.floor(mine)
"#
    ))
});

/// A branch's tunnel count across the fleet, opening one. KEYS[1] the branch's hash; ARGV:
/// replica, max, lease_ms. Counts the live entries; below max, adds one to the caller's and
/// renews it. Returns 1 (admitted) or 0 (full).
pub static OPEN_TUNNEL: LazyLock<Script> = LazyLock::new(|| {
    Script::new(&format!(
        "{NOW}{}",
        r#"
local key, me = KEYS[1], ARGV[1]
local max, lease = tonumber(ARGV[2]), tonumber(ARGV[3])
local all = redis.call('HGETALL', key)
local sum, own = 0, 0
for i = 1, #all, 2 do
  local c, e = string.match(all[i + 1], '^(%S+) (%S+)$')
  if e == nil or tonumber(e) <= now or tonumber(c) == nil then
    redis.call('HDEL', key, all[i])
  else
    sum = sum + tonumber(c)
    if all[i] == me then own = tonumber(c) end
  end
end
if sum >= max then return 0 end
redis.call('HSET', key, me, (own + 1) .. ' ' .. (now + lease))
redis.call('PEXPIRE', key, 2 * lease)
return 1
"#
    ))
});

/// Sets the caller's tunnel count of a branch (a tunnel closed: one less; a refresh: the true
/// local count, which heals a lost decrement). KEYS[1] the branch's hash; ARGV: replica,
/// count ("-1": one less than now), lease_ms. A count of 0 removes the entry.
pub static SET_TUNNELS: LazyLock<Script> = LazyLock::new(|| {
    Script::new(&format!(
        "{NOW}{}",
        r#"
local key, me = KEYS[1], ARGV[1]
local count, lease = tonumber(ARGV[2]), tonumber(ARGV[3])
if count < 0 then
  local c = string.match(redis.call('HGET', key, me) or '', '^(%S+) ')
  count = math.max(0, (tonumber(c) or 0) - 1)
end
if count == 0 then redis.call('HDEL', key, me); return 0 end
redis.call('HSET', key, me, count .. ' ' .. (now + lease))
redis.call('PEXPIRE', key, 2 * lease)
return count
"#
    ))
});

/// One authentication attempt from a client address in a fixed 60 s window (Redis's clock).
/// KEYS[1] the address's counter. Returns the attempts in the window, this one included.
pub static AUTH_ATTEMPT: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
local n = redis.call('INCR', KEYS[1])
if n == 1 or redis.call('PTTL', KEYS[1]) < 0 then redis.call('PEXPIRE', KEYS[1], 60000) end
return n
"#,
    )
});

/// Learned destinations: the order of two states of one field, `(stamp, gone)`, a tombstone
/// after a live entry of the same stamp (a tie never revives what was forgotten).
const LEARNED_ORDER: &str = r#"
local function parse(v)
  if not v then return nil, false end
  local s, rest = string.match(v, '^(%d+) (.*)$')
  return tonumber(s), rest == '-'
end
local function newer(s1, g1, s2, g2)
  if s2 == nil then return true end
  return s1 > s2 or (s1 == s2 and g1 and not g2)
end
local function touched(key)
  local last = tonumber(redis.call('GET', key)) or 0
  redis.call('SET', key, string.format('%.0f', math.max(now, last + 1)))
end
"#;

/// Changes made on a replica (learned, approved, forgotten), stamped with Redis's clock as they
/// arrive. KEYS[1] the learned hash, KEYS[2] its version key; ARGV: (kind, field, value)
/// triples, kind `learn`, `approve` or `forget`, value `first_seen approved` (ignored for a
/// forget). A change gets a stamp above the field's own (so it wins over every state the field
/// had), except a learn of a name held already and a forget of one forgotten already, which
/// keep theirs. Returns each change's stamp, in order.
pub static LEARNED_CHANGE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(&format!(
        "{NOW}{LEARNED_ORDER}{}",
        r#"
local key, version = KEYS[1], KEYS[2]
local out, wrote = {}, false
for i = 1, #ARGV, 3 do
  local kind, field, value = ARGV[i], ARGV[i + 1], ARGV[i + 2]
  local stamp, gone = parse(redis.call('HGET', key, field))
  if stamp ~= nil and ((kind == 'learn' and not gone) or (kind == 'forget' and gone)) then
    out[#out + 1] = stamp
  else
    local new = math.max(now, (stamp or 0) + 1)
    if kind == 'forget' then value = '-' end
    redis.call('HSET', key, field, string.format('%.0f', new) .. ' ' .. value)
    out[#out + 1] = new
    wrote = true
  end
end
if wrote then touched(version) end
return out
"#
    ))
});

/// A replica's stamped state written back where Redis holds an older one or none (Redis was
/// emptied, or restored from an old copy). KEYS as [`LEARNED_CHANGE`]; ARGV: (field, value)
/// pairs, value `stamp first_seen approved` or `stamp -`. Returns how many were written.
pub static LEARNED_REFILL: LazyLock<Script> = LazyLock::new(|| {
    Script::new(&format!(
        "{NOW}{LEARNED_ORDER}{}",
        r#"
local key, version = KEYS[1], KEYS[2]
local wrote = 0
for i = 1, #ARGV, 2 do
  local field, value = ARGV[i], ARGV[i + 1]
  local stamp, gone = parse(value)
  if stamp ~= nil then
    local held, held_gone = parse(redis.call('HGET', key, field))
    if newer(stamp, gone, held, held_gone) then
      redis.call('HSET', key, field, value)
      wrote = wrote + 1
    end
  end
end
if wrote > 0 then touched(version) end
return wrote
"#
    ))
});

/// Drops tombstones past their time. KEYS[1] the learned hash; ARGV: (field, value) pairs as
/// read; a field changed since is left alone. Returns how many went.
pub static LEARNED_SWEEP: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
local gone = 0
for i = 1, #ARGV, 2 do
  if redis.call('HGET', KEYS[1], ARGV[i]) == ARGV[i + 1] then
    redis.call('HDEL', KEYS[1], ARGV[i])
    gone = gone + 1
  end
end
return gone
"#,
    )
});

/// A replica's hold on its name. KEYS[1] the name's key; ARGV: this process's instance id,
/// lease_ms. Free or held by this process: (re)taken for the lease, 1; held by another live
/// process under the same `fleet.name`: 0, left alone.
pub static CLAIM_NAME: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
local holder = redis.call('GET', KEYS[1])
if holder and holder ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[1], ARGV[1], 'PX', tonumber(ARGV[2]))
return 1
"#,
    )
});

/// Gives the name back at stop (only this process's hold). KEYS[1] the name's key; ARGV[1]
/// the instance id.
pub static RELEASE_NAME: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('DEL', KEYS[1]); return 1 end
return 0
"#,
    )
});

/// Every script, for loading them again after Redis lost its script cache (a restart).
pub fn all() -> [&'static Script; 9] {
    [
        &SHARE,
        &OPEN_TUNNEL,
        &SET_TUNNELS,
        &AUTH_ATTEMPT,
        &LEARNED_CHANGE,
        &LEARNED_REFILL,
        &LEARNED_SWEEP,
        &CLAIM_NAME,
        &RELEASE_NAME,
    ]
}
