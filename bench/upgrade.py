"""
The zero-downtime upgrade figure: how long the handover takes and what clients feel.

    .venv/bin/python bench/upgrade.py                   # 200 clients, pool 10, CPython
    .venv/bin/python bench/upgrade.py --clients 1000 --python .venv-pypy/bin/python

It starts a throwaway PostgreSQL (tools/pgcluster.py) and pgdoorman (transaction mode), runs
C{--clients} asyncpg connections in one process, each looping "SELECT 1" (a prepared statement
on a named server-side statement, asyncpg's default) with a short think time, sends SIGUSR2 and
prints:

  - signal -> new process accepting: from the old process's log line (it times the request to
    the new process's ready message, the installed code's config check included);
  - clients handed over and the rate (clients/s) between the new process accepting and the
    last idle client handed over, from the old process's log;
  - per-query latency before the signal (baseline) and in the window from the signal to the end
    of the handover + 1 s: p50, p99, p100 (p100 is the longest stall a client saw);
  - errors (any query failing or any connection lost fails the run: exit 1).
"""

import argparse
import asyncio
import os
import re
import signal
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tools"))

from pgcluster import PgCluster, free_port, wait_port  # noqa: E402

USER, PASSWORD, DB = "bench", "bench-secret", "bench"


def percentile(values, p):
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(round(p / 100.0 * (len(values) - 1))))]


def start_pgdoorman(python, workdir, pg_port, pool_size):
    port = free_port()
    conf = os.path.join(workdir, "pgdoorman.yaml")
    with open(conf, "w") as f:
        f.write("""general:
  host: "127.0.0.1"
  port: %d
  admin_username: "admin"
  admin_password: "admin"
  shutdown_timeout: "30s"
  max_connections: 20000
  log_client_connections: false
  log_client_disconnections: false
pools:
  %s:
    server_host: "127.0.0.1"
    server_port: %d
    pool_mode: "transaction"
    users:
      - username: "%s"
        password: "%s"
        pool_size: %d
""" % (port, DB, pg_port, USER, PASSWORD, pool_size))
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    log = os.path.join(workdir, "pgdoorman.log")
    with open(log, "w") as out:
        proc = subprocess.Popen([python, "-m", "pgdoorman", conf], stdout=out, stderr=out,
                                stdin=subprocess.DEVNULL, cwd=workdir, env=env,
                                start_new_session=True)
    wait_port(port, timeout=60)
    return port, proc, log


async def client(asyncpg, port, samples, errors, stop, think):
    try:
        conn = await asyncpg.connect(host="127.0.0.1", port=port, user=USER, password=PASSWORD,
                                     database=DB, timeout=60)
    except Exception as e:
        errors.append("connect: %r" % (e,))
        return
    try:
        stmt = await conn.prepare("SELECT $1::int + 1")
        i = 0
        while not stop.is_set():
            t0 = time.monotonic()
            if await stmt.fetchval(i) != i + 1:
                errors.append("wrong answer")
            samples.append((t0, time.monotonic() - t0))
            i += 1
            await asyncio.sleep(think)
    except Exception as e:
        errors.append("query: %r" % (e,))
    finally:
        await conn.close()


async def run(args, port, proc, log):
    import asyncpg
    samples, errors = [], []
    stop = asyncio.Event()
    tasks = []
    for i in range(args.clients):
        tasks.append(asyncio.ensure_future(client(asyncpg, port, samples, errors, stop,
                                                  args.think / 1000.0)))
        if i % 50 == 49:
            await asyncio.sleep(0.05)
    await asyncio.sleep(args.warmup)
    signalled = time.monotonic()
    os.kill(proc.pid, signal.SIGUSR2)
    done = None
    deadline = signalled + 60
    while time.monotonic() < deadline:
        await asyncio.sleep(0.05)
        with open(log) as f:
            text = f.read()
        if "clients handed over in" in text:
            done = time.monotonic()
            break
        if "UPGRADE FAILED" in text:
            break
    await asyncio.sleep(args.after)
    stop.set()
    await asyncio.gather(*tasks)
    return samples, errors, signalled, done, text


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--clients", type=int, default=200)
    ap.add_argument("--pool-size", type=int, default=10)
    ap.add_argument("--think", type=float, default=5.0, help="ms between a client's queries")
    ap.add_argument("--warmup", type=float, default=3.0, help="seconds before the signal")
    ap.add_argument("--after", type=float, default=2.0, help="seconds after the handover")
    ap.add_argument("--python", default=sys.executable, help="interpreter for pgdoorman")
    args = ap.parse_args(argv)
    args.python = os.path.abspath(args.python) if os.sep in args.python else args.python
    workdir = tempfile.mkdtemp(prefix="pgdoorman-upgrade-bench-")
    os.chmod(workdir, 0o755)
    cluster = PgCluster(base_dir=os.path.join(workdir, "pg"))
    proc = None
    try:
        cluster.init(settings={"max_connections": "200"}).start()
        cluster.create_user(USER, PASSWORD)
        cluster.create_database(DB, owner=USER)
        port, proc, log = start_pgdoorman(args.python, workdir, cluster.port, args.pool_size)
        samples, errors, signalled, done, text = asyncio.run(run(args, port, proc, log))
        m_ready = re.search(r"is accepting connections ([\d.]+)s after the request", text)
        m_moved = re.search(r"(\d+) clients handed over in ([\d.]+)s \((\d+)/s\), (\d+) closed",
                            text)
        before = [lat for t, lat in samples if t < signalled]
        window_end = (done or time.monotonic()) + 1.0
        during = [lat for t, lat in samples if signalled <= t <= window_end]
        print("pgdoorman upgrade bench: %d clients, pool_size %d, think %.1f ms, %s"
              % (args.clients, args.pool_size, args.think, os.path.basename(args.python)))
        print("signal -> new process accepting: %s s"
              % (m_ready.group(1) if m_ready else "n/a (upgrade failed?)"))
        if m_moved:
            print("clients handed over: %s in %s s (%s clients/s), %s closed"
                  % m_moved.groups())
        for name, lat in (("before the signal", before), ("during the upgrade", during)):
            print("latency %s: n=%d p50=%.2f ms p99=%.2f ms p100=%.2f ms"
                  % (name, len(lat), percentile(lat, 50) * 1e3, percentile(lat, 99) * 1e3,
                     percentile(lat, 100) * 1e3))
        print("errors: %d%s" % (len(errors), (" (first: %s)" % errors[0]) if errors else ""))
        return 1 if errors or not m_moved else 0
    finally:
        for pid in [int(p) for p in re.findall(r"started the new process (\d+)",
                                                open(os.path.join(workdir, "pgdoorman.log")).read()
                                                if os.path.exists(os.path.join(
                                                    workdir, "pgdoorman.log")) else "")] + \
                ([proc.pid] if proc else []):
            try:
                os.kill(pid, signal.SIGTERM)
            except OSError:
                pass
        time.sleep(0.5)
        cluster.destroy()


if __name__ == "__main__":
    raise SystemExit(main())
