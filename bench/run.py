#!/usr/bin/env python3
"""
Benchmark pgdoorman against PgBouncer and direct PostgreSQL in one interleaved run.

A throwaway PostgreSQL 15 cluster (tools/pgcluster.py), Debian's pgbouncer and one pgdoorman
process per interpreter (CPython, and PyPy with --pypy) are started; then for every
(script, mode, clients) combination pgbench runs against each target back to back.  For the
poolers the CPU time of the pooler process over the run (/proc/PID/stat utime+stime) divided by
the transactions pgbench reports gives the figure of merit, µs of pooler CPU per transaction
(see /work/shared/PERFORMANCE.md), shown with its user and system parts.  --strace adds system
calls per transaction, --profile py-spy flame graphs (bench/profile.sh).  Everything started
here is stopped on exit, Ctrl-C or error.

    .venv/bin/python bench/run.py                 # full run (about 6 minutes)
    .venv/bin/python bench/run.py --quick --pypy  # -S, c50, simple+extended+prepared, 5 s
    .venv/bin/python bench/run.py --pypy --json out.json --markdown out.md
"""

import argparse
import json
import os
import pwd
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tools"))

from pgcluster import PG_BIN, PgCluster, free_port  # noqa: E402

PGBENCH = os.path.join(PG_BIN, "pgbench")
PGBOUNCER = "/usr/sbin/pgbouncer"
PYPY_VENV = os.path.join(ROOT, ".venv-pypy")
PYPY_DEPS = ["twisted", "pyopenssl", "service-identity", "pyyaml", "xxhash", "python-pam", "pyjwt",
             "prometheus-client", "cryptography<44", "six", "tomli"]

BENCH_USER = "bench"
BENCH_PASSWORD = "bench-secret-pw"
BENCH_DB = "bench"

CLK_TCK = os.sysconf("SC_CLK_TCK")
IS_ROOT = os.geteuid() == 0


class BenchError(Exception):
    pass


def log(msg):
    print(msg, file=sys.stderr, flush=True)


# -- processes ----------------------------------------------------------------------------------

def proc_cpu(pid, children=True):
    """
    (utime, stime) of a process (all its threads) in seconds, from /proc/PID/stat, plus its
    living children's (pgdoorman's worker processes with worker_threads > 1).
    """
    with open("/proc/%d/stat" % pid) as f:
        data = f.read()
    # comm (field 2) may contain spaces; fields after the closing paren start at field 3.
    rest = data[data.rindex(")") + 2:].split()
    user, system = int(rest[11]) / CLK_TCK, int(rest[12]) / CLK_TCK
    if children:
        for child in children_of(pid):
            try:
                u, s = proc_cpu(child, children=False)
            except OSError:
                continue
            user, system = user + u, system + s
    return user, system


def children_of(pid):
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open("/proc/%s/stat" % entry) as f:
                data = f.read()
        except OSError:
            continue
        if int(data[data.rindex(")") + 2:].split()[1]) == pid:
            out.append(int(entry))
    return out


def wait_listening(port, proc, name, logfile, timeout=30.0):
    """Wait until 127.0.0.1:port accepts; fail with the process's log if it dies or hangs."""
    import socket
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise BenchError("%s exited with status %s before listening on port %d\n%s"
                             % (name, proc.returncode, port, tail(logfile)))
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise BenchError("%s did not listen on port %d within %.0f s\n%s"
                                 % (name, port, timeout, tail(logfile)))
            time.sleep(0.05)


def tail(path, n=60):
    try:
        with open(path, errors="replace") as f:
            lines = f.readlines()
    except OSError as e:
        return "(no log: %s)" % e
    return "---- %s (last %d lines) ----\n%s----" % (os.path.basename(path), n,
                                                     "".join(lines[-n:]))


