"""The Redis state backend: every process agrees through one Lua script.

One script call checks and counts a batch of requests, each all-or-nothing and
atomically, using the Redis server's clock (so hosts share one time). Two
things keep the round trips few:

- Group commit: checks made in the same event-loop tick go in one call, sent at
  once; up to MAX_IN_FLIGHT calls overlap, so requests do not all wait on one
  round trip while the CPU idles. At concurrency 1 a batch is one request.
- After-call work (refunding reserved tokens, giving back concurrency slots,
  adding spend) is summed in memory and rides along with the next batch, or a
  flush every `flush_interval_s` when idle. If Redis is down it is kept, not
  dropped, and flushed when Redis is back, and on shutdown.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import orjson
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError, ResponseError

from proxy.background import stop
from proxy.state.base import (
    LEASE_TTL_S,
    MAX_TAT_S,
    SPEND_TTL_S,
    Limit,
    State,
    StateConfig,
    StateUnavailable,
    Verdict,
    valid_amount,
)
from proxy.state.outage import Outage, describe

log = logging.getLogger("meshgate.state")

FLUSH_INTERVAL_S = 0.05
MAX_IN_FLIGHT = 4  # batches sent and not yet answered

# ARGV[1] is the batch as JSON: lease_ttl, spend_ttl, req (per request: lease and
# its limits as [kind, key, limit, period, cost, field, whole]), adj ([key, seconds
# of TAT]), rel ([key, lease, slots]) and spend ([key, field, amount]). The answer is JSON:
# `out`, per request [allowed, denied limit (1-based), retry_after, values...] or
# [-1] for a request the script could not process, and `failed`, the entries that
# failed. Each entry runs under pcall, so one bad value cannot fail the batch.
SCRIPT = """
local batch = cjson.decode(ARGV[1])
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local failed = 0
local function set_tat(key, tat)
  if tat ~= tat or tat <= now then redis.call('DEL', key) return end
  if tat > now + MAX_TAT then tat = now + MAX_TAT end
  redis.call('SET', key, string.format('%.6f', tat), 'PX', math.ceil((tat - now) * 1000) + 1000)
end
local function apply(f, ...)  -- one entry; a failure is counted, never fails the batch
  local ok = pcall(f, ...)
  if not ok then failed = failed + 1 end
  return ok
end
for _, adj in ipairs(batch.adj) do
  apply(function()
    local tat = tonumber(redis.call('GET', adj[1]) or now)
    if tat < now then tat = now end
    set_tat(adj[1], tat + adj[2])
  end)
end
local function slots(lease, n)  -- the members a lease of n slots holds
  if n == 1 then return {lease} end
  local members = {}
  for i = 1, n do members[i] = lease .. '#' .. i end
  return members
end
for _, rel in ipairs(batch.rel) do
  apply(redis.call, 'ZREM', rel[1], unpack(slots(rel[2], rel[3])))
end
local spend_keys = {}
for _, sp in ipairs(batch.spend) do
  if apply(redis.call, 'HINCRBYFLOAT', sp[1], sp[2], string.format('%.10f', sp[3])) then
    spend_keys[sp[1]] = true
  end
