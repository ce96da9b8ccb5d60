#!/usr/bin/env python3
"""
The relay's framing Scanner in process: ns (or CPU instructions) per message for the
pure-Python reference and the compiled one (pgdoorman/protocol/_cframing.pyx), on the message
streams a pooler relays.

    .venv/bin/python bench/scanner.py              # min-of-N wall time, ns per message
    .venv/bin/python bench/scanner.py --callgrind  # instructions per message (valgrind)
    .venv-pypy/bin/python bench/scanner.py --target 0.05   # PyPy: the reference only,
                                                   # unless _cframing was built for PyPy

Streams (each fed as it would arrive, to one Scanner, over and over; the inspect sets are the
real ones of pgdoorman.server and pgdoorman.relay):

  select-1row     server: RowDescription, DataRow, CommandComplete, ReadyForQuery (pgbench -S)
  select-100rows  server: RowDescription, DataRow x 100, CommandComplete, ReadyForQuery
  select-5000rows server: the same with 5000 rows of ~100 bytes, in 64 KB reads (Twisted's)
  extended        client: Parse, Bind, Describe, Execute, Sync (pgbench -M extended)
  prepared        client: Bind, Execute, Sync (pgbench -M prepared)

The handler is the smallest one that behaves like the real ones (None, or WHOLE while a
message is incomplete): the real handler's own work is the same with either scanner, so it is
left out of what is compared.

Timings are the best of --repeat runs (a busy machine only ever makes a run slower).
--callgrind runs one process under `valgrind --tool=callgrind` and reads the instructions
of each stream's loop alone (a dump at each boundary, marked by an os.getppid() call):
the count does not depend on what else runs on the machine.
"""

import argparse
import ast
import glob
import os
import platform
import re
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from pgdoorman.protocol import framing, messages as M  # noqa: E402
from pgdoorman.protocol.framing import WHOLE  # noqa: E402

try:
    from pgdoorman.protocol import _cframing
except ImportError as e:
    _cframing = None
    _CFRAMING_ERROR = str(e)

try:  # the real inspect sets (these modules import Twisted)
    from pgdoorman.relay import _INSPECT as CLIENT_INSPECT
    from pgdoorman.server import _INSPECT as SERVER_INSPECT
except ImportError:
    CLIENT_INSPECT = frozenset(range(256)) - frozenset(b"d")
    SERVER_INSPECT = frozenset(b"ZSE13G")


def _row_description(names):
    body = len(names).to_bytes(2, "big")
    for name in names:
        body += name.encode() + b"\x00" + bytes(18)  # table oid, attnum, type oid, size, ...
    return M.message(b"T", body)


def _data_row(values):
    body = len(values).to_bytes(2, "big")
    for v in values:
        body += len(v).to_bytes(4, "big") + v
    return M.message(b"D", body)


