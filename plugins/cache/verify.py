"""Is a semantic candidate a safe hit? A check of two prompts for near-misses.

Cosine similarity cannot tell a paraphrase from a prompt that changes the
answer ("convert a string to an integer" vs "an integer to a string" scores
0.996 with all-MiniLM-L6-v2). A candidate is served only when the two prompts
agree on everything that usually decides an answer:

- the same numbers (digits and number words),
- the same negations (not, no, never, without, ...),
- the same content words, once question framing ("how do I", "what's the best
  way to", "please", "explain") is set aside, words are reduced to a rough
  stem and a few plain synonyms are folded together; a criterion ("easiest",
  "quickest") is never framing,
- the same direction words between operands ("before" / "after", "from" / "to"),
  and the same order of the words around them ("A to B", "from A to B", "A than
  B", "A or B"); otherwise the same order, but for one phrase moved from one
  end to the other ("At sea level, what is ..." / "What is ... at sea level")
  or a compound turned into a phrase ("git branch" / "branch in git"),
- the same kind of question (when, where, who, why), the same tense (is / was /
  will) and, when both say whose, the same owner ("my name" / "your name"),
- the same text, when either has no content words at all.

This refuses some true paraphrases (a changed noun or verb outside the
synonym list); that costs a cache miss, where a wrong hit costs a wrong answer.
load/semantic_eval.py measures both on a labelled set.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# Numbers, and words in any script: a letter, then letters, digits, + or # (c++, c#).
# Scripts written without spaces (Chinese, Japanese) give one token per run, so
# any change inside a run is a different word.
_TOKEN = re.compile(r"\d+(?:[.,]\d+)*%?|[^\W\d_][\w+#]*(?:'[^\W\d_]+)?")

NEGATIONS = frozenset("not no never without none nothing nobody neither nor nowhere cannot".split())
NUMBER_WORDS = {
    w: str(i)
    for i, w in enumerate(
        "zero one two three four five six seven eight nine ten eleven twelve thirteen "
        "fourteen fifteen sixteen seventeen eighteen nineteen twenty".split()
    )
}
NUMBER_WORDS |= {"thirty": "30", "forty": "40", "fifty": "50", "hundred": "100",
                 "thousand": "1000", "million": "1000000", "billion": "1000000000",
                 "single": "1", "once": "1", "twice": "2", "half": "0.5"}  # fmt: skip
# Words that frame a question or a request without changing what is asked.
FRAMING = frozenset(
    """
    a an the this that these those it its is are was were be been being am do does did
    done doing can could would should will shall may might must have has had having i me
    my mine we us our you your yourself he she they them their there here what what's
    whats which who whom whose how why when where please kindly tell explain describe
    show give let know want need like way ways easy simple
    some any of for in on at by with about into onto as
    and or so if then than also just really actually exactly possible possibly
    whether step steps guide tutorial method methods approach something someone thing things
    mean meaning means meant summary summarize summarise overview question help
    use using used get go going try trying able one's simply
    """.split()
)
# Framing words that still change the answer: what kind of answer is asked for
# ("what", "which" and "how" trade places in paraphrases; these do not), the time
# asked about, and whose.
ASKS = {"when": "when", "where": "where", "who": "who", "whom": "who", "why": "why"}
TENSES = {"was": "past", "were": "past", "did": "past", "had": "past",
          "will": "future", "shall": "future"}  # fmt: skip
OWNERS = {"my": "1", "mine": "1", "our": "1", "ours": "1", "your": "2", "yours": "2",
          "his": "3", "her": "3", "their": "3"}  # fmt: skip
# Set aside only when they ask for a way ("the best way to"); elsewhere ("the best
# laptop") they are part of the question. Criteria ("quickest", "cheapest") always are.
WAY_FRAMING = frozenset("best good right correct proper recommended".split())
WAYS = frozenset("way ways method methods approach".split())
# Plain synonyms folded to one word, so that a paraphrase using either still agrees.
SYNONYMS = {
    w: group.split()[0]
    for group in (
        "create make made build generate",
        "convert turn transform change",
        "fix repair solve resolve",
        "remove delete erase",
        "big large huge",
        "small little tiny",
        "fast quick rapid speedy",
        "start begin",
        "find locate",
        "end finish",
        "teach train",
        "discover discoverer",
        "author writer wrote write written",
        "painter painted paint",
    )
    for w in group.split()
}
# Words that relate two operands; their order around these changes the answer.
DIRECTIONS = {
    w: w for w in "to from than or vs over under before after per since until".split()
} | {"into": "to", "onto": "to", "towards": "to", "toward": "to", "versus": "vs"}
_SUFFIXES = ("ations", "ation", "ings", "ing", "ies", "ied", "ed", "ly", "s")


@dataclass(frozen=True, slots=True)
class Prompt:
    """What the checks compare, computed once per prompt."""

    numbers: tuple[str, ...]
    negations: int
    words: tuple[str, ...]  # content words, in order, stemmed and folded
    at: tuple[int, ...]  # each content word's position among all the tokens
    pairs: tuple[tuple[str, str], ...]  # (before, after) around each direction word
    directions: tuple[str, ...]  # the direction words themselves: "before" is not "after"
    asks: frozenset[str]  # "where is" / "what is"
    tenses: frozenset[str]  # "is" / "was" / "will": the time asked about
    owners: frozenset[str]  # "my name" / "your name"
    bare: str = ""  # with no content words: the text, folded, which must then match

    @property
    def marks(self) -> tuple:
        """What two prompts must have alike, whatever their words."""
        return (self.numbers, self.negations, self.directions, self.asks, self.tenses)


def analyse(text: str) -> Prompt:
    tokens = _tokens(text)
    numbers: list[str] = []
    negations = 0
    words: list[str] = []
    at: list[int] = []
    pairs: list[tuple[str, str]] = []
    directions: list[str] = []
    asks = frozenset(ASKS[t] for t in tokens if t in ASKS)
    tenses = frozenset(TENSES[t] for t in tokens if t in TENSES)
    owners = frozenset(OWNERS[t] for t in tokens if t in OWNERS)
    pending: str | None = None  # the content word before a direction word
    last: str | None = None
    follows_operand = False  # the token before is a content word or a number
    for position, token in enumerate(tokens):
        after_operand, follows_operand = follows_operand, False
        if token in NEGATIONS:
            negations += 1
        elif token in NUMBER_WORDS or token[0].isdigit():
            numbers.append(NUMBER_WORDS.get(token) or token.replace(",", ""))
            follows_operand = True
        elif token in DIRECTIONS:
            # "string to integer" relates two operands; "the way to", "how to" do not
            if after_operand:
                directions.append(DIRECTIONS[token])
                pending = last
        elif token in WAY_FRAMING and tokens[position + 1 : position + 2] in ([w] for w in WAYS):
            continue
        elif token not in FRAMING:
            follows_operand = True
            word = _fold(token)
            if pending is not None and pending != word:
                pairs.append((pending, word))
            pending = None
            words.append(word)
            at.append(position)
            last = word
    bare = "" if words else " ".join(text.lower().split())
    return Prompt(tuple(sorted(numbers)), negations, tuple(words), tuple(at), tuple(pairs),
                  tuple(sorted(directions)), asks, tenses, owners, bare)  # fmt: skip


def same_question(a: str | Prompt, b: str | Prompt) -> bool:
    """True when `b` asks what `a` asks, as far as these checks can tell."""
    pa = a if isinstance(a, Prompt) else analyse(a)
    pb = b if isinstance(b, Prompt) else analyse(b)
    if pa.marks != pb.marks:
        return False
    if pa.owners and pb.owners and pa.owners != pb.owners:  # "my" / "your"; "my" / none is fine
        return False
    if not pa.words or not pb.words:  # nothing to compare: only the same text will do
        return pa.bare == pb.bare
    if set(pa.words) != set(pb.words):
        return False
    for x, y in (*pa.pairs, *pb.pairs):  # operands around a direction keep their order
        if _inverted(pa.words, x, y) or _inverted(pb.words, x, y):
            return False
    return not _moved(pa, pb)


def _tokens(text: str) -> list[str]:
    text = text.lower().replace("\u2019", "'")
    text = text.replace("can't", "can not").replace("won't", "will not")
    text = text.replace("n't", " not").replace("cannot", "can not")
    return _TOKEN.findall(text)


def _fold(word: str) -> str:
    word = word.removesuffix("'s")
    if word in SYNONYMS:
        return SYNONYMS[word]
    stem = _stem(word)
    return SYNONYMS.get(stem, stem)


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
