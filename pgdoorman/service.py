"""
Putting the pooler together: the pool service, the listening port and the metrics endpoint
under one MultiService.

twistd (through the plugin) and the C{pgdoorman} command both build the same service here, so
the two ways of running behave the same: SIGHUP (and the admin console's RELOAD) re-reads the
config file and reopens log files, SHUTDOWN drains and exits.
"""

from __future__ import annotations

import os
import signal
import sys
from typing import Tuple

from twisted.application import internet, service
from twisted.internet import defer, reactor
from twisted.logger import Logger

from pgdoorman.client import ClientFactory
from pgdoorman.pool import PoolService


def _notify(*lines: str) -> None:
    """Tell systemd (C{Type=notify-reload}) about a reload, when pgdoorman.systemd exists."""
    try:
        from pgdoorman import systemd
    except ImportError:
        return
    try:
        systemd.notify(*lines)
    except Exception:
        pass


def _monotonic_usec() -> str:
    try:
        from pgdoorman import systemd
        return systemd.monotonic_usec()
    except Exception:
        import time
        return "MONOTONIC_USEC=%d" % int(time.monotonic() * 1e6)


class PgDoormanService(service.MultiService):
    """
    The whole pooler.  C{pools} holds the shared pools; C{factory} accepts clients;
    C{metrics} serves /metrics when C{prometheus.enabled}.
    """

    log = Logger()

    def __init__(self, config):
        service.MultiService.__init__(self)
        self.config = config
        self.pools = PoolService(config)
        self.pools.setServiceParent(self)
        from pgdoorman.admin import AdminSession
        self.factory = ClientFactory(self.pools, AdminSession)
        g = config.general
        from pgdoorman import upgrade
        #: set when this process replaces a running one (zero-downtime upgrade): the listening
        #: sockets are inherited, not bound, and clients arrive over a socketpair.
        self.inherited = upgrade.inherited()
        listeners = self.inherited.listeners if self.inherited is not None else {}
        #: worker_threads > 1: this process is one of the workers (L{pgdoorman.workers}),
        #: on the supervisor's sockets; its line to the supervisor once started.
        self.worker = None
        self._worker_info = None
        if os.environ.get("PGDOORMAN_WORKER"):
            from pgdoorman import workers
            self._worker_info = workers.inherited()
            listeners = self._worker_info.listeners
        if "listen" in listeners:
            fd, family = listeners["listen"]
            self.listener = upgrade.InheritedPort(fd, family, self.factory)
        else:
            self.listener = internet.TCPServer(g.port, self.factory, backlog=g.backlog or 1024,
                                               interface=g.host)
        self.listener.setServiceParent(self)
        #: general.unix_socket_dir: the .s.PGSQL.<port> socket there, as PostgreSQL's.
        self.unix_listener = None
        if g.unix_socket_dir:
            from pgdoorman.unixsocket import UnixListener, socket_path
            path = socket_path(g.unix_socket_dir, g.port)
            if "unix" in listeners:
                fd, family = listeners["unix"]
                self.unix_listener = UnixListener(path, self.factory, g.unix_socket_mode,
                                                  g.backlog or 1024, inherited_fd=fd)
            else:
                self.unix_listener = UnixListener(path, self.factory, g.unix_socket_mode,
                                                  g.backlog or 1024)
            self.unix_listener.setServiceParent(self)
        self.metrics = None
        if config.prometheus.enabled and self._worker_info is None:  # workers: the supervisor
            from pgdoorman.metrics import make_metrics_service, make_site
            if "metrics" in listeners:
                fd, family = listeners["metrics"]
                self.metrics = upgrade.InheritedPort(fd, family, make_site(self.pools))
            else:
                self.metrics = make_metrics_service(self.pools, config.prometheus)
            self.metrics.setServiceParent(self)
        self.shutting_down = False
        self._old_sighup = None
        self._old_signals: dict = {}
        #: the upgrade in progress or done (L{pgdoorman.upgrade.Upgrade}), once asked for.
        self._upgrade = None
        #: set once the new process accepts: this process only hands clients over.
        self.upgrading = None
        self.takeover = None

    # -- lifecycle ----------------------------------------------------------------------------

    def startService(self):
        service.MultiService.startService(self)
        try:
            self._old_sighup = signal.signal(signal.SIGHUP, self._sighup)
        except (ValueError, OSError, AttributeError):
            pass  # not the main thread, or no SIGHUP on this platform
        from pgdoorman import upgrade
        self._old_signals = upgrade.install_signal_handlers(self)
        # The reactor installs its own SIGTERM handler when it starts running (after this,
        # for both twistd and the pgdoorman command): ours goes in once it runs.
        reactor.callWhenRunning(self._installTermHandlers)
        if self._worker_info is not None:
            from pgdoorman import workers
            if self.unix_listener is not None:
                self.unix_listener.keep_file()  # the supervisor's file, shared by all workers
            self.worker = workers.WorkerLink(self, self._worker_info)
            self.worker.start()
        if self.inherited is not None:
            # Listening on the inherited sockets now: tell the old process, take its clients.
            self.takeover = upgrade.Takeover(self, self.inherited)
            self.takeover.start()

    def _installTermHandlers(self) -> None:
        """
        SIGTERM and SIGQUIT as PgBouncer 1.23+ has them: SIGTERM is the "super safe"
        shutdown (no new clients, wait for the connected ones to leave, at most
        general.shutdown_timeout), a second SIGTERM during a shutdown is the immediate one;
        SIGQUIT is immediate.
        """
        if not self.running:
            return

        def term(signum, frame):
            reactor.callFromThread(self._terminated)

        def quit_(signum, frame):
            reactor.callFromThread(self.shutdown_now, "SIGQUIT")

        for sig, handler in ((signal.SIGTERM, term), (getattr(signal, "SIGQUIT", None), quit_)):
            if sig is None:
                continue
            try:
                previous = signal.signal(sig, handler)
            except (ValueError, OSError):
                continue
            self._old_signals.setdefault(sig, previous)

    def _terminated(self) -> None:
        if self.shutting_down:
            self.shutdown_now("second SIGTERM")
        else:
            self.log.info("SIGTERM received: no new clients, waiting for the connected ones "
                          "to leave (a second SIGTERM stops at once)")
            self.shutdown(wait_for="clients")

    def stopService(self):
        if self._old_sighup is not None:
            try:
                signal.signal(signal.SIGHUP, self._old_sighup)
            except (ValueError, OSError):
                pass
            self._old_sighup = None
        for sig, handler in self._old_signals.items():
            try:
                signal.signal(sig, handler)
            except (ValueError, OSError, TypeError):
                pass
        self._old_signals = {}
        return service.MultiService.stopService(self)

    # -- zero-downtime upgrade ------------------------------------------------------------------

    def upgrade(self, why: str = "") -> defer.Deferred:
        """
        Hand the port and the clients to a new process started from the installed code
        (L{pgdoorman.upgrade}).  Fires with (ok, message) once the new process accepts
        connections, or at once with the reason it was refused; this process keeps serving
        when it is refused.
        """
        if self.worker is not None:
            return self.worker.upgrade(why)  # the supervisor replaces every worker
        from pgdoorman import upgrade
        if self._upgrade is None or self._upgrade.state == "idle":
            self._upgrade = upgrade.Upgrade(self)
        return self._upgrade.start(why)

    def _sighup(self, signum, frame) -> None:
        reactor.callFromThread(self._reloadFromSignal)

    def _reloadFromSignal(self) -> None:
        self.log.info("SIGHUP received: reopening log files and reloading {path}",
                      path=self.config.path)
        reopen_logs()
        self.reload_config()
        if self.worker is None:  # workers: the supervisor's business
            self._upgradeIfInstalledChanged()

    def _upgradeIfInstalledChanged(self) -> None:
        """
        After a package upgrade, `systemctl reload` (SIGHUP) should also bring in the new code:
        ask the installed code for its version (in a subprocess, without blocking the reactor)
        and hand over to a new process when it differs from the one running.
        """
        from twisted.internet import utils

        from pgdoorman import __version__

        def compare(output: bytes) -> None:
            installed = output.decode("utf-8", "replace").strip().split()[-1:] or [""]
            if installed[0] and installed[0] != __version__:
                self.log.info("installed pgdoorman is {new}, running {old}: upgrading",
                              new=installed[0], old=__version__)
                self.upgrade("installed version %s differs from running %s"
                             % (installed[0], __version__))

        d = utils.getProcessOutput(sys.executable, ["-m", "pgdoorman", "--version"],
                                   env=dict(os.environ), errortoo=True)
        d.addCallbacks(compare, lambda f: self.log.warn(
            "could not ask the installed pgdoorman for its version: {why}",
            why=f.getErrorMessage()))

    # -- reload -------------------------------------------------------------------------------

    def reload_config(self) -> Tuple[bool, str]:
        """
        Re-read the config file and apply it (L{PoolService.reload}).  An invalid file is
        logged and the running configuration stays; returns (ok, error message).
        """
        from pgdoorman import config as _config
        path = self.config.path
        _notify("RELOADING=1", _monotonic_usec())
        try:
            try:
                new = _config.load(path)
            except _config.ConfigError as e:
                self.log.error("reload failed, keeping the running configuration: {error}",
                               error=str(e))
                return False, str(e)
            except OSError as e:
                self.log.error("reload failed, keeping the running configuration: {path}: "
                               "{error}", path=path, error=e.strerror)
                return False, "%s: %s" % (path, e.strerror)
            # What `pgdoorman -t` checks beyond the loader (TLS files readable and matching,
            # pg_hba rules parseable): a file that would fail at the first TLS handshake or
            # login is refused now, while the running configuration still works.
            from pgdoorman.cli import check_files
            problems = check_files(new)
            if problems:
                message = "; ".join("%s: %s: %s" % (path, key, problem)
                                    for key, problem in problems)
                self.log.error("reload failed, keeping the running configuration: {error}",
                               error=message)
                return False, message
            self._warnRestartOnly(new)
            self.config = new
            report = self.pools.reload(new)
            self.log.info("configuration reloaded from {path}: added {added}, changed "
                          "{changed}, replaced {replaced}, removed {removed}", path=path,
                          **{k: ", ".join(v) or "-" for k, v in report.items()})
            return True, ""
        finally:
            _notify("READY=1", "STATUS=configuration reloaded")

    def _warnRestartOnly(self, new) -> None:
        old = self.config
        for key in ("host", "port", "backlog", "unix_socket_dir", "unix_socket_mode") + \
                (("worker_threads",) if self.worker is None else ()):
            if getattr(old.general, key) != getattr(new.general, key):
                self.log.warn("general.{key} changed in the config file: it takes effect at "
                              "the next restart", key=key)
        if old.prometheus != new.prometheus:
            self.log.warn("the prometheus section changed: it takes effect at the next restart")

    # -- shutdown -----------------------------------------------------------------------------

    def shutdown(self, wait_for: str = "servers") -> defer.Deferred:
        """
        Stop accepting clients, wait, then stop the reactor; after general.shutdown_timeout
        it stops anyway.

        @param wait_for: C{"servers"} (the admin console's SHUTDOWN, SIGINT in a terminal,
            PgBouncer's SHUTDOWN WAIT_FOR_SERVERS): let running transactions finish (a PAUSE
            of everything), then exit.  C{"clients"} (SIGTERM, SHUTDOWN WAIT_FOR_CLIENTS):
            keep serving the connected clients until every one has left.
        """
        if self.shutting_down:
            return defer.succeed(None)
        self.shutting_down = True
        _notify("STOPPING=1")
        d = defer.maybeDeferred(self.listener.stopService)
        if self.unix_listener is not None:
            defer.maybeDeferred(self.unix_listener.stopService).addErrback(lambda f: None)
        if wait_for == "clients":
            self.log.info("shutting down: no new clients, waiting for the connected ones "
                          "to leave")
            done = self._clientsGone()
        else:
            self.log.info("shutting down: no new clients, waiting for transactions to finish")
            done = self.pools.pause(None)
        timeout = self.config.general.shutdown_timeout or 0
        timer = None

        def expire():
            if not done.called:
                self.log.warn("shutdown_timeout ({t}s) reached with {what} still there: "
                              "stopping anyway", t=timeout,
                              what="clients" if wait_for == "clients" else "transactions")
                done.callback(None)

        if timeout:
            timer = reactor.callLater(timeout, expire)

        def stop(_):
            if timer is not None and timer.active():
                timer.cancel()
            # Let the admin client's last answer go out first.
            reactor.callLater(0.05, _stopReactor)

        done.addBoth(stop)
        d.addErrback(lambda f: None)
        return done

    def _clientsGone(self) -> defer.Deferred:
        """Fires once no pool client is connected (checked ten times a second)."""
        from twisted.internet import task
        done = defer.Deferred()

        def check():
            if not self.pools.clients and not done.called:
                loop.stop()
                done.callback(None)

        loop = task.LoopingCall(check)
        loop.start(0.1, now=True).addErrback(lambda f: None)

        def stopLoop(result):
            if loop.running:
                loop.stop()
            return result

        done.addBoth(stopLoop)
        return done

    # -- SUSPEND ------------------------------------------------------------------------------

    #: set by SUSPEND, cleared by RESUME.
    suspended = False

    def suspend(self) -> defer.Deferred:
        """
        The admin console's SUSPEND, as close to PgBouncer's as pooling allows: stop accepting
        (new connections wait in the listen backlog until RESUME), hold every pool as PAUSE
        does (running transactions finish, then no query reaches a server), and wait until
        every socket's buffered output has gone out.  A client whose output has not drained
        within general.shutdown_timeout (PgBouncer's suspend_timeout) is disconnected.

        PgBouncer used SUSPEND before its online restart (C{-R}); here that is UPGRADE, which
        hands the live sockets over itself.
        """
        self.suspended = True
        port = getattr(self.listener, "_port", None)
        if port is not None:
            port.stopReading()
        unix = getattr(self.unix_listener, "_port", None)
        if unix is not None:
            unix.stopReading()
        self.log.info("SUSPEND: not accepting connections, pausing every pool")
        d = self.pools.pause(None)
        d.addCallback(lambda _: self._flushed())
        return d

    def _flushed(self) -> defer.Deferred:
        from twisted.internet import task
        timeout = self.config.general.shutdown_timeout or 10.0
        started = reactor.seconds()
        done = defer.Deferred()

        def transports():
            for pool in self.pools.all_pools():
                for client in pool.members:
                    yield client.transport
                for server in pool.servers:
                    yield server.transport

        def check():
            pending = [t for t in transports() if _buffered(t)]
            if pending and reactor.seconds() - started < timeout:
                return
            for t in pending:
                self.log.warn("SUSPEND: output to {peer} did not drain within {t}s: "
                              "disconnecting it", peer=t.getPeer(), t=timeout)
                t.abortConnection()
            loop.stop()
            done.callback(None)

        loop = task.LoopingCall(check)
        loop.start(0.02, now=True).addErrback(lambda f: None)
        return done

    def resume_suspended(self) -> None:
        """RESUME after SUSPEND: accept connections again (the pools resume with RESUME)."""
        if not self.suspended:
            return
        self.suspended = False
        port = getattr(self.listener, "_port", None)
        unix = getattr(self.unix_listener, "_port", None)
        for p in (port, unix):
            if p is not None and not self.shutting_down:
                p.startReading()
        self.log.info("RESUME: accepting connections again")

    def shutdown_now(self, why: str) -> None:
        """Immediate shutdown (SIGQUIT, a second SIGTERM or SIGINT): stop the reactor now."""
        self.log.info("{why}: shutting down now", why=why)
        self.shutting_down = True
        _stopReactor()


