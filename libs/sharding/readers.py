"""Reading one source as a stream of normalised Arrow batches: attributes plus WKB geometry.

GDAL formats go through pyogrio's Arrow reader, GeoParquet through
``pyarrow.parquet.ParquetFile.iter_batches``; no file is loaded whole. On the way, column
types are made plain, text is checked against the declared encoding (non-UTF-8 text
formats are transcoded to a scratch copy first), CSV rows whose WKT or x/y GDAL could
not read are reported instead of silently losing their geometry, and CSV text columns are
typed (``libs.sharding.csv_types``).

A problem confined to one row (unreadable WKT or x/y, text not valid in its encoding) does
not stop the read: each batch comes with the reasons of its bad rows (``RowProblems``),
which the collector sets apart as rejects; rows are named from 1 (``sources.row_label``).
"""

from __future__ import annotations

import codecs
import re
import warnings
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, ExitStack, contextmanager
from functools import partial
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pyogrio.raw import open_arrow

from libs.errors import InputDataError
from libs.geoparquet import GEOMETRY
from libs.manifest import DataFile, InputFormat
from libs.sharding.columns import is_reserved_column
from libs.sharding.csv_types import (
    CsvTypeInference,
    column_types_for,
    convert_batch,
    typed_schema,
)
from libs.sharding.gdal_guard import clean_gdal_message, lock_down_gdal
from libs.sharding.inputs import gdal_path_for, open_parquet, read_geo_metadata
from libs.sharding.limits import ShardLimits
from libs.sharding.sources import GDAL_ERRORS, TEXT_FORMATS, LayerSource, SourceProbe, row_label

#: Bad rows of a read batch: position in the batch -> the reason (naming file, row, column).
RowProblems = dict[int, str]
#: A source opened for reading: its normalised schema and an iterator of its batches, each
#: with the problems of its rows.
SourceStream = tuple[pa.Schema, Iterator[tuple[pa.RecordBatch, RowProblems]]]


def open_source_stream(source: LayerSource, probe: SourceProbe, where: str, scratch_dir: Path,
                       limits: ShardLimits, index: int) -> AbstractContextManager[SourceStream]:
    """Open ``source`` (the ``index``-th of its layer) as normalised batches of at most
    ``limits.read_batch_rows`` rows and about ``limits.read_batch_bytes`` (a larger batch is
    sliced): attributes with plain types, then WKB geometry.

    A context manager: the file is closed on leaving it. GeoParquet is read with pyarrow,
    everything else with GDAL; text in another encoding is first transcoded to UTF-8 in
    ``scratch_dir``. Problems are :class:`InputDataError` naming ``where``.
    """
    if probe.gdal_path is None:
        return _geoparquet_stream(source, where, limits)
    return _gdal_stream(source, probe, where, scratch_dir, limits, index)


def split_batch(batch: pa.RecordBatch, limits: ShardLimits) -> Iterator[pa.RecordBatch]:
    """``batch`` in zero-copy slices of about ``limits.read_batch_bytes`` each (one slice
    when it is within the bound): what comes after the reader holds bounded batches."""
    if batch.num_rows <= 1 or batch.nbytes <= limits.read_batch_bytes:
        yield batch
        return
    rows = limits.batch_rows_for(batch.nbytes / batch.num_rows)
    for start in range(0, batch.num_rows, rows):
        yield batch.slice(start, rows)


def _split_with_problems(batch: pa.RecordBatch, problems: RowProblems,
                         limits: ShardLimits) -> Iterator[tuple[pa.RecordBatch, RowProblems]]:
    """``split_batch`` with each slice's share of ``problems`` (positions made slice-relative)."""
    offset = 0
    for part in split_batch(batch, limits):
        end = offset + part.num_rows
        yield part, {row - offset: why for row, why in problems.items() if offset <= row < end}
        offset = end


