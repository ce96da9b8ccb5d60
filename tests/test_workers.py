"""
worker_threads: N worker processes on one port sharing one pool budget (pgdoorman.workers,
pgdoorman.budget), through the real pooler with psycopg against PostgreSQL.

Which worker serves a connection is read from the BackendKeyData pid the pooler gave it (the
worker's tag is its top byte), as a user could with pg_backend_pid() on the client side.
"""

import os
import threading

import pytest

from conftest import BackendSampler, simple_config, wait_until


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


def two_workers(pg, new_user, pgdoorman, pool_size=3, mode="transaction", general=None, **kw):
    user, password = new_user()
    g = {"worker_threads": 2}
    g.update(general or {})
    d = pgdoorman(simple_config(pg, user, password, pool_size=pool_size, mode=mode,
                                general=g, **kw))
    wait_until(lambda: len(children(d.proc.pid)) == 2, message="two worker processes")
    return d, user, password


@pytest.mark.timeout(120)
def test_two_workers_never_exceed_pool_size(pg, new_user, pgdoorman):
    """40 clients on 2 workers, pool_size 3: never more than 3 backends, every query answered."""
    d, user, password = two_workers(pg, new_user, pgdoorman, pool_size=3)
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
    assert len(answers) == 200 and all(answers)
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
