"""
PGDOORMAN_RUNTIME (issue 14): the `pgdoorman` command started on CPython replaces itself with
PyPy when asked to, and says so; a missing or wrong PyPy is a clear error, not a silent
CPython.  The packages' unit reads the variables from /etc/default/pgdoorman.
"""

import os
import subprocess
import sys

import pytest

from conftest import REPO, doorman_env, psql, simple_config, write_config

PYPY = os.path.join(REPO, ".venv-pypy", "bin", "python")


def need_pypy():
    if not os.access(PYPY, os.X_OK):
        pytest.fail("%s is missing (sh tools/test-deps.sh creates .venv-pypy)" % PYPY)


def check(config_path, **env):
    """`python -m pgdoorman -t CONFIG` on CPython with C{env}: (status, stdout, stderr)."""
    e = doorman_env()
    for key in ("PGDOORMAN_RUNTIME", "PGDOORMAN_PYPY"):
        e.pop(key, None)
    e.update(env)
    out = subprocess.run([sys.executable, "-m", "pgdoorman", "-t", config_path],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=e, text=True,
                         timeout=120)
    return out.returncode, out.stdout, out.stderr


@pytest.fixture
def config_path(pg, new_user, tmp_path):
    user, password = new_user()
    return write_config(tmp_path, simple_config(pg, user, password))


def test_pypy_runs_the_check(config_path):
    need_pypy()
    status, out, err = check(config_path, PGDOORMAN_RUNTIME="pypy", PGDOORMAN_PYPY=PYPY)
    assert status == 0, out + err
    assert "running on PyPy 3." in err and PYPY in err, err
    assert "valid" in out, out


def test_auto_without_pypy_stays_on_cpython(config_path, tmp_path):
    status, out, err = check(config_path, PGDOORMAN_RUNTIME="auto",
                             PGDOORMAN_PYPY=str(tmp_path / "no-such-pypy"))
    assert status == 0, out + err
    assert "PyPy" not in err, err


def test_pypy_required_but_missing_is_an_error(config_path, tmp_path):
    missing = str(tmp_path / "no-such-pypy")
    status, out, err = check(config_path, PGDOORMAN_RUNTIME="pypy", PGDOORMAN_PYPY=missing)
    assert status == 1
    assert "PGDOORMAN_RUNTIME=pypy" in err and missing in err, err


def test_pypy_that_is_not_pypy_is_an_error(config_path):
    # A CPython where PyPy was promised: refused, no exec loop.
    status, out, err = check(config_path, PGDOORMAN_RUNTIME="pypy",
                             PGDOORMAN_PYPY=sys.executable)
    assert status == 1
    assert "is not PyPy" in err and "CPython" in err, err


def test_unknown_runtime_is_an_error(config_path):
    status, out, err = check(config_path, PGDOORMAN_RUNTIME="jython")
    assert status == 1
    assert "PGDOORMAN_RUNTIME must be auto, pypy or python3, not 'jython'" in err, err


def test_auto_serves_clients_on_pypy(pg, new_user, pgdoorman, monkeypatch):
    need_pypy()
    monkeypatch.setenv("PGDOORMAN_RUNTIME", "auto")
    monkeypatch.setenv("PGDOORMAN_PYPY", PYPY)
    user, password = new_user()
    d = pgdoorman(simple_config(pg, user, password))
    out = psql(d, user, "db1", password, "SELECT 40 + 2")
    assert out.returncode == 0 and out.stdout.strip() == "42", out.stderr
    # The process we started is the one serving, now a PyPy executable.
    exe = os.path.realpath("/proc/%d/exe" % d.proc.pid)
    assert "pypy" in os.path.basename(exe), exe
    assert "running on PyPy" in d.log()
