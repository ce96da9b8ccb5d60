"""
Tests for L{pgdoorman.config}: PgDoorman's files load unchanged, values land
in the right units, inheritance resolves in one place, and every mistake is
reported with file, key and (for YAML) line.
"""

from __future__ import annotations

import dataclasses

import pytest

from pgdoorman import config
from pgdoorman.config import ConfigError, load, loads, password_kind

try:
    import tomllib  # noqa: F401
    HAVE_TOML = True
except ImportError:
    try:
        import tomli  # noqa: F401
        HAVE_TOML = True
    except ImportError:
        HAVE_TOML = False

needs_toml = pytest.mark.skipif(not HAVE_TOML, reason="no TOML parser")

# The seed README's "Minimal config", verbatim.
SEED_YAML = """\
general:
  host: "0.0.0.0"
  port: 6432
  admin_username: "admin"
  admin_password: "change_me"

pools:
  mydb:
    server_host: "127.0.0.1"
    server_port: 5432
    pool_mode: "transaction"
    users:
      - username: "app"
        password: "md5..."           # hash for client auth (from pg_shadow)
        pool_size: 40
        server_username: "app"       # real PostgreSQL username
        server_password: "secret"    # real PostgreSQL password (plaintext)
"""

SEED_TOML = """\
[general]
host = "0.0.0.0"
port = 6432
admin_username = "admin"
admin_password = "change_me"

[pools.mydb]
server_host = "127.0.0.1"
server_port = 5432
pool_mode = "transaction"

[[pools.mydb.users]]
username = "app"
password = "md5..."
pool_size = 40
server_username = "app"
server_password = "secret"
"""

MD5 = "md5" + "0123456789abcdef" * 2

MINIMAL = """\
general:
  admin_password: x
pools:
  db:
    users:
      - username: u
        password: p
"""


def write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def error_of(text, fmt="yaml", path="conf.yaml"):
    with pytest.raises(ConfigError) as info:
        loads(text, fmt, path)
    return info.value


def check_seed(cfg):
    general = cfg.general
    assert (general.host, general.port) == ("0.0.0.0", 6432)
    assert (general.admin_username, general.admin_password) == (
        "admin", "change_me")
    assert list(cfg.pools) == ["mydb"]
    pool = cfg.pools["mydb"]
    assert pool.name == "mydb"
    assert (pool.server_host, pool.server_port) == ("127.0.0.1", 5432)
    assert pool.server_database == "mydb"
    assert pool.pool_mode == "transaction"
    (user,) = pool.users
    assert user.username == "app"
    assert user.password == "md5..."
    assert user.pool_size == 40
    assert (user.server_username, user.server_password) == ("app", "secret")
    assert user.pool_mode is None and user.server_lifetime is None
    assert pool.user("app") is user
    assert pool.user("nobody") is None
    assert cfg.unimplemented_keys() == []


