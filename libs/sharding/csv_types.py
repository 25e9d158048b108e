"""CSV attribute types: inferred from every value of the file, or declared per column.

GDAL reads every CSV attribute as text. The rule applied to each text column of a file
(README, "CSV attribute types"): values are trimmed, an empty value is missing (NULL), and
the column gets the first of these types that *every* non-empty value of the file fits:

* ``int64``: ``-?digits`` without a leading zero (``007`` and ``01234`` stay text: codes and
  postcodes keep their zeros), within int64;
* ``float64``: a decimal number, optionally with an exponent (``1.5``, ``-2``, ``.5``,
  ``1e-3``), no leading zero either; ``nan`` and ``inf`` keep the column text;
* ``bool``: ``true`` or ``false``, any case;
* ``date``: an existing calendar date written ``YYYY-MM-DD``;

else (or when it has no value at all) the column stays text, exactly as read. The whole file
is read once for this before it is sharded (a second GDAL pass over a local copy): a type
taken from a sample could be contradicted by a later row after hours of work.
``csv.column_types`` declares a column's type instead (``string`` keeps it text), and
``csv.infer_types: false`` keeps every undeclared column text.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from libs.errors import InputDataError

#: The types a CSV column can be declared as, and their Arrow types.
CSV_COLUMN_TYPES: dict[str, pa.DataType] = {
    "string": pa.string(), "int64": pa.int64(), "float64": pa.float64(), "bool": pa.bool_(),
    "date": pa.date32(),
}
#: What inference tries, in order, with the pattern a value must match before it is parsed.
_INFERRED = (
    ("int64", r"^-?(0|[1-9][0-9]*)$"),
    ("float64", r"^[-+]?((0|[1-9][0-9]*)(\.[0-9]*)?|\.[0-9]+)([eE][-+]?[0-9]+)?$"),
    ("bool", r"^(?i)(true|false)$"),
    ("date", r"^[0-9]{4}-[0-9]{2}-[0-9]{2}$"),
)


def _present(column: pa.Array) -> pa.Array:
    """The trimmed, non-empty values of a text column."""
    trimmed = pc.utf8_trim_whitespace(column)
    return trimmed.filter(pc.fill_null(pc.greater(pc.utf8_length(trimmed), 0), False))


def _fits(values: pa.Array, type_name: str, pattern: str) -> bool:
    if not pc.all(pc.match_substring_regex(values, pattern)).as_py():
        return False
    try:
        pc.cast(values, CSV_COLUMN_TYPES[type_name])
    except pa.ArrowInvalid:  # out of range, or no such calendar date
        return False
    return True


class CsvTypeInference:
    """Narrows, batch by batch, the types each text column's values all fit."""

    def __init__(self, columns: Iterable[str]):
        self.candidates = {name: [t for t, _ in _INFERRED] for name in columns}
        self.seen = dict.fromkeys(self.candidates, False)

    def add(self, batch: pa.RecordBatch) -> None:
        for name, candidates in self.candidates.items():
            if not candidates:
                continue
            values = _present(batch.column(name))
            if len(values) == 0:
                continue
            self.seen[name] = True
            patterns = dict(_INFERRED)
            candidates[:] = [t for t in candidates if _fits(values, t, patterns[t])]

    def types(self) -> dict[str, str]:
        """Each column's inferred type ('string' when nothing narrower fits every value)."""
        return {name: candidates[0] if candidates and self.seen[name] else "string"
                for name, candidates in self.candidates.items()}


def typed_schema(schema: pa.Schema, types: dict[str, str]) -> pa.Schema:
    """``schema`` with the columns of ``types`` retyped."""
    return pa.schema([pa.field(f.name, CSV_COLUMN_TYPES[types[f.name]]) if f.name in types else f
                      for f in schema])


def convert_batch(batch: pa.RecordBatch, schema: pa.Schema, types: dict[str, str],
                  label: Callable[[int], str]) -> tuple[pa.RecordBatch, dict[int, str]]:
    """``batch`` with its text columns converted to ``types`` (trimmed, empty -> NULL), and
    the rows holding a value that does not convert (only a declared type can meet one), each
    with its reason naming ``label(row)``, the column and the value: they become rejects (the
    value is NULL in the batch), the rest of the batch goes on."""
    arrays, problems = [], {}
    for field, column in zip(batch.schema, batch.columns, strict=True):
        type_name = types.get(field.name, "string")
        if type_name == "string" or not pa.types.is_string(column.type):
            arrays.append(column)
            continue
        trimmed = pc.utf8_trim_whitespace(column)
        empty = pc.fill_null(pc.equal(pc.utf8_length(trimmed), 0), True)
        trimmed = pc.if_else(empty, pa.scalar(None, pa.string()), trimmed)
        try:
            arrays.append(pc.cast(trimmed, CSV_COLUMN_TYPES[type_name]))
            continue
        except pa.ArrowInvalid:
            pass
        bad = _unconvertible(trimmed, type_name)
        for row, value in bad.items():
            problems.setdefault(row, (
                f"{label(row)}, column {field.name!r}: {value[:60]!r} is not a valid "
                f"{type_name} value, the type the manifest declares for it in "
                "csv.column_types; fix the value, or declare the column 'string'"))
        keep = np.ones(len(trimmed), bool)
        keep[list(bad)] = False
        arrays.append(pc.cast(pc.if_else(pa.array(keep), trimmed, pa.scalar(None, pa.string())),
                              CSV_COLUMN_TYPES[type_name]))
    return pa.RecordBatch.from_arrays(arrays, schema=schema), problems


def _unconvertible(values: pa.Array, type_name: str) -> dict[int, str]:
    """Row -> value of each value that does not cast to ``type_name`` (one cast per value:
    only for a column whose cast as a whole failed)."""
    bad = {}
    for row, value in enumerate(values.to_pylist()):
        if value is None:
            continue
        try:
            pc.cast(pa.array([value]), CSV_COLUMN_TYPES[type_name])
        except pa.ArrowInvalid:
            bad[row] = value
    return bad


def column_types_for(declared: dict[str, str], columns: list[str], infer: bool,
                     where: str) -> tuple[dict[str, str], list[str]]:
    """The declared types of the file's ``columns`` and the columns left to infer (none
    without ``infer``); a declared column the file lacks fails, listing its columns."""
    unknown = sorted(set(declared) - set(columns))
    if unknown:
        raise InputDataError(
            f"{where}: csv.column_types names {unknown}, which the file does not have as "
            f"attribute columns; its attribute columns are {columns} (names are exact)")
    return dict(declared), [c for c in columns if c not in declared] if infer else []
