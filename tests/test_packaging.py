"""
The deb and rpm packages (issue 8), with patroni_proxy's unit, config and man page (issue 9).

The quick checks (build both, look inside, lintian, rpm -qpl/-qpR, systemd-analyze verify, the
shipped configs pass -t) run in the default suite when the build tools are there or can be
installed.  The operator's proof -- install the .deb into a fresh debootstrap'ed Debian 12,
run pgdoorman and patroni_proxy from their units' ExecStart, reload them, purge it -- takes
several minutes and runs with
`make test-packages` (PGDOORMAN_PACKAGE_TESTS=1).
"""

import configparser
import glob
import gzip
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import urllib.request

import pytest

from conftest import REPO, doorman_env, psql, simple_config, wait_port, wait_until, \
    write_config
from pgcluster import free_port

from pgdoorman import __version__

# patroni_proxy (issue 9) ships in the same packages as pgdoorman.
PP_FILES = ("usr/bin/patroni_proxy", "etc/pgdoorman/patroni_proxy.yaml",
            "lib/systemd/system/patroni_proxy.service", "usr/share/man/man1/patroni_proxy.1.gz",
            "usr/share/doc/pgdoorman/patroni_proxy.md",
            "usr/lib/python3/dist-packages/pgdoorman/patroni/cli.py",
            "usr/lib/python3/dist-packages/twisted/plugins/patroni_proxy_plugin.py")
# What both units share: pgdoorman.service's hardening.
HARDENING = ("NoNewPrivileges", "ProtectSystem", "ProtectHome", "PrivateTmp", "PrivateDevices",
             "ProtectKernelTunables", "ProtectKernelModules", "ProtectKernelLogs",
             "ProtectControlGroups", "ProtectClock", "ProtectHostname",
             "RestrictAddressFamilies", "RestrictNamespaces", "RestrictRealtime",
             "RestrictSUIDSGID", "LockPersonality", "SystemCallArchitectures",
             "CapabilityBoundingSet", "UMask")

DEB = os.path.join(REPO, "dist", "pgdoorman_%s_all.deb" % __version__)
RPM = os.path.join(REPO, "dist", "pgdoorman-%s-1.noarch.rpm" % __version__)
SLOW = os.environ.get("PGDOORMAN_PACKAGE_TESTS") == "1"
BASE_ROOT = os.environ.get("PGDOORMAN_DEBOOTSTRAP_CACHE",
                           "/var/tmp/pgdoorman-test/bookworm-base")
MIRROR = "http://deb.debian.org/debian"

pytestmark = pytest.mark.skipif(
    not shutil.which("dpkg-buildpackage") and os.geteuid() != 0,
    reason="building packages needs dpkg-dev, or root to install it")


def _make(target, timeout=900):
    out = subprocess.run(["make", "-C", REPO, target], stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, timeout=timeout, text=True)
    assert out.returncode == 0, out.stdout[-5000:]
    return out.stdout


@pytest.fixture(scope="module")
def deb():
    output = _make("deb")
    assert os.path.exists(DEB)
    return DEB, output


@pytest.fixture(scope="module")
def rpm():
    _make("rpm")
    assert os.path.exists(RPM)
    return RPM


@pytest.fixture(scope="module")
def deb_tree(deb, tmp_path_factory):
    root = str(tmp_path_factory.mktemp("deb-tree"))
    subprocess.run(["dpkg-deb", "-x", deb[0], root], check=True)
    return root


def _deb_field(path, field):
    return subprocess.run(["dpkg-deb", "-f", path, field], stdout=subprocess.PIPE,
                          check=True, text=True).stdout.strip()


# -- the .deb -------------------------------------------------------------------------------

