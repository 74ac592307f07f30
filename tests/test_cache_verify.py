"""The near-miss checks a semantic candidate must pass before it is served."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from plugins.cache import lexicon
from plugins.cache.verify import Checker, analyse, default_checker, known_words, same_question


@pytest.mark.parametrize(
    ("a", "b"),
    [
        ("How do I convert a string to an integer in JavaScript?",
         "How do I convert an integer to a string in JavaScript?"),  # swapped operands
        ("Convert 100 dollars to euros", "Convert 100 euros to dollars"),
        ("Did Brutus betray Caesar?", "Did Caesar betray Brutus?"),  # swap across a verb
        ("How many grams are in an ounce?", "How many ounces are in a gram?"),
        ("How do I boil an egg with a soft yolk?", "How do I boil an egg with a hard yolk?"),
        ("Give me reasons to learn Python.", "Give me reasons not to learn Python."),
        ("Why do people believe in ghosts?", "Why don't people believe in ghosts?"),
        ("How can I sleep with a fan on?", "How can I sleep without a fan on?"),
        ("Summarize this in three sentences.", "Summarize this in five sentences."),
        ("What are the new features in Python 3.12?", "What are the new features in Python 3.11?"),
        ("What is 5 feet in meters?", "What is 5 feet in centimeters?"),
        ("What happened before World War 2?", "What happened after World War 2?"),  # other direction
        ("Cheap flights from Paris", "Cheap flights to Paris"),
        ("What is the easiest programming language?", "What is the best programming language?"),
        ("What is the quickest way to get to Paris?", "What is the cheapest way to get to Paris?"),
        ("Who is the CEO of Apple?", "Who was the CEO of Apple?"),  # another time
        ("What will the weather be in Paris?", "What was the weather in Paris?"),
        ("What is my name?", "What is your name?"),  # another owner
        ("Where is the Eiffel Tower?", "What is the Eiffel Tower?"),  # another kind of question
        ("When did World War 2 end?", "Why did World War 2 end?"),
    ],
)  # fmt: skip
def test_near_misses_are_refused(a, b):
    assert not same_question(a, b)
    assert not same_question(b, a)


@pytest.mark.parametrize(
    ("a", "b"),
    [
        ("How do I reverse a list in Python?", "What's the best way to reverse a list in Python?"),
        ("How do I convert a string to an integer in JavaScript?",
         "In JavaScript, how can I convert a string into an integer?"),  # fronted phrase
        ("What is the boiling point of water at sea level?",
         "At sea level, what is the boiling point of water?"),  # a phrase moved as a block
        ("How do I delete a branch in git?", "How can I delete a git branch?"),  # compound
        ("Write jokes about cats.", "Please write a joke about cats."),  # plural
        ("What is a closure in JavaScript?", "Explain closures in JavaScript."),
        ("How do I fix a flat bike tire?", "How can I repair a flat bike tire?"),  # synonym
        ("Why is Python slower than C?", "Why is Python slower than C?"),
        ("What is the best way to learn guitar?", "How do I learn guitar?"),  # "way to" frames
        ("How long do I need to cook pasta?", "How long should I cook pasta?"),  # infinitive "to"
        ("How can I change my password on Linux?", "How do I change the password on Linux?"),
    ],
)  # fmt: skip
def test_paraphrases_pass(a, b):
    assert same_question(a, b)
    assert same_question(b, a)


def test_analysis_reads_numbers_negations_and_directions():
    p = analyse("Convert twenty dollars to euros, not 1,000 yen")
    assert p.numbers == ("1000", "20")
    assert p.negations == 1
    assert ("dollar", "euro") in p.pairs
    assert analyse("I can't").negations == analyse("I cannot").negations == 1


def test_two_words_swapped_are_refused_even_when_harmless():
    # "joke about cats" / "cat joke" reads the same, but so would "grams in an
    # ounce" / "ounces in a gram": with two content words an order cannot be trusted.
    assert not same_question("Tell me a joke about cats.", "Tell me a cat joke.")


@pytest.mark.parametrize(
    ("a", "b"),
    [
        (
            "北京的人口是多少",
            "上海的人口是多少",
        ),  # Beijing / Shanghai: one run of characters each
        ("Wie groß ist München?", "Wie groß ist Köln?"),  # letters outside ASCII are words
        ("🙂", "😡"),  # no words at all: only the same text matches
        ("?", "!"),
        ("How do I do it?", "How do I do that?"),  # framing only
    ],
)
def test_prompts_in_any_script_or_without_words_are_compared(a, b):
    assert not same_question(a, b)
    assert not same_question(analyse(a), analyse(b))  # as the lookup calls it


def test_a_prompt_without_words_matches_only_itself():
    assert same_question(analyse("🙂"), analyse(" 🙂 "))
    assert same_question("Wie groß ist München?", "Wie groß ist München")


@pytest.mark.parametrize(
    ("a", "b"),
    [
        # the paraphrases the first version refused (other words, not other framing)
        ("What is the capital of France?", "Which city is the capital of France?"),
        ("How many continents are there?", "What is the number of continents on Earth?"),
        ("Who painted the Mona Lisa?", "Which artist painted the Mona Lisa?"),
        ("Why do cats purr?", "What is the reason cats purr?"),
        ("How do I change a flat tire?", "What are the steps to change a flat tyre?"),
        ("How big is the Pacific Ocean?", "How large is the Pacific Ocean?"),  # synonym
        ("Who invented the telephone?", "Who was the inventor of the telephone?"),  # derived
        ("When did World War II end?", "In what year did World War II end?"),  # kind of answer
        ("How do I organise my closet?", "How do I organize my closet?"),  # spelling
        ("How do I revrese a string in Python?", "How do I reverse a string in Python?"),
        ("What is the GDP of Germany?", "What's Germany's GDP?"),  # possessive
        ("How many ounces are in a cup?", "How many ounces are there in one cup?"),
        ("Can dogs eat grapes?", "Is it possible for dogs to eat grapes?"),  # infinitive "to"
        ("Could you tell me who painted The Starry Night?", "Who painted The Starry Night?"),
        ("Who is the richest person in the US?",
         "Who is the wealthiest person in the United States?"),  # superlatives, a name
        ("What is the price of gold?", "What is the current price of gold?"),  # now
    ],
)  # fmt: skip
def test_paraphrases_in_other_words_pass(a, b):
    assert same_question(a, b)
    assert same_question(b, a)


@pytest.mark.parametrize(
    ("a", "b", "kind"),
    [
        ("What are the advantages of remote work?", "What are the disadvantages of remote work?",
         "antonym"),
        ("How do I enable dark mode?", "How do I disable dark mode?", "antonym"),
        ("How do I install Docker?", "How do I uninstall Docker?", "antonym"),
        ("What is the maximum value of an int?", "What is the minimum value of an int?",
         "antonym"),
        ("How do I reverse a string in Python?", "How do I reverse a string in Go?", "word"),
        ("What's new in iOS 17?", "What's new in iOS 18?", "number"),
        ("Write a poem about the sea.", "Write a short story about the sea.", "word"),
        ("Explain recursion to a child.", "Explain recursion to an expert.", "word"),
        ("Summarize Moby Dick in one sentence.", "Summarize Moby Dick in detail.", "word"),
        ("What was the weather yesterday?", "What will the weather be tomorrow?", "tense"),
        ("Who won the World Cup in 2018?", "Who won the World Cup in 2022?", "number"),
        ("Do all birds fly?", "Do some birds fly?", "quantifier"),
        ("Does every country have a flag?", "Does any country have a flag?", "quantifier"),
        ("Should I learn Python and Java?", "Should I learn Python or Java?", "direction"),
        ("How tall is he?", "How tall is she?", "person"),
        ("What is my name?", "What is your name?", "owner"),
        ("Best laptop for programming", "Best cheap laptop for programming", "added word"),
        ("What is the population of New York?", "What is the population of New York City?",
         "added word"),
        ("Is it safe to eat raw chicken?", "Is it safe to eat raw salmon?", "word"),
        ("How many minutes are in an hour?", "How many seconds are in an hour?", "word"),
        ("What is LLaVA?", "What is LLaMA?", "word"),  # a name is never a typo
        ("Who was the first president?", "Who was the second president?", "number"),
        ("How do I convert Celsius to Fahrenheit?", "How do I convert Fahrenheit to Celsius?",
         "order"),
        ("What is the largest city?", "What is the smallest city?", "antonym"),
        ("Who is the president of the US?", "Who is the president of the UK?", "word"),
        ("What was the price of gold yesterday?", "What is the price of gold today?", "tense"),
    ],
)  # fmt: skip
def test_near_misses_are_refused_and_say_why(a, b, kind):
    checker = default_checker()
    for x, y in ((a, b), (b, a)):
        refusal = checker.check(x, y) or checker.check(y, x)
        assert refusal is not None and refusal.kind == kind, (x, y, refusal)


def test_typos_need_a_vocabulary_and_never_join_two_words():
    vocabulary = known_words(None)
    assert vocabulary is not None and {"capital", "reverse"} <= vocabulary
    assert Checker(vocabulary).same("What is the captial of Peru?", "What is the capital of Peru?")
    assert not Checker(None).same("What is the captial of Peru?", "What is the capital of Peru?")
    assert not Checker(vocabulary).same("How does it affect sleep?", "How does it effect sleep?")
    assert not Checker(vocabulary).same("What is Python 3.12?", "What is Python 3.11?")


# Hypothesis: questions built from parts, and the one change that must be refused.
SUBJECTS = ["the boiling point of water", "a hash table", "the capital of Peru",
            "the plot of Hamlet", "the speed of sound", "compound interest"]  # fmt: skip
FRAMES = ["What is {}?", "Explain {}.", "Tell me about {}.", "Can you describe {}?",
          "What's {}?", "Please explain {}"]  # fmt: skip
CONTENT = ["cheap", "ancient", "modern", "Roman", "quantum", "digital", "French", "deep"]


@settings(max_examples=200, deadline=None)
@given(st.sampled_from(SUBJECTS), st.sampled_from(FRAMES), st.sampled_from(FRAMES))
def test_framing_never_changes_the_question(subject, one, two):
    assert same_question(one.format(subject), two.format(subject))


@settings(max_examples=200, deadline=None)
@given(st.sampled_from(SUBJECTS), st.sampled_from(FRAMES), st.sampled_from(CONTENT),
       st.integers(0, 3))  # fmt: skip
def test_an_added_word_is_refused(subject, frame, word, where):
    words = subject.split()
    changed = " ".join([*words[: where + 1], word, *words[where + 1 :]])
    assert not same_question(frame.format(subject), frame.format(changed))


@settings(max_examples=200, deadline=None)
@given(st.sampled_from(SUBJECTS), st.sampled_from(FRAMES), st.integers(0, 9),
       st.integers(0, 9))  # fmt: skip
def test_another_number_or_a_negation_is_refused(subject, frame, n, m):
    one = frame.format(f"{subject} in {n} steps")
    assert same_question(one, frame.format(f"{subject} in {n} steps"))
    if n != m:
        assert not same_question(one, frame.format(f"{subject} in {m} steps"))
    assert not same_question(one, frame.format(f"{subject} not in {n} steps"))


MARKS = (lexicon.FRAMING | set(lexicon.DIRECTIONS) | lexicon.NEGATIONS | set(lexicon.NUMBER_WORDS)
         | set(lexicon.QUANTIFIERS))  # fmt: skip
CONTENT_ANTONYMS = sorted((p for p in lexicon.ANTONYMS if not p & MARKS), key=sorted)


@settings(max_examples=200, deadline=None)
@given(st.sampled_from(SUBJECTS), st.sampled_from(CONTENT_ANTONYMS))
def test_an_antonym_is_refused(subject, pair):
    x, y = sorted(pair)
    assert not same_question(f"What is the {x} {subject}?", f"What is the {y} {subject}?")


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=80), st.text(max_size=80))
def test_any_text_is_checked_without_error(a, b):
    refusal = default_checker().check(a, b)
    assert refusal is None or refusal.kind
    assert default_checker().check(a, a) is None  # a prompt always asks what it asks
