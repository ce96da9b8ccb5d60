"""
Worker processes sharing one pool budget: C{general.worker_threads: N} (or C{auto}, one per
core), PgDoorman's multi-core pooler in processes.

With N > 1 the C{pgdoorman} process becomes the B{supervisor} (L{Supervisor}): it binds the
client port (and the Unix socket) and starts N B{workers}, each the ordinary pooler
(L{pgdoorman.service.PgDoormanService}) running on an inherited copy of the listening sockets,
so all accept and the kernel spreads the clients.  Each worker talks to the supervisor over one
Unix socketpair (frames of L{pgdoorman.upgrade.Channel}):

  - B{budget}: pool_size is a budget over all workers (L{pgdoorman.budget}); a worker asks for a
    slot before each new server connection and gives it back when the connection is gone; a
    worker with clients waiting gets slots from idle connections of the others;
  - B{cancel}: the BackendKeyData pid a worker gives its clients carries the worker's tag in its
    top byte (L{tag}); a CancelRequest that lands on another worker is passed on through the
    supervisor to the one that has the client;
  - B{SHOW} and B{/metrics}: the supervisor serves /metrics itself, summing every worker's
    samples (L{merge_metrics}); a worker serving an admin SHOW asks the others for their rows
    and merges them (L{gather_show});
  - B{signals}: the supervisor passes SIGHUP on to every worker and tells them to stop on
    SIGTERM, SIGQUIT and SIGINT (over the channel: under systemd they get the same SIGTERM
    themselves), replaces a worker that dies (its slots are freed with it), and answers
    SIGUSR2 (and a worker's UPGRADE) with a rolling replacement: new workers from the
    installed code start first, then each old one stops accepting and leaves once its clients
    have; the admin console's RELOAD, SHUTDOWN, PAUSE, RESUME, RECONNECT and KILL reach every
    worker the same way.

C{worker_threads: 1} (the default) is today's single process: nothing here is imported and the
pools have no budget to ask.  The supervisor stays the main process (systemd's MAINPID, the pid
file): it alone notifies systemd.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import time
from typing import Dict, List, Optional

from twisted.internet import defer, reactor
from twisted.logger import Logger

from pgdoorman import budget as _budget
from pgdoorman.upgrade import Channel

__all__ = ["count", "is_worker", "inherited", "supervise", "Supervisor", "WorkerLink",
           "merge_metrics", "tag", "worker_of"]

log = Logger(namespace="pgdoorman.workers")

#: The environment variable a worker finds its index, channel and sockets in.
ENV = "PGDOORMAN_WORKER"
#: How many workers a tag can name (the top byte of a positive pid, 0 meaning none).
MAX_WORKERS = 126

HELLO = b"H"       # worker -> supervisor: {"index", "pid"}: I accept clients
CANCEL = b"K"      # both ways: a CancelRequest (pid, secret) for another worker's client
UPGRADE = b"U"     # worker -> supervisor: the admin console asked for UPGRADE
ASK = b"Q"         # worker -> supervisor -> workers: {"id", "show"}: your rows, please
METRICS = b"M"     # supervisor -> worker: {"id"}: your /metrics text, please
REPLY = b"r"       # the answer to ASK or METRICS: {"id", ...}
ACTION = b"X"      # worker -> supervisor -> the other workers: {"action", "wait_for"}: the
                   # admin console's RELOAD or SHUTDOWN, done everywhere

_CANCEL = struct.Struct("!ii")


def count(config) -> int:
    """The number of workers C{config} asks for (C{auto}: the cores this process may use)."""
    n = config.general.worker_threads
    if n == "auto":
        try:
            n = len(os.sched_getaffinity(0))
        except (AttributeError, OSError):
            n = os.cpu_count() or 1
    return max(1, min(int(n or 1), MAX_WORKERS))


def is_worker() -> bool:
    return bool(os.environ.get(ENV))


def tag(index: int) -> int:
    """The bits worker C{index} sets in the BackendKeyData pids it gives out."""
    return (index + 1) << 24


def worker_of(pid: int) -> Optional[int]:
    """The worker index a BackendKeyData pid names, or None."""
    t = (pid >> 24) & 0x7F
    return t - 1 if t else None


# -- the worker's side ------------------------------------------------------------------------

class WorkerInfo:
    """What L{ENV} says: this worker's index, its channel fd and the listening (fd, family)."""

    def __init__(self, index: int, channel: int, listeners: Dict[str, tuple]):
        self.index = index
        self.channel = channel
        self.listeners = listeners


