"""The words the near-miss check (verify.py) knows: what frames a question, what
marks its answer (numbers, negations, quantifiers, persons, owners, tenses, the
kind of question), which words may stand for one another (synonyms, British
and American spelling, abbreviations, phrases said two ways), which may be
added without changing the question (light words), and which never stand for
one another (antonyms, a negative prefix).

Data only, built once at import from the literals below; no I/O. Synonym groups
overlap ("stop" is in the "end" group and the "prevent" group): two words are
synonyms when they share a group, never by transitivity. Tuned on
load/semantic_pairs_lexical.tsv; load/semantic_pairs_lexical_holdout.tsv was
kept unseen while tuning (python -m load.semantic_eval reports both).
"""

from __future__ import annotations

import re

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
                 "single": "1", "once": "1", "twice": "2", "half": "0.5", "dozen": "12",
                 "first": "1st", "third": "3rd", "fourth": "4th", "fifth": "5th",
                 "sixth": "6th", "seventh": "7th", "eighth": "8th", "ninth": "9th",
                 "tenth": "10th", "ii": "2", "iii": "3", "iv": "4", "vi": "6", "vii": "7",
                 "viii": "8", "ix": "9"}  # fmt: skip
# Words that frame a question or a request without changing what is asked.
FRAMING = frozenset(
    """
    a an the this that these those it its is are was were be been being am do does did
    done doing can could would should will shall may might must have has had having i me
    my mine we us our ours you your yours yourself he him his she her hers they them their
    theirs there here what what's whats which who whom whose how why when where please
    kindly tell explain describe give let know want need like way ways
    some any of for in on at by with about into onto as
    and or so if then than also just really actually exactly possible possibly
    whether step steps guide tutorial method methods approach something someone thing things
    mean meaning means meant define definition summary summarize overview question
    help understand use using used get go going try trying able simply say said word words
    term terms located situated exist exists existing tips advice instructions process
    procedure
    """.split()
)
# Framing words that still change the answer: what kind of answer is asked for
# ("what", "which" and "how" trade places in paraphrases; these do not), the time
# asked about, and whose.
ASKS = {"when": "when", "where": "where", "who": "who", "whom": "who", "why": "why"}
TENSES = {"is": "present", "are": "present", "am": "present", "was": "past",
          "were": "past", "did": "past", "had": "past", "will": "future",
          "shall": "future"}  # fmt: skip
OWNERS = {"my": "1", "mine": "1", "our": "1", "ours": "1", "your": "2", "yours": "2",
          "his": "3", "her": "3", "their": "3"}  # fmt: skip
# Whom a question is about: "he" and "she", "they" and "we" are other people.
PERSONS = {
    **dict.fromkeys("he him his himself".split(), "he"),
    **dict.fromkeys("she her hers herself".split(), "she"),
    **dict.fromkeys("they them their theirs themselves".split(), "they"),
    **dict.fromkeys("we us our ours ourselves".split(), "we"),
}
# "all" and "some" birds: a quantifier changes the answer. "some" and "any" are
# framing ("what are some reasons"), so only these are marks.
QUANTIFIERS = {"all": "all", "every": "all", "each": "all", "most": "most",
               "many": "many", "few": "few", "several": "several"}  # fmt: skip
# Set aside only when they ask for a way ("the best way to"); elsewhere ("the best
# laptop") they are part of the question. Criteria ("quickest", "cheapest") always are.
WAY_FRAMING = frozenset("best good right correct proper recommended easy easiest simple".split())
WAYS = frozenset("way ways method methods approach".split())
# Words that relate two operands; their order around these changes the answer.
DIRECTIONS = {
    w: w for w in "to from than or vs over under before after per since until".split()
} | {"into": "to", "onto": "to", "towards": "to", "toward": "to", "versus": "vs"}

# Added or dropped, these leave the question as it was: where ("in the world"),
# which kind of thing ("the numpy package").
# And "now": a question about the present is asked now ("the current price of gold").
LIGHT = frozenset(
    "world earth planet globe total package library module current currently now nowadays "
    "presently today".split()
)
# Nouns that name the kind of answer after "which" or "what" ("which city is the
# capital", "which scientist discovered"): light there, and some say what is asked.
KINDS = frozenset(
    """
    city town country nation state place location continent region area year date
    century decade month day era period person man woman people scientist artist
    painter composer author writer playwright poet novelist inventor musician singer
    band actor actress player athlete team company brand animal species language
    """.split()
)
KIND_ASKS = {
    **dict.fromkeys("year date century decade month day era period".split(), "when"),
    **dict.fromkeys(
        """person man woman people scientist artist painter composer author writer
        playwright poet novelist inventor musician singer actor actress player athlete
        """.split(),
        "who",
    ),
}
PLACES = frozenset("city town country nation state place location continent region area".split())

