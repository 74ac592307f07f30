"""The Redis state backend: one pool, and one Lua script per check-and-count,
so each is a single atomic round trip that every gateway process agrees on.
Time is the Redis server's, so processes on different hosts share one clock."""

from __future__ import annotations

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from proxy.state import LEASE_TTL_S, Limit, State, StateConfig, StateUnavailable, Verdict

# KEYS: one per limit. ARGV: lease, lease_ttl, then per limit: kind, limit, period, cost, field.
ACQUIRE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local lease, lease_ttl = ARGV[1], tonumber(ARGV[2])
local n = #KEYS
local new_tats, out = {}, {}
for i = 1, n do
  local a = 2 + (i - 1) * 5
  local kind, limit = ARGV[a + 1], tonumber(ARGV[a + 2])
  local period, cost, field = tonumber(ARGV[a + 3]), tonumber(ARGV[a + 4]), ARGV[a + 5]
  local key = KEYS[i]
  if kind == 'rate' then
    local interval = period / limit
    local tat = new_tats[key] or tonumber(redis.call('GET', key) or now)
    if tat < now then tat = now end
    local new_tat = tat + cost * interval
    local used = new_tat - now
    if used > period + 1e-9 then
      return {0, i, tostring(used - period)}
    end
    new_tats[key] = new_tat
    out[#out + 1] = tostring(math.floor((period - used) / interval + 1e-9))
    out[#out + 1] = tostring(used)
  elseif kind == 'concurrency' then
    redis.call('ZREMRANGEBYSCORE', key, '-inf', now)
    local live = redis.call('ZCARD', key)
    if live >= limit then return {0, i, '1'} end
    out[#out + 1] = tostring(limit - live - 1)
    out[#out + 1] = '0'
  else
    local spent = tonumber(redis.call('HGET', key, field) or '0')
    if spent >= limit then return {0, i, '0'} end
    out[#out + 1] = tostring(limit - spent)
    out[#out + 1] = '0'
  end
end
for key, tat in pairs(new_tats) do
  redis.call('SET', key, tostring(tat), 'PX', math.ceil((tat - now) * 1000) + 1000)
end
for i = 1, n do
  if ARGV[2 + (i - 1) * 5 + 1] == 'concurrency' then
    redis.call('ZADD', KEYS[i], now + lease_ttl, lease)
    redis.call('PEXPIRE', KEYS[i], math.ceil(lease_ttl * 1000))
  end
end
return {1, 0, '0', unpack(out)}
"""

# KEYS: the rate key. ARGV: delta in seconds of TAT.
ADJUST = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local tat = tonumber(redis.call('GET', KEYS[1]) or now)
if tat < now then tat = now end
tat = tat + tonumber(ARGV[1])
if tat <= now then redis.call('DEL', KEYS[1]) return 0 end
redis.call('SET', KEYS[1], tostring(tat), 'PX', math.ceil((tat - now) * 1000) + 1000)
return 1
"""


class RedisState(State):
    def __init__(self, config: StateConfig) -> None:
        self.config = config
        self.prefix = config.prefix
        self.redis = aioredis.Redis.from_url(
            config.url,
            socket_timeout=config.timeout_s,
            socket_connect_timeout=config.timeout_s,
            max_connections=config.max_connections,
            retry=Retry(NoBackoff(), 1),
            decode_responses=True,
        )
        self._acquire = self.redis.register_script(ACQUIRE)
        self._adjust = self.redis.register_script(ADJUST)

    async def close(self) -> None:
        await self.redis.aclose()

    async def ping(self) -> None:
        try:
            await self.redis.ping()
        except (RedisError, OSError) as exc:
            raise StateUnavailable(f"redis: {exc}") from exc

    async def acquire(self, limits: list[Limit], lease: str) -> Verdict:
        args: list = [lease, LEASE_TTL_S]
        for limit in limits:
            args += [limit.kind, limit.limit, limit.period_s, limit.cost, limit.field]
        try:
            result = await self._acquire(keys=[self.prefix + x.key for x in limits], args=args)
        except (RedisError, OSError) as exc:
            raise StateUnavailable(f"redis: {exc}") from exc
        allowed, index, retry = int(result[0]), int(result[1]), float(result[2])
        if not allowed:
            return Verdict(False, denied=index - 1, retry_after_s=retry)
        values = [float(v) for v in result[3:]]
        return Verdict(True, remaining=tuple(values[0::2]), reset_s=tuple(values[1::2]))

    async def adjust(self, limit: Limit, delta: float) -> None:
        seconds = delta * limit.period_s / limit.limit
        await self._run(self._adjust(keys=[self.prefix + limit.key], args=[seconds]))

    async def release(self, keys: list[str], lease: str) -> None:
        async with self.redis.pipeline(transaction=False) as pipe:
            for key in keys:
                pipe.zrem(self.prefix + key, lease)
            await self._run(pipe.execute())

    async def add_spend(self, entries: list[tuple[str, str, float]], ttl_s: float) -> None:
        async with self.redis.pipeline(transaction=False) as pipe:
            for key, field, amount in entries:
                pipe.hincrbyfloat(self.prefix + key, field, amount)
                pipe.expire(self.prefix + key, int(ttl_s), nx=True)
            await self._run(pipe.execute())

    async def read_spend(self, key: str) -> dict[str, float]:
        raw = await self._run(self.redis.hgetall(self.prefix + key))
        return {k: float(v) for k, v in raw.items()}

    async def _run(self, awaitable):
        try:
            return await awaitable
        except (RedisError, OSError) as exc:
            raise StateUnavailable(f"redis: {exc}") from exc
