"""What every page handler may use: the daemon's own objects, shared with the sweep.

The web server runs inside the daemon process on its own threads; pages read and write the
same database through the same :class:`Store` (one connection per thread) and act through
the same :class:`Actions` as the CLI, so a tap and a typed command do exactly the same.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from visitwatch.daemon.clock import Clock
from visitwatch.daemon.config import Config
from visitwatch.daemon.escalation import Watcher
from visitwatch.daemon.store import Store
from visitwatch.daemon.web.links import Signer


@dataclass
class WebContext:
    config: Config
    store: Store
    watcher: Watcher
    clock: Clock
    signer: Signer
    # Wakes the daemon's delivery loop after a page queued notifications (Service.wake).
    wake: Callable[[], None] = lambda: None
    # Filled by the service: what /healthz and /metrics report beyond the database.
    extras: dict[str, Any] = field(default_factory=dict)
