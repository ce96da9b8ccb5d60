"""
A throwaway PostgreSQL 15 cluster for tests, benchmarks and the README's demo.

initdb and postgres refuse to run as root, so when we are root every server command runs as the
C{postgres} system user (via runuser) and the data directory is owned by it.  The cluster
listens on 127.0.0.1 and on a Unix socket inside its own directory, so it never touches a
system PostgreSQL.
"""

import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time

PG_BIN = os.environ.get("PG_BIN", "/usr/lib/postgresql/15/bin")


def free_port(host="127.0.0.1"):
    """A TCP port that nothing listens on right now."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def wait_port(port, host="127.0.0.1", timeout=15.0):
    """Block until something accepts on host:port, or raise TimeoutError."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((host, port), timeout=1):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise TimeoutError("nothing listens on %s:%s" % (host, port))
            time.sleep(0.05)


class PgCluster:
    """
    One PostgreSQL cluster in a directory of its own.

    Users made by L{create_user} keep their plaintext passwords in C{self.passwords} so that
    tests can log in as them.
    """

    def __init__(self, base_dir=None, port=None, superuser="postgres"):
        self.base_dir = base_dir or tempfile.mkdtemp(prefix="pgdoorman-pg-")
        self.data_dir = os.path.join(self.base_dir, "data")
        self.socket_dir = self.base_dir
        self.port = port or free_port()
        self.host = "127.0.0.1"
        self.superuser = superuser
        self.passwords = {}
        self._as_postgres = os.geteuid() == 0

    # -- running commands -------------------------------------------------------------------

    def _cmd(self, argv):
        if self._as_postgres:
            return ["runuser", "-u", "postgres", "--"] + argv
        return argv

    def run(self, argv, **kw):
        kw.setdefault("check", True)
        kw.setdefault("stdout", subprocess.PIPE)
        kw.setdefault("stderr", subprocess.STDOUT)
        return subprocess.run(self._cmd(argv), **kw)

    # -- lifecycle --------------------------------------------------------------------------

    def init(self, hba_lines=None, settings=None):
        """
        initdb with trust for the superuser over the Unix socket and password methods on TCP.

        @param hba_lines: pg_hba.conf lines to put before the catch-all C{host all all
            127.0.0.1/32 scram-sha-256}.
        @param settings: extra postgresql.conf settings.
        """
        os.makedirs(self.base_dir, exist_ok=True)
        if self._as_postgres:
            pw = pwd.getpwnam("postgres")
            os.chown(self.base_dir, pw.pw_uid, pw.pw_gid)
            os.chmod(self.base_dir, 0o755)
        self.run([os.path.join(PG_BIN, "initdb"), "-D", self.data_dir, "-U", self.superuser,
                  "-A", "trust", "-E", "UTF8", "--locale=C", "--no-sync"])
        conf = {
            "port": str(self.port),
            "listen_addresses": "'127.0.0.1'",
            "unix_socket_directories": "'%s'" % self.socket_dir,
            "fsync": "off",
            "synchronous_commit": "off",
            "full_page_writes": "off",
            "max_connections": "300",
            "shared_buffers": "128MB",
            "log_min_messages": "warning",
            "logging_collector": "off",
        }
        conf.update(settings or {})
        hba = ["local all all trust"]
        hba += list(hba_lines or [])
        hba += ["host all %s 127.0.0.1/32 trust" % self.superuser,
                "host all all 127.0.0.1/32 scram-sha-256"]
        self._write(os.path.join(self.data_dir, "postgresql.auto.conf"),
                    "".join("%s = %s\n" % kv for kv in conf.items()))
        self._write(os.path.join(self.data_dir, "pg_hba.conf"), "\n".join(hba) + "\n")
        return self

    def _write(self, path, text):
        # The data directory belongs to postgres; write through a temp file we then chown.
        with open(path, "w") as f:
            f.write(text)
        if self._as_postgres:
            pw = pwd.getpwnam("postgres")
            os.chown(path, pw.pw_uid, pw.pw_gid)

    def start(self):
        self.run([os.path.join(PG_BIN, "pg_ctl"), "-D", self.data_dir, "-w", "-t", "60",
                  "-l", os.path.join(self.base_dir, "postgres.log"), "start"])
        return self

    def stop(self, mode="fast"):
        self.run([os.path.join(PG_BIN, "pg_ctl"), "-D", self.data_dir, "-w", "-m", mode, "stop"],
                 check=False)

    def restart(self, mode="fast"):
        self.stop(mode)
        self.start()

    def destroy(self):
        self.stop("immediate")
        shutil.rmtree(self.base_dir, ignore_errors=True)

    # -- SQL as the superuser ---------------------------------------------------------------

    def psql(self, sql, db="postgres", user=None):
        """Run SQL over the Unix socket as the superuser; returns stdout (unaligned, no header)."""
        out = self.run([os.path.join(PG_BIN, "psql"), "-h", self.socket_dir, "-p", str(self.port),
                        "-U", user or self.superuser, "-d", db, "-v", "ON_ERROR_STOP=1",
                        "-X", "-q", "-A", "-t", "-c", sql])
        return out.stdout.decode()

    def create_user(self, name, password, method="scram-sha-256", superuser=False):
        """A login role whose stored password uses C{method} (md5 or scram-sha-256)."""
        enc = "md5" if method == "md5" else "scram-sha-256"
        self.psql("SET password_encryption = '%s'; CREATE ROLE \"%s\" LOGIN %s PASSWORD '%s'"
                  % (enc, name, "SUPERUSER" if superuser else "", password))
        self.passwords[name] = password

    def create_database(self, name, owner=None):
        self.psql('CREATE DATABASE "%s"%s' % (name, ' OWNER "%s"' % owner if owner else ""))

    def password_hash(self, user):
        """The role's stored secret from pg_authid (md5... or SCRAM-SHA-256$...)."""
        return self.psql("SELECT rolpassword FROM pg_authid WHERE rolname = '%s'" % user).strip()

    def dsn(self, user, db, password=None):
        return "host=%s port=%d user=%s dbname=%s password=%s" % (
            self.host, self.port, user, db, password or self.passwords.get(user, ""))
