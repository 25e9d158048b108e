"""Loading chunks into a layer table (``libs.postgis.tables``): parallel COPY (FORMAT BINARY) of EWKB.

Each chunk is one transaction: DELETE the chunk's ``_row_id`` span, then COPY its rows, then
COMMIT. A retried chunk therefore replaces its rows and never duplicates them, whichever
attempt failed and at which point (even after a COMMIT whose acknowledgement was lost).

``load_layer_chunks`` runs the chunks of a layer on a few threads, each with its own
connection, while one more thread fetches (reads and decodes) the next chunks, so that a
backend never waits for its next chunk: reading a GeoParquet chunk, encoding it
(``libs.postgis.copy_binary``, numpy/Arrow) and waiting on the socket all release the GIL, and the
server parses each COPY stream on its own backend. A chunk whose connection breaks
(``psycopg.OperationalError``: a terminated backend, a restart, a statement timeout) is
retried on a fresh connection; any other database error is about the data and fails the
load at once with a ``LoadError`` naming the layer, the chunk's ``_row_id`` span and
PostgreSQL's message.

Layer tables are UNLOGGED and loader sessions run with ``synchronous_commit = off``: the
tables live in a transient run schema that is dropped when the op ends and can be reloaded
from the staged chunks, so neither the WAL nor a commit's flush protects anything (a server
crash fails the run anyway).
"""

from __future__ import annotations

import itertools
import logging
import queue
import re
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass

import numpy as np
import psycopg
import pyarrow as pa
import pyarrow.compute as pc
from psycopg import sql

from libs.errors import LoadError
from libs.geoparquet import GEOMETRY
from libs.postgis import copy_binary
from libs.postgis.connection import GEOM, ROW_ID, PostGISSettings, connect
from libs.postgis.tables import (
    ANY_DIMENSION,
    LayerTable,
    attribute_schema,
    geometry_column_sql,
    pg_type,
)

log = logging.getLogger(__name__)

#: A chunk to load: its ``_row_id`` span [start, end) and how to fetch its Arrow table.
ChunkSource = tuple[tuple[int, int], Callable[[], pa.Table]]


def copy_chunk_into_table(
    conn: psycopg.Connection, layer: LayerTable, chunk: pa.Table, id_span: tuple[int, int],
    *, replace: bool = True,
) -> int:
    """COPY one chunk in its own transaction; a retried chunk replaces its rows, never duplicates.

    Row ids come from the chunk's ``_row_id`` column (else ``id_span`` start + position); the
    chunk owns every id in ``id_span`` = [start, end), which is what a retry deletes first.
    ``replace=False`` skips that DELETE: only for a caller that knows the span holds no row
    (it scans the whole table, which has no index while loading). Returns the number of rows
    copied. Data errors raise ``LoadError``; a broken connection raises
    ``psycopg.OperationalError`` (the caller decides whether to retry).
    """
    start, end = id_span
    if attribute_schema(chunk) != layer.attributes:
        raise LoadError(
            f"layer {layer.table!r}: chunk columns {attribute_schema(chunk)} differ from the "
            f"layer's {layer.attributes}; every file of a layer must have the same columns"
        )
    if GEOMETRY not in chunk.column_names:
        raise LoadError(f"layer {layer.table!r}: the chunk for _row_id {start}-{end - 1} has no "
                        f"{GEOMETRY!r} column; expected GeoParquet with WKB geometries")
    row_ids = _row_ids(layer, chunk, id_span)
    names = [f.name for f in layer.attributes]
    columns = [row_ids, *(chunk.column(n) for n in names), chunk.column(GEOMETRY)]
    types = ["int8", *(pg_type(f)[1] for f in layer.attributes), copy_binary.Ewkb(layer.srid)]
    table = layer.qualified
    target = sql.SQL("{} ({})").format(
        table, sql.SQL(", ").join(sql.Identifier(n) for n in [ROW_ID, *names, GEOM]))
    where = f"layer {layer.table!r}, rows with _row_id {start}-{end - 1}"
    try:
        stream = copy_binary.copy_stream(columns, types, names=[ROW_ID, *names, GEOMETRY])
        with conn.transaction():
            if replace:
                conn.execute(sql.SQL("DELETE FROM {} WHERE {} >= %s AND {} < %s").format(
                    table, sql.Identifier(ROW_ID), sql.Identifier(ROW_ID)), (start, end))
            with conn.cursor().copy(
                    sql.SQL("COPY {} FROM STDIN (FORMAT BINARY)").format(target)) as copy:
                for block in stream:
                    copy.write(block)
    except psycopg.OperationalError:
        raise
    except psycopg.Error as exc:
        raise LoadError(f"{where}: PostgreSQL rejected the data{_failed_row(exc, row_ids)}: "
                        f"{exc.diag.message_primary or exc}{_column_hint(layer, exc)}") from None
    except LoadError as exc:
        raise LoadError(f"{where}: {exc}") from None
    return chunk.num_rows


