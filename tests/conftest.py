"""
Fixtures for pgdoorman's behaviour tests.

Everything here is real: a PostgreSQL 15 cluster started from /usr/lib/postgresql/15/bin (see
L{tools/pgcluster.py}), the real pgdoorman process started as a user would start it
(C{python -m pgdoorman CONFIG}), and real clients (psql, pgbench, psycopg, and a small raw
protocol client, L{RawClient}, for what drivers will not send).

Fixtures:
  - C{pg}: one session-wide cluster with md5, SCRAM and cleartext-authenticated users and the
    databases db1, db2 (see L{_make_cluster}); tests that restart PostgreSQL use C{own_pg}.
  - C{new_user}: a fresh role on C{pg} (so that counting its backends in pg_stat_activity is
    not disturbed by other tests).
  - C{pgdoorman}: a factory; C{pgdoorman(config)} writes the config (a dict, or YAML/TOML text)
    to a temporary file, starts the process on a free port, waits until the port accepts and
    stops it (SIGTERM, then SIGKILL) at teardown.

A per-test alarm (C{@pytest.mark.timeout(seconds)}, default 90) turns a hang into a failure.

Setting PGDOORMAN_TEST_DIRECT=1 makes C{pgdoorman()} point at PostgreSQL itself instead of
starting pgdoorman: a way to check that a test's expectations match what PostgreSQL does
(pooling tests will of course fail in that mode).
"""

import base64
import hashlib
import hmac
import itertools
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time

import pytest
import yaml

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "tools"))

import pgcluster  # noqa: E402
from pgcluster import PG_BIN, free_port  # noqa: E402

PSQL = os.path.join(PG_BIN, "psql")
PGBENCH = os.path.join(PG_BIN, "pgbench")
DIRECT = os.environ.get("PGDOORMAN_TEST_DIRECT") == "1"

# Users of the session cluster: name -> (plaintext password, how PostgreSQL stores it,
# how PostgreSQL authenticates it over TCP).
USERS = {
    "u_md5": ("md5-secret", "md5", "md5"),
    "u_scram": ("scram-secret", "scram-sha-256", "scram-sha-256"),
    "u_plain": ("plain-secret", "scram-sha-256", "password"),
}


# -- a per-test alarm -----------------------------------------------------------------------

def pytest_configure(config):
    config.addinivalue_line("markers", "timeout(seconds): fail the test if it runs longer")


class HangTimeout(Exception):
    pass


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item):
    marker = item.get_closest_marker("timeout")
    seconds = int(marker.args[0]) if marker else 90

    def expired(signum, frame):
        raise HangTimeout("test ran longer than %ds (a hang?)" % seconds)

    old = signal.signal(signal.SIGALRM, expired)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


# -- PostgreSQL -----------------------------------------------------------------------------

class Cluster(pgcluster.PgCluster):
    """A L{pgcluster.PgCluster} with helpers the tests share."""

    _counter = itertools.count(1)

    def connect_super(self, db="postgres", **kw):
        import psycopg
        return psycopg.connect(host=self.host, port=self.port, user=self.superuser, dbname=db,
                               autocommit=True, connect_timeout=10, **kw)

    def backends(self, user, db=None):
        """Client backends of C{user} (and C{db}) in pg_stat_activity: list of dict rows."""
        sql = ("SELECT pid, datname, usename, application_name, state, backend_start "
               "FROM pg_stat_activity WHERE backend_type = 'client backend' AND usename = %s")
        args = [user]
        if db:
            sql += " AND datname = %s"
            args.append(db)
        with self.connect_super() as conn:
            cur = conn.execute(sql, args)
            names = [d.name for d in cur.description]
            return [dict(zip(names, row)) for row in cur.fetchall()]

    def count_backends(self, user, db=None):
        return len(self.backends(user, db))

    def new_user(self, method="scram-sha-256", prefix="u"):
        """
        A fresh login role.  C{method}: "scram-sha-256" (stored and authenticated with SCRAM),
        "md5" (stored as md5, authenticated with md5) or "password" (stored as SCRAM,
        authenticated with cleartext).
        """
        name = "%s%d_%s" % (prefix, next(self._counter), method.split("-")[0])
        password = "pw-%s" % name
        self.create_user(name, password, method="md5" if method == "md5" else "scram-sha-256")
        if method == "md5":
            self.psql('GRANT md5users TO "%s"' % name)
        elif method == "password":
            self.psql('GRANT plainusers TO "%s"' % name)
        return name, password


