"""Run daemon steps at a fixed moment, in a process of its own.

    python -m tests.run_at CONFIG 2026-11-23T14:16:00+00:00 sync sweep dispatch

``crash`` ends the process on the spot (no clean-up, no commit of anything in flight), as a
power cut or a SIGKILL would. Used by the restart tests.
"""

from __future__ import annotations

import os
import sys
from datetime import datetime
from pathlib import Path

from visitwatch.daemon.clock import FrozenClock
from visitwatch.daemon.config import load_config
from visitwatch.daemon.service import Service


def main(config: str, moment: str, *steps: str) -> None:
    service = Service(load_config(Path(config)), FrozenClock(datetime.fromisoformat(moment)))
    service.acquire_lock()
    actions = {"sync": service.sync_all, "sweep": service.sweep, "dispatch": service.dispatch}
    for step in steps:
        if step == "crash":
            os._exit(137)
        actions[step]()
    service.close()


if __name__ == "__main__":
    main(*sys.argv[1:])
