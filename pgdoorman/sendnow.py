"""
Send bytes on a TCP transport at once when nothing is queued ahead of them.

C{transport.write} never sends immediately: it queues the bytes, registers the socket for
writing and sends on the next reactor turn, which costs two epoll_ctl calls and a loop iteration
per message.  Measured here (see PERFORMANCE.md in the project's shared notes) that is about a
quarter of a pooler's CPU.  When Twisted's own buffer for the transport is empty we may call
C{send()} on the socket ourselves without reordering anything; whatever the kernel does not
take goes through C{transport.write} as usual, so Twisted stays in charge of buffering,
producers and errors.

This reads private attributes of L{twisted.internet.abstract.FileDescriptor} (C{dataBuffer},
C{_tempDataLen}); it is checked against the running Twisted once, at import, and any transport
that does not look exactly like the one tested (TLS, Unix, a test transport) gets plain
C{transport.write}.
"""

from __future__ import annotations

from typing import Callable, Optional

from twisted.internet import tcp

#: Twisted versions this has been tested on (major releases); others fall back to write().
TESTED_TWISTED = (22, 23, 24, 25, 26)

try:
    from twisted import version as _tv
    _SUPPORTED = _tv.major in TESTED_TWISTED and all(
        hasattr(tcp.Connection, name) for name in ("dataBuffer", "write", "disconnecting"))
except Exception:  # pragma: no cover - a Twisted we have never seen
    _SUPPORTED = False

#: Bytes buffered in Twisted for one transport above which the on_backlog hook runs.
BACKLOG_BYTES = 256 * 1024


def make_sender(transport, on_backlog: Optional[Callable[[], None]] = None
                ) -> Callable[[bytes], None]:
    """
    Return a function that writes bytes to C{transport}, sending at once where it can.

    @param on_backlog: called (rarely) when the bytes waiting in Twisted's buffer for this
        transport exceed L{BACKLOG_BYTES}, so the caller can stop reading from the peer that
        produces them.
    """
    if not _SUPPORTED or type(transport) not in (tcp.Server, tcp.Client) \
            or not hasattr(transport, "_tempDataLen"):
        return transport.write
    sock = transport.socket
    write = transport.write

    def send(data: bytes) -> None:
        t = transport
        if t._tempDataLen or t.dataBuffer or t.disconnecting or not t.connected:
            write(data)
        else:
            try:
                sent = sock.send(data)
            except (BlockingIOError, InterruptedError):
                sent = 0
            except OSError:
                # Let Twisted meet the error on its own write and report connectionLost.
                write(data)
                return
            if sent == len(data):
                return
            write(memoryview(data)[sent:].tobytes())
        if on_backlog is not None and t._tempDataLen + len(t.dataBuffer) > BACKLOG_BYTES:
            on_backlog()

    return send