_info: Optional[WorkerInfo] = None
_info_read = False


def inherited() -> Optional[WorkerInfo]:
    """This process's L{WorkerInfo} when a supervisor started it, else None (read once)."""
    global _info, _info_read
    if not _info_read:
        _info_read = True
        text = os.environ.pop(ENV, None)
        if text:
            index = channel = None
            listeners: Dict[str, tuple] = {}
            for part in text.split(","):
                name, _, value = part.partition("=")
                if name == "index":
                    index = int(value)
                elif name == "channel":
                    channel = int(value)
                else:
                    fd, _, family = value.partition(":")
                    listeners[name] = (int(fd), int(family))
            if index is None or channel is None:
                raise ValueError("%s is malformed: %r" % (ENV, text))
            _info = WorkerInfo(index, channel, listeners)
    return _info


class WorkerLink:
    """
    A worker's line to the supervisor, owned by L{pgdoorman.service.PgDoormanService}: gives
    the pools their L{pgdoorman.budget.BudgetClient}, the cancel tag and the cancel
    forwarding, and answers the supervisor's questions.
    """

    log = Logger()

    def __init__(self, top, info: WorkerInfo):
        self.top = top
        self.info = info
        self.index = info.index
        self.channel: Optional[Channel] = None
        self._asks: Dict[int, defer.Deferred] = {}
        self._ids = 0
        self._registry = None

    def start(self) -> None:
        sock = socket.socket(fileno=self.info.channel)
        self.channel = Channel(sock, self._message, self._lost)
        self.channel.start()
        pools = self.top.pools
        pools.budget = _budget.BudgetClient(pools, self.send)
        pools.worker_tag = tag(self.index)
        pools.forward_cancel = self._forwardCancel
        self.send(HELLO, json.dumps({"index": self.index, "pid": os.getpid()}).encode())

    def send(self, kind: bytes, payload: bytes = b"") -> None:
        if self.channel is not None:
            self.channel.send(kind, payload)

    def _forwardCancel(self, pid: int, secret: int) -> bool:
        owner = worker_of(pid)
        if owner is None or owner == self.index or self.channel is None:
            return False
        self.log.debug("cancel request passed on to worker {owner}", owner=owner)
        self.send(CANCEL, _CANCEL.pack(pid, secret))
        return True

    def _message(self, kind: bytes, payload: bytes, fds: List[int]) -> None:
        for fd in fds:
            os.close(fd)
        pools = self.top.pools
        if pools.budget is not None and pools.budget.message(kind, payload):
            return
        if kind == CANCEL:
            pid, secret = _CANCEL.unpack(payload)
            client = pools.cancel_keys.get((pid, secret))
            if client is None:
                self.log.info("cancel request with unknown key ignored")
            elif client.server is not None:
                client.server.send_cancel()
        elif kind == METRICS:
            d = json.loads(payload.decode())
            self._reply(d["id"], text=self._metrics())
        elif kind == ASK:
            d = json.loads(payload.decode())
            if d["show"] == "pause":
                ident = d["id"]
                pools.pause(d.get("db")).addBoth(lambda _: self._reply(ident, rows=[]))
            else:
                self._reply(d["id"], **local_show(pools, d["show"]))
        elif kind == ACTION:
            d = json.loads(payload.decode())
            if d["action"] == "reload":
                self.top.reload_config()
            elif d["action"] == "shutdown":
                self.top.shutdown(d.get("wait_for") or "servers")
            elif d["action"] == "now":
                self.top.shutdown_now(d.get("why") or "the supervisor stops")
            elif d["action"] == "reconnect":
                pools.reconnect(d.get("db"))
            elif d["action"] == "kill":
                pools.kill(d["db"])
            elif d["action"] == "resume":
                if pools.is_paused(d.get("db")) or (d.get("db") is None
                                                    and pools.paused_databases):
                    pools.resume(d.get("db"))
        elif kind == REPLY:
            d = json.loads(payload.decode())
            waiter = self._asks.pop(d["id"], None)
            if waiter is not None:
                waiter.callback(d.get("results", []))

    def _reply(self, ident: int, **fields) -> None:
        fields["id"] = ident
        self.send(REPLY, json.dumps(fields, default=str).encode())

    def _metrics(self) -> str:
        from prometheus_client import generate_latest

        from pgdoorman.metrics import make_registry
        if self._registry is None:
            self._registry = make_registry(self.top.pools)
        return generate_latest(self._registry).decode("utf-8")

    def ask_others(self, show: str, timeout: float = 3.0, **fields) -> defer.Deferred:
        """
        The other workers' C{SHOW show} rows, as a list of {"columns", "rows"}; with
        C{show="pause"}, fires once the others' PAUSE (of C{fields["db"]}) is done.
        """
        self._ids += 1
        ident = self._ids
        d = defer.Deferred()
        self._asks[ident] = d
        self.send(ASK, json.dumps(dict(fields, id=ident, show=show,
                                       timeout=timeout)).encode())

        def expire():
            waiter = self._asks.pop(ident, None)
            if waiter is not None:
                waiter.callback([])

        timer = reactor.callLater(timeout, expire)
        d.addBoth(lambda r: (timer.cancel() if timer.active() else None, r)[1])
        return d

    def upgrade(self, why: str) -> defer.Deferred:
        self.send(UPGRADE, json.dumps({"why": why}).encode())
        return defer.succeed((True, "rolling upgrade of the workers started by the supervisor"))

    def tell_others(self, action: str, wait_for: str = "", db: Optional[str] = None) -> None:
        """
        The admin console's RELOAD, SHUTDOWN, RECONNECT, KILL or RESUME here: the other
        workers do it too.
        """
        self.send(ACTION, json.dumps({"action": action, "wait_for": wait_for,
                                      "db": db}).encode())

    def _lost(self) -> None:
        self.channel = None
        top = self.top
        if not top.shutting_down:
            self.log.error("the supervisor is gone: worker {index} stops", index=self.index)
            top.shutdown_now("supervisor gone")


