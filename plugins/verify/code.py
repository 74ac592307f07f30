"""The code check: fenced code blocks in an answer, run in the sandbox with the
caller's tests after them."""

from __future__ import annotations

import re
from dataclasses import dataclass

from plugins.verify.sandbox import LANGUAGES, Language, RunResult, Sandbox

FENCE = re.compile(r"^(`{3,}|~{3,})[ \t]*([\w+#.-]*)[^\n]*\n(.*?)^\1[ \t]*$", re.M | re.S)


@dataclass(slots=True)
class CodeBlock:
    language: Language
    source: str


def code_blocks(text: str, languages: dict[str, Language] = LANGUAGES) -> list[CodeBlock]:
    """Fenced blocks in a language the sandbox runs; an unlabelled block counts as
    Python when it is the only kind."""
    by_alias = {alias: lang for lang in languages.values() for alias in lang.aliases}
    blocks = []
    for match in FENCE.finditer(text):
        label = match.group(2).lower()
        language = by_alias.get(label) if label else languages.get("python")
        if language is not None:
            blocks.append(CodeBlock(language, match.group(3)))
    return blocks


def program(blocks: list[CodeBlock], tests: str | None) -> tuple[Language, str] | None:
    """One program: the blocks of the first block's language in order, then the tests."""
    if not blocks:
        return None
    language = blocks[0].language
    source = "\n\n".join(b.source for b in blocks if b.language is language)
    if tests:
        source += "\n\n# tests given by the caller\n" + tests
    return language, source


async def run_code(sandbox: Sandbox, text: str, tests: str | None) -> RunResult | None:
    """Run the answer's code with the tests; None when the answer holds no code."""
    found = program(code_blocks(text, sandbox.languages), tests)
    if found is None:
        return None
    return await sandbox.run(*found)
