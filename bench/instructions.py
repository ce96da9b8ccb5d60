#!/usr/bin/env python3
"""
Instructions per transaction: a pooler's CPU cost that does not depend on the machine's load.

Timed CPU (bench/run.py) moves by ±20% when anything else runs on a 2-core machine; the
number of instructions a process executes for the same work does not.  This runs each pooler
under C{valgrind --tool=callgrind} with instrumentation off, then for each mode:

  1. C{pgbench -c C -t 1}       (C logins and one transaction each), counted;
  2. C{pgbench -c C -t 1+N}     (the same logins and N more transactions each), counted;

and prints (count 2 - count 1) / (C * N): instructions per transaction with the logins taken
out, for pgdoorman (CPython) and PgBouncer, and the ratio.  Valgrind runs the pooler some 50
times slower, so the counts are small runs (seconds); they still rank changes reliably, which
is what they are for.  Timed TPS and µs/tx stay bench/run.py's job.

    .venv/bin/python bench/instructions.py                      # simple, extended, prepared
    .venv/bin/python bench/instructions.py --modes simple -N 200 --targets pgdoorman
"""

import argparse
import glob
import os
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import run as _run  # noqa: E402  (bench/run.py: cluster, pgbench and pooler start-up)

CALLGRIND_CONTROL = "callgrind_control"
#: --keep PREFIX: keep the dumps (callgrind_annotate reads them) instead of deleting them.
KEEP = None


def _wrapper(workdir, out_base, argv0, smc=False):
    """
    A script that runs C{argv0 ARGS} under callgrind, instrumentation off at start
    (C{smc}: check all code for self-modification, as PyPy's JIT writes code).
    """
    path = os.path.join(workdir, "under-callgrind-%s.sh" % os.path.basename(argv0))
    with open(path, "w") as f:
        f.write('#!/bin/sh\nexec valgrind --tool=callgrind --instr-atstart=no '
                '--callgrind-out-file=%s.%%p --dump-instr=no --compress-strings=no '
                '--dump-line=no %s%s "$@"\n'
                % (out_base, "--smc-check=all " if smc else "", argv0))
    os.chmod(path, 0o755)
    return path


def _control(pid, *args):
    argv = [CALLGRIND_CONTROL] + list(args) + [str(pid)]
    uid = os.stat("/proc/%d" % pid).st_uid
    if uid != os.geteuid():
        # vgdb's FIFOs belong to the valgrind process's user (pgbouncer runs as postgres)
        import pwd
        argv = ["runuser", "-u", pwd.getpwuid(uid).pw_name, "--"] + argv
    p = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    if p.returncode or b"OK" not in p.stdout:
        raise _run.BenchError("%s: %s" % (" ".join(argv), p.stdout.decode(errors="replace")))


def _valgrind_pid(pid):
    """The valgrind process (the pooler itself, under valgrind) at or under C{pid}."""
    for _ in range(100):
        try:
            exe = os.path.realpath("/proc/%d/exe" % pid)
        except OSError:
            exe = ""
        if "/valgrind/" in exe:
            return pid
        kids = _run.children_of(pid)
        if kids:
            pid = kids[0]
        else:
            time.sleep(0.1)
    return pid


def _counted(pid, out_base, fn):
    """Run C{fn()} with instrumentation on; return the instructions counted meanwhile."""
    before = set(glob.glob(out_base + "*"))
    _control(pid, "--zero")
    _control(pid, "--instr=on")
    try:
        result = fn()
    finally:
        _control(pid, "--instr=off")
        _control(pid, "--dump")
    for _ in range(100):
        new = sorted(set(glob.glob(out_base + "*")) - before)
        if new:
            break
        time.sleep(0.1)
    else:
        raise _run.BenchError("callgrind wrote no dump under %s" % out_base)
    total = 0
    for path in new:
        with open(path) as f:
            for line in f:
                if line.startswith("summary:") or line.startswith("totals:"):
                    total = max(total, int(line.split()[1]))
        if KEEP:
            os.rename(path, "%s.%s" % (KEEP, os.path.basename(path)))
        else:
            os.unlink(path)
    return total, result


