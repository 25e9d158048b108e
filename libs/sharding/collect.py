"""Pass 1: read every source of a layer, validate it, and keep its rows for the sort.

Each batch gets its bounds and geometry type code as columns; the layer's extent of bbox
centres and a fixed-size random sample of them are tracked for the sort. A layer that fits
in half of ``sort_memory_bytes`` stays in memory; a larger one goes to Arrow IPC
files in the scratch directory (64 MiB each, per source). GDAL decodes the next batch on a
helper thread meanwhile.
"""

from __future__ import annotations

import json
import threading
import zipfile
from collections.abc import Callable, Iterator
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from queue import Full, Queue

import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc
from pyproj import CRS

from libs.errors import InputDataError
from libs.geoparquet import GEOMETRY
from libs.manifest import InputFormat
from libs.manifest.rejects import grouped_problems
from libs.sharding.columns import BOUNDS_COLUMNS, TYPE_CODE_COLUMN
from libs.sharding.crs import layer_crs
from libs.sharding.inputs import probe_source
from libs.sharding.limits import ShardLimits
from libs.sharding.readers import RowProblems, open_source_stream
from libs.sharding.schema import unify_schemas
from libs.sharding.sources import LayerSource, describe_source, row_label
from libs.sharding.wkb import (
    WkbHeaders,
    check_one_family,
    family_rows,
    geometry_bounds,
    geometry_problems,
    over_vertex_limit,
)

#: Bbox centres sampled per layer; the external sort takes its bucket boundaries from them.
SAMPLE_SIZE = 65_536
#: Size of one spill file of a source.
SEGMENT_BYTES = 64 * 2**20


class _Sample:
    """A fixed-size uniform random sample of bbox centres (bottom-k random priorities)."""

    def __init__(self, size: int):
        self.size = size
        self.rng = np.random.default_rng(20_240_601)
        self.priority = np.zeros(0)
        self.centres = np.zeros((0, 2))

    def add(self, cx: np.ndarray, cy: np.ndarray) -> None:
        priority = self.rng.random(len(cx))
        keep = ~np.isnan(cx)
        if len(self.priority) >= self.size:
            keep &= priority < self.priority.max()  # cannot enter the bottom-k otherwise
        if not keep.any():
            return
        priority = np.concatenate([self.priority, priority[keep]])
        centres = np.concatenate([self.centres, np.column_stack([cx[keep], cy[keep]])])
        if len(priority) > self.size:
            best = np.argpartition(priority, self.size)[: self.size]
            priority, centres = priority[best], centres[best]
        self.priority, self.centres = priority, centres


class SourceStore:
    """One source's validated batches: in memory until the layer outgrows the budget, then in
    spill files of about ``SEGMENT_BYTES`` each. :meth:`read` deletes each file as soon as it
    has read it, so the spill and the bucket files the partition pass writes from it are on
    disk (and in the page cache) about once, not twice (``docs/sharding.md``)."""

    def __init__(self, path: Path):
        self.path = path  # spill files are path.00000.arrows, path.00001.arrows, ...
        self.schema: pa.Schema | None = None
        self.batches: list[pa.RecordBatch] = []
        self.writer: ipc.RecordBatchStreamWriter | None = None
        self.sink: pa.OSFile | None = None
        self.segments: list[Path] = []
        self.segment_bytes = 0

    def add(self, batch: pa.RecordBatch) -> None:
        if self.schema is None:
            self.schema = batch.schema
        if self.writer is not None:
            self._write(batch)
        else:
            self.batches.append(batch)

    def spill(self) -> None:
        if self.writer is None and self.schema is not None and not self.segments:
            self._open_segment()
            for batch in self.batches:
                self._write(batch)
            self.batches = []

    def _open_segment(self) -> None:
        path = self.path.with_name(f"{self.path.stem}.{len(self.segments):05d}{self.path.suffix}")
        self.segments.append(path)
        self.sink = pa.OSFile(str(path), "wb")
        self.writer = ipc.new_stream(self.sink, self.schema)
        self.segment_bytes = 0

    def _write(self, batch: pa.RecordBatch) -> None:
        if self.segment_bytes >= SEGMENT_BYTES:
            self.close()
            self._open_segment()
        self.writer.write_batch(batch)
        self.segment_bytes += batch.nbytes

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.sink.close()
            self.writer = None

    def read(self) -> Iterator[pa.RecordBatch]:
        """The batches in the order added; each spill file is deleted once read."""
        if not self.segments:
            yield from self.batches
            return
        for path in self.segments:
            with pa.OSFile(str(path), "rb") as handle:
                yield from ipc.open_stream(handle)  # batches read into memory, not mapped
            path.unlink(missing_ok=True)