# -- SHOW over all workers --------------------------------------------------------------------

#: SHOW commands whose rows are merged over the workers, and the columns that make a row's key
#: (rows of the same key are summed); None: the rows are put together.
GATHERED = {
    "pools": ("database", "user"), "pools_extended": ("database", "user"),
    "stats": ("database",), "stats_totals": ("database",), "stats_averages": ("database",),
    "totals": ("name",), "lists": ("list",),
    "clients": None, "servers": None, "sockets": None, "connections": None,
}
#: Columns that are not counts: the largest value over the workers stands.
_MAX_COLUMNS = {"maxwait", "maxwait_us", "pool_size", "paused", "draining", "xact_p50_us",
                "xact_p95_us", "xact_p99_us"}


def local_show(pools, show: str) -> dict:
    from pgdoorman.admin import AdminConsole
    result = getattr(AdminConsole(pools), "show_" + show)()
    return {"columns": [list(c) for c in result.columns or ()],
            "rows": [list(r) for r in result.rows]}


def merge_rows(show: str, columns: List, parts: List[List[list]]) -> List[list]:
    """Rows of the same SHOW from every worker, as one answer (see L{GATHERED})."""
    key_names = GATHERED.get(show)
    if key_names is None:
        return [row for rows in parts for row in rows]
    names = [c[0] for c in columns]
    kinds = [c[1] for c in columns]
    keys = [names.index(k) for k in key_names if k in names]
    merged: Dict[tuple, list] = {}
    for rows in parts:
        for row in rows:
            k = tuple(row[i] for i in keys)
            have = merged.get(k)
            if have is None:
                merged[k] = list(row)
                continue
            for i, value in enumerate(row):
                if i in keys or kinds[i] == "s" or not isinstance(value, (int, float)) \
                        or isinstance(value, bool) or not isinstance(have[i], (int, float)):
                    continue
                if names[i] in _MAX_COLUMNS:
                    have[i] = max(have[i], value)
                else:
                    have[i] = have[i] + value
    return list(merged.values())


