"""
The Unix-domain listener of C{general.unix_socket_dir}: C{<dir>/.s.PGSQL.<port>}, the name
libpq looks for (C{psql -h <dir>}), with the permissions of C{general.unix_socket_mode}.

Clients on it have no address: pg_hba C{local} rules match them and C{host} rules do not, as in
PostgreSQL.  A socket file left by a process that died is removed at start (only when nothing
answers on it); a live one means another pooler has the name and the start fails.  Across a
zero-downtime upgrade the listening socket is handed over like the TCP one, and the old
process leaves the file in place for the new one.
"""

from __future__ import annotations

import errno
import os
import socket
import stat
from typing import Optional

from twisted.application import service
from twisted.internet import error, reactor
from twisted.logger import Logger

__all__ = ["UnixListener", "socket_path"]


def socket_path(directory: str, port: int) -> str:
    return os.path.join(directory, ".s.PGSQL.%d" % port)


def _remove_stale(path: str) -> None:
    try:
        st = os.stat(path)
    except OSError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise error.CannotListenError(None, path, "exists and is not a socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except OSError as e:
        if e.errno in (errno.ECONNREFUSED, errno.ENOENT):
            os.unlink(path)  # left behind by a process that is gone
            return
        raise error.CannotListenError(None, path, e)
    finally:
        probe.close()
    raise error.CannotListenError(None, path, "another process is listening on it")


class UnixListener(service.Service):
    """
    Listens on C{path}, or adopts C{inherited_fd} (the socket of the process this one
    replaces).  C{_port} is the Twisted port, as on the TCP listener (SUSPEND and the
    upgrade use it).
    """

    log = Logger()
    _port = None

    def __init__(self, path: str, factory, mode: int, backlog: int = 1024,
                 inherited_fd: Optional[int] = None):
        self.path = path
        self.factory = factory
        self.mode = mode
        self.backlog = backlog
        self.fd = inherited_fd

    def startService(self):
        service.Service.startService(self)
        if self.fd is not None:
            self._port = reactor.adoptStreamPort(self.fd, socket.AF_UNIX, self.factory)
            os.close(self.fd)  # adoptStreamPort works on a duplicate
            self.fd = None
        else:
            _remove_stale(self.path)
            self._port = reactor.listenUNIX(self.path, self.factory, backlog=self.backlog,
                                            mode=self.mode)
        # Twisted applies its default mode to an adopted socket's file: set ours again.
        try:
            os.chmod(self.path, self.mode)
        except OSError as e:
            self.log.warn("cannot set mode {mode:o} on {path}: {error}", mode=self.mode,
                          path=self.path, error=e.strerror)

    def keep_file(self) -> None:
        """The new process has the socket now: stop without removing its file."""
        if self._port is not None:
            self._port._bindPath = b"\0"

    def stopService(self):
        service.Service.stopService(self)
        if self._port is not None:
            d = self._port.stopListening()
            del self._port
            return d
