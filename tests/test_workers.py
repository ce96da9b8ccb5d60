"""
worker_threads: N worker processes on one port sharing one pool budget (pgdoorman.workers,
pgdoorman.budget), through the real pooler with psycopg against PostgreSQL.

Which worker serves a connection is read from the BackendKeyData pid the pooler gave it (the
worker's tag is its top byte), as a user could with pg_backend_pid() on the client side.
"""

import os
import signal
import sys
import threading
import time
import urllib.request

import psycopg
import pytest

from conftest import BackendSampler, Background, simple_config, wait_until


def worker_of(conn):
    """Which worker holds this client: the top byte of the pid the pooler gave out."""
    return (conn.info.backend_pid >> 24) - 1


def children(pid):
    """Pids of the processes whose parent is C{pid}."""
    out = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open("/proc/%s/stat" % name) as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(name))
    return sorted(out)


def connect_spread(d, user, password, n, workers=2, tries=60):
    """C{n} connections or more until each of C{workers} workers holds at least one."""
    conns = []
    for _ in range(tries):
        conns.append(d.connect(user, "db1", password))
        seen = {worker_of(c) for c in conns}
        if len(conns) >= n and len(seen) >= workers:
            return conns
    pytest.fail("connections never reached %d workers: %s"
                % (workers, sorted(worker_of(c) for c in conns)))


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PYPY = os.path.join(REPO, ".venv-pypy", "bin", "python")
#: The supervisor starts its workers on its own interpreter.
PYTHONS = [pytest.param(sys.executable, id="cpython"), pytest.param(PYPY, id="pypy")]


def two_workers(pg, new_user, pgdoorman, pool_size=3, mode="transaction", general=None,
                python=sys.executable, **kw):
    if not os.path.exists(python):
        pytest.fail("%s is missing (tools/test-deps.sh creates .venv-pypy)" % python)
    user, password = new_user()
    g = {"worker_threads": 2}
    g.update(general or {})
    d = pgdoorman(simple_config(pg, user, password, pool_size=pool_size, mode=mode,
                                general=g, **kw), argv=[python, "-m", "pgdoorman", "{config}"])
    wait_workers(d)
    return d, user, password


def wait_workers(d, n=2):
    """Until the supervisor says its C{n} workers accept (PyPy takes seconds to start)."""
    wait_until(lambda: "with %d workers" % n in d.log(), timeout=60,
               message="%d workers accepting" % n)
    assert len(children(d.proc.pid)) == n


@pytest.mark.timeout(120)
@pytest.mark.parametrize("python", PYTHONS)
def test_two_workers_never_exceed_pool_size(pg, new_user, pgdoorman, python):
    """40 clients on 2 workers, pool_size 3: never more than 3 backends, every query answered."""
    d, user, password = two_workers(pg, new_user, pgdoorman, pool_size=3, python=python)
    conns = connect_spread(d, user, password, 40)
    assert {worker_of(c) for c in conns} == {0, 1}
    errors = []
    answers = []

    def work(conn, i):
        try:
            for j in range(5):
                row = conn.execute("SELECT %s::int * 10 + %s::int, pg_sleep(0.01)",
                                   [i, j]).fetchone()
                answers.append(row[0] == i * 10 + j)
        except Exception as e:  # reported below
            errors.append(e)

    with BackendSampler(pg, user) as sampler:
        threads = [threading.Thread(target=work, args=(c, i)) for i, c in enumerate(conns)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        peak = sampler.stop()
    assert not errors, errors[:3]
    assert len(answers) == 5 * len(conns) and all(answers)
    assert 1 <= peak <= 3, "peak %d backends for pool_size 3 over two workers" % peak
    for c in conns:
        c.close()


@pytest.mark.timeout(60)
def test_worker_threads_one_is_a_single_process(pg, new_user, pgdoorman):
    user, password = new_user()
    d = pgdoorman(simple_config(pg, user, password, general={"worker_threads": 1}))
    with d.connect(user, "db1", password) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)
    assert children(d.proc.pid) == []


def on_worker(conns, index):
    return [c for c in conns if worker_of(c) == index]


def admin_show(d, what):
    from psycopg.rows import dict_row
    with psycopg.connect(d.dsn("admin", "pgdoorman", "admin"), autocommit=True,
                         row_factory=dict_row) as conn:
        return conn.execute("SHOW %s" % what).fetchall()