class TestSeed:
    def test_yaml_file(self, tmp_path):
        path = write(tmp_path, "pg_doorman.yaml", SEED_YAML)
        cfg = load(path)
        assert cfg.path == path
        check_seed(cfg)

    @needs_toml
    def test_toml_file(self, tmp_path):
        check_seed(load(write(tmp_path, "pg_doorman.toml", SEED_TOML)))

    @needs_toml
    def test_legacy_toml_user_tables(self):
        text = SEED_TOML.replace("[[pools.mydb.users]]",
                                 "[pools.mydb.users.0]")
        check_seed(loads(text, "toml"))

    def test_unknown_extension_yaml(self, tmp_path):
        check_seed(load(write(tmp_path, "pg_doorman.conf", SEED_YAML)))

    @needs_toml
    def test_unknown_extension_toml(self, tmp_path):
        check_seed(load(write(tmp_path, "pg_doorman.conf", SEED_TOML)))

    def test_defaults(self):
        general = loads(SEED_YAML).general
        assert general.connect_timeout == 3.0
        assert general.query_wait_timeout == 5.0
        assert general.idle_timeout == 600.0
        assert general.server_lifetime == 1200.0
        assert general.shutdown_timeout == 10.0
        assert general.server_idle_check_timeout == 60.0
        assert general.max_connections == 8192
        assert general.server_round_robin is False
        assert general.tcp_no_delay is True
        assert general.prepared_statements is True
        assert general.prepared_statements_cache_size == 8192
        assert general.server_prepared_statements_cache_size is None
        assert general.log_client_connections is True
        assert general.log_client_disconnections is True
        assert general.max_memory_usage == 256 * 1024 * 1024
        assert general.unix_socket_mode == 0o600
        assert general.hba == [] and general.startup_parameters == {}
        prometheus = loads(SEED_YAML).prometheus
        assert (prometheus.enabled, prometheus.host, prometheus.port) == (
            False, "0.0.0.0", 9127)

    def test_pool_and_user_defaults(self):
        pool = loads(MINIMAL).pools["db"]
        assert pool.server_host == "127.0.0.1"
        assert pool.server_port == 5432
        assert pool.server_database == "db"
        assert pool.pool_mode == "transaction"
        assert pool.users[0].pool_size == 40
        assert loads(MINIMAL).general.port == 6432


class TestOptionTable:
    def test_sections(self):
        assert {o.section for o in config.OPTIONS} == set(config.SECTIONS)

    def test_names_unique_per_section(self):
        seen = [(o.section, o.name) for o in config.OPTIONS]
        assert len(seen) == len(set(seen))

    def test_types_described(self):
        for option in config.OPTIONS:
            assert option.type in config.TYPE_DESCRIPTIONS, option
            assert option.help, option

    def test_reference_keys_present(self):
        """
        The keys REFERENCE.md lists for PgDoorman are all in the table.
        """
        general = set(config.options("general"))
        for name in (
                "host port admin_username admin_password connect_timeout "
                "query_wait_timeout idle_timeout server_lifetime "
                "server_idle_check_timeout shutdown_timeout max_connections "
                "max_concurrent_creates tcp_keepalives_idle "
                "tcp_keepalives_count tcp_keepalives_interval tcp_so_linger "
                "tcp_no_delay tcp_user_timeout tcp_socket_buffer_size backlog "
                "unix_socket_dir unix_socket_mode log_client_connections "
                "log_client_disconnections message_size_to_be_stream "
                "max_memory_usage server_round_robin sync_server_parameters "
                "worker_threads pooler_check_query prepared_statements "
                "prepared_statements_cache_size "
                "server_prepared_statements_cache_size "
                "client_anonymous_prepared_cache_size tls_certificate "
                "tls_private_key tls_ca_cert tls_mode "
                "tls_rate_limit_per_second server_tls_mode server_tls_ca_cert "
                "server_tls_certificate server_tls_private_key hba pg_hba "
                "daemon_pid_file syslog_prog_name startup_parameters "
                "patroni_api_urls").split():
            assert name in general, name
        pool = set(config.options("pool"))
        for name in (
                "server_host server_port server_database pool_mode "
                "connect_timeout idle_timeout server_lifetime "
                "cleanup_server_connections application_name "
                "prepared_statements_cache_size "
                "server_prepared_statements_cache_size max_db_connections "
                "min_connection_lifetime reserve_pool_size "
                "reserve_pool_timeout min_guaranteed_pool_size "
                "startup_parameters auth_query users").split():
            assert name in pool, name
        assert set(config.options("user")) == set(
            "username password pool_size min_pool_size pool_mode "
            "server_lifetime server_username server_password "
            "auth_pam_service".split())

    def test_dataclasses_match_table(self):
        for cls, section in ((config.GeneralConfig, "general"),
                             (config.UserConfig, "user")):
            names = {f.name for f in dataclasses.fields(cls)}
            assert names == {o.name for o in config.OPTIONS
                             if o.section == section and not o.alias_of}


