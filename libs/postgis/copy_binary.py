"""PostgreSQL binary COPY streams built straight from Arrow columns, without a per-row loop.

Every column becomes one or two *pieces* of bytes per row: fixed-width (a numpy uint8 matrix
of big-endian values behind their length words) or variable-width (an Arrow binary array:
text, bytea, WKB bodies). Fixed pieces are stacked side by side; when nothing variable is left
the matrix *is* the block, otherwise Arrow's ``binary_join_element_wise`` lays the pieces out
row after row in C. The work per row is a handful of memcpys in numpy/Arrow code that releases
the GIL, so several chunks can be encoded in parallel threads.

Types are the names ``libs.postgis.tables`` maps Arrow types to: ``bool``, ``int2``/``int4``/
``int8``, ``float4``/``float8`` (widened where PostgreSQL's type is wider), ``text``/``bytea``
(the bytes as stored), ``date``, ``timestamp``/``timestamptz`` (floored to microseconds),
``numeric`` (exact, never a silent cast to float) and ``Ewkb(srid)``: WKB sent as EWKB by
patching the SRID into each geometry's header instead of re-serialising it. A geometry that
already carries another SRID is an error: it was never transformed to the target CRS.

The stream layout, every type rule and what encoding costs per row: see docs/copy-encoding.md.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from decimal import Decimal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import shapely

from libs.errors import LoadError

COPY_SIGNATURE = b"PGCOPY\n\xff\r\n\x00" + b"\x00\x00\x00\x00" + b"\x00\x00\x00\x00"
COPY_TRAILER = b"\xff\xff"
#: Rows are grouped into blocks of about this many bytes: big enough that numpy and Arrow
#: calls are amortised and psycopg gets few large writes, small enough to stay in cache-ish
#: memory and keep Arrow's 32-bit offsets far from overflowing.
DEFAULT_BLOCK_BYTES = 8 << 20

_PG_EPOCH_DAYS = 10_957  # 1970-01-01 → 2000-01-01
_PG_EPOCH_US = _PG_EPOCH_DAYS * 86_400 * 1_000_000
_US_PER = {"s": 1_000_000, "ms": 1_000, "us": 1}
_FIXED = {  # PostgreSQL type -> big-endian numpy dtype of its binary form
    "bool": np.dtype("u1"), "int2": np.dtype(">i2"), "int4": np.dtype(">i4"),
    "int8": np.dtype(">i8"), "float4": np.dtype(">f4"), "float8": np.dtype(">f8"),
    "date": np.dtype(">i4"), "timestamp": np.dtype(">i8"), "timestamptz": np.dtype(">i8"),
}
_VARIABLE = {"text", "bytea"}
BINARY_TYPES = frozenset(_FIXED) | _VARIABLE | {"numeric"}
_WKB_SRID_FLAG = 0x20  # 0x20000000 in the WKB type word: "an SRID follows"
_MAX_SLICE = 2**31 - 1
_LENGTH = np.dtype(">i4")


@dataclass(frozen=True)
class Ewkb:
    """Column type of a WKB column that is sent as EWKB carrying ``srid``."""

    srid: int


ColumnType = str | Ewkb


@dataclass
class _Fixed:
    """A fixed-width piece: (big-endian dtype, per-row array or one scalar) fields, side by side."""

    fields: list[tuple[np.dtype, object]]


# A piece holds one slice of bytes per row: fixed (``_Fixed``) or variable (an Arrow binary
# array without NULLs).
_Piece = _Fixed | pa.Array


def copy_stream(
    columns: Sequence[pa.Array | pa.ChunkedArray],
    types: Sequence[ColumnType],
    *,
    names: Sequence[str] | None = None,
    block_bytes: int = DEFAULT_BLOCK_BYTES,
) -> Iterator[memoryview]:
    """The whole binary COPY stream for ``columns`` (signature, row blocks, trailer).

    ``types`` gives each column's PostgreSQL binary type (see docs/copy-encoding.md);
    ``names`` only serve error messages. Each yielded block can go to ``copy.write()`` as is;
    it stays valid after the next one is produced.
    """
    names = list(names) if names is not None else [f"column {i}" for i in range(len(columns))]
    if not (len(columns) == len(types) == len(names)):
        raise ValueError(f"{len(columns)} columns, {len(types)} types and {len(names)} names")
    if len(columns) >= 2**15:
        raise LoadError(f"{len(columns)} columns is more than PostgreSQL's COPY can take")
    for name, kind in zip(names, types, strict=True):
        if not isinstance(kind, Ewkb) and kind not in BINARY_TYPES:
            raise ValueError(f"{name}: no binary COPY encoder for type {kind!r}")
    rows = len(columns[0]) if columns else 0
    if any(len(c) != rows for c in columns):
        raise ValueError(f"columns differ in length: {[len(c) for c in columns]}")
    yield memoryview(COPY_SIGNATURE)
    for start, stop in _blocks(columns, types, rows, block_bytes):
        block = [_as_array(c.slice(start, stop - start)) for c in columns]
        yield encode_rows(block, types, names=names, first_row=start)
    yield memoryview(COPY_TRAILER)


def encode_rows(
    columns: Sequence[pa.Array], types: Sequence[ColumnType], *,
    names: Sequence[str] | None = None, first_row: int = 0,
) -> memoryview:
    """One block of rows in binary COPY layout (no signature, no trailer).

    ``first_row`` is the block's position in the chunk, for error messages.
    """
    names = list(names) if names is not None else [f"column {i}" for i in range(len(columns))]
    rows = len(columns[0]) if columns else 0
    pieces: list[_Piece] = [_Fixed([(np.dtype(">i2"), len(columns))])]
    for array, kind, name in zip(columns, types, names, strict=True):
        if isinstance(kind, Ewkb):
            pieces += _ewkb_pieces(_as_array(array), kind.srid, name, first_row)
        else:
            pieces += _column_pieces(_as_array(array), kind)
    return _interleave(pieces, rows)


# ------------------------------------------------------------------------- block planning


def _blocks(columns, types, rows: int, block_bytes: int) -> list[tuple[int, int]]:
    """[start, stop) row ranges holding about ``block_bytes`` of encoded rows each."""
    if rows == 0:
        return []
    fixed = 2 + 4 * len(columns) + sum(
        _FIXED[t].itemsize if isinstance(t, str) and t in _FIXED else 0 for t in types)
    sizes: np.ndarray | None = None
    for column, kind in zip(columns, types, strict=True):
        if isinstance(kind, Ewkb) or kind in _VARIABLE or kind == "numeric":
            lengths = _value_lengths(column)
            if lengths is None:  # numeric as uint64/decimal: at most ~30 bytes a value
                fixed += 32
                continue
            sizes = lengths if sizes is None else sizes + lengths
    if sizes is None:
        per_block = max(1, block_bytes // fixed)
        return [(s, min(rows, s + per_block)) for s in range(0, rows, per_block)]
    ends = np.cumsum(sizes + fixed)
    cuts = np.searchsorted(ends, np.arange(block_bytes, int(ends[-1]), block_bytes), side="right")
    bounds = np.unique(np.concatenate([[0], np.maximum(cuts, 1), [rows]]))
    return [(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:], strict=True) if b > a]


def _value_lengths(column: pa.Array | pa.ChunkedArray) -> np.ndarray | None:
    """Byte lengths of a binary-like column's values (int64), or None for other types."""
    chunks = column.chunks if isinstance(column, pa.ChunkedArray) else [column]
    parts = []
    for chunk in chunks:
        chunk = _storage(chunk)
        if pa.types.is_dictionary(chunk.type):
            chunk = chunk.dictionary_decode()
        if pa.types.is_string_view(chunk.type) or pa.types.is_binary_view(chunk.type):
            chunk = chunk.cast(pa.large_binary())
        if not _is_binary_like(chunk.type):
            return None
        parts.append(_offsets(chunk)[1].astype(np.int64))
    return np.concatenate(parts) if parts else np.zeros(0, np.int64)