@pytest.mark.timeout(900)
def test_deb_contents(deb, deb_tree):
    path, _ = deb
    assert _deb_field(path, "Version") == __version__
    assert _deb_field(path, "Architecture") == "all"
    depends = _deb_field(path, "Depends")
    for dep in ("python3-twisted", "python3-yaml", "python3-xxhash", "python3-openssl",
                "python3-prometheus-client", "python3-service-identity"):
        assert dep in depends, depends
    for f in ("usr/bin/pgdoorman", "etc/pgdoorman/pgdoorman.yaml",
              "lib/systemd/system/pgdoorman.service", "etc/logrotate.d/pgdoorman",
              "usr/share/man/man1/pgdoorman.1.gz", "usr/share/doc/pgdoorman/configuration.md",
              "usr/share/doc/pgdoorman/examples/pgdoorman-reference.yaml",
              "usr/lib/python3/dist-packages/pgdoorman/cli.py",
              "usr/lib/python3/dist-packages/twisted/plugins/pgdoorman_plugin.py"):
        assert os.path.exists(os.path.join(deb_tree, f)), f
    listing = subprocess.run(["dpkg-deb", "-c", path], stdout=subprocess.PIPE, check=True,
                             text=True).stdout
    paths = {line.split()[-1].lstrip(".") for line in listing.splitlines()}
    for f in PP_FILES:
        assert "/" + f in paths, f
    conffiles = subprocess.run(["dpkg-deb", "-I", path, "conffiles"], stdout=subprocess.PIPE,
                               text=True).stdout
    assert "/etc/pgdoorman/pgdoorman.yaml" in conffiles.split()
    assert "/etc/pgdoorman/patroni_proxy.yaml" in conffiles.split()
    postinst = subprocess.run(["dpkg-deb", "-I", path, "postinst"], stdout=subprocess.PIPE,
                              text=True).stdout
    assert "/var/log/pgdoorman" in postinst and "postgres" in postinst
    # Not started on the placeholder config: no "deb-systemd-invoke start" in postinst.
    assert "deb-systemd-invoke start" not in postinst
    # Both units are known to deb-systemd-helper but not enabled (dh_installsystemd
    # --no-enable: enabled again on upgrade only if the operator had enabled it).
    for unit in ("pgdoorman.service", "patroni_proxy.service"):
        assert "deb-systemd-helper debian-installed '%s'" % unit in postinst, postinst


@pytest.mark.timeout(900)
def test_deb_lintian_has_no_errors(deb):
    if not shutil.which("lintian"):
        pytest.skip("lintian is not installed")
    out = subprocess.run(["lintian", "--fail-on", "error", deb[0]], stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True)
    assert out.returncode == 0, out.stdout
    assert not [line for line in out.stdout.splitlines() if line.startswith("E:")], out.stdout
    # Every command has its man page (patroni_proxy(1) included).
    assert "no-manual-page" not in out.stdout, out.stdout


def test_shipped_config_passes_check(deb_tree):
    out = subprocess.run([sys.executable, "-m", "pgdoorman", "-t",
                          os.path.join(deb_tree, "etc/pgdoorman/pgdoorman.yaml")],
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=doorman_env(),
                         text=True)
    assert out.returncode == 0, out.stdout
    assert "not implemented" not in out.stdout


def test_shipped_patroni_proxy_config_passes_check(deb_tree):
    path = os.path.join(deb_tree, "etc/pgdoorman/patroni_proxy.yaml")
    out = subprocess.run([sys.executable, "-m", "pgdoorman.patroni.cli", "-t", path],
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=doorman_env(),
                         text=True)
    assert out.returncode == 0 and "is valid" in out.stdout, out.stdout
    # An example, not an exposure: everything listens on loopback until the operator says so.
    from pgdoorman.patroni import config as pconfig
    config = pconfig.load(path)
    assert config.listen_host == "127.0.0.1"
    ports = [port for cluster in config.clusters.values() for port in cluster.ports.values()]
    assert ports and {port.listen_host for port in ports} == {"127.0.0.1"}


def _unit(deb_tree, name="pgdoorman"):
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str
    parser.read(os.path.join(deb_tree, "lib/systemd/system/%s.service" % name))
    return parser


