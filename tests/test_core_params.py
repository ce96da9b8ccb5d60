"""
Session parameters in transaction mode (issue 7, point 4): each client keeps its own
client_encoding, DateStyle, TimeZone, application_name, IntervalStyle,
standard_conforming_strings and (sent at startup) search_path on whatever server connection it
lands on, is told about them with ParameterStatus as PostgreSQL would tell it, and unknown
startup parameters drivers send (pgjdbc's extra_float_digits) are accepted.

Expected values come from PostgreSQL itself: the same client talks to the cluster directly.
Pools have pool_size 1 so that every client provably shares the one server connection.
"""

import psycopg
import psycopg.errors
import pytest

from conftest import RawClient, simple_config

USER, PW = "u_scram", "scram-secret"

SETTINGS = ["DateStyle", "TimeZone", "application_name", "search_path", "client_encoding",
            "IntervalStyle", "standard_conforming_strings"]
PROBE = ("SELECT " + ", ".join("current_setting('%s')" % s for s in SETTINGS)
         + ", pg_backend_pid()")

REPORTED = ["DateStyle", "TimeZone", "application_name", "client_encoding", "IntervalStyle",
            "standard_conforming_strings", "integer_datetimes", "server_encoding",
            "is_superuser", "session_authorization"]

CLIENT_A = {"DateStyle": "German, DMY", "TimeZone": "Asia/Tokyo", "application_name": "client_a",
            "search_path": "sa, public", "client_encoding": "LATIN1",
            "IntervalStyle": "sql_standard", "standard_conforming_strings": "off",
            "extra_float_digits": "3"}
CLIENT_B = {"DateStyle": "ISO, MDY", "TimeZone": "America/New_York",
            "application_name": "client_b", "search_path": "sb", "client_encoding": "UTF8",
            "IntervalStyle": "postgres", "extra_float_digits": "1"}
# What pgjdbc sends.
JDBC = {"client_encoding": "UTF8", "DateStyle": "ISO", "TimeZone": "Europe/Berlin",
        "extra_float_digits": "2", "application_name": "PostgreSQL JDBC Driver"}


@pytest.fixture
def d(pg, pgdoorman):
    return pgdoorman(simple_config(pg, USER, PW, pool_size=1,
                                   general={"query_wait_timeout": "5s"}))


def direct(pg, params):
    return RawClient(pg.port).startup(USER, "db1", PW, **params)


def via(d, params):
    return RawClient(d.port).startup(USER, "db1", PW, **params)


@pytest.mark.parametrize("params", [CLIENT_A, CLIENT_B, JDBC, {}], ids=["a", "b", "jdbc", "none"])
def test_startup_parameter_status_as_postgresql_reports_it(pg, d, params):
    want = direct(pg, params)
    got = via(d, params)
    try:
        for key in REPORTED:
            assert got.parameters.get(key) == want.parameters.get(key), key
        assert got.parameters["server_version"].split(".")[0] == "15"
        assert got.backend_key is not None
        assert got.query(PROBE)[0][:-1] == want.query(PROBE)[0][:-1]
    finally:
        got.terminate()
        want.terminate()


def test_startup_parameters_kept_per_client_on_a_shared_server(pg, d):
    want_a = direct(pg, CLIENT_A).query(PROBE)[0][:-1]
    want_b = direct(pg, CLIENT_B).query(PROBE)[0][:-1]
    assert want_a != want_b
    a, b = via(d, CLIENT_A), via(d, CLIENT_B)
    pids = set()
    try:
        for _ in range(3):
            for client, want in ((a, want_a), (b, want_b)):
                row = client.query(PROBE)[0]
                assert row[:-1] == want
                pids.add(row[-1])
        assert len(pids) == 1, "clients did not share the server; the test proves nothing"
    finally:
        a.terminate()
        b.terminate()