class TestValues:
    def general(self, extra):
        return loads(MINIMAL.replace("  admin_password: x\n",
                                     "  admin_password: x\n" + extra)).general

    @pytest.mark.parametrize("text, seconds", [
        ('"30s"', 30.0), ('"5m"', 300.0), ('"100ms"', 0.1), ('"1h"', 3600.0),
        ('"2d"', 172800.0), ('"250us"', 0.00025), ('"1.5s"', 1.5),
        ("3000", 3.0), ('"3000"', 3.0), ("0", 0.0), ("2.5", 0.0025),
        ('"5 S"', 5.0),
    ])
    def test_durations(self, text, seconds):
        value = self.general("  connect_timeout: %s\n" % (text,))
        assert value.connect_timeout == pytest.approx(seconds)
        assert isinstance(value.connect_timeout, float)

    def test_tcp_seconds(self):
        general = self.general("  tcp_keepalives_idle: 7\n"
                               '  tcp_user_timeout: "2m"\n')
        assert general.tcp_keepalives_idle == 7.0
        assert general.tcp_user_timeout == 120.0

    @pytest.mark.parametrize("text, size", [
        ('"256MB"', 256 * 1024 ** 2), ('"1GB"', 1024 ** 3),
        ('"64KB"', 64 * 1024), ('"64k"', 64 * 1024), ('"10B"', 10),
        ("1048576", 1048576), ('"1048576"', 1048576),
    ])
    def test_sizes(self, text, size):
        general = self.general("  max_memory_usage: %s\n" % (text,))
        assert general.max_memory_usage == size

    @pytest.mark.parametrize("bad", ['"5x"', '"-5s"', "-1", '"s"', "true",
                                     "[1]"])
    def test_bad_duration(self, bad):
        with pytest.raises(ConfigError) as info:
            self.general("  idle_timeout: %s\n" % (bad,))
        assert "general.idle_timeout" in str(info.value)

    @pytest.mark.parametrize("bad", ['"5.5MB"', '"5TB"', "-1", "1.5",
                                     "false"])
    def test_bad_size(self, bad):
        with pytest.raises(ConfigError) as info:
            self.general("  max_memory_usage: %s\n" % (bad,))
        assert "general.max_memory_usage" in str(info.value)

    @pytest.mark.parametrize("bad", ["yes", '"true"', "1", "on"])
    def test_booleans_must_be_booleans(self, bad):
        e = pytest.raises(ConfigError, self.general,
                          "  tcp_no_delay: %s\n" % (bad,)).value
        assert "expected a boolean" in e.problem

    def test_yaml_12_booleans(self):
        assert self.general("  tcp_no_delay: false\n").tcp_no_delay is False
        assert self.general("  tcp_no_delay: True\n").tcp_no_delay is True

    @pytest.mark.parametrize("bad", ["true", "1.0", '"8"'])
    def test_ints_reject_other_types(self, bad):
        e = pytest.raises(ConfigError, self.general,
                          "  max_connections: %s\n" % (bad,)).value
        assert "expected an integer" in e.problem

    @pytest.mark.parametrize("port", ["0", "65536", "-1"])
    def test_port_range(self, port):
        e = pytest.raises(ConfigError, self.general,
                          "  port: %s\n" % (port,)).value
        assert e.key == "general.port"
        assert "65535" in e.problem

    def test_unix_socket_mode(self):
        assert self.general('  unix_socket_mode: "0660"\n') \
            .unix_socket_mode == 0o660
        # YAML 1.1 octal: PyYAML reads 0644 as 420 == 0o644.
        assert self.general("  unix_socket_mode: 0644\n") \
            .unix_socket_mode == 0o644
        with pytest.raises(ConfigError):
            self.general('  unix_socket_mode: "0900"\n')

    def test_nested(self):
        general = self.general(
            "  hba: [10.0.0.0/8, '::1/128']\n"
            "  startup_parameters: {work_mem: 64MB, statement_timeout: 0}\n"
            "  patroni_api_urls: ['http://a:8008']\n")
        assert general.hba == ["10.0.0.0/8", "::1/128"]
        assert general.startup_parameters == {
            "work_mem": "64MB", "statement_timeout": "0"}
        assert general.patroni_api_urls == ["http://a:8008"]

    def test_bad_cidr(self):
        e = pytest.raises(ConfigError, self.general,
                          "  hba: [10.0.0.0/33]\n").value
        assert e.key == "general.hba"

    @pytest.mark.parametrize("params", [
        "{user: x}", "{_pq_.x: y}", "{'bad name': y}", "{jit: true}",
        "[a]", "{work_mem: [1]}",
    ])
    def test_bad_startup_parameters(self, params):
        e = pytest.raises(ConfigError, self.general,
                          "  startup_parameters: %s\n" % (params,)).value
        assert e.key == "general.startup_parameters"

    def test_pg_hba_inline(self):
        rules = "host all all 0.0.0.0/0 md5"
        assert self.general("  pg_hba: %s\n" % (rules,)).pg_hba == rules
        assert self.general("  pg_hba: {content: '%s'}\n" % (rules,)) \
            .pg_hba == rules

    def test_pg_hba_path(self, tmp_path):
        (tmp_path / "hba.conf").write_text("local all all trust\n")
        text = MINIMAL.replace("  admin_password: x\n",
                               "  admin_password: x\n"
                               "  pg_hba: {path: hba.conf}\n")
        cfg = load(write(tmp_path, "c.yaml", text))
        assert cfg.general.pg_hba == "local all all trust\n"

    def test_pg_hba_missing_file(self, tmp_path):
        text = MINIMAL.replace("  admin_password: x\n",
                               "  admin_password: x\n"
                               "  pg_hba: {path: nope.conf}\n")
        with pytest.raises(ConfigError) as info:
            load(write(tmp_path, "c.yaml", text))
        assert info.value.key == "general.pg_hba.path"
        assert info.value.line == 3

    def test_hba_and_pg_hba_exclusive(self):
        with pytest.raises(ConfigError) as info:
            self.general("  hba: [10.0.0.0/8]\n  pg_hba: 'local all all "
                         "trust'\n")
        assert "cannot both be set" in str(info.value)

    def test_alias(self):
        general = self.general("  client_prepared_statements_cache_size: 9\n")
        assert general.client_anonymous_prepared_cache_size == 9
        with pytest.raises(ConfigError) as info:
            self.general("  client_prepared_statements_cache_size: 9\n"
                         "  client_anonymous_prepared_cache_size: 8\n")
        assert "set only one" in str(info.value)

    def test_null_means_unset(self):
        general = self.general("  connect_timeout: null\n"
                               "  tls_certificate: ~\n")
        assert general.connect_timeout == 3.0
        assert general.tls_certificate is None