def _make_cluster(hba_extra=()):
    pg = Cluster()
    # Group roles pick the server-side auth method for the users in them.
    pg.init(hba_lines=list(hba_extra) + [
        "host all +md5users 127.0.0.1/32 md5",
        "host all +plainusers 127.0.0.1/32 password",
    ])
    pg.start()
    pg.psql("CREATE ROLE md5users NOLOGIN; CREATE ROLE plainusers NOLOGIN")
    for name, (password, _stored, auth) in USERS.items():
        pg.create_user(name, password, method="md5" if auth == "md5" else "scram-sha-256")
        if auth == "md5":
            pg.psql('GRANT md5users TO "%s"' % name)
        elif auth == "password":
            pg.psql('GRANT plainusers TO "%s"' % name)
    for db in ("db1", "db2"):
        pg.create_database(db)
        pg.psql("GRANT ALL ON SCHEMA public TO PUBLIC", db=db)
    pg.psql("SELECT pg_reload_conf()")
    return pg


@pytest.fixture(scope="session")
def pg():
    cluster = _make_cluster()
    yield cluster
    cluster.destroy()


@pytest.fixture
def own_pg():
    """A function-scoped cluster for tests that stop or restart PostgreSQL."""
    clusters = []

    def make(start=True):
        if start:
            cluster = _make_cluster()
        else:
            # Initialised and configured, then stopped: the caller starts it later with
            # .start().
            cluster = _make_cluster()
            cluster.stop()
        clusters.append(cluster)
        return cluster

    yield make
    for cluster in clusters:
        cluster.destroy()


@pytest.fixture
def new_user(pg):
    return pg.new_user


# -- config helpers -------------------------------------------------------------------------

def user_entry(name, password, pool_size=2, **kw):
    entry = {"username": name, "password": password, "pool_size": pool_size}
    entry.update(kw)
    return entry


def pool_entry(pg, users, mode="transaction", database=None, **kw):
    entry = {"server_host": pg.host, "server_port": pg.port, "pool_mode": mode}
    if database:
        entry["server_database"] = database
    entry.update(kw)
    entry["users"] = users
    return entry


def make_config(pools, **general):
    gen = {"host": "127.0.0.1", "port": 6432, "admin_username": "admin",
           "admin_password": "admin", "query_wait_timeout": "5s", "connect_timeout": "3s"}
    gen.update(general)
    return {"general": gen, "pools": pools}


def simple_config(pg, user, password, db="db1", mode="transaction", pool_size=2,
                  general=None, pool=None, **user_kw):
    """One pool C{db} with one user whose config password is C{password}."""
    user_kw.setdefault("server_username", user)
    user_kw.setdefault("server_password", pg.passwords.get(user, password))
    return make_config(
        {db: pool_entry(pg, [user_entry(user, password, pool_size, **user_kw)], mode=mode,
                        **(pool or {}))},
        **(general or {}))


# -- pgdoorman ------------------------------------------------------------------------------

def wait_port(port, proc=None, log=None, timeout=20.0, host="127.0.0.1"):
    deadline = time.monotonic() + timeout
    while True:
        if proc is not None and proc.poll() is not None:
            pytest.fail("pgdoorman exited with %s before listening; stderr:\n%s"
                        % (proc.returncode, log() if log else ""))
        try:
            with socket.create_connection((host, port), timeout=1):
                return
        except OSError:
            if time.monotonic() > deadline:
                pytest.fail("pgdoorman did not listen on %s:%d within %ss; stderr:\n%s"
                            % (host, port, timeout, log() if log else ""))
            time.sleep(0.05)


def doorman_env():
    env = dict(os.environ)
    env["PYTHONPATH"] = REPO + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["PYTHONUNBUFFERED"] = "1"
    return env