@dataclass
class CollectedLayer:
    """What reading a layer found, and where its validated rows are (pass 1's result).

    Each row carries its bounds and type code (``columns``); :meth:`read` streams them in
    source order, which is the order the sort keeps for equal keys.
    """

    stores: list[SourceStore]
    schema: pa.Schema  # attributes + geometry, unified over the sources
    crs: CRS
    rows: int
    nbytes: int
    in_memory: bool
    extent: np.ndarray  # of bbox centres: minx, miny, maxx, maxy (NaN when no geometry)
    sample_centres: np.ndarray  # (n, 2): a uniform random sample of the bbox centres
    geometry_types: list[str]
    rows_per_source: dict[str, int]
    #: rows refused while reading (step 'read') or for their vertex count ('vertex_limit'):
    rejected: list[tuple[str, str, str]]  # (step, reason, attributes as JSON)

    def read(self) -> Iterator[pa.RecordBatch]:
        """Every validated batch, source by source; spill files are deleted as they are read."""
        for store in self.stores:
            yield from store.read()

    def release(self) -> None:
        """Drop the batches held in memory (once the in-memory sort holds its own copy)."""
        for store in self.stores:
            store.batches = []


class _Collector:
    """Validates a layer's batches, adds bounds and type columns, and stores them."""

    def __init__(self, layer: str, budget: int, spill_now: bool, max_vertices: int,
                 vertex_policy: str):
        self.layer, self.budget, self.spilled = layer, budget, spill_now
        self.max_vertices, self.vertex_policy = max_vertices, vertex_policy
        self.rejected: list[tuple[str, str, str]] = []
        self.stores: list[SourceStore] = []
        self.sample = _Sample(SAMPLE_SIZE)
        self.extent = np.array([np.inf, np.inf, -np.inf, -np.inf])
        self.families: dict[str, tuple[str, str, int]] = {}  # family -> (file, type, row)
        self.one_family = False
        self.types: set[str] = set()
        self.rows = 0
        self.nbytes = 0

    def refuse_rows(self, batch: pa.RecordBatch, problems: RowProblems, label: str, where: str,
                    first_row: int) -> tuple[pa.RecordBatch, list, WkbHeaders, np.ndarray | None]:
        """``batch`` without its bad rows; the bounds and type headers of the rows kept; and
        where the kept rows were in ``batch`` (None when all were kept).

        Each bad row is recorded as rejected with its reason: the reader's ``problems`` and
        geometries PostGIS would refuse (step ``read``), geometries over the vertex limit
        (``vertex_limit``; recipe policy ``fail`` fails the run instead)."""
        refused = {row: ("read", reason) for row, reason in problems.items()}
        heavy, counts = over_vertex_limit(batch.column(GEOMETRY), self.max_vertices)
        for row, count in zip(heavy.tolist(), counts.tolist(), strict=True):
            reason = (f"{where}, {label} {first_row + row + 1}: the geometry has {count:,} "
                      f"vertices; the limit is {self.max_vertices:,}")
            if self.vertex_policy == "fail":
                raise InputDataError(
                    f"{reason} (recipe policy 'fail'); simplify or split the geometry, or set "
                    "make_valid's policy to 'reject' to keep the rest of the layer")
            refused.setdefault(row, ("vertex_limit", reason))
        kept, origin = self._kept(batch, refused)
        try:  # the common case: every geometry readable, only the (fast) bounds check runs
            bounds, headers = geometry_bounds(kept.column(GEOMETRY), where, first_row + 1)
        except InputDataError:
            found = geometry_problems(kept.column(GEOMETRY))
            if not found:
                raise  # not one row's fault (an unsupported geometry type): the file's
            at = np.arange(batch.num_rows) if origin is None else origin
            for index, reason in found.items():
                row = int(at[index])
                refused[row] = ("read", f"{where}, {label} {first_row + row + 1}: {reason}")
            kept, origin = self._kept(batch, refused)
            bounds, headers = geometry_bounds(kept.column(GEOMETRY), where, first_row + 1)
        if refused:
            rows = sorted(refused)
            self.rejected += [(*refused[row], values) for row, values in
                              zip(rows, attributes_json(batch.take(pa.array(rows))), strict=True)]
        return kept, bounds, headers, origin

    @staticmethod
    def _kept(batch: pa.RecordBatch, refused: dict) -> tuple[pa.RecordBatch, np.ndarray | None]:
        if not refused:
            return batch, None
        origin = np.setdiff1d(np.arange(batch.num_rows), list(refused))
        return batch.take(pa.array(origin)), origin

    def add(self, batch: pa.RecordBatch, problems: RowProblems, file: str, where: str,
            first_row: int, label: str) -> None:
        batch, bounds, headers, origin = self.refuse_rows(batch, problems, label, where,
                                                          first_row)
        if not batch.num_rows:
            return
        if self.one_family:  # geometry_families 'one'; 'mixed' keeps every family
            check_one_family(headers, self.families, file, where, first_row + 1, self.layer,
                             origin)
        self.types.update(headers.type_names())
        cx, cy = (bounds[0] + bounds[2]) * 0.5, (bounds[1] + bounds[3]) * 0.5
        if not np.isnan(cx).all():
            low = np.minimum(self.extent[:2], [np.nanmin(cx), np.nanmin(cy)])
            high = np.maximum(self.extent[2:], [np.nanmax(cx), np.nanmax(cy)])
            self.extent = np.concatenate([low, high])
        self.sample.add(cx, cy)
        full = pa.RecordBatch.from_arrays(
            [*batch.columns, *(pa.array(b) for b in bounds), pa.array(headers.type_codes())],
            names=[*batch.schema.names, *BOUNDS_COLUMNS, TYPE_CODE_COLUMN])
        store = self.stores[-1]
        store.add(full)
        self.nbytes += full.nbytes
        self.rows += full.num_rows
        if not self.spilled and self.nbytes > self.budget:
            self.spilled = True
            for each in self.stores:
                each.spill()
        elif self.spilled:
            store.spill()


