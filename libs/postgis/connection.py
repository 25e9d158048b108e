"""PostGIS connections and transient run schemas (tables: ``libs.postgis.tables``; loading:
``libs.postgis.load``; joins: ``libs.postgis.join``).

Every identifier is composed with ``psycopg.sql``; nothing user-supplied is pasted into SQL.
A run's schema is named from its run id (``etl_run_<uuid hex>``), so the janitor can map a
schema back to its run.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from dataclasses import dataclass

import psycopg
from psycopg import sql

SCHEMA_PREFIX = "etl_run_"
ROW_ID = "_row_id"
GEOM = "geom"
_SCHEMA_RE = re.compile(rf"^{SCHEMA_PREFIX}([0-9a-f]{{32}})$")


@dataclass(frozen=True)
class PostGISSettings:
    """Connection settings; every wait of a pipeline connection is bounded: connecting
    (``connect_timeout_s``), each statement and lock wait (server-side timeouts), and a
    server that vanished without closing the connection (TCP keepalives while waiting for an
    answer: ``keepalives_idle_s + keepalives_count * keepalives_interval_s``; unacknowledged
    data, e.g. mid-COPY: ``tcp_user_timeout_ms``). docs/limits.md has the table."""

    host: str
    port: int
    user: str
    password: str
    dbname: str = "spatial_compute"
    statement_timeout_ms: int = 600_000
    lock_timeout_ms: int = 30_000
    application_name: str = "spatial-etl"
    connect_timeout_s: int = 10
    keepalives_idle_s: int = 30
    keepalives_interval_s: int = 10
    keepalives_count: int = 3
    tcp_user_timeout_ms: int = 60_000

    def __repr__(self) -> str:  # never print the password
        return f"PostGISSettings(host={self.host!r}, port={self.port}, dbname={self.dbname!r})"


def connect(settings: PostGISSettings, *, autocommit: bool = False) -> psycopg.Connection:
    return psycopg.connect(autocommit=autocommit, **connection_parameters(settings))


def connection_parameters(settings: PostGISSettings) -> dict[str, object]:
    """The libpq parameters of a pipeline connection (password included: never log them)."""
    return dict(
        host=settings.host,
        port=settings.port,
        user=settings.user,
        password=settings.password,
        dbname=settings.dbname,
        application_name=settings.application_name,
        connect_timeout=settings.connect_timeout_s,
        keepalives=1,
        keepalives_idle=settings.keepalives_idle_s,
        keepalives_interval=settings.keepalives_interval_s,
        keepalives_count=settings.keepalives_count,
        tcp_user_timeout=settings.tcp_user_timeout_ms,
        options=f"-c statement_timeout={settings.statement_timeout_ms} "
        f"-c lock_timeout={settings.lock_timeout_ms}",
    )


def run_schema_name(run_id: str) -> str:
    """``etl_run_`` + the run id's 32 hex digits: 40 bytes, well under PostgreSQL's 63."""
    hex_id = run_id.replace("-", "").lower()
    if not re.fullmatch(r"[0-9a-f]{32}", hex_id):
        raise ValueError(f"run id {run_id!r} is not a UUID")
    return SCHEMA_PREFIX + hex_id


def run_id_of_schema(schema: str) -> str | None:
    """The Dagster run id a run schema belongs to, or None for any other schema."""
    match = _SCHEMA_RE.match(schema)
    if not match:
        return None
    h = match.group(1)
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def _lock_key(schema: str) -> int:
    """A stable signed 64-bit advisory-lock key for a schema name."""
    return int.from_bytes(hashlib.sha256(schema.encode()).digest()[:8], "big", signed=True)


def create_schema(conn: psycopg.Connection, schema: str) -> None:
    """Create a run schema, first taking a session advisory lock on its name.

    The lock lives as long as ``conn``: while the schema's creator is alive it is held, and
    when the creator dies (a killed run worker) PostgreSQL releases it with the session.
    That is how the janitor tells a schema in use from an orphan, whichever Dagster
    instance the run belonged to.
    """
    with conn.transaction():
        # session-level: the lock outlives this transaction, until the session ends
        conn.execute("SELECT pg_advisory_lock(%s)", (_lock_key(schema),))
        conn.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(schema)))
        conn.execute(sql.SQL("COMMENT ON SCHEMA {} IS {}").format(
            sql.Identifier(schema),
            sql.Literal(json.dumps({"created_at": time.time(), "by": "spatial-etl"}))))


def schema_in_use(conn: psycopg.Connection, schema: str) -> bool:
    """True while the session that created ``schema`` is alive (it holds the schema's lock)."""
    key = _lock_key(schema)
    acquired = conn.execute("SELECT pg_try_advisory_lock(%s)", (key,)).fetchone()[0]
    if acquired:
        conn.execute("SELECT pg_advisory_unlock(%s)", (key,))
    return not acquired


def drop_schema(conn: psycopg.Connection, schema: str) -> None:
    if not schema.startswith(SCHEMA_PREFIX):
        raise ValueError(f"refusing to drop {schema!r}: not a run schema")
    with conn.transaction():
        conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(schema)))


def list_run_schemas(conn: psycopg.Connection) -> list[str]:
    """Every run schema in the database."""
    rows = conn.execute(
        "SELECT nspname FROM pg_namespace WHERE nspname LIKE %s ORDER BY nspname",
        (SCHEMA_PREFIX.replace("_", r"\_") + "%",),
    ).fetchall()
    return [name for (name,) in rows if _SCHEMA_RE.match(name)]


def count_rows(conn: psycopg.Connection, schema: str, table: str) -> int:
    return conn.execute(sql.SQL("SELECT count(*) FROM {}.{}").format(
        sql.Identifier(schema), sql.Identifier(table))).fetchone()[0]
