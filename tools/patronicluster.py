"""
A throwaway Patroni cluster for tests: one etcd and N Patroni nodes running PostgreSQL 15.

Each node has its own loopback address (127.0.0.11, .12, ...; all of 127.0.0.0/8 is local on
Linux) and every node uses the same PostgreSQL port and the same REST API port, so that one
C{host_port} reaches every member, as it does on real hosts.  Timings are tiny (ttl 10,
loop_wait 1, primary_start_timeout 0) so a switchover or a failover takes seconds, and
C{synchronous_mode} is on so that C{/cluster} shows a leader, a sync_standby and a replica at
once.  Replicas clone with C{basebackup: {checkpoint: fast}} (without it a clone waits ~90 s
for a spread checkpoint).  Everything runs as the C{postgres} user when we are root.

Needs the Debian 12 packages installed by C{tools/patroni-deps.sh} (patroni 3.0, python3-etcd,
etcd-server 3.4, postgresql-15).

    with PatroniCluster() as c:        # etcd + 3 nodes, waits for leader, sync and replica
        c.leader()                     # "n1"
        c.switchover("n2")
        c.kill_postmaster(c.leader())

Run on its own (C{python tools/patronicluster.py}) it starts a cluster and prints where it is,
until Ctrl-C.
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.request

PG_BIN = os.environ.get("PG_BIN", "/usr/lib/postgresql/15/bin")
PATRONI = shutil.which("patroni") or "/usr/bin/patroni"
PATRONICTL = shutil.which("patronictl") or "/usr/bin/patronictl"
ETCD = shutil.which("etcd") or "/usr/bin/etcd"

DEPS_HINT = "run tools/patroni-deps.sh (as root) to install patroni, python3-etcd and etcd-server"


def missing_dependencies():
    """What is missing to run a cluster, as a list of strings (empty when all is there)."""
    missing = []
    for path, what in ((PATRONI, "patroni"), (PATRONICTL, "patronictl"), (ETCD, "etcd"),
                       (os.path.join(PG_BIN, "postgres"), "PostgreSQL 15 server")):
        if not os.access(path, os.X_OK):
            missing.append(what)
    if not missing:
        probe = subprocess.run(["/usr/bin/python3", "-c", "import etcd, patroni"],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        if probe.returncode != 0:
            missing.append("python3-etcd (patroni's etcd client)")
    return missing


def _free_port_on(hosts):
    """A port that is free on every address in C{hosts}."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind((hosts[0], 0))
            port = s.getsockname()[1]
        ok = True
        for h in hosts[1:]:
            with socket.socket() as s:
                try:
                    s.bind((h, port))
                except OSError:
                    ok = False
                    break
        if ok:
            return port
    raise RuntimeError("no port free on all of %s" % (hosts,))


def _wait(predicate, timeout, what, interval=0.1):
    deadline = time.monotonic() + timeout
    last = None
    while True:
        try:
            result = predicate()
            if result:
                return result
        except Exception as e:  # noqa: BLE001 - we report the last error on timeout
            last = e
        if time.monotonic() > deadline:
            raise TimeoutError("%s within %ss%s" % (what, timeout,
                                                    " (last error: %s)" % last if last else ""))
        time.sleep(interval)