def _row_ids(layer: LayerTable, chunk: pa.Table, id_span: tuple[int, int]) -> pa.Array:
    """The chunk's row ids, checked to lie in its span (else a retry could not replace them)
    and to be distinct. With disjoint spans (``load_layer_chunks`` checks them) that makes
    every id in the table distinct, which the primary key would otherwise have to prove."""
    start, end = id_span
    if ROW_ID not in chunk.column_names:
        if chunk.num_rows > end - start:
            raise LoadError(f"layer {layer.table!r}: a chunk of {chunk.num_rows} rows does not "
                            f"fit its _row_id span {start}-{end - 1}")
        return pa.array(np.arange(start, start + chunk.num_rows, dtype=np.int64))
    ids = chunk.column(ROW_ID).combine_chunks().cast(pa.int64())
    if ids.null_count:
        raise LoadError(f"layer {layer.table!r}, span {start}-{end - 1}: {ids.null_count} rows "
                        "have no _row_id")
    if len(ids):
        bounds = pc.min_max(ids)
        low, high = bounds["min"].as_py(), bounds["max"].as_py()
        if low < start or high >= end:
            raise LoadError(
                f"layer {layer.table!r}: the chunk owning _row_id {start}-{end - 1} holds rows "
                f"with _row_id {low}-{high}; a chunk's rows must stay inside its span so that a "
                "retry replaces them")
        values = ids.to_numpy()
        if not (values[1:] > values[:-1]).all():  # the transform keeps them ascending
            ordered = np.sort(values)
            repeated = ordered[1:][ordered[1:] == ordered[:-1]]
            if len(repeated):
                raise LoadError(
                    f"layer {layer.table!r}: the chunk owning _row_id {start}-{end - 1} holds "
                    f"_row_id {repeated[0]} more than once ({len(np.unique(repeated))} id(s) "
                    "repeated); every row needs an id of its own")
    return ids


def _failed_row(exc: psycopg.Error, row_ids: pa.Array) -> str:
    """", at _row_id N" from COPY's error context ("COPY t, line 5, column geom"), if any."""
    match = re.search(r"\bline (\d+)", exc.diag.context or "")
    if not match or not 1 <= int(match.group(1)) <= len(row_ids):
        return ""
    return f" at _row_id {row_ids[int(match.group(1)) - 1].as_py()}"


def _column_hint(layer: LayerTable, exc: psycopg.Error) -> str:
    if "geometry" not in str(exc.diag.message_primary or "").lower() and \
            f"column {GEOM}" not in (exc.diag.context or ""):
        return ""
    column = geometry_column_sql(layer.geometry_type, layer.srid).as_string()
    kind = layer.geometry_type.rstrip("ZM")
    dims = {"": "2D", "Z": "3D (Z)", "M": "M", "ZM": "ZM"}.get(layer.geometry_type[len(kind):], "")
    takes = ("geometries of any type and dimension" if layer.geometry_type == ANY_DIMENSION
             else f"{dims} {'' if kind == 'Geometry' else kind + ' '}geometries only")
    return (f" (column {GEOM} is {column}, which takes {takes}; make the layer's geometries "
            "fit in the recipe, e.g. promote_to_multi or force_2d, or check the geometry types "
            "the transform reported)")


