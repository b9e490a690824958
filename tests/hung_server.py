"""A loopback server that accepts TCP connections and never answers (a hung mail server).

The kernel completes the handshake, so a client's ``connect`` succeeds at once; then it
waits for a greeting that never comes, as with a mail server whose process is wedged or a
firewall that swallows traffic after the handshake. Used by the fault-injection tests.
"""

from __future__ import annotations

import socket
import threading
from types import TracebackType


class HungServer:
    """Accepts connections on a free loopback port and holds them open, silent, until closed."""

    def __init__(self) -> None:
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.2)
        self.port: int = self._listener.getsockname()[1]
        self.connections: list[socket.socket] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._accept, name="hung-server", daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                connection, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return  # closed
            self.connections.append(connection)  # held: never read, never written

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self._listener.close()
        for connection in self.connections:
            connection.close()

    def __enter__(self) -> HungServer:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()
