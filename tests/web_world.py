"""Worlds with the pages on: a [web] section and a public base URL on a free loopback port."""

from __future__ import annotations

import socket

from tests.conftest import World


def free_port() -> int:
    with socket.create_server(("127.0.0.1", 0)) as sock:
        return int(sock.getsockname()[1])


def enable_web(world: World, port: int | None = None, **web: object) -> int:
    """Turn the pages on in ``world``'s config; returns the port they are served on."""
    port = port or free_port()
    world.daemon += f'public_base_url = "http://127.0.0.1:{port}"\n'
    lines = "".join(
        f"{key} = {str(value).lower() if isinstance(value, bool) else repr(value)}\n"
        for key, value in {"enabled": True, "port": port, **web}.items()
    )
    world.policy += f"\n[web]\n{lines}"
    return port
