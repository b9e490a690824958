"""Run a call in a thread and fail the test, instead of freezing the suite, if it hangs."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any


def run_bounded(seconds: float, action: Callable[[], Any]) -> Any:
    """``action()``'s result (or its exception); fail if still running after ``seconds``.

    A hang check with a generous bound, not a speed measurement.
    """
    outcome: dict[str, Any] = {}

    def target() -> None:
        try:
            outcome["value"] = action()
        except BaseException as err:  # handed to the test below
            outcome["error"] = err

    worker = threading.Thread(target=target, daemon=True)
    worker.start()
    worker.join(seconds)
    assert not worker.is_alive(), f"still running after {seconds}s"
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]