def gather_show(console, show: str) -> defer.Deferred:
    """An admin SHOW in a worker: its own rows and the other workers', merged."""
    from pgdoorman.admin import Result
    link = console.top.worker
    mine = getattr(console, "show_" + show)()

    def merge(others):
        parts = [mine.rows] + [o.get("rows", []) for o in others]
        return Result(mine.tag, mine.columns, merge_rows(show, mine.columns or [], parts),
                      mine.notices)

    return link.ask_others(show).addCallback(merge)


# -- /metrics over all workers ----------------------------------------------------------------

#: Samples that are not counts: the largest (or, for start times, smallest) value stands.
_METRICS_MAX = ("pg_doorman_pool_size", "pg_doorman_pools_paused",
                "pg_doorman_pools_maxwait_seconds", "pg_doorman_pools_avg_wait_time",
                "pg_doorman_pools_queries_percentile", "pg_doorman_pools_transactions_percentile",
                "pg_doorman_pools_wait_time_percentile", "pg_doorman_paused", "pg_doorman_info",
                "pg_doorman_reloads", "pg_doorman_pool_coordinator{", "process_max_fds")
_METRICS_MIN = ("process_start_time_seconds",)


def merge_metrics(texts: List[str], extra: str = "") -> str:
    """
    Prometheus text from every worker as one exposition: a sample present in several (same
    name and labels) is summed, except gauges that are settings, maxima or percentiles
    (L{_METRICS_MAX}).  Percentiles over workers are thus an upper bound.
    """
    order: List[str] = []
    values: Dict[str, float] = {}
    comments = set()
    for text in texts:
        for line in text.splitlines():
            if not line:
                continue
            if line.startswith("#"):
                if line not in comments:
                    comments.add(line)
                    order.append(line)
                continue
            series, _, value = line.rpartition(" ")
            try:
                v = float(value)
            except ValueError:
                continue
            if series not in values:
                values[series] = v
                order.append(series)
            elif series.startswith(_METRICS_MAX) and \
                    not series.startswith("pg_doorman_pool_coordinator_total"):
                values[series] = max(values[series], v)
            elif series.startswith(_METRICS_MIN):
                values[series] = min(values[series], v)
            else:
                values[series] += v
    out = []
    for item in order:
        if item.startswith("#"):
            out.append(item)
            continue
        v = values[item]
        out.append("%s %s" % (item, int(v) if v == int(v) and abs(v) < 1e15 else repr(v)))
    return "\n".join(out) + "\n" + extra


# -- the supervisor ---------------------------------------------------------------------------

class _Worker:
    def __init__(self, index: int, proc: subprocess.Popen, started: float):
        self.index = index
        self.proc = proc
        self.started = started
        self.channel: Optional[Channel] = None
        self.ready = False
        #: being replaced (rolling upgrade) or stopped: not started again when it exits.
        self.retiring = False