def collect_layer(layer: str, sources: list[LayerSource], scratch_dir: Path,
                  limits: ShardLimits, vertex_policy: str = "reject",
                  on_schema: Callable[[pa.Schema], None] | None = None) -> CollectedLayer:
    """Pass 1: read, validate and keep (in memory or spilled to ``scratch_dir``) every row of
    ``layer``; raises :class:`~libs.errors.InputDataError` for anything wrong with the input.
    A geometry over ``limits.max_vertices`` is set apart (``vertex_policy`` 'reject') or
    fails the layer ('fail'). ``on_schema`` sees the first file's columns before any row
    is read (a check that can fail the layer early)."""
    probes = [s.probe or probe_source(s.path, s.data_file, s.source_layer, limits) for s in sources]
    crs = layer_crs(layer, sources, probes)
    budget = limits.in_memory_sort_bytes
    # A layer whose files are already larger than the in-memory budget goes to disk from
    # the first batch: holding the budget's worth first would only leave it in the allocator.
    collector = _Collector(layer, budget, sum(_stored_bytes(s) for s in sources) > budget,
                           limits.max_vertices, vertex_policy)
    collector.one_family = any(s.data_file.geometry_families == "one" for s in sources)
    schema: pa.Schema | None = None
    schema_owner = ""
    rows_per_source: dict[str, int] = {}
    for index, (source, probe) in enumerate(zip(sources, probes, strict=True)):
        where = describe_source(source.data_file, layer, source.source_layer)
        collector.stores.append(SourceStore(scratch_dir / f"source-{index:04d}.arrows"))
        rows = 0
        with open_source_stream(source, probe, where, scratch_dir, limits, index) as (
                source_schema, batches):
            if schema is None:
                schema, schema_owner = source_schema, source.data_file.path
                if on_schema is not None:
                    on_schema(schema)
            else:
                schema = unify_schemas(schema, schema_owner, source_schema,
                                       source.data_file.path, layer)
            # GDAL reports unreadable CSV numbers only as a warning, which reaches Python on
            # the reading thread alone: CSV is read on this one. ``closing`` stops the helper
            # thread (on errors too) before the reader's dataset closes.
            csv = source.data_file.format is InputFormat.CSV
            label = row_label(source.data_file, 1).rsplit(" ", 1)[0]  # "row" / "data line"
            with closing(batches if csv else _prefetched(batches)) as stream:
                read = 0
                for batch, problems in stream:
                    read += batch.num_rows
                    if source.family is not None:
                        batch, problems = _of_family(batch, problems, source.family, where,
                                                     read - batch.num_rows)
                    if batch.num_rows:
                        collector.add(batch, problems, source.data_file.path, where, rows, label)
                        rows += batch.num_rows
        collector.stores[-1].close()  # no rows is a valid delivery: an empty layer
        rows_per_source[str(source.path)] = rows
    assert schema is not None
    if collector.rows == 0 and collector.rejected:  # rows were read, and every one refused
        problems = [(step, reason) for step, reason, _ in collector.rejected]
        raise InputDataError(
            f"layer {layer!r}: all {len(problems):,} rows were rejected as bad data. The "
            f"first problems, by reason:\n{grouped_problems(problems)}")
    extent = collector.extent if np.isfinite(collector.extent).all() else np.full(4, np.nan)
    return CollectedLayer(collector.stores, schema, crs, collector.rows, collector.nbytes,
                          not collector.spilled, extent, collector.sample.centres,
                          sorted(collector.types), rows_per_source, collector.rejected)