def measure(svc, pid, out_base, mode, clients, n):
    port = svc.port
    a, ra = _counted(pid, out_base, lambda: _run.run_pgbench(
        port, "select", mode, clients, 0, timeout_extra=600, transactions=1))
    b, rb = _counted(pid, out_base, lambda: _run.run_pgbench(
        port, "select", mode, clients, 0, timeout_extra=1800, transactions=1 + n))
    errors = "; ".join(e for e in (ra["errors"], rb["errors"]) if e)
    per_tx = (b - a) / float(clients * n)
    # the first count is C logins and C transactions: what is not the transactions is logins
    per_login = (a - clients * per_tx) / float(clients)
    return per_tx, per_login, errors


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--modes", default="simple,extended,prepared")
    ap.add_argument("--clients", "-c", type=int, default=10)
    ap.add_argument("-N", type=int, default=100, help="transactions per client counted")
    ap.add_argument("--targets", default="pgbouncer,pgdoorman")
    ap.add_argument("--python", default=sys.executable)
    ap.add_argument("--pool-size", type=int, default=20)
    ap.add_argument("--warmup-tx", type=int, default=5,
                    help="unmeasured transactions per client first (PyPy's JIT wants 500+)")
    ap.add_argument("--keep", metavar="PREFIX",
                    help="keep callgrind's dumps as PREFIX.* (for callgrind_annotate)")
    args = ap.parse_args(argv)
    global KEEP
    KEEP = args.keep
    args.python = os.path.abspath(args.python) if os.sep in args.python else args.python
    modes = args.modes.split(",")
    targets = args.targets.split(",")
    workdir = tempfile.mkdtemp(prefix="pgdoorman-instr-")
    os.chmod(workdir, 0o777)
    cluster = None
    services = []
    try:
        cluster = _run.PgCluster(base_dir=os.path.join(workdir, "pg"))
        cluster.init(settings={"max_connections": "200"}).start()
        cluster.create_user(_run.BENCH_USER, _run.BENCH_PASSWORD)
        cluster.create_database(_run.BENCH_DB, owner=_run.BENCH_USER)
        secret = cluster.password_hash(_run.BENCH_USER)
        subprocess.run([_run.PGBENCH, "-i", "-q", "-s", "1", "-h", "127.0.0.1",
                        "-p", str(cluster.port), "-U", _run.BENCH_USER, _run.BENCH_DB],
                       env=dict(os.environ, PGPASSWORD=_run.BENCH_PASSWORD), check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        results = {}
        logins = {}
        for target in targets:
            out_base = os.path.join(workdir, "callgrind-%s" % target)
            if target == "pgbouncer":
                real = _run.PGBOUNCER
                _run.PGBOUNCER = _wrapper(workdir, out_base, real)
                try:
                    svc = _run.start_pgbouncer(workdir, cluster.port, secret, args.pool_size)
                finally:
                    _run.PGBOUNCER = real
                pid = _valgrind_pid(svc.proc.pid)
            else:
                python = _wrapper(workdir, out_base, args.python, smc=True)
                svc = _run.start_pgdoorman(target, python, workdir, cluster.port, secret,
                                           args.pool_size)
                pid = svc.proc.pid
            services.append(svc)
            _run.check_login(svc)
            for mode in modes:
                # unmeasured warm-up: first Parse of each statement, first server logins
                _run.run_pgbench(svc.port, "select", mode, args.clients, 0,
                                 timeout_extra=1800, transactions=args.warmup_tx)
                per_tx, per_login, errors = measure(svc, pid, out_base, mode, args.clients,
                                                    args.N)
                results[(target, mode)] = (per_tx, errors)
                logins[target] = per_login
                _run.log("%s -M %s: %.0f instructions/tx, %.0f per login%s" % (
                    target, mode, per_tx, per_login, ("  ERRORS: " + errors) if errors else ""))
            svc.stop()
        print()
        print("instructions per select-only transaction (callgrind, -c %d, %d tx per client, "
              "logins taken out); pgdoorman %s" % (args.clients, args.N, _run.git_rev()))
        print()
        print("| mode | " + " | ".join(targets) + (" | pgdoorman/pgbouncer |"
                                                      if "pgbouncer" in targets else " |"))
        print("|---" * (len(targets) + 1 + ("pgbouncer" in targets)) + "|")
        for mode in modes:
            row = ["%.0f" % results[(t, mode)][0] + (" (errors)" if results[(t, mode)][1] else "")
                   for t in targets]
            if "pgbouncer" in targets and "pgdoorman" in targets:
                row.append("%.1f" % (results[("pgdoorman", mode)][0]
                                     / max(1.0, results[("pgbouncer", mode)][0])))
            print("| %s | %s |" % (mode, " | ".join(row)))
        print()
        print("instructions per client login (SCRAM, from the first count, last mode): " +
              ", ".join("%s %.0f" % (t, logins[t]) for t in targets if t in logins))
    finally:
        for svc in services:
            svc.stop()
        if cluster is not None:
            cluster.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