class Supervisor:
    """
    The main process with worker_threads > 1: holds the listening sockets, the budget broker
    and the workers (see the module docstring).

    @param argv: the command line of a worker (the C{pgdoorman} command with the same config).
    @param listeners: name -> listening socket (C{listen}, and C{unix} with unix_socket_dir).
    """

    log = Logger()

    def __init__(self, config, n: int, argv: List[str], listeners: Dict[str, socket.socket]):
        self.config = config
        self.n = n
        self.argv = argv
        self.listeners = listeners
        self.workers: Dict[int, _Worker] = {}
        #: workers whose channel closed and whose process is not reaped yet.
        self.exiting: set = set()
        self.broker = _budget.Broker(self._send)
        self.shutting_down = False
        self.on_ready: List = []
        self._asks: Dict[int, dict] = {}
        self._ids = 0
        self._tick = None
        self.respawns = 0

    # -- workers --------------------------------------------------------------------------------

    def start(self) -> None:
        for i in range(self.n):
            self.spawn(i)
        from twisted.internet import task
        self._tick = task.LoopingCall(self.broker.tick)
        self._tick.start(0.25, now=False)

    def _freeIndex(self) -> int:
        for i in range(MAX_WORKERS):
            if i not in self.workers:
                return i
        raise RuntimeError("no free worker index")

    def spawn(self, index: int) -> _Worker:
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        parts = ["index=%d" % index, "channel=%d" % child.fileno()]
        fds = [child.fileno()]
        for name, sock in self.listeners.items():
            parts.append("%s=%d:%d" % (name, sock.fileno(), sock.family))
            fds.append(sock.fileno())
        env = dict(os.environ)
        env[ENV] = ",".join(parts)
        env.pop("NOTIFY_SOCKET", None)  # the supervisor is the main process for systemd
        proc = subprocess.Popen(self.argv, pass_fds=fds, env=env, start_new_session=True)
        child.close()
        w = _Worker(index, proc, time.monotonic())
        self.workers[index] = w
        w.channel = Channel(parent, lambda kind, payload, got: self._message(w, kind, payload,
                                                                            got),
                            lambda: self._lost(w))
        w.channel.start()
        self.log.info("worker {index} started (pid {pid})", index=index, pid=proc.pid)
        return w

    def _send(self, index: int, kind: bytes, payload: bytes) -> None:
        w = self.workers.get(index)
        if w is not None and w.channel is not None:
            w.channel.send(kind, payload)

    def _message(self, w: _Worker, kind: bytes, payload: bytes, fds: List[int]) -> None:
        for fd in fds:
            os.close(fd)
        if self.broker.message(w.index, kind, payload):
            return
        if kind == HELLO:
            w.ready = True
            self._checkReady()
        elif kind == CANCEL:
            pid, _secret = _CANCEL.unpack(payload)
            self._send(worker_of(pid) if worker_of(pid) is not None else -1, CANCEL, payload)
        elif kind == UPGRADE:
            self.upgrade(json.loads(payload.decode()).get("why", "UPGRADE"))
        elif kind == ACTION:
            d = json.loads(payload.decode())
            if d.get("action") == "shutdown":
                self._stopAccepting("SHUTDOWN from the admin console")
            for other in list(self.workers.values()):
                if other is not w and other.channel is not None:
                    other.channel.send(ACTION, payload)
        elif kind == ASK:
            d = json.loads(payload.decode())
            self._gather(w, d)
        elif kind == REPLY:
            d = json.loads(payload.decode())
            ask = self._asks.get(d["id"])
            if ask is not None:
                ask["results"].append(d)
                ask["pending"].discard(w.index)
                if not ask["pending"]:
                    self._answered(d["id"])

    def _checkReady(self) -> None:
        if self.on_ready and all(w.ready for w in self.workers.values()):
            callbacks, self.on_ready = self.on_ready, []
            for f in callbacks:
                f()

    def _lost(self, w: _Worker) -> None:
        """A worker's channel closed: it exited (or will): free its slots, start another."""
        w.channel = None
        if self.workers.get(w.index) is w:
            del self.workers[w.index]
        self.broker.worker_gone(w.index)
        for ident in list(self._asks):
            ask = self._asks[ident]
            if w.index in ask["pending"]:
                ask["pending"].discard(w.index)
                if not ask["pending"]:
                    self._answered(ident)
        self.exiting.add(w)
        self._reap(w)
        if self.shutting_down or w.retiring:
            return
        quick = time.monotonic() - w.started < 2.0
        self.log.warn("worker {index} (pid {pid}) exited: starting another{later}",
                      index=w.index, pid=w.proc.pid, later=" in 1s" if quick else "")
        self.respawns += 1
        reactor.callLater(1.0 if quick else 0.0, self._respawn, w.index)

    def _respawn(self, index: int) -> None:
        if self.shutting_down or index in self.workers:
            return
        self.spawn(index)

    def _reap(self, w: _Worker, tries: int = 400) -> None:
        """Wait for an exiting worker's process; the supervisor exits after the last one."""
        rc = w.proc.poll()
        if rc is None and tries:
            reactor.callLater(0.02, self._reap, w, tries - 1)
            return
        if rc is None:
            w.proc.kill()
            w.proc.wait()
        elif rc != 0:
            self.log.warn("worker {index} (pid {pid}) exit status {rc}", index=w.index,
                          pid=w.proc.pid, rc=rc)
        self.exiting.discard(w)
        self._exitIfDone()

    def _exitIfDone(self) -> None:
        if self.shutting_down and not self.workers and not self.exiting:
            self.log.info("every worker has stopped: the supervisor exits")
            _stop()

    # -- SHOW and /metrics ----------------------------------------------------------------------

    def _ask(self, kind: bytes, fields: dict, exclude=None, timeout: float = 2.0
             ) -> defer.Deferred:
        self._ids += 1
        ident = self._ids
        targets = [w for w in self.workers.values()
                   if w is not exclude and w.channel is not None and w.ready]
        d = defer.Deferred()
        ask = self._asks[ident] = {"results": [], "pending": {w.index for w in targets},
                                   "deferred": d}
        payload = dict(fields, id=ident)
        for w in targets:
            w.channel.send(kind, json.dumps(payload).encode())
        ask["timer"] = reactor.callLater(timeout, self._answered, ident)
        if not targets:
            self._answered(ident)
        return d

    def _answered(self, ident: int) -> None:
        ask = self._asks.pop(ident, None)
        if ask is None:
            return
        timer = ask.get("timer")
        if timer is not None and timer.active():
            timer.cancel()
        ask["deferred"].callback(ask["results"])

    def _gather(self, w: _Worker, d: dict) -> None:
        ident = d["id"]

        def answer(results):
            self._send(w.index, REPLY, json.dumps({"id": ident, "results": results},
                                                  default=str).encode())

        fields = {k: v for k, v in d.items() if k not in ("id", "timeout")}
        self._ask(ASK, fields, exclude=w, timeout=float(d.get("timeout") or 2.0)
                  ).addCallback(answer)

    def metrics(self) -> defer.Deferred:
        """Every worker's /metrics, merged (L{merge_metrics})."""
        def merge(results):
            extra = ("# HELP pg_doorman_workers Worker processes running\n"
                     "# TYPE pg_doorman_workers gauge\npg_doorman_workers %d\n"
                     "# HELP pg_doorman_worker_restarts_total Workers started again after "
                     "dying\n# TYPE pg_doorman_worker_restarts_total counter\n"
                     "pg_doorman_worker_restarts_total %d\n"
                     % (len(results), self.respawns))
            return merge_metrics([r.get("text", "") for r in results], extra)
        return self._ask(METRICS, {}).addCallback(merge)

    # -- signals --------------------------------------------------------------------------------

    def forward(self, signum: int) -> None:
        for w in list(self.workers.values()):
            try:
                os.kill(w.proc.pid, signum)
            except OSError:
                pass

    def reload(self) -> None:
        from pgdoorman import config as _config
        from pgdoorman.service import _monotonic_usec, _notify, reopen_logs
        reopen_logs()
        _notify("RELOADING=1", _monotonic_usec())
        try:
            self.config = _config.load(self.config.path)
        except Exception as e:
            self.log.error("reload: {error} (the workers keep their configuration too)",
                           error=e)
        self.forward(signal.SIGHUP)
        self._resize(count(self.config))
        _notify("READY=1", "STATUS=configuration reloaded")

    def _resize(self, n: int) -> None:
        """worker_threads changed by a reload: start the extra workers, or retire some."""
        live = sorted((w for w in self.workers.values() if not w.retiring),
                      key=lambda w: w.index)
        if n == len(live) or self.shutting_down:
            return
        self.log.info("worker_threads is now {n} (was {old})", n=n, old=len(live))
        self.n = n
        for _ in range(n - len(live)):
            self.spawn(self._freeIndex())
        for w in live[n:]:
            w.retiring = True  # leaves once its clients have; not started again
            if w.channel is not None:
                w.channel.send(ACTION, json.dumps({"action": "shutdown",
                                                   "wait_for": "clients"}).encode())

    def terminate(self, signum: int) -> None:
        """
        SIGTERM, SIGQUIT, SIGINT in a terminal: every worker shuts down as the pooler does on
        that signal, then this process exits.  Told over the channel, not signalled: under
        systemd (KillMode=control-group) the workers get the same SIGTERM directly, and a
        forwarded second one would turn the safe shutdown into an immediate one.
        """
        first = not self.shutting_down
        self._stopAccepting("signal %d" % signum)
        if signum == signal.SIGQUIT or not first:
            self._tellAll("now", why="signal %d to the supervisor" % signum)
        else:
            self._tellAll("shutdown", wait_for="clients" if signum == signal.SIGTERM
                          else "servers")
        self._exitIfDone()

    def _tellAll(self, action: str, **fields) -> None:
        payload = json.dumps(dict(fields, action=action)).encode()
        for w in list(self.workers.values()):
            if w.channel is not None:
                w.channel.send(ACTION, payload)

    def _stopAccepting(self, why: str) -> None:
        if self.shutting_down:
            return
        self.shutting_down = True
        from pgdoorman.service import _notify
        _notify("STOPPING=1")
        self.log.info("{why}: stopping the workers", why=why)
        for sock in self.listeners.values():
            try:
                sock.close()
            except OSError:
                pass
        limit = (self.config.general.shutdown_timeout or 0) + 10.0
        reactor.callLater(limit, self._killAll)

    def _killAll(self) -> None:
        for w in list(self.workers.values()):
            self.log.warn("worker {index} (pid {pid}) did not stop: killing it", index=w.index,
                          pid=w.proc.pid)
            try:
                w.proc.kill()
            except OSError:
                pass

    def upgrade(self, why: str) -> None:
        """
        Rolling upgrade: a new worker (the installed code) for each running one; once the new
        ones accept, the old ones stop accepting and leave when their clients have (SIGTERM).
        """
        if self.shutting_down:
            return
        old = [w for w in self.workers.values() if not w.retiring]
        self.log.info("{why}: starting {n} new workers, then retiring the old ones", why=why,
                      n=len(old))
        for w in old:
            w.retiring = True
        fresh = []
        for _ in old:
            fresh.append(self.spawn(self._freeIndex()))

        def retire():
            for w in old:
                try:
                    os.kill(w.proc.pid, signal.SIGTERM)
                except OSError:
                    pass

        def check(tries=600):
            if all(w.ready for w in fresh) or not tries:
                retire()
            else:
                reactor.callLater(0.05, check, tries - 1)

        check()

    def install_signals(self) -> None:
        def later(f, *a):
            return lambda signum, frame: reactor.callFromThread(f, *a)

        def interrupt():
            try:
                tty = os.isatty(0)
            except OSError:
                tty = False
            if tty or self.shutting_down:
                self.terminate(signal.SIGINT)
            else:
                self.upgrade("SIGINT without a terminal")

        handlers = {signal.SIGHUP: later(self.reload),
                    signal.SIGTERM: later(self.terminate, signal.SIGTERM),
                    signal.SIGQUIT: later(self.terminate, signal.SIGQUIT),
                    signal.SIGINT: later(interrupt),
                    signal.SIGUSR2: later(self.upgrade, "SIGUSR2")}
        for sig, handler in handlers.items():
            signal.signal(sig, handler)


