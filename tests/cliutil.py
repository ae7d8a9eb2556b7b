"""Running the `cag` command as a user does: a real subprocess with its own CAG_HOME, and the one-line
error every failure must be."""

from __future__ import annotations

import os
import subprocess
import sys

CAG = [sys.executable, "-m", "cag"]


def run(args, home, stdin=None, check=True):
    env = {**os.environ, "CAG_HOME": str(home)}
    env.pop("CAG_SIGNING_KEY", None)
    proc = subprocess.run(CAG + [str(a) for a in args], capture_output=True, text=True, env=env, input=stdin,
                          timeout=300)
    if check and proc.returncode != 0:
        raise AssertionError(f"cag {args} failed ({proc.returncode}):\n{proc.stderr}")
    return proc


def assert_one_line_error(proc, *needles):
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    # one error line, last; status lines ("loading model …") may come before it
    assert len(errors) == 1 and lines[-1] == errors[0], proc.stderr
    error = errors[0]
    for needle in needles:
        assert needle in error, error