class Doorman:
    """A running pgdoorman process."""

    host = "127.0.0.1"

    def __init__(self, port, config_path, log_path, proc, aliases=None):
        self.aliases = aliases or {}  # only in PGDOORMAN_TEST_DIRECT mode
        self.port = port
        self.config_path = config_path
        self.log_path = log_path
        self.proc = proc

    def log(self):
        if not self.log_path or not os.path.exists(self.log_path):
            return ""
        with open(self.log_path, errors="replace") as f:
            return f.read()

    def dsn(self, user, db, password=None, **kw):
        parts = {"host": self.host, "port": self.port, "user": user,
                 "dbname": self.aliases.get(db, db),
                 "connect_timeout": 10}
        if password is not None:
            parts["password"] = password
        parts.update(kw)
        return " ".join("%s='%s'" % (k, str(v).replace("\\", "\\\\").replace("'", "\\'"))
                        for k, v in parts.items())

    def url(self, user, db, password):
        return "postgresql://%s:%s@%s:%d/%s" % (user, password, self.host, self.port, db)

    def connect(self, user, db, password, autocommit=True, prepare_threshold=None, **kw):
        """A psycopg connection (by default autocommit and without named statements)."""
        import psycopg
        return psycopg.connect(self.dsn(user, db, password, **kw), autocommit=autocommit,
                               prepare_threshold=prepare_threshold)

    def alive(self):
        return self.proc is None or self.proc.poll() is None

    def stop(self, timeout=10):
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else None
        # SIGTERM waits for connected clients to leave (PgBouncer's "super safe" shutdown); a
        # second SIGTERM is the immediate shutdown, so teardown never waits shutdown_timeout.
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(1)
        except subprocess.TimeoutExpired:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
            return None


def write_config(directory, config, name="pgdoorman.yaml", port=None):
    """Write C{config} (dict, or text in which @PORT@ is replaced) and return the path."""
    path = os.path.join(str(directory), name)
    if isinstance(config, dict):
        text = yaml.safe_dump(config, sort_keys=False)
    else:
        text = config.replace("@PORT@", str(port))
    with open(path, "w") as f:
        f.write(text)
    return path


class Starter:
    """C{starter(config)} starts pgdoorman; C{stop_all()} stops what it started."""

    def __init__(self, directory, request):
        self.directory = str(directory)
        self.request = request
        self.started = []

    def __call__(self, config, name="pgdoorman.yaml", argv=None, wait=True, direct_pg=None):
        """
        Start pgdoorman with C{config}.  A dict gets general.host/port filled in; text gets
        every "@PORT@" replaced by the port.  C{argv}: the command line to use instead of
        C{python -m pgdoorman}, with "{config}" replaced by the config's path.
        """
        port = free_port()
        if isinstance(config, dict):
            config = {k: (dict(v) if isinstance(v, dict) else v) for k, v in config.items()}
            config.setdefault("general", {})
            config["general"]["host"] = "127.0.0.1"
            config["general"]["port"] = port
        n = len(self.started)
        path = write_config(self.directory, config, name="%d-%s" % (n, name), port=port)
        if DIRECT:
            pgc = direct_pg or self.request.getfixturevalue("pg")
            aliases = {}
            if isinstance(config, dict):
                aliases = {name: p.get("server_database", name)
                           for name, p in config.get("pools", {}).items()}
            return Doorman(pgc.port, path, None, None, aliases)
        log_path = os.path.join(self.directory, "pgdoorman-%d.stderr" % n)
        cmd = argv or [sys.executable, "-m", "pgdoorman", "{config}"]
        cmd = [a.replace("{config}", path) for a in cmd]
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                    env=doorman_env(), cwd=self.directory)
        d = Doorman(port, path, log_path, proc)
        self.started.append(d)
        if wait:
            wait_port(port, proc, d.log)
        return d

    def stop_all(self):
        for d in self.started:
            d.stop()


@pytest.fixture
def pgdoorman(tmp_path, request):
    starter = Starter(tmp_path, request)
    yield starter
    starter.stop_all()


@pytest.fixture(scope="module")
def module_pgdoorman(tmp_path_factory, request):
    """Like C{pgdoorman}, for one pgdoorman shared by a module's tests."""
    starter = Starter(tmp_path_factory.mktemp("pgdoorman"), request)
    yield starter
    starter.stop_all()