# --------------------------------------------------------------------------------- pieces


def _column_pieces(array: pa.Array, kind: str) -> list[_Piece]:
    if pa.types.is_dictionary(array.type):
        array = array.dictionary_decode()
    if kind in _VARIABLE:
        return _variable_pieces(array)
    if kind == "numeric":
        return _numeric_pieces(array)
    dtype = _FIXED[kind]
    piece = _Fixed([(_LENGTH, dtype.itemsize), (dtype, _fixed_values(array))])
    return [_null_fields(piece, _valid(array))]


def _fixed_values(array: pa.Array) -> np.ndarray:
    """The column as a numpy array of the PostgreSQL value (native byte order, NULLs as 0)."""
    t = array.type
    if pa.types.is_timestamp(t):
        raw = _filled(array.view(pa.int64()), 0)
        micros = raw // 1_000 if t.unit == "ns" else raw * _US_PER[t.unit]
        return micros - _PG_EPOCH_US
    if pa.types.is_date32(t):
        return _filled(array.view(pa.int32()), 0) - np.int32(_PG_EPOCH_DAYS)
    if pa.types.is_date64(t):
        days = _filled(array.view(pa.int64()), 0) // 86_400_000
        return (days - _PG_EPOCH_DAYS).astype(np.int32)
    if pa.types.is_boolean(t):
        return _filled(array, False).astype(np.uint8)
    if pa.types.is_float16(t):
        array = array.cast(pa.float32())
    return _filled(array, 0)


