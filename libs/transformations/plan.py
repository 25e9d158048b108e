"""Check a recipe against a chunk's schema before any data moves.

``plan_recipe`` walks the steps over the attribute schema the way the transform will
(rename, cast, derive and normalize change it; the other steps only remove rows or change
geometries) and raises TransformError at the first step that cannot run, naming the step
(its index in the effective recipe and its kind), the column, and the columns available
at that point. The schema it returns is the output's: ``_row_id`` first, the attributes,
then the ``geometry`` column (WKB); the GeoParquet covering column ``bbox`` the writer adds
is left out.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

import pyarrow as pa
from pyproj import CRS
from pyproj.exceptions import CRSError

from libs.errors import TransformError
from libs.geoparquet import GEOMETRY
from libs.manifest.recipe import (
    RESERVED_COLUMNS,
    ROW_ID,
    Cast,
    Derive,
    FilterAttribute,
    FilterBBox,
    NormalizeColumnNames,
    RecipeStep,
    Rename,
    Reproject,
    Simplify,
    effective_recipe,
)
from libs.transformations import predicates
from libs.transformations.casting import CAST_TYPES, castable
from libs.transformations.naming import normalized_names


def parse_crs(value: str, what: str) -> CRS:
    """``value`` as a pyproj CRS; TransformError naming ``what`` when pyproj does not know it."""
    try:
        return CRS.from_user_input(value)
    except CRSError as exc:
        raise TransformError(f"{what}: {value!r} is not a CRS pyproj knows ({exc}); "
                             "expected e.g. 'EPSG:3857'") from None


def measuring_crs_problem(kind: str, crs: CRS) -> str | None:
    """Why ``crs`` cannot measure ``kind``; None when it can."""
    if kind in ("area", "length") and crs.is_geographic:
        unit = "square degrees" if kind == "area" else "degrees"
        return (f"{kind} measured in the geographic CRS {crs.name!r} would be in {unit}; "
                "set the step's 'crs' to a projected CRS (an equal-area one such as "
                "'EPSG:6933' for areas)")
    return None


def _attribute_fields(schema: pa.Schema) -> list[pa.Field]:
    """The schema's attribute fields: without the geometry and the GeoParquet covering column."""
    skip = {GEOMETRY}
    raw_geo = (schema.metadata or {}).get(b"geo")
    if raw_geo is not None:
        geo = json.loads(raw_geo)
        primary = geo.get("primary_column", GEOMETRY)
        skip.add(primary)
        covering = geo.get("columns", {}).get(primary, {}).get("covering", {}).get("bbox", {})
        skip.update(path[0] for path in covering.values())
    elif "bbox" in schema.names and pa.types.is_struct(schema.field("bbox").type):
        skip.add("bbox")
    return [f for f in schema if f.name not in skip and not _is_geoarrow(f)]


def _is_geoarrow(field: pa.Field) -> bool:
    """A geometry field as GDAL/pyogrio and geoarrow mark it (whatever its name)."""
    extension = (field.metadata or {}).get(b"ARROW:extension:name", b"")
    return extension.startswith(b"geoarrow.")


def _problem(label: str, columns: dict[str, pa.DataType], problem: str) -> TransformError:
    return TransformError(f"{label}: {problem}; available columns: {list(columns)}")


def _need(label: str, columns: dict[str, pa.DataType], column: str) -> pa.DataType:
    if column not in columns:
        hint = " (the geometry is not an attribute)" if column == GEOMETRY else ""
        raise _problem(label, columns, f"column {column!r} does not exist{hint}")
    return columns[column]


def plan_recipe(steps: Sequence[RecipeStep], schema: pa.Schema, target_crs: str) -> pa.Schema:
    """Simulate the recipe's column changes on ``schema``; returns the output schema or raises
    TransformError.

    ``schema``: a sharded chunk's Arrow schema (``pyarrow.parquet.read_schema``), or any
    Arrow schema of the layer's attributes. Its geometry column (``geometry``, the GeoParquet
    primary column, or any field marked ``geoarrow.*``) and the covering ``bbox`` are not
    attributes.

    ``steps`` run as ``effective_recipe(steps)`` (reprojection first unless placed), and step
    indices in messages count in that list: the list ``Manifest.recipe_for`` returns.
    """
    parse_crs(target_crs, "target_crs")
    columns: dict[str, pa.DataType] = {f.name: f.type for f in _attribute_fields(schema)}
    if ROW_ID in columns:
        raise TransformError(
            f"the layer has a column named {ROW_ID!r}, which the transform adds itself; "
            "rename or drop it in the source file")
    reprojected = False
    for index, step in enumerate(effective_recipe(steps)):
        label = f"recipe step {index} ({step.step})"
        if isinstance(step, Reproject):
            reprojected = True
        elif isinstance(step, Simplify) and not reprojected:
            raise _problem(label, columns, "simplify's tolerance is in target_crs units but the "
                           "step runs before reproject; place reproject before simplify")
        elif isinstance(step, FilterBBox):
            if step.crs is not None:
                parse_crs(step.crs, f"{label}: crs")
        elif isinstance(step, FilterAttribute):
            problem = predicates.value_problem(step, _need(label, columns, step.column))
            if problem:
                raise _problem(label, columns, f"{predicates.describe(step)}: {problem}")
        elif isinstance(step, Derive):
            if step.column in columns:
                raise _problem(label, columns, f"derived column {step.column!r} already exists; "
                               "choose another name or rename the existing column first")
            problem = measuring_crs_problem(
                step.kind, parse_crs(step.crs or target_crs, f"{label}: crs"))
            if problem:
                raise _problem(label, columns, problem)
            columns[step.column] = pa.float64()
        elif isinstance(step, Rename):
            for old in step.columns:
                _need(label, columns, old)
            kept = [c for c in columns if c not in step.columns]
            for old, new in step.columns.items():
                if new in kept:
                    raise _problem(label, columns, f"renaming {old!r} to {new!r} clashes with the "
                                   f"existing column {new!r}; rename or drop that one too")
            columns = {step.columns.get(c, c): t for c, t in columns.items()}
        elif isinstance(step, Cast):
            for column, target in step.columns.items():
                source = _need(label, columns, column)
                if not castable(source):
                    raise _problem(label, columns, f"column {column!r} is {source}, which cannot "
                                   f"be cast to {target}")
                columns[column] = CAST_TYPES[target]
        elif isinstance(step, NormalizeColumnNames):
            columns = dict(zip(normalized_names(list(columns)), columns.values(), strict=True))
    clashing = [c for c in columns if c in RESERVED_COLUMNS]
    if clashing:  # only from the source: recipe steps cannot produce reserved names
        raise TransformError(
            f"the output would have attribute columns named {clashing}, which are reserved "
            f"({', '.join(RESERVED_COLUMNS)}); add a rename or normalize_column_names step")
    return pa.schema(
        [pa.field(ROW_ID, pa.int64())]
        + [pa.field(name, arrow_type) for name, arrow_type in columns.items()]
        + [pa.field(GEOMETRY, pa.binary())]
    )
