"""The attribute predicate of the ``filter`` step: which values a column type accepts, and
how a predicate is evaluated on a column.

NULL never matches a comparison (nor ``in``/``not_in``): ``x != 5`` and ``x not_in [5]``
are false for a NULL ``x``. A float NaN counts as NULL. Which values fit which column:

- numeric columns: numbers (not booleans);
- string columns: strings;
- boolean columns: booleans, with ``==``, ``!=``, ``in``, ``not_in`` only;
- date and timestamp columns: ISO 8601 strings (a timestamp without an offset compared
  with a zoned column is taken as UTC);
- any column: ``is_null`` and ``not_null``.
"""

from __future__ import annotations

import datetime as dt

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from libs.manifest.recipe import FilterAttribute

_COMPARE = {
    "==": pc.equal,
    "!=": pc.not_equal,
    "<": pc.less,
    "<=": pc.less_equal,
    ">": pc.greater,
    ">=": pc.greater_equal,
}


def describe(step: FilterAttribute) -> str:
    """The predicate as a reason quotes it: ``population >= 1000``, ``kind in ['a', 'b']``."""
    if step.op == "is_null":
        return f"{step.column} IS NULL"
    if step.op == "not_null":
        return f"{step.column} IS NOT NULL"
    op = {"in": "in", "not_in": "not in"}.get(step.op, step.op)
    return f"{step.column} {op} {step.value!r}"


def _value_type(column_type: pa.DataType) -> pa.DataType:
    return column_type.value_type if pa.types.is_dictionary(column_type) else column_type


def _is_numeric(t: pa.DataType) -> bool:
    return pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_decimal(t)


def _is_text(t: pa.DataType) -> bool:
    return pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t)


def _to_column_scalar(value: object, column_type: pa.DataType) -> pa.Scalar:
    """One filter value as a scalar comparable with the column; raises ValueError/TypeError."""
    t = _value_type(column_type)
    if _is_numeric(t):
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise TypeError(f"a number, not {value!r}")
        try:
            return pa.scalar(value)
        except OverflowError:
            raise ValueError(f"a number within int64, not {value!r}") from None
    if _is_text(t):
        if not isinstance(value, str):
            raise TypeError(f"a string, not {value!r}")
        return pa.scalar(value, pa.string())
    if pa.types.is_boolean(t):
        if not isinstance(value, bool):
            raise TypeError(f"true or false, not {value!r}")
        return pa.scalar(value)
    if pa.types.is_date(t):
        if not isinstance(value, str):
            raise TypeError(f"an ISO 8601 date string, not {value!r}")
        try:
            return pa.scalar(dt.date.fromisoformat(value), t)
        except ValueError:
            raise ValueError(f"an ISO 8601 date string such as '2020-01-31', not {value!r}") from None
    if pa.types.is_timestamp(t):
        if not isinstance(value, str):
            raise TypeError(f"an ISO 8601 timestamp string, not {value!r}")
        try:
            moment = dt.datetime.fromisoformat(value)
        except ValueError:
            raise ValueError(f"an ISO 8601 timestamp such as '2020-01-31T12:00:00Z', not {value!r}") \
                from None
        if t.tz is not None and moment.tzinfo is None:
            moment = moment.replace(tzinfo=dt.UTC)
        elif t.tz is None and moment.tzinfo is not None:
            moment = moment.astimezone(dt.UTC).replace(tzinfo=None)
        return pa.scalar(moment, t)
    raise TypeError(f"no comparison on a {column_type} column; only is_null/not_null")


def value_problem(step: FilterAttribute, column_type: pa.DataType) -> str | None:
    """Why the step's value does not fit a column of ``column_type``; None when it fits."""
    if step.op in ("is_null", "not_null") or pa.types.is_null(column_type):
        return None
    if pa.types.is_boolean(_value_type(column_type)) and step.op in _COMPARE \
            and step.op not in ("==", "!="):
        return f"a bool column takes ==, !=, in, not_in; not {step.op!r}"
    values = step.value if isinstance(step.value, list) else [step.value]
    for value in values:
        try:
            _to_column_scalar(value, column_type)
        except (TypeError, ValueError) as exc:
            return f"column {step.column!r} is {column_type}: expected {exc}"
    return None


def evaluate(step: FilterAttribute, column: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """Boolean mask of the rows where the predicate holds (NULL never matches a comparison).

    Call ``value_problem`` first: a value that does not fit the column raises here.
    """
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    if pa.types.is_dictionary(column.type):
        column = column.dictionary_decode()
    if pa.types.is_string_view(column.type):  # no comparison kernels for views yet
        column = column.cast(pa.large_string())
    null = pc.is_null(column, nan_is_null=True)
    if step.op == "is_null":
        holds = null
    elif step.op == "not_null":
        holds = pc.invert(null)
    elif pa.types.is_null(column.type):
        holds = pa.repeat(False, len(column))
    elif step.op in ("in", "not_in"):
        scalars = [_to_column_scalar(v, column.type) for v in step.value]
        value_set = pa.array([s.as_py() for s in scalars],
                             type=None if _is_numeric(column.type) else scalars[0].type)
        found = pc.is_in(column, value_set=value_set, skip_nulls=True)
        holds = found if step.op == "in" else pc.invert(found)
        holds = pc.and_(holds, pc.invert(null))
    else:
        compared = _COMPARE[step.op](column, _to_column_scalar(step.value, column.type))
        holds = pc.and_(pc.fill_null(compared, False), pc.invert(null))
    return np.asarray(holds.to_numpy(zero_copy_only=False), dtype=bool)
