"""verify: answers checked before the client sees them, repaired when they can be.

    pipeline:
      - auth: {...}
      - verify:
          rules:
            - models: ["gpt-4o*"]
              checks: [json_schema, code]      # run on every request to these models
              allow: [json_schema, code, consensus]   # what a request may select
              max_repairs: 2
              consensus: {models: [a, b, c], quorum: 2, judge: {model: j}}
          sandbox: {wall_s: 5, memory_bytes: 536870912}
      - quotas: {...}
      - cache: {}
      - routing: {...}
      - fallback: {...}

Checks: `json_schema` (schema.py: the answer parses and validates against the
request's response_format, tool-call arguments against their tool's
parameters), `code` (code.py, sandbox.py: fenced code runs in a sandbox with
the caller's tests), `consensus` (consensus.py: several models, the majority
or a judge). A failed json_schema or code check asks again, with the error
added to the conversation, up to `max_repairs` times (the same model, or the
next of `repair_models`); then, by `on_failure`, a 422 or the last answer
marked failed.

Every call verify makes goes down the rest of the chain, so quotas, cost,
caching, routing and fallback apply to each. Placed before the cache, it also
checks cache hits, and only verified answers are stored (a failed one is
marked `cache-control: no-store`; the ones it drops never completed).

A request selects checks within `allow` with a `verify` object in its body
(`{"checks": [...], "tests": "...", "report": true}`) or headers
(`x-meshgate-verify: code,json_schema`, `x-meshgate-verify-tests: <base64>`,
`x-meshgate-verify-report: true`). The result is in `x-meshgate-verification`,
and in the body's `meshgate_verification` object when the request asks for the
report. Streams are buffered (up to `max_buffer_bytes`) and replayed once
verified, or with `stream: observe` passed through and checked afterwards
(recorded only).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import logging
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from typing import Any, Literal

import orjson
from prometheus_client import Counter, Histogram

from plugins.verify.answer import Answer, read_answer, repair_body
from plugins.verify.code import run_code
from plugins.verify.consensus import (
    Candidate,
    ConsensusConfig,
    decide,
    gather,
    json_key,
    judge_prompt,
    judged,
    normalize,
)
from plugins.verify.sandbox import RunResult, Sandbox, SandboxConfig
from plugins.verify.schema import Schemas, check_answer, check_tool_calls, requested_format
from proxy.config import SettingError
from proxy.context import PluginContext
from proxy.errors import GatewayError, InvalidRequest
from proxy.metrics import Labelled
from proxy.pipeline import Call, Next, Reply
from proxy.protocol import prompt_text
from proxy.sse import Event
from proxy.tracing import span

log = logging.getLogger("meshgate.verify")

Check = Literal["json_schema", "code", "consensus"]
CHECKS = ("json_schema", "code", "consensus")
MAX_TESTS_BYTES = 64 * 1024
SANDBOX_BUCKETS = (0.01, 0.02, 0.03, 0.04, 0.05, 0.075, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)


class VerificationFailed(GatewayError):
    status = 422
    type = "invalid_request_error"
    code = "verification_failed"


@dataclass(frozen=True, slots=True, kw_only=True)
class RuleConfig:
    models: list[str] = field(default_factory=lambda: ["*"])  # globs on the model asked for
    checks: list[Check] = field(default_factory=lambda: ["json_schema"])  # run by default
    allow: list[Check] | None = None  # what a request may select (default: `checks`)
    max_repairs: int = 1
    repair_models: list[str] = field(default_factory=list)  # repair i asks the i-th, else same
    on_failure: Literal["reject", "mark"] = "reject"
    stream: Literal["buffer", "observe"] = "buffer"
    require_tests: bool = False  # code: run only when the caller gave tests
    consensus: ConsensusConfig | None = None

    def __post_init__(self) -> None:
        if self.max_repairs < 0:
            raise ValueError("max_repairs cannot be negative")
        if "consensus" in self.checks + (self.allow or []) and self.consensus is None:
            raise ValueError("the consensus check needs a consensus: {...} section")

    @property
    def allowed(self) -> list[str]:
        return list(self.allow) if self.allow is not None else list(self.checks)


@dataclass(frozen=True, slots=True, kw_only=True)
class VerifyConfig:
    rules: list[RuleConfig] = field(default_factory=lambda: [RuleConfig()])
    max_buffer_bytes: int = 1024 * 1024  # a stream longer than this is not verified
    sandbox: SandboxConfig = field(default_factory=SandboxConfig)


@dataclass(slots=True)
class Selection:
    """What one request is checked for."""

    checks: list[str]
    tests: str | None = None
    report: bool = False


@dataclass(slots=True)
class Record:
    """What verification found, for the header, the report and the metrics."""

    checks: list[dict[str, Any]] = field(default_factory=list)
    repairs: int = 0
    result: str = "passed"  # passed, repaired, failed, skipped, unverified

    def header(self) -> str:
        parts = [self.result, "checks=" + ",".join(c["check"] for c in self.checks)]
        for c in self.checks:
            parts.append(f"{c['check']}={c['outcome']}")
            if c["check"] == "consensus" and "agreed" in c:
                parts.append(f"agreement={len(c['agreed'])}/{c['asked']}")
                parts.append("agreed=" + ",".join(c["agreed"]))
        if self.repairs:
            parts.append(f"repairs={self.repairs}")
        return "; ".join(parts)

    def report(self) -> dict[str, Any]:
        return {"result": self.result, "repairs": self.repairs, "checks": self.checks}


class Verify:
    Config = VerifyConfig

    def __init__(self, config: VerifyConfig, context: PluginContext) -> None:
        self.config = config
        self.catalog = context.catalog
        for i, rule in enumerate(config.rules):
            names = list(rule.repair_models)
            if rule.consensus is not None:
                names += rule.consensus.models
                if rule.consensus.judge is not None:
                    names.append(rule.consensus.judge.model)
            for name in names:
                if self.catalog.find(name) is None:
                    raise SettingError(("rules", i), f"no model named '{name}' under models:")
        self.schemas = Schemas()
        self.sandbox = Sandbox(config.sandbox)
        self.metrics = VerifyMetrics(context.registry)

    async def start(self) -> None:
        if any("code" in r.checks + r.allowed for r in self.config.rules):
            await self.sandbox.start()
        else:
            self.sandbox.reason = "no rule allows the code check"

    async def __call__(self, call: Call, call_next: Next) -> Reply:
        asked = call.body.pop("verify", None)  # never sent upstream, never in a cache key
        if call.endpoint not in ("chat", "completions") or call.model is None:
            return await call_next(call)
        rule = self.rule(call.model.name)
        if rule is None:
            return await call_next(call)
        selection = self.selection(call, rule, asked)
        if not selection.checks:
            return await call_next(call)
        if call.stream and rule.stream == "observe":
            return await self.observed(call, call_next, rule, selection)
        record = Record()
        if "consensus" in selection.checks:
            reply = await self.consensus(call, call_next, rule, selection, record)
        else:
            reply = await self.checked(call, call_next, rule, selection, record)
        self.metrics.results_of(record.result).inc()
        reply.headers["x-meshgate-verification"] = record.header()
        if record.result == "failed":
            reply.headers["cache-control"] = "no-store"
        if selection.report:
            _attach_report(reply, record)
        return reply

    def rule(self, model: str) -> RuleConfig | None:
        for rule in self.config.rules:
            if any(fnmatchcase(model, pattern) for pattern in rule.models):
                return rule
        return None

    def selection(self, call: Call, rule: RuleConfig, asked: Any) -> Selection:
        """The checks this request runs: the rule's, or those it selects within `allow`."""
        if asked is not None and not isinstance(asked, dict):
            raise InvalidRequest("verify must be an object.", param="verify")
        asked = asked or {}
        checks = asked.get("checks")
        header = call.headers.get("x-meshgate-verify")
        if checks is None and header is not None:
            checks = [c.strip() for c in header.split(",") if c.strip()]
        if checks is None:
            checks = list(rule.checks)
        elif not isinstance(checks, list) or not all(isinstance(c, str) for c in checks):
            raise InvalidRequest("verify.checks must be a list of check names.", param="verify")
        refused = [c for c in checks if c not in rule.allowed]
        if refused:
            named = ", ".join(repr(c[:64]) for c in refused[:5])  # the client's words, bounded
            raise InvalidRequest(
                f"The check(s) {named} cannot be selected for this "
                f"model; allowed: {', '.join(rule.allowed) or 'none'}.",
                param="verify.checks",
            )
        tests = asked.get("tests")
        if tests is None and (encoded := call.headers.get("x-meshgate-verify-tests")) is not None:
            try:
                tests = base64.b64decode(encoded, validate=True).decode()
            except (binascii.Error, UnicodeDecodeError):
                raise InvalidRequest(
                    "x-meshgate-verify-tests must be base64 of UTF-8 text.",
                    param="x-meshgate-verify-tests",
                ) from None
        if tests is not None and (not isinstance(tests, str) or len(tests) > MAX_TESTS_BYTES):
            raise InvalidRequest(
                f"verify.tests must be a string of at most {MAX_TESTS_BYTES} characters.",
                param="verify.tests",
            )
        report = asked.get("report")
        if report is None:
            report = call.headers.get("x-meshgate-verify-report", "").lower() in ("1", "true")
        if not isinstance(report, bool):
            raise InvalidRequest("verify.report must be a boolean.", param="verify.report")
        return Selection(list(dict.fromkeys(checks)), tests, report)

    async def checked(
        self, call: Call, call_next: Next, rule: RuleConfig, selection: Selection, record: Record
    ) -> Reply:
        """json_schema and code, with repairs: each repair is one more call down the chain."""
        target = call
        last: tuple[Reply, str, Answer] | None = None
        for attempt in range(rule.max_repairs + 1):
            if last is not None:
                model = target.body["model"]
                if attempt - 1 < len(rule.repair_models):
                    model = rule.repair_models[attempt - 1]
                body = repair_body(call.body, last[2], last[1])
                body["model"] = model
                target = call.fork(body, self.catalog.get(model))
            try:
                reply = await self._call(call, target, call_next)
                events = await self._buffer(reply)
            except GatewayError:
                if last is None:
                    raise  # the request itself failed: not verification's to answer
                log.info("request %s: a repair call failed", call.request_id, exc_info=True)
                break
            except _TooLong:
                record.result = "skipped"
                record.checks = [{"check": c, "outcome": "skipped",
                                  "detail": "the stream is longer than max_buffer_bytes"}
                                 for c in selection.checks]  # fmt: skip
                self._count(record.checks, repaired=False)
                return reply
            record.repairs = attempt
            answer = read_answer(reply, events)
            results = await self.run_checks(call, rule, selection, answer)
            problem = next((r["detail"] for r in results if r["outcome"] in _FAILED), None)
            record.checks = results
            if problem is None:
                record.result = "repaired" if attempt else "passed"
                if any(r["outcome"] == "not_run" for r in results):
                    record.result = "unverified"  # no sandbox, or none free: not a pass
                self._count(results, repaired=bool(attempt))
                return reply
            last = (reply, problem, answer)
        assert last is not None
        self._count(record.checks, repaired=False)
        record.result = "failed"
        if rule.on_failure == "reject":
            raise VerificationFailed(
                f"The answer failed verification after {record.repairs} repair(s): {last[1][:2000]}"
            )
        return last[0]

    async def run_checks(
        self, call: Call, rule: RuleConfig, selection: Selection, answer: Answer
    ) -> list[dict[str, Any]]:
        results = []
        if "json_schema" in selection.checks:
            with span("meshgate.verify.json_schema") as traced:
                results.append(self._json_check(call.body, answer))
                if traced is not None:
                    traced.set_attribute("meshgate.verify.outcome", results[-1]["outcome"])
        if "code" in selection.checks:
            with span("meshgate.verify.code") as traced:
                results.append(await self._code_check(rule, selection, answer))
                if traced is not None:
                    traced.set_attribute("meshgate.verify.outcome", results[-1]["outcome"])
        return results

    def _json_check(self, body: dict, answer: Answer) -> dict[str, Any]:
        if answer.tool_calls:
            problem = check_tool_calls(self.schemas, body, answer.tool_calls)
        elif requested_format(body) is not None:
            problem = check_answer(self.schemas, body, answer.text)
        else:
            why = "the request asks for no JSON format and no tool was called"
            return {"check": "json_schema", "outcome": "skipped", "detail": why}
        if problem is None:
            return {"check": "json_schema", "outcome": "passed"}
        return {"check": "json_schema", "outcome": "failed", "detail": problem}

    async def _code_check(
        self, rule: RuleConfig, selection: Selection, answer: Answer
    ) -> dict[str, Any]:
        if rule.require_tests and not selection.tests:
            return {"check": "code", "outcome": "skipped", "detail": "no tests were given"}
        result = await run_code(self.sandbox, answer.text, selection.tests)
        if result is None:
            return {"check": "code", "outcome": "skipped", "detail": "the answer holds no code"}
        return self._code_result(result)

    def _code_result(self, result: RunResult) -> dict[str, Any]:
        if result.outcome != "not_run":
            self.metrics.sandbox_seconds.observe(result.duration_s)
        entry: dict[str, Any] = {"check": "code", "outcome": result.outcome}
        entry["run"] = result.summary()
        if result.outcome not in ("passed", "not_run"):
            entry["detail"] = f"the code {result.outcome}: {result.excerpt(1000)}"
        return entry

    async def consensus(
        self, call: Call, call_next: Next, rule: RuleConfig, selection: Selection, record: Record
    ) -> Reply:
        config = rule.consensus
        assert config is not None
        names = config.models or [call.body["model"]] * config.samples
        with span("meshgate.verify.consensus", {"meshgate.verify.asked": len(names)}):
            tasks = [  # made inside the span: each answer's upstream span is its child
                asyncio.ensure_future(
                    self._candidate(call, call_next, config, selection, rule, n, i)
                )
                for i, n in enumerate(names)
            ]
            candidates = await gather(tasks, config)
        call.upstream_s += max((c.upstream_s for c in candidates), default=0.0)
        verdict = decide(config, candidates)
        how = verdict.how
        if config.judge is not None and (config.judge.when == "always" or how != "agreed"):
            picked = await self._judge(call, call_next, config, candidates)
            if picked is not None:
                verdict.winner, how = picked, "judged"
                verdict.agreed = [c for c in candidates if c.key == picked.key] or [picked]
        self.metrics.consensus_of(how).inc()
        self.metrics.agreement.observe(verdict.agreement)
        answered = [c for c in candidates if c.error is None]
        entry = {
            "check": "consensus", "outcome": "passed" if verdict.winner else "failed",
            "how": how, "answers": len(answered), "asked": len(names),
            "agreed": [c.model for c in verdict.agreed] if verdict.winner else [],
            "agreement": round(verdict.agreement, 3),
            "errors": [f"{c.model}: {c.error}" for c in candidates if c.error][:5],
        }  # fmt: skip
        record.checks.append(entry)
        self.metrics.checks_of("consensus", "passed" if verdict.winner else "failed").inc()
        if verdict.winner is None:
            record.result = "failed"
            if rule.on_failure == "reject" or not answered:
                raise VerificationFailed(
                    f"The answers did not agree: {len(verdict.agreed)} of {len(answered)} "
                    f"matched (quorum {config.quorum}); errors: {entry['errors'] or 'none'}"
                )
            verdict.winner = min(answered, key=lambda c: c.position)
        winner = verdict.winner
        reply = winner.reply
        assert isinstance(reply, Reply)
        call.deployment = reply.deployment or call.deployment
        return reply

    async def _candidate(
        self, call: Call, call_next: Next, config: ConsensusConfig,
        selection: Selection, rule: RuleConfig, name: str, position: int,
    ) -> Candidate:  # fmt: skip
        candidate = Candidate(name, position)
        body = dict(call.body)
        body["model"] = name
        sub = call.fork(body, self.catalog.get(name))
        try:
            reply = await self._call(call, sub, call_next, parallel=True)
            candidate.upstream_s = sub.upstream_s
            events = await self._buffer(reply)
            answer = read_answer(reply, events)
            candidate.reply, candidate.text = reply, answer.text
            others = [c for c in selection.checks if c != "consensus"]
            if others:  # an answer that fails the other checks agrees with nothing
                results = await self.run_checks(
                    call, rule, Selection(others, selection.tests), answer
                )
                if any(r["outcome"] in _FAILED for r in results):
                    return candidate
            candidate.key = await self._key(config, answer, selection)
        except GatewayError as exc:
            candidate.error = f"{exc.status} {exc.code or exc.type}"
        except _TooLong:
            candidate.error = "the answer is longer than max_buffer_bytes"
        return candidate

    async def _key(
        self, config: ConsensusConfig, answer: Answer, selection: Selection
    ) -> str | None:
        """What answers must share to agree."""
        text = answer.text
        if answer.tool_calls:  # the same tools with the same arguments
            calls = [c.get("function") or {} for c in answer.tool_calls]
            key = [[f.get("name"), json_key(f.get("arguments") or "")] for f in calls]
            return orjson.dumps(key).decode()
        if config.match == "json":
            return json_key(text)
        if config.match == "code":
            result = await run_code(self.sandbox, text, selection.tests)
            if result is None or result.outcome != "passed":
                return None
            self.metrics.sandbox_seconds.observe(result.duration_s)
            return "exit0:" + result.stdout
        return normalize(text) or None

    async def _judge(
        self, call: Call, call_next: Next, config: ConsensusConfig, candidates: list[Candidate]
    ) -> Candidate | None:
        judge = config.judge
        assert judge is not None
        distinct: dict[str | None, Candidate] = {}
        for c in sorted(candidates, key=lambda c: c.position):
            if c.error is None and c.reply is not None:
                distinct.setdefault(c.key if c.key is not None else f"#{c.position}", c)
        options = list(distinct.values())
        if not options:
            return None
        body = {
            "model": judge.model, "temperature": 0, "max_tokens": 200,
            "messages": [{"role": "user", "content": judge_prompt(
                prompt_text(call.body), options, judge.mode)}],
        }  # fmt: skip
        sub = call.fork(body, self.catalog.get(judge.model))
        sub.endpoint = "chat"
        try:
            reply = await self._call(call, sub, call_next)
            text = read_answer(reply, await self._buffer(reply)).text
        except (GatewayError, _TooLong) as exc:
            log.warning("request %s: the judge %s failed: %r", call.request_id, judge.model, exc)
            return None
        index = judged(text, len(options), judge.mode)
        return options[index] if index is not None else None

    async def _call(
        self, call: Call, target: Call, call_next: Next, parallel: bool = False
    ) -> Reply:
        """One call down the chain, its attempts and upstream time counted for `call`
        (parallel calls overlap: the caller adds the longest of them)."""
        if target is call:
            return await call_next(call)
        try:
            return await call_next(target)
        finally:
            call.attempts += target.attempts
            if not parallel:
                call.upstream_s += target.upstream_s
            if call.deployment is None:
                call.deployment = target.deployment

    async def _buffer(self, reply: Reply) -> list[Event] | None:
        """A streamed answer's events, read whole (None for a buffered answer)."""
        if not reply.streamed:
            return None
        events = await reply.buffer(self.config.max_buffer_bytes)
        if events is None:
            raise _TooLong
        return events

    async def observed(
        self, call: Call, call_next: Next, rule: RuleConfig, selection: Selection
    ) -> Reply:
        """A stream passed through as it comes, checked once it ended (recorded only)."""
        reply = await call_next(call)
        reply.headers["x-meshgate-verification"] = "observe"
        # Sent before it is checked, so it is never stored: a later hit would be unchecked.
        reply.headers["cache-control"] = "no-store"
        if not reply.streamed:
            return reply
        seen: list[Event] = []
        size = 0

        async def tap(events):
            nonlocal size
            async for event in events:
                if size <= self.config.max_buffer_bytes:
                    seen.append(event)
                    size += len(event.raw)
                yield event

        async def check(finished: Reply) -> None:
            if size > self.config.max_buffer_bytes or not finished.completed:
                self.metrics.results_of("skipped").inc()
                return
            results = await self.run_checks(call, rule, selection, read_answer(finished, seen))
            failed = [r for r in results if r["outcome"] in _FAILED]
            self._count(results, repaired=False)
            self.metrics.results_of("failed" if failed else "passed").inc()
            if failed:
                log.warning("request %s: a streamed answer failed verification (observe): %s",
                            call.request_id, failed[0].get("detail"))  # fmt: skip

        return reply.wrap_events(tap).on_complete(check)

    def _count(self, results: list[dict[str, Any]], repaired: bool) -> None:
        for r in results:
            outcome = "repaired" if repaired and r["outcome"] == "passed" else r["outcome"]
            self.metrics.checks_of(r["check"], outcome).inc()

    async def close(self) -> None:
        self.sandbox.close()