def run_together(conns, sql):
    """C{sql} on every connection at once; (seconds taken, errors)."""
    errors = []

    def one(c):
        try:
            c.execute(sql)
        except Exception as e:
            errors.append(e)

    started = time.monotonic()
    threads = [threading.Thread(target=one, args=(c,)) for c in conns]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    return time.monotonic() - started, errors


@pytest.mark.timeout(120)
@pytest.mark.parametrize("python", PYTHONS)
def test_idle_servers_move_to_the_worker_where_clients_wait(pg, new_user, pgdoorman, python):
    """
    Uneven disconnects: worker A's clients leave A holding the whole budget in idle servers;
    a client on worker B gets a server at once (A sheds one), within pool_size.
    """
    d, user, password = two_workers(pg, new_user, pgdoorman, pool_size=2,
                                    general={"idle_timeout": "10m"}, python=python)
    conns = connect_spread(d, user, password, 3)
    a = worker_of(conns[0])
    on_a = on_worker(conns, a)
    while len(on_a) < 2:
        c = d.connect(user, "db1", password)
        conns.append(c)
        on_a = on_worker(conns, a)
    on_b = [c for c in conns if worker_of(c) != a]
    took, errors = run_together(on_a[:2], "SELECT pg_sleep(0.3)")
    assert not errors and took < 3
    assert pg.count_backends(user) == 2  # A holds both slots, idle now
    for c in on_a:
        c.close()
    with BackendSampler(pg, user) as sampler:
        started = time.monotonic()
        assert on_b[0].execute("SELECT 42").fetchone() == (42,)
        waited = time.monotonic() - started
        took, errors = run_together(on_b[:1] + [d.connect(user, "db1", password)
                                                for _ in range(3)], "SELECT pg_sleep(0.2)")
        peak = sampler.stop()
    assert waited < 2.0, "the client on the other worker waited %.1fs" % waited
    assert not errors, errors
    assert peak <= 2


@pytest.mark.timeout(120)
def test_cancel_reaches_the_worker_holding_the_client(pg, new_user, pgdoorman):
    """conn.cancel() opens a new connection, which may land on the other worker: it works."""
    user, password = new_user()
    d = pgdoorman(simple_config(pg, user, password, pool_size=4,
                                general={"worker_threads": 2}),
                  argv=[sys.executable, "-m", "pgdoorman", "-l", "debug", "{config}"])
    wait_workers(d)
    conns = connect_spread(d, user, password, 2)
    forwarded = 0
    for attempt in range(12):
        conn = conns[attempt % len(conns)]
        q = Background(conn.execute, "SELECT pg_sleep(20)")
        wait_until(lambda: any(b["state"] == "active" for b in pg.backends(user)),
                   message="the query running")
        conn.cancel()
        err = q.error(10)
        assert isinstance(err, psycopg.errors.QueryCanceled), err
        assert q.elapsed < 8
        assert conn.execute("SELECT 1").fetchone() == (1,)
        forwarded = d.log().count("cancel request passed on to worker")
        if forwarded >= 2 and attempt >= 3:
            break
    assert forwarded >= 1, "no cancel ever landed on the other worker in 12 tries"


@pytest.mark.timeout(120)
def test_show_and_metrics_count_every_worker(pg, new_user, pgdoorman):
    from conftest import free_port
    user, password = new_user()
    mport = free_port()
    cfg = simple_config(pg, user, password, pool_size=4, general={"worker_threads": 2})
    cfg["prometheus"] = {"enabled": True, "host": "127.0.0.1", "port": mport}
    d = pgdoorman(cfg)
    wait_workers(d)
    conns = connect_spread(d, user, password, 6)
    for c in conns:
        for _ in range(3):
            c.execute("SELECT 1")
    rows = [r for r in admin_show(d, "POOLS") if r["user"] == user]
    assert len(rows) == 1, rows
    assert rows[0]["cl_active"] + rows[0]["cl_waiting"] == len(conns)
    assert rows[0]["pool_size"] == 4
    stats = [r for r in admin_show(d, "STATS") if r["database"] == "db1"]
    assert stats and stats[0]["total_query_count"] >= 3 * len(conns)
    clients = [r for r in admin_show(d, "CLIENTS") if r["user"] == user]
    assert len(clients) == len(conns)
    text = urllib.request.urlopen("http://127.0.0.1:%d/metrics" % mport, timeout=10).read()
    text = text.decode()
    lines = {ln.rpartition(" ")[0]: float(ln.rpartition(" ")[2]) for ln in text.splitlines()
             if ln and not ln.startswith("#")}
    key = 'pg_doorman_pools_clients{database="db1",status="idle",user="%s"}' % user
    assert lines[key] == len(conns), text
    assert lines['pg_doorman_connections_total{type="client"}'] >= len(conns)
    assert lines["pg_doorman_workers"] == 2
    queries = 'pg_doorman_pools_queries_total{database="db1",user="%s"}' % user
    assert lines[queries] >= 3 * len(conns)


