"""Byte-level checks of the binary COPY encoder against psycopg's own binary dumpers.

Every field the encoder writes is compared with what psycopg's per-value dumper produces for
the same Python value and PostgreSQL type (the path ``copy.write_row`` takes), and every
geometry with shapely's EWKB. Round trips through PostGIS are in
``tests/integration/test_postgis_load.py``.
"""

from __future__ import annotations

import datetime as dt
import struct
from decimal import Decimal

import numpy as np
import psycopg
import pyarrow as pa
import pytest
import shapely
from psycopg.adapt import PyFormat, Transformer
from psycopg.pq import Format

from libs.errors import LoadError
from libs.postgis import copy_binary
from libs.postgis.copy_binary import COPY_SIGNATURE, COPY_TRAILER, Ewkb, copy_stream
from libs.postgis.tables import ANY_DIMENSION, column_geometry_type, geometry_column_sql, pg_type

UTC = dt.UTC


def parse_copy(stream: bytes) -> list[list[bytes | None]]:
    """Rows of a binary COPY stream as lists of raw field bytes (None for NULL)."""
    assert stream.startswith(COPY_SIGNATURE), stream[:19]
    assert stream.endswith(COPY_TRAILER)
    at, rows = len(COPY_SIGNATURE), []
    while at < len(stream) - 2:
        (count,) = struct.unpack_from(">h", stream, at)
        at += 2
        row = []
        for _ in range(count):
            (length,) = struct.unpack_from(">i", stream, at)
            at += 4
            if length == -1:
                row.append(None)
            else:
                row.append(stream[at:at + length])
                at += length
        rows.append(row)
    assert at == len(stream) - 2, "stray bytes before the trailer"
    return rows


def encode(columns, types, **kwargs) -> bytes:
    return b"".join(bytes(block) for block in copy_stream(columns, types, **kwargs))


def psycopg_fields(values: list, pg_type: str) -> list[bytes | None]:
    """What psycopg's binary dumper writes for each value (the write_row path)."""
    tx = Transformer()
    tx.set_dumper_types([psycopg.postgres.types.get(pg_type).oid], Format.BINARY)
    return [None if v is None else bytes(tx.dump_sequence([v], [PyFormat.BINARY])[0])
            for v in values]


def decode_numeric(raw: bytes) -> Decimal:
    ndigits, weight, sign, dscale = struct.unpack_from(">hhHH", raw)
    digits = struct.unpack_from(f">{ndigits}h", raw, 8)
    value = sum(Decimal(d) * Decimal(10_000) ** (weight - i) for i, d in enumerate(digits))
    value = -value if sign == 0x4000 else value
    return value.quantize(Decimal(1).scaleb(-dscale)) if dscale else value


ATTRIBUTES = {
    "flag": pa.array([True, None, False, True], pa.bool_()),
    "tiny": pa.array([-128, 127, None, 0], pa.int8()),
    "small": pa.array([-32768, None, 32767, 1], pa.int16()),
    "int": pa.array([None, -(2**31), 2**31 - 1, 7], pa.int32()),
    "big": pa.array([-(2**63), 2**63 - 1, 0, None], pa.int64()),
    "ubyte": pa.array([0, 255, None, 3], pa.uint8()),
    "ushort": pa.array([65535, None, 0, 9], pa.uint16()),
    "uint": pa.array([2**32 - 1, 0, 5, None], pa.uint32()),
    "half": pa.array(np.array([1.5, -2.25, 0.0, 65504.0], np.float16), pa.float16()),
    "single": pa.array([1.5, None, float("inf"), -0.0], pa.float32()),
    "double": pa.array([3.141592653589793, float("nan"), None, -1e300], pa.float64()),
    "name": pa.array(["", "grüße", None, "x" * 300]),
    "large_name": pa.array(["a", None, "ccc", "dd"], pa.large_string()),
    "blob": pa.array([b"\x00\xff", None, b"", b"abc"], pa.binary()),
    "large_blob": pa.array([None, b"z", b"", b"\x01"], pa.large_binary()),
    "day": pa.array([dt.date(1970, 1, 1), dt.date(1999, 12, 31), None, dt.date(2400, 2, 29)],
                    pa.date32()),
    "day64": pa.array([dt.date(2000, 1, 1), None, dt.date(1900, 3, 1), dt.date(2024, 2, 29)],
                      pa.date64()),
    "at_s": pa.array([dt.datetime(2000, 1, 1), None, dt.datetime(1960, 5, 6, 7, 8, 9),
                      dt.datetime(2038, 1, 19, 3, 14, 8)], pa.timestamp("s")),
    "at_ms": pa.array([dt.datetime(2021, 6, 1, 12, 0, 0, 123000), None,
                       dt.datetime(1969, 12, 31, 23, 59, 59, 999000), dt.datetime(2000, 1, 1)],
                      pa.timestamp("ms")),
    "at_us_utc": pa.array([dt.datetime(2021, 6, 1, 12, 0, 0, 123456, UTC), None,
                           dt.datetime(1850, 1, 1, tzinfo=UTC), dt.datetime(2000, 1, 1, tzinfo=UTC)],
                          pa.timestamp("us", tz="UTC")),
    "at_ms_paris": pa.array([dt.datetime(2021, 6, 1, 12, 0, tzinfo=UTC), None, None,
                             dt.datetime(1999, 1, 1, tzinfo=UTC)],
                            pa.timestamp("ms", tz="Europe/Paris")),
    "kind": pa.array(["a", "b", None, "a"]).dictionary_encode(),
    "huge": pa.array([0, 2**64 - 1, None, 10_000], pa.uint64()),
    "money": pa.array([Decimal("1.500"), Decimal("-0.001"), None, Decimal("1234567.000")],
                      pa.decimal128(10, 3)),
}


