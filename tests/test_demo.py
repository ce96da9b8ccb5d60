"""
`make run` (tools/demo.py): pgdoorman in front of a throwaway cluster, on PyPy when .venv-pypy
works (issue 14), on the interpreter PGDOORMAN_PYTHON names otherwise; it says which, serves
psql 'postgresql://app:app@127.0.0.1:PORT/app', and SIGTERM cleans up.
"""

import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import PSQL, REPO
from pgcluster import free_port

PYPY = os.path.join(REPO, ".venv-pypy", "bin", "python")


def run_demo(tmp_path, **env):
    port = free_port()
    e = dict(os.environ, PGDOORMAN_PORT=str(port), PYTHONUNBUFFERED="1")
    e.pop("PGDOORMAN_PYTHON", None)
    e.update(env)
    out_path = tmp_path / "demo.out"
    out = open(out_path, "w")
    proc = subprocess.Popen([sys.executable, os.path.join(REPO, "tools", "demo.py")],
                            stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            env=e)
    out.close()
    return proc, port, out_path


def connect_when_up(proc, port, out_path, timeout=90):
    """psql SELECT through the demo's pgdoorman, retried until it listens."""
    deadline = time.monotonic() + timeout
    while True:
        assert proc.poll() is None, out_path.read_text()
        r = subprocess.run([PSQL, "-X", "-A", "-t", "-c", "SELECT current_user || 42",
                            "postgresql://app:app@127.0.0.1:%d/app" % port],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                           env=dict(os.environ, PGCONNECT_TIMEOUT="5"))
        if r.returncode == 0:
            return r.stdout.strip()
        assert time.monotonic() < deadline, r.stderr + out_path.read_text()
        time.sleep(0.5)


def stop(proc, out_path):
    proc.send_signal(signal.SIGTERM)
    try:
        status = proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        pytest.fail("demo did not stop on SIGTERM:\n" + out_path.read_text())
    text = out_path.read_text()
    assert status == 0, text
    data_dir = [line.split("(data in ", 1)[1].rstrip(")") for line in text.splitlines()
                if "(data in " in line]
    assert data_dir and not os.path.exists(data_dir[0]), text


@pytest.mark.timeout(180)
def test_make_run_uses_pypy_when_venv_pypy_works(tmp_path):
    if not os.access(PYPY, os.X_OK):
        pytest.fail("%s is missing (sh tools/test-deps.sh creates .venv-pypy)" % PYPY)
    proc, port, out_path = run_demo(tmp_path)
    try:
        assert connect_when_up(proc, port, out_path) == "app42"
        text = out_path.read_text()
        assert "pgdoorman runs on PyPy 3." in text and PYPY in text, text
        assert "pypy" in os.path.basename(os.path.realpath("/proc/%d/exe" % _child(proc.pid)))
    finally:
        stop(proc, out_path)


@pytest.mark.timeout(180)
def test_make_run_on_the_interpreter_pgdoorman_python_names(tmp_path):
    proc, port, out_path = run_demo(tmp_path, PGDOORMAN_PYTHON=sys.executable)
    try:
        assert connect_when_up(proc, port, out_path) == "app42"
        text = out_path.read_text()
        assert "pgdoorman runs on CPython 3." in text and "PGDOORMAN_PYTHON" in text, text
    finally:
        stop(proc, out_path)


def _child(pid):
    """The demo's pgdoorman: its child running `-m pgdoorman`."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open("/proc/%s/stat" % entry) as f:
                stat = f.read()
            with open("/proc/%s/cmdline" % entry, "rb") as f:
                cmdline = f.read().split(b"\0")
        except OSError:
            continue
        ppid = int(stat[stat.rindex(")") + 2:].split()[1])
        if ppid == pid and b"pgdoorman" in cmdline:
            return int(entry)
    pytest.fail("no pgdoorman child of the demo (pid %d)" % pid)
