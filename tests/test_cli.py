"""The command line as a newcomer meets it: what each command costs to start."""

from __future__ import annotations

import subprocess
import sys

import pytest

PROBE = """
import sys
sys.argv = ["batch-infer", *{args!r}]
from batch_infer import cli
try:
    cli.main()
except SystemExit:
    pass
print("loaded:", *(m for m in ("ray", "onnxruntime", "onnx", "torch") if m in sys.modules),
      file=sys.stderr)
"""


@pytest.mark.parametrize(
    "args",
    [["--help"], ["query", "--help"], ["schedule", "--help"], ["inspect", "--help"],
     ["submit", "--help"], ["jobs", "list", "--help"], ["build", "--help"]],
)  # fmt: skip
def test_commands_that_run_nothing_import_neither_ray_nor_onnx(args):
    done = subprocess.run(
        [sys.executable, "-c", PROBE.format(args=args)], capture_output=True, text=True,
        timeout=60,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stderr.strip().splitlines()[-1] == "loaded:", done.stderr