def _stop() -> None:
    if reactor.running:
        reactor.callLater(0, reactor.stop)


def _listen(config) -> Dict[str, socket.socket]:
    """Bind what the workers will accept on; raises L{pgdoorman.cli.StartupError}."""
    from pgdoorman.cli import StartupError
    g = config.general
    out: Dict[str, socket.socket] = {}
    try:
        infos = socket.getaddrinfo(g.host or None, g.port, 0, socket.SOCK_STREAM, 0,
                                   socket.AI_PASSIVE)
        family, _type, _proto, _name, addr = infos[0]
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
        sock.listen(g.backlog or 1024)
    except OSError as e:
        reason = "the port is already in use" if e.errno == errno.EADDRINUSE else e.strerror
        raise StartupError("cannot listen on %s port %s: %s" % (g.host, g.port, reason))
    sock.set_inheritable(True)
    sock.setblocking(False)  # shared by the workers' reactors (adoptStreamPort wants it so)
    out["listen"] = sock
    if g.unix_socket_dir:
        from pgdoorman.unixsocket import _remove_stale, socket_path
        path = socket_path(g.unix_socket_dir, g.port)
        _remove_stale(path)
        unix = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            unix.bind(path)
            os.chmod(path, g.unix_socket_mode)
            unix.listen(g.backlog or 1024)
        except OSError as e:
            raise StartupError("cannot listen on %s: %s" % (path, e.strerror))
        unix.set_inheritable(True)
        unix.setblocking(False)
        out["unix"] = unix
    return out