@dataclass(frozen=True)
class ChunkLoaded:
    """What loading one chunk took: rows, wall time, attempts and why earlier ones failed."""

    id_span: tuple[int, int]
    rows: int
    seconds: float
    attempts: int
    retried_errors: tuple[str, ...] = ()

    def describe(self) -> str:
        """``_row_id <span>, <rows> rows in <s>s`` and, after retries, what failed."""
        start, end = self.id_span
        retried = (f", after {self.attempts} attempts ({'; '.join(self.retried_errors)})"
                   if self.attempts > 1 else "")
        return f"_row_id {start}-{end - 1}, {self.rows} rows in {self.seconds:.2f}s{retried}"


def load_layer_chunks(
    settings: PostGISSettings,
    layer: LayerTable,
    chunks: Sequence[ChunkSource],
    *,
    parallelism: int = 2,
    prefetch: int | None = None,
    retries: int = 2,
    retry_backoff_seconds: float = 0.5,
    on_chunk: Callable[[ChunkLoaded], None] | None = None,
    connection_factory: Callable[[PostGISSettings], psycopg.Connection] | None = None,
) -> int:
    """COPY ``chunks`` into ``layer``'s (existing) table, ``parallelism`` at a time.

    ``connection_factory`` makes the workers' connections (default: ``postgis.connect`` with
    ``synchronous_commit = off``).

    Each chunk is fetched (its callable, e.g. a read from object storage) on a thread of its
    own, in order, up to ``prefetch`` chunks ahead of the workers (default: one per
    connection; 0 fetches inside the worker, holding fewer tables), and copied in its own
    transaction on a worker's connection. A chunk that fails with
    ``psycopg.OperationalError`` is retried up to ``retries`` times on a fresh connection,
    after ``retry_backoff_seconds`` × attempt; the fetched table is reused. The first data
    error (or exhausted retries) cancels the chunks not yet started and raises ``LoadError``.
    ``on_chunk`` is called in the caller's thread as chunks finish. Returns the rows copied.

    With ``parallelism=1`` the chunks are COPYed one after another in the order given, so the
    table's pages hold the rows in chunk order (what a BRIN index needs; a retried chunk's
    rows go to the end). The spans must not overlap. When the table is empty as the load
    starts, a chunk's first attempt skips the DELETE of its span: no other chunk can have
    written there, and the DELETE would scan the whole (unindexed) table once per chunk,
    quadratic in the layer's size. Every retry, and every chunk of a load into a non-empty
    table, deletes first.
    """
    if parallelism < 1:
        raise ValueError(f"parallelism must be >= 1, got {parallelism}")
    _check_disjoint(layer, [span for span, _ in chunks])
    factory = connection_factory or _loader_connection
    idle: queue.SimpleQueue[psycopg.Connection] = queue.SimpleQueue()
    opened: list[psycopg.Connection] = []
    lock = threading.Lock()

    def take() -> psycopg.Connection:
        try:
            return idle.get_nowait()
        except queue.Empty:
            conn = factory(settings)
            with lock:
                opened.append(conn)
            return conn

    def load(index: int, span: tuple[int, int], started_empty: bool) -> ChunkLoaded:
        started = time.monotonic()
        table = ahead.take(index)
        errors: list[str] = []
        for attempt in range(1, retries + 2):
            conn = None
            try:
                conn = take()  # inside: a server that refuses connections is retried too
                rows = copy_chunk_into_table(conn, layer, table, span,
                                             replace=attempt > 1 or not started_empty)
            except psycopg.OperationalError as exc:
                if conn is not None:
                    conn.close()
                errors.append(f"{type(exc).__name__}: {str(exc).strip()}")
                if attempt > retries:
                    raise LoadError(
                        f"layer {layer.table!r}, rows with _row_id {span[0]}-{span[1] - 1}: the "
                        f"connection failed on all {attempt} attempts; last error: {errors[-1]}"
                    ) from exc
                log.warning("layer %s, _row_id %s-%s: attempt %s failed (%s); retrying on a "
                            "fresh connection", layer.table, span[0], span[1] - 1, attempt,
                            errors[-1])
                time.sleep(retry_backoff_seconds * attempt)
                continue
            except BaseException:
                if conn is not None:
                    conn.close()  # its state is unknown: never hand it to another chunk
                raise
            idle.put(conn)
            return ChunkLoaded(span, rows, time.monotonic() - started, attempt, tuple(errors))
        raise AssertionError("unreachable")

    total = 0
    executor = ThreadPoolExecutor(max_workers=parallelism,
                                  thread_name_prefix=f"copy-{layer.table}")
    ahead = _FetchAhead([fetch for _, fetch in chunks],
                        limit=parallelism if prefetch is None else prefetch,
                        name=f"fetch-{layer.table}")
    try:
        empty = _table_is_empty(settings, layer)
        pending: set[Future[ChunkLoaded]] = {executor.submit(load, index, span, empty)
                                             for index, (span, _) in enumerate(chunks)}
        while pending:
            done, pending = wait(pending, return_when=FIRST_COMPLETED)
            for future in done:
                result = future.result()  # raises the first failure
                total += result.rows
                if on_chunk is not None:
                    on_chunk(result)
    finally:
        ahead.close()
        executor.shutdown(wait=True, cancel_futures=True)
        for conn in opened:
            conn.close()
    return total


