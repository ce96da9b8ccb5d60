"""
The epoll reactor without the legacy log context around every I/O event.

Twisted's epoll reactor calls each ready descriptor through C{log.callWithLogger}, which asks
the transport for its log prefix and pushes it as a context dict (three nested calls and a
dict copy) so that old-style C{log.msg} calls made during the event carry a "system" prefix.
pgdoorman logs through C{twisted.logger} with explicit fields and never uses that prefix;
measured on the proxy path it was a fifth of the pooler's CPU per transaction.  This reactor is
the stock one with only C{doPoll} changed: same poller, same C{_doReadOrWrite}, and an
exception escaping it is still logged, as callWithLogger would.

Used by the C{pgdoorman} command; C{twistd pgdoorman} runs on whatever reactor twistd
installs.  Checked against the Twisted versions in L{pgdoorman.sendnow.TESTED_TWISTED}; on
any other the stock reactor is used.
"""

from __future__ import annotations

import errno
import select

from twisted.internet import epollreactor, tcp
from twisted.logger import Logger
from twisted.python import failure

from pgdoorman.sendnow import TESTED_TWISTED

_log = Logger(namespace="pgdoorman.reactor")


#: Transports whose plain read event is handled in line (see L{EPollReactor.doPoll}).
_TCP = (tcp.Server, tcp.Client)
_EPOLLIN = select.EPOLLIN


class EPollReactor(epollreactor.EPollReactor):
    """
    L{epollreactor.EPollReactor} dispatching events without C{log.callWithLogger}.

    A plain read event (EPOLLIN alone) on a TCP connection is handled in line: the same
    C{recv} and C{protocol.dataReceived} as C{tcp.Connection.doRead} (TLS included, since the
    transport's protocol is then the TLS layer), without the three calls in between.  End of
    file, errors and every other event go the stock way, C{_doReadOrWrite}.
    """

    def doPoll(self, timeout):
        if timeout is None:
            timeout = -1
        try:
            events = self._poller.poll(timeout, len(self._selectables))
        except OSError as err:
            if err.errno == errno.EINTR:
                return
            raise
        selectables = self._selectables
        drdw = self._doReadOrWrite
        for fd, event in events:
            selectable = selectables.get(fd)
            if selectable is None:
                continue
            if event == _EPOLLIN and type(selectable) in _TCP:
                try:
                    data = selectable.socket.recv(selectable.bufferSize)
                except BlockingIOError:
                    continue
                except OSError:
                    data = b""  # let the stock path meet the error and report it
                if data:
                    try:
                        selectable.protocol.dataReceived(data)
                    except KeyboardInterrupt:
                        raise
                    except BaseException:
                        # As _doReadOrWrite: log it, and the connection goes.
                        _log.failure("unhandled error in dataReceived of {selectable!r}",
                                     selectable=selectable)
                        self._disconnectSelectable(selectable, failure.Failure(), True)
                    continue
            try:
                drdw(selectable, fd, event)
            except KeyboardInterrupt:
                raise
            except BaseException:
                _log.failure("unhandled error while handling I/O on {selectable!r}",
                             selectable=selectable)

    doIteration = doPoll

    def stop(self):
        """
        Stop once: a second SIGTERM during shutdown (systemd, `timeout`) must not log a
        ReactorNotRunning traceback as CRITICAL, as the stock reactor does.
        """
        if self._stopped:
            return
        epollreactor.EPollReactor.stop(self)


def install() -> bool:
    """Install this reactor (True) or, on an untested Twisted, the stock epoll one (False)."""
    from twisted import version
    from twisted.internet.main import installReactor
    if version.major in TESTED_TWISTED and hasattr(epollreactor.EPollReactor, "_doReadOrWrite"):
        installReactor(EPollReactor())
        return True
    epollreactor.install()
    return False