def worker_argv(config, log_level: str, log_format: str, log_file: Optional[str]
                ) -> List[str]:
    argv = [sys.executable, "-m", "pgdoorman", "-l", log_level, "-F", log_format]
    if log_file:
        argv += ["--log-file", log_file]
    return argv + [os.path.abspath(config.path)]


def supervise(config, log_level: str = "info", log_format: str = "text",
              log_file: Optional[str] = None, syslog_name: Optional[str] = None,
              ready=None) -> None:
    """
    Run the supervisor until the workers have stopped (what L{pgdoorman.cli.run} does when
    worker_threads > 1).
    """
    from twisted.web import resource, server

    from pgdoorman import __version__, logs, systemd
    n = count(config)
    listeners = _listen(config)
    logs.start(log_format, log_level, path=log_file, syslog_name=syslog_name)
    if syslog_name and not log_file:
        os.environ["PGDOORMAN_SYSLOG"] = syslog_name
    sup = Supervisor(config, n, worker_argv(config, log_level, log_format, log_file),
                     listeners)
    if config.prometheus.enabled:
        class Metrics(resource.Resource):
            isLeaf = True

            def render_GET(self, request):
                request.setHeader(b"Content-Type", b"text/plain; version=0.0.4; charset=utf-8")

                def done(text):
                    request.write(text.encode("utf-8"))
                    request.finish()

                sup.metrics().addCallback(done)
                return server.NOT_DONE_YET

        root = resource.Resource()
        root.putChild(b"metrics", Metrics())
        site = server.Site(root)
        site.noisy = False
        try:
            reactor.listenTCP(config.prometheus.port, site, interface=config.prometheus.host)
        except Exception as e:
            from pgdoorman.cli import StartupError
            raise StartupError("cannot listen on %s port %s for /metrics: %s"
                               % (config.prometheus.host, config.prometheus.port, e))

    def started():
        log.info("pgdoorman {version} listening on {host}:{port} with {n} workers, config "
                 "{path}", version=__version__, host=config.general.host,
                 port=config.general.port, n=n, path=config.path)
        if systemd.enabled():
            systemd.notify("READY=1", MAINPID=os.getpid(),
                           STATUS="%d workers" % len(sup.workers))
        if ready is not None:
            ready()

    sup.on_ready.append(started)
    reactor.callWhenRunning(sup.install_signals)
    reactor.callWhenRunning(sup.start)
    reactor.run()