def _python_values(array: pa.Array) -> list:
    values = array.to_pylist()
    if pa.types.is_float16(array.type):
        return [None if v is None else float(v) for v in values]
    return values


@pytest.mark.parametrize("name", [n for n in ATTRIBUTES if n not in ("huge", "money")])
def test_each_type_matches_psycopgs_binary_dumper(name):
    array = ATTRIBUTES[name]
    kind = pg_type(pa.field(name, array.type))[1]
    rows = parse_copy(encode([array], [kind]))
    assert [r[0] for r in rows] == psycopg_fields(_python_values(array), kind)


def test_numeric_is_exact():
    rows = parse_copy(encode([ATTRIBUTES["huge"], ATTRIBUTES["money"]], ["numeric", "numeric"]))
    assert [None if r[0] is None else decode_numeric(r[0]) for r in rows] == \
        [0, 2**64 - 1, None, 10_000]
    assert [None if r[1] is None else decode_numeric(r[1]) for r in rows] == \
        [Decimal("1.500"), Decimal("-0.001"), None, Decimal("1234567.000")]
    assert decode_numeric(rows[0][1]).as_tuple().exponent == -3  # dscale kept: 1.500


def test_nanosecond_timestamps_floor_to_microseconds():
    nanos = pa.array([1_500, -1_500, None], pa.timestamp("ns"))
    rows = parse_copy(encode([nanos], ["timestamp"]))
    epoch = (dt.datetime(2000, 1, 1) - dt.datetime(1970, 1, 1)) // dt.timedelta(microseconds=1)
    assert [None if r[0] is None else struct.unpack(">q", r[0])[0] for r in rows] == \
        [1 - epoch, -2 - epoch, None]


def test_a_whole_row_layout_with_field_count_and_trailer():
    ids = pa.array([7, 8], pa.int64())
    names = pa.array(["ab", None])
    stream = encode([ids, names], ["int8", "text"])
    assert stream == (COPY_SIGNATURE
                      + b"\x00\x02" + b"\x00\x00\x00\x08" + (7).to_bytes(8, "big")
                      + b"\x00\x00\x00\x02ab"
                      + b"\x00\x02" + b"\x00\x00\x00\x08" + (8).to_bytes(8, "big")
                      + b"\xff\xff\xff\xff"
                      + COPY_TRAILER)


def test_no_rows_is_signature_and_trailer():
    assert encode([pa.array([], pa.int64())], ["int8"]) == COPY_SIGNATURE + COPY_TRAILER


def _table_columns():
    names = list(ATTRIBUTES)
    return names, [ATTRIBUTES[n] for n in names], [pg_type(pa.field(n, ATTRIBUTES[n].type))[1]
                                                   for n in names]


def test_all_types_in_one_row_equal_their_columns_encoded_alone():
    names, columns, kinds = _table_columns()
    together = parse_copy(encode(columns, kinds, names=names))
    for i, (column, kind) in enumerate(zip(columns, kinds, strict=True)):
        assert [row[i] for row in together] == [r[0] for r in parse_copy(encode([column], [kind]))]


