"""pyrqlite, the DB-API 2.0 driver, connected as its README shows (host, port, credentials;
`scheme='https'`; the cluster CA through SSL_CERT_FILE, Python's default trust store).

pyrqlite puts parameters into the SQL text itself (`'text'`, `X'blob'`, numbers) and sends
SELECT and PRAGMA as `GET /db/query?q=`, everything else as `POST /db/execute?transaction`.
"""

import datetime
import os
import unittest
import uuid

import pyrqlite.dbapi2 as dbapi2


def connect(user_variable="APIARY_WRITER", **options):
    return dbapi2.connect(scheme="https", host=os.environ["APIARY_HOST"], port=int(os.environ["APIARY_PORT"]),
                          user=os.environ[user_variable], password=os.environ[user_variable + "_PASSWORD"], **options)


class PyrqliteTests(unittest.TestCase):
    def setUp(self):
        self.connection = connect()
        self.cursor = self.connection.cursor()
        self.table = "t_" + uuid.uuid4().hex[:8]
        self.cursor.execute(f"CREATE TABLE {self.table} (id INTEGER PRIMARY KEY, i INTEGER, f REAL, s TEXT, b BLOB, "
                            f"ts TIMESTAMP, dt DATETIME, d DATE, flag BOOLEAN, n NUMERIC)")

    def tearDown(self):
        self.cursor.execute(f"DROP TABLE {self.table}")
        self.connection.close()

    def one(self, column, value):
        """Inserts `value` into `column` with a parameter and reads it back."""
        self.cursor.execute(f"INSERT INTO {self.table}({column}) VALUES (?)", (value,))
        row_id = self.cursor.lastrowid
        self.cursor.execute(f"SELECT {column} FROM {self.table} WHERE id = ?", (row_id,))
        return self.cursor.fetchone()[0]

    # Parameters and values

    def test_null_integers_floats_text(self):
        for column, value in [("i", None), ("i", 0), ("i", 2**63 - 1), ("i", -2**63), ("i", 42),
                              ("f", 3.141592653589793), ("f", -1.5e-300), ("f", 1e300), ("f", 2.0),
                              ("s", "Österreich"), ("s", "emoji 😀, quote ' and \" and \\ and ?"), ("s", ""),
                              ("s", "line\nbreak\ttab"), ("s", None)]:
            with self.subTest(column=column, value=value):
                got = self.one(column, value)
                self.assertEqual(got, value)
                self.assertEqual(type(got), type(value))

    def test_blob_round_trip(self):
        for value in [b"\x99Guglhupf", b"\x00\x01hello\xff", bytes(range(256)) * 40, b"", b"'; DROP TABLE x; --"]:
            with self.subTest(size=len(value)):
                self.assertEqual(self.one("b", value), value)

    def test_blob_in_where_clause_and_expression(self):
        self.cursor.execute(f"INSERT INTO {self.table}(b) VALUES (?)", (b"\x00key",))
        self.cursor.execute(f"SELECT count(*) FROM {self.table} WHERE b = ?", (b"\x00key",))
        self.assertEqual(self.cursor.fetchone()[0], 1)
        self.cursor.execute(f"SELECT length(b) FROM {self.table}")
        self.assertEqual(self.cursor.fetchone()[0], 4)

    def test_timestamp_datetime_and_date_columns(self):
        when = datetime.datetime(2004, 2, 14, 7, 15, 0, 510241)
        self.assertEqual(self.one("ts", when), when)
        whole = datetime.datetime(2004, 2, 14, 7, 15, 0)
        self.assertEqual(self.one("ts", whole), whole)
        # pyrqlite reads DATETIME as text, with rqlite's RFC 3339 'T' and 'Z' taken off.
        self.assertEqual(self.one("dt", datetime.datetime(2024, 1, 2, 3, 4, 5, 120000)), "2024-01-02 03:04:05.12")
        self.assertEqual(self.one("dt", datetime.datetime(2024, 1, 2, 3, 4, 5)), "2024-01-02 03:04:05")
        self.assertEqual(self.one("d", datetime.date(2004, 2, 14)), datetime.date(2004, 2, 14))

    def test_current_timestamp_reads_as_a_datetime(self):
        self.cursor.execute(f"INSERT INTO {self.table}(ts) VALUES (current_timestamp)")
        self.cursor.execute(f"SELECT ts FROM {self.table}")
        value = self.cursor.fetchone()[0]
        self.assertIsInstance(value, datetime.datetime)
        self.assertEqual(value.year, datetime.datetime.now(datetime.timezone.utc).year)

    def test_boolean_and_numeric_columns(self):
        self.assertIs(self.one("flag", True), True)
        self.assertIs(self.one("flag", False), False)
        self.assertEqual(self.one("n", 12), 12)

    def test_named_parameters(self):
        self.cursor.execute(f"INSERT INTO {self.table}(s, i) VALUES (:name, :age)", {"name": "fiona", "age": 20})
        self.cursor.execute(f"SELECT s, i FROM {self.table} WHERE s = :name", {"name": "fiona"})
        self.assertEqual(tuple(self.cursor.fetchone()), ("fiona", 20))

    # Cursor attributes

    def test_lastrowid_rowcount_and_description(self):
        self.cursor.execute(f"INSERT INTO {self.table}(s) VALUES ('a')")
        first = self.cursor.lastrowid
        self.cursor.execute(f"INSERT INTO {self.table}(s) VALUES ('b')")
        self.assertEqual(self.cursor.lastrowid, first + 1)
        self.cursor.execute(f"UPDATE {self.table} SET i = 1")
        self.assertEqual(self.cursor.rowcount, 2)
        self.cursor.execute(f"DELETE FROM {self.table} WHERE s = 'a'")
        self.assertEqual(self.cursor.rowcount, 1)
        self.cursor.execute(f"UPDATE {self.table} SET i = 2 WHERE s = 'nobody'")
        self.assertEqual(self.cursor.rowcount, 0)
        self.cursor.execute(f"SELECT id, s AS name, i FROM {self.table}")
        self.assertEqual([d[0] for d in self.cursor.description], ["id", "name", "i"])
        self.assertEqual(self.cursor.rowcount, 1)
        row = self.cursor.fetchone()
        self.assertEqual(row["name"], "b")
        self.assertIsNone(self.cursor.fetchone())

    def test_executemany_and_fetching(self):
        self.cursor.executemany(f"INSERT INTO {self.table}(s, i) VALUES (?, ?)", [("a", 1), ("b", 2), ("c", 3)])
        self.assertEqual(self.cursor.rowcount, 3)
        self.cursor.execute(f"SELECT s FROM {self.table} ORDER BY i")
        self.assertEqual(self.cursor.fetchmany(2), [("a",), ("b",)])
        self.assertEqual(self.cursor.fetchall(), [("c",)])
        self.cursor.execute(f"SELECT s, i FROM {self.table} WHERE i > ? ORDER BY i", (1,))
        self.assertEqual([tuple(r) for r in self.cursor], [("b", 2), ("c", 3)])

    def test_executemany_is_all_or_nothing(self):
        # pyrqlite sends executemany as one request with ?transaction: a failing row undoes all.
        self.cursor.execute(f"CREATE UNIQUE INDEX {self.table}_s ON {self.table}(s)")
        self.cursor.executemany(f"INSERT INTO {self.table}(s) VALUES (?)", [("x",), ("y",), ("x",)])
        self.cursor.execute(f"SELECT count(*) FROM {self.table}")
        self.assertEqual(self.cursor.fetchone()[0], 0)

    def test_expressions_and_pragmas(self):
        self.cursor.execute("SELECT 1, 2.5, 'x', NULL, x'00ff'")
        self.assertEqual(tuple(self.cursor.fetchone()), (1, 2.5, "x", None, b"\x00\xff"))
        self.cursor.execute(f"PRAGMA table_info({self.table})")
        names = [row[1] for row in self.cursor.fetchall()]
        self.assertEqual(names, ["id", "i", "f", "s", "b", "ts", "dt", "d", "flag", "n"])

    def test_read_consistency_levels(self):
        self.cursor.execute(f"INSERT INTO {self.table}(i) VALUES (7)")
        for level in ("none", "weak", "strong", "linearizable"):
            with self.subTest(level=level):
                self.cursor.execute(f"SELECT i FROM {self.table}", consistency=level)
                self.assertEqual(self.cursor.fetchone()[0], 7)

    # Errors

    def test_sql_errors_raise(self):
        for sql in ["SELECT * FROM no_such_table", f"INSERT INTO {self.table}(nope) VALUES (1)", "SELEKT 1",
                    f"INSERT INTO {self.table}(id) VALUES (1), (1)"]:
            with self.subTest(sql=sql):
                with self.assertRaises(dbapi2.Error):
                    self.cursor.execute(sql)

    def test_sandbox_refusals_raise(self):
        for sql in ["ATTACH DATABASE 'other.db' AS other", "PRAGMA journal_mode=DELETE", "SELECT load_extension('x')"]:
            with self.subTest(sql=sql):
                with self.assertRaises(dbapi2.Error):
                    self.cursor.execute(sql)

    def test_a_reader_cannot_write(self):
        reader = connect("APIARY_READER")
        try:
            cursor = reader.cursor()
            cursor.execute(f"SELECT count(*) FROM {self.table}")
            self.assertEqual(cursor.fetchone()[0], 0)
            with self.assertRaises(dbapi2.Error):
                cursor.execute(f"INSERT INTO {self.table}(i) VALUES (1)")
        finally:
            reader.close()

    def test_another_tenant_sees_none_of_it(self):
        other = connect("APIARY_OTHER_TENANT_WRITER")
        try:
            with self.assertRaises(dbapi2.Error):
                other.cursor().execute(f"SELECT * FROM {self.table}")
        finally:
            other.close()

    def test_wrong_password_raises(self):
        connection = dbapi2.connect(scheme="https", host=os.environ["APIARY_HOST"], port=int(os.environ["APIARY_PORT"]),
                                    user=os.environ["APIARY_WRITER"], password="not-the-password")
        try:
            with self.assertRaises(dbapi2.Error):
                connection.cursor().execute("SELECT 1")
        finally:
            connection.close()


if __name__ == "__main__":
    unittest.main()
