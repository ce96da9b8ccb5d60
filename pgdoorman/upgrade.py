"""
Zero-downtime upgrade: a new pgdoorman process takes over the listening sockets and the live
client sessions of the running one (PgDoorman's binary upgrade).

The running process (L{Upgrade}, on SIGUSR2, SIGINT without a TTY, or the admin console's
C{UPGRADE}):

  1. runs the installed code's C{pgdoorman -t CONFIG} in a subprocess; a failure changes
     nothing and is reported;
  2. starts the new process from the installed code with the same command line, handing it the
     listening sockets as inherited fds and one end of a Unix socketpair, named in
     C{$PGDOORMAN_UPGRADE_FDS} (C{channel=FD,listen=FD:FAMILY[,metrics=FD:FAMILY]});
  3. waits for the new process's ready message (L{READY_TIMEOUT}); on timeout or if the new
     process dies, kills it and stays in charge, port and clients untouched;
  4. stops accepting, then every few milliseconds hands each idle client
     (L{ClientConnection.idle_for_migration}) over: its socket fd with SCM_RIGHTS and its
     L{ClientSession} bytes; clients in a transaction go when they become idle;
  5. exits when no client is left, or at general.shutdown_timeout, logging the counts.

The new process (L{Takeover}) adopts the listening sockets (L{InheritedPort}), says it is
ready, and rebuilds each client it receives in its pool (L{ClientConnection._adopt}) on the same
TCP connection, with the same BackendKeyData.  CancelRequests for keys it does not know (a
client still finishing a transaction on the old process) go back over the socketpair.

The socketpair carries frames of C{kind (1 byte), payload length (4), fd count (2)} then the
payload; a frame's fds travel with its first byte, and the receiver queues fds in arrival
order, so a frame finds its fds when it is complete (Linux never merges two sendmsg calls'
fds into one recvmsg).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import struct
import subprocess
import sys
import time
from collections import deque
from typing import Callable, Dict, List, Optional, Tuple

from twisted.application import service
from twisted.internet import defer, error, protocol, reactor, task
from twisted.internet.interfaces import IReadDescriptor, IWriteDescriptor
from twisted.logger import Logger
from twisted.python import failure
from zope.interface import implementer

from pgdoorman.session import ClientSession, SessionFormatError

#: The environment variable naming the inherited fds (set for the new process only).
ENV = "PGDOORMAN_UPGRADE_FDS"
#: Seconds the new process has to say it is ready (override: $PGDOORMAN_UPGRADE_READY_TIMEOUT).
READY_TIMEOUT = 30.0
#: Seconds between looks for clients that became idle.
MIGRATE_INTERVAL = 0.005

_HEADER = struct.Struct("!cIH")
_FAMILY = struct.Struct("!H")
_CANCEL = struct.Struct("!ii")

READY = b"R"        # new -> old: {"pid": ..., "version": ...}
MAIN = b"M"         # old -> new: you are the main process now (systemd MAINPID sent)
CLIENT = b"C"       # old -> new: family (2 bytes) + ClientSession bytes, one fd
CANCEL = b"K"       # new -> old: a CancelRequest (pid, secret) for a client still on the old
END = b"E"          # old -> new: no more clients; the old process exits


# -- the new process's inheritance -------------------------------------------------------------

class Inherited:
    """What C{$PGDOORMAN_UPGRADE_FDS} names: the channel fd and listening (fd, family) pairs."""

    def __init__(self, channel: int, listeners: Dict[str, Tuple[int, int]], parent: int = 0):
        self.channel = channel
        self.listeners = listeners
        self.parent = parent


_inherited: Optional[Inherited] = None
#: The working directory the command line was given in, when the process left it (a daemon
#: runs in /): the new process starts there, so that relative paths in argv still hold.
start_directory: Optional[str] = None
_inherited_read = False


def parse_inherited(text: str) -> Inherited:
    """C{"channel=7,listen=5:2,metrics=6:2"} -> L{Inherited}; ValueError if malformed."""
    channel = None
    listeners: Dict[str, Tuple[int, int]] = {}
    for part in text.split(","):
        name, _, value = part.partition("=")
        if name == "channel":
            channel = int(value)
        elif name == "parent":
            pass
        else:
            fd, _, family = value.partition(":")
            listeners[name] = (int(fd), int(family or socket.AF_INET))
    if channel is None:
        raise ValueError("%s has no channel fd: %r" % (ENV, text))
    return Inherited(channel, listeners)


def inherited() -> Optional[Inherited]:
    """
    The fds this process inherited from the one it replaces, or None for a normal start.
    Read once; the variable is removed from the environment so that a later upgrade of this
    process does not pass it on.
    """
    global _inherited, _inherited_read
    if not _inherited_read:
        _inherited_read = True
        text = os.environ.pop(ENV, None)
        parent = os.environ.pop("PGDOORMAN_UPGRADE_PARENT", "0")
        if text:
            _inherited = parse_inherited(text)
            _inherited.parent = int(parent or 0)
    return _inherited


class InheritedPort(service.Service):
    """A listening socket inherited from the previous process, adopted instead of bound."""

    _port = None

    def __init__(self, fd: int, family: int, factory: protocol.Factory):
        self.fd = fd
        self.family = family
        self.factory = factory

    def startService(self):
        service.Service.startService(self)
        if self.fd is not None:
            self._port = reactor.adoptStreamPort(self.fd, self.family, self.factory)
            os.close(self.fd)  # adoptStreamPort works on a duplicate
            self.fd = None

    def stopService(self):
        service.Service.stopService(self)
        if self._port is not None:
            d = self._port.stopListening()
            del self._port
            return d


#: Under twistd, the pid file the new process writes (and rewrites once the old one, whose
#: twistd removes the file at exit, is gone).  Passed on to every later upgrade.
PIDFILE_ENV = "PGDOORMAN_PIDFILE"

#: twistd's short options that take a value (the others are flags).
_TWISTD_SHORT_VALUES = set("ldugryfsp")


def under_twistd() -> bool:
    """True in a process that twistd started (the pgdoorman command never loads this)."""
    return "twisted.scripts._twistd_unix" in sys.modules


def twistd_command_line(argv: List[str], subcommand: str = "pgdoorman"
                        ) -> Tuple[List[str], Optional[str]]:
    """
    The twistd command line for the new process, and the pid file it must write.

    The old twistd holds its pid file, so a new twistd with the same options would refuse to
    start ("Another twistd server is running"): the new one runs with C{--pidfile=} (no pid
    file of twistd's) and C{--nodaemon} (this process is detached already, and the new one
    must stay this process's child for the handover), and pgdoorman writes the pid file
    itself (L{Takeover}).  A daemon's defaults that C{--nodaemon} would change are kept: the
    log goes to C{twistd.log}, the umask stays 077.

    @param argv: C{sys.argv[1:]} of the running twistd.
    @return: (new argv after the twistd script, absolute pid file or None).
    """
    try:
        cut = argv.index(subcommand)
    except ValueError:
        cut = len(argv)
    head, tail = list(argv[:cut]), list(argv[cut:])
    pidfile: Optional[str] = "twistd.pid"
    nodaemon = logfile = umask = False
    i = 0
    while i < len(head):
        arg = head[i]
        name, eq, value = arg.partition("=")
        takes_next = False
        if arg.startswith("--"):
            if name in ("--pidfile", "--logfile", "--umask", "--rundir", "--uid", "--gid",
                        "--reactor", "--python", "--file", "--source", "--prefix",
                        "--logger", "--profile", "--profiler", "--chroot"):
                if not eq:
                    takes_next = True
                    value = head[i + 1] if i + 1 < len(head) else ""
                if name == "--pidfile":
                    pidfile = value
                logfile = logfile or name == "--logfile"
                umask = umask or name == "--umask"
            nodaemon = nodaemon or name in ("--nodaemon", "--debug")
        elif arg.startswith("-") and len(arg) > 1:
            for j, letter in enumerate(arg[1:]):
                if letter in _TWISTD_SHORT_VALUES:
                    takes_next = j == len(arg) - 2
                    logfile = logfile or letter == "l"
                    break
                nodaemon = nodaemon or letter in "nb"
        i += 2 if takes_next else 1
    if os.environ.get(PIDFILE_ENV):
        pidfile = os.environ[PIDFILE_ENV]  # this process was itself started by an upgrade
    extra = ["--pidfile=", "--nodaemon"]
    if not nodaemon and not logfile:
        extra.append("--logfile=%s" % os.path.abspath("twistd.log"))
    if not nodaemon and not umask:
        extra.append("--umask=0077")
    return head + extra + tail, (os.path.abspath(pidfile) if pidfile else None)


def command_line() -> List[str]:
    """How this process was started, to start the new one the same way from installed code."""
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    if spec is not None and spec.name in ("pgdoorman.__main__", "pgdoorman"):
        return [sys.executable, "-m", "pgdoorman"] + sys.argv[1:]
    if under_twistd():
        argv, _pidfile = twistd_command_line(sys.argv[1:])
        return [sys.executable, sys.argv[0]] + argv
    return [sys.executable, sys.argv[0]] + sys.argv[1:]


# -- the socketpair -----------------------------------------------------------------------------

@implementer(IReadDescriptor, IWriteDescriptor)
class Channel:
    """
    Frames with optional fds over one end of the socketpair, on the reactor.  Outgoing frames
    queue when the socket is full; their fds stay open (ours) until sent, then are closed.
    """

    log = Logger()

    def __init__(self, sock: socket.socket,
                 on_message: Callable[[bytes, bytes, List[int]], None],
                 on_lost: Callable[[], None]):
        self.sock = sock
        sock.setblocking(False)
        self.on_message = on_message
        self.on_lost = on_lost
        self._in = b""
        self._fds: deque = deque()
        self._out: deque = deque()
        self._drained: List[defer.Deferred] = []
        self._writing = False
        self.closed = False

    def fileno(self) -> int:
        return self.sock.fileno() if not self.closed else -1

    def logPrefix(self) -> str:
        return "upgrade-channel"

    def start(self) -> None:
        reactor.addReader(self)

    def send(self, kind: bytes, payload: bytes = b"", fds: Tuple[int, ...] = ()) -> None:
        if self.closed:
            for fd in fds:
                os.close(fd)
            return
        self._out.append((_HEADER.pack(kind, len(payload), len(fds)) + payload, list(fds)))
        if not self._writing:
            self._flush()

    def drained(self) -> defer.Deferred:
        """Fires when every queued frame has gone (or the channel is closed)."""
        if not self._out or self.closed:
            return defer.succeed(None)
        d = defer.Deferred()
        self._drained.append(d)
        return d

    def _flush(self) -> None:
        while self._out:
            data, fds = self._out[0]
            try:
                if fds:
                    sent = socket.send_fds(self.sock, [data], fds)
                else:
                    sent = self.sock.send(data)
            except (BlockingIOError, InterruptedError):
                sent = 0
            except OSError as e:
                self.close(e)
                return
            if sent and fds:
                for fd in fds:
                    os.close(fd)  # in flight: the kernel holds the socket for the receiver
            if sent < len(data):
                self._out[0] = (data[sent:], [] if sent else fds)
                if not self._writing:
                    self._writing = True
                    reactor.addWriter(self)
                return
            self._out.popleft()
        if self._writing:
            self._writing = False
            reactor.removeWriter(self)
        drained, self._drained = self._drained, []
        for d in drained:
            d.callback(None)

    def doWrite(self):
        self._flush()

    def doRead(self):
        try:
            data, fds, _flags, _addr = socket.recv_fds(self.sock, 262144, 16)
        except (BlockingIOError, InterruptedError):
            return None
        except OSError as e:
            return error.ConnectionLost(str(e))
        self._fds.extend(fds)
        if not data:
            return error.ConnectionDone("the other process closed the upgrade channel")
        buf = self._in + data
        pos = 0
        while len(buf) - pos >= _HEADER.size:
            kind, length, nfds = _HEADER.unpack_from(buf, pos)
            end = pos + _HEADER.size + length
            if len(buf) < end or len(self._fds) < nfds:
                break
            payload = buf[pos + _HEADER.size:end]
            got = [self._fds.popleft() for _ in range(nfds)]
            pos = end
            try:
                self.on_message(kind, payload, got)
            except Exception:
                self.log.failure("upgrade channel: handling a {kind!r} message failed",
                                 kind=kind)
        self._in = buf[pos:]
        return None

    def connectionLost(self, reason=None) -> None:
        self.close()

    def close(self, reason=None) -> None:
        if self.closed:
            return
        reactor.removeReader(self)
        reactor.removeWriter(self)
        self.closed = True
        while self._fds:
            _close(self._fds.popleft())
        for _data, fds in self._out:
            for fd in fds:
                _close(fd)
        self._out.clear()
        try:
            self.sock.close()
        except OSError:
            pass
        drained, self._drained = self._drained, []
        for d in drained:
            d.callback(None)
        self.on_lost()


def _close(fd: int) -> None:
    try:
        os.close(fd)
    except OSError:
        pass


# -- the old process -----------------------------------------------------------------------------

class UpgradeError(Exception):
    """The upgrade cannot go ahead; the message says why, for the operator."""


class Upgrade:
    """
    One upgrade, driven from the running process.  C{start()} fires with (ok, message) once the
    new process accepts connections (or the upgrade was refused); migration goes on after that.
    """

    log = Logger()

    def __init__(self, top):
        self.top = top
        self.state = "idle"
        self.proc: Optional[subprocess.Popen] = None
        self.channel: Optional[Channel] = None
        self.result: Optional[defer.Deferred] = None
        self.requested_at = 0.0
        self.ready_at = 0.0
        self.migrated = 0
        self.clients: set = set()
        self._timer = None
        self._loop: Optional[task.LoopingCall] = None
        self._deadline = None
        self._kept_listeners: List[Tuple[object, int, int]] = []
        self._finished = False

    # -- steps --------------------------------------------------------------------------------

    def start(self, why: str = "") -> defer.Deferred:
        if self.top.shutting_down:
            return defer.succeed((False, "pgdoorman is shutting down"))
        if self.state != "idle":
            return defer.succeed((False, "an upgrade is already in progress (%s)"
                                  % self.state))
        self.state = "checking the configuration"
        self.requested_at = time.monotonic()
        self.log.info("upgrade requested{why}: checking {path} with the installed pgdoorman",
                      why=" (%s)" % why if why else "", path=self.top.config.path)
        self.result = defer.Deferred()
        d = self._check()
        d.addCallback(self._spawn)
        d.addErrback(self._failed)
        return self.result

    def _check(self) -> defer.Deferred:
        from twisted.internet import utils
        argv = ["-m", "pgdoorman", "-t", self.top.config.path]
        d = utils.getProcessOutputAndValue(sys.executable, argv, env=dict(os.environ),
                                           path=start_directory or os.getcwd())

        def checked(result):
            out, err, code = result
            if code != 0:
                text = (err or out).decode("utf-8", "replace").strip()
                raise UpgradeError("the installed pgdoorman refuses the configuration "
                                   "(pgdoorman -t %s exited %s): %s"
                                   % (self.top.config.path, code, text))

        def broken(f):
            if f.check(UpgradeError):
                return f
            raise UpgradeError("cannot run pgdoorman -t: %s" % f.getErrorMessage())

        return d.addCallbacks(checked, broken)

    def _spawn(self, _=None) -> None:
        self.state = "starting the new process"
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        fds = [child.fileno()]
        spec = ["channel=%d" % child.fileno()]
        for name, svc in self._listeners():
            port = svc._port
            fds.append(port.fileno())
            spec.append("%s=%d:%d" % (name, port.fileno(), port.socket.family))
        env = dict(os.environ)
        env[ENV] = ",".join(spec)
        env["PGDOORMAN_UPGRADE_PARENT"] = str(os.getpid())
        argv = command_line()
        if under_twistd():
            _argv, pidfile = twistd_command_line(sys.argv[1:])
            if pidfile:
                env[PIDFILE_ENV] = pidfile
        try:
            self.proc = subprocess.Popen(argv, pass_fds=fds, env=env, close_fds=True,
                                         cwd=start_directory or os.getcwd())
        except OSError as e:
            parent.close()
            child.close()
            raise UpgradeError("cannot start %s: %s" % (" ".join(argv), e))
        child.close()
        self.log.info("upgrade: started the new process {pid}: {argv}", pid=self.proc.pid,
                      argv=" ".join(argv))
        self.channel = Channel(parent, self._message, self._channelLost)
        self.channel.start()
        self.state = "waiting for the new process"
        timeout = float(os.environ.get("PGDOORMAN_UPGRADE_READY_TIMEOUT") or READY_TIMEOUT)
        self._timer = reactor.callLater(timeout, self._notReady, timeout)

    def _listeners(self):
        for name, svc in (("listen", self.top.listener), ("metrics", self.top.metrics),
                          ("unix", getattr(self.top, "unix_listener", None))):
            if svc is not None and getattr(svc, "_port", None) is not None:
                yield name, svc

    def _notReady(self, timeout: float) -> None:
        self._timer = None
        self._abandon("the new process did not say it was ready within %gs" % timeout)

    def _abandon(self, reason: str) -> None:
        """The new process failed before taking over: kill it, keep serving."""
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        proc = self.proc
        if proc is not None and proc.poll() is None:
            try:
                proc.kill()
            except OSError:
                pass
        if proc is not None:
            _reap_later(proc)
        channel, self.channel = self.channel, None
        if channel is not None:
            channel.on_lost = lambda: None
            channel.close()
        self._failed(failure.Failure(UpgradeError(reason)))

    def _failed(self, f) -> None:
        reason = f.getErrorMessage() if f.check(UpgradeError) else f.getTraceback()
        self.log.error("UPGRADE FAILED, this process (pid {pid}) keeps serving: {reason}",
                       pid=os.getpid(), reason=reason)
        self.state = "idle"
        self.proc = None
        result, self.result = self.result, None
        if result is not None:
            result.callback((False, reason))

    def _message(self, kind: bytes, payload: bytes, fds: List[int]) -> None:
        for fd in fds:
            _close(fd)  # nothing the new process sends carries fds
        if kind == READY:
            self._ready(json.loads(payload.decode("utf-8")))
        elif kind == CANCEL:
            pid, secret = _CANCEL.unpack(payload)
            self.top.pools.cancel(pid, secret)

    def _ready(self, info: dict) -> None:
        if self.state != "waiting for the new process":
            return
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        self.ready_at = time.monotonic()
        took = self.ready_at - self.requested_at
        pid = self.proc.pid
        self.log.info("upgrade: new process {pid} (pgdoorman {version}) is accepting "
                      "connections {took:.3f}s after the request; this process stops "
                      "accepting and hands over its clients", pid=pid,
                      version=info.get("version", "?"), took=took, upgrade_ready=took)
        from pgdoorman import systemd
        if systemd.enabled():
            systemd.notify(MAINPID=pid)
        self.channel.send(MAIN)
        self.state = "migrating clients"
        self.top.upgrading = self
        # Stop accepting: close our copies of the listening sockets without shutdown(),
        # which would stop the new process's listening too (it is the same socket).
        for _name, svc in list(self._listeners()):
            port = svc._port
            self._kept_listeners.append((svc, os.dup(port.fileno()), port.socket.family))
            port._shouldShutdown = False
            if hasattr(svc, "keep_file"):
                svc.keep_file()  # the Unix socket's file is the new process's now
            svc.stopService()
        self.clients = self._allClients()
        self.log.info("upgrade: {n} clients to hand over", n=len(self.clients))
        timeout = self.top.config.general.shutdown_timeout or 0
        if timeout:
            self._deadline = reactor.callLater(timeout, self._expired, timeout)
        self._loop = task.LoopingCall(self._migrateIdle)
        self._loop.start(MIGRATE_INTERVAL, now=True)
        result, self.result = self.result, None
        if result is not None:
            result.callback((True, "new process %d (pgdoorman %s) is accepting connections"
                             % (pid, info.get("version", "?"))))

    def _allClients(self) -> set:
        from pgdoorman.client import ClientConnection
        found = set(self.top.pools.clients)
        for t in list(reactor.getReaders()) + list(reactor.getWriters()):
            p = getattr(t, "protocol", None)
            if isinstance(p, ClientConnection):
                found.add(p)
        return found

    # -- migration ----------------------------------------------------------------------------

    def _migrateIdle(self) -> None:
        from pgdoorman.client import ADMIN_DATABASES
        if self._finished:
            return
        left = 0
        for client in list(self.clients):
            if client.closed:
                self.clients.discard(client)
                continue
            if client.idle_for_migration():
                self._handOver(client)
                self.clients.discard(client)
            elif client.session.database not in ADMIN_DATABASES:
                left += 1  # admin consoles stay here and end with this process
        if not left:
            self._finish("all clients handed over")

    def _handOver(self, client) -> None:
        t = client.transport
        state = _FAMILY.pack(t.socket.family) + client.export_state().to_bytes()
        fd = os.dup(t.fileno())
        client.migrated = True
        self.channel.send(CLIENT, state, (fd,))
        self.migrated += 1
        # Close our copy quietly: no shutdown(), no goodbye; the new process has the socket.
        t._shouldShutdown = False
        t.connectionLost(failure.Failure(error.ConnectionDone("handed to the new process")))

    def _expired(self, timeout: float) -> None:
        self._deadline = None
        counts = {"in a transaction": 0, "session mode with a server": 0, "TLS": 0,
                  "logging in": 0, "busy": 0}
        from pgdoorman.client import ADMIN_DATABASES
        for c in self.clients:
            if c.closed or c.session.database in ADMIN_DATABASES:
                continue
            if c.tls:
                counts["TLS"] += 1
            elif c.server is not None and not c.pool.transaction_mode:
                counts["session mode with a server"] += 1
            elif c.server is not None or (c.relay is not None
                                          and c.relay.deferred_begin is not None):
                counts["in a transaction"] += 1
            elif c.cancel_key is None:
                counts["logging in"] += 1
            else:
                counts["busy"] += 1
        self.log.warn("upgrade: shutdown_timeout ({t}s) reached: closing {n} clients still "
                      "here ({detail})", t=timeout, n=sum(counts.values()),
                      detail=", ".join("%d %s" % (v, k) for k, v in counts.items() if v)
                      or "none")
        self._finish("shutdown_timeout reached")

    def _finish(self, why: str) -> None:
        if self._finished:
            return
        self._finished = True
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        if self._deadline is not None and self._deadline.active():
            self._deadline.cancel()
        took = time.monotonic() - self.ready_at
        rate = self.migrated / took if took > 0 else 0.0
        self.log.info("upgrade: {why}: {migrated} clients handed over in {took:.3f}s "
                      "({rate:.0f}/s), {left} closed; old process {pid} exits",
                      why=why, migrated=self.migrated, took=took, rate=rate,
                      left=len([c for c in self.clients if not c.closed]), pid=os.getpid(),
                      upgrade_migrated=self.migrated, upgrade_seconds=took)
        for _svc, fd, _family in self._kept_listeners:
            _close(fd)
        self._kept_listeners = []
        channel = self.channel
        channel.on_lost = lambda: None
        channel.send(END)
        d = channel.drained()
        timer = reactor.callLater(5.0, lambda: d.called or d.callback(None))

        def stop(_):
            if timer.active():
                timer.cancel()
            channel.close()
            self.state = "done"
            from pgdoorman.service import _stopReactor
            reactor.callLater(0.01, _stopReactor)

        d.addCallback(stop)

    def _channelLost(self) -> None:
        """The socketpair closed: the new process died (or never started properly)."""
        if self.state == "waiting for the new process":
            code = self.proc.poll() if self.proc is not None else None
            self._abandon("the new process exited during startup%s"
                          % (" with status %s" % code if code is not None else ""))
            return
        if self.state == "migrating clients" and not self._finished:
            # The new process is gone after taking over: take the port back and stay.
            self.log.error("UPGRADE FAILED: the new process {pid} died while taking over; "
                           "this process listens again and keeps its {n} clients",
                           pid=self.proc.pid if self.proc else "?", n=len(self.clients))
            if self._loop is not None and self._loop.running:
                self._loop.stop()
            if self._deadline is not None and self._deadline.active():
                self._deadline.cancel()
            for svc, fd, family in self._kept_listeners:
                svc._port = reactor.adoptStreamPort(fd, family, svc.factory)
                svc.running = 1
                _close(fd)
            self._kept_listeners = []
            if self.proc is not None:
                _reap_later(self.proc)
            self.top.upgrading = None
            self.state = "idle"
            self.proc = None
            self.channel = None


def _reap_later(proc: subprocess.Popen, tries: int = 100) -> None:
    """Collect a child that was told to die, without blocking the reactor."""
    if proc.poll() is None and tries:
        reactor.callLater(0.1, _reap_later, proc, tries - 1)


# -- the new process ---------------------------------------------------------------------------

class _AdoptingFactory(protocol.Factory):
    """Builds the client for one adopted socket through the listener's own factory."""

    def __init__(self, factory, session: ClientSession):
        self.factory = factory
        self.session = session

    def buildProtocol(self, addr):
        p = self.factory.buildProtocol(addr)
        p.adopting = self.session
        return p


class Takeover:
    """The new process's end of the socketpair: say ready, adopt the clients that come."""

    log = Logger()

    def __init__(self, top, inherited_fds: Inherited):
        self.top = top
        self.parent = inherited_fds.parent
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM, fileno=inherited_fds.channel)
        self.channel: Optional[Channel] = Channel(sock, self._message, self._lost)
        self.adopted = 0
        self.refused = 0

    def start(self) -> None:
        from pgdoorman import __version__
        self.pid_file = os.environ.get(PIDFILE_ENV) if under_twistd() else None
        if self.pid_file:
            self._writePidFile()
            reactor.addSystemEventTrigger("after", "shutdown", self._removePidFile)
        self.channel.start()
        self.channel.send(READY, json.dumps({"pid": os.getpid(),
                                             "version": __version__}).encode())
        self.top.pools.forward_cancel = self._forwardCancel
        self.log.info("taking over from pid {parent}: listening on the inherited socket",
                      parent=self.parent or "?")

    def _message(self, kind: bytes, payload: bytes, fds: List[int]) -> None:
        if kind == CLIENT:
            self._adopt(payload, fds)
        elif kind == MAIN:
            from pgdoorman import systemd
            systemd.notify("READY=1", MAINPID=os.getpid())
        elif kind == END:
            self.log.info("the previous process {parent} is done: {n} clients adopted"
                          "{refused}", parent=self.parent or "?", n=self.adopted,
                          refused=", %d refused" % self.refused if self.refused else "")
            self.close()
            if self.pid_file:
                self._whenParentGone(self._writePidFile)
        else:
            for fd in fds:
                _close(fd)

    def _adopt(self, payload: bytes, fds: List[int]) -> None:
        if len(fds) != 1:
            for fd in fds:
                _close(fd)
            return
        fd = fds[0]
        try:
            (family,) = _FAMILY.unpack_from(payload)
            session = ClientSession.from_bytes(payload[_FAMILY.size:])
        except (SessionFormatError, struct.error) as e:
            self.refused += 1
            self.log.error("cannot take over a client: {error}", error=e)
            _close(fd)
            return
        try:
            reactor.adoptStreamConnection(fd, family, _AdoptingFactory(self.top.factory,
                                                                       session))
            self.adopted += 1
        except Exception as e:
            self.refused += 1
            self.log.error("cannot take over client {peer}: {error}", peer=session.peer,
                           error=e)
        finally:
            _close(fd)

    # -- the pid file under twistd --------------------------------------------------------------

    pid_file: Optional[str] = None

    def _writePidFile(self) -> None:
        """Put our pid in the pid file (the old twistd removes it as it exits: see END)."""
        path = self.pid_file
        try:
            with open(path) as f:
                if f.read().strip() == str(os.getpid()):
                    return
        except OSError:
            pass
        tmp = "%s.%d.tmp" % (path, os.getpid())
        try:
            with open(tmp, "w") as f:
                f.write("%d" % os.getpid())
            os.replace(tmp, path)
        except OSError as e:
            self.log.error("cannot write the pid file {path}: {error}", path=path,
                           error=e.strerror)
            return
        self.log.info("pid file {path} now holds {pid}", path=path, pid=os.getpid())

    def _removePidFile(self) -> None:
        try:
            with open(self.pid_file) as f:
                if f.read().strip() != str(os.getpid()):
                    return  # a later upgrade's process has it now
            os.unlink(self.pid_file)
        except OSError:
            pass

    def _whenParentGone(self, then, tries: int = 1200) -> None:
        """
        Call C{then} once the old process has exited: we are its child, so it is gone when
        our parent pid changes (a zombie old process still answers kill(pid, 0)).
        """
        if os.getppid() != self.parent or not tries:
            then()
            return
        reactor.callLater(0.05, self._whenParentGone, then, tries - 1)

    def _forwardCancel(self, pid: int, secret: int) -> bool:
        channel = self.channel
        if channel is None or channel.closed:
            return False
        channel.send(CANCEL, _CANCEL.pack(pid, secret))
        return True

    def _lost(self) -> None:
        self.channel = None
        if self.top.pools.forward_cancel == self._forwardCancel:
            self.top.pools.forward_cancel = None

    def close(self) -> None:
        channel = self.channel
        if channel is not None:
            channel.close()


