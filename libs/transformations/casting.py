"""Value conversion for the ``cast`` step: which values convert to which type, and how.

Conversion is value by value and strict, so that a value that does not convert rejects its
row instead of turning into a silent NULL or a truncated number:

- NULL stays NULL. A float NaN counts as NULL, except when casting to ``float64`` where
  it is a valid value. A string that is empty or only whitespace becomes NULL (that is how
  CSV and DBF files spell a missing number or date).
- ``int64``: integers in range; floats with no fractional part (``3.0``); booleans (1/0);
  strings of decimal digits with an optional sign (``" -12 "``). Not ``"3.5"``, ``"1e3"``.
- ``float64``: numbers, booleans, and strings Python's ``float`` reads (``"1.5"``,
  ``"-2e3"``, ``"nan"``, ``"inf"``).
- ``string``: strings as they are; integers in decimal; floats in their shortest
  round-trip form (``repr``: ``1.5``, ``3.0``, ``1e+20``); booleans as ``true``/``false``;
  dates and timestamps in ISO 8601; UTF-8 bytes decoded.
- ``bool``: booleans; 0/1; strings ``true/false, t/f, yes/no, y/n, 1/0`` in any case.
- ``date``: dates; timestamps whose time of day is exactly midnight; ISO 8601 date strings
  (``2020-01-31``, ``20200131``).
- ``timestamp``: to ``timestamp[us, UTC]``. Timestamps with a zone are converted to UTC;
  naive timestamps, dates and strings without an offset are taken as UTC; ISO 8601 strings
  (``2020-01-31T12:00:00+02:00``, ``...Z``, ``2020-01-31 12:00``).

Nested values (lists, structs, maps) convert to nothing; the plan rejects such a cast up
front.
"""

from __future__ import annotations

import datetime as dt
import math
import re
from decimal import Decimal

import pyarrow as pa

#: The Arrow type each ``cast`` target produces.
CAST_TYPES: dict[str, pa.DataType] = {
    "int64": pa.int64(),
    "float64": pa.float64(),
    "string": pa.string(),
    "bool": pa.bool_(),
    "date": pa.date32(),
    "timestamp": pa.timestamp("us", tz="UTC"),
}

_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1
_INTEGER = re.compile(r"[+-]?\d+")
_TRUE = {"true", "t", "yes", "y", "1"}
_FALSE = {"false", "f", "no", "n", "0"}


class NotConvertible(ValueError):
    """A value has no faithful representation in the target type."""


def castable(source: pa.DataType) -> bool:
    """Whether values of ``source`` can be cast at all (nested types cannot)."""
    if pa.types.is_dictionary(source):
        source = source.value_type
    return not pa.types.is_nested(source)


def show_value(value: object) -> str:
    """A value as a reject reason quotes it: strings quoted, the rest as written."""
    if isinstance(value, str | bytes):
        return repr(value)
    if isinstance(value, dt.date | dt.time):
        return value.isoformat()
    return str(value)


def convert(value: object, target: str) -> object:
    """``value`` converted to ``target`` (a ``CAST_TYPES`` key); raises NotConvertible."""
    if value is None:
        return None
    if isinstance(value, float) and math.isnan(value):
        return value if target == "float64" else None
    if isinstance(value, str) and not value.strip():
        return None
    return _CONVERTERS[target](value)


def _to_int64(value: object) -> int:
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, int):
        number = value
    elif isinstance(value, float | Decimal):
        if not math.isfinite(value) or value != int(value):
            raise NotConvertible
        number = int(value)
    elif isinstance(value, str) and _INTEGER.fullmatch(value.strip()):
        number = int(value.strip())
    else:
        raise NotConvertible
    if not _INT64_MIN <= number <= _INT64_MAX:
        raise NotConvertible
    return number


def _to_float64(value: object) -> float:
    if isinstance(value, bool | int | float | Decimal):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value.strip())
        except ValueError:
            raise NotConvertible from None
    raise NotConvertible


def _to_string(value: object) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, int | Decimal):
        return str(value)
    if isinstance(value, dt.date | dt.time):
        return value.isoformat()
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            raise NotConvertible from None
    raise NotConvertible


def _to_bool(value: object) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, int | float | Decimal) and value in (0, 1):
        return bool(value)
    if isinstance(value, str):
        word = value.strip().lower()
        if word in _TRUE:
            return True
        if word in _FALSE:
            return False
    raise NotConvertible


def _to_date(value: object) -> dt.date:
    if isinstance(value, dt.datetime):
        if value.time() != dt.time(0):
            raise NotConvertible
        return value.date()
    if isinstance(value, dt.date):
        return value
    if isinstance(value, str):
        try:
            return dt.date.fromisoformat(value.strip())
        except ValueError:
            raise NotConvertible from None
    raise NotConvertible


def _to_timestamp(value: object) -> dt.datetime:
    if isinstance(value, str):
        try:
            value = dt.datetime.fromisoformat(value.strip())
        except ValueError:
            raise NotConvertible from None
    if isinstance(value, dt.datetime):
        if value.tzinfo is None:
            return value.replace(tzinfo=dt.UTC)
        return value.astimezone(dt.UTC)
    if isinstance(value, dt.date):
        return dt.datetime(value.year, value.month, value.day, tzinfo=dt.UTC)
    raise NotConvertible


_CONVERTERS = {
    "int64": _to_int64,
    "float64": _to_float64,
    "string": _to_string,
    "bool": _to_bool,
    "date": _to_date,
    "timestamp": _to_timestamp,
}


def cast_array(values: pa.Array, target: str) -> tuple[pa.Array, list[int]]:
    """Convert every value; returns the converted array (NULL where a value failed) and the
    positions of the values that did not convert."""
    arrow_type = CAST_TYPES[target]
    if values.type == arrow_type:
        return values, []
    converted: list[object] = []
    failed: list[int] = []
    for position, value in enumerate(values.to_pylist()):
        try:
            converted.append(convert(value, target))
        except NotConvertible:
            converted.append(None)
            failed.append(position)
    return pa.array(converted, type=arrow_type), failed
