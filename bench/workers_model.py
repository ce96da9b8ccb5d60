"""
What worker_threads buys on 4-16 cores: a model from numbers measured on this machine.

    .venv/bin/python bench/run.py --quick --modes simple --workers 1,2 --json results.json
    .venv/bin/python bench/workers_model.py --json results.json      # measures the hand-off too

Measured here (2 cores, shared with PostgreSQL and pgbench, so only ratios are meaningful):

  - from bench/run.py's JSON: the pooler's CPU per transaction (µs/tx, every process of it:
    the supervisor and the workers) with 1 and 2 workers, PgBouncer's, and the TPS of each;
  - by this script (unless --no-handoff): the hand-off, i.e. what it costs when the budget
    must move from one worker to another (pool_size 1, two clients on different workers
    taking turns, so that every query needs the other worker's idle connection closed and a
    new one opened): its latency and the pooler CPU it takes, against the same turns on one
    worker.

The model, for a pooler host with K cores and K workers (worker_threads: auto), where the
pooler is the bottleneck (PostgreSQL elsewhere):

    TPS(K) = K * 1e6 / (c_w + f * h)

with c_w the per-transaction CPU of one worker (from the 2-worker run), h the hand-off CPU
and f the share of transactions that need a hand-off (0 when the clients are spread evenly:
the kernel spreads new connections, and transactions never leave their worker; after uneven
disconnects a worker that runs short sheds, once per connection moved).  PgBouncer is one
process: 1e6 / c_b whatever K is, or K processes with SO_REUSEPORT whose pools are separate
(pool_size per process, the imbalance issue 17 is about).  Supervisor CPU is not in the path
of a transaction (only of a new server connection), which the measured c_w vs c_1 shows.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)


def _runs(data, script="select", mode="simple"):
    """{target: run} of the first matching row with the most clients."""
    rows = [r for r in data["results"] if r["script"] == script and r["mode"] == mode]
    if not rows:
        rows = data["results"]
    row = max(rows, key=lambda r: r["clients"])
    return row, row["runs"]


def measure_handoff(turns: int = 60) -> dict:
    """Latency and pooler CPU of a budget hand-off between two workers (see the docstring)."""
    import psycopg

    import run as bench
    workdir = tempfile.mkdtemp(prefix="pgdoorman-handoff-")
    if bench.IS_ROOT:
        import pwd
        pw = pwd.getpwnam("postgres")
        os.chown(workdir, pw.pw_uid, pw.pw_gid)
    os.chmod(workdir, 0o755)
    cluster = svc = None
    try:
        cluster = bench.PgCluster(base_dir=os.path.join(workdir, "pg"))
        cluster.init().start()
        cluster.create_user(bench.BENCH_USER, bench.BENCH_PASSWORD)
        cluster.create_database(bench.BENCH_DB, owner=bench.BENCH_USER)
        svc = bench.start_pgdoorman("pgdoorman-w2", sys.executable, workdir, cluster.port,
                                    bench.BENCH_PASSWORD, 1, workers=2)
        dsn = "host=127.0.0.1 port=%d user=%s password=%s dbname=%s sslmode=disable" % (
            svc.port, bench.BENCH_USER, bench.BENCH_PASSWORD, bench.BENCH_DB)
        conns = []
        by_worker: dict = {}
        while len(by_worker) < 2 or min(len(v) for v in by_worker.values()) < 2:
            c = psycopg.connect(dsn, autocommit=True)
            conns.append(c)
            by_worker.setdefault(c.info.backend_pid >> 24, []).append(c)
            if len(conns) > 60:
                raise RuntimeError("connections never reached both workers")
        (a1, a2), (b1, _b2) = [v[:2] for v in list(by_worker.values())[:2]]

        def turns_of(x, y):
            x.execute("SELECT 1")
            y.execute("SELECT 1")
            cpu0 = sum(bench.proc_cpu(svc.pid))
            t0 = time.monotonic()
            for _ in range(turns):
                x.execute("SELECT 1")
                y.execute("SELECT 1")
            wall = time.monotonic() - t0
            cpu = sum(bench.proc_cpu(svc.pid)) - cpu0
            return wall / (2 * turns), cpu / (2 * turns)

        same_wall, same_cpu = turns_of(a1, a2)
        cross_wall, cross_cpu = turns_of(a1, b1)
        for c in conns:
            c.close()
        return {"same_worker_ms": same_wall * 1e3, "same_worker_cpu_us": same_cpu * 1e6,
                "handoff_ms": (cross_wall - same_wall) * 1e3,
                "handoff_cpu_us": (cross_cpu - same_cpu) * 1e6, "turns": turns}
    finally:
        if svc is not None:
            svc.stop()
        if cluster is not None:
            cluster.destroy()
        import shutil
        shutil.rmtree(workdir, ignore_errors=True)


def model(c1, c2, cb, h, cores=(4, 8, 12, 16), shares=(0.0, 0.001, 0.01)):
    lines = ["| cores | " + " | ".join("pgdoorman f=%g%%" % (f * 100) for f in shares)
             + " | PgBouncer (1 process) | PgBouncer x K (SO_REUSEPORT, separate pools) |",
             "|---|" + "---|" * (len(shares) + 2)]
    for k in cores:
        cells = ["%.0f" % (k * 1e6 / (c2 + f * h)) for f in shares]
        cells += ["%.0f" % (1e6 / cb), "%.0f" % (k * 1e6 / cb)] if cb else ["-", "-"]
        lines.append("| %d | %s |" % (k, " | ".join(cells)))
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", required=True, help="bench/run.py --json output with "
                    "--workers 1,2 (targets pgdoorman and pgdoorman-w2)")
    ap.add_argument("--no-handoff", action="store_true", help="skip the hand-off measurement")
    ap.add_argument("--handoff-cpu-us", type=float, help="use this hand-off CPU instead")
    ap.add_argument("--markdown", help="also write the report to this file")
    args = ap.parse_args(argv)
    with open(args.json) as f:
        data = json.load(f)
    row, runs = _runs(data)
    one, two = runs.get("pgdoorman"), runs.get("pgdoorman-w2")
    if not one or not two:
        ap.error("the JSON has no pgdoorman and pgdoorman-w2 runs (bench/run.py --workers 1,2)")
    c1, c2 = one["cpu_us_per_tx"], two["cpu_us_per_tx"]
    cb = (runs.get("pgbouncer") or {}).get("cpu_us_per_tx")
    out = ["# worker_threads model (bench/workers_model.py)", "",
           "Measured (pgbench -%s -M %s -c %d, %s):" % (
               "S" if row["script"] == "select" else "tpcb", row["mode"], row["clients"],
               "load %s" % (data.get("load_average"),)), "",
           "| target | TPS | pooler µs CPU/tx |", "|---|---|---|"]
    for t, r in sorted(runs.items()):
        out.append("| %s | %s | %s |" % (t, "%.0f" % r["tps"] if r.get("tps") else "-",
                                          "%.1f" % r["cpu_us_per_tx"]
                                          if r.get("cpu_us_per_tx") else "-"))
    out += ["", "2 workers / 1 worker: TPS x%.2f, CPU per transaction x%.2f (the broker is not "
            "on a transaction's path: the difference is noise plus two reactors' wake-ups)."
            % (two["tps"] / one["tps"] if one.get("tps") else float("nan"), c2 / c1), ""]
    h = args.handoff_cpu_us
    if h is None and not args.no_handoff:
        m = measure_handoff()
        h = max(m["handoff_cpu_us"], 0.0)
        out += ["Hand-off (pool_size 1, clients on two workers taking turns, %d turns): "
                "%.2f ms and %.0f µs of pooler CPU more per query than the same turns on one "
                "worker (%.2f ms, %.0f µs): one idle server closed, one slot moved through "
                "the supervisor, one PostgreSQL login." % (
                    m["turns"], m["handoff_ms"], m["handoff_cpu_us"], m["same_worker_ms"],
                    m["same_worker_cpu_us"]), ""]
    if h is None:
        h = 2000.0
        out += ["Hand-off CPU not measured: assumed %.0f µs (a SCRAM login)." % h, ""]
    out += ["Pooler-bound TPS on a K-core pooler host with K workers, f = share of "
            "transactions that need a hand-off:", "", model(c1, c2, cb, h), "",
            "Not modelled: PostgreSQL's own limit, the network, and the kernel's accept "
            "spreading (even on average, uneven for a few long-lived clients: the budget "
            "follows them, the CPU does not)."]
    text = "\n".join(out) + "\n"
    print(text)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