# Groups of words that may stand for one another, in base form; a word may be in
# several groups.
SYNONYM_GROUPS = """
create make made build built generate produce construct
make made recipe cook prepare
convert turn transform
change alter modify adjust
change replace swap
fix repair mend
fix solve resolve troubleshoot
remove delete erase eliminate
big large huge enormous giant
biggest largest
small little tiny
smallest tiniest
fast quick rapid speedy quickly rapidly
fastest quickest
start begin began begun commence launch
thaw defrost
code coding programming
house home
abroad overseas
tooth teeth
foot feet
mouse mice
goose geese
knife knives
error mistake
job occupation profession
sofa couch
shop store
angry mad
scared afraid frightened
happy glad
shout yell
allow permit
forbid prohibit ban
strange weird odd
wrong incorrect
purpose goal aim objective
idea concept notion
quantity amount
kind type sort
center middle
medicine medication
illness disease sickness
stomach belly tummy
clothes clothing
airplane plane aircraft
beginner novice newbie
slow sluggish
loud noisy
quiet silent
awful terrible horrible dreadful
throw toss
hire employ
teach taught train
simple simply plain
stop end finish halt quit
end terminate kill cancel stop
find found locate discover
see view show display check
check verify
buy bought purchase
symptom sign
store keep kept save
pick choose chose chosen select
improve enhance
avoid prevent stop
reduce lower decrease lessen
increase raise boost
calm relax
gift present
dad father
mom mother
kid kids child children
baby infant newborn
grandmother grandma
grandfather grandpa
man male
woman female
people person
cheap inexpensive affordable
cheapest
expensive costly pricey
price cost
healthy nutritious
merge combine join
bike bicycle
car automobile
tv television
app application
program software
computer pc
phone smartphone cellphone
picture photo image photograph
film movie
holiday vacation
autumn fall
closet wardrobe
faucet tap
leak drip
trousers pants
truck lorry
gas petrol gasoline
elevator lift
cookie biscuit
trash garbage rubbish
terminal console shell
folder directory
tie necktie
tall high
tallest highest
learn study
rich wealthy
doctor physician
sick ill
lawyer attorney
hello hi
website site
issue problem
answer reply respond
help assist
often frequently
main primary principal
famous renowned
hard difficult
smart intelligent clever
country nation
close shut
speak talk
exercise workout
good nice great
best top finest greatest
author writer write wrote written compose
invent devise
go golang
javascript js
typescript ts
python py
kubernetes k8s
database db
repository repo
configuration config
environment env
dictionary dict
argument arg
information info
"""
# British spellings, and other words spelt two ways, to one form.
SPELLINGS = {
    "tyre": "tire", "tyres": "tires", "grey": "gray", "programme": "program",
    "programmes": "programs", "aluminium": "aluminum", "cheque": "check", "mum": "mom",
    "maths": "math", "aeroplane": "airplane", "plough": "plow", "pyjamas": "pajamas",
    "kerb": "curb", "practise": "practice", "licence": "license", "defence": "defense",
    "offence": "offense", "ageing": "aging", "judgement": "judgment", "yoghurt": "yogurt",
    "doughnut": "donut", "mould": "mold", "sceptical": "skeptical", "manoeuvre": "maneuver",
    "paediatric": "pediatric", "anaemia": "anemia", "foetus": "fetus", "jewellery": "jewelry",
    "travelled": "traveled", "travelling": "traveling", "traveller": "traveler",
    "cancelled": "canceled", "cancelling": "canceling", "modelling": "modeling",
    "labelled": "labeled", "labelling": "labeling", "fuelled": "fueled", "catalogue": "catalog",
    "dialogue": "dialog", "analogue": "analog", "whisky": "whiskey", "storey": "story",
    "cosy": "cozy", "draught": "draft", "gaol": "jail", "sulphur": "sulfur", "ok": "okay",
}  # fmt: skip
_OUR = "colour flavour favour favourite behaviour neighbour honour humour labour harbour rumour armour vapour odour savour endeavour parlour"  # noqa: E501
_RE = (
    "centre metre litre theatre fibre calibre sombre spectre lustre kilometre centimetre millimetre"
)
for _w in _OUR.split():
    SPELLINGS[_w] = _w.replace("our", "or")
    SPELLINGS[_w + "s"] = _w.replace("our", "or") + "s"
for _w in _RE.split():
    SPELLINGS[_w] = _w[:-2] + "er"
    SPELLINGS[_w + "s"] = _w[:-2] + "ers"
ISE = re.compile(r"(\w{3,})is(e|es|ed|ing|ation|ations|er|ers)$")  # organise -> organize
YSE = re.compile(r"(\w{2,})ys(e|es|ed|ing|er)$")  # analyse -> analyze