@pytest.mark.timeout(120)
def test_dead_worker_is_replaced_and_its_slots_freed(pg, new_user, pgdoorman):
    d, user, password = two_workers(pg, new_user, pgdoorman, pool_size=2)
    conns = connect_spread(d, user, password, 2)
    both = [on_worker(conns, 0)[0], on_worker(conns, 1)[0]]
    took, errors = run_together(both, "SELECT pg_sleep(0.3)")
    assert not errors and pg.count_backends(user) == 2  # one slot held by each worker
    before = children(d.proc.pid)
    victim = before[0]
    os.kill(victim, signal.SIGKILL)
    wait_until(lambda: len(children(d.proc.pid)) == 2 and victim not in children(d.proc.pid),
               timeout=20, message="a new worker in place of the killed one")
    wait_until(lambda: pg.count_backends(user) <= 1, message="the dead worker's backend gone")
    # Both slots are usable again: two queries of a second each run side by side.
    fresh = []
    while True:
        fresh.append(d.connect(user, "db1", password))
        same = [c for c in fresh if worker_of(c) == worker_of(fresh[-1])]
        if len(same) == 2:
            break
    with BackendSampler(pg, user) as sampler:
        took, errors = run_together(same, "SELECT pg_sleep(1)")
        peak = sampler.stop()
    assert not errors, errors
    assert took < 1.8, "the two queries ran one after the other (%.1fs): a slot leaked" % took
    assert peak <= 2


@pytest.mark.timeout(120)
def test_sighup_reaches_every_worker(pg, new_user, pgdoorman):
    """pool_size 1 -> 3 by SIGHUP to the supervisor: three queries side by side afterwards."""
    d, user, password = two_workers(pg, new_user, pgdoorman, pool_size=1)
    conns = connect_spread(d, user, password, 6)
    took, errors = run_together(conns[:2], "SELECT pg_sleep(0.5)")
    assert not errors and took >= 0.95  # one slot: one after the other
    import yaml
    with open(d.config_path) as f:
        cfg = yaml.safe_load(f)
    cfg["pools"]["db1"]["users"][0]["pool_size"] = 3
    with open(d.config_path, "w") as f:
        yaml.safe_dump(cfg, f)
    os.kill(d.proc.pid, signal.SIGHUP)
    wait_until(lambda: d.log().count("configuration reloaded") >= 2, message="both reloaded")
    for w in (0, 1):
        group = on_worker(conns, w)
        while len(group) < 3:
            c = d.connect(user, "db1", password)
            conns.append(c)
            group = on_worker(conns, w)
        took, errors = run_together(group[:3], "SELECT pg_sleep(0.6)")
        assert not errors and took < 1.1, "worker %d: %.1fs for three queries" % (w, took)


@pytest.mark.timeout(60)
def test_sigterm_stops_every_worker_after_the_clients_leave(pg, new_user, pgdoorman):
    d, user, password = two_workers(pg, new_user, pgdoorman, pool_size=2)
    conns = connect_spread(d, user, password, 2)
    workers = children(d.proc.pid)
    # As systemd stops the unit (KillMode=control-group): SIGTERM to every process at once.
    # The workers must still wait for their clients, not take it as a second SIGTERM.
    os.kill(d.proc.pid, signal.SIGTERM)
    for pid in workers:
        os.kill(pid, signal.SIGTERM)
    time.sleep(0.5)
    for c in conns:  # connected clients are still served
        assert c.execute("SELECT 7").fetchone() == (7,)

    def refused():
        try:
            d.connect(user, "db1", password).close()
        except psycopg.OperationalError:
            return True
        return False

    wait_until(refused, timeout=5, message="new connections refused")
    assert d.proc.poll() is None
    for c in conns:
        c.close()
    assert d.proc.wait(10) == 0
    for pid in workers:
        assert not os.path.exists("/proc/%d" % pid) or \
            open("/proc/%d/stat" % pid).read().rsplit(")", 1)[1].split()[0] == "Z"