def _of_family(batch: pa.RecordBatch, problems: RowProblems, family: str, where: str,
               first_row: int) -> tuple[pa.RecordBatch, RowProblems]:
    """The rows of ``batch`` a split layer of ``family`` takes, and their reader problems; a
    row of no family fails. A row the reader refused (its geometry unreadable) goes with the
    points, so that it is rejected once, not once per family."""
    mask, placeless = family_rows(batch.column(GEOMETRY), family)
    refused = np.zeros(batch.num_rows, bool)
    refused[list(problems)] = True
    placeless = placeless[~refused[placeless]]
    mask = (mask & ~refused) | (refused & (family == "point"))
    if len(placeless):
        raise InputDataError(
            f"{where}, feature {first_row + int(placeless[0]) + 1}: no geometry, or one that is "
            "neither points, lines nor polygons (a GeometryCollection or a curve), which "
            "geometry_families 'split' cannot place; give it a geometry, or land the file with "
            "geometry_families 'mixed'")
    if mask.all():
        return batch, problems
    kept = np.flatnonzero(mask)
    renumbered = {int(old): new for new, old in enumerate(kept)}
    return batch.take(pa.array(kept)), {renumbered[row]: reason for row, reason
                                        in problems.items() if row in renumbered}


def attributes_json(rows: pa.RecordBatch) -> list[str]:
    """Each row's attributes (no geometry) as JSON, text that is not valid UTF-8 shown with
    replacement characters (a reject keeps what could be read of its row)."""
    rows = rows.drop_columns([GEOMETRY])
    columns = {}
    for item, column in zip(rows.schema, rows.columns, strict=True):
        if pa.types.is_string(item.type):
            raw = column.cast(pa.binary()).to_pylist()
            columns[item.name] = [v if v is None else v.decode("utf-8", "replace") for v in raw]
        else:
            columns[item.name] = column.to_pylist()
    return [json.dumps(dict(zip(columns, values, strict=True)), ensure_ascii=False, default=str)
            for values in zip(*columns.values(), strict=True)] if columns else ["{}"] * rows.num_rows


def _prefetched(items: Iterator[pa.RecordBatch], depth: int = 2) -> Iterator[pa.RecordBatch]:
    """Iterate ``items`` on a helper thread, ``depth`` batches ahead.

    GDAL decoding (which releases the GIL) then overlaps with validating and spilling the
    previous batch. The helper is stopped and joined before this generator finishes, so the
    reader is never touched after its dataset closes.
    """
    queue: Queue = Queue(maxsize=depth)
    stop = threading.Event()
    finished = object()

    def offer(item: object) -> bool:
        while not stop.is_set():
            try:
                queue.put(item, timeout=0.05)
                return True
            except Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in items:
                if not offer(item):
                    return
            offer(finished)
        except BaseException as exc:  # handed to the consuming thread, which re-raises it
            offer(exc)

    helper = threading.Thread(target=produce, name="shard-read", daemon=True)
    helper.start()
    try:
        while True:
            item = queue.get()
            if item is finished:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        helper.join()


def _stored_bytes(source: LayerSource) -> int:
    if source.data_file.format is InputFormat.SHAPEFILE_ZIP:
        with zipfile.ZipFile(source.path) as archive:
            return sum(member.file_size for member in archive.infolist())
    return source.path.stat().st_size