def test_set_follows_the_client_in_transaction_mode(pg, d):
    a, b = via(d, {"TimeZone": "Asia/Tokyo"}), via(d, {"TimeZone": "Asia/Tokyo"})
    try:
        a.query("SET TimeZone = 'UTC'")
        assert a.parameters["TimeZone"] == "UTC"
        a.query("SET DateStyle = 'SQL, DMY'")
        a.query("SET application_name = 'renamed_a'")
        b_row = b.query("SELECT current_setting('TimeZone'), current_setting('DateStyle'), "
                        "current_setting('application_name'), pg_backend_pid()")[0]
        a_row = a.query("SELECT current_setting('TimeZone'), current_setting('DateStyle'), "
                        "current_setting('application_name'), pg_backend_pid()")[0]
        assert b_row[3] == a_row[3], "clients did not share the server; the test proves nothing"
        assert b_row[:3] == ("Asia/Tokyo", "ISO, MDY", "")
        assert a_row[:3] == ("UTC", "SQL, DMY", "renamed_a")
        assert b.parameters["TimeZone"] == "Asia/Tokyo"
        # SET LOCAL ends with its transaction, as in PostgreSQL.
        a.query("BEGIN; SET LOCAL TimeZone = 'Europe/Paris'; COMMIT")
        assert a.query("SHOW TimeZone") == [("UTC",)]
        assert a.parameters["TimeZone"] == "UTC"
    finally:
        a.terminate()
        b.terminate()


def test_reset_returns_to_the_clients_startup_value(pg, d):
    # As in PostgreSQL: RESET goes back to what the client sent at startup.
    a, b = via(d, {"TimeZone": "Asia/Tokyo"}), via(d, {"TimeZone": "UTC"})
    try:
        a.query("SET TimeZone = 'Africa/Cairo'")
        assert b.query("SHOW TimeZone") == [("UTC",)]
        a.query("RESET TimeZone")
        assert a.query("SHOW TimeZone") == [("Asia/Tokyo",)]
        assert a.parameters["TimeZone"] == "Asia/Tokyo"
        assert b.query("SHOW TimeZone") == [("UTC",)]
    finally:
        a.terminate()
        b.terminate()


def test_psycopg_client_encodings_on_a_shared_server(pg, d, tmp_path):
    pg.psql("DROP TABLE IF EXISTS enc_t; CREATE TABLE enc_t (s text); "
            "GRANT ALL ON enc_t TO PUBLIC", db="db1")
    latin = d.connect(USER, "db1", PW, client_encoding="LATIN1")
    utf8 = d.connect(USER, "db1", PW, client_encoding="UTF8")
    try:
        assert latin.info.encoding == "iso8859-1"
        assert utf8.info.encoding == "utf-8"
        for _ in range(2):
            assert latin.execute("SELECT 'h\u00e9llo', pg_backend_pid()").fetchone()[0] == \
                "h\u00e9llo"
            assert utf8.execute("SELECT 'h\u00e9llo \u20ac'").fetchone()[0] == "h\u00e9llo \u20ac"
        latin.execute("INSERT INTO enc_t VALUES (%s)", ["gr\u00fc\u00dfe"])
        assert utf8.execute("SELECT s FROM enc_t").fetchone() == ("gr\u00fc\u00dfe",)
        with pytest.raises(psycopg.errors.UntranslatableCharacter):
            # The euro sign has no LATIN1 form: PostgreSQL refuses to send it to this client.
            latin.execute("SELECT chr(8364)").fetchone()
        assert utf8.execute("SELECT chr(8364)").fetchone() == ("\u20ac",)
    finally:
        latin.close()
        utf8.close()


def test_jdbc_style_startup_is_accepted(d):
    c = via(d, JDBC)
    try:
        assert c.query("SELECT 1") == [("1",)]
        assert c.query("SHOW extra_float_digits") in ([("2",)], [("1",)])
    finally:
        c.terminate()


def test_search_path_from_startup(pg, d):
    pg.psql("DROP SCHEMA IF EXISTS sp_a CASCADE; CREATE SCHEMA sp_a; "
            "CREATE TABLE sp_a.marker AS SELECT 'schema a'::text AS v; "
            "GRANT USAGE ON SCHEMA sp_a TO PUBLIC; GRANT SELECT ON sp_a.marker TO PUBLIC",
            db="db1")
    a = via(d, {"search_path": "sp_a"})
    b = via(d, {})
    try:
        assert a.query("SELECT v FROM marker") == [("schema a",)]
        with pytest.raises(Exception) as e:
            b.query("SELECT v FROM marker")
        assert getattr(e.value, "sqlstate", None) == "42P01"
        assert a.query("SELECT v FROM marker") == [("schema a",)]
    finally:
        a.terminate()
        b.terminate()


def test_pool_application_name(pg, pgdoorman):
    d = pgdoorman(simple_config(pg, USER, PW, pool_size=1,
                                pool={"application_name": "from_config"}))
    c = via(d, {})
    try:
        assert c.query("SELECT current_setting('application_name')") == [("from_config",)]
    finally:
        c.terminate()
