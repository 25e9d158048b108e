"""The batch manifest: what a data team declares when it lands a batch.

A manifest lives at ``landing-zone/<batch_id>/manifest.json`` (any folder works; the
``batch_id`` inside is what identifies the batch). File paths are relative to the
manifest's folder. The JSON Schema published in ``schemas/manifest.schema.json`` is
generated from these models (``python -m libs.manifest``) and a test keeps it equal; parsing
a landed document into them is ``libs.manifest.parse``.
"""

from __future__ import annotations

import codecs
import posixpath
from collections.abc import Callable
from enum import StrEnum
from typing import Annotated, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationInfo,
    ValidatorFunctionWrapHandler,
    field_validator,
    model_validator,
)
from pyproj import CRS
from pyproj.exceptions import CRSError

from libs.manifest.recipe import DEFAULT_RECIPE, RecipeStep, effective_recipe
from libs.manifest.rejects import DEFAULT_MAX_REJECT_FRACTION, SELECTION_STEPS

MANIFEST_FILENAME = "manifest.json"
#: Suffix of the lake dataset that holds a layer's rejected rows (``<layer>_rejects``).
REJECTS_SUFFIX = "_rejects"
#: Lake folders that are not datasets: the completion manifests live under ``_batches/``.
RESERVED_DATASETS = ("_batches",)

#: A name that is safe as an unquoted SQL identifier and as an object-key segment.
Identifier = Annotated[
    str,
    Field(
        pattern=r"^[a-z_][a-z0-9_]{0,62}$",
        description="lower-case letters, digits and underscores, starting with a letter or "
        "underscore, at most 63 characters (a safe SQL identifier)",
    ),
]

BatchId = Annotated[
    str,
    Field(
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$",
        description="letters, digits, '.', '_' and '-', starting with a letter or digit, "
        "at most 128 characters; immutable once a run has been started for it",
    ),
]


class InputFormat(StrEnum):
    """Formats the shard stage reads."""

    GEOJSON = "geojson"
    GEOJSONSEQ = "geojsonseq"
    GPKG = "gpkg"
    FLATGEOBUF = "flatgeobuf"
    SHAPEFILE_ZIP = "shapefile_zip"
    GEOPARQUET = "geoparquet"
    CSV = "csv"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _check_crs(value: str) -> str:
    try:
        CRS.from_user_input(value)
    except CRSError as exc:
        raise ValueError(
            f"{value!r} is not a CRS pyproj understands ({exc}); "
            "expected an authority code such as 'EPSG:4326'"
        ) from None
    return value


class CsvGeometry(_Strict):
    """Where a CSV keeps its geometry (a WKT column, or longitude/latitude (x/y) columns), and
    the types of its attribute columns."""

    wkt_column: str | None = Field(default=None, description="column holding WKT geometries")
    x_column: str | None = Field(default=None, description="column holding x (longitude)")
    y_column: str | None = Field(default=None, description="column holding y (latitude)")
    # issue 27, CSV attribute types (the rule: libs/sharding/csv_types.py, README)
    infer_types: bool = Field(
        default=True, description="type each attribute column from all its values: int64, "
        "float64, bool (true/false), date (YYYY-MM-DD), else text; empty values are NULL. "
        "false: every column not in column_types stays text")
    column_types: dict[str, Literal["string", "int64", "float64", "bool", "date"]] = Field(
        default_factory=dict, description="a type per attribute column, instead of the "
        "inferred one, e.g. {'zip': 'string'}; a value that does not convert fails the run")

    @model_validator(mode="after")
    def _one_way(self) -> CsvGeometry:
        has_xy = self.x_column is not None and self.y_column is not None
        if (self.wkt_column is not None) == has_xy or (
            not has_xy and (self.x_column or self.y_column)
        ):
            raise ValueError("give either wkt_column, or both x_column and y_column")
        geometry = {self.wkt_column, self.x_column, self.y_column} & set(self.column_types)
        if geometry:
            raise ValueError(f"column_types: {sorted(geometry)} hold the geometry, not attributes")
        return self