def test_blocks_chunked_and_sliced_inputs_do_not_change_the_bytes():
    rng = np.random.default_rng(5)
    n = 5_000
    words = pa.array([None if i % 17 == 0 else "w" * int(k) for i, k in
                      enumerate(rng.integers(0, 40, n))])
    values = pa.array(rng.random(n))
    polygons = shapely.buffer(shapely.points(rng.uniform(0, 100, (n, 2))), 1.0,
                              quad_segs=int(rng.integers(1, 4)))
    wkb = pa.array(shapely.to_wkb(polygons), pa.binary())
    types = ["text", "float8", Ewkb(3857)]
    whole = encode([words, values, wkb], types)
    assert encode([words, values, wkb], types, block_bytes=100) == whole
    chunked = [pa.chunked_array([c.slice(0, 1234), c.slice(1234, 3000), c.slice(4234)])
               for c in (words, values, wkb)]
    assert encode(chunked, types, block_bytes=20_000) == whole
    padded = [pa.concat_arrays([c.slice(0, 3), c]).slice(3) for c in (words, values, wkb)]
    assert padded[0].offset == 3
    assert encode(padded, types) == whole


def test_records_written_in_row_slices_equal_one_pass(monkeypatch):
    """Fixed-width records are filled a slice of rows at a time (``MATERIALISE_ROWS``): any
    slice size gives the same bytes, scalars, NULLs and same-size EWKB bodies included."""
    rng = np.random.default_rng(11)
    n = 1_000
    ids = pa.array(np.arange(n, dtype=np.int64))
    values = pa.array([None if i % 13 == 0 else float(v) for i, v in enumerate(rng.random(n))])
    letters = pa.array([chr(65 + i % 5) for i in range(n)])  # one length: a fixed piece
    points = pa.array(shapely.to_wkb(shapely.points(rng.uniform(-50, 50, (n, 2)))), pa.binary())
    columns, types = [ids, values, letters, points], ["int8", "float8", "text", Ewkb(8857)]
    whole = encode(columns, types)
    for rows in (1, 7, 999, 1_000, 4_096):
        monkeypatch.setattr(copy_binary, "MATERIALISE_ROWS", rows)
        assert encode(columns, types) == whole, rows
    parsed = parse_copy(whole)
    assert [r[0] for r in parsed[:3]] == [struct.pack(">q", i) for i in range(3)]
    assert parsed[0][1] is None and parsed[1][1] == struct.pack(">d", values[1].as_py())


def test_points_get_the_srid_in_their_ewkb_header():
    points = shapely.points([[1.0, 2.0], [-3.5, 4.25], [0.0, 0.0]])
    rows = parse_copy(encode([pa.array(shapely.to_wkb(points), pa.binary())], [Ewkb(4326)]))
    expected = shapely.to_wkb(shapely.set_srid(points, 4326), include_srid=True)
    assert [r[0] for r in rows] == list(expected)
    assert rows[0][0][:9] == b"\x01\x01\x00\x00\x20\xe6\x10\x00\x00"


def test_varied_geometries_and_nulls_become_ewkb():
    geoms = np.array([shapely.Polygon([(0, 0), (1, 0), (1, 1)]), None, shapely.Point(5, 6),
                      shapely.LineString([(0, 0), (1, 1), (2, 0)]),
                      shapely.MultiPolygon([shapely.box(0, 0, 1, 1), shapely.box(2, 2, 3, 3)]),
                      shapely.GeometryCollection([shapely.Point(1, 1)])], dtype=object)
    rows = parse_copy(encode([pa.array(shapely.to_wkb(geoms), pa.binary())], [Ewkb(3857)]))
    expected = shapely.to_wkb(shapely.set_srid(geoms, 3857), include_srid=True)
    assert [r[0] for r in rows] == list(expected)


def test_big_endian_and_mixed_byte_order_wkb():
    geoms = shapely.points([[1.0, 2.0], [3.0, 4.0]])
    mixed = pa.array([shapely.to_wkb(geoms[0], byte_order=0),
                      shapely.to_wkb(geoms[1], byte_order=1)], pa.binary())
    big = pa.array(shapely.to_wkb(geoms, byte_order=0), pa.binary())
    for array in (mixed, big):
        rows = parse_copy(encode([array], [Ewkb(3857)]))
        decoded = shapely.from_wkb([r[0] for r in rows])
        assert shapely.equals(decoded, geoms).all()
        assert (shapely.get_srid(decoded) == 3857).all()
    assert parse_copy(encode([big], [Ewkb(3857)]))[0][0][:9] == \
        b"\x00\x20\x00\x00\x01\x00\x00\x0f\x11"