class Service:
    """A pooler process we started; stop() kills its whole process group."""

    def __init__(self, name, port, proc, pid, logfile):
        self.name, self.port, self.proc, self.pid, self.logfile = name, port, proc, pid, logfile

    def stop(self):
        if self.proc.poll() is None:
            # Signal the pooler itself first (under runuser, runuser exits when it does), then
            # the whole process group as a fallback.
            for pid, kill in ((self.pid, os.kill), (self.proc.pid, os.killpg)):
                if pid is None:
                    continue
                try:
                    kill(pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
                try:
                    self.proc.wait(3)
                    break
                except subprocess.TimeoutExpired:
                    pass
            try:
                self.proc.wait(2)
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                self.proc.wait(5)

    def check_alive(self):
        if self.proc.poll() is not None:
            raise BenchError("%s died (status %s)\n%s"
                             % (self.name, self.proc.returncode, tail(self.logfile)))


# -- pgbouncer ----------------------------------------------------------------------------------

def ensure_pgbouncer():
    if os.path.exists(PGBOUNCER):
        return
    log("pgbouncer is missing; installing it with apt-get")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    subprocess.run(["apt-get", "update"], check=True, env=env)
    subprocess.run(["apt-get", "install", "-y", "pgbouncer"], check=True, env=env)
    # The package starts a system pgbouncer on 6432; we do not need it.
    subprocess.run(["systemctl", "stop", "pgbouncer"], check=False,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    if not os.path.exists(PGBOUNCER):
        raise BenchError("apt-get install pgbouncer did not provide %s" % PGBOUNCER)


def start_pgbouncer(workdir, pg_port, secret, pool_size):
    ensure_pgbouncer()
    d = os.path.join(workdir, "pgbouncer")
    os.makedirs(d)
    port = free_port()
    ini = os.path.join(d, "pgbouncer.ini")
    users = os.path.join(d, "userlist.txt")
    logfile = os.path.join(d, "pgbouncer.log")
    with open(users, "w") as f:
        f.write('"%s" "%s"\n' % (BENCH_USER, secret))
    with open(ini, "w") as f:
        f.write("""[databases]
%(db)s = host=127.0.0.1 port=%(pg_port)d dbname=%(db)s

[pgbouncer]
listen_addr = 127.0.0.1
listen_port = %(port)d
unix_socket_dir =
auth_type = scram-sha-256
auth_file = %(users)s
pool_mode = transaction
default_pool_size = %(pool)d
max_client_conn = 1000
ignore_startup_parameters = extra_float_digits
logfile = %(log)s
pidfile = %(dir)s/pgbouncer.pid
log_connections = 0
log_disconnections = 0
""" % dict(db=BENCH_DB, pg_port=pg_port, port=port, users=users, pool=pool_size,
           log=logfile, dir=d))
    argv = [PGBOUNCER, ini]
    if IS_ROOT:
        pw = pwd.getpwnam("postgres")
        for p in (d, ini, users):
            os.chown(p, pw.pw_uid, pw.pw_gid)
        os.chmod(users, 0o600)
        argv = ["runuser", "-u", "postgres", "--"] + argv
    out = open(os.path.join(d, "stdout.log"), "w")
    proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            start_new_session=True)
    out.close()
    svc = Service("pgbouncer", port, proc, None, logfile)
    try:
        wait_listening(port, proc, "pgbouncer", logfile)
        # Under runuser the pgbouncer process is a child of runuser; find the real one.
        pid = proc.pid
        for _ in range(50):
            exe = os.path.realpath("/proc/%d/exe" % pid) if os.path.exists("/proc/%d" % pid) else ""
            if exe.endswith("pgbouncer") or "/valgrind/" in exe:  # (bench/instructions.py)
                break
            kids = children_of(pid)
            if kids:
                pid = kids[0]
            else:
                time.sleep(0.05)
        else:
            raise BenchError("cannot find the pgbouncer process under PID %d" % proc.pid)
        svc.pid = pid
    except BaseException:
        svc.stop()
        raise
    return svc


# -- pgdoorman ----------------------------------------------------------------------------------

def ensure_pypy_venv():
    py = os.path.join(PYPY_VENV, "bin", "python")
    if os.path.exists(py):
        return py
    pypy = shutil.which("pypy3")
    if not pypy:
        raise BenchError("--pypy: pypy3 is not installed (apt-get install -y pypy3)")
    log("creating %s" % PYPY_VENV)
    subprocess.run([pypy, "-m", "venv", PYPY_VENV], check=True)
    subprocess.run([os.path.join(PYPY_VENV, "bin", "pip"), "install", "-q"] + PYPY_DEPS,
                   check=True)
    return py


def start_pgdoorman(name, python, workdir, pg_port, client_password, pool_size,
                    vmprof_base=None, workers=1, env_extra=None):
    d = os.path.join(workdir, name)
    os.makedirs(d)
    port = free_port()
    conf = os.path.join(d, "pgdoorman.yaml")
    logfile = os.path.join(d, "pgdoorman.log")
    q = json.dumps  # a JSON string is a valid YAML double-quoted scalar
    with open(conf, "w") as f:
        f.write("""general:
  host: "127.0.0.1"
  port: %(port)d
  admin_username: "admin"
  admin_password: "admin"
  log_client_connections: false
  log_client_disconnections: false
  worker_threads: %(workers)d
pools:
  %(db)s:
    server_host: "127.0.0.1"
    server_port: %(pg_port)d
    pool_mode: "transaction"
    users:
      - username: %(user)s
        password: %(cpw)s
        pool_size: %(pool)d
        server_username: %(user)s
        server_password: %(spw)s
""" % dict(port=port, db=BENCH_DB, pg_port=pg_port, user=q(BENCH_USER), cpw=q(client_password),
           pool=pool_size, spw=q(BENCH_PASSWORD), workers=workers))
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    env.pop("PGDOORMAN_PURE_PYTHON", None)
    env.update(env_extra or {})
    argv = [python, "-m", "pgdoorman", conf]
    if vmprof_base:
        # PyPy under vmprof, switched on and off by SIGUSR1 around each profiled run
        env["PGDOORMAN_VMPROF"] = vmprof_base
        argv = [python, os.path.join(ROOT, "bench", "vmprof_pgdoorman.py"), conf]
    out = open(logfile, "w")
    proc = subprocess.Popen(argv, stdout=out,
                            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=d, env=env,
                            start_new_session=True)
    out.close()
    svc = Service(name, port, proc, proc.pid, logfile)
    try:
        wait_listening(port, proc, "%s (%s -m pgdoorman)" % (name, python), logfile, timeout=60)
    except BaseException:
        svc.stop()
        raise
    return svc


def scanner_of(pid):
    """Which framing scanner a pgdoorman process runs: the compiled one is a loaded .so."""
    try:
        with open("/proc/%d/maps" % pid) as f:
            return ", compiled scanner" if "_cframing" in f.read() else ", pure-Python scanner"
    except OSError:
        return ""


def check_login(svc):
    """One query through the pooler; a pooler that listens but cannot log in is not started."""
    argv = [os.path.join(PG_BIN, "psql"), "-X", "-A", "-t", "-h", "127.0.0.1",
            "-p", str(svc.port), "-U", BENCH_USER, "-d", BENCH_DB, "-c", "SELECT 1"]
    env = dict(os.environ, PGPASSWORD=BENCH_PASSWORD, PGSSLMODE="disable",
               PGCONNECT_TIMEOUT="15")
    try:
        p = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env,
                           timeout=20)
        ok, out = p.returncode == 0 and p.stdout.strip() == b"1", p.stdout.decode(errors="replace")
    except subprocess.TimeoutExpired:
        ok, out = False, "(psql hung for 20 s)"
    if not ok:
        raise BenchError("%s listens on port %d but 'SELECT 1' through it as %s failed:\n%s\n%s"
                         % (svc.name, svc.port, BENCH_USER, out.strip(), tail(svc.logfile)))


