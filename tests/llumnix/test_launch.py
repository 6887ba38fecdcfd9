"""Ports for the servers ``llumnix serve`` starts are picked outside the OS's ephemeral range,
so no process that binds port 0 or connects while an engine starts can take them."""

from __future__ import annotations

import socket

from llumnix.launch import _ephemeral_range, service_port


def test_service_ports_are_free_and_below_the_ephemeral_range() -> None:
    low, _ = _ephemeral_range()
    ports = {service_port() for _ in range(20)}
    assert len(ports) > 1
    for port in ports:
        assert 1024 <= port < low
        with socket.socket() as s:
            s.bind(("127.0.0.1", port))