_FAILED = ("failed", "timeout", "memory", "killed", "output_limit")


class _TooLong(Exception):
    """A stream passed max_buffer_bytes: it goes to the client unverified."""


def _attach_report(reply: Reply, record: Record) -> None:
    """`meshgate_verification` in the JSON body, for a client that asked for it."""
    report = record.report()
    if reply.body is not None:
        try:
            data = orjson.loads(reply.body)
        except orjson.JSONDecodeError:
            return
        if isinstance(data, dict):
            data["meshgate_verification"] = report
            reply.body = orjson.dumps(data)
        return

    async def with_report(events):
        async for event in events:
            if event.raw.startswith(b"data: [DONE]"):
                yield Event.of({"meshgate_verification": report})
            yield event

    reply.wrap_events(with_report)


class VerifyMetrics:
    def __init__(self, r) -> None:
        self.checks = Counter(
            "meshgate_verify_checks", "Verification checks run, by check and outcome.",
            ["check", "outcome"], registry=r,
        )  # fmt: skip
        self.results = Counter(
            "meshgate_verify_results",
            "Verified answers by result (passed, repaired, failed, skipped).",
            ["result"], registry=r,
        )  # fmt: skip
        self.sandbox_seconds = Histogram(
            "meshgate_verify_sandbox_seconds", "Sandbox runs, start to result.",
            buckets=SANDBOX_BUCKETS, registry=r,
        )  # fmt: skip
        self.consensus = Counter(
            "meshgate_verify_consensus",
            "Consensus decisions by how they were reached (agreed, judged, first, split).",
            ["how"], registry=r,
        )  # fmt: skip
        self.agreement = Histogram(
            "meshgate_verify_consensus_agreement",
            "Share of the gathered answers that agreed with the one given.",
            buckets=(0.2, 0.34, 0.5, 0.67, 0.75, 0.9, 1.0), registry=r,
        )  # fmt: skip
        self.checks_of = Labelled(self.checks)
        self.results_of = Labelled(self.results)
        self.consensus_of = Labelled(self.consensus)