def _null_fields(piece: _Fixed, valid: np.ndarray | None) -> _Piece:
    """A fixed piece whose first field is the length word, with its NULL rows cut down to -1.

    NULL rows are shorter than the others, so the piece becomes a variable one.
    """
    if valid is None:
        return piece
    record = _materialise(piece, len(valid))
    width = record.dtype.itemsize
    matrix = record.view(np.uint8).reshape(len(valid), width)
    matrix[~valid, :4] = 0xFF
    keep = np.ones(matrix.shape, dtype=bool)
    keep[~valid, 4:] = False
    return _binary(matrix[keep], np.where(valid, width, 4))


def _variable_pieces(array: pa.Array) -> list[_Piece]:
    array = _binary_array(array)
    _, lengths = _offsets(array)
    valid = _valid(array)
    words = lengths if valid is None else np.where(valid, lengths, -1)
    if valid is not None:
        array = pc.fill_null(array, pa.scalar(b"", pa.binary()))
    return [_Fixed([(_LENGTH, words)]), _as_piece(array)]


def _ewkb_pieces(array: pa.Array, srid: int, name: str, first_row: int) -> list[_Piece]:
    """A WKB column as EWKB with ``srid``: [length, byte order, type | SRID flag, SRID] [body]."""
    array = _binary_array(array)
    rows = len(array)
    starts, lengths = _offsets(array)
    valid = _valid(array)
    ok = np.ones(rows, dtype=bool) if valid is None else valid
    short = ok & (lengths < 5)
    if short.any():
        row = int(np.flatnonzero(short)[0])
        raise LoadError(f"{name}: row {first_row + row} holds {int(lengths[row])} bytes, "
                        "not WKB (a WKB geometry has at least 5); re-export the geometries as WKB")
    data = _data(array)
    same_size = valid is None and rows > 0 and lengths.min() == lengths.max()
    if same_size:  # points: every row is one row of a (rows, size) matrix
        size = int(lengths[0])
        matrix = data[starts[0]:starts[0] + rows * size].reshape(rows, size)
        order, type_bytes = matrix[:, 0], matrix[:, 1:5]
    elif ok.any():  # NULL rows read the first geometry's header, then become -1 anyway
        at = np.where(ok, starts, starts[np.argmax(ok)])
        order, type_bytes = data[at], data[at[:, None] + np.arange(1, 5)]
    else:
        order, type_bytes = np.ones(rows, np.uint8), np.zeros((rows, 4), np.uint8)
    bad = ok & (order > 1)
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        raise LoadError(f"{name}: row {first_row + row} does not start with a WKB byte-order "
                        f"mark (0 or 1) but {int(order[row])}; re-export the geometries as WKB")
    little = order == 1
    flag_byte = np.where(little, type_bytes[:, 3], type_bytes[:, 0])
    carries_srid = ok & (flag_byte & _WKB_SRID_FLAG != 0)
    if carries_srid.any():
        _check_embedded_srids(array, carries_srid, little, srid, name, first_row)
        return _variable_pieces(_restamp_ewkb(array, srid))
    if little[ok].all() or not little[ok].any():
        # one byte order (the usual case): the type word and SRID as numbers in that order
        word = np.dtype("<u4") if little[ok].all() else np.dtype(">u4")
        type_word = _as_void(type_bytes).view(word).reshape(rows) | word.type(_WKB_SRID_FLAG << 24)
        srid_fields = [(word, type_word), (word, srid)]
    else:
        patched = np.array(type_bytes)
        patched[little, 3] |= _WKB_SRID_FLAG
        patched[~little, 0] |= _WKB_SRID_FLAG
        stamp = np.where(little[:, None], np.frombuffer(struct.pack("<I", srid), np.uint8),
                         np.frombuffer(struct.pack(">I", srid), np.uint8))
        srid_fields = [(np.dtype("V4"), _as_void(patched)), (np.dtype("V4"), _as_void(stamp))]
    front = _Fixed([(_LENGTH, lengths + 4), (np.dtype("u1"), order), *srid_fields])
    if same_size:
        body = matrix[:, 5:]
        return [front, _Fixed([(np.dtype(f"V{size - 5}"), _as_void(body))])] if size > 5 \
            else [front]
    body = pc.binary_slice(array, 5, _MAX_SLICE)
    if valid is not None:
        body = pc.fill_null(body, pa.scalar(b"", pa.binary()))
    return [_null_fields(front, valid), body]