class TestErrors:
    def test_unknown_key_with_suggestion_and_line(self):
        text = SEED_YAML.replace("pool_size: 40", "pool_szie: 40")
        e = error_of(text)
        assert e.path == "conf.yaml"
        assert e.key == "pools.mydb.users[0].pool_szie"
        assert e.line == 15
        assert "unknown key 'pool_szie'" in e.problem
        assert "did you mean 'pool_size'" in e.problem
        assert str(e).startswith(
            "conf.yaml:15: pools.mydb.users[0].pool_szie: unknown key")

    def test_key_from_another_section(self):
        text = SEED_YAML.replace('    pool_mode: "transaction"\n',
                                 '    pool_mode: "transaction"\n'
                                 '    auth_pam_service: "x"\n')
        e = error_of(text)
        assert e.key == "pools.mydb.auth_pam_service"
        assert "in a users entry" in e.problem

    def test_unknown_top_level(self):
        e = error_of(SEED_YAML + "pool:\n  x: 1\n")
        assert e.key == "pool" and e.line == 18
        assert "did you mean 'pools'" in e.problem

    def test_wrong_type(self):
        text = SEED_YAML.replace("pool_size: 40", 'pool_size: "forty"')
        e = error_of(text)
        assert (e.key, e.line) == ("pools.mydb.users[0].pool_size", 15)
        assert "expected an integer, got string 'forty'" in e.problem

    def test_numeric_password_hint(self):
        text = SEED_YAML.replace('password: "md5..."', "password: 12345")
        e = error_of(text)
        assert e.key == "pools.mydb.users[0].password"
        assert "quotes" in e.problem

    def test_invalid_pool_mode(self):
        text = SEED_YAML.replace('pool_mode: "transaction"',
                                 'pool_mode: "statement"')
        e = error_of(text)
        assert (e.key, e.line) == ("pools.mydb.pool_mode", 11)
        assert "transaction" in e.problem and "session" in e.problem

    def test_missing_username(self):
        text = SEED_YAML.replace('      - username: "app"\n        password',
                                 "      - password")
        e = error_of(text)
        assert e.key == "pools.mydb.users[0]"
        assert e.line == 13
        assert "missing required key 'username'" in e.problem

    def test_missing_admin_password(self):
        e = error_of(SEED_YAML.replace('  admin_password: "change_me"\n', ""))
        assert e.key == "general" and e.line == 1
        assert "admin_password" in e.problem

    def test_pool_needs_a_user(self):
        text = SEED_YAML.split("    users:")[0] + "    users: []\n"
        e = error_of(text)
        assert e.key == "pools.mydb.users"
        assert "at least one user" in e.problem
        e = error_of(SEED_YAML.split("    users:")[0])
        assert e.key == "pools.mydb"

    def test_general_required(self):
        e = error_of("pools: {}\n")
        assert "general" in e.problem and e.key is None

    def test_pools_required(self):
        e = error_of("general: {admin_password: x}\n")
        assert "pools" in e.problem

    def test_pool_size_at_least_one(self):
        e = error_of(SEED_YAML.replace("pool_size: 40", "pool_size: 0"))
        assert e.key == "pools.mydb.users[0].pool_size"
        assert "at least 1" in e.problem

    def test_min_pool_size_not_above_pool_size(self):
        text = SEED_YAML.replace("pool_size: 40",
                                 "pool_size: 4\n        min_pool_size: 5")
        e = error_of(text)
        assert (e.key, e.line) == ("pools.mydb.users[0].min_pool_size", 16)

    def test_server_username_alone(self):
        # PgDoorman 3.10: the forced user logs in by trust, with the md5 hash or with the
        # client's SCRAM keys; no server_password needed.
        text = SEED_YAML.replace(
            '        server_password: "secret"    # real PostgreSQL '
            'password (plaintext)\n', "").replace('"md5..."', '"%s"' % MD5)
        user = loads(text).pools["mydb"].users[0]
        assert (user.server_username, user.server_password) == ("app", None)
        s = loads(text).pool_settings("mydb", "app")
        assert s.server_username == "app" and s.server_password is None

    def test_duplicate_user(self):
        text = SEED_YAML + '      - username: "app"\n        password: x\n'
        e = error_of(text)
        assert e.key == "pools.mydb.users[1].username"
        assert "twice" in e.problem

    def test_duplicate_key(self):
        e = error_of(SEED_YAML.replace("  port: 6432\n",
                                       "  port: 6432\n  port: 6433\n"))
        assert (e.key, e.line) == ("general.port", 4)

    def test_not_yaml(self):
        e = error_of("general: [unclosed\n")
        assert e.path == "conf.yaml"
        assert "not valid YAML" in str(e)
        assert str(e).startswith("conf.yaml")

    @needs_toml
    def test_not_toml(self):
        e = error_of("[general\n", "toml", "conf.toml")
        assert str(e).startswith("conf.toml: not valid TOML")

    @needs_toml
    def test_toml_error_has_key_but_no_line(self):
        e = error_of(SEED_TOML.replace("pool_size = 40", "pool_size = 4.5"),
                     "toml", "conf.toml")
        assert e.key == "pools.mydb.users[0].pool_size"
        assert e.line is None
        assert str(e).startswith("conf.toml: pools.mydb.users[0].pool_size:")

    def test_not_a_table(self):
        assert "expected a table" in str(error_of("- a\n- b\n"))
        assert "empty" in str(error_of(""))

    def test_unreadable(self, tmp_path):
        missing = str(tmp_path / "missing.yaml")
        with pytest.raises(ConfigError) as info:
            load(missing)
        assert str(info.value).startswith(missing + ": cannot read")

    def test_include_refused(self):
        e = error_of(SEED_YAML + "include:\n  files: [a.yaml]\n")
        assert e.key == "include" and "not supported" in e.problem

    def test_tls_pair(self):
        e = error_of(SEED_YAML.replace("  port: 6432\n",
                                       "  port: 6432\n  tls_certificate: c\n"))
        assert "tls_private_key" in e.problem

    def test_config_error_is_exception(self):
        assert issubclass(ConfigError, Exception)


