"""Column agreement across a layer's files: one schema they all fit in (numbers widen), or an
error naming every difference."""

from __future__ import annotations

import pyarrow as pa

from libs.errors import InputDataError


def _promoted(a: pa.DataType, b: pa.DataType) -> pa.DataType | None:
    if a == b or pa.types.is_null(b):
        return a
    if pa.types.is_null(a):
        return b
    if pa.types.is_integer(a) and pa.types.is_integer(b):
        return pa.int64()
    if (pa.types.is_integer(a) or pa.types.is_floating(a)) and (
            pa.types.is_integer(b) or pa.types.is_floating(b)):
        return pa.float64()
    return None


def unify_schemas(current: pa.Schema, current_name: str, new: pa.Schema, new_name: str,
           layer: str) -> pa.Schema:
    """The schema both files fit in (numbers widen), or an error naming the differences."""
    problems = []
    only_current = [n for n in current.names if n not in new.names]
    only_new = [n for n in new.names if n not in current.names]
    if only_current:
        problems.append(f"only in {current_name!r}: {only_current}")
    if only_new:
        problems.append(f"only in {new_name!r}: {only_new}")
    fields = []
    for item in current:
        if item.name not in new.names:
            continue
        other = new.field(item.name).type
        merged = _promoted(item.type, other)
        if merged is None:
            problems.append(f"column {item.name!r} is {item.type} in {current_name!r} but "
                            f"{other} in {new_name!r}")
        else:
            fields.append(pa.field(item.name, merged))
    if problems:
        raise InputDataError(
            f"layer {layer!r}: files {current_name!r} and {new_name!r} have different columns ("
            + "; ".join(problems) + "); expected the same columns and types in every file of a "
            "layer — align the files or feed them to different layers"
        )
    return pa.schema(fields)


def conform_batch(batch: pa.RecordBatch, schema: pa.Schema) -> pa.RecordBatch:
    """``batch`` cast to ``schema`` (from :func:`unify_schemas`), itself when it already fits."""
    if batch.schema.equals(schema):
        return batch
    arrays = [batch.column(item.name).cast(item.type) for item in schema]
    return pa.RecordBatch.from_arrays(arrays, schema=schema)