def _verify_unit(deb_tree, tmp_path, name):
    """systemd-analyze verify, with ExecStart's program (which must exist) a stand-in."""
    if not shutil.which("systemd-analyze"):
        pytest.skip("systemd-analyze is not installed")
    stand_in = tmp_path / name
    stand_in.write_text("#!/bin/sh\nexit 0\n")
    stand_in.chmod(0o755)
    with open(os.path.join(deb_tree, "lib/systemd/system/%s.service" % name)) as f:
        text = f.read().replace("/usr/bin/%s" % name, str(stand_in))
    copy = tmp_path / ("%s.service" % name)
    copy.write_text(text)
    out = subprocess.run(["systemd-analyze", "verify", "--man=no", str(copy)],
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert out.returncode == 0 and not out.stdout.strip(), out.stdout


def test_unit_file(deb_tree, tmp_path):
    unit = _unit(deb_tree)["Service"]
    assert unit["Type"] == "notify"
    assert unit["ExecReload"] == "/bin/kill -HUP $MAINPID"
    assert unit["Restart"] == "on-failure" and unit["LimitNOFILE"] == "65536"
    assert unit["User"] == "postgres"
    assert unit["NoNewPrivileges"] == "yes" and unit["ProtectSystem"] == "full"
    _verify_unit(deb_tree, tmp_path, "pgdoorman")


def test_patroni_proxy_unit_file(deb_tree, tmp_path):
    parsed = _unit(deb_tree, "patroni_proxy")
    unit = parsed["Service"]
    # patroni_proxy sends no sd_notify READY=1 (only pgdoorman does, pgdoorman/systemd.py).
    assert unit["Type"] == "simple"
    env = dict(kv.split("=", 1) for kv in shlex.split(unit["Environment"]))
    assert env["PATRONI_PROXY_CONFIG"] == "/etc/pgdoorman/patroni_proxy.yaml"
    assert unit["ExecStartPre"] == "/usr/bin/patroni_proxy -t ${PATRONI_PROXY_CONFIG}"
    assert unit["ExecStart"] == "/usr/bin/patroni_proxy ${PATRONI_PROXY_CONFIG}"
    assert unit["ExecReload"] == "/bin/kill -HUP $MAINPID"
    assert unit["Restart"] == "on-failure" and unit["User"] == "postgres"
    assert "man:patroni_proxy(1)" in parsed["Unit"]["Documentation"]
    assert parsed["Install"]["WantedBy"] == "multi-user.target"
    pgdoorman = _unit(deb_tree)["Service"]
    for key in HARDENING:
        assert unit.get(key) == pgdoorman[key], key
    _verify_unit(deb_tree, tmp_path, "patroni_proxy")


def test_runtime_switch_is_shipped(deb, deb_tree):
    """/etc/default/pgdoorman (a conffile) selects the interpreter; pypy-setup makes PyPy's."""
    unit = _unit(deb_tree)["Service"]
    assert unit["EnvironmentFile"] == "-/etc/default/pgdoorman"
    with open(os.path.join(deb_tree, "etc/default/pgdoorman")) as f:
        settings = dict(line.strip().split("=", 1) for line in f
                        if line.strip() and not line.startswith("#"))
    assert settings == {"PGDOORMAN_RUNTIME": "auto"}
    conffiles = subprocess.run(["dpkg-deb", "-I", deb[0], "conffiles"],
                               stdout=subprocess.PIPE, text=True).stdout.split()
    assert "/etc/default/pgdoorman" in conffiles
    setup = os.path.join(deb_tree, "usr/lib/pgdoorman/pypy-setup")
    assert os.access(setup, os.X_OK)
    out = subprocess.run(["sh", "-n", setup], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                         text=True)
    assert out.returncode == 0, out.stdout
    # With auto and no PyPy venv, the installed command runs on Debian's python3 as before.
    env = dict(doorman_env(), PGDOORMAN_RUNTIME="auto",
               PGDOORMAN_PYPY=os.path.join(deb_tree, "no-such-venv/bin/python"))
    out = subprocess.run([sys.executable, "-m", "pgdoorman", "-t",
                          os.path.join(deb_tree, "etc/pgdoorman/pgdoorman.yaml")],
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True)
    assert out.returncode == 0 and "PyPy" not in out.stdout, out.stdout


def test_man_page_renders(deb_tree):
    if not shutil.which("man"):
        pytest.skip("man is not installed")
    out = subprocess.run(["man", "-l", os.path.join(deb_tree,
                                                    "usr/share/man/man1/pgdoorman.1.gz")],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env=dict(os.environ, MANWIDTH="80", MAN_KEEP_FORMATTING=""))
    assert out.returncode == 0, out.stderr
    for word in ("--log-format", "generate", "EXIT STATUS", "SIGHUP"):
        assert word in out.stdout.replace("\u2010", "-"), word


def test_patroni_proxy_man_page_renders(deb_tree):
    if not shutil.which("man"):
        pytest.skip("man is not installed")
    out = subprocess.run(["man", "--warnings", "-l",
                          os.path.join(deb_tree, "usr/share/man/man1/patroni_proxy.1.gz")],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env=dict(os.environ, MANWIDTH="80", MAN_KEEP_FORMATTING=""))
    assert out.returncode == 0 and not out.stderr.strip(), out.stderr
    text = " ".join(out.stdout.replace("\u2010", "-").split())  # undo wrapping and justifying
    for word in ("patroni_proxy", "--test", "SIGHUP", "EXIT STATUS", "/update_clusters",
                 "/etc/pgdoorman/patroni_proxy.yaml", "systemctl reload patroni_proxy"):
        assert word in text, word


# -- the .rpm -------------------------------------------------------------------------------

@pytest.mark.timeout(600)
def test_rpm_files_and_requires(rpm):
    files = subprocess.run(["rpm", "-qpl", rpm], stdout=subprocess.PIPE, check=True,
                           text=True).stdout.split()
    for f in ("/usr/bin/pgdoorman", "/etc/pgdoorman/pgdoorman.yaml",
              "/usr/lib/systemd/system/pgdoorman.service", "/etc/logrotate.d/pgdoorman",
              "/usr/share/man/man1/pgdoorman.1", "/var/log/pgdoorman",
              "/usr/share/doc/pgdoorman/configuration.md",
              "/usr/bin/patroni_proxy", "/etc/pgdoorman/patroni_proxy.yaml",
              "/usr/lib/systemd/system/patroni_proxy.service",
              "/usr/share/man/man1/patroni_proxy.1", "/usr/share/doc/pgdoorman/patroni_proxy.md"):
        assert f in files, f
    assert any(f.endswith("/site-packages/pgdoorman/cli.py") for f in files)
    requires = subprocess.run(["rpm", "-qpR", rpm], stdout=subprocess.PIPE, check=True,
                              text=True).stdout
    for dep in ("python3-twisted >= 22.4", "python3-pyyaml", "python3-xxhash",
                "python3-pyOpenSSL", "python3-prometheus_client"):
        assert dep in requires, requires
    info = subprocess.run(["rpm", "-qpi", rpm], stdout=subprocess.PIPE, check=True,
                          text=True).stdout
    assert "Version     : %s" % __version__ in info
    config = subprocess.run(["rpm", "-qpc", rpm], stdout=subprocess.PIPE, check=True,
                            text=True).stdout.split()
    assert "/etc/pgdoorman/pgdoorman.yaml" in config
    assert "/etc/pgdoorman/patroni_proxy.yaml" in config
    assert "/etc/default/pgdoorman" in config
    assert "/usr/lib/pgdoorman/pypy-setup" in files


def _cpio_newc(data):
    """{path: bytes} of a "newc" cpio archive (what rpm2cpio writes)."""
    files, pos = {}, 0
    while True:
        header = data[pos:pos + 110]
        assert header[:6] in (b"070701", b"070702"), header[:6]
        size = int(header[54:62], 16)
        name_size = int(header[94:102], 16)
        name = data[pos + 110:pos + 110 + name_size - 1].decode()
        pos = (pos + 110 + name_size + 3) & ~3
        if name == "TRAILER!!!":
            return files
        files[name.lstrip(".").lstrip("/")] = data[pos:pos + size]
        pos = (pos + size + 3) & ~3


def test_rpm_ships_the_same_unit_and_config(rpm, deb_tree):
    archive = subprocess.run(["rpm2cpio", rpm], stdout=subprocess.PIPE, check=True).stdout
    files = _cpio_newc(archive)
    for rpm_path, deb_path in (("usr/lib/systemd/system/pgdoorman.service",
                                "lib/systemd/system/pgdoorman.service"),
                               ("etc/pgdoorman/pgdoorman.yaml", "etc/pgdoorman/pgdoorman.yaml"),
                               ("etc/default/pgdoorman", "etc/default/pgdoorman"),
                               ("usr/lib/pgdoorman/pypy-setup", "usr/lib/pgdoorman/pypy-setup"),
                               ("usr/lib/systemd/system/patroni_proxy.service",
                                "lib/systemd/system/patroni_proxy.service"),
                               ("etc/pgdoorman/patroni_proxy.yaml",
                                "etc/pgdoorman/patroni_proxy.yaml"),
                               ("usr/share/doc/pgdoorman/patroni_proxy.md",
                                "usr/share/doc/pgdoorman/patroni_proxy.md")):
        with open(os.path.join(deb_tree, deb_path), "rb") as f:
            assert files[rpm_path] == f.read(), rpm_path
    # The man page: compressed in the .deb (dh_compress), left to the rpm's brp scripts.
    with gzip.open(os.path.join(deb_tree, "usr/share/man/man1/patroni_proxy.1.gz")) as f:
        assert files["usr/share/man/man1/patroni_proxy.1"] == f.read()


# -- the operator's proof: a fresh Debian 12 ------------------------------------------------

class Chroot:
    """A throwaway copy of a debootstrap'ed Debian 12 with /proc and /dev mounted."""

    def __init__(self, path):
        self.path = path
        self.mounts = []

    def mount(self):
        for what, args in (("proc", ["-t", "proc", "proc"]), ("dev", ["--bind", "/dev"]),
                           ("dev/pts", ["--bind", "/dev/pts"])):
            target = os.path.join(self.path, what)
            os.makedirs(target, exist_ok=True)
            subprocess.run(["mount"] + args + [target], check=True)
            self.mounts.append(target)
        shutil.copy("/etc/resolv.conf", os.path.join(self.path, "etc/resolv.conf"))

    def umount(self):
        for target in reversed(self.mounts):
            subprocess.run(["umount", "-l", target])
        self.mounts = []

    def run(self, cmd, check=True, timeout=900, user=None):
        argv = ["chroot"] + (["--userspec=%s" % user] if user else []) + [self.path]
        argv += ["/usr/bin/env", "-i", "PATH=/usr/sbin:/usr/bin:/sbin:/bin",
                 "DEBIAN_FRONTEND=noninteractive", "LANG=C.UTF-8", "/bin/sh", "-c", cmd]
        out = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             timeout=timeout, text=True)
        if check:
            assert out.returncode == 0, "%s\n%s" % (cmd, out.stdout[-5000:])
        return out

    def file(self, path):
        return os.path.join(self.path, path.lstrip("/"))