class TestPoolSettings:
    TEXT = """\
general:
  admin_password: x
  connect_timeout: 1000
  idle_timeout: "2m"
  server_lifetime: "1h"
  query_wait_timeout: "7s"
  server_round_robin: true
  server_prepared_statements_cache_size: 100
  startup_parameters: {work_mem: 4MB, search_path: public}
pools:
  db:
    server_host: db.example
    server_database: real
    pool_mode: session
    idle_timeout: "30s"
    server_lifetime: "10m"
    application_name: app1
    prepared_statements_cache_size: 500
    startup_parameters: {work_mem: 8MB}
    users:
      - username: plain
        password: secret
        pool_size: 10
        min_pool_size: 2
        pool_mode: transaction
        server_lifetime: "5m"
      - username: hashed
        password: %s
      - username: scram
        password: "SCRAM-SHA-256$4096:c2FsdA==$a2V5:c2Vy"
        server_username: pg
        server_password: pgpass
""" % (MD5,)

    def test_user_values_win(self):
        s = loads(self.TEXT).pool_settings("db", "plain")
        assert (s.pool_name, s.username) == ("db", "plain")
        assert s.pool_mode == "transaction"
        assert (s.pool_size, s.min_pool_size) == (10, 2)
        assert s.server_lifetime == 300.0
        assert s.server_username == "plain"
        assert s.server_password == "secret"
        assert s.client_password == "secret"

    def test_pool_then_general(self):
        s = loads(self.TEXT).pool_settings("db", "hashed")
        assert s.pool_mode == "session"
        assert s.pool_size == 40 and s.min_pool_size == 0
        assert s.server_lifetime == 600.0
        assert s.idle_timeout == 30.0
        assert s.connect_timeout == 1.0
        assert s.query_wait_timeout == 7.0
        assert s.server_round_robin is True
        assert (s.server_host, s.server_port, s.server_database) == (
            "db.example", 5432, "real")
        assert s.application_name == "app1"
        assert s.cleanup_server_connections is True
        assert s.startup_parameters == {"work_mem": "8MB",
                                        "search_path": "public"}
        assert s.prepared_statements_cache_size == 500
        assert s.server_prepared_statements_cache_size == 100

    def test_hashed_password_is_not_a_server_password(self):
        s = loads(self.TEXT).pool_settings("db", "hashed")
        assert s.client_password == MD5
        assert s.server_password is None
        s = loads(self.TEXT).pool_settings("db", "scram")
        assert (s.server_username, s.server_password) == ("pg", "pgpass")

    def test_general_defaults(self):
        s = loads(MINIMAL).pool_settings("db", "u")
        assert s.connect_timeout == 3.0
        assert s.idle_timeout == 600.0
        assert s.server_lifetime == 1200.0
        assert s.server_database == "db"
        assert s.prepared_statements_cache_size == 8192
        assert s.server_prepared_statements_cache_size == 8192
        assert s.startup_parameters == {}

    def test_prepared_statements_off(self):
        text = MINIMAL.replace("  admin_password: x\n",
                               "  admin_password: x\n"
                               "  prepared_statements: false\n")
        s = loads(text).pool_settings("db", "u")
        assert s.prepared_statements_cache_size == 0
        assert s.server_prepared_statements_cache_size == 0

    def test_startup_parameters_not_shared(self):
        cfg = loads(self.TEXT)
        cfg.pool_settings("db", "plain").startup_parameters["x"] = "y"
        assert "x" not in cfg.general.startup_parameters

    def test_unknown(self):
        cfg = loads(MINIMAL)
        with pytest.raises(KeyError):
            cfg.pool_settings("nope", "u")
        with pytest.raises(KeyError):
            cfg.pool_settings("db", "nope")