def install_signal_handlers(top) -> Dict[int, object]:
    """
    SIGUSR2: upgrade.  SIGINT: upgrade when stdin is not a terminal (daemon mode, systemd,
    nohup), safe shutdown when it is (Ctrl-C in a terminal).  Returns the previous handlers.
    (SIGTERM and SIGQUIT: L{pgdoorman.service.PgDoormanService._installTermHandlers}.)
    """
    old: Dict[int, object] = {}

    def usr2(signum, frame):
        reactor.callFromThread(top.upgrade, "SIGUSR2")

    def interrupt(signum, frame):
        reactor.callFromThread(_interrupted, top)

    for sig, handler in ((signal.SIGUSR2, usr2), (signal.SIGINT, interrupt)):
        try:
            old[sig] = signal.signal(sig, handler)
        except (ValueError, OSError, AttributeError):
            pass  # not the main thread
    return old


def _interrupted(top) -> None:
    """
    SIGINT: in a terminal, PgBouncer's "safe shutdown" (let transactions finish, then exit),
    and a second one while shutting down stops at once; without a terminal (daemon, systemd),
    PgDoorman's zero-downtime upgrade.
    """
    if top.shutting_down:
        top.shutdown_now("SIGINT during shutdown")
        return
    try:
        tty = os.isatty(0)
    except OSError:
        tty = False
    if tty:
        top.log.info("SIGINT received with a terminal: shutting down once transactions "
                     "finish (a second SIGINT stops at once)")
        top.shutdown(wait_for="servers")
    else:
        top.upgrade("SIGINT without a terminal")