# Phrases said two ways, rewritten to one before the words are read.
PHRASES = [
    (re.compile(p), r)
    for p, r in (
        (r"\bget rid of\b", "remove"),
        (r"\bshow me\b", ""),
        (r"\b(?:one|a single) (?!of\b|or\b|and\b|to\b)(?=[^\W\d_])", "a "),  # "in one cup"
        (r"\b([^\W\d_]\w*)'s ([^\W\d_]\w*)", r"\2 of \1"),  # "Germany's GDP"
        (r"\bchange (?:the |its |their )?name of\b", "rename"),
        (r"\bmake (\w+(?: \w+){0,3}?) (?:faster|quicker)\b", r"speed up \1"),
        (r"\bspeed up\b", "accelerate"),
        (r"\bget (\w+(?: \w+){0,3}?) out of\b", r"remove \1 from"),
        (r"\bhow many people live in\b", "population of"),
        (r"\b(?:what is |what was )?the number of\b|\bnumber of\b", "how many"),
        (r"\bhow (?:tall|high) (is|are|was|were)\b", r"what \1 the height of"),
        (r"\bhow (?:big|large) (is|are|was|were)\b", r"what \1 the size of"),
        (r"\bhow old (is|are|was|were)\b", r"what \1 the age of"),
        (r"\b(?:stand|stands|stood|short) for\b|\babbreviation (?:of|for)\b", "abbreviation"),
        (r"\bwhat (?:is|was|are) the reasons? (?:that |why )?", "why "),
        (r"\bfor what reason\b", "why"),
        (r"\bwhat (?:causes|caused|makes|made) ", "why "),
        (r"\bsci-?fi\b", "science fiction"),
        (r"\be-mail", "email"),
        (r"\bwi-fi\b", "wifi"),
        (r"\b(?:per|a|each|every) day\b", "daily"),
        (r"\b(?:turn|switch|power|shut)(?:s|ed|ing)? (?:off|down)\b", "shutdown"),
        (r"\bcommand[- ]line\b", "terminal"),
        (r"\bshares? (?:a |the )?borders? with\b", "border"),
        (r"\bleast expensive\b", "cheapest"),
        (r"\bfind out\b", "see"),
        (r"\blook(?:s|ed|ing)? for\b", "search"),
        (r"\bthrow(?:s|ing|n)? up\b", "vomit"),
        (r"\bhow come\b", "why"),
        (r"\bhow much (?:does|do|did|would|will) (.+?) cost\b", r"what is the price of \1"),
        (r"\bat all\b", ""),
        (r"\bin (?:which|what) (" + "|".join(sorted(PLACES)) + r")\b", r"where \1"),
    )
]
# Names written several ways, read before the text is lowercased ("US" is not "us").
CASED = [
    (re.compile(p), r)
    for p, r in (
        (r"\bU\.?S\.?A?\.?(?=\W|$)|\b[Uu]nited [Ss]tates(?: of [Aa]merica)?\b", "USA"),
        (r"\bU\.?K\.?(?=\W|$)|\b[Uu]nited [Kk]ingdom\b", "UK"),
    )
]
# Contractions read as the words they stand for.
CONTRACTIONS = [
    (re.compile(p), r)
    for p, r in (
        (r"\bcan't\b|\bcannot\b", "can not"),
        (r"\bwon't\b", "will not"),
        (r"n't\b", " not"),
        (r"\b(what|where|who|how|when|why|it|that|there|here|he|she)'s\b", r"\1 is"),
        (r"'re\b", " are"),
        (r"'ve\b", " have"),
        (r"'ll\b", " will"),
        (r"'d\b", " would"),
        (r"\bi'm\b", "i am"),
        (r"\blet's\b", "let us"),
    )
]

# Pairs that never stand for one another, whatever their spelling distance; a
# negative prefix makes one too ("install" / "uninstall", "able" / "disable").
ANTONYMS = frozenset(
    frozenset(pair.split("/"))
    for pair in """
    increase/decrease raise/lower maximum/minimum max/min largest/smallest biggest/smallest
    most/least more/less more/fewer high/low higher/lower highest/lowest fast/slow
    faster/slower hot/cold hottest/coldest warm/cool up/down in/out open/close
    start/stop push/pull import/export input/output upload/download send/receive buy/sell
    win/lose add/remove add/drop before/after first/last early/late old/new young/old
    long/short heavy/light strong/weak rich/poor cheap/expensive north/south east/west
    left/right top/bottom front/back inside/outside true/false positive/negative
    pros/cons advantage/disadvantage benefit/drawback benefit/risk male/female
    day/night summer/winter yesterday/tomorrow past/future always/never love/hate
    accept/reject allow/deny agree/disagree include/exclude encode/decode lock/unlock
    public/private client/server read/write get/set ascending/descending
    horizontal/vertical horizontally/vertically row/column upper/lower
    uppercase/lowercase absolute/relative static/dynamic mutable/immutable local/global
    local/remote frontend/backend debit/credit borrow/lend best/worst good/bad
    better/worse safe/dangerous legal/illegal gain/lose gain/loss connect/disconnect
    enable/disable encrypt/decrypt install/uninstall compress/decompress zoom/unzoom
    formal/casual brief/detailed short/long simple/complex beginner/expert
    """.split()
)
# Framing words that are also names ("in Go", "Will Smith", "in May"): capitalised
# mid-sentence, they are content words.
NAMES = frozenset("go will may".split())
NEGATIVE_PREFIXES = ("un", "dis", "de", "in", "im", "il", "ir", "non", "anti", "mis")
