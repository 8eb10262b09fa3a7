"""Named fault points for kill tests: `DIGITJAX_FAULT=kill@POINT[:N][,kill@POINT2...]`.

`faults.point("chunk")` SIGKILLs this process the N-th time (default 1st) the point is
reached, so tests can stop a real run at an exact place: `chunk` (a compiled call has been
dispatched, its results not yet fetched), `save` (an async checkpoint write has started,
before its commit), `eval` (evaluation rows written, checkpoint not yet saved). Unset, a
point costs one dict lookup.
"""

from __future__ import annotations

import os
import signal

_counts: dict[str, int] = {}


def _plan() -> dict[str, int]:
    plan = {}
    for item in os.environ.get("DIGITJAX_FAULT", "").split(","):
        item = item.strip()
        if item.startswith("kill@"):
            name, _, nth = item[len("kill@"):].partition(":")
            plan[name] = int(nth or 1)
    return plan


def point(name: str) -> None:
    plan = _plan() if "DIGITJAX_FAULT" in os.environ else {}
    if name not in plan:
        return
    _counts[name] = _counts.get(name, 0) + 1
    if _counts[name] == plan[name]:
        os.kill(os.getpid(), signal.SIGKILL)