def set_pool_size(d, size):
    import yaml
    with open(d.config_path) as f:
        cfg = yaml.safe_load(f)
    cfg["pools"]["db1"]["users"][0]["pool_size"] = size
    with open(d.config_path, "w") as f:
        yaml.safe_dump(cfg, f)


@pytest.mark.timeout(120)
def test_admin_reload_and_shutdown_reach_every_worker(pg, new_user, pgdoorman):
    d, user, password = two_workers(pg, new_user, pgdoorman, pool_size=1)
    conns = connect_spread(d, user, password, 2)
    set_pool_size(d, 3)
    with psycopg.connect(d.dsn("admin", "pgdoorman", "admin"), autocommit=True) as admin:
        admin.execute("RELOAD")
    wait_until(lambda: d.log().count("configuration reloaded") >= 2, message="both reloaded")
    for w in (0, 1):
        group = on_worker(conns, w)
        while len(group) < 3:
            conns.append(d.connect(user, "db1", password))
            group = on_worker(conns, w)
        took, errors = run_together(group[:3], "SELECT pg_sleep(0.6)")
        assert not errors and took < 1.1, "worker %d: %.1fs for three queries" % (w, took)
    for c in conns:
        c.close()
    with psycopg.connect(d.dsn("admin", "pgdoorman", "admin"), autocommit=True) as admin:
        admin.execute("SHUTDOWN")
    assert d.proc.wait(15) == 0


@pytest.mark.timeout(120)
def test_sigusr2_replaces_the_workers_without_refusing_anyone(pg, new_user, pgdoorman):
    """Rolling upgrade: new workers first, old ones leave when their clients have."""
    d, user, password = two_workers(pg, new_user, pgdoorman, pool_size=4)
    old_conns = connect_spread(d, user, password, 2)
    old = children(d.proc.pid)
    os.kill(d.proc.pid, signal.SIGUSR2)
    wait_until(lambda: len(children(d.proc.pid)) == 4, timeout=30, message="new workers")
    # New clients reach the new workers (tags 2 and 3) while the old ones still serve theirs.
    def new_worker_serves():
        c = d.connect(user, "db1", password)
        try:
            return worker_of(c) in (2, 3) and c.execute("SELECT 5").fetchone() == (5,)
        finally:
            c.close()
    wait_until(new_worker_serves, timeout=20, message="a new worker serving")
    for c in old_conns:
        assert c.execute("SELECT 6").fetchone() == (6,)
        c.close()
    wait_until(lambda: len(children(d.proc.pid)) == 2 and
               not set(old) & set(children(d.proc.pid)), timeout=20,
               message="the old workers gone")
    with d.connect(user, "db1", password) as c:
        assert worker_of(c) in (2, 3)


@pytest.mark.timeout(120)
def test_max_db_connections_holds_over_all_workers(pg, new_user, pgdoorman):
    """Two users of one database, pool_size 2 each, max_db_connections 2, two workers."""
    from conftest import make_config, pool_entry, user_entry
    users = [new_user(), new_user()]
    entries = [user_entry(u, p, 2, server_username=u, server_password=pg.passwords.get(u, p))
               for u, p in users]
    cfg = make_config({"db1": pool_entry(pg, entries, max_db_connections=2)},
                      worker_threads=2, query_wait_timeout="20s")
    d = pgdoorman(cfg)
    wait_workers(d)
    conns = []
    for u, p in users:
        conns += connect_spread(d, u, p, 4)
    names = [u for u, _ in users]
    peak = [0]
    stop = threading.Event()

    def sample():
        with pg.connect_super() as c:
            while not stop.is_set():
                n = c.execute("SELECT count(*) FROM pg_stat_activity WHERE backend_type = "
                              "'client backend' AND usename = ANY(%s)", [names]).fetchone()[0]
                peak[0] = max(peak[0], n)
                time.sleep(0.01)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        took, errors = run_together(conns, "SELECT pg_sleep(0.1)")
        took2, errors2 = run_together(conns, "SELECT pg_sleep(0.1)")
    finally:
        stop.set()
        sampler.join(10)
    assert not errors and not errors2, (errors + errors2)[:3]
    assert 1 <= peak[0] <= 2, "peak %d backends for max_db_connections 2" % peak[0]