def _plain_type(data_type: pa.DataType) -> pa.DataType:
    """The storage type we keep: no extension, dictionary or large variants."""
    if isinstance(data_type, pa.ExtensionType):
        data_type = data_type.storage_type
    if pa.types.is_dictionary(data_type):
        data_type = data_type.value_type
    if pa.types.is_large_string(data_type) or pa.types.is_string_view(data_type):
        return pa.string()
    if pa.types.is_large_binary(data_type) or pa.types.is_binary_view(data_type):
        return pa.binary()
    return data_type


class _Normaliser:
    """Turns a reader's batches into ``attributes + geometry`` with plain types."""

    def __init__(self, schema: pa.Schema, geometry_name: str, where: str,
                 drop: tuple[str, ...] = ()):
        fields, self.sources = [], []
        for index, item in enumerate(schema):
            if item.name == geometry_name:
                continue
            if item.name in drop:
                continue
            if is_reserved_column(item.name):
                raise InputDataError(
                    f"{where}: has an attribute column named {item.name!r}, which chunks use for "
                    "the geometry or its bbox; rename the column in the file"
                )
            fields.append(pa.field(item.name, _plain_type(item.type)))
            self.sources.append(index)
        if geometry_name not in schema.names:
            raise InputDataError(f"{where}: no geometry column {geometry_name!r} in the data")
        self.geometry_index = schema.get_field_index(geometry_name)
        self.schema = pa.schema([*fields, pa.field(GEOMETRY, pa.binary())])

    def __call__(self, batch: pa.RecordBatch) -> pa.RecordBatch:
        arrays = []
        for index, target in zip([*self.sources, self.geometry_index], self.schema.types,
                                 strict=True):
            array = batch.column(index)
            if isinstance(array, pa.ExtensionArray):
                array = array.storage
            if array.type != target:
                array = array.cast(target)
            arrays.append(array)
        return pa.RecordBatch.from_arrays(arrays, schema=self.schema)


def _gdal_encoding(name: str) -> str:
    """A Python codec name as the iconv name GDAL expects (it is picky about spelling)."""
    canonical = codecs.lookup(name).name
    return {"utf-8": "UTF-8", "iso8859-1": "ISO-8859-1", "ascii": "ASCII"}.get(
        canonical, canonical.upper())


#: Undecodable places a transcoding lists before it stops looking.
MAX_DECODE_PROBLEMS = 20


def _transcode_to_utf8(path: Path, encoding: str, out: Path, where: str) -> Path:
    """Copy a text file as UTF-8 (GDAL's Arrow reader only reads UTF-8 for text formats).

    Bytes the declared encoding cannot decode fail the file (its encoding is wrongly
    declared, not one row broken), listing the first ``MAX_DECODE_PROBLEMS`` of them."""
    decoder = codecs.getincrementaldecoder(encoding)(errors="strict")
    consumed, lines, problems = 0, 1, []  # (byte, line, reason)
    with path.open("rb") as source, out.open("w", encoding="utf-8", newline="") as target:
        while len(problems) < MAX_DECODE_PROBLEMS and (block := source.read(1 << 20)):
            start, text = 0, ""
            while len(problems) < MAX_DECODE_PROBLEMS:
                try:
                    text = decoder.decode(block[start:])
                    break
                except UnicodeDecodeError as exc:  # note it, go on after the bad bytes
                    at = start + max(exc.start, 0)
                    problems.append((consumed + at, lines + block[:at].count(b"\n"), exc.reason))
                    decoder.reset()
                    start = at + max(exc.end - exc.start, 1)
            consumed += len(block)
            lines += block.count(b"\n")
            if not problems:
                target.write(text)
        try:
            target.write(decoder.decode(b"", final=True))
        except UnicodeDecodeError as exc:
            problems.append((consumed, lines, exc.reason))
    if problems:
        (byte, line, reason), more = problems[0], problems[1:]
        capped = len(problems) >= MAX_DECODE_PROBLEMS
        also = (f"; also at line(s) {', '.join(str(p[1]) for p in more)}"
                + (f" (the first {MAX_DECODE_PROBLEMS} listed)" if capped else "")
                if more else "")
        raise InputDataError(
            f"{where}: byte {byte:,} (line {line}) cannot be decoded as the declared encoding "
            f"{encoding!r} ({reason}){also}; declare the file's real encoding in the manifest "
            "(e.g. 'cp1252', 'utf-8')")
    return out


