"""scripts/torch_source.py: where set-up takes torch from, decided without touching the network."""

from __future__ import annotations

import importlib.util
import subprocess
import sys

import pytest

from tests.conftest import REPO_ROOT

SCRIPT = REPO_ROOT / "scripts" / "torch_source.py"
spec = importlib.util.spec_from_file_location("torch_source", SCRIPT)
torch_source = importlib.util.module_from_spec(spec)
spec.loader.exec_module(torch_source)


def _probe(answers: bool):
    asked = []

    def probe(url):
        asked.append(url)
        return answers

    return probe, asked


def test_without_cuda_torch_comes_from_the_cpu_index_when_it_answers():
    probe, asked = _probe(True)
    assert torch_source.torch_pip_args("2.13.0", has_cuda=False, probe=probe) == [
        "torch==2.13.0", "--index-url", "https://download.pytorch.org/whl/cpu"]
    assert asked == ["https://download.pytorch.org/whl/cpu"]


def test_without_cuda_and_an_unreachable_cpu_index_the_default_index_is_used():
    probe, _ = _probe(False)
    assert torch_source.torch_pip_args("2.13.0", has_cuda=False, probe=probe) == ["torch==2.13.0"]


def test_with_cuda_the_default_index_is_used_without_asking():
    probe, asked = _probe(True)
    assert torch_source.torch_pip_args("2.13.0", has_cuda=True, probe=probe) == ["torch==2.13.0"]
    assert asked == []


def test_a_forced_index_wins():
    probe, asked = _probe(True)
    assert torch_source.torch_pip_args("2.13.0", has_cuda=False, forced_index="http://mirror/simple",
                                       probe=probe) == ["torch==2.13.0", "--index-url", "http://mirror/simple"]
    assert asked == []


@pytest.mark.parametrize("url", ["http://127.0.0.1:9/whl/cpu", "not a url"])
def test_an_index_that_does_not_answer_is_unreachable_quickly(url):
    assert torch_source.index_answers(url, timeout=2.0) is False


def test_the_command_prints_one_pip_argument_per_line():
    result = subprocess.run([sys.executable, str(SCRIPT), "2.13.0"], capture_output=True, text=True, timeout=60,
                            env={"PATH": "/usr/bin:/bin", "TORCH_INDEX_URL": "http://mirror/simple"})
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["torch==2.13.0", "--index-url", "http://mirror/simple"]
    assert "from http://mirror/simple" in result.stderr