# -- pgbench ------------------------------------------------------------------------------------

def run_pgbench(port, script, mode, clients, duration, timeout_extra=None, transactions=None):
    # -T ends the run; only connection set-up and stuck clients take longer.
    if timeout_extra is None:
        timeout_extra = 30 + clients * 0.1
    argv = [PGBENCH, "-n", "-h", "127.0.0.1", "-p", str(port), "-U", BENCH_USER,
            "-M", mode, "-c", str(clients), "-j", "2"]
    argv += ["-t", str(transactions)] if transactions else ["-T", str(duration)]
    if script == "select":
        argv.append("-S")
    argv.append(BENCH_DB)
    env = dict(os.environ, PGPASSWORD=BENCH_PASSWORD, PGSSLMODE="disable",
               PGAPPNAME="pgdoorman-bench")
    try:
        p = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
                           timeout=duration + timeout_extra)
        out, err, rc = p.stdout.decode(errors="replace"), p.stderr.decode(errors="replace"), \
            p.returncode
    except subprocess.TimeoutExpired as e:
        out = (e.stdout or b"").decode(errors="replace")
        err = (e.stderr or b"").decode(errors="replace") + \
            "\npgbench killed after %.0f s" % (duration + timeout_extra)
        rc = "timeout"
    return parse_pgbench(out, err, rc)


def parse_pgbench(out, err, rc):
    res = {"tps": None, "transactions": 0, "failed": 0, "aborted_clients": 0, "rc": rc}
    m = re.search(r"tps = ([0-9.]+) \(without initial connection time\)", out)
    if m:
        res["tps"] = float(m.group(1))
    m = re.search(r"number of transactions actually processed: (\d+)", out)
    if m:
        res["transactions"] = int(m.group(1))
    m = re.search(r"number of failed transactions: (\d+)", out)
    if m:
        res["failed"] = int(m.group(1))
    res["aborted_clients"] = len(re.findall(r"client \d+ .*aborted", err))
    errors = []
    if res["failed"]:
        errors.append("%d failed tx" % res["failed"])
    if res["aborted_clients"]:
        errors.append("%d clients aborted" % res["aborted_clients"])
    if rc == "timeout":
        errors.append("pgbench hung, killed")
    elif rc != 0:
        errors.append("exit %s" % rc)
    if res["tps"] is None:
        errors.append("no tps")
    res["errors"] = ", ".join(errors)
    if errors:
        lines = [line for line in err.splitlines() if line.strip()]
        res["stderr"] = "\n".join(lines[:5] + (["..."] + lines[-3:] if len(lines) > 8 else
                                                lines[5:]))
    return res


# -- syscalls (--strace) -----------------------------------------------------------------------

def parse_strace_c(path):
    """{syscall: calls} from the summary `strace -c -o FILE` writes."""
    calls = {}
    try:
        with open(path) as f:
            lines = f.readlines()
    except OSError:
        return calls
    for line in lines:
        fields = line.split()
        # % time, seconds, usecs/call, calls, [errors,] syscall
        if len(fields) in (5, 6) and fields[0][0].isdigit() and fields[-1] != "total":
            try:
                calls[fields[-1]] = int(fields[3])
            except ValueError:
                pass
    return calls