@pytest.fixture
def debian_root(tmp_path):
    if not SLOW:
        pytest.skip("slow (several minutes): run with make test-packages")
    if os.geteuid() != 0 or not shutil.which("debootstrap"):
        pytest.skip("needs root and debootstrap")
    if not os.path.exists(os.path.join(BASE_ROOT, "usr/bin/apt-get")):
        shutil.rmtree(BASE_ROOT, ignore_errors=True)
        subprocess.run(["debootstrap", "--variant=minbase", "bookworm", BASE_ROOT, MIRROR],
                       check=True, stdout=subprocess.DEVNULL, timeout=1800)
    path = "/var/tmp/pgdoorman-test/root-%d" % os.getpid()
    subprocess.run(["cp", "-a", BASE_ROOT, path], check=True)
    root = Chroot(path)
    root.mount()
    yield root
    root.umount()
    shutil.rmtree(path, ignore_errors=True)


def _notify_socket(path):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind(path)
    s.settimeout(20)
    return s


@pytest.mark.timeout(2400)
def test_debian12_install_run_reload_purge(deb, pg, debian_root, tmp_path):
    root = debian_root
    shutil.copy(deb[0], root.file("/tmp/"))
    name = os.path.basename(deb[0])
    root.run("apt-get update -q")
    # apt resolves the dependencies from Debian's archive: a missing one fails here.
    root.run("apt-get install -y -q --no-install-recommends /tmp/%s" % name)

    out = root.run("pgdoorman --version")
    assert out.stdout.strip() == "pgdoorman %s" % __version__
    out = root.run("pgdoorman -t /etc/pgdoorman/pgdoorman.yaml")
    assert "is valid" in out.stdout, out.stdout
    # postinst: the service user, its log dir, a config only it can read.
    root.run("getent passwd postgres")
    out = root.run("stat -c '%U:%G %a' /var/log/pgdoorman /etc/pgdoorman/pgdoorman.yaml")
    assert out.stdout.split("\n")[:2] == ["postgres:postgres 2750", "root:postgres 640"], \
        out.stdout
    root.run("man -w pgdoorman >/dev/null 2>&1 || test -f /usr/share/man/man1/pgdoorman.1.gz")
    assert os.path.exists(root.file("/etc/logrotate.d/pgdoorman"))

    # The unit's ExecStart, as systemd would run it (User=postgres, Environment=CONFIG_FILE),
    # with a config that points at the test cluster.
    unit = _unit(root.path)["Service"]
    env = dict(kv.split("=", 1) for kv in shlex.split(unit["Environment"]))
    port = free_port()
    cfg = simple_config(pg, "u_scram", "scram-secret", general={"port": port})
    text = write_config(tmp_path, cfg)
    config_path = env["CONFIG_FILE"]  # the conffile itself: keep the packaged one aside
    shutil.copy2(root.file(config_path), str(tmp_path / "packaged.yaml"))
    shutil.copy(text, root.file(config_path))
    os.chmod(root.file(config_path), 0o644)
    exec_start = unit["ExecStart"].replace("${CONFIG_FILE}", config_path)
    root.run(unit["ExecStartPre"].replace("${CONFIG_FILE}", config_path), user="postgres")
    notify = _notify_socket(root.file("/run/notify.sock"))
    os.chmod(root.file("/run/notify.sock"), 0o777)
    log_path = tmp_path / "pgdoorman.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            ["chroot", "--userspec=postgres:postgres", root.path, "/usr/bin/env", "-i",
             "PATH=/usr/bin:/bin", "NOTIFY_SOCKET=/run/notify.sock",
             "CONFIG_FILE=%s" % config_path] + shlex.split(exec_start),
            stdout=log, stderr=subprocess.STDOUT)
    try:
        assert b"READY=1" in notify.recv(4096), log_path.read_text()
        wait_port(port, proc, log_path.read_text)

        class D:
            host = "127.0.0.1"
        D.port = port
        r = psql(D, "u_scram", "db1", "scram-secret", "SELECT current_user")
        assert r.returncode == 0 and r.stdout.strip() == "u_scram", r.stderr
        r = psql(D, "u_scram", "db2", "scram-secret", "SELECT 1")
        assert r.returncode != 0  # no pool db2 yet

        # systemctl reload = SIGHUP: add a pool, and it is there without a restart.
        cfg["pools"]["db2"] = dict(cfg["pools"]["db1"])
        shutil.copy(write_config(tmp_path, cfg, name="reloaded.yaml"), root.file(config_path))
        proc.send_signal(signal.SIGHUP)
        wait_until(lambda: psql(D, "u_scram", "db2", "scram-secret", "SELECT 2")
                   .stdout.strip() == "2", timeout=20, message="db2 served after SIGHUP")
        assert proc.poll() is None
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
        notify.close()
    assert proc.returncode == 0, log_path.read_text()
    shutil.copy2(str(tmp_path / "packaged.yaml"), root.file(config_path))

    _run_patroni_proxy(root, tmp_path)

    # remove keeps the conffiles, purge removes them and everything postinst made.
    root.run("apt-get remove -y -q pgdoorman")
    assert not os.path.exists(root.file("/usr/bin/pgdoorman"))
    assert not os.path.exists(root.file("/usr/bin/patroni_proxy"))
    assert os.path.exists(root.file("/etc/pgdoorman/pgdoorman.yaml"))
    assert os.path.exists(root.file("/etc/pgdoorman/patroni_proxy.yaml"))
    root.run("apt-get purge -y -q pgdoorman")
    left = [p for p in ("/etc/pgdoorman", "/var/log/pgdoorman", "/run/pgdoorman",
                        "/lib/systemd/system/pgdoorman.service", "/etc/logrotate.d/pgdoorman",
                        "/lib/systemd/system/patroni_proxy.service",
                        "/usr/lib/python3/dist-packages/pgdoorman", "/etc/default/pgdoorman",
                        "/usr/lib/pgdoorman", "/var/lib/pgdoorman")
            if os.path.exists(root.file(p))]
    assert left == [], left
    leftovers = glob.glob(root.file("/usr/lib/python3/dist-packages/twisted/plugins/pgdoorman*"))
    assert leftovers == [], leftovers
    out = root.run("dpkg -l pgdoorman", check=False)
    assert "ii" not in out.stdout


