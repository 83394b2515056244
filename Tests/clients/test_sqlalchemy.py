"""sqlalchemy-rqlite with SQLAlchemy 2.0, connected as its README shows:
`create_engine("rqlite+pyrqlite://user:password@host:port/?scheme=https")` (the cluster CA
through SSL_CERT_FILE). It runs on pyrqlite, and SQLAlchemy's SQLite dialect reads pragmas
when it connects and reflects.
"""

import datetime
import decimal
import enum
import os
import unittest
import uuid

from sqlalchemy import (JSON, BigInteger, Boolean, Date, DateTime, Enum, Float, ForeignKey, Integer, Interval, LargeBinary,
                        Numeric, PickleType, SmallInteger, String, Text, Time, Unicode, UnicodeText, Uuid, create_engine, func,
                        insert, inspect, select, text)
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, relationship

SUFFIX = uuid.uuid4().hex[:8]


def engine_for(user_variable="APIARY_WRITER", **options):
    user, password = os.environ[user_variable], os.environ[user_variable + "_PASSWORD"]
    return create_engine(f"rqlite+pyrqlite://{user}:{password}@{os.environ['APIARY_HOST']}:{os.environ['APIARY_PORT']}/?scheme=https",
                         **options)


class Base(DeclarativeBase):
    pass


class Color(enum.Enum):
    red = "red"
    green = "green"


class Thing(Base):
    __tablename__ = f"things_{SUFFIX}"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    small: Mapped[int | None] = mapped_column(SmallInteger)
    big: Mapped[int | None] = mapped_column(BigInteger)
    ratio: Mapped[float | None] = mapped_column(Float)
    price: Mapped[decimal.Decimal | None] = mapped_column(Numeric(10, 2))
    name: Mapped[str | None] = mapped_column(String(50))
    notes: Mapped[str | None] = mapped_column(Text)
    label: Mapped[str | None] = mapped_column(Unicode(20))
    story: Mapped[str | None] = mapped_column(UnicodeText)
    data: Mapped[bytes | None] = mapped_column(LargeBinary)
    active: Mapped[bool | None] = mapped_column(Boolean)
    born: Mapped[datetime.date | None] = mapped_column(Date)
    seen: Mapped[datetime.datetime | None] = mapped_column(DateTime)
    alarm: Mapped[datetime.time | None] = mapped_column(Time)
    color: Mapped[Color | None] = mapped_column(Enum(Color))
    doc: Mapped[dict | None] = mapped_column(JSON)
    token: Mapped[uuid.UUID | None] = mapped_column(Uuid)
    pickled: Mapped[dict | None] = mapped_column(PickleType)
    span: Mapped[datetime.timedelta | None] = mapped_column(Interval)
    parts: Mapped[list["Part"]] = relationship(back_populates="thing", cascade="all, delete-orphan")


class Part(Base):
    __tablename__ = f"parts_{SUFFIX}"
    id: Mapped[int] = mapped_column(primary_key=True)
    thing_id: Mapped[int] = mapped_column(ForeignKey(Thing.id))
    name: Mapped[str] = mapped_column(String(20))
    thing: Mapped[Thing] = relationship(back_populates="parts")


# Every column type whose values come back through pyrqlite (Date, Time and JSON do not:
# see the known failures below).
FULL = dict(small=-32768, big=2**63 - 1, ratio=0.1, price=decimal.Decimal("12.34"), name="fiona", notes="line\nbreak",
            label="Ö", story="😀 unicode", data=b"\x00\x01\xffbytes", active=True,
            seen=datetime.datetime(2024, 1, 2, 3, 4, 5, 678901), color=Color.green,
            token=uuid.UUID("12345678-1234-5678-1234-567812345678"), pickled={"x": [1, 2, (3, 4)]},
            span=datetime.timedelta(days=1, seconds=5, microseconds=7))


