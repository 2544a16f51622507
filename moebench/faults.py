"""Fault injection for the crash tests: the process kills itself (SIGKILL) at a named point.

`MOEBENCH_TEST_KILL_AT=<point>:<n>` makes the n-th call of `fault_point("<point>")` in this process
send SIGKILL to itself: no exception, no `finally`, no flush, exactly like `kill -9` or the OOM killer.
Without the variable (always, outside tests) a fault point is one dictionary lookup.

Points (see tests/test_crash.py):
  step        inside a training step, after backward, before the optimizer update (train/loop.py)
  checkpoint  a checkpoint directory is complete in its temp dir, not yet renamed into place
  results     an Arrow results file is written and fsynced under its temp name, not yet renamed
  partial     eval: a batch of finished samples was appended to the task's partial file
"""

from __future__ import annotations

import os
import signal

from moebench.errors import UserError

KILL_ENV = "MOEBENCH_TEST_KILL_AT"
_hits: dict[str, int] = {}


def fault_point(name: str) -> None:
    """SIGKILL this process if $MOEBENCH_TEST_KILL_AT names this point and this is its n-th call."""
    spec = os.environ.get(KILL_ENV)
    if not spec:
        return
    point, _, n = spec.rpartition(":")
    if not point or not n.isdigit() or int(n) < 1:
        raise UserError(f"{KILL_ENV}={spec!r} must look like <point>:<n>, e.g. checkpoint:2")
    if point != name:
        return
    _hits[name] = _hits.get(name, 0) + 1
    if _hits[name] == int(n):
        os.kill(os.getpid(), signal.SIGKILL)
