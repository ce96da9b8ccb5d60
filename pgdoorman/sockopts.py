"""
Socket options from the general section, applied to every client and server connection.

TCP_NODELAY because a pooler forwards small messages that must not wait for Nagle; keepalives
so that a peer that vanished without a FIN (a dead host, a dropped NAT entry) is noticed.
"""

from __future__ import annotations

import socket


def apply(transport, general) -> None:
    """Set TCP_NODELAY and keepalives on C{transport}'s socket; ignore what the OS refuses."""
    try:
        transport.setTcpNoDelay(bool(general.tcp_no_delay))
    except Exception:
        return  # not a TCP transport (Unix socket, test transport)
    try:
        sock = transport.getHandle()
        idle = general.tcp_keepalives_idle
        if not idle:
            return
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        if hasattr(socket, "TCP_KEEPIDLE"):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, max(1, int(idle)))
        if general.tcp_keepalives_interval and hasattr(socket, "TCP_KEEPINTVL"):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL,
                            max(1, int(general.tcp_keepalives_interval)))
        if general.tcp_keepalives_count and hasattr(socket, "TCP_KEEPCNT"):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT,
                            int(general.tcp_keepalives_count))
    except (OSError, AttributeError):
        pass