def _buffered(transport) -> int:
    """Bytes a transport still holds for its peer (Twisted's write buffer)."""
    try:
        return len(transport.dataBuffer) + transport._tempDataLen
    except AttributeError:
        return 0


def _stopReactor() -> None:
    if not reactor.running or getattr(reactor, "_stopped", False):
        return
    try:
        reactor.stop()
    except Exception:
        pass


def reopen_logs() -> None:
    """Reopen log files after logrotate: pgdoorman's own (L{pgdoorman.logs}) and twistd's."""
    try:
        from pgdoorman import logs
        logs.reopen()
    except Exception:
        pass
    try:
        from twisted.logger import globalLogPublisher
        for observer in _walkObservers(globalLogPublisher):
            out = getattr(observer, "_outFile", None)
            reopen = getattr(out, "reopen", None)
            if reopen is not None and hasattr(out, "path"):
                reopen()
    except Exception:
        pass


def _walkObservers(observer, depth: int = 0):
    if depth > 4 or observer is None:
        return
    yield observer
    for child in getattr(observer, "_observers", ()) or ():
        yield from _walkObservers(child, depth + 1)
    yield from _walkObservers(getattr(observer, "_observer", None), depth + 1)


def set_log_level(name: str) -> None:
    """The admin console's SET log_level; raises ValueError for an unknown level."""
    from pgdoorman import logs
    logs.set_level(name)


def get_log_level() -> str:
    try:
        from pgdoorman import logs
        return logs.get_level()
    except Exception:
        return "info"


def make_service(config) -> PgDoormanService:
    return PgDoormanService(config)


__all__ = ["PgDoormanService", "make_service", "reopen_logs", "set_log_level",
           "get_log_level"]