class _FetchAhead:
    """Runs the chunks' fetches on one thread of its own, in order, while the COPY workers
    load earlier chunks, so that no backend waits for its next chunk to be read and decoded
    (a 125k-point GeoParquet chunk takes ~8 ms to decode, more with a GET in front of it).
    At most ``limit`` fetched tables wait to be taken; ``limit=0`` fetches in ``take``."""

    def __init__(self, fetches: list[Callable[[], pa.Table]], *, limit: int, name: str):
        self._fetches: list[Callable[[], pa.Table] | None] = list(fetches)
        self._futures: list[Future[pa.Table] | None] = [None] * len(fetches)
        self._stop = threading.Event()
        self._pool = None
        if limit > 0 and fetches:
            self._slots = threading.Semaphore(limit)
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)
            self._futures = [self._pool.submit(self._fetch, index)
                             for index in range(len(fetches))]

    def _fetch(self, index: int) -> pa.Table | None:
        while not self._slots.acquire(timeout=0.05):
            if self._stop.is_set():
                return None  # the load is over (failed): nobody will take it
        try:
            return self._fetches[index]()
        except BaseException:
            self._slots.release()
            raise
        finally:
            self._fetches[index] = None

    def take(self, index: int) -> pa.Table:
        """Chunk ``index``'s table (once), raising what its fetch raised."""
        future = self._futures[index]
        if future is None:
            fetch, self._fetches[index] = self._fetches[index], None
            return fetch()
        self._futures[index] = None  # the caller then holds the only reference
        try:
            return future.result()
        finally:
            if future.exception() is None:
                self._slots.release()

    def close(self) -> None:
        self._stop.set()
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)


def _table_is_empty(settings: PostGISSettings, layer: LayerTable) -> bool:
    try:
        with connect(settings, autocommit=True) as conn:
            return conn.execute(sql.SQL("SELECT NOT EXISTS (SELECT FROM {})").format(
                layer.qualified)).fetchone()[0]
    except psycopg.Error as exc:
        raise LoadError(f"layer {layer.table!r}: cannot start loading, PostGIS answered: "
                        f"{str(exc).strip()}") from exc


def _check_disjoint(layer: LayerTable, spans: list[tuple[int, int]]) -> None:
    for (a_start, a_end), (b_start, b_end) in itertools.pairwise(sorted(spans)):
        if b_start < a_end:
            raise LoadError(
                f"layer {layer.table!r}: chunks with _row_id spans {a_start}-{a_end - 1} and "
                f"{b_start}-{b_end - 1} overlap; each chunk must own its span alone, or a retry "
                "of one would delete the other's rows")


def _loader_connection(settings: PostGISSettings) -> psycopg.Connection:
    conn = connect(settings)
    conn.execute("SET synchronous_commit = off")
    conn.commit()
    return conn

