"""
Issue 13: hostile clients beside well-behaved ones on the same small pool.

pgdoorman (transaction mode, pool_size 4, prepared statements on) serves N hostile workers,
each running the attacks of L{hostile} one after another (clients that die mid-transaction,
mid-pipeline, mid-result, abandon COPY, send unknown or malformed messages, replay mutated
psycopg sessions, Bind names they never Parsed, ...), and, on the same pool, canaries that
behave: psycopg with prepare_threshold=0 (one plain, one in pipeline mode), asyncpg with its
statement cache, and pgbench -M prepared.

What a user of the canaries would see is what is asserted:
  - no canary ever gets an error or a wrong answer;
  - no canary is stuck: each makes progress at least every STUCK_SECONDS;
  - afterwards no server connection is left inside a transaction or holding a lock, no client
    is left at pgdoorman (SHOW CLIENTS), no socket leaked (/proc/PID/fd), pgdoorman's RSS grew
    by less than RSS_GROWTH_MB, and its log has no traceback.

The attacks are seeded: PGDOORMAN_HOSTILE_SEED (default 13) picks every attack and its
parameters; the seed is printed with every failure, with the attacks that ran in the seconds
before the first canary error.  PGDOORMAN_HOSTILE_SECONDS (default 30) is the length of the
run, PGDOORMAN_HOSTILE_WORKERS (default 12) the number of hostile workers; `make soak` runs
it for PGDOORMAN_SOAK_SECONDS (default 600) with 20 workers and a fresh seed.
"""

import asyncio
import os
import random
import re
import subprocess
import threading
import time
import traceback

import pytest

import hostile
from conftest import PGBENCH, md5_secret, simple_config

SEED = int(os.environ.get("PGDOORMAN_HOSTILE_SEED", "13"))
#: A comma-separated subset of hostile.ATTACKS (default: all of them), to find which hurts.
KINDS = [k for k in os.environ.get("PGDOORMAN_HOSTILE_KINDS", "").split(",") if k]
SECONDS = float(os.environ.get("PGDOORMAN_HOSTILE_SECONDS", "30"))
WORKERS = int(os.environ.get("PGDOORMAN_HOSTILE_WORKERS", "12"))
POOL_SIZE = 4
DB = "hostile"
#: A canary that has not completed a round trip for this long is stuck.
STUCK_SECONDS = 15.0
RSS_GROWTH_MB = 64


# -- the database -----------------------------------------------------------------------------

@pytest.fixture
def hostile_db(pg):
    user, password = pg.new_user("md5")
    if DB not in pg.psql("SELECT datname FROM pg_database"):
        pg.create_database(DB)
    pg.psql('GRANT ALL ON SCHEMA public TO PUBLIC', db=DB)
    pg.psql("DROP TABLE IF EXISTS hostile_rows, hostile_canary, hostile_sink;"
            "CREATE TABLE hostile_rows (id int PRIMARY KEY, v int NOT NULL DEFAULT 0);"
            "CREATE TABLE hostile_canary (id int PRIMARY KEY, v int NOT NULL DEFAULT 0);"
            "CREATE TABLE hostile_sink (v int);"
            "INSERT INTO hostile_rows (id) SELECT generate_series(1, %d);"
            "INSERT INTO hostile_canary (id) SELECT generate_series(1, 1000);"
            'GRANT ALL ON hostile_rows, hostile_canary, hostile_sink TO "%s"'
            % (hostile.ROWS, user), db=DB)
    return user, password


def start_doorman(pg, pgdoorman, user, password):
    config = simple_config(
        pg, user, md5_secret(user, password), db=DB, pool_size=POOL_SIZE,
        server_password=password,
        general={"query_wait_timeout": "60s", "client_login_timeout": "5s",
                 "prepared_statements": True})
    d = pgdoorman(config)
    d.user, d.password = user, password
    return d


# -- the canaries -----------------------------------------------------------------------------