class Node:
    def __init__(self, cluster, index):
        self.cluster = cluster
        self.name = "n%d" % (index + 1)
        self.host = "127.0.0.%d" % (11 + index)
        self.dir = os.path.join(cluster.base_dir, self.name)
        self.data_dir = os.path.join(self.dir, "data")
        self.config_path = os.path.join(self.dir, "patroni.yml")
        self.log_path = os.path.join(self.dir, "patroni.log")
        self.proc = None

    @property
    def api_url(self):
        return "http://%s:%d" % (self.host, self.cluster.api_port)

    def config(self):
        c = self.cluster
        return {
            "scope": c.scope,
            "namespace": "/pgdoorman-test/",
            "name": self.name,
            "log": {"level": "INFO"},
            "restapi": {"listen": "%s:%d" % (self.host, c.api_port),
                        "connect_address": "%s:%d" % (self.host, c.api_port)},
            "etcd3": {"hosts": ["127.0.0.1:%d" % c.etcd_port]},
            "bootstrap": {
                "dcs": {
                    "ttl": 10, "loop_wait": 1, "retry_timeout": 3,
                    "primary_start_timeout": 0,
                    "maximum_lag_on_failover": 64 * 1024 * 1024,
                    "synchronous_mode": True,
                    "postgresql": {
                        "use_pg_rewind": True,
                        "use_slots": True,
                        "parameters": {
                            "wal_level": "replica", "hot_standby": "on",
                            "wal_log_hints": "on", "max_wal_senders": 10,
                            "max_replication_slots": 10, "wal_keep_size": "128MB",
                            "max_connections": 100,
                        },
                    },
                },
                "initdb": [{"encoding": "UTF8"}, {"locale": "C"}, {"auth": "trust"}],
            },
            "postgresql": {
                "listen": "%s:%d" % (self.host, c.pg_port),
                "connect_address": "%s:%d" % (self.host, c.pg_port),
                "data_dir": self.data_dir,
                "bin_dir": PG_BIN,
                "pgpass": os.path.join(self.dir, "pgpass"),
                # Superuser for everything: Patroni 3.0.2 creates no users at bootstrap, and a
                # superuser may replicate and pg_rewind.
                "authentication": {
                    "superuser": {"username": "postgres", "password": "postgres"},
                    "replication": {"username": "postgres", "password": "postgres"},
                    "rewind": {"username": "postgres", "password": "postgres"},
                },
                "basebackup": {"checkpoint": "fast"},
                "pg_hba": ["local all all trust",
                           "host all all 127.0.0.0/8 trust",
                           "host replication all 127.0.0.0/8 trust"],
                "parameters": {
                    "unix_socket_directories": self.dir,
                    "fsync": "off", "full_page_writes": "on",
                    "shared_buffers": "32MB",
                    "logging_collector": "off",
                },
            },
            "tags": {"nofailover": False, "noloadbalance": False, "clonefrom": False,
                     "nosync": False},
        }

    def start(self):
        import yaml
        os.makedirs(self.dir, exist_ok=True)
        with open(self.config_path, "w") as f:
            yaml.safe_dump(self.config(), f)
        self.cluster._chown(self.dir)
        self.cluster._chown(self.config_path)
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(self.cluster._cmd([PATRONI, self.config_path]),
                                     stdout=log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        log.close()

    def stop(self, timeout=20):
        if self.proc is None or self.proc.poll() is not None:
            return
        # runuser forwards SIGTERM to patroni, which stops PostgreSQL before it exits.
        self.proc.terminate()
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(5)
        self._kill_postgres()

    def _kill_postgres(self):
        pid = self.postmaster_pid()
        if pid:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass

    def postmaster_pid(self):
        try:
            with open(os.path.join(self.data_dir, "postmaster.pid")) as f:
                pid = int(f.readline().strip())
        except (OSError, ValueError):
            return None
        try:
            os.kill(pid, 0)
        except OSError:
            return None
        return pid

    def child_pid(self, title):
        """The pid of the postmaster's child whose process title contains C{title}."""
        parent = self.postmaster_pid()
        if parent is None:
            return None
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                with open("/proc/%s/stat" % entry) as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
                if ppid != parent:
                    continue
                with open("/proc/%s/cmdline" % entry, "rb") as f:
                    cmdline = f.read().replace(b"\0", b" ").decode(errors="replace")
            except (OSError, ValueError, IndexError):
                continue
            if title in cmdline:
                return int(entry)
        return None

    def psql(self, sql, db="postgres"):
        out = subprocess.run([os.path.join(PG_BIN, "psql"), "-X", "-qAt", "-h", self.host,
                              "-p", str(self.cluster.pg_port), "-U", "postgres", "-d", db,
                              "-v", "ON_ERROR_STOP=1", "-c", sql],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=30)
        if out.returncode != 0:
            raise RuntimeError("psql on %s: %s" % (self.name, out.stderr.decode().strip()))
        return out.stdout.decode().strip()


class PatroniCluster:
    """etcd plus C{nodes} Patroni nodes; see the module docstring."""

    def __init__(self, nodes=3, base_dir=None):
        missing = missing_dependencies()
        if missing:
            raise RuntimeError("cannot start a Patroni cluster, missing: %s; %s"
                               % (", ".join(missing), DEPS_HINT))
        self.base_dir = base_dir or tempfile.mkdtemp(prefix="pgdoorman-patroni-")
        self.scope = "pgdt%d" % os.getpid()
        self.nodes = [Node(self, i) for i in range(nodes)]
        hosts = [n.host for n in self.nodes]
        self.pg_port = _free_port_on(hosts)
        self.api_port = _free_port_on(hosts)
        self.etcd_port = _free_port_on(["127.0.0.1"])
        self.etcd_peer_port = _free_port_on(["127.0.0.1"])
        self.etcd = None
        self._as_postgres = os.geteuid() == 0

    # -- plumbing --------------------------------------------------------------------------------

    def _cmd(self, argv):
        if os.geteuid() == 0:
            return ["runuser", "-u", "postgres", "--"] + argv
        return argv

    def _chown(self, path):
        if os.geteuid() == 0:
            pw = pwd.getpwnam("postgres")
            os.chown(path, pw.pw_uid, pw.pw_gid)

    def node(self, name):
        for n in self.nodes:
            if n.name == name:
                return n
        raise KeyError(name)

    @property
    def api_urls(self):
        return [n.api_url for n in self.nodes]

    # -- lifecycle -------------------------------------------------------------------------------

    def start(self, timeout=90):
        os.makedirs(self.base_dir, exist_ok=True)
        os.chmod(self.base_dir, 0o755)
        self._chown(self.base_dir)
        etcd_dir = os.path.join(self.base_dir, "etcd")
        peer = "http://127.0.0.1:%d" % self.etcd_peer_port
        client = "http://127.0.0.1:%d" % self.etcd_port
        log = open(os.path.join(self.base_dir, "etcd.log"), "ab")
        self.etcd = subprocess.Popen(
            [ETCD, "--name", "e1", "--data-dir", etcd_dir,
             "--listen-client-urls", client, "--advertise-client-urls", client,
             "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
             "--initial-cluster", "e1=" + peer, "--initial-cluster-state", "new",
             "--initial-cluster-token", self.scope, "--enable-v2=true"],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        _wait(lambda: urllib.request.urlopen(client + "/health", timeout=1).status == 200,
              20, "etcd answering")
        # The first node bootstraps alone; the others clone from it.
        self.nodes[0].start()
        _wait(lambda: self._leader_running(), timeout, "the first node leading")
        for n in self.nodes[1:]:
            n.start()
        self.wait_healthy(timeout)
        return self

    def _leader_running(self):
        doc = self.cluster_doc()
        return any(m["role"] == "leader" and m["state"] == "running" for m in doc["members"])

    def wait_healthy(self, timeout=60):
        """
        Wait until every node is a running member, one leader, one sync_standby and the rest
        replicas, the leader writable and no replica lagging.
        """
        want = len(self.nodes)

        def healthy():
            doc = self.cluster_doc()
            members = doc["members"]
            if len(members) != want:
                return False
            roles = sorted(m["role"] for m in members)
            if roles.count("leader") != 1 or ("sync_standby" not in roles and want > 1):
                return False
            for m in members:
                if m["state"] not in ("running", "streaming"):
                    return False
                if m["role"] != "leader" and m.get("lag") not in (0,):
                    return False
            leader = self.node([m["name"] for m in members if m["role"] == "leader"][0])
            return leader.psql("SELECT pg_is_in_recovery()") == "f"
        _wait(healthy, timeout, "the cluster healthy (%d members)" % want, interval=0.2)

    def stop(self):
        for n in self.nodes:
            try:
                n.stop()
            except Exception:  # noqa: BLE001 - best effort teardown
                pass
        if self.etcd is not None and self.etcd.poll() is None:
            self.etcd.terminate()
            try:
                self.etcd.wait(10)
            except subprocess.TimeoutExpired:
                self.etcd.kill()
                self.etcd.wait(5)

    def destroy(self):
        self.stop()
        shutil.rmtree(self.base_dir, ignore_errors=True)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.destroy()

    # -- asking Patroni --------------------------------------------------------------------------

    def cluster_doc(self):
        """C{GET /cluster} from the first node that answers."""
        last = None
        for n in self.nodes:
            try:
                with urllib.request.urlopen(n.api_url + "/cluster", timeout=2) as r:
                    return json.loads(r.read())
            except Exception as e:  # noqa: BLE001
                last = e
        raise RuntimeError("no Patroni REST API answered: %s" % (last,))

    def members(self):
        return {m["name"]: m for m in self.cluster_doc()["members"]}

    def with_role(self, role):
        return sorted(name for name, m in self.members().items() if m["role"] == role)

    def leader(self):
        leaders = self.with_role("leader")
        return leaders[0] if leaders else None

    # -- operations ------------------------------------------------------------------------------

    def patronictl(self, *args):
        out = subprocess.run(self._cmd([PATRONICTL, "-c", self.nodes[0].config_path] +
                                       list(args)),
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=60)
        if out.returncode != 0:
            raise RuntimeError("patronictl %s: %s" % (" ".join(args), out.stdout.decode()))
        return out.stdout.decode()

    def switchover(self, candidate, timeout=30):
        """C{patronictl switchover} to C{candidate}; returns once Patroni shows it leading."""
        leader = self.leader()
        self.patronictl("switchover", "--leader", leader, "--candidate", candidate, "--force",
                        self.scope)
        _wait(lambda: self.leader() == candidate, timeout, "%s leading" % candidate)

    def kill_postmaster(self, name):
        """SIGKILL the postmaster of C{name} (Patroni notices and fails over)."""
        pid = self.node(name).postmaster_pid()
        if pid is None:
            raise RuntimeError("%s has no running postmaster" % name)
        os.kill(pid, signal.SIGKILL)
        return pid


if __name__ == "__main__":
    def _stop(signum, frame):
        raise KeyboardInterrupt
    signal.signal(signal.SIGTERM, _stop)  # background jobs of a shell ignore SIGINT
    c = PatroniCluster()
    t0 = time.monotonic()
    try:
        c.start()
        print("cluster up in %.1fs in %s" % (time.monotonic() - t0, c.base_dir))
        print("REST APIs: %s; PostgreSQL port %d" % (", ".join(c.api_urls), c.pg_port))
        print(json.dumps(c.cluster_doc(), indent=2))
        signal.pause()
    except KeyboardInterrupt:
        pass
    finally:
        c.destroy()