def _select(rows, width):
    cols = ["aid", "bid", "abalance", "filler"][:width]
    row = _data_row([b"%d" % (1000 + i) for i in range(width - 1)] + [b"x" * (84 // width)])
    return (_row_description(cols) + row * rows + M.command_complete("SELECT %d" % rows)
            + M.ready_for_query(b"I"))


def _cstr(s):
    return s + b"\x00"


def _parse(sql):
    return M.message(b"P", _cstr(b"") + _cstr(sql) + b"\x00\x01" + (23).to_bytes(4, "big"))


def _bind(value):
    return M.message(b"B", _cstr(b"") + _cstr(b"") + b"\x00\x00" + b"\x00\x01"
                     + len(value).to_bytes(4, "big") + value + b"\x00\x00")


def _describe():
    return M.message(b"D", b"P\x00")


def _execute():
    return M.message(b"E", b"\x00" + bytes(4))


SYNC = M.message(b"S")
SQL = b"SELECT abalance FROM pgbench_accounts WHERE aid = $1;"


def streams():
    """name -> (chunks fed in order, messages in them, inspect set)."""
    big = _select(5000, 4)
    return {
        "select-1row": ([_select(1, 1)], 4, SERVER_INSPECT),
        "select-100rows": ([_select(100, 3)], 103, SERVER_INSPECT),
        "select-5000rows": ([big[i:i + 65536] for i in range(0, len(big), 65536)], 5003,
                            SERVER_INSPECT),
        "extended": ([_parse(SQL) + _bind(b"12345") + _describe() + _execute() + SYNC], 5,
                     CLIENT_INSPECT),
        "prepared": ([_bind(b"12345") + _execute() + SYNC], 3, CLIENT_INSPECT),
    }


def _handle(code, data, pos, end, n):
    if end > n:
        return WHOLE
    return None


def implementations():
    impls = {"python": framing.PyScanner}
    if _cframing is not None:
        impls["compiled"] = _cframing.Scanner
    return impls


def _loop(scanner_class, chunks, inspect, loops):
    scanner = scanner_class(_handle, inspect)
    feed = scanner.feed
    for _ in range(loops):
        for chunk in chunks:
            feed(chunk)
    assert scanner.between_messages


def time_one(scanner_class, chunks, count, inspect, repeat, target=0.005):
    """Best ns per message over C{repeat} runs of about C{target} seconds each."""
    loops = 1
    while True:
        t0 = time.perf_counter()
        _loop(scanner_class, chunks, inspect, loops)
        took = time.perf_counter() - t0
        if took >= target / 4:
            break
        loops *= 4
    loops = max(1, int(loops * target / took))
    best = None
    for _ in range(repeat):
        t0 = time.perf_counter()
        _loop(scanner_class, chunks, inspect, loops)
        took = time.perf_counter() - t0
        best = took if best is None else min(best, took)
    return best * 1e9 / (loops * count)


def report(rows, unit, impls):
    names = list(impls)
    head = "| stream | msgs | " + " | ".join("%s %s/msg" % (n, unit) for n in names)
    if len(names) == 2:
        head += " | python/compiled"
    print(head + " |")
    print("|" + "---|" * (head.count("|") - 1))
    for name, count, figures in rows:
        cells = ["%.1f" % figures[n] for n in names]
        if len(names) == 2:
            cells.append("%.1fx" % (figures["python"] / figures["compiled"]))
        print("| %s | %d | %s |" % (name, count, " | ".join(cells)))


def header():
    print("# bench/scanner.py on %s %s, load average %s" % (
        platform.python_implementation(), platform.python_version(),
        " ".join(open("/proc/loadavg").read().split()[:3])))


def run_timed(args):
    impls = implementations()
    header()
    if "compiled" not in impls:
        print("# compiled scanner not importable here (%s): reference only" % _CFRAMING_ERROR)
    rows = []
    for name, (chunks, count, inspect) in streams().items():
        figures = {n: time_one(cls, chunks, count, inspect, args.repeat, args.target)
                   for n, cls in impls.items()}
        rows.append((name, count, figures))
    report(rows, "ns", impls)


def run_marked(args):
    """Under callgrind: each (stream, implementation) loop between two os.getppid() marks."""
    stretches = []  # what ran before each mark, in order (the first: start-up too)
    for name, (chunks, count, inspect) in streams().items():
        for impl, cls in implementations().items():
            _loop(cls, chunks, inspect, 1)  # warm: first-call work outside the count
            os.getppid()
            stretches.append("warm-up")
            _loop(cls, chunks, inspect, args.loops)
            os.getppid()
            stretches.append((name, impl))
    print(repr(stretches))


def run_callgrind(args):
    if not _which("valgrind"):
        sys.exit("bench/scanner.py --callgrind needs valgrind (apt-get install valgrind)")
    header()
    with tempfile.TemporaryDirectory() as d:
        out = subprocess.run(
            ["valgrind", "--tool=callgrind", "--dump-before=getppid", "--dump-instr=no",
             "--callgrind-out-file=" + os.path.join(d, "cg.out"),
             sys.executable, os.path.abspath(__file__), "--marked", "--loops", str(args.loops)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        if out.returncode:
            sys.exit("valgrind failed:\n" + out.stderr[-3000:])
        stretches = ast.literal_eval(out.stdout.strip().splitlines()[-1])
        # one dump at each mark (cg.out.1, .2, ...): the instructions since the one before
        dumps = sorted(glob.glob(os.path.join(d, "cg.out.*")),
                       key=lambda p: int(p.rsplit(".", 1)[1]))
        if len(dumps) < len(stretches):
            sys.exit("valgrind made %d dumps for %d stretches" % (len(dumps), len(stretches)))
        per = dict(zip(stretches, (_totals(p) for p in dumps)))
    impls = implementations()
    rows = []
    for name, (chunks, count, inspect) in streams().items():
        rows.append((name, count, {n: per[(name, n)] / (args.loops * count) for n in impls}))
    print("# instructions per message (valgrind --tool=callgrind, %d loops per stream)"
          % args.loops)
    report(rows, "Ir", impls)


def _totals(path):
    with open(path) as f:
        for line in f:
            m = re.match(r"(?:summary|totals): (\d+)", line)
            if m:
                return int(m.group(1))
    raise RuntimeError("no totals in " + path)


def _which(cmd):
    return any(os.access(os.path.join(p, cmd), os.X_OK)
               for p in os.environ.get("PATH", "").split(os.pathsep))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeat", type=int, default=20, help="timed runs per figure (best kept)")
    ap.add_argument("--target", type=float, default=0.005,
                    help="seconds per timed run (default 0.005: short runs are less often "
                         "interrupted; PyPy's JIT wants longer)")
    ap.add_argument("--callgrind", action="store_true",
                    help="count instructions under valgrind instead of timing")
    ap.add_argument("--loops", type=int, default=200,
                    help="with --callgrind: times each stream is fed (default 200)")
    ap.add_argument("--marked", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.marked:
        run_marked(args)
    elif args.callgrind:
        run_callgrind(args)
    else:
        run_timed(args)


if __name__ == "__main__":
    main()