@pytest.mark.timeout(120)
def test_reload_changes_the_number_of_workers(pg, new_user, pgdoorman):
    import yaml
    d, user, password = two_workers(pg, new_user, pgdoorman, pool_size=2)
    with open(d.config_path) as f:
        cfg = yaml.safe_load(f)
    cfg["general"]["worker_threads"] = 3
    with open(d.config_path, "w") as f:
        yaml.safe_dump(cfg, f)
    os.kill(d.proc.pid, signal.SIGHUP)
    wait_until(lambda: len(children(d.proc.pid)) == 3, timeout=30, message="a third worker")
    seen = set()

    def three_seen():
        with d.connect(user, "db1", password) as c:
            seen.add(worker_of(c))
        return seen == {0, 1, 2}

    wait_until(three_seen, timeout=30, interval=0.05, message="clients on three workers")
    cfg["general"]["worker_threads"] = 1
    with open(d.config_path, "w") as f:
        yaml.safe_dump(cfg, f)
    os.kill(d.proc.pid, signal.SIGHUP)
    wait_until(lambda: len(children(d.proc.pid)) == 1, timeout=30, message="one worker left")
    with d.connect(user, "db1", password) as c:
        assert c.execute("SELECT 1").fetchone() == (1,)


@pytest.mark.timeout(120)
def test_admin_reconnect_kill_and_resume_reach_every_worker(pg, new_user, pgdoorman):
    d, user, password = two_workers(pg, new_user, pgdoorman, pool_size=2)
    conns = connect_spread(d, user, password, 2)
    both = [on_worker(conns, 0)[0], on_worker(conns, 1)[0]]
    took, errors = run_together(both, "SELECT pg_sleep(0.3)")
    assert not errors
    old = {b["pid"] for b in pg.backends(user)}
    assert len(old) == 2  # one idle server in each worker

    def admin(sql):
        with psycopg.connect(d.dsn("admin", "pgdoorman", "admin"), autocommit=True) as a:
            a.execute(sql)

    admin("RECONNECT db1")
    wait_until(lambda: not old & {b["pid"] for b in pg.backends(user)}, timeout=10,
               message="both workers' servers closed")
    admin("KILL db1")
    for c in both:
        with pytest.raises(psycopg.OperationalError):
            c.execute("SELECT 1")
    admin("RESUME db1")
    fresh = connect_spread(d, user, password, 2)
    for c in fresh:
        assert c.execute("SELECT 3").fetchone() == (3,)


@pytest.mark.timeout(120)
def test_admin_pause_waits_for_the_transactions_of_every_worker(pg, new_user, pgdoorman):
    d, user, password = two_workers(pg, new_user, pgdoorman, pool_size=4)
    conns = []
    while not (on_worker(conns, 0) and on_worker(conns, 1)):
        conns.append(d.connect(user, "db1", password, autocommit=False))
    in_tx = [on_worker(conns, 0)[0], on_worker(conns, 1)[0]]
    admin = psycopg.connect(d.dsn("admin", "pgdoorman", "admin"), autocommit=True)
    # Both orders with one console: in one of them the console's own worker finishes first
    # and the answer must wait for the other worker's transaction.
    for first, second in (in_tx, in_tx[::-1]):
        for c in in_tx:
            c.execute("SELECT 1")  # a transaction holding a server, in each worker
        pause = Background(admin.execute, "PAUSE db1")
        time.sleep(1.0)
        assert not pause.done()
        first.commit()
        time.sleep(1.0)
        assert not pause.done(), "PAUSE answered with a transaction still open in a worker"
        second.commit()
        pause.result(10)
        admin.execute("RESUME db1")
    admin.close()
    for c in in_tx:
        assert c.execute("SELECT 2").fetchone() == (2,)
        c.commit()