def _check_embedded_srids(array: pa.Array, carries: np.ndarray, little: np.ndarray, srid: int,
                          name: str, first_row: int) -> None:
    """EWKB input must carry the column's SRID (or 0): a different one means the geometries
    were never transformed to the target CRS, and stamping ours over it would hide that."""
    rows = np.flatnonzero(carries)
    if len(_data(array)) and len(rows):
        starts, lengths = _offsets(array)
        short = rows[lengths[rows] < 9]
        if len(short):
            raise LoadError(f"{name}: row {first_row + int(short[0])} flags an SRID but holds "
                            f"only {int(lengths[short[0]])} bytes; re-export the geometries as WKB")
        raw = _data(array)[starts[rows][:, None] + np.arange(5, 9)]
        found = np.where(little[rows], _as_void(raw).view("<u4").reshape(len(rows)),
                         _as_void(raw).view(">u4").reshape(len(rows)))
        wrong = (found != srid) & (found != 0)
        if wrong.any():
            row = int(rows[np.flatnonzero(wrong)[0]])
            raise LoadError(
                f"{name}: row {first_row + row} is EWKB with SRID {int(found[wrong][0])} but the "
                f"column's SRID is {srid}; transform the geometries to the target CRS (or write "
                "plain WKB) before loading")


def _restamp_ewkb(array: pa.Array, srid: int) -> pa.Array:
    """EWKB with ``srid`` via shapely, for WKB that already carries an SRID of its own."""
    geoms = shapely.from_wkb(array.to_numpy(zero_copy_only=False))
    ewkb = shapely.to_wkb(shapely.set_srid(geoms, srid), include_srid=True)
    return pa.array(ewkb, type=pa.binary())


