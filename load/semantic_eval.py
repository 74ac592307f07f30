"""Precision and recall of the semantic cache's lookup on labelled prompt pairs.

    python -m load.semantic_eval                    # both labelled sets in load/
    python -m load.semantic_eval --pairs my.tsv     # a set of your own

Each pair (a, b) is labelled `same` (b may be answered with a's answer) or
`differs` (a near-miss whose answer changes), with a kind: how the paraphrase
differs (synonym, implied word, reordered, question form, spelling, typo) or
what the near-miss changes (antonym, other entity, number, unit, language,
version, format, audience, length, time, quantifier, and/or, pronoun, owner,
swapped operands, an added constraint). For each pair, a is cached in an index
of its own and b is looked up through the shipped code path: the embedding
model, the embedded index, the threshold and the near-miss checks, at the
defaults of SemanticConfig. Beside it, plain cosine similarity at the same
threshold and at the threshold that suits it best. A served `differs` pair is a
wrong answer. Per kind: the share of `same` pairs served (recall), the
`differs` pairs served (wrong answers).

The sets: semantic_pairs*.tsv (paraphrases that mostly keep their words) and
semantic_pairs_lexical*.tsv (other words: synonyms, implied words, spelling,
typos; near-misses of every kind above). The *_holdout sets were not looked at
while the checks were tuned (holdout2 was written after holdout had been
measured once, and measured once after the lexicon grew).
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import sys
from pathlib import Path

import numpy as np
import orjson

from plugins.cache.embedded_index import EmbeddedIndex
from plugins.cache.embedder import LocalEmbedder
from plugins.cache.parts import EmbedderConfig, Probe
from plugins.cache.semantic import SemanticCache, SemanticConfig
from plugins.cache.verify import Checker, known_words

HERE = Path(__file__).resolve().parent
SETS = [
    HERE / "semantic_pairs.tsv",
    HERE / "semantic_pairs_holdout.tsv",
    HERE / "semantic_pairs_lexical.tsv",
    HERE / "semantic_pairs_lexical_holdout.tsv",
    HERE / "semantic_pairs_lexical_holdout2.tsv",
]


def read_pairs(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f, delimiter="\t"))


async def lookups(
    pairs: list[dict], config: SemanticConfig, embedder, checker: Checker
) -> list[tuple[bool, float]]:
    """For each pair: whether b was served a's answer, and their similarity."""
    results = []
    for i, pair in enumerate(pairs):
        cache = SemanticCache(config, embedder, EmbeddedIndex(4))
        cache.checker = checker
        stored = Probe(f"pair-{i}", "eval", "m", pair["a"])
        await cache.add(stored, f"answer-{i}", 60)
        asked = Probe(f"pair-{i}", "eval", "m", pair["b"])
        matches, _ = await cache.find(asked)
        similarity = float(stored.vector @ asked.vector)
        results.append((bool(matches), similarity))
    return results


def score(served: np.ndarray, same: np.ndarray) -> dict:
    tp = int((served & same).sum())
    fp = int((served & ~same).sum())
    return {
        "precision": round(tp / (tp + fp), 3) if tp + fp else None,
        "recall": round(tp / int(same.sum()), 3),
        "wrong_answers": fp,
    }


async def evaluate(path: Path, config: SemanticConfig, embedder, checker: Checker) -> dict:
    pairs = read_pairs(path)
    results = await lookups(pairs, config, embedder, checker)
    served = np.array([r[0] for r in results])
    similarity = np.array([r[1] for r in results])
    same = np.array([p["label"] == "same" for p in pairs])
    cosine_best = max(
        (score(similarity >= t, same) | {"threshold": round(float(t), 2)}
         for t in np.arange(0.80, 1.0, 0.01)),
        key=lambda s: (s["precision"] or 0, s["recall"]),
    )  # fmt: skip
    by_kind = {}
    for kind in sorted({p["kind"] for p in pairs}):
        rows = np.array([p["kind"] == kind for p in pairs])
        label = "same" if same[rows].all() else "differs"
        served_here = int((served & rows).sum())
        by_kind[kind] = {"label": label, "pairs": int(rows.sum()), "served": served_here}
        if label == "same":
            by_kind[kind]["recall"] = round(served_here / int(rows.sum()), 3)
        else:
            by_kind[kind]["wrong_answers"] = served_here
    return {
        "set": path.name,
        "pairs": len(pairs),
        "same": int(same.sum()),
        "differs": int((~same).sum()),
        "threshold": config.threshold,
        "lookup": score(served, same),
        "cosine_at_threshold": score(similarity >= config.threshold, same),
        "cosine_best": cosine_best,
        "by_kind": by_kind,
    }


def report(result: dict) -> str:
    t = result["threshold"]
    rows = [
        (f"semantic lookup (threshold {t} + checks)", result["lookup"]),
        (f"plain cosine >= {t}", result["cosine_at_threshold"]),
        (f"plain cosine >= {result['cosine_best']['threshold']} (its most precise)",
         result["cosine_best"]),
    ]  # fmt: skip
    lines = [f"{result['set']}: {result['pairs']} pairs "
             f"({result['same']} same, {result['differs']} differ)"]  # fmt: skip
    for name, s in rows:
        lines.append(f"  {name:<48} precision {s['precision']}  recall {s['recall']}  "
                     f"wrong answers {s['wrong_answers']}")  # fmt: skip
    kinds = result["by_kind"].items()
    lines.append(
        "  paraphrases served (recall), by kind: "
        + ", ".join(f"{k} {v['served']}/{v['pairs']}" for k, v in kinds if v["label"] == "same")
    )
    lines.append(
        "  near-misses served (wrong answers), by kind: "
        + ", ".join(f"{k} {v['served']}/{v['pairs']}" for k, v in kinds if v["label"] == "differs")
    )
    return "\n".join(lines)  # fmt: skip


async def run(paths: list[Path], config: SemanticConfig, model_path: str | None) -> list[dict]:
    embedder = LocalEmbedder(EmbedderConfig(path=model_path))
    await embedder.start()
    checker = Checker(known_words(model_path))
    results = []
    try:
        for path in paths:
            result = await evaluate(path, config, embedder, checker)
            results.append(result)
            print(report(result), flush=True)
    finally:
        await embedder.close()
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pairs", action="append", type=Path, help="a labelled TSV (repeatable)")
    parser.add_argument("--threshold", type=float, help="instead of the shipped default")
    parser.add_argument("--model-path", help="a sentence-transformers model directory")
    parser.add_argument("--out", help="also write the figures as JSON here")
    args = parser.parse_args(argv)
    config = SemanticConfig(threshold=args.threshold) if args.threshold else SemanticConfig()
    results = asyncio.run(run(args.pairs or SETS, config, args.model_path))
    if args.out:
        Path(args.out).write_bytes(orjson.dumps(results, option=orjson.OPT_INDENT_2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