def strace_run(svc, workdir, script, mode, clients, duration):
    """
    One pgbench run with `strace -c -f` attached to the pooler: system calls per transaction.
    strace slows every system call, so TPS and CPU of this run mean nothing; the counts do
    (connection set-up is included, a few dozen calls per client).
    """
    if not shutil.which("strace"):
        raise BenchError("--strace: strace is not installed (apt-get install -y strace)")
    out = os.path.join(workdir, "strace-%s-%s-%s.txt" % (svc.name, script, mode))
    st = subprocess.Popen(["strace", "-c", "-f", "-q", "-p", str(svc.pid), "-o", out],
                          stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE)
    try:
        time.sleep(0.5)  # attached to every thread by then
        if st.poll() is not None:
            raise BenchError("strace -p %d exited: %s"
                             % (svc.pid, st.stderr.read().decode(errors="replace")))
        res = run_pgbench(svc.port, script, mode, clients, duration)
    finally:
        if st.poll() is None:
            st.send_signal(signal.SIGINT)
        try:
            st.wait(15)
        except subprocess.TimeoutExpired:
            st.kill()
            st.wait()
    calls = parse_strace_c(out)
    n = res["transactions"]
    res["syscalls"] = calls
    res["syscalls_per_tx"] = sum(calls.values()) / n if n and calls else None
    res["top_syscalls"] = [(name, c / n) for name, c in
                           sorted(calls.items(), key=lambda kv: -kv[1])[:5]] if n else []
    return res


def syscall_table(rows):
    lines = ["| pooler | script | mode | clients | transactions | syscalls/tx | top (per tx) "
             "| errors |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append("| %s | %s | %s | %d | %d | %s | %s | %s |" % (
            r["target"], r["script"], r["mode"], r["clients"], r["transactions"],
            fmt(r.get("syscalls_per_tx"), ".1f"),
            ", ".join("%s %.2f" % kv for kv in r.get("top_syscalls", [])), r["errors"]))
    return "\n".join(lines)


# -- py-spy (--profile) -------------------------------------------------------------------------

def find_py_spy(python):
    for cand in (os.path.join(os.path.dirname(python), "py-spy"),
                 os.path.join(os.path.dirname(sys.executable), "py-spy"), shutil.which("py-spy")):
        if cand and os.access(cand, os.X_OK):
            return cand
    raise BenchError("--profile: py-spy not found (%s -m pip install py-spy, or bench/profile.sh)"
                     % sys.executable)


def top_functions(raw_path, n=30):
    """Self and total sample counts per function from py-spy's raw (collapsed) output."""
    self_, total, samples = {}, {}, 0
    with open(raw_path) as f:
        for line in f:
            stack, _, count = line.rstrip("\n").rpartition(" ")
            if not stack or not count.isdigit():
                continue
            count = int(count)
            samples += count
            # "func (path/file.py:123)": one entry per function, whatever the line
            frames = [re.sub(r":\d+\)$", ")", fr) for fr in stack.split(";")]
            self_[frames[-1]] = self_.get(frames[-1], 0) + count
            for fr in set(frames):
                total[fr] = total.get(fr, 0) + count
    out = ["%d samples (py-spy leaves out those of a sleeping thread, e.g. in epoll_wait; a "
           "system call counts as the self time of its caller)" % samples, "",
           "  self%  total%  function"]
    for fr, c in sorted(self_.items(), key=lambda kv: -kv[1])[:n]:
        out.append("%6.1f  %6.1f  %s" % (100.0 * c / samples, 100.0 * total[fr] / samples,
                                         fr.replace(ROOT + "/", "")))
    out += ["", "by total (inclusive):", "  total%  self%  function"]
    for fr, c in sorted(total.items(), key=lambda kv: -kv[1])[:n]:
        out.append("%6.1f  %6.1f  %s" % (100.0 * c / samples, 100.0 * self_.get(fr, 0) / samples,
                                         fr.replace(ROOT + "/", "")))
    return "\n".join(out) + "\n"


def profile_run(svc, py_spy, outdir, script, mode, clients, duration, rate, native):
    """
    One pgbench run with two non-blocking py-spy samplers on the pooler: a flame graph (SVG)
    and the raw collapsed stacks, summarised as a top list of functions.  Non-blocking: the
    pooler is not stopped per sample, so its speed is close to an unprofiled run.
    """
    base = os.path.join(outdir, "%s-%s-%s-c%d" % (svc.name, script, mode, clients))
    common = ["record", "--pid", str(svc.pid), "--rate", str(rate), "--nonblocking",
              "--duration", str(duration + 1)] + (["--native"] if native else [])
    procs = []
    for fmt_, path in (("flamegraph", base + ".svg"), ("raw", base + ".raw")):
        procs.append(subprocess.Popen([py_spy] + common + ["--format", fmt_, "--output", path],
                                      stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                      stderr=open(base + ".%s.log" % fmt_, "w")))
    time.sleep(0.5)
    res = run_pgbench(svc.port, script, mode, clients, duration)
    for p in procs:
        try:
            p.wait(duration + 30)
        except subprocess.TimeoutExpired:
            p.send_signal(signal.SIGINT)
            p.wait(10)
    if not os.path.exists(base + ".raw"):
        raise BenchError("py-spy wrote no %s.raw:\n%s" % (base, tail(base + ".raw.log")))
    with open(base + ".top.txt", "w") as f:
        f.write("py-spy on %s (pid %d), pgbench %s -M %s -c %d -T %d: %s tps%s\n\n"
                % (svc.name, svc.pid, script, mode, clients, duration, fmt(res["tps"], ".0f"),
                   ("  ERRORS: " + res["errors"]) if res["errors"] else ""))
        f.write(top_functions(base + ".raw"))
    for ext in (".flamegraph.log", ".raw.log"):
        if os.path.exists(base + ext) and not os.path.getsize(base + ext):
            os.unlink(base + ext)
    return base