def _numeric_pieces(array: pa.Array) -> list[_Piece]:
    valid = _valid(array)
    if pa.types.is_integer(array.type):
        # integers (uint64 is the one mapped to numeric): 5 base-10000 digits, weight 4;
        # PostgreSQL drops the leading zero digits on receipt
        values = _filled(array.cast(pa.uint64()), 0)
        digits = [(np.dtype(">i2"), ((values // np.uint64(10_000 ** (4 - k))) % np.uint64(10_000))
                   .astype(np.int16)) for k in range(5)]
        head = [(np.dtype(">i2"), 5), (np.dtype(">i2"), 4), (np.dtype(">u2"), 0),
                (np.dtype(">i2"), 0)]
        return [_null_fields(_Fixed([(_LENGTH, 18), *head, *digits]), valid)]
    if not pa.types.is_decimal(array.type):
        raise LoadError(f"numeric encoder got Arrow type {array.type}; expected integer or decimal")
    encoded = [None if v is None else _numeric_bytes(v) for v in array.to_pylist()]
    return _variable_pieces(pa.array(encoded, type=pa.binary()))


def _numeric_bytes(value: Decimal) -> bytes:
    """PostgreSQL's binary numeric: ndigits, weight, sign, dscale, base-10000 digits."""
    sign, digits, exponent = value.as_tuple()
    scale = max(0, -exponent)
    unscaled = int("".join(map(str, digits)) or "0") * 10 ** max(0, exponent)
    pad = -scale % 4  # align the decimal point to a base-10000 digit boundary
    aligned = unscaled * 10**pad
    groups = []
    while aligned:
        aligned, digit = divmod(aligned, 10_000)
        groups.append(digit)
    groups.reverse()
    weight = len(groups) - 1 - (scale + pad) // 4 if groups else 0
    return struct.pack(f">hhHH{len(groups)}h", len(groups), weight,
                       0x4000 if sign else 0, scale, *groups)


# ----------------------------------------------------------------------------- interleave


def _interleave(pieces: list[_Piece], rows: int) -> memoryview:
    """Lay the pieces out row after row; return the bytes as a flat memoryview."""
    merged: list[_Piece] = []
    for piece in pieces:
        if isinstance(piece, _Fixed) and not piece.fields:
            continue
        if isinstance(piece, _Fixed) and merged and isinstance(merged[-1], _Fixed):
            merged[-1] = _Fixed(merged[-1].fields + piece.fields)
        else:
            merged.append(piece)
    if len(merged) == 1 and isinstance(merged[0], _Fixed):
        return memoryview(_materialise(merged[0], rows).view(np.uint8))
    arrays = [_fixed_as_binary(_materialise(p, rows)) if isinstance(p, _Fixed) else p
              for p in merged]
    joined = pc.binary_join_element_wise(*arrays, pa.scalar(b"", pa.binary()))
    starts, lengths = _offsets(joined)
    first = int(starts[0]) if rows else 0
    total = int(lengths.sum())
    return memoryview(joined.buffers()[2])[first:first + total] if total else memoryview(b"")


#: Rows per pass of ``_materialise``: every field is written into this many records before the
#: next slice, so the slice stays in the core's L2 cache (8k rows of a 72-byte point record are
#: ~0.6 MB) instead of the whole block's records being streamed through memory once per field.
MATERIALISE_ROWS = 8192


def _materialise(piece: _Fixed, rows: int) -> np.ndarray:
    """The fixed piece as a packed structured array: one element per row, fields in order."""
    names = [f"f{i}" for i in range(len(piece.fields))]
    record = np.empty(rows, dtype=np.dtype([(n, d) for n, (d, _) in zip(names, piece.fields, strict=True)]))
    for start in range(0, rows, MATERIALISE_ROWS):
        stop = min(rows, start + MATERIALISE_ROWS)
        part = record[start:stop]
        for name, (_, values) in zip(names, piece.fields, strict=True):
            # numpy converts to big-endian on the way in; a scalar fills every row
            part[name] = values[start:stop] if np.ndim(values) else values
    return record


def _fixed_as_binary(record: np.ndarray) -> pa.Array:
    rows, width = len(record), record.dtype.itemsize
    offsets = np.arange(0, rows * width + 1, width, dtype=np.int32)
    return pa.Array.from_buffers(pa.binary(), rows,
                                 [None, pa.py_buffer(offsets), pa.py_buffer(record.view(np.uint8))])


def _binary(data: np.ndarray, lengths: np.ndarray) -> pa.Array:
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    if offsets[-1] >= 2**31:
        raise LoadError("a COPY block grew past 2 GiB; lower block_bytes")
    return pa.Array.from_buffers(pa.binary(), len(lengths),
                                 [None, pa.py_buffer(offsets.astype(np.int32)),
                                  pa.py_buffer(np.ascontiguousarray(data))])


def _as_piece(array: pa.Array) -> _Piece:
    """A NULL-free binary array; fixed when every value has the same length."""
    starts, lengths = _offsets(array)
    rows = len(array)
    if rows and lengths.min() == lengths.max():
        width = int(lengths[0])
        if width == 0:
            return _Fixed([])
        matrix = _data(array)[starts[0]:starts[0] + rows * width].reshape(rows, width)
        return _Fixed([(np.dtype(f"V{width}"), _as_void(matrix))])
    return array


def _as_void(matrix: np.ndarray) -> np.ndarray:
    """A (rows, width) uint8 matrix whose rows are contiguous as one ``V<width>`` per row."""
    return matrix.view(f"V{matrix.shape[1]}").reshape(len(matrix))


# ------------------------------------------------------------------------- Arrow plumbing


def _as_array(column: pa.Array | pa.ChunkedArray) -> pa.Array:
    if isinstance(column, pa.ChunkedArray):
        return column.combine_chunks() if column.num_chunks != 1 else column.chunk(0)
    return column


def _storage(array: pa.Array) -> pa.Array:
    return array.storage if isinstance(array.type, pa.ExtensionType) else array


def _is_binary_like(t: pa.DataType) -> bool:
    return (pa.types.is_binary(t) or pa.types.is_large_binary(t) or pa.types.is_string(t)
            or pa.types.is_large_string(t))


def _binary_array(array: pa.Array) -> pa.Array:
    """The column as ``pa.binary()`` (32-bit offsets; blocks are far below 2 GiB)."""
    array = _storage(array)
    if pa.types.is_dictionary(array.type):
        array = array.dictionary_decode()
    t = array.type
    if pa.types.is_string(t):
        return array.view(pa.binary())
    if pa.types.is_binary(t):
        return array
    if pa.types.is_large_string(t) or pa.types.is_string_view(t) or pa.types.is_binary_view(t) \
            or pa.types.is_large_binary(t):
        return array.cast(pa.binary())
    raise LoadError(f"expected a binary or text column, got Arrow type {t}")


def _offsets(array: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """(start, length) of each value of a binary-like array, honouring a slice offset."""
    dtype = np.int64 if pa.types.is_large_binary(array.type) or \
        pa.types.is_large_string(array.type) else np.int32
    offsets = np.frombuffer(array.buffers()[1], dtype=dtype)[array.offset:array.offset + len(array) + 1]
    return offsets[:-1], np.diff(offsets)


def _data(array: pa.Array) -> np.ndarray:
    buffer = array.buffers()[2]
    return np.frombuffer(buffer, dtype=np.uint8) if buffer is not None else np.zeros(0, np.uint8)


def _valid(array: pa.Array) -> np.ndarray | None:
    """Validity mask, or None when the array has no NULLs."""
    if array.null_count == 0:
        return None
    return array.is_valid().to_numpy(zero_copy_only=False)


def _filled(array: pa.Array, fill) -> np.ndarray:
    if array.null_count:
        array = pc.fill_null(array, pa.scalar(fill, array.type))
    return array.to_numpy(zero_copy_only=False)


