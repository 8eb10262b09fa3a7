"""Named fault points for kill tests: `DIGITJAX_FAULT=kill@POINT[:N][,term@POINT2...]`.

`faults.point("chunk")` SIGKILLs this process (`kill@`) or sends it a SIGTERM (`term@`, a
clean stop request) the N-th time (default 1st) the point is reached, so tests can stop a
real run at an exact place: `chunk` (a compiled call has been
dispatched, its results not yet fetched), `save` (an async checkpoint write has started,
before its commit), `eval` (evaluation rows written, checkpoint not yet saved). Unset, a
point costs one dict lookup; a malformed plan is a ConfigError at the first point reached.
"""

from __future__ import annotations

import os
import signal

POINTS = ("chunk", "save", "eval")
SIGNALS = {"kill": signal.SIGKILL, "term": signal.SIGTERM}
_counts: dict[str, int] = {}


def _plan() -> dict[str, tuple[int, int]]:
    from .config import ConfigError

    plan = {}
    for item in os.environ.get("DIGITJAX_FAULT", "").split(","):
        item = item.strip()
        if not item:
            continue
        action, _, rest = item.partition("@")
        name, _, nth = rest.partition(":")
        # A typo must fail loudly: a kill test whose fault never fires would pass vacuously.
        if action not in SIGNALS or name not in POINTS or not (nth or "1").isdecimal() \
                or int(nth or 1) < 1:
            raise ConfigError(f"DIGITJAX_FAULT={os.environ['DIGITJAX_FAULT']!r}: expected "
                              f"kill@POINT[:N] or term@POINT[:N] with POINT one of "
                              f"{', '.join(POINTS)}, N >= 1")
        plan[name] = (SIGNALS[action], int(nth or 1))
    return plan


def point(name: str) -> None:
    plan = _plan() if "DIGITJAX_FAULT" in os.environ else {}
    if name not in plan:
        return
    _counts[name] = _counts.get(name, 0) + 1
    signum, nth = plan[name]
    if _counts[name] == nth:
        os.kill(os.getpid(), signum)