def _http_get(port, path):
    with urllib.request.urlopen("http://127.0.0.1:%d%s" % (port, path), timeout=10) as r:
        return r.status, r.read()


def _run_patroni_proxy(root, tmp_path):
    """patroni_proxy from the installed package: the shipped config passes -t, the unit is
    installed but not enabled, and the unit's ExecStartPre and ExecStart run as postgres
    (Patroni's API is down here: the proxy serves its HTTP API, closes clients at once, adds
    a port on SIGHUP and stops cleanly on SIGTERM)."""
    out = root.run("patroni_proxy --version")
    assert out.stdout.strip() == "patroni_proxy (pgdoorman) %s" % __version__
    out = root.run("patroni_proxy -t /etc/pgdoorman/patroni_proxy.yaml")
    assert "is valid" in out.stdout, out.stdout
    root.run("test -f /usr/share/man/man1/patroni_proxy.1.gz")
    assert os.path.exists(root.file("/lib/systemd/system/patroni_proxy.service"))
    assert not glob.glob(root.file("/etc/systemd/system/*.wants/patroni_proxy.service"))

    unit = _unit(root.path, "patroni_proxy")["Service"]
    env = dict(kv.split("=", 1) for kv in shlex.split(unit["Environment"]))
    assert env["PATRONI_PROXY_CONFIG"] == "/etc/pgdoorman/patroni_proxy.yaml"
    api, master, replicas, dead = free_port(), free_port(), free_port(), free_port()
    text = ('cluster_update_interval: 1\nlisten_address: "127.0.0.1:%d"\nclusters:\n'
            '  main:\n    hosts: ["http://127.0.0.1:%d"]\n    ports:\n'
            '      master: {listen: "127.0.0.1:%d", roles: ["leader"], host_port: 5432}\n'
            % (api, dead, master))
    config_path = "/tmp/patroni_proxy.yaml"
    with open(root.file(config_path), "w") as f:
        f.write(text)
    os.chmod(root.file(config_path), 0o644)

    def command(key):
        return shlex.split(unit[key].replace("${PATRONI_PROXY_CONFIG}", config_path))

    root.run(" ".join(map(shlex.quote, command("ExecStartPre"))), user="postgres")
    log_path = tmp_path / "patroni_proxy.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            ["chroot", "--userspec=postgres:postgres", root.path, "/usr/bin/env", "-i",
             "PATH=/usr/bin:/bin", "PATRONI_PROXY_CONFIG=%s" % config_path]
            + command("ExecStart"), stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_port(api, proc, log_path.read_text)
        status, body = _http_get(api, "/")
        assert status == 200 and body.strip() == b"OK", body
        wait_port(master, proc, log_path.read_text)
        # No member known: the client is closed at once, not left hanging.
        with socket.create_connection(("127.0.0.1", master), timeout=10) as s:
            assert s.recv(1) == b""
        # systemctl reload = SIGHUP: a port added to the file starts listening.
        with open(root.file(config_path), "a") as f:
            f.write('      replicas: {listen: "127.0.0.1:%d", roles: ["sync", "async"], '
                    'host_port: 5432}\n' % replicas)
        proc.send_signal(signal.SIGHUP)
        wait_port(replicas, proc, log_path.read_text)
        assert b"replicas" in _http_get(api, "/status")[1]
        assert proc.poll() is None
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
    assert proc.returncode == 0, log_path.read_text()