def test_iso_z_wkb_keeps_its_type_code_and_gains_the_srid_flag():
    point_z = shapely.to_wkb(shapely.Point(1, 2, 3), flavor="iso")
    assert point_z[1:5] == (1001).to_bytes(4, "little")
    row = parse_copy(encode([pa.array([point_z], pa.binary())], [Ewkb(3857)]))[0][0]
    assert row[1:5] == (0x20000000 | 1001).to_bytes(4, "little")
    assert row[5:9] == (3857).to_bytes(4, "little")
    assert row[9:] == point_z[5:]


def test_ewkb_input_with_the_columns_srid_is_restamped():
    ewkb = shapely.to_wkb(shapely.set_srid(shapely.points([[1, 2], [3, 4]]), 3857),
                          include_srid=True)
    rows = parse_copy(encode([pa.array(ewkb, pa.binary())], [Ewkb(3857)]))
    assert [r[0] for r in rows] == list(ewkb)


def test_ewkb_input_with_another_srid_is_refused():
    ewkb = shapely.to_wkb(shapely.set_srid(shapely.points([[1, 2], [3, 4]]), 4326),
                          include_srid=True)
    with pytest.raises(LoadError, match=r"geom: row 0 is EWKB with SRID 4326 but the column's "
                                        r"SRID is 3857; transform"):
        encode([pa.array(ewkb, pa.binary())], [Ewkb(3857)], names=["geom"])


@pytest.mark.parametrize(("value", "message"), [
    (b"\x01\x01\x00", r"row 1 holds 3 bytes, not WKB"),
    (b"POINT (1 2)", r"row 1 does not start with a WKB byte-order mark \(0 or 1\) but 80"),
])
def test_bytes_that_are_not_wkb_are_refused_naming_the_row(value, message):
    good = shapely.to_wkb(shapely.Point(1, 2))
    with pytest.raises(LoadError, match=message):
        encode([pa.array([good, value], pa.binary())], [Ewkb(3857)], names=["geometry"])


def test_unknown_type_and_ragged_columns_are_programming_errors():
    with pytest.raises(ValueError, match="no binary COPY encoder for type 'money'"):
        encode([pa.array([1])], ["money"])
    with pytest.raises(ValueError, match="differ in length"):
        encode([pa.array([1]), pa.array([1, 2])], ["int8", "int8"])


def test_blocks_plan_by_bytes():
    texts = pa.array(["x" * 1000] * 100)
    blocks = list(copy_stream([texts], ["text"], block_bytes=10_000))
    assert bytes(blocks[0]) == COPY_SIGNATURE and bytes(blocks[-1]) == COPY_TRAILER
    assert 8 <= len(blocks) - 2 <= 12
    fixed = list(copy_stream([pa.array(np.arange(1000))], ["int8"], block_bytes=1_000))
    assert len(fixed) - 2 == -(-1000 // (1000 // 14))  # 14-byte rows, whole rows a block
    assert copy_binary.DEFAULT_BLOCK_BYTES >= 1 << 20


def test_a_block_of_null_geometries_is_all_minus_one():
    rows = parse_copy(encode([pa.array([None, None], pa.binary())], [Ewkb(4326)]))
    assert rows == [[None], [None]]


@pytest.mark.parametrize("types, column", [
    (["Point"], "Point"), (["Point Z"], "PointZ"), (["MultiPolygon Z"], "MultiPolygonZ"),
    (["Point", "Polygon"], "Geometry"), (["LineString Z", "Point Z"], "GeometryZ"),
    (["Point", "Point Z"], ANY_DIMENSION), ([], "Geometry")])
def test_a_layer_column_is_typed_by_its_geometry_types_and_dimensions(types, column):
    assert column_geometry_type(types) == column
    sql_text = geometry_column_sql(column, 3857).as_string()
    assert sql_text == ('geometry CHECK (ST_SRID("geom") = 3857)' if column == ANY_DIMENSION
                        else f"geometry({column}, 3857)")


def test_an_unknown_geometry_column_type_is_refused():
    with pytest.raises(ValueError, match="unknown geometry type 'PointQ'"):
        geometry_column_sql("PointQ", 3857)
