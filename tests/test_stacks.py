"""benchmarks/stacks.py, the sampler the GPU benchmarks use to see where a job's threads
spend their time: wall clock per line, and CPU time per line (Linux)."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from tests.conftest import ROOT

PROGRAM = """
import threading, time

def burn():
    end, x = time.time() + 1.5, 0
    while time.time() < end:
        x += 1

def rest():
    time.sleep(1.5)

threads = [threading.Thread(target=burn, name="burner"),
           threading.Thread(target=rest, name="sleeper")]
for t in threads:
    t.start()
for t in threads:
    t.join()
"""


def _section(text: str, name: str) -> str:
    found = re.search(rf"^== {name}: .*?(?=^== |\Z)", text, re.M | re.S)
    assert found, text
    return found.group(0)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_stacks_tell_cpu_time_from_waiting(tmp_path):
    """A thread that computes is charged its CPU time at the line it computes on; one that
    sleeps spends as much wall clock and next to no CPU."""
    (tmp_path / "program.py").write_text(PROGRAM)
    out = tmp_path / "stacks.txt"
    argv = [sys.executable, "-m", "benchmarks.stacks", str(out), "--", str(tmp_path / "program.py")]
    subprocess.run(argv, cwd=ROOT, check=True, timeout=60)
    text = out.read_text()
    burner, sleeper = _section(text, "burner"), _section(text, "sleeper")
    spent = re.search(r"CPU (\d+\.\d+) s, where it ran:\n\s*([\d.]+)%\s+(.+)", burner)
    assert spent, burner
    assert float(spent.group(1)) > 0.3 and "burn" in spent.group(3)  # where it computed
    rested = re.search(r"CPU (\d+\.\d+) s", sleeper)
    assert rested is None or float(rested.group(1)) < 0.1, sleeper
    assert "sleep" in sleeper.splitlines()[1] or "rest" in sleeper.splitlines()[1], sleeper
    assert "== CPU seconds by OS thread name" in text
