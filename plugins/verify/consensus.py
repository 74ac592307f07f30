"""The consensus check: one request to several models (or several samples of one)
in parallel, answered with what most of them agree on, or what a judge picks.

Answers are grouped by a key: normalized text, parsed JSON, or the output of
the answer's code run in the sandbox. The largest group wins when it has at
least `quorum` answers and `min_agreement` of those gathered; otherwise the tie
is broken by the judge, by model order (`first`), or not at all (`fail`).
Gathering stops as soon as no answer still out could change the winner, and at
`deadline_s` in any case; answers still out then are cancelled.
"""

from __future__ import annotations

import asyncio
import re
import unicodedata
from dataclasses import dataclass, field
from typing import Any, Literal

import orjson

from plugins.verify.schema import unfenced


@dataclass(frozen=True, slots=True, kw_only=True)
class JudgeConfig:
    model: str
    mode: Literal["pick", "score"] = "pick"  # name the best answer, or score each 0-10
    when: Literal["split", "always"] = "split"  # only when answers do not agree, or always


@dataclass(frozen=True, slots=True, kw_only=True)
class ConsensusConfig:
    models: list[str] = field(default_factory=list)  # empty: `samples` of the model asked for
    samples: int = 3
    match: Literal["text", "json", "code"] = "text"
    quorum: int = 2  # answers that must agree
    min_agreement: float = 0.5  # share of the gathered answers that must agree
    tie_break: Literal["judge", "first", "fail"] = "first"
    judge: JudgeConfig | None = None
    deadline_s: float = 60.0

    def __post_init__(self) -> None:
        if self.samples < 1 or self.quorum < 1 or self.deadline_s <= 0:
            raise ValueError("samples, quorum and deadline_s must be positive")
        if not 0 <= self.min_agreement <= 1:
            raise ValueError("min_agreement is a share, from 0 to 1")
        if self.tie_break == "judge" and self.judge is None:
            raise ValueError("tie_break: judge needs a judge: {model: ...}")
        if self.quorum > max(len(self.models), self.samples if not self.models else 0):
            raise ValueError("quorum is more than the answers asked for")


@dataclass(slots=True)
class Candidate:
    """One model's answer, and the key it is grouped by (None: agrees with nothing)."""

    model: str
    position: int
    text: str = ""
    key: str | None = None
    error: str | None = None
    reply: Any = None  # the Reply, kept so the winner can be returned
    upstream_s: float = 0.0


@dataclass(slots=True)
class Verdict:
    winner: Candidate | None
    agreed: list[Candidate]
    gathered: int
    how: str  # agreed, judged, first, split

    @property
    def agreement(self) -> float:
        return len(self.agreed) / self.gathered if self.gathered else 0.0


def normalize(text: str) -> str:
    """Text as compared: Unicode-folded, case-folded, whitespace collapsed, trailing
    punctuation dropped."""
    folded = unicodedata.normalize("NFKC", text).casefold()
    return re.sub(r"\s+", " ", folded).strip().rstrip(".!").strip()


def json_key(text: str) -> str | None:
    try:
        value = orjson.loads(unfenced(text))
    except orjson.JSONDecodeError:
        return None
    return orjson.dumps(value, option=orjson.OPT_SORT_KEYS).decode()


def decide(config: ConsensusConfig, candidates: list[Candidate]) -> Verdict:
    """The winner by the groups alone (a judge, if any, is asked after)."""
    answered = [c for c in candidates if c.error is None]
    groups: dict[str, list[Candidate]] = {}
    for c in answered:
        if c.key is not None:
            groups.setdefault(c.key, []).append(c)
    ranked = sorted(groups.values(), key=lambda g: (-len(g), min(c.position for c in g)))
    if not ranked:
        return Verdict(None, [], len(answered), "split")
    best = sorted(ranked[0], key=lambda c: c.position)
    tied = len(ranked) > 1 and len(ranked[1]) == len(best)
    enough = len(best) >= config.quorum and len(best) >= config.min_agreement * len(answered)
    if enough and not tied:
        return Verdict(min(best, key=lambda c: c.position), best, len(answered), "agreed")
    if config.tie_break == "first":
        return Verdict(min(best, key=lambda c: c.position), best, len(answered), "first")
    return Verdict(None, best, len(answered), "split")


def settled(config: ConsensusConfig, candidates: list[Candidate], pending: int) -> bool:
    """Whether answers still out can no longer change the winner."""
    counts: dict[str, int] = {}
    for c in candidates:
        if c.error is None and c.key is not None:
            counts[c.key] = counts.get(c.key, 0) + 1
    ordered = sorted(counts.values(), reverse=True) + [0, 0]
    return ordered[0] >= config.quorum and ordered[0] > ordered[1] + pending


async def gather(tasks: list[asyncio.Task], config: ConsensusConfig) -> list[Candidate]:
    """Candidates as they finish, until settled or the deadline; the rest cancelled."""
    done: list[Candidate] = []
    pending = set(tasks)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + config.deadline_s
    try:
        while pending:
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            finished, pending = await asyncio.wait(
                pending, timeout=remaining, return_when=asyncio.FIRST_COMPLETED
            )
            done.extend(t.result() for t in finished)
            if config.judge is None or config.judge.when != "always":
                if settled(config, done, len(pending)):
                    break
    finally:
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.wait(pending)
    return done


def judge_prompt(question: str, answers: list[Candidate], mode: str) -> str:
    listed = "\n\n".join(f"Answer {i + 1}:\n{c.text}" for i, c in enumerate(answers))
    if mode == "pick":
        ask = "Which answer is the most correct? Reply with its number only."
    else:
        ask = (
            "Score each answer from 0 (wrong) to 10 (fully correct). Reply with JSON only: "
            '{"scores": [s1, s2, ...]} in the order given.'
        )
    return f"Question:\n{question}\n\n{listed}\n\n{ask}"


def judged(text: str, count: int, mode: str) -> int | None:
    """The index the judge chose (0-based), or None if its answer says nothing usable."""
    if mode == "pick":
        found = re.search(r"\d+", text)
        index = int(found.group()) - 1 if found else -1
        return index if 0 <= index < count else None
    key = json_key(text)
    scores = orjson.loads(key).get("scores") if key and key.startswith("{") else None
    if not isinstance(scores, list) or len(scores) != count:
        return None
    if not all(isinstance(s, (int, float)) for s in scores):
        return None
    return max(range(count), key=lambda i: (scores[i], -i))