def run_check(config_path, timeout=30):
    """C{python -m pgdoorman -t CONFIG}: (exit status, stdout+stderr)."""
    out = subprocess.run([sys.executable, "-m", "pgdoorman", "-t", config_path],
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=doorman_env(),
                         timeout=timeout)
    return out.returncode, out.stdout.decode(errors="replace")


# -- clients --------------------------------------------------------------------------------

def psql(d, user, db, password, sql=None, args=(), timeout=30, env_extra=None, input=None):
    """Run psql against pgdoorman C{d}; returns CompletedProcess with text stdout/stderr."""
    env = dict(os.environ)
    env.update({"PGPASSWORD": password, "PGCONNECT_TIMEOUT": "10"})
    env.update(env_extra or {})
    cmd = [PSQL, "-X", "-h", d.host, "-p", str(d.port), "-U", user,
           "-d", getattr(d, "aliases", {}).get(db, db),
           "-v", "ON_ERROR_STOP=1", "-A", "-t"]
    if sql is not None:
        cmd += ["-c", sql]
    cmd += list(args)
    return subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
                          timeout=timeout, input=input, text=True)


class Background:
    """Run C{fn} in a daemon thread; C{result(timeout)} returns or re-raises."""

    def __init__(self, fn, *args, **kw):
        self._value = self._error = None
        self.started = time.monotonic()
        self.finished = None

        def run():
            try:
                self._value = fn(*args, **kw)
            except BaseException as e:  # handed to result()
                self._error = e
            finally:
                self.finished = time.monotonic()

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()

    def done(self):
        return not self.thread.is_alive()

    def result(self, timeout=30):
        self.thread.join(timeout)
        if self.thread.is_alive():
            raise AssertionError("background call still running after %ss (a hang?)" % timeout)
        if self._error is not None:
            raise self._error
        return self._value

    def error(self, timeout=30):
        """Wait and return the exception it raised (fail if it did not raise)."""
        self.thread.join(timeout)
        if self.thread.is_alive():
            raise AssertionError("background call still running after %ss (a hang?)" % timeout)
        if self._error is None:
            raise AssertionError("expected an error, got %r" % (self._value,))
        return self._error

    @property
    def elapsed(self):
        return (self.finished or time.monotonic()) - self.started


class BackendSampler:
    """Samples the number of C{user}'s client backends in pg_stat_activity in a thread."""

    def __init__(self, pg, user, interval=0.02):
        self.pg, self.user, self.interval = pg, user, interval
        self.samples = []
        self._stop = threading.Event()
        self._conn = pg.connect_super()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        while not self._stop.is_set():
            n = self._conn.execute(
                "SELECT count(*) FROM pg_stat_activity "
                "WHERE backend_type = 'client backend' AND usename = %s",
                [self.user]).fetchone()[0]
            self.samples.append(n)
            time.sleep(self.interval)

    def stop(self):
        self._stop.set()
        self.thread.join(10)
        self._conn.close()
        return max(self.samples) if self.samples else 0

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if not self._stop.is_set():
            self.stop()


