#!/usr/bin/env python3
"""
CPU instructions per transaction of the whole pgdoorman process, on the compiled framing
scanner and on the pure-Python one (PGDOORMAN_PURE_PYTHON=1), counted by valgrind's callgrind:
a figure the machine's load cannot move, where bench/run.py's CPU time can only be compared
on a quiet machine.

    .venv/bin/python bench/callgrind_pooler.py            # about 25 minutes on 2 busy cores

A throwaway cluster (pgbench -i -s 1), then for each variant one pgdoorman under callgrind
(transaction mode, plaintext client password: no SCRAM under valgrind) and, per -M mode,
`pgbench -S -c CLIENTS -t N` twice with N = --short and --long; the counters are zeroed and
dumped around each run (callgrind_control), and the least count of --repeat runs of each
length gives (long - short) / ((long - short) * CLIENTS) instructions per transaction, logins
and start-up cancelled out.
"""

import argparse
import glob
import os
import pwd
import re
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tools"))
sys.path.insert(0, os.path.join(ROOT, "bench"))

import run as bench  # noqa: E402
from pgcluster import PgCluster, free_port  # noqa: E402

CONFIG = """general:
  host: "127.0.0.1"
  port: %(port)d
  admin_username: "admin"
  admin_password: "admin"
pools:
  %(db)s:
    server_host: "127.0.0.1"
    server_port: %(pg_port)d
    pool_mode: "transaction"
    users:
      - username: "%(user)s"
        password: "%(pw)s"
        pool_size: %(clients)d
        server_username: "%(user)s"
        server_password: "%(pw)s"
"""
VARIANTS = [("compiled", {}), ("pure", {"PGDOORMAN_PURE_PYTHON": "1"})]
MODES = ["simple", "extended", "prepared"]


def pgbench(port, mode, clients, transactions):
    out = subprocess.run(
        [bench.PGBENCH, "-n", "-S", "-M", mode, "-c", str(clients), "-t", str(transactions),
         "-h", "127.0.0.1", "-p", str(port), "-U", bench.BENCH_USER, bench.BENCH_DB],
        env=dict(os.environ, PGPASSWORD=bench.BENCH_PASSWORD), stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True, timeout=1800)
    if out.returncode or "number of failed transactions: 0" not in out.stdout:
        raise bench.BenchError("pgbench -M %s failed:\n%s" % (mode, out.stdout))


def totals(path):
    with open(path) as f:
        for line in f:
            m = re.match(r"(?:summary|totals): (\d+)", line)
            if m:
                return int(m.group(1))
    raise bench.BenchError("no totals in " + path)


def counted(pid, outdir, run):
    """Instructions of process C{pid} while C{run()} runs (zeroed before, dumped after)."""
    before = set(glob.glob(os.path.join(outdir, "cg.out*")))
    subprocess.run(["callgrind_control", "-z", str(pid)], check=True, stdout=subprocess.DEVNULL)
    run()
    subprocess.run(["callgrind_control", "-d", str(pid)], check=True, stdout=subprocess.DEVNULL)
    new = sorted(set(glob.glob(os.path.join(outdir, "cg.out*"))) - before)
    if len(new) != 1:
        raise bench.BenchError("expected one new callgrind dump, got %r" % new)
    return totals(new[0])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--python", default=sys.executable, help="the CPython to run pgdoorman on")
    ap.add_argument("--clients", type=int, default=4, help="pgbench -c (default 4)")
    ap.add_argument("--short", type=int, default=50, help="pgbench -t of the short run")
    ap.add_argument("--long", type=int, default=550, help="pgbench -t of the long run")
    ap.add_argument("--repeat", type=int, default=2, help="runs of each length (least kept)")
    ap.add_argument("--modes", default=",".join(MODES))
    args = ap.parse_args(argv)
    modes = args.modes.split(",")
    for tool in ("valgrind", "callgrind_control"):
        if not any(os.access(os.path.join(p, tool), os.X_OK)
                   for p in os.environ.get("PATH", "").split(os.pathsep)):
            sys.exit("%s not found (apt-get install valgrind)" % tool)
    workdir = tempfile.mkdtemp(prefix="pgdoorman-callgrind-")
    if bench.IS_ROOT:
        pw = pwd.getpwnam("postgres")
        os.chown(workdir, pw.pw_uid, pw.pw_gid)
    os.chmod(workdir, 0o755)
    cluster = PgCluster(base_dir=os.path.join(workdir, "pg"))
    procs = []
    results = {}
    try:
        cluster.init(settings={"max_connections": "100"}).start()
        cluster.create_user(bench.BENCH_USER, bench.BENCH_PASSWORD)
        cluster.create_database(bench.BENCH_DB, owner=bench.BENCH_USER)
        subprocess.run([bench.PGBENCH, "-i", "-q", "-s", "1", "-h", "127.0.0.1",
                        "-p", str(cluster.port), "-U", bench.BENCH_USER, bench.BENCH_DB],
                       env=dict(os.environ, PGPASSWORD=bench.BENCH_PASSWORD), check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for variant, extra in VARIANTS:
            d = os.path.join(workdir, variant)
            os.makedirs(d)
            port = free_port()
            conf = os.path.join(d, "pgdoorman.yaml")
            with open(conf, "w") as f:
                f.write(CONFIG % dict(port=port, db=bench.BENCH_DB, pg_port=cluster.port,
                                      user=bench.BENCH_USER, pw=bench.BENCH_PASSWORD,
                                      clients=args.clients))
            env = dict(os.environ, PYTHONPATH=ROOT)
            env.pop("PGDOORMAN_PURE_PYTHON", None)
            env.update(extra)
            logfile = os.path.join(d, "pgdoorman.log")
            with open(logfile, "w") as log:
                proc = subprocess.Popen(
                    ["valgrind", "--tool=callgrind", "--dump-instr=no",
                     "--callgrind-out-file=" + os.path.join(d, "cg.out"),
                     args.python, "-m", "pgdoorman", conf],
                    cwd=d, env=env, stdout=log, stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL, start_new_session=True)
            procs.append(proc)
            bench.wait_listening(port, proc, variant, logfile, timeout=600)
            print("# %s: pid %d, %s" % (variant, proc.pid,
                                        bench.scanner_of(proc.pid).lstrip(", ")), flush=True)
            for mode in modes:
                pgbench(port, mode, args.clients, 20)  # warm
                # the least of --repeat counts: what else runs in the process now and then
                # (a full garbage collection, a timer) only ever adds
                short = min(counted(proc.pid, d, lambda: pgbench(port, mode, args.clients,
                                                                  args.short))
                            for _ in range(args.repeat))
                long_ = min(counted(proc.pid, d, lambda: pgbench(port, mode, args.clients,
                                                                  args.long))
                            for _ in range(args.repeat))
                results[(variant, mode)] = (long_ - short) / ((args.long - args.short)
                                                              * args.clients)
                print("# %s -M %s: %.0f instructions per transaction"
                      % (variant, mode, results[(variant, mode)]), flush=True)
            proc.terminate()
            proc.wait(120)
        print("| pgbench -S | pure-Python scanner Ir/tx | compiled Ir/tx | saved |")
        print("|---|---|---|---|")
        for mode in modes:
            pure, compiled = results[("pure", mode)], results[("compiled", mode)]
            print("| -M %s | %.0f | %.0f | %.1f%% |"
                  % (mode, pure, compiled, 100 * (pure - compiled) / pure))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        cluster.destroy()


if __name__ == "__main__":
    main()
