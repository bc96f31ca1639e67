//! The Lua scripts Redis runs for the fleet, each atomic. Times come only from Redis's `TIME`
//! and lease lengths, never from a replica's clock, so clock skew between replicas does not
//! matter. Every entry is "values... expires_ms" in one hash field per replica; a field past
//! its expiry is dropped by the next script that reads the hash, and every key expires as a
//! whole when no replica touches it for two leases.

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

/// Every script, for loading them again after Redis lost its script cache (a restart).
pub fn all() -> [&'static Script; 4] {
    [&SHARE, &OPEN_TUNNEL, &SET_TUNNELS, &AUTH_ATTEMPT]
}
