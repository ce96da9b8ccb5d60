"""
Telling systemd how the service is doing (C{Type=notify}), without libsystemd.

The protocol is one datagram of C{KEY=VALUE} lines to the AF_UNIX socket named by
C{$NOTIFY_SOCKET} (sd_notify(3); a leading C{@} means the abstract namespace).  Without
C{$NOTIFY_SOCKET} (not under systemd) every call here does nothing, so callers never check.

What pgdoorman sends:
  - C{READY=1} once the listening socket is bound (L{Notifier.startService});
  - C{STATUS=...} every few seconds with client and server counts (L{status_line});
  - C{RELOADING=1} then C{READY=1} around a reload: call L{notify} from the reload code,
    e.g. C{notify("RELOADING=1", monotonic_usec())} ... C{notify("READY=1")};
  - C{MAINPID=<pid>} when a new process takes over in a binary upgrade;
  - C{STOPPING=1} when shutting down.
"""

from __future__ import annotations

import os
import socket
import time
from typing import Optional

from twisted.application import service
from twisted.internet import task
from twisted.logger import Logger

__all__ = ["notify", "enabled", "monotonic_usec", "status_line", "Notifier"]

log = Logger()


def enabled() -> bool:
    """True when running under systemd with C{Type=notify} (C{$NOTIFY_SOCKET} is set)."""
    return bool(os.environ.get("NOTIFY_SOCKET"))


def _address(name: str):
    if name.startswith("@"):
        return "\0" + name[1:]
    return name


def notify(*lines: str, **fields: object) -> bool:
    """
    Send one notification: C{notify("READY=1")}, C{notify(STATUS="3 clients")},
    C{notify("RELOADING=1", monotonic_usec())}, C{notify(MAINPID=1234)}.

    @return: True if it was sent, False when not under systemd or the socket refused it
        (a failed notification never raises: systemd being gone must not stop the pooler).
    """
    name = os.environ.get("NOTIFY_SOCKET")
    if not name:
        return False
    parts = list(lines) + ["%s=%s" % (k, v) for k, v in fields.items()]
    payload = "\n".join(p.replace("\n", " ") for p in parts).encode("utf-8")
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
            s.connect(_address(name))
            s.sendall(payload)
        return True
    except OSError as e:
        log.warn("cannot notify systemd at {socket}: {error}", socket=name, error=e)
        return False


def monotonic_usec() -> str:
    """C{MONOTONIC_USEC=...}, which systemd 253+ wants next to C{RELOADING=1}."""
    return "MONOTONIC_USEC=%d" % (time.clock_gettime(time.CLOCK_MONOTONIC) * 1000000,)


def status_line(pool_service) -> str:
    """
    A one-line summary of a L{pgdoorman.pool.PoolService} for C{STATUS=}:
    C{"12 clients (2 waiting), 5 servers (3 idle), 4 pools"}.
    """
    pools = list(getattr(pool_service, "pools", {}).values())
    clients = getattr(pool_service, "clients", None)
    n_clients = len(clients) if clients is not None else sum(p.clients for p in pools)
    waiting = sum(len(p.waiting) for p in pools)
    servers = sum(len(p.servers) for p in pools)
    idle = sum(len(p.idle) for p in pools)
    return "%d clients (%d waiting), %d servers (%d idle), %d pools" % (
        n_clients, waiting, servers, idle, len(pools))


class Notifier(service.Service):
    """
    Sends C{READY=1} when started and C{STATUS=} every C{interval} seconds, then
    C{STOPPING=1} when stopped.  Add it as the last child of the pooler's MultiService so that
    it starts after the listener has bound its port.  Inert when not under systemd.
    """

    name = "systemd-notifier"

    def __init__(self, pool_service, interval: float = 5.0) -> None:
        self.pool_service = pool_service
        self.interval = interval
        self._loop: Optional[task.LoopingCall] = None

    def startService(self) -> None:
        service.Service.startService(self)
        if not enabled():
            return
        notify("READY=1", STATUS=status_line(self.pool_service), MAINPID=os.getpid())
        self._loop = task.LoopingCall(self.send_status)
        self._loop.start(self.interval, now=False)

    def send_status(self) -> None:
        notify(STATUS=status_line(self.pool_service))

    def stopService(self) -> None:
        service.Service.stopService(self)
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        if enabled():
            notify("STOPPING=1")