class SQLAlchemyTests(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.engine = engine_for()
        Base.metadata.create_all(cls.engine)  # checks first, through the temp schema too

    @classmethod
    def tearDownClass(cls):
        Base.metadata.drop_all(cls.engine)
        cls.engine.dispose()

    def setUp(self):
        with Session(self.engine) as session:
            session.query(Part).delete()
            session.query(Thing).delete()
            session.commit()

    def read_back(self, **values):
        with Session(self.engine) as session:
            thing = Thing(**values)
            session.add(thing)
            session.commit()
            thing_id = thing.id
        with Session(self.engine) as session:
            return session.get(Thing, thing_id)

    def test_connect_reads_what_the_dialect_asks(self):
        with self.engine.connect() as connection:
            self.assertEqual(connection.execute(text("SELECT 1")).scalar(), 1)
            self.assertEqual(connection.exec_driver_sql("PRAGMA read_uncommitted").scalar(), 0)

    def test_reflection(self):
        inspector = inspect(self.engine)
        self.assertIn(Thing.__tablename__, inspector.get_table_names())
        self.assertTrue(inspector.has_table(Thing.__tablename__))
        self.assertEqual(inspector.get_foreign_keys(Part.__tablename__)[0]["referred_table"], Thing.__tablename__)

    def test_every_column_type_round_trips(self):
        got = self.read_back(**FULL)
        for column, expected in FULL.items():
            with self.subTest(column=column):
                self.assertEqual(getattr(got, column), expected)

    # Known failures (docs/rqlite-compatibility.md). They fail against rqlite itself: they are
    # the clients'. `expectedFailure` turns a fix into an "unexpected
    # success", which fails the run, so that the marker goes.

    # SQLAlchemy asks `PRAGMA main.table_info(t)` (index_list, foreign_key_list, ...), then,
    # when main has nothing, the same of `temp.`: the sandbox lets introspection pragmas read
    # the temp schema, which is always empty (no TEMP objects can be made).
    def test_introspecting_what_main_lacks(self):
        inspector = inspect(self.engine)
        self.assertFalse(inspector.has_table("no_such_table_" + SUFFIX))
        self.assertEqual(inspector.get_indexes(Thing.__tablename__), [])

    # sqlalchemy-rqlite's dialect never sets server_version_info (the pysqlite dialect it
    # copies reads it from the driver), and SQLAlchemy 2.0's SQLite get_columns compares it.
    @unittest.expectedFailure
    def test_column_reflection(self):
        columns = {c["name"] for c in inspect(self.engine).get_columns(Thing.__tablename__)}
        self.assertEqual(columns, set(Thing.__table__.columns.keys()))

    # pyrqlite turns a DATE column's value into a datetime.date (rqlite sends
    # 2004-02-14T00:00:00Z); SQLAlchemy's Date then calls date.fromisoformat on it: TypeError.
    @unittest.expectedFailure
    def test_date_column(self):
        self.assertEqual(self.read_back(born=datetime.date(2004, 2, 14)).born, datetime.date(2004, 2, 14))

    # pyrqlite base64-decodes text in any column whose declared type is neither one of its
    # converters nor text by its own rule (CHAR, CLOB, TEXT): TIME and JSON values come back
    # as bytes, or fail to decode.
    @unittest.expectedFailure
    def test_time_column(self):
        self.assertEqual(self.read_back(alarm=datetime.time(7, 15, 30, 250000)).alarm, datetime.time(7, 15, 30, 250000))

    @unittest.expectedFailure
    def test_json_column(self):
        self.assertEqual(self.read_back(doc={"a": [1, 2, {"b": None}]}).doc, {"a": [1, 2, {"b": None}]})

    def test_nulls_round_trip(self):
        with Session(self.engine) as session:
            thing = Thing()
            session.add(thing)
            session.commit()
            thing_id = thing.id
        with Session(self.engine) as session:
            got = session.get(Thing, thing_id)
            for column in list(FULL) + ["born", "alarm", "doc"]:
                with self.subTest(column=column):
                    self.assertIsNone(getattr(got, column))

    def test_filters_order_and_aggregates(self):
        with Session(self.engine) as session:
            session.add_all([Thing(name=f"n{i}", big=i, ratio=i / 2, active=i % 2 == 0, born=datetime.date(2020, 1, 1 + i))
                             for i in range(10)])
            session.commit()
            self.assertEqual(session.scalars(select(Thing.name).where(Thing.big >= 7).order_by(Thing.big.desc())).all(),
                             ["n9", "n8", "n7"])
            self.assertEqual(session.scalar(select(func.count()).select_from(Thing).where(Thing.active.is_(True))), 5)
            self.assertEqual(session.scalars(select(Thing.big).where(Thing.name.in_(["n1", "n3"])).order_by(Thing.big)).all(), [1, 3])
            self.assertEqual(session.scalars(select(Thing.big).where(Thing.name.like("n_")).limit(2).offset(1).order_by(Thing.big)).all(),
                             [1, 2])
            self.assertEqual(session.scalar(select(func.sum(Thing.ratio))), 22.5)
            self.assertEqual(session.scalars(select(Thing.big).where(Thing.born > datetime.date(2020, 1, 8))).all(), [8, 9])
            self.assertEqual(session.scalars(select(Thing.big).where(Thing.name == "nobody")).all(), [])

    def test_updates_deletes_and_relationships(self):
        with Session(self.engine) as session:
            thing = Thing(name="parent", parts=[Part(name="a"), Part(name="b")])
            session.add(thing)
            session.commit()
            thing.name = "renamed"
            thing.parts.pop(0)
            session.commit()
            thing_id = thing.id
        with Session(self.engine) as session:
            got = session.get(Thing, thing_id)
            self.assertEqual(got.name, "renamed")
            self.assertEqual([p.name for p in got.parts], ["b"])
            session.delete(got)
            session.commit()
            self.assertEqual(session.scalar(select(func.count()).select_from(Part)), 0)

    def test_transactions(self):
        # Committed work is there; work rolled back before it was flushed never left the client.
        with Session(self.engine) as session:
            session.add(Thing(name="kept"))
            session.commit()
            session.add(Thing(name="dropped"))
            session.rollback()
        with self.engine.begin() as connection:
            connection.execute(insert(Thing), [{"name": "core-1"}, {"name": "core-2"}])
        with Session(self.engine) as session:
            self.assertEqual(sorted(session.scalars(select(Thing.name))), ["core-1", "core-2", "kept"])

    def test_a_many_row_insert_is_all_or_nothing(self):
        # pyrqlite sends executemany as one request with ?transaction: one bad row undoes all.
        with self.engine.begin() as connection:
            connection.execute(insert(Thing), [{"id": 1000, "name": "x"}])
        with self.engine.begin() as connection:
            connection.execute(insert(Thing), [{"id": 1001, "name": "y"}, {"id": 1000, "name": "duplicate"}])
        with Session(self.engine) as session:
            self.assertEqual(session.scalars(select(Thing.id).order_by(Thing.id)).all(), [1000])

    def test_errors_raise(self):
        from sqlalchemy.exc import DBAPIError
        with self.engine.connect() as connection:
            with self.assertRaises(DBAPIError):
                connection.execute(text("SELECT * FROM no_such_table"))
            with self.assertRaises(DBAPIError):
                connection.execute(text(f"INSERT INTO {Thing.__tablename__}(nope) VALUES (1)"))

    def test_a_reader_can_read_but_not_write(self):
        reader = engine_for("APIARY_READER")
        try:
            with Session(reader) as session:
                self.assertEqual(session.scalar(select(func.count()).select_from(Thing)), 0)
                session.add(Thing(name="refused"))
                from sqlalchemy.exc import DBAPIError
                with self.assertRaises(DBAPIError):
                    session.commit()
        finally:
            reader.dispose()


if __name__ == "__main__":
    unittest.main()