class Canaries:
    """Well-behaved clients in threads; each records its errors and when it last progressed."""

    def __init__(self, d, stop):
        self.d = d
        self.stop = stop
        self.errors = []          # (time, canary, text)
        self.progress = {}        # canary -> monotonic time of its last completed round trip
        self.rounds = {}
        self.threads = []
        self.lock = threading.Lock()

    def tick(self, name):
        self.progress[name] = time.monotonic()
        self.rounds[name] = self.rounds.get(name, 0) + 1

    def error(self, name, text):
        with self.lock:
            self.errors.append((time.monotonic(), name, text))

    def start(self, name, fn, *args):
        self.progress[name] = time.monotonic()
        self.rounds[name] = 0

        def run():
            # After an error the canary reconnects and carries on, as an application would:
            # the run shows every kind of error, and whether the canary can recover.
            while not self.stop.is_set():
                try:
                    fn(name, *args)
                    return
                except Exception as e:  # noqa: BLE001 - it is what the test reports
                    where = traceback.extract_tb(e.__traceback__)
                    mine = [f for f in where if f.filename == __file__]
                    self.error(name, "%s: %s (at %s)" % (
                        type(e).__name__, str(e).split("\n", 1)[0],
                        (mine or where)[-1].line if where else "?"))
                    time.sleep(0.2)

        t = threading.Thread(target=run, name=name, daemon=True)
        t.start()
        self.threads.append(t)

    # psycopg, prepare_threshold=0: every statement is a named one (_pg3_N)
    def psycopg_plain(self, name, row):
        import psycopg
        d = self.d
        with psycopg.connect(d.dsn(d.user, DB, d.password), autocommit=True,
                             prepare_threshold=0) as conn:
            i = 0
            while not self.stop.is_set():
                i += 1
                got = conn.execute("SELECT %s::int + 1", [i]).fetchone()[0]
                if got != i + 1:
                    self.error(name, "SELECT %d + 1 returned %r" % (i, got))
                with conn.transaction():
                    v = conn.execute("UPDATE hostile_canary SET v = v + 1 WHERE id = %s "
                                     "RETURNING v", [row]).fetchone()[0]
                    again = conn.execute("SELECT v FROM hostile_canary WHERE id = %s",
                                         [row]).fetchone()[0]
                    if again != v:
                        self.error(name, "row %d: %r after UPDATE returned %r" % (row, again, v))
                self.tick(name)

    # psycopg in pipeline mode, prepare_threshold=0
    def psycopg_pipeline(self, name, row):
        import psycopg
        d = self.d
        with psycopg.connect(d.dsn(d.user, DB, d.password), autocommit=True,
                             prepare_threshold=0) as conn:
            i = 0
            while not self.stop.is_set():
                i += 1
                with conn.pipeline():
                    c1 = conn.execute("SELECT %s::int + 1", [i])
                    c2 = conn.execute("SELECT v FROM hostile_canary WHERE id = %s", [row])
                    c3 = conn.execute("UPDATE hostile_canary SET v = v + 1 WHERE id = %s "
                                      "RETURNING v", [row])
                    c4 = conn.execute("SELECT %s::int + 1", [i + 1])
                got = (c1.fetchone()[0], c4.fetchone()[0])
                before, after = c2.fetchone()[0], c3.fetchone()[0]
                if got != (i + 1, i + 2) or after != before + 1:
                    self.error(name, "pipeline %d returned %r, %r -> %r" % (i, got, before,
                                                                            after))
                self.tick(name)

    # asyncpg: its statement cache (__asyncpg_stmt_N__), prepare(), a transaction
    def asyncpg_canary(self, name, row):
        import asyncpg
        d = self.d

        async def main():
            conn = await asyncpg.connect(d.url(d.user, DB, d.password), timeout=30)
            try:
                stmt = await conn.prepare("SELECT $1::int * 2")
                i = 0
                while not self.stop.is_set():
                    i += 1
                    if await conn.fetchval("SELECT $1::int + 1", i) != i + 1:
                        self.error(name, "fetchval %d wrong" % i)
                    if await stmt.fetchval(i) != 2 * i:
                        self.error(name, "prepared %d wrong" % i)
                    async with conn.transaction():
                        v = await conn.fetchval("UPDATE hostile_canary SET v = v + 1 "
                                                "WHERE id = $1 RETURNING v", row)
                        again = await conn.fetchval(
                            "SELECT v FROM hostile_canary WHERE id = $1", row)
                        if again != v:
                            self.error(name, "row %d: %r after %r" % (row, again, v))
                    self.tick(name)
            finally:
                await conn.close()

        asyncio.run(main())

    def pgbench_canary(self, name, until, tmp_path):
        d = self.d
        seconds = until - time.monotonic()
        if seconds < 2:
            return
        script = os.path.join(str(tmp_path), "canary.sql")
        with open(script, "w") as f:
            f.write("\\set id random(500, 1000)\n"
                    "SELECT v FROM hostile_canary WHERE id = :id;\n"
                    "UPDATE hostile_canary SET v = v + 1 WHERE id = :id;\n"
                    "SELECT $$pgbench$$, :id::int + 1;\n")
        env = {"PGPASSWORD": d.password, "PATH": "/usr/bin:/bin"}
        # pgbench reports progress each second: a line that stops coming is a stuck canary.
        proc = subprocess.Popen(
            [PGBENCH, "-n", "-M", "prepared", "-c", "2", "-j", "1", "-T", str(int(seconds)),
             "-P", "1", "-f", script, "-h", d.host, "-p", str(d.port), "-U", d.user, DB],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True, cwd="/tmp")
        lines = []
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("progress:") and not line.rstrip().endswith("0.0 tps, lat"):
                m = re.search(r"([\d.]+) tps", line)
                if m and float(m.group(1)) > 0:
                    self.tick(name)
        proc.wait()
        out = "".join(lines)
        failed = re.search(r"number of failed transactions: (\d+)", out)
        if proc.returncode != 0 or "aborted" in out or not failed or failed.group(1) != "0":
            errors = [line for line in lines if "error" in line or "aborted" in line]
            self.error(name, "pgbench exited %s: %s" % (proc.returncode,
                                                      "".join(errors[:5]) or out[-1500:]))
        self.pgbench_output = out