def vmprof_run(svc, outdir, script, mode, clients, duration):
    """
    One pgbench run with vmprof on in the PyPy pgdoorman (bench/vmprof_pgdoorman.py, SIGUSR1
    on and off): OUTDIR/pgdoorman-pypy-...vmprof (`vmprofshow FILE tree` in .venv-pypy) and
    a top list of functions in ...top.txt.  vmprof samples CPU time, every 1 ms.
    """
    svc.check_alive()
    vmprof_run.n = getattr(vmprof_run, "n", 0) + 1
    made = os.path.join(os.path.abspath(outdir), "pgdoorman-pypy.%d.vmprof" % vmprof_run.n)
    os.kill(svc.pid, signal.SIGUSR1)
    time.sleep(0.2)
    try:
        res = run_pgbench(svc.port, script, mode, clients, duration)
    finally:
        os.kill(svc.pid, signal.SIGUSR1)
    time.sleep(0.5)
    svc.check_alive()
    base = os.path.join(outdir, "%s-%s-%s-c%d" % (svc.name, script, mode, clients))
    if not os.path.exists(made):
        raise BenchError("vmprof wrote no %s\n%s" % (made, tail(svc.logfile)))
    os.replace(made, base + ".vmprof")
    top = subprocess.run([os.path.join(PYPY_VENV, "bin", "python"),
                          os.path.join(ROOT, "bench", "vmprof_pgdoorman.py"), "--top",
                          base + ".vmprof"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                         text=True, timeout=300)
    with open(base + ".top.txt", "w") as f:
        f.write("vmprof on %s (pid %d), pgbench %s -M %s -c %d -T %d: %s tps%s\n\n%s"
                % (svc.name, svc.pid, script, mode, clients, duration, fmt(res["tps"], ".0f"),
                   ("  ERRORS: " + res["errors"]) if res["errors"] else "", top.stdout))
    return base


# -- report -------------------------------------------------------------------------------------

def fmt(v, spec):
    return "–" if v is None else format(v, spec)


def ratio(a, b):
    return a / b if a and b else None


def table(results, targets):
    """
    Columns: the TPS, ratios and pooler CPU per transaction (total, user, system) of
    direct/pgbouncer/pgdoorman, then PyPy's group.
    """
    base = [t for t in targets if t != "pgdoorman-pypy"]
    groups = [base] + ([["pgdoorman-pypy"]] if "pgdoorman-pypy" in targets else [])
    cols, getters = ["script", "mode", "clients"], []

    def add(name, get):
        cols.append(name)
        getters.append(get)

    def tps(t):
        return lambda r: fmt(r.get(t, {}).get("tps"), ".0f")

    def rel(t, ref):
        return lambda r: fmt(ratio(r[t].get("tps"), r[ref].get("tps")), ".2f")

    def cpu(t, key):
        return lambda r: fmt(r.get(t, {}).get(key), ".1f")

    for group in groups:
        for t in group:
            add("%s TPS" % t, tps(t))
        for t in group:
            if t.startswith("pgdoorman"):
                for ref in ("pgbouncer", "direct"):
                    if ref in targets:
                        add("%s/%s" % (t, ref), rel(t, ref))
        for t in group:
            if t != "direct":
                add("%s µs/tx" % t, cpu(t, "cpu_us_per_tx"))
                add("%s usr" % t, cpu(t, "user_us_per_tx"))
                add("%s sys" % t, cpu(t, "sys_us_per_tx"))
    lines = ["| " + " | ".join(cols + ["errors"]) + " |", "|" + "---|" * (len(cols) + 1)]
    for row in results:
        r = row["runs"]
        cells = [row["script"], row["mode"], str(row["clients"])] + [g(r) for g in getters]
        cells.append("; ".join("%s: %s" % (t, r[t]["errors"]) for t in targets
                               if r.get(t, {}).get("errors")))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def loadavg():
    try:
        with open("/proc/loadavg") as f:
            return " ".join(f.read().split()[:3])
    except OSError:
        return "?"


def git_rev():
    try:
        return subprocess.run(["git", "-C", ROOT, "describe", "--always", "--dirty"],
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                              text=True).stdout.strip() or "?"
    except OSError:
        return "?"


def interpreter(python):
    try:
        return subprocess.run([python, "-c", "import platform, sys; print("
                               "platform.python_implementation(), platform.python_version())"],
                              stdout=subprocess.PIPE, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return "?"


# -- main ---------------------------------------------------------------------------------------

def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--duration", "-T", type=int, default=5,
                    help="seconds per pgbench run (default 5)")
    ap.add_argument("--clients", default="10,50,200", help="client counts (default 10,50,200)")
    ap.add_argument("--modes", default="simple,extended,prepared",
                    help="pgbench -M modes (default simple,extended,prepared)")
    ap.add_argument("--scripts", default="select,tpcb",
                    help="select (-S) and/or tpcb (the default tpcb-like) (default both)")
    ap.add_argument("--pool-size", type=int, default=20, help="server pool size (default 20)")
    ap.add_argument("--scale", type=int, default=10, help="pgbench -i scale (default 10)")
    ap.add_argument("--pypy", action="store_true",
                    help="also run pgdoorman on PyPy (.venv-pypy, created if missing)")
    ap.add_argument("--python", default=sys.executable,
                    help="interpreter for the CPython pgdoorman (default: this one)")
    ap.add_argument("--targets", default=None,
                    help="comma list of direct,pgbouncer,pgdoorman,pgdoorman-pure (CPython "
                         "on the pure-Python framing scanner),pgdoorman-pypy "
                         "(default: all that apply)")
    ap.add_argument("--workers", default="1",
                    help="comma list of worker_threads for pgdoorman (default 1); each N > 1 "
                         "adds a target pgdoorman-wN (CPython), e.g. --workers 1,2")
    ap.add_argument("--client-auth", choices=["scram", "plain"], default="scram",
                    help="password in pgdoorman's config: the SCRAM secret (default) or plaintext")
    ap.add_argument("--warmup", type=int, default=2,
                    help="seconds of unreported -S warm-up per target and mode (default 2; 0 off)")
    ap.add_argument("--json", metavar="FILE", help="save raw results as JSON")
    ap.add_argument("--markdown", metavar="FILE",
                    help="also write the report (tables, versions, load average) to FILE")
    ap.add_argument("--quick", action="store_true",
                    help="fast comparison: -S only, -c 50, simple+extended+prepared, 5 s")
    ap.add_argument("--strace", action="store_true",
                    help="after the measured runs, one more -S run per pooler and mode with "
                         "strace -c -f attached: system calls per transaction")
    ap.add_argument("--strace-duration", type=int, default=5,
                    help="seconds of each --strace run (default 5)")
    ap.add_argument("--profile", metavar="DIR",
                    help="after the measured runs, one more run per script and mode with py-spy "
                         "on the CPython pgdoorman (DIR/*.svg flame graphs, DIR/*.top.txt) and, "
                         "with pgdoorman-pypy, vmprof on PyPy (DIR/*.vmprof, *.top.txt)")
    ap.add_argument("--profile-duration", type=int, default=10,
                    help="seconds of each --profile run (default 10)")
    ap.add_argument("--profile-rate", type=int, default=250,
                    help="py-spy samples per second (default 250)")
    ap.add_argument("--profile-native", action="store_true",
                    help="py-spy --native: C frames too (slower sampling)")
    args = ap.parse_args(argv)
    if args.quick:
        args.scripts, args.clients, args.modes, args.duration = "select", "50", \
            "simple,extended,prepared", 5
    args.clients = [int(c) for c in args.clients.split(",") if c]
    args.modes = [m for m in args.modes.split(",") if m]
    args.scripts = [s for s in args.scripts.split(",") if s]
    for s in args.scripts:
        if s not in ("select", "tpcb"):
            ap.error("unknown script %r" % s)
    for m in args.modes:
        if m not in ("simple", "extended", "prepared"):
            ap.error("unknown mode %r" % m)
    if args.targets:
        args.targets = [t for t in args.targets.split(",") if t]
    else:
        args.targets = ["direct", "pgbouncer", "pgdoorman"] + (["pgdoorman-pypy"] if args.pypy
                                                                 else [])
    try:
        args.workers = [int(w) for w in args.workers.split(",") if w]
    except ValueError:
        ap.error("--workers wants a comma list of numbers")
    for w in args.workers:
        if w > 1 and "pgdoorman-w%d" % w not in args.targets:
            args.targets.append("pgdoorman-w%d" % w)
    for t in args.targets:
        if t not in ("direct", "pgbouncer", "pgdoorman", "pgdoorman-pure", "pgdoorman-pypy") \
                and not (t.startswith("pgdoorman-w") and t[11:].isdigit()):
            ap.error("unknown target %r" % t)
    if args.profile and "pgdoorman" not in args.targets:
        ap.error("--profile needs the pgdoorman target (py-spy reads CPython only)")
    return args


def main(argv=None):
    args = parse_args(argv)
    if not os.path.exists(PGBENCH):
        raise BenchError("%s not found (PostgreSQL 15 client binaries)" % PGBENCH)

    def on_term(signum, frame):
        raise KeyboardInterrupt("signal %d" % signum)
    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGHUP, on_term)

    n = len(args.scripts) * len(args.modes) * len(args.clients)
    est = (n * len(args.targets) * (args.duration + 1.2) + 30
           + (len(args.modes) * len(args.targets) * (args.warmup + 0.5) if args.warmup else 0))
    log("%d combinations x %d targets x %d s; about %.0f min"
        % (n, len(args.targets), args.duration, est / 60))

    workdir = tempfile.mkdtemp(prefix="pgdoorman-bench-")
    if IS_ROOT:
        pw = pwd.getpwnam("postgres")
        os.chown(workdir, pw.pw_uid, pw.pw_gid)
    os.chmod(workdir, 0o755)
    cluster = None
    services = {}
    try:
        cluster = PgCluster(base_dir=os.path.join(workdir, "pg"))
        cluster.init(settings={"max_connections": "400"}).start()
        cluster.create_user(BENCH_USER, BENCH_PASSWORD)
        cluster.create_database(BENCH_DB, owner=BENCH_USER)
        secret = cluster.password_hash(BENCH_USER)
        assert secret.startswith("SCRAM-SHA-256$"), secret
        log("PostgreSQL on port %d; pgbench -i -s %d" % (cluster.port, args.scale))
        subprocess.run([PGBENCH, "-i", "-q", "-s", str(args.scale), "-h", "127.0.0.1",
                        "-p", str(cluster.port), "-U", BENCH_USER, BENCH_DB],
                       env=dict(os.environ, PGPASSWORD=BENCH_PASSWORD), check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        cluster.psql("VACUUM ANALYZE", db=BENCH_DB)

        ports = {"direct": cluster.port}
        if "pgbouncer" in args.targets:
            services["pgbouncer"] = start_pgbouncer(workdir, cluster.port, secret,
                                                    args.pool_size)
        client_pw = secret if args.client_auth == "scram" else BENCH_PASSWORD
        if "pgdoorman" in args.targets:
            services["pgdoorman"] = start_pgdoorman("pgdoorman", args.python, workdir,
                                                    cluster.port, client_pw, args.pool_size)
        for t in args.targets:
            if t.startswith("pgdoorman-w"):
                services[t] = start_pgdoorman(t, args.python, workdir, cluster.port, client_pw,
                                              args.pool_size, workers=int(t[11:]))
        if "pgdoorman-pure" in args.targets:
            # the same CPython on the pure-Python framing scanner (the compiled one's reference)
            services["pgdoorman-pure"] = start_pgdoorman(
                "pgdoorman-pure", args.python, workdir, cluster.port, client_pw, args.pool_size,
                env_extra={"PGDOORMAN_PURE_PYTHON": "1"})
        if "pgdoorman-pypy" in args.targets:
            pypy = ensure_pypy_venv()
            vmprof_base = None
            if args.profile:
                if subprocess.run([pypy, "-c", "import vmprof"], stdout=subprocess.DEVNULL,
                                  stderr=subprocess.DEVNULL).returncode:
                    raise BenchError("--profile with pgdoorman-pypy needs vmprof in %s "
                                     "(%s -m pip install vmprof, or bench/profile.sh --pypy)"
                                     % (PYPY_VENV, pypy))
                os.makedirs(args.profile, exist_ok=True)
                vmprof_base = os.path.join(os.path.abspath(args.profile), "pgdoorman-pypy")
            services["pgdoorman-pypy"] = start_pgdoorman("pgdoorman-pypy", pypy, workdir,
                                                         cluster.port, client_pw,
                                                         args.pool_size, vmprof_base)
        for name, svc in services.items():
            check_login(svc)
            ports[name] = svc.port
            log("%s on port %d (pid %d)%s" % (name, svc.port, svc.pid, scanner_of(svc.pid)
                                               if name.startswith("pgdoorman") else ""))

        if args.warmup:
            log("warm-up: %d s of -S per target and mode" % args.warmup)
            for mode in args.modes:
                for t in args.targets:
                    res = run_pgbench(ports[t], "select", mode, 10, args.warmup)
                    if res["errors"]:
                        log("warm-up %s -M %s: %s" % (t, mode, res["errors"]))
                        if res.get("stderr"):
                            log("    " + res["stderr"].replace("\n", "\n    "))
            for svc in services.values():
                svc.check_alive()

        # What a login costs each pooler: every measured run starts with max(--clients) of them,
        # and their CPU is in that run's µs/tx (pgbench's TPS leaves connection time out).
        logins = {}
        for t, svc in services.items():
            n = max(args.clients)
            cpu0 = proc_cpu(svc.pid)
            res = run_pgbench(svc.port, "select", "simple", n, 0, transactions=1)
            cpu1 = proc_cpu(svc.pid)
            if not res["errors"]:
                logins[t] = (sum(cpu1) - sum(cpu0)) * 1e3 / n
            log("%s: %s ms of CPU per client login (pgbench -c %d -t 1)%s"
                % (t, fmt(logins.get(t), ".2f"), n,
                   ("  ERRORS: " + res["errors"]) if res["errors"] else ""))

        load_start = loadavg()
        results = []
        for script in args.scripts:
            for mode in args.modes:
                for clients in args.clients:
                    row = {"script": script, "mode": mode, "clients": clients, "runs": {}}
                    for t in args.targets:
                        svc = services.get(t)
                        if svc:
                            svc.check_alive()
                            cpu0 = proc_cpu(svc.pid)
                        t0 = time.monotonic()
                        res = run_pgbench(ports[t], script, mode, clients, args.duration)
                        res["wall_s"] = round(time.monotonic() - t0, 3)
                        if svc:
                            svc.check_alive()
                            cpu1 = proc_cpu(svc.pid)
                            user, system = cpu1[0] - cpu0[0], cpu1[1] - cpu0[1]
                            res["cpu_user_s"], res["cpu_sys_s"] = round(user, 4), round(system, 4)
                            res["cpu_s"] = round(user + system, 4)
                            n = res["transactions"]
                            res["cpu_us_per_tx"] = (user + system) * 1e6 / n if n else None
                            res["user_us_per_tx"] = user * 1e6 / n if n else None
                            res["sys_us_per_tx"] = system * 1e6 / n if n else None
                        row["runs"][t] = res
                        log("%-6s %-8s c%-4d %-15s tps %8s  %s%s" % (
                            script, mode, clients, t, fmt(res["tps"], ".0f"),
                            "%.1f us/tx (usr %.1f sys %.1f)" % (
                                res["cpu_us_per_tx"], res["user_us_per_tx"],
                                res["sys_us_per_tx"]) if res.get("cpu_us_per_tx") else "",
                            ("  ERRORS: " + res["errors"]) if res["errors"] else ""))
                        if res.get("stderr"):
                            log("    " + res["stderr"].replace("\n", "\n    "))
                    results.append(row)
        load_end = loadavg()

        syscalls = []
        if args.strace:
            for mode in args.modes:
                for t in args.targets:
                    svc = services.get(t)
                    if not svc:
                        continue
                    svc.check_alive()
                    res = strace_run(svc, workdir, "select", mode, args.clients[0],
                                     args.strace_duration)
                    svc.check_alive()
                    res.update(target=t, script="select", mode=mode, clients=args.clients[0])
                    syscalls.append(res)
                    log("strace select %-8s c%-4d %-15s %s syscalls/tx  %s%s" % (
                        mode, args.clients[0], t, fmt(res["syscalls_per_tx"], ".1f"),
                        ", ".join("%s %.2f" % kv for kv in res["top_syscalls"]),
                        ("  ERRORS: " + res["errors"]) if res["errors"] else ""))
                    if res.get("stderr"):
                        log("    " + res["stderr"].replace("\n", "\n    "))

        profiles = []
        if args.profile:
            os.makedirs(args.profile, exist_ok=True)
            py_spy = find_py_spy(args.python)
            for script in args.scripts:
                for mode in args.modes:
                    svc = services["pgdoorman"]
                    svc.check_alive()
                    base = profile_run(svc, py_spy, args.profile, script, mode,
                                       max(args.clients), args.profile_duration,
                                       args.profile_rate, args.profile_native)
                    svc.check_alive()
                    profiles.append(base + ".svg")
                    log("py-spy: %s.svg, %s.top.txt" % (base, base))
                    if "pgdoorman-pypy" in services:
                        base = vmprof_run(services["pgdoorman-pypy"], args.profile, script, mode,
                                          max(args.clients), args.profile_duration)
                        profiles.append(base + ".vmprof")
                        log("vmprof: %s.vmprof, %s.top.txt" % (base, base))

        pythons = {"pgdoorman": args.python, "pgdoorman-pure": args.python}
        if "pgdoorman-pypy" in services:
            pythons["pgdoorman-pypy"] = os.path.join(PYPY_VENV, "bin", "python")
        header = ["pgbench -n -j 2 -T %d, scale %d, pool size %d; pooler CPU per transaction "
                  "from /proc/PID/stat (µs/tx = usr + sys)"
                  % (args.duration, args.scale, args.pool_size),
                  "pgdoorman %s; %s; %d CPUs; load average %s at start, %s at end"
                  % (git_rev(), ", ".join("%s on %s" % (t, interpreter(py))
                                          for t, py in pythons.items() if t in services),
                     os.cpu_count() or 0, load_start, load_end)]
        if logins:
            header.append("pooler CPU per client login (SCRAM; pgbench -c %d -t 1, after the "
                          "warm-up): %s ms; each run's µs/tx includes its clients' logins"
                          % (max(args.clients), ", ".join("%s %.2f" % kv
                                                         for kv in logins.items())))
        report = ["\n".join(header), table(results, args.targets)]
        if syscalls:
            report.append("System calls of the pooler process (all threads) per transaction, "
                          "strace -c -f over a separate %d s run (TPS under strace is "
                          "meaningless):\n\n%s" % (args.strace_duration,
                                                     syscall_table(syscalls)))
        if profiles:
            report.append("py-spy profiles (%d s, -c %d):\n\n%s" % (
                args.profile_duration, max(args.clients),
                "\n".join("- %s, %s.top.txt" % (b, b.rsplit(".", 1)[0]) for b in profiles)))
        print()
        print("\n\n".join(report))
        if args.markdown:
            with open(args.markdown, "w") as f:
                f.write("# bench/run.py %s\n\n%s\n" % (
                    time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "\n\n".join(report)))
            log("markdown report in %s" % args.markdown)
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"args": {k: v for k, v in vars(args).items() if k != "json"},
                           "pg_port": cluster.port, "load_average": [load_start, load_end],
                           "login_cpu_ms": logins,
                           "results": results, "syscalls": syscalls}, f, indent=1)
            log("raw results in %s" % args.json)
        return 0
    finally:
        for svc in services.values():
            svc.stop()
        if cluster is not None:
            cluster.destroy()
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    try:
        sys.exit(main())
    except BenchError as e:
        log("bench/run.py: ERROR: %s" % e)
        sys.exit(2)
    except KeyboardInterrupt:
        log("bench/run.py: interrupted; cleaned up")
        sys.exit(130)
