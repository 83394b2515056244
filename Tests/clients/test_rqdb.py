"""rqdb, sync and async, connected as its README shows: `rqdb.connect(["host:port"])`.

rqdb sends real parameters (`[[sql, *params]]`), `?timings` and `?redirect` on every request,
`?level=...&freshness=...` on reads, `/db/execute?transaction` for executemany and
`/db/request` for its unified calls. It speaks only plain HTTP and sends no credentials, so
it reaches the node through the harness's sidecar (TLS and basic auth added; requests
forwarded in absolute form): host and port are the sidecar's.
"""

import asyncio
import os
import unittest
import uuid

import rqdb
from rqdb.errors import DBError

HOSTS = [os.environ["RQDB_HOST"]]
SKIP = os.environ.get("APIARY_RQDB_SKIP")


@unittest.skipIf(SKIP, SKIP)
class RqdbSyncTests(unittest.TestCase):
    def setUp(self):
        self.connection = rqdb.connect(HOSTS, log=False)
        self.cursor = self.connection.cursor()
        self.table = "r_" + uuid.uuid4().hex[:8]
        self.cursor.execute(f"CREATE TABLE {self.table} (id INTEGER PRIMARY KEY, uid TEXT UNIQUE NOT NULL, name TEXT, n INTEGER, f REAL, b BLOB)")

    def tearDown(self):
        self.cursor.execute(f"DROP TABLE {self.table}")

    def test_readme_flow(self):
        self.cursor.execute(f"INSERT INTO {self.table} (uid, name) VALUES (?, ?)", ("u1", "Jane Doe"))
        self.assertEqual(self.cursor.rows_affected, 1)
        self.assertIsNotNone(self.cursor.last_insert_id)
        result = self.cursor.executemany3((
            (f"INSERT INTO {self.table} (uid, name) VALUES (?, ?)", ("u2", "John Doe")),
            (f"UPDATE {self.table} SET n = ? WHERE uid = ?", (7, "u2")),
        )).raise_on_error()
        self.assertEqual(result[0].rows_affected, 1)
        self.assertEqual(result[1].rows_affected, 1)
        self.assertIsNotNone(result.time, "rqdb asks for ?timings")
        self.cursor.execute(f"SELECT uid, name, n FROM {self.table} ORDER BY id")
        self.assertEqual(self.cursor.fetchall(), [["u1", "Jane Doe", None], ["u2", "John Doe", 7]])
        self.assertIsNotNone(self.cursor.time)

    def test_values_and_nulls(self):
        self.cursor.execute(f"INSERT INTO {self.table} (uid, n, f, name) VALUES (?, ?, ?, ?)", ("v", -2**63, 2.5, None))
        self.cursor.execute(f"SELECT n, f, name FROM {self.table} WHERE uid = ?", ("v",))
        self.assertEqual(self.cursor.fetchone(), [-2**63, 2.5, None])

    def test_blobs_as_byte_arrays_and_literals(self):
        # rqlite's two forms of a BLOB parameter: an array of bytes, or a string x'..'.
        self.cursor.execute(f"INSERT INTO {self.table} (uid, b) VALUES (?, ?)", ("array", [0, 1, 255]))
        self.cursor.execute(f"INSERT INTO {self.table} (uid, b) VALUES (?, ?)", ("literal", "x'00ff'"))
        self.cursor.execute(f"SELECT hex(b), typeof(b) FROM {self.table} ORDER BY id")
        self.assertEqual(self.cursor.fetchall(), [["0001FF", "blob"], ["00FF", "blob"]])

    def test_read_consistency_levels(self):
        self.cursor.execute(f"INSERT INTO {self.table} (uid) VALUES (?)", ("c",))
        for level in ("none", "weak", "strong", "linearizable"):
            with self.subTest(level=level):
                cursor = self.connection.cursor(read_consistency=level)
                cursor.execute(f"SELECT uid FROM {self.table}")
                self.assertEqual(cursor.fetchone(), ["c"])

    def test_unified_endpoint(self):
        result = self.cursor.executeunified3((
            (f"INSERT INTO {self.table} (uid, name) VALUES (?, ?)", ("a", "first")),
            (f"SELECT uid, name FROM {self.table} WHERE uid = ?", ("a",)),
        ))
        self.assertEqual(result[0].rows_affected, 1)
        self.assertEqual(result[1].results, [["a", "first"]])
        reads = self.cursor.executeunified2([f"SELECT count(*) FROM {self.table}", "SELECT 1 + 1"], [(), ()])
        self.assertEqual([item.results for item in reads], [[[1]], [[2]]])

    def test_transactions_are_all_or_nothing(self):
        result = self.cursor.executemany3((
            (f"INSERT INTO {self.table} (uid) VALUES (?)", ("t",)),
            (f"INSERT INTO {self.table} (uid) VALUES (?)", ("t",)),
        ), raise_on_error=False)
        self.assertIsNone(result[0].error)
        self.assertIn("UNIQUE", result[1].error)
        self.cursor.execute(f"SELECT count(*) FROM {self.table}")
        self.assertEqual(self.cursor.fetchone(), [0])

    def test_errors_raise(self):
        with self.assertRaises(DBError):
            self.cursor.execute("SELECT * FROM no_such_table")
        with self.assertRaises(DBError):
            self.cursor.execute(f"INSERT INTO {self.table} (uid) VALUES (NULL)")

    def test_explain(self):
        plan = self.cursor.explain(f"SELECT * FROM {self.table} WHERE uid = ?", ("x",), out="str")
        self.assertIn("SEARCH", plan)


@unittest.skipIf(SKIP, SKIP)
class RqdbAsyncTests(unittest.IsolatedAsyncioTestCase):
    async def test_async_flow(self):
        table = "a_" + uuid.uuid4().hex[:8]
        async with rqdb.connect_async(HOSTS, log=False) as connection:
            cursor = connection.cursor()
            await cursor.execute(f"CREATE TABLE {table} (id INTEGER PRIMARY KEY, name TEXT NOT NULL)")
            try:
                result = await cursor.execute(f"INSERT INTO {table} (name) VALUES (?)", ("Jane Doe",))
                self.assertEqual(result.rows_affected, 1)
                bulk = await cursor.executemany3(((f"INSERT INTO {table} (name) VALUES (?)", ("a",)),
                                                  (f"INSERT INTO {table} (name) VALUES (?)", ("b",))))
                self.assertEqual([r.rows_affected for r in bulk], [1, 1])
                unified = await cursor.executeunified3(((f"UPDATE {table} SET name = ? WHERE name = ?", ("c", "b")),
                                                        (f"SELECT name FROM {table} ORDER BY id", ())))
                self.assertEqual(unified[1].results, [["Jane Doe"], ["a"], ["c"]])
                await asyncio.gather(*(cursor.execute(f"INSERT INTO {table} (name) VALUES (?)", (f"p{i}",)) for i in range(10)))
                strong = connection.cursor(read_consistency="strong")
                await strong.execute(f"SELECT count(*) FROM {table}")
                self.assertEqual(strong.fetchone(), [13])
                with self.assertRaises(DBError):
                    await cursor.execute(f"INSERT INTO {table} (name) VALUES (NULL)")
            finally:
                await cursor.execute(f"DROP TABLE {table}")


if __name__ == "__main__":
    unittest.main()