# -- the hostile workers ----------------------------------------------------------------------

class Hostiles:
    def __init__(self, target, seed, workers, stop, kinds):
        self.target = target
        self.stop = stop
        self.log = []             # (start, end, worker, kind, seed)
        self.harness_errors = []
        self.kinds = kinds
        self.threads = [threading.Thread(target=self.run, args=(w, seed), daemon=True)
                        for w in range(workers)]

    def run(self, worker, seed):
        rng = random.Random("%d/%d" % (seed, worker))
        while not self.stop.is_set():
            kind = rng.choice(self.kinds)
            attack_seed = rng.getrandbits(32)
            start = time.monotonic()
            err = hostile.run_one(kind, attack_seed, self.target)
            self.log.append((start, time.monotonic(), worker, kind, attack_seed))
            if err is not None:
                self.harness_errors.append((kind, attack_seed, repr(err)))

    def start(self):
        for t in self.threads:
            t.start()

    def join(self, timeout):
        deadline = time.monotonic() + timeout
        for t in self.threads:
            t.join(max(0.1, deadline - time.monotonic()))
        return [t.name for t in self.threads if t.is_alive()]


# -- measurements of the pgdoorman process ----------------------------------------------------

def rss_mb(pid):
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    return 0.0


def socket_fds(pid):
    n = 0
    for fd in os.listdir("/proc/%d/fd" % pid):
        try:
            if os.readlink("/proc/%d/fd/%s" % (pid, fd)).startswith("socket:"):
                n += 1
        except OSError:
            pass
    return n


def show_clients(d, user):
    """Rows of SHOW CLIENTS (as dicts) for C{user}."""
    import psycopg
    with psycopg.connect(d.dsn("admin", "pgdoorman", "admin"), autocommit=True) as admin:
        cur = admin.execute("SHOW CLIENTS")
        names = [c.name for c in cur.description]
        return [r for r in (dict(zip(names, row)) for row in cur.fetchall())
                if r.get("user") == user]