class DataFile(_Strict):
    """One landed data file and the layer(s) it feeds."""

    path: str = Field(
        description="path of the file relative to the manifest's folder, e.g. 'points.fgb'"
    )
    layer: Identifier = Field(
        description="name of the layer (dataset) this file feeds; not '<other layer>_rejects' "
        "(that is the other layer's rejected rows) nor '_batches'"
    )
    format: InputFormat = Field(description="file format")
    source_crs: str | None = Field(
        default=None,
        description="CRS of the file's coordinates, e.g. 'EPSG:4326'; required when the file "
        "declares none (a Shapefile without .prj, a CSV), checked against it otherwise",
    )
    source_layer: str | None = Field(
        default=None, description="layer inside a multi-layer file (GeoPackage); default: first"
    )
    all_layers: bool = Field(
        default=False,
        description="read every layer of a multi-layer file; each feeds the layer "
        "'<layer>_<normalised source layer name>'",
    )
    encoding: str | None = Field(
        default=None,
        description="attribute text encoding (Shapefile, CSV), e.g. 'cp1252'; default: the "
        "file's own declaration (.cpg), else UTF-8",
    )
    csv: CsvGeometry | None = Field(default=None, description="geometry columns and attribute "
                                    "types of a CSV file")
    # --- issue 27, accepted geometries (mixed families) ---
    geometry_families: Literal["mixed", "split", "one"] = Field(
        default="mixed",
        description="a layer holding points, lines and polygons together: 'mixed' keeps them "
        "in one dataset (a generic geometry column); 'split' feeds the layers "
        "'<layer>_points', '<layer>_lines' and '<layer>_polygons' (each published, empty "
        "when the file has no such geometries; a row without geometry fails the run); 'one' "
        "fails the run naming the first two families found",
    )

    @field_validator("path")
    @classmethod
    def _relative_path(cls, value: str) -> str:
        normalised = posixpath.normpath(value)
        if value.startswith("/") or normalised.startswith("..") or "\\" in value:
            raise ValueError(
                f"{value!r} must be a relative path inside the batch folder "
                "(no leading '/', no '..', no backslashes)"
            )
        if normalised == posixpath.basename(MANIFEST_FILENAME):
            raise ValueError("the manifest itself cannot be a data file")
        return normalised

    @field_validator("source_crs")
    @classmethod
    def _source_crs(cls, value: str | None) -> str | None:
        return None if value is None else _check_crs(value)

    @field_validator("encoding")
    @classmethod
    def _encoding(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                codecs.lookup(value)
            except LookupError:
                raise ValueError(f"{value!r} is not a text encoding Python knows") from None
        return value

    @model_validator(mode="after")
    def _format_options(self) -> DataFile:
        if self.format is InputFormat.CSV and self.csv is None:
            raise ValueError(f"{self.path!r}: a csv file needs 'csv' (wkt_column or x_column/y_column)")
        if self.format is not InputFormat.CSV and self.csv is not None:
            raise ValueError(f"{self.path!r}: 'csv' options apply to format 'csv' only")
        if self.all_layers and self.source_layer is not None:
            raise ValueError(f"{self.path!r}: give source_layer or all_layers, not both")
        return self


class Aggregation(_Strict):
    """One aggregate computed over the right-hand rows matched to each left-hand row."""

    function: Literal["count", "sum", "mean"] = Field(description="aggregate function")
    column: Identifier | None = Field(
        default=None, description="column of the right layer (required for sum and mean)"
    )
    output: Identifier = Field(description="name of the result column")

    @model_validator(mode="after")
    def _column_needed(self) -> Aggregation:
        if self.function != "count" and self.column is None:
            raise ValueError(f"aggregation {self.output!r}: {self.function} needs a 'column'")
        return self


#: Layer name suffixes of a ``geometry_families: split`` file, one per geometry family.
FAMILY_SUFFIXES = ("points", "lines", "polygons")
#: Prefix of a carried right column's output name unless the manifest renames it.
CARRY_PREFIX = "right_"
_MAX_IDENTIFIER = 63
DISTANCE_PREDICATES = ("dwithin", "nearest")
_AGGREGATIONS_OR_CARRY = ("give either 'aggregations' (one row per left row) or 'carry' (one row "
                          "per matched pair), not both")


class CarryColumn(_Strict):
    """A right column carried onto each matched pair under a name of your choice."""

    column: Identifier = Field(description="column of the right layer")
    output: Identifier = Field(description="name of the result column")


def _carry_form(value: object) -> str:
    return "rename" if isinstance(value, dict | CarryColumn) else "name"


#: A carried column: its name (output as ``right_<name>``) or a {column, output} rename.
CarriedColumn = Annotated[
    Annotated[Identifier, Tag("name")] | Annotated[CarryColumn, Tag("rename")],
    Discriminator(_carry_form),
]


class SpatialJoin(_Strict):
    """A spatial join run in PostGIS between the ``left`` and ``right`` layers.

    Two result shapes: with ``aggregations`` (the default, a count) one row per left row
    with aggregates over its matches; with ``carry`` one row per matched (left, right) pair
    carrying the listed right columns (plus the distance for ``dwithin`` and ``nearest``).
    """

    # the published JSON Schema states the requirements that depend on the predicate, too
    model_config = ConfigDict(extra="forbid", frozen=True, json_schema_extra={"allOf": [
        {"if": {"properties": {"predicate": {"const": predicate}}, "required": ["predicate"]},
         "then": {"required": [needed]}}
        for predicate, needed in (("dwithin", "distance"), ("nearest", "k"))
    ]})

    name: Identifier = Field(
        description="name of the result dataset in the lake; must differ from every layer, "
        "every '<layer>_rejects' and '_batches'"
    )
    left: Identifier = Field(description="layer whose rows (and attributes) are kept")
    right: Identifier = Field(description="layer matched against the left rows")
    predicate: Literal["intersects", "contains", "within", "dwithin", "nearest"] = Field(
        default="intersects",
        description="how a right row matches a left row, read as <left> <predicate> <right>: "
        "'intersects', 'contains', 'within'; 'dwithin': at most 'distance' metres apart; "
        "'nearest': among the 'k' right rows nearest to the left row (ties broken by the right "
        "row's load order), optionally at most 'max_distance' metres away. Distances are "
        "geodesic (on the CRS's ellipsoid) when target_crs is geographic, else planar in the "
        "projected target_crs, whose unit must be the metre",
    )
    distance: float | None = Field(
        default=None, gt=0, allow_inf_nan=False, validate_default=True,
        description="predicate 'dwithin' only (required there): the distance in metres",
    )
    k: int | None = Field(
        default=None, ge=1, validate_default=True,
        description="predicate 'nearest' only (required there): how many nearest right rows",
    )
    max_distance: float | None = Field(
        default=None, gt=0, allow_inf_nan=False,
        description="predicate 'nearest' only (optional): ignore right rows farther than this "
        "many metres",
    )
    how: Literal["left", "inner"] = Field(
        default="left",
        description="'left' keeps left rows without a match (count 0, or NULL carried "
        "columns), 'inner' drops them",
    )
    carry: list[CarriedColumn] | None = Field(
        default=None,
        description="give instead of aggregations for one row per matched (left, right) pair "
        f"carrying these right columns: a name 'c' is output as '{CARRY_PREFIX}c', "
        "{'column': 'c', 'output': 'o'} renames it. dwithin and nearest joins add the pair's "
        "distance in metres as 'distance_column'",
    )
    aggregations: list[Aggregation] = Field(
        default_factory=lambda: [Aggregation(function="count", output="match_count")],
        description="aggregates over the matched right rows, one result row per left row; "
        "default (when carry is not given) a count named 'match_count'",
    )
    # issue 27, wide tables: a wide left layer is loaded into PostGIS with these columns only
    left_columns: list[str] | None = Field(
        default=None, min_length=1,
        description="the left layer's attribute columns the result keeps (and the only ones "
        "loaded into PostGIS for this join); default: all of them. Needed when the left layer "
        "has more columns than a PostgreSQL table holds (1,600); the layer's own lake dataset "
        "keeps every column either way. The right layer is always loaded with just the "
        "columns the join aggregates or carries",
    )
    distance_column: Identifier = Field(
        default="distance",
        description="carry joins with predicate 'dwithin' or 'nearest': name of the column "
        "holding each pair's distance in metres",
    )

    @model_validator(mode="before")
    @classmethod
    def _no_default_count_when_carrying(cls, data: object) -> object:
        if isinstance(data, dict) and data.get("carry") is not None and "aggregations" not in data:
            return {**data, "aggregations": []}
        return data

    @field_validator("distance")
    @classmethod
    def _distance(cls, value: float | None, info: ValidationInfo) -> float | None:
        predicate = info.data.get("predicate")
        if predicate == "dwithin" and value is None:
            raise ValueError("predicate 'dwithin' needs 'distance' (metres, > 0)")
        if predicate is not None and predicate != "dwithin" and value is not None:
            hint = "; limit a nearest join with 'max_distance'" if predicate == "nearest" else ""
            raise ValueError(f"'distance' applies to predicate 'dwithin' only, not {predicate!r}{hint}")
        return value

    @field_validator("k")
    @classmethod
    def _k(cls, value: int | None, info: ValidationInfo) -> int | None:
        predicate = info.data.get("predicate")
        if predicate == "nearest" and value is None:
            raise ValueError("predicate 'nearest' needs 'k' (how many nearest right rows, >= 1)")
        if predicate is not None and predicate != "nearest" and value is not None:
            raise ValueError(f"'k' applies to predicate 'nearest' only, not {predicate!r}")
        return value

    @field_validator("max_distance")
    @classmethod
    def _max_distance(cls, value: float | None, info: ValidationInfo) -> float | None:
        predicate = info.data.get("predicate")
        if predicate is not None and predicate != "nearest" and value is not None:
            raise ValueError(f"'max_distance' applies to predicate 'nearest' only, not {predicate!r}")
        return value

    @field_validator("carry")
    @classmethod
    def _carry(cls, value: list[str | CarryColumn] | None) -> list[str | CarryColumn] | None:
        if value is None:
            return value
        problems = []
        outputs = []
        for item in value:
            column, output = _carried(item)
            if len(output) > _MAX_IDENTIFIER:
                problems.append(f"output {output!r} of column {column!r} is longer than "
                                f"{_MAX_IDENTIFIER} characters; rename it with "
                                f"{{'column': {column!r}, 'output': '<shorter name>'}}")
            outputs.append(output)
        problems += [f"output {dup!r} is used more than once"
                     for dup in sorted({o for o in outputs if outputs.count(o) > 1})]
        if problems:
            raise ValueError("; ".join(problems))
        return value

    @field_validator("aggregations")
    @classmethod
    def _aggregations(cls, value: list[Aggregation], info: ValidationInfo) -> list[Aggregation]:
        if "carry" not in info.data:  # carry itself is invalid: reported there
            return value
        if info.data["carry"] is not None and value:
            raise ValueError(_AGGREGATIONS_OR_CARRY)
        if info.data["carry"] is None and not value:
            raise ValueError("needs at least one aggregation, or give 'carry' instead")
        return value

    @field_validator("distance_column")
    @classmethod
    def _distance_column(cls, value: str, info: ValidationInfo) -> str:
        outputs = [_carried(item)[1] for item in info.data.get("carry") or []]
        if value in outputs:
            raise ValueError(f"{value!r} is also the output of a carried column; choose another name")
        return value

    def carried_columns(self) -> list[tuple[str, str]]:
        """(right column, output name) of every carried column; empty for an aggregating join."""
        return [_carried(item) for item in self.carry or []]

    @property
    def measures_distance(self) -> bool:
        """True for the predicates whose distances are metres (dwithin, nearest)."""
        return self.predicate in DISTANCE_PREDICATES


def _carried(item: str | CarryColumn) -> tuple[str, str]:
    if isinstance(item, CarryColumn):
        return item.column, item.output
    return item, CARRY_PREFIX + item


def distance_unit_problem(crs: CRS) -> str | None:
    """Why distances in metres cannot be measured in ``crs`` (None when they can).

    A geographic CRS is measured on its ellipsoid (PostGIS geography); a projected one
    planar, so its axes must be in metres.
    """
    if crs.is_geographic:
        return None
    if crs.is_projected:
        units = {(axis.unit_name, axis.unit_conversion_factor) for axis in crs.axis_info[:2]}
        if units == {("metre", 1.0)}:
            return None
        names = ", ".join(sorted(name for name, _ in units))
        return (f"({crs.name}) is projected in {names}, not metres; choose a target_crs "
                "projected in metres (e.g. a UTM zone) or a geographic one (e.g. 'EPSG:4326', "
                "distances on the ellipsoid)")
    return (f"({crs.name}) is a {crs.type_name}, in which distances in metres are not "
            "defined; choose a target_crs projected in metres or a geographic one")


class Manifest(_Strict):
    """A batch: its files, the CRS to work in, and the spatial joins (if any) to run."""

    manifest_version: Literal[1] = Field(description="version of this manifest format")
    batch_id: BatchId
    target_crs: str = Field(description="CRS every layer is reprojected to, e.g. 'EPSG:3857'")
    files: list[DataFile] = Field(min_length=1, description="the batch's data files")
    # issue 27, optional and several joins: 'join' (one join) is the original form and stays
    # valid; 'joins' lists any number; spatial_joins is what the pipeline runs
    # typed without None (None is only the default): a union would report every field error
    # of a given join twice, once per branch, and the schema keeps 'join' an object
    join: SpatialJoin = Field(  # type: ignore[assignment]
        default=None, description="one spatial join (the original form, same as 'joins': "
        "[it]); give 'join' or 'joins', not both")
    joins: list[SpatialJoin] = Field(
        default_factory=list, description="the spatial joins to run on the loaded layers, each "
        "published as its own dataset named by its 'name'; none (and no 'join'): the layers are "
        "only ingested, without PostGIS")
    recipes: dict[str, list[RecipeStep]] = Field(
        default_factory=dict,
        description="transformation recipe per layer name ('*': every layer without its own); "
        "a layer without one gets [reproject, make_valid(repair)]. Reprojection to target_crs "
        "runs first unless the recipe places it",
    )

    # --- issue 27, row-level rejects: how much of a layer may be rejected as bad data ---
    max_reject_fraction: dict[str, Annotated[float, Field(ge=0, le=1)]] = Field(
        default_factory=dict,
        description="per layer name ('*': every layer without its own), the largest fraction "
        f"(0-1) of its rows that may be rejected as bad data before the run fails and nothing "
        f"is published; default {DEFAULT_MAX_REJECT_FRACTION}. Rows a recipe selects away "
        f"({', '.join(SELECTION_STEPS)}) do not count",
    )

    def max_reject_fraction_for(self, layer: str) -> float:
        """The reject fraction ``layer`` may reach (``max_reject_fraction``)."""
        limits = self.max_reject_fraction
        return limits.get(layer, limits.get("*", DEFAULT_MAX_REJECT_FRACTION))
    # --- end issue 27 ---

    @field_validator("join", mode="wrap")
    @classmethod
    def _no_join(cls, value: object, handler: ValidatorFunctionWrapHandler) -> SpatialJoin | None:
        # a stored plan or ledger record of a batch without 'join' holds null: read it back
        return None if value is None else handler(value)

    def recipe_for(self, layer: str) -> list[RecipeStep]:
        """The effective recipe of ``layer``."""
        steps = self.recipes.get(layer, self.recipes.get("*", list(DEFAULT_RECIPE)))
        return effective_recipe(steps)

    @field_validator("target_crs")
    @classmethod
    def _target_crs(cls, value: str) -> str:
        return _check_crs(value)

    @model_validator(mode="after")
    def _consistent(self) -> Manifest:
        problems = cross_field_problems(self.model_dump(mode="json"))
        if problems:
            raise ValueError("; ".join(problems))
        return self

    @property
    def spatial_joins(self) -> list[SpatialJoin]:
        """Every join the batch declares, in order (``join`` or ``joins``; possibly none)."""
        return [self.join] if self.join is not None else list(self.joins)

    @property
    def layers(self) -> list[str]:
        """Layer names in the order their first file appears; a ``geometry_families: split``
        layer as its family layers (``all_layers`` files: their declared prefix)."""
        return list(dict.fromkeys(
            name for f in self.files
            for name in ([f"{f.layer}_{s}" for s in FAMILY_SUFFIXES]
                         if f.geometry_families == "split" and not f.all_layers else [f.layer])))


def cross_field_problems(document: object) -> list[str]:
    """Checks that span fields (layers named by the join exist, no duplicates, a distance join
    in a CRS that measures metres).

    Works on the raw document too, so that a manifest with field errors still gets these
    problems listed alongside them.
    """
    if not isinstance(document, dict):
        return []
    files = document.get("files") if isinstance(document.get("files"), list) else []
    files = [f for f in files if isinstance(f, dict)]
    paths = [f.get("path") for f in files if isinstance(f.get("path"), str)]
    layers = list(dict.fromkeys(f.get("layer") for f in files if isinstance(f.get("layer"), str)))
    problems = [f"files: {dup!r} is listed more than once"
                for dup in sorted({p for p in paths if paths.count(p) > 1})]
    prefixes = [f"{f.get('layer')}_" for f in files if f.get("all_layers") is True]
    layers, split_problems = _split_family_layers(files, layers)
    problems += split_problems

    def known(name: object) -> bool:
        return name in layers or (isinstance(name, str) and name.startswith(tuple(prefixes)))

    recipes = document.get("recipes") if isinstance(document.get("recipes"), dict) else {}
    for name in recipes:
        if name != "*" and not known(name):
            problems.append(f"recipes.{name}: no file feeds layer {name!r}; "
                            f"expected one of {sorted(layers)} or '*'")
    limits = document.get("max_reject_fraction")  # issue 27: keys name layers, like recipes
    for name in limits if isinstance(limits, dict) else {}:
        if name != "*" and not known(name):
            problems.append(f"max_reject_fraction.{name}: no file feeds layer {name!r}; "
                            f"expected one of {sorted(layers)} or '*'")
    declared = _declared_joins(document)
    if "join" in document and document.get("join") is not None and document.get("joins"):
        problems.append("join, joins: give 'join' (one join) or 'joins' (a list), not both")
    names = [join.get("name") for _, join in declared]
    problems += dataset_name_problems(layers, [(f"{where}.name", join["name"])
                                               for where, join in declared
                                               if isinstance(join.get("name"), str)])
    problems += [f"joins: name {dup!r} is used by more than one join; each join is a dataset "
                 "of its own, name them apart"
                 for dup in sorted({n for n in names if isinstance(n, str) and names.count(n) > 1})]
    for where, join in declared:
        problems += _join_problems(where, join, layers, known, document.get("target_crs"))
    return problems


def _declared_joins(document: dict) -> list[tuple[str, dict]]:
    """(where, join) of each join of a raw document: 'join', or 'joins[i]'."""
    joins = document.get("joins") if isinstance(document.get("joins"), list) else []
    declared = [(f"joins[{i}]", join) for i, join in enumerate(joins) if isinstance(join, dict)]
    if isinstance(document.get("join"), dict):
        declared.insert(0, ("join", document["join"]))
    return declared


def _join_problems(where: str, join: dict, layers: list[str], known: Callable[[object], bool],
                   target_crs: object) -> list[str]:
    problems = []
    for side in ("left", "right"):
        layer = join.get(side)
        if isinstance(layer, str) and not known(layer):
            problems.append(f"{where}.{side}: layer {layer!r} is not fed by any file; "
                            f"expected one of {sorted(layers)}")
    if join.get("left") is not None and join.get("left") == join.get("right"):
        problems.append(f"{where}: left and right must be different layers")
    if join.get("name") in layers:
        problems.append(f"{where}.name: {join.get('name')!r} clashes with a layer of the same name")
    aggregations = join.get("aggregations") if isinstance(join.get("aggregations"), list) else []
    outputs = [a.get("output") for a in aggregations if isinstance(a, dict)]
    problems += [f"{where}.aggregations: output {dup!r} is used more than once"
                 for dup in sorted({o for o in outputs if o is not None and outputs.count(o) > 1})]
    if join.get("carry") is not None and aggregations:  # also when carry has field errors
        problems.append(f"{where}.aggregations: {_AGGREGATIONS_OR_CARRY}")
    predicate = join.get("predicate")
    if predicate in DISTANCE_PREDICATES and isinstance(target_crs, str):
        try:
            problem = distance_unit_problem(CRS.from_user_input(target_crs))
        except CRSError:
            problem = None  # reported on target_crs itself
        if problem:
            problems.append(f"{where}.predicate: {predicate!r} measures distances in metres, but "
                            f"target_crs {target_crs!r} {problem}")
    return problems


def _split_family_layers(files: list[dict], layers: list[str]) -> tuple[list[str], list[str]]:
    """The layer names once each ``geometry_families: split`` layer becomes its three family
    layers, and the problems that makes (a name too long, or one declared already; files of
    one layer that disagree on the option)."""
    split = list(dict.fromkeys(f.get("layer") for f in files if isinstance(f.get("layer"), str)
                               and f.get("geometry_families") == "split"
                               and f.get("all_layers") is not True))
    expanded = [f"{name}_{suffix}" for name in split for suffix in FAMILY_SUFFIXES]
    problems = [f"files: layer {name!r} (geometry_families 'split') is longer than 63 "
                "characters, PostgreSQL's limit; shorten the layer name" if len(name) > 63
                else f"files: layer {name!r} is declared, and is also one that "
                "geometry_families 'split' makes; rename one of them"
                for name in expanded if len(name) > 63 or name in layers]
    for layer in layers:
        modes = {str(f.get("geometry_families", "mixed")) for f in files if f.get("layer") == layer}
        if len(modes) > 1:
            problems.append(f"files: the files of layer {layer!r} differ in geometry_families "
                            f"({sorted(modes)}); give them all one value")
    return [name for name in layers if name not in split] + expanded, problems


def dataset_name_problems(layers: list[str], join_names: list[tuple[str, str]]) -> list[str]:
    """Names that would make two lake datasets of the batch one: each layer, each layer's
    rejects (``<layer>_rejects``) and each join result (``join_names``: where it is declared,
    e.g. 'joins[1].name', and its name) is a folder of its own in the lake, so a layer or join
    named like another layer's rejects would overwrite them on publish."""
    rejects_of = {layer + REJECTS_SUFFIX: layer for layer in layers}
    problems = [
        f"files: layer {layer!r} clashes with the lake dataset of the rejected rows of layer "
        f"{rejects_of[layer]!r}; rename layer {layer!r}"
        for layer in layers if layer in rejects_of
    ]
    problems += [
        f"{where}: {name!r} clashes with the lake dataset of the rejected rows of layer "
        f"{rejects_of[name]!r}; choose another join name"
        for where, name in join_names if name in rejects_of]
    problems += [
        f"{where}: {name!r} is reserved in the lake (its completion manifests live under "
        f"{name}/); choose another name"
        for where, name in [*(("files", layer) for layer in layers), *join_names]
        if name in RESERVED_DATASETS
    ]
    return problems