def _utf8_problems(batch: pa.RecordBatch, first_row: int, where: str, encoding_note: str,
                   data_file: DataFile) -> RowProblems:
    """The rows whose text is not valid UTF-8 (after any transcoding), one reason per row."""
    problems: RowProblems = {}
    for item, column in zip(batch.schema, batch.columns, strict=True):
        if not pa.types.is_string(item.type):
            continue
        try:
            column.validate(full=True)
        except pa.ArrowInvalid:
            values = column.cast(pa.binary()).to_pylist()
            for row, value in enumerate(values):
                if value is not None and not _is_utf8(value) and row not in problems:
                    problems[row] = (
                        f"{where}, {row_label(data_file, first_row + row + 1)}, column "
                        f"{item.name!r}: text {value[:40]!r} is not valid in encoding "
                        f"{encoding_note}; set 'encoding' in the manifest to the file's real "
                        "encoding (e.g. 'cp1252' or 'latin-1')")
    return problems


def _is_utf8(value: bytes) -> bool:
    try:
        value.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


_CSV_BAD_VALUE = re.compile(r"Invalid value type found in record (\d+) for field (.+?)\.")


class _CsvGeometryCheck:
    """GDAL's CSV reader turns unreadable WKT or x/y into a NULL geometry: find those rows."""

    def __init__(self, data_file: DataFile, where: str):
        spec = data_file.csv
        assert spec is not None
        self.where, self.data_file = where, data_file
        self.wkt = spec.wkt_column
        self.xy = (spec.x_column, spec.y_column) if spec.x_column else None
        self.columns = (self.wkt,) if self.wkt else self.xy

    def line(self, row: int) -> str:
        """``where, data line N`` for the 0-based ``row`` of the file."""
        return f"{self.where}, {row_label(self.data_file, row + 1)}"

    def __call__(self, batch: pa.RecordBatch, geometry_name: str, first_row: int,
                 caught: list[warnings.WarningMessage]) -> RowProblems:
        problems: RowProblems = {}
        for message in caught:
            match = _CSV_BAD_VALUE.search(str(message.message))
            if match:  # GDAL numbers records from 1, over the whole file
                row = int(match.group(1)) - 1 - first_row
                if 0 <= row < batch.num_rows:
                    problems.setdefault(row, (
                        f"{self.line(first_row + row)}: column {match.group(2)!r} is not a "
                        "number; expected numeric x/y coordinates (or both empty for no "
                        "geometry)"))
        geometry_missing = batch.column(geometry_name).is_null()
        if self.wkt:
            text = batch.column(self.wkt)
            given = pc.greater(pc.utf8_length(pc.utf8_trim_whitespace(text)), 0)
            bad = pc.and_(geometry_missing, pc.fill_null(given, False))
            for row in np.flatnonzero(bad.to_numpy(zero_copy_only=False)).tolist():
                # the raw bytes: text not valid UTF-8 must not stop its own report
                shown = text.cast(pa.binary())[row].as_py()[:60].decode("utf-8", "replace")
                problems.setdefault(row, (
                    f"{self.line(first_row + row)}: column {self.wkt!r} holds "
                    f"{shown!r}, which is not valid WKT; expected e.g. "
                    "'POINT (1 2)' (or an empty value for no geometry)"))
            return problems
        x_column, y_column = batch.column(self.xy[0]), batch.column(self.xy[1])
        x = x_column.to_numpy(zero_copy_only=False).astype(float)
        y = y_column.to_numpy(zero_copy_only=False).astype(float)
        # Empty fields are NULL (no geometry, fine when both are); GDAL reads 'nan' or '1e999'
        # as non-finite numbers and silently drops the geometry, so those are errors here.
        x_given = x_column.is_valid().to_numpy(zero_copy_only=False)
        y_given = y_column.is_valid().to_numpy(zero_copy_only=False)
        bad = (x_given ^ y_given) | (x_given & ~np.isfinite(x)) | (y_given & ~np.isfinite(y))
        for row in np.flatnonzero(bad).tolist():
            shown = [v if given else "empty or not a number" for v, given in ((x[row], x_given[row]),
                                                              (y[row], y_given[row]))]
            problems.setdefault(row, (
                f"{self.line(first_row + row)}: x/y ({self.xy[0]!r}, {self.xy[1]!r}) are "
                f"({shown[0]}, {shown[1]}); expected two finite numbers (or both empty for no "
                "geometry)"))
        return problems


