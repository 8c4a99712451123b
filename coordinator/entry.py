"""Console entry points of the servers: say which extra is missing instead of a traceback.

The `starling-mesh` distribution without extras is the agent; `starling-coordinator` needs
`starling-mesh[coordinator]` and `starling-signal` needs `starling-mesh[signal]`. This module imports
nothing beyond the standard library before it has checked.
"""

from __future__ import annotations

import importlib.util
import sys

NEEDS = {
    "coordinator": ("fastapi", "uvicorn", "pydantic", "sqlalchemy", "alembic", "jinja2"),
    "signal": ("starlette", "uvicorn", "pydantic"),
}


def missing(extra: str) -> list[str]:
    """The modules of `extra` this interpreter cannot import."""
    absent = []
    for name in NEEDS[extra]:
        try:
            found = importlib.util.find_spec(name) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            absent.append(name)
    return absent


def _check(extra: str, command: str) -> None:
    absent = missing(extra)
    if absent:
        print(
            f"{command}: this installation lacks {', '.join(absent)}: install 'starling-mesh[{extra}]' "
            "(starling-mesh alone is the agent)",
            file=sys.stderr,
        )
        raise SystemExit(2)


def coordinator_main() -> int:
    _check("coordinator", "starling-coordinator")
    from coordinator.cli import main

    return main()


def signal_main() -> int:
    _check("signal", "starling-signal")
    from coordinator.signal.cli import main

    return main()
