"""
The budget broker's rules (pgdoorman.budget.Broker) and the merging of workers' answers
(pgdoorman.workers), as plain objects: what the supervisor grants, queues and sheds.
The same rules through real processes and PostgreSQL: tests/test_workers.py.
"""

import json

from pgdoorman import budget, workers


class Wire:
    """What the broker sent, as (worker, kind, payload dict)."""

    def __init__(self):
        self.sent = []

    def __call__(self, worker, kind, payload):
        self.sent.append((worker, kind, json.loads(payload)))

    def take(self):
        out, self.sent = self.sent, []
        return [(w, k) for w, k, _ in out]


def acquire(broker, worker, db="db", user="u", size=2, cap=0):
    broker.message(worker, budget.ACQUIRE, json.dumps(
        {"db": db, "user": user, "size": size, "db_cap": cap}).encode())


def free(broker, worker, db="db", user="u", n=1):
    broker.message(worker, budget.FREE, json.dumps({"db": db, "user": user, "n": n}).encode())


def test_grants_up_to_pool_size_then_queues_and_asks_the_holder_to_shed():
    wire = Wire()
    b = budget.Broker(wire)
    acquire(b, 0)
    acquire(b, 0)
    assert wire.take() == [(0, budget.GRANT), (0, budget.GRANT)]
    acquire(b, 1)
    assert wire.take() == [(0, budget.SHED)]  # worker 1 waits; worker 0 is asked for one
    free(b, 0)
    assert wire.take() == [(1, budget.GRANT)]
    assert b.rows() == [("db", "u", 2, 2, 0)]


def test_a_dead_workers_slots_go_to_the_waiting_ones():
    wire = Wire()
    b = budget.Broker(wire)
    for _ in range(2):
        acquire(b, 0)
    acquire(b, 1)
    acquire(b, 1)
    wire.take()
    b.worker_gone(0)
    assert wire.take() == [(1, budget.GRANT), (1, budget.GRANT)]


def test_nothing_to_shed_is_asked_again_on_the_next_tick():
    wire = Wire()
    b = budget.Broker(wire)
    acquire(b, 0, size=1)
    acquire(b, 1, size=1)
    assert wire.take() == [(0, budget.GRANT), (0, budget.SHED)]
    b.message(0, budget.NOTHING, json.dumps({"db": "db", "user": "u"}).encode())
    b.tick()
    assert wire.take() == [(0, budget.SHED)]


def test_max_db_connections_spans_users_and_sheds_the_other_users_idle():
    wire = Wire()
    b = budget.Broker(wire)
    acquire(b, 0, user="a", size=5, cap=2)
    acquire(b, 0, user="a", size=5, cap=2)
    assert wire.take() == [(0, budget.GRANT), (0, budget.GRANT)]
    acquire(b, 1, user="b", size=5, cap=2)
    sent = wire.sent
    assert [(w, k, p["user"]) for w, k, p in sent] == [(0, budget.SHED, "a")]
    wire.take()
    free(b, 0, user="a")
    assert wire.take() == [(1, budget.GRANT)]


def test_show_rows_of_workers_are_summed_by_pool_with_settings_kept():
    columns = [("database", "s"), ("user", "s"), ("cl_active", "i"), ("maxwait", "i"),
               ("pool_size", "i"), ("pool_mode", "s")]
    merged = workers.merge_rows("pools", columns, [
        [["db", "u", 3, 1, 20, "transaction"]],
        [["db", "u", 4, 5, 20, "transaction"], ["db", "v", 1, 0, 10, "session"]]])
    assert sorted(merged) == [["db", "u", 7, 5, 20, "transaction"],
                              ["db", "v", 1, 0, 10, "session"]]
    assert len(workers.merge_rows("clients", columns, [[["a"]], [["b"]]])) == 2


def test_metrics_of_workers_are_summed_except_settings():
    one = ('# TYPE pg_doorman_pool_size gauge\npg_doorman_pool_size{user="u"} 20\n'
           'pg_doorman_pools_queries_total{user="u"} 5.0\n')
    two = 'pg_doorman_pool_size{user="u"} 20\npg_doorman_pools_queries_total{user="u"} 7.0\n'
    text = workers.merge_metrics([one, two])
    assert 'pg_doorman_pool_size{user="u"} 20\n' in text
    assert 'pg_doorman_pools_queries_total{user="u"} 12\n' in text
    assert text.count("# TYPE pg_doorman_pool_size gauge") == 1


def test_cancel_tags_name_the_worker():
    for index in (0, 1, 125):
        pid = (0x123456 & 0xFFFFFF) | workers.tag(index)
        assert 0 < pid < 2 ** 31 and workers.worker_of(pid) == index
    assert workers.worker_of(0x00123456) is None


def _config(value):
    from pgdoorman.config import loads
    return loads("general:\n  admin_password: x\n  worker_threads: %s\n"
                 "pools:\n  db:\n    users:\n      - username: u\n        password: p\n"
                 % value)


def test_worker_threads_auto_is_one_per_core_and_nonsense_is_refused():
    import os

    import pytest

    from pgdoorman.config import ConfigError
    assert workers.count(_config("auto")) == len(os.sched_getaffinity(0))
    assert workers.count(_config(3)) == 3
    assert _config("1").general.worker_threads == 1
    with pytest.raises(ConfigError) as e:
        _config("many")
    assert "worker_threads" in str(e.value) and "auto" in str(e.value)
    with pytest.raises(ConfigError):
        _config(0)