def busy_backends(pg, user):
    """The user's backends that are not plainly idle, and the locks they hold."""
    with pg.connect_super() as conn:
        states = conn.execute(
            "SELECT pid, state, left(query, 80) FROM pg_stat_activity "
            "WHERE usename = %s AND backend_type = 'client backend' AND state <> 'idle'",
            [user]).fetchall()
        locks = conn.execute(
            "SELECT l.pid, l.locktype, l.mode, l.granted, l.relation::regclass::text "
            "FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid "
            "WHERE a.usename = %s AND l.locktype <> 'virtualxid'", [user]).fetchall()
    return states, locks


# -- the test ---------------------------------------------------------------------------------

def run_hostile(pg, pgdoorman, hostile_db, tmp_path, seed, seconds, workers,
                kinds=None):
    user, password = hostile_db
    d = start_doorman(pg, pgdoorman, user, password)
    # PGDOORMAN_TEST_DIRECT=1: the same run against PostgreSQL itself, which must pass (the
    # attacks alone cost the canaries nothing); the checks of the process are left out.
    pid = d.proc.pid if d.proc is not None else None
    target = hostile.Target(d.port, user, password, DB)
    kinds = kinds or sorted(hostile.ATTACKS)
    problems = []

    # A real psycopg session's bytes, recorded against PostgreSQL itself, for the replays.
    recorded = hostile.record_psycopg_session(pg.host, pg.port, user, password, DB)
    assert b"_pg3_0" in recorded and recorded.endswith(hostile.TERMINATE), recorded[:200]
    hostile.SESSIONS[1:] = [recorded]

    # Warm up: the pool's servers exist, the canaries' statements are known.
    with d.connect(user, DB, password, prepare_threshold=0) as conn:
        for i in range(3):
            conn.execute("SELECT %s::int + 1", [i]).fetchone()
    time.sleep(0.5)
    rss_before = rss_mb(pid) if pid else 0
    sockets_before = socket_fds(pid) if pid else 0

    stop_canaries = threading.Event()
    stop_hostiles = threading.Event()
    canaries = Canaries(d, stop_canaries)
    canaries.start("psycopg", canaries.psycopg_plain, 1)
    canaries.start("psycopg-pipeline", canaries.psycopg_pipeline, 2)
    canaries.start("asyncpg", canaries.asyncpg_canary, 3)
    canaries.start("pgbench", canaries.pgbench_canary,
                   time.monotonic() + seconds + 2, tmp_path)
    hostiles = Hostiles(target, seed, workers, stop_hostiles, kinds)
    hostiles.start()

    stuck = {}
    started = time.monotonic()
    while time.monotonic() - started < seconds:
        time.sleep(0.5)
        now = time.monotonic()
        for name, last in list(canaries.progress.items()):
            if now - last > STUCK_SECONDS and name not in stuck:
                stuck[name] = now - started
        if not d.alive():
            break
    stop_hostiles.set()
    left_running = hostiles.join(hostile.ATTACK_SECONDS + 10)
    stop_canaries.set()
    for t in canaries.threads:
        t.join(STUCK_SECONDS if t.name != "pgbench" else 20)
        if t.is_alive() and t.name not in stuck:
            stuck[t.name] = "did not finish its last round trip after the run"

    if not d.alive():
        problems.append("pgdoorman died (exit %s)" % d.proc.returncode)
    seen = {}
    for at, name, text in canaries.errors:
        first_line = text.split("\n", 1)[0]
        seen[(name, first_line)] = seen.get((name, first_line), 0) + 1
        if seen[(name, first_line)] > 1:
            continue  # the same error again: counted below
        problems.append("canary %s at %.1fs: %s" % (name, at - started, text.strip()[:1500]))
    for (name, first_line), n in seen.items():
        if n > 1:
            problems.append("canary %s: %d times: %s" % (name, n, first_line[:300]))
    for name, when in stuck.items():
        problems.append("canary %s stuck (no round trip for %ss) at %s"
                        % (name, STUCK_SECONDS, when))
    for name, n in canaries.rounds.items():
        if n == 0:
            problems.append("canary %s never completed a round trip" % name)
    if left_running:
        problems.append("hostile workers still running after the run: %s" % left_running)
    for kind, aseed, err in hostiles.harness_errors[:5]:
        problems.append("attack %s seed %d raised %s (harness bug?)" % (kind, aseed, err))
    ran = set(k for _, _, _, k, _ in hostiles.log)
    if seconds >= 20 and set(kinds) - ran:
        problems.append("attacks that never ran: %s" % sorted(set(kinds) - ran))

    if d.alive():
        # Everyone has gone: the servers must be idle, unlocked and the clients gone.
        deadline = time.monotonic() + 15
        while True:
            states, locks = busy_backends(pg, user)
            clients = show_clients(d, user) if pid else []
            if not states and not locks and not clients or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        if states:
            problems.append("server connections not idle after all clients left: %r"
                            % (states,))
        if locks:
            problems.append("locks held after all clients left: %r" % (locks,))
        if clients:
            problems.append("clients still at pgdoorman after they all left: %r"
                            % ([(c.get("addr"), c.get("port"), c.get("state")) for c in clients],))
        sockets_after = socket_fds(pid) if pid else 0
        # The listening sockets and up to pool_size server connections may remain.
        if sockets_after > sockets_before + POOL_SIZE:
            problems.append("socket fds at pgdoorman: %d before, %d after"
                            % (sockets_before, sockets_after))
        growth = rss_mb(pid) - rss_before if pid else 0
        if growth > RSS_GROWTH_MB:
            problems.append("pgdoorman RSS grew by %.0f MB" % growth)
        # And the rows the hostiles locked can be locked again at once.
        with pg.connect_super(db=DB) as conn:
            conn.execute("SET lock_timeout = '2s'")
            try:
                conn.execute("UPDATE hostile_rows SET v = v")
            except Exception as e:  # noqa: BLE001 - reported
                problems.append("hostile_rows still locked: %s" % e)
    log = d.log()
    if "Traceback" in log or "Unhandled" in log:
        i = log.find("Traceback") if "Traceback" in log else log.find("Unhandled")
        problems.append("pgdoorman logged a traceback:\n%s" % log[max(0, i - 500):i + 2500])

    if problems and d.alive():
        # What the servers were doing, for the diagnosis.
        with pg.connect_super() as conn:
            rows = conn.execute(
                "SELECT pid, state, wait_event, left(query, 60) FROM pg_stat_activity "
                "WHERE usename = %s AND backend_type = 'client backend'", [user]).fetchall()
        problems.append("the user's backends at the end: %r" % (rows,))
        if pid:
            import psycopg
            with psycopg.connect(d.dsn("admin", "pgdoorman", "admin"), autocommit=True) as a:
                cur = a.execute("SHOW SERVERS")
                names = [c.name for c in cur.description]
                problems.append("SHOW SERVERS at the end: %r" % (
                    [dict(zip(names, r)) for r in cur.fetchall()],))
    if problems:
        open("/tmp/hostile_pgdoorman.log", "w").write(log)
        first = min([at for at, _, _ in canaries.errors] or [time.monotonic()])
        recent = [(round(s - started, 2), round(e - started, 2), w, k, sd)
                  for s, e, w, k, sd in hostiles.log if s <= first and e >= first - 3]
        counts = {}
        for _, _, _, k, _ in hostiles.log:
            counts[k] = counts.get(k, 0) + 1
        pytest.fail("PGDOORMAN_HOSTILE_SEED=%d (%ss, %d workers): %d problem(s):\n%s\n\n"
                    "attacks around the first canary error (start, end, worker, kind, seed):"
                    "\n%s\nattacks run: %r\ncanary rounds: %r\npgdoorman log tail:\n%s"
                    % (seed, seconds, workers, len(problems), "\n".join(problems),
                       "\n".join(map(repr, recent[-40:])), counts, canaries.rounds,
                       log[-3000:]))
    return hostiles, canaries


@pytest.mark.timeout(int(SECONDS) + 120)
def test_hostile_clients_cost_canaries_nothing(pg, pgdoorman, hostile_db, tmp_path):
    run_hostile(pg, pgdoorman, hostile_db, tmp_path, SEED, SECONDS, WORKERS, KINDS)