class TestUnimplemented:
    def test_reported_in_file_order(self):
        text = """\
general:
  admin_password: x
  worker_threads: 8
  worker_cpu_affinity_pinning: true
  tokio_event_interval: 61
  max_memory_usage: 512MB
  connect_timeout: 5s
prometheus:
  enabled: true
  port: 9128
web:
  enabled: true
pools:
  db:
    log_client_parameter_status_changes: true
    max_db_connections: 10
    auth_query:
      query: SELECT usename, passwd FROM pg_shadow WHERE usename = $1
      user: auth
      cache_ttl: 10m
    users:
      - username: u
        password: p
        auth_pam_service: login
"""
        cfg = loads(text)
        assert cfg.unimplemented_keys() == [
            "web",
            "general.worker_cpu_affinity_pinning",
            "general.tokio_event_interval",
            "general.max_memory_usage",
            "pools.db.log_client_parameter_status_changes",
        ]
        assert cfg.general.worker_threads == 8
        assert cfg.prometheus.enabled is True and cfg.prometheus.port == 9128
        auth_query = cfg.pools["db"].auth_query
        assert auth_query.cache_ttl == 600.0
        assert auth_query.workers == 2 and auth_query.pool_size == 40

    def test_auth_query_checked(self):
        text = MINIMAL + "    auth_query: {query: q}\n"
        e = error_of(text)
        assert e.key == "pools.db.auth_query" and "'user'" in e.problem

    def test_pool_with_only_auth_query(self):
        text = ("general: {admin_password: x}\n"
                "pools:\n  db:\n    auth_query: {query: q, user: a}\n")
        assert loads(text).pools["db"].users == []

    def test_auth_query_user_settings(self):
        # A looked-up user: passthrough logs in as itself, dedicated mode as server_user.
        text = ("general: {admin_password: x}\n"
                "pools:\n  db:\n    auth_query: {query: q, user: a, pool_size: 7,"
                " min_pool_size: 1}\n")
        s = loads(text).pool_settings("db", "alice")
        assert (s.username, s.server_username, s.server_password, s.pool_size,
                s.min_pool_size) == ("alice", "alice", None, 7, 1)
        text = text.replace("min_pool_size: 1", "server_user: app, server_password: pw")
        s = loads(text).pool_settings("db", "alice")
        assert (s.server_username, s.server_password) == ("app", "pw")
        with pytest.raises(KeyError):
            loads(MINIMAL).pool_settings("db", "alice")


@pytest.mark.parametrize("secret, kind", [
    (MD5, "md5"), (MD5.upper().replace("MD5", "md5"), "md5"),
    ("md5short", "plain"), ("md5" + "g" * 32, "plain"),
    ("SCRAM-SHA-256$4096:salt$stored:server", "scram"),
    ("secret", "plain"), ("", "plain"),
])
def test_password_kind(secret, kind):
    assert password_kind(secret) == kind



def test_yaml_anchors_and_merge_keys():
    text = """\
general: {admin_password: x}
pools:
  a:
    users:
      - &app {username: app, password: p, pool_size: 3}
  b:
    users:
      - <<: *app
        pool_size: 4
"""
    cfg = loads(text)
    assert cfg.pool_settings("a", "app").pool_size == 3
    assert cfg.pool_settings("b", "app").pool_size == 4