def wait_until(predicate, timeout=10.0, interval=0.1, message="condition"):
    """Poll C{predicate} until it returns a true value; return it, or fail after C{timeout}."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(interval)
    pytest.fail("%s not reached within %ss (last value %r)" % (message, timeout, last))


def wait_for(predicate, timeout, what, interval=0.1):
    """
    Like L{wait_until}, for predicates that may raise while the system settles (a member
    restarting, a port not yet open): errors are retried, and the last one is reported.
    """
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            result = predicate()
            if result:
                return result
        except Exception as e:  # noqa: BLE001 - reported on timeout
            last = e
        time.sleep(interval)
    raise AssertionError("%s within %ss (last error: %r)" % (what, timeout, last))


# -- a raw protocol client ------------------------------------------------------------------

PROTOCOL_3 = 196608
SSL_REQUEST = 80877103
CANCEL_REQUEST = 80877102


class ConnectionClosed(Exception):
    pass


class ServerError(Exception):
    """An ErrorResponse: C{fields} maps field letters (S, V, C, M, ...) to text."""

    def __init__(self, fields):
        self.fields = fields
        Exception.__init__(self, "%s %s: %s" % (fields.get("S"), fields.get("C"),
                                                fields.get("M")))

    @property
    def sqlstate(self):
        return self.fields.get("C")

    @property
    def message(self):
        return self.fields.get("M")


def parse_fields(payload):
    fields = {}
    for part in payload.split(b"\x00"):
        if part:
            fields[chr(part[0])] = part[1:].decode("utf-8", "replace")
    return fields


def _cstr(s):
    return s.encode() + b"\x00"


def startup_packet(params, version=PROTOCOL_3):
    body = struct.pack("!I", version)
    for k, v in params.items():
        body += _cstr(k) + _cstr(v)
    body += b"\x00"
    return struct.pack("!I", len(body) + 4) + body


def message(kind, payload=b""):
    return kind + struct.pack("!I", len(payload) + 4) + payload


class RawClient:
    """The frontend side of the protocol, by hand: startup, auth (cleartext, md5, SCRAM)
    and simple queries; enough to send what drivers send and to see exactly what comes back."""

    def __init__(self, port, host="127.0.0.1", timeout=10.0):
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.sock.settimeout(timeout)
        self._buf = b""
        self.parameters = {}
        self.backend_key = None
        self.auth_requests = []
        self.notices = []

    def close(self):
        try:
            self.sock.close()
        except OSError:
            pass

    def send(self, data):
        self.sock.sendall(data)

    def _fill(self, n):
        while len(self._buf) < n:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionClosed("connection closed by the server")
            self._buf += chunk

    def recv_msg(self):
        self._fill(5)
        kind = self._buf[:1]
        length = struct.unpack("!I", self._buf[1:5])[0]
        self._fill(1 + length)
        payload = self._buf[5:1 + length]
        self._buf = self._buf[1 + length:]
        return kind, payload

    def recv_byte(self):
        self._fill(1)
        b, self._buf = self._buf[:1], self._buf[1:]
        return b

    def closed_within(self, timeout):
        """True if the server closes the connection within C{timeout} (data is discarded)."""
        deadline = time.monotonic() + timeout
        self._buf = b""
        while time.monotonic() < deadline:
            self.sock.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                if not self.sock.recv(65536):
                    return True
            except socket.timeout:
                return False
            except OSError:
                return True
        return False

    def read_error_then_close(self, timeout=5.0):
        """Expect an ErrorResponse (possibly after notices) and then EOF: return its fields."""
        self.sock.settimeout(timeout)
        while True:
            kind, payload = self.recv_msg()
            if kind == b"E":
                fields = parse_fields(payload)
                assert self.closed_within(timeout), "connection not closed after the error"
                return fields
            if kind == b"N":
                continue
            raise AssertionError("expected ErrorResponse, got %r %r" % (kind, payload[:100]))

    # -- startup and authentication -----------------------------------------------------------

    def startup(self, user, database, password=None, **params):
        """Log in; raise L{ServerError} on an ErrorResponse.  Extra startup parameters go as
        keyword arguments (e.g. DateStyle="ISO, DMY")."""
        p = {"user": user, "database": database}
        p.update(params)
        self.send(startup_packet(p))
        while True:
            kind, payload = self.recv_msg()
            if kind == b"R":
                code = struct.unpack("!I", payload[:4])[0]
                if code == 0:
                    continue
                self.auth_requests.append(code)
                if code == 3:
                    self.send(message(b"p", _cstr(password)))
                elif code == 5:
                    salt = payload[4:8]
                    inner = hashlib.md5((password + user).encode()).hexdigest().encode()
                    self.send(message(b"p", _cstr("md5" + hashlib.md5(inner + salt)
                                                  .hexdigest())))
                elif code == 10:
                    mechanisms = [m.decode() for m in payload[4:].split(b"\x00") if m]
                    self.sasl_mechanisms = mechanisms
                    self._scram(password)
                else:
                    raise AssertionError("unexpected authentication request %d" % code)
            elif kind == b"S":
                k, v = payload.split(b"\x00")[:2]
                self.parameters[k.decode()] = v.decode()
            elif kind == b"K":
                self.backend_key = struct.unpack("!II", payload)
            elif kind == b"E":
                raise ServerError(parse_fields(payload))
            elif kind == b"N":
                self.notices.append(parse_fields(payload))
            elif kind == b"Z":
                return self
            else:
                raise AssertionError("unexpected message %r during startup" % kind)

    def _scram(self, password):
        nonce = base64.b64encode(os.urandom(18)).decode()
        first_bare = "n=,r=" + nonce
        first = ("n,," + first_bare).encode()
        self.send(message(b"p", _cstr("SCRAM-SHA-256") + struct.pack("!I", len(first)) + first))
        kind, payload = self.recv_msg()
        if kind == b"E":
            raise ServerError(parse_fields(payload))
        code = struct.unpack("!I", payload[:4])[0]
        assert kind == b"R" and code == 11, (kind, code)
        server_first = payload[4:].decode()
        attrs = dict(kv.split("=", 1) for kv in server_first.split(","))
        salted = hashlib.pbkdf2_hmac("sha256", password.encode(), base64.b64decode(attrs["s"]),
                                     int(attrs["i"]))
        client_key = hmac.new(salted, b"Client Key", hashlib.sha256).digest()
        stored_key = hashlib.sha256(client_key).digest()
        final_no_proof = "c=biws,r=" + attrs["r"]
        auth_message = ",".join([first_bare, server_first, final_no_proof]).encode()
        signature = hmac.new(stored_key, auth_message, hashlib.sha256).digest()
        proof = bytes(a ^ b for a, b in zip(client_key, signature))
        self.send(message(b"p", (final_no_proof + ",p=" + base64.b64encode(proof).decode())
                          .encode()))
        kind, payload = self.recv_msg()
        if kind == b"E":
            raise ServerError(parse_fields(payload))
        code = struct.unpack("!I", payload[:4])[0]
        assert kind == b"R" and code == 12, (kind, code)

    # -- queries ------------------------------------------------------------------------------

    def query(self, sql):
        """Simple query; returns the rows of the last result (tuples of str/None); raises
        L{ServerError} after ReadyForQuery if the server reported an error."""
        self.send(message(b"Q", _cstr(sql)))
        rows, error = [], None
        while True:
            kind, payload = self.recv_msg()
            if kind == b"T":
                rows = []
            elif kind == b"D":
                n = struct.unpack("!H", payload[:2])[0]
                pos, row = 2, []
                for _ in range(n):
                    ln = struct.unpack("!i", payload[pos:pos + 4])[0]
                    pos += 4
                    if ln < 0:
                        row.append(None)
                    else:
                        row.append(payload[pos:pos + ln].decode())
                        pos += ln
                rows.append(tuple(row))
            elif kind == b"E":
                error = ServerError(parse_fields(payload))
            elif kind == b"S":
                k, v = payload.split(b"\x00")[:2]
                self.parameters[k.decode()] = v.decode()
            elif kind == b"N":
                self.notices.append(parse_fields(payload))
            elif kind == b"Z":
                self.status = payload[:1]
                if error:
                    raise error
                return rows

    def terminate(self):
        try:
            self.send(message(b"X"))
        except OSError:
            pass
        self.close()


def send_cancel(port, pid, key, host="127.0.0.1"):
    """A CancelRequest on a new connection; returns True if the server closed it."""
    with socket.create_connection((host, port), timeout=5) as s:
        s.sendall(struct.pack("!IIII", 16, CANCEL_REQUEST, pid, key))
        s.settimeout(5)
        try:
            return s.recv(1) == b""
        except socket.timeout:
            return False


def md5_secret(user, password):
    return "md5" + hashlib.md5((password + user).encode()).hexdigest()


def same_replies_as_postgresql(pg, new_user, pgdoorman, scenario):
    """
    Run C{scenario(a, b)} (two L{RawClient}s, returning what they received) against
    PostgreSQL directly and then through pgdoorman with a pool of one server: every exchange
    must be the same, and the two pooled clients must have shared that one server.
    """
    user, password = new_user()
    direct = [RawClient(pg.port).startup(user, "db1", password) for _ in range(2)]
    expected = scenario(*direct)
    d = pgdoorman(simple_config(pg, user, password, pool_size=1))
    pooled = [RawClient(d.port).startup(user, "db1", password) for _ in range(2)]
    got = scenario(*pooled)
    for c in direct + pooled:
        c.terminate()
    assert len(got) == len(expected)
    for i, (g, e) in enumerate(zip(got, expected)):
        assert g == e, "exchange %d differs" % i
    assert pg.count_backends(user) <= 1
