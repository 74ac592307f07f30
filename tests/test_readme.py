"""The README's examples, run as written against a gateway on the default config."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from tests.conftest import ROOT, start_gateway

BLOCKS = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)


@pytest.fixture(scope="module")
def gateway(tmp_path_factory):
    server = start_gateway(tmp_path_factory.mktemp("readme"), (ROOT / "proxy.yaml").read_text())
    yield server
    server.stop()


def test_the_sdk_example_prints_whole_sentences_and_no_none(gateway):
    (example,) = [b for b in BLOCKS if "stream=True" in b]
    code = example.replace("http://localhost:8080", gateway.url)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=60, cwd=ROOT)  # fmt: skip
    assert result.returncode == 0, result.stderr
    buffered, streamed, usage = result.stdout.splitlines()
    assert buffered == streamed  # the same answer, told whole both ways
    assert buffered.startswith("This is a simulated answer") and buffered.endswith(".")
    assert "  " not in streamed and "None" not in result.stdout
    assert re.fullmatch(r"\[\d+ tokens\]", usage)