end
for key in pairs(spend_keys) do redis.call('EXPIRE', key, batch.spend_ttl, 'NX') end
local function admit(req)
  local lease, limits = req[1], req[2]
  local tats, values, denied, retry = {}, {}, 0, 0
  for i, l in ipairs(limits) do
    local kind, key, limit, period, cost, field, whole = l[1], l[2], l[3], l[4], l[5], l[6], l[7]
    if kind == 'rate' then
      local interval = period / limit
      local tat = tats[key] or tonumber(redis.call('GET', key) or now)
      if tat < now then tat = now end
      local new_tat = tat + cost * interval
      local used = new_tat - now
      if used > period + 1e-9 then denied, retry = i, used - period break end
      tats[key] = new_tat
      values[#values + 1] = math.floor((period - used) / interval + 1e-3)
      values[#values + 1] = used
    elseif kind == 'concurrency' then
      local live = redis.call('ZCARD', key)
      if live + cost > limit then  -- drop leases whose holders died, then count again
        redis.call('ZREMRANGEBYSCORE', key, '-inf', now)
        live = redis.call('ZCARD', key)
      end
      if live + cost > limit then denied, retry = i, 1 break end
      values[#values + 1] = limit - live - cost
      values[#values + 1] = 0
    else
      local spent = tonumber(redis.call('HGET', key, field) or '0')
      if spent + 1e-9 >= limit or (whole and spent + cost > limit + 1e-9) then denied = i break end
      values[#values + 1] = limit - spent - cost
      values[#values + 1] = 0
    end
  end
  if denied > 0 then return {0, denied, retry} end
  for key, tat in pairs(tats) do set_tat(key, tat) end
  for _, l in ipairs(limits) do
    if l[1] == 'concurrency' then
      for _, member in ipairs(slots(lease, l[5])) do
        redis.call('ZADD', l[2], now + batch.lease_ttl, member)
      end
      redis.call('PEXPIRE', l[2], math.ceil(batch.lease_ttl * 1000))
    elseif l[1] == 'budget' and l[5] > 0 then  -- reserve the call's estimated cost
      redis.call('HINCRBYFLOAT', l[2], l[6], string.format('%.10f', l[5]))
      redis.call('EXPIRE', l[2], batch.spend_ttl, 'NX')
    end
  end
  return {1, 0, 0, values}
end
local out = {}
for r, req in ipairs(batch.req) do
  local ok, result = pcall(admit, req)
  if ok then out[r] = result else failed = failed + 1; out[r] = {-1} end
end
return cjson.encode({out = out, failed = failed})
""".replace("MAX_TAT", str(MAX_TAT_S))


# KEYS: failures counter, open flag. ARGV: failures, window_ms, cooldown_ms.
BREAKER_FAILURE = """
local n = redis.call('INCR', KEYS[1])
if n == 1 then redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
if n >= tonumber(ARGV[1]) and redis.call('EXISTS', KEYS[2]) == 0 then
  redis.call('SET', KEYS[2], '1', 'PX', ARGV[3])
  redis.call('DEL', KEYS[1])
  return 1
end
return 0
"""


class _Pending:
    """After-call work not yet sent, summed so it stays small."""

    def __init__(self) -> None:
        self.adjust: dict[str, float] = defaultdict(float)  # key -> seconds of TAT
        self.release: list[tuple[str, str, int]] = []  # key, lease, slots
        self.spend: dict[tuple[str, str], float] = defaultdict(float)
        # one amount for several places, summed per place only when sent
        self.spread: dict[tuple[tuple[str, str], ...], float] = defaultdict(float)

    def __bool__(self) -> bool:
        return bool(self.adjust or self.release or self.spend or self.spread)

    def spent(self) -> dict[tuple[str, str], float]:
        """Every place's amount, the spread ones added in."""
        if not self.spread:
            return self.spend
        total = defaultdict(float, self.spend)
        for places, amount in self.spread.items():
            for place in places:
                total[place] += amount
        return total

    def merge(self, other: _Pending) -> None:
        for key, seconds in other.adjust.items():
            self.adjust[key] += seconds
        self.release.extend(other.release)
        for spent, amount in other.spend.items():
            self.spend[spent] += amount
        for places, amount in other.spread.items():
            self.spread[places] += amount


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
        self._script = self.redis.register_script(SCRIPT)
        self._breaker_failure = self.redis.register_script(BREAKER_FAILURE)
        self._queue: list[tuple[Sequence[Limit], str, asyncio.Future]] = []
        self._in_flight = 0
        self._tasks: set[asyncio.Task] = set()
        self._pending = _Pending()
        self._spend_ttl = SPEND_TTL_S
        self._flusher: asyncio.Task | None = None
        self.outage = Outage("redis")

    async def start(self) -> None:
        self._flusher = asyncio.create_task(self._flush_forever())
        try:
            await self.redis.ping()
        except (RedisError, OSError) as exc:
            log.warning("redis at %s is not reachable yet: %s", _where(self.config.url), exc)

    async def close(self) -> None:
        await stop(self._flusher)
        with contextlib.suppress(StateUnavailable):
            await self.flush()
        if self._pending:
            log.warning("redis unreachable at shutdown: unsent spend and refunds are lost")
        await self.redis.aclose()

    async def acquire(self, limits: Sequence[Limit], lease: str) -> Verdict:
        self.refuse_invalid(limits)
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._queue.append((limits, lease, future))
        if len(self._queue) == 1 and self._in_flight < MAX_IN_FLIGHT:
            loop.call_soon(self._send_queued)
        return await future

    def _send_queued(self) -> None:
        """Send what this loop tick queued as one batch, without waiting for the last one."""
        if not self._queue or self._in_flight >= MAX_IN_FLIGHT:
            return
        batch, self._queue = self._queue, []
        self._in_flight += 1
        task = asyncio.ensure_future(self._send(batch))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _send(self, batch) -> None:
        try:
            results = await self._call(batch)
        except StateUnavailable as exc:
            for _, _, future in batch:
                if not future.done():
                    future.set_exception(StateUnavailable(str(exc)))
        else:
            for (_, _, future), verdict in zip(batch, results, strict=True):
                if future.done():
                    continue
                if verdict is None:
                    future.set_exception(StateUnavailable("redis could not count this call"))
                else:
                    future.set_result(verdict)
        finally:
            self._in_flight -= 1
            if self._queue:
                self._send_queued()

    async def _call(self, batch) -> list[Verdict | None]:
        self.outage.check()
        pending, self._pending = self._pending, _Pending()
        p = self.prefix
        payload: dict[str, Any] = {
            "lease_ttl": LEASE_TTL_S,
            "spend_ttl": self._spend_ttl,
            "req": [
                [
                    lease,
                    [
                        [x.kind, p + x.key, x.limit, x.period_s, x.cost, x.field, x.whole]
                        for x in limits
                    ],
                ]
                for limits, lease, _ in batch
            ],
            "adj": [[p + key, seconds] for key, seconds in pending.adjust.items()],
            "rel": [[p + key, lease, slots] for key, lease, slots in pending.release],
            "spend": [[p + key, f, amount] for (key, f), amount in pending.spent().items()],
        }
        try:
            async with asyncio.timeout(self.config.timeout_s):
                raw = await self._script(keys=[], args=[orjson.dumps(payload)])
        except ResponseError as exc:
            # Redis ran the script and refused it: sending the same work again would
            # fail again, and with it every later batch. Drop it, and say so.
            self.outage.answered()
            self.dropped(len(payload["adj"]) + len(payload["rel"]) + len(payload["spend"]))
            raise StateUnavailable(f"redis refused the batch: {exc}") from exc
        except (RedisError, OSError, TimeoutError) as exc:
            pending.merge(self._pending)  # unsent, not refused: keep it for the next batch
            self._pending = pending
            self.outage.failed(exc)
            raise StateUnavailable(f"redis: {describe(exc)}") from exc
        self.outage.answered()
        answer = orjson.loads(raw)
        if answer["failed"]:
            self.dropped(answer["failed"])
        return [_verdict(r) for r in answer["out"]]

    async def flush(self) -> None:
        """Send the after-call work now (tests, shutdown); the flusher does it when idle."""
        if self._pending:
            await self._call([])

    async def _flush_forever(self) -> None:
        while True:
            await asyncio.sleep(FLUSH_INTERVAL_S)
            if self._pending and not self._in_flight:
                try:
                    await self.flush()
                except StateUnavailable as exc:
                    log.debug("flush deferred: %s", exc)

    def adjust(self, limit: Limit, delta: float) -> None:
        if not valid_amount(delta):
            return self.dropped(1)
        self._pending.adjust[limit.key] += delta * limit.period_s / limit.limit

    def release(self, keys: list[str], lease: str, slots: int = 1) -> None:
        self._pending.release.extend((key, lease, slots) for key in keys)

    def add_spend(self, entries: list[tuple[str, str, float]], ttl_s: float) -> None:
        self._spend_ttl = int(ttl_s)
        for key, field, amount in entries:
            if valid_amount(amount):
                self._pending.spend[key, field] += amount
            else:
                self.dropped(1)

    def add_spend_to(
        self, places: tuple[tuple[str, str], ...], amount: float, ttl_s: float
    ) -> None:
        self._spend_ttl = int(ttl_s)
        if valid_amount(amount):
            self._pending.spread[places] += amount
        else:
            self.dropped(len(places))

    async def breaker_failure(self, name, failures, window_s, cooldown_s):
        args = [failures, int(window_s * 1000), int(cooldown_s * 1000)]
        keys = _breaker_keys(self.prefix, name)
        return bool(await self._bounded(self._breaker_failure(keys=keys, args=args)))

    async def breaker_close(self, name: str) -> None:
        await self._bounded(self.redis.delete(*_breaker_keys(self.prefix, name)))

    async def breakers_open(self, names: list[str]) -> dict[str, float] | None:
        async def read() -> list:
            async with self.redis.pipeline(transaction=False) as pipe:
                for name in names:
                    pipe.pttl(_breaker_keys(self.prefix, name)[1])
                return await pipe.execute()

        remaining = await self._bounded(read())
        return {n: ms / 1000 for n, ms in zip(names, remaining, strict=True) if ms > 0}

    async def read_spend(self, key: str) -> dict[str, float]:
        await self.flush()
        raw = await self._bounded(self.redis.hgetall(self.prefix + key))
        return {k: float(v) for k, v in raw.items()}

    async def _bounded(self, operation):
        """One state call, with its retry and reconnect, in `timeout_s` at most; none
        while Redis is known to hang (proxy/state/outage.py)."""
        with self.outage.guarded(operation):
            async with asyncio.timeout(self.config.timeout_s):
                return await operation


def _breaker_keys(prefix: str, name: str) -> list[str]:
    return [f"{prefix}breaker:{name}:failures", f"{prefix}breaker:{name}:open"]


def _verdict(result: list) -> Verdict | None:
    if result[0] == -1:
        return None
    if not result[0]:
        return Verdict(False, denied=int(result[1]) - 1, retry_after_s=float(result[2]))
    values = result[3] if isinstance(result[3], list) else []  # cjson encodes {} for []
    return Verdict(True, remaining=tuple(values[0::2]), reset_s=tuple(values[1::2]))


def _where(url: str) -> str:
    """The URL without its password, for logs."""
    _, sep, tail = url.rpartition("@")
    return f"{url.split('://')[0]}://***@{tail}" if sep else url