@contextmanager
def _gdal_stream(source: LayerSource, probe: SourceProbe, where: str, scratch_dir: Path,
                 limits: ShardLimits, index: int) -> Iterator[SourceStream]:
    data_file = source.data_file
    gdal_path, encoding = probe.gdal_path, None
    declared = data_file.encoding
    if data_file.format is InputFormat.SHAPEFILE_ZIP and declared:
        encoding = _gdal_encoding(declared)
    elif data_file.format in TEXT_FORMATS and declared and codecs.lookup(declared).name != "utf-8":
        suffix = source.path.suffix or ".txt"
        copy = _transcode_to_utf8(source.path, declared,
                                  scratch_dir / f"source-{index:04d}-utf8{suffix}", where)
        gdal_path = gdal_path_for(copy, data_file)
    csv_check = _CsvGeometryCheck(data_file, where) if data_file.format is InputFormat.CSV else None
    name = Path(data_file.path).name

    def gdal_says(exc: Exception) -> str:  # no scratch path, no path outside the batch
        return clean_gdal_message(exc, name, gdal_path, probe.gdal_path, source.path)

    lock_down_gdal()
    with ExitStack() as stack:
        caught: list[warnings.WarningMessage] = []
        if csv_check is not None:
            # GDAL reports unreadable CSV numbers only as a warning; catch it to fail loudly.
            caught = stack.enter_context(warnings.catch_warnings(record=True))
            warnings.simplefilter("always")
        try:
            meta, reader = stack.enter_context(open_arrow(
                gdal_path, layer=probe.gdal_layer, encoding=encoding,
                batch_size=limits.read_batch_rows, use_pyarrow=True, **dict(probe.open_options)))
        except UnicodeDecodeError as exc:
            raise InputDataError(
                f"{where}: column names are not valid in encoding {probe.encoding_note} "
                f"({exc.reason}); set 'encoding' in the manifest to the file's real encoding "
                "(e.g. 'cp1252')"
            ) from None
        except GDAL_ERRORS as exc:
            raise InputDataError(
                f"{where} cannot be read as {data_file.format.value}: {gdal_says(exc)}") from None
        geometry_name = meta.get("geometry_name") or "wkb_geometry"
        normalise = _Normaliser(reader.schema, geometry_name, where,
                                csv_check.columns if csv_check else ())
        types: dict[str, str] = {}
        if csv_check is not None:
            types = _csv_types(data_file, normalise.schema, where, partial(
                open_arrow, gdal_path, layer=probe.gdal_layer, encoding=encoding,
                batch_size=limits.read_batch_rows, use_pyarrow=True, read_geometry=False,
                **dict(probe.open_options)), gdal_says)
        schema = typed_schema(normalise.schema, types)

        def batches() -> Iterator[pa.RecordBatch]:
            row = 0
            while True:
                try:
                    batch = reader.read_next_batch()
                except StopIteration:
                    return
                except (pa.ArrowException, OSError, *GDAL_ERRORS) as exc:
                    raise InputDataError(
                        f"{where}: reading failed after row {row} ({gdal_says(exc)}); the file is "
                        f"corrupt or truncated, expected a valid {data_file.format.value} file"
                    ) from None
                problems: RowProblems = {}
                if csv_check is not None:
                    problems = csv_check(batch, geometry_name, row, caught)
                    caught.clear()
                out = normalise(batch)
                problems = {**_utf8_problems(out, row, where, probe.encoding_note, data_file),
                            **problems}
                if types:
                    out, unconverted = convert_batch(
                        out, schema, types,
                        lambda at, first=row: f"{where}, {row_label(data_file, first + at + 1)}")
                    problems = {**unconverted, **problems}
                row += batch.num_rows
                yield from _split_with_problems(out, problems, limits)

        yield schema, batches()


