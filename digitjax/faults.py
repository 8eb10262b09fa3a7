"""Named fault points for kill tests: `DIGITJAX_FAULT=kill@POINT[:N][,kill@POINT2...]`.

`faults.point("chunk")` SIGKILLs this process the N-th time (default 1st) the point is
reached, so tests can stop a real run at an exact place: `chunk` (a compiled call has been
dispatched, its results not yet fetched), `save` (an async checkpoint write has started,
before its commit), `eval` (evaluation rows written, checkpoint not yet saved). Unset, a
point costs one dict lookup; a malformed plan is a ConfigError at the first point reached.
"""

from __future__ import annotations

import os
import signal

POINTS = ("chunk", "save", "eval")
_counts: dict[str, int] = {}


def _plan() -> dict[str, int]:
    from .config import ConfigError

    plan = {}
    for item in os.environ.get("DIGITJAX_FAULT", "").split(","):
        item = item.strip()
        if not item:
            continue
        name, _, nth = item.removeprefix("kill@").partition(":")
        # A typo must fail loudly: a kill test whose fault never fires would pass vacuously.
        if not item.startswith("kill@") or name not in POINTS or not (nth or "1").isdecimal() \
                or int(nth or 1) < 1:
            raise ConfigError(f"DIGITJAX_FAULT={os.environ['DIGITJAX_FAULT']!r}: expected "
                              f"kill@POINT[:N] with POINT one of {', '.join(POINTS)}, N >= 1")
        plan[name] = int(nth or 1)
    return plan


def point(name: str) -> None:
    plan = _plan() if "DIGITJAX_FAULT" in os.environ else {}
    if name not in plan:
        return
    _counts[name] = _counts.get(name, 0) + 1
    if _counts[name] == plan[name]:
        os.kill(os.getpid(), signal.SIGKILL)