def _csv_types(data_file: DataFile, schema: pa.Schema, where: str,
               open_attributes: Callable[..., AbstractContextManager],
               gdal_says: Callable[[Exception], str]) -> dict[str, str]:
    """The types of a CSV's text columns (``libs.sharding.csv_types``): declared ones as
    declared, the others inferred from a first pass over every value of the file."""
    spec = data_file.csv
    assert spec is not None
    text = [f.name for f in schema if pa.types.is_string(f.type)]
    types, infer = column_types_for(dict(spec.column_types), text, spec.infer_types, where)
    if not infer:
        return types
    inference = CsvTypeInference(infer)
    try:
        # the main pass reports unreadable geometries and bad text: ignore them here
        with warnings.catch_warnings(), open_attributes(columns=infer) as (_, reader):
            warnings.simplefilter("ignore")
            for batch in reader:
                inference.add(batch)
    except (pa.ArrowException, OSError, *GDAL_ERRORS) as exc:
        raise InputDataError(f"{where}: reading failed while inferring column types "
                             f"({gdal_says(exc)}); expected a valid csv file") from None
    return {**types, **inference.types()}


@contextmanager
def _geoparquet_stream(source: LayerSource, where: str,
                       limits: ShardLimits) -> Iterator[SourceStream]:
    parquet = open_parquet(source.path, source.data_file)
    geo = read_geo_metadata(parquet, source.data_file)
    primary = geo["primary_column"]
    covering = geo["columns"][primary].get("covering") or {}
    skip = {path[0] for spec in covering.values() if isinstance(spec, dict)
            for path in spec.values() if isinstance(path, list) and path}
    columns = [n for n in parquet.schema_arrow.names if n not in skip]
    schema = pa.schema([parquet.schema_arrow.field(n) for n in columns])
    normalise = _Normaliser(schema, primary, where)

    # rows per batch from the file's own row-group sizes: heavy rows come in small batches
    meta = parquet.metadata
    stored = sum(meta.row_group(i).total_byte_size for i in range(meta.num_row_groups))
    batch_rows = limits.batch_rows_for(stored / max(1, meta.num_rows))

    def batches() -> Iterator[pa.RecordBatch]:
        row = 0
        iterator = parquet.iter_batches(batch_size=batch_rows, columns=columns,
                                        use_threads=False)
        while True:
            try:
                batch = next(iterator)
            except StopIteration:
                return
            except (pa.ArrowException, OSError) as exc:
                raise InputDataError(
                    f"{where}: reading failed after row {row} "
                    f"({clean_gdal_message(exc, Path(source.data_file.path).name, source.path)}); "
                    "the file is corrupt or truncated, expected a valid GeoParquet file"
                ) from None
            out = normalise(batch)
            problems = _utf8_problems(out, row, where, "UTF-8 (Parquet)", source.data_file)
            row += batch.num_rows
            yield from _split_with_problems(out, problems, limits)

    try:
        yield normalise.schema, batches()
    finally:
        parquet.close()
