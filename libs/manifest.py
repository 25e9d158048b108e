"""The batch manifest: what a data team declares when it lands a batch.

A manifest lives at ``landing-zone/<batch_id>/manifest.json`` (any folder works; the
``batch_id`` inside is what identifies the batch). File paths are relative to the
manifest's folder. The JSON Schema published in ``schemas/manifest.schema.json`` is
generated from these models (``python -m libs.manifest``) and a test keeps it equal.
"""

from __future__ import annotations

import codecs
import json
import posixpath
import sys
from enum import StrEnum
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pyproj import CRS
from pyproj.exceptions import CRSError

from libs.errors import ManifestError
from libs.transformations.recipe import DEFAULT_RECIPE, RecipeStep, effective_recipe

MANIFEST_FILENAME = "manifest.json"

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
    """Where a CSV keeps its geometry: a WKT column, or longitude/latitude (x/y) columns."""

    wkt_column: str | None = Field(default=None, description="column holding WKT geometries")
    x_column: str | None = Field(default=None, description="column holding x (longitude)")
    y_column: str | None = Field(default=None, description="column holding y (latitude)")

    @model_validator(mode="after")
    def _one_way(self) -> CsvGeometry:
        has_xy = self.x_column is not None and self.y_column is not None
        if (self.wkt_column is not None) == has_xy or (
            not has_xy and (self.x_column or self.y_column)
        ):
            raise ValueError("give either wkt_column, or both x_column and y_column")
        return self


class DataFile(_Strict):
    """One landed data file and the layer(s) it feeds."""

    path: str = Field(
        description="path of the file relative to the manifest's folder, e.g. 'points.fgb'"
    )
    layer: Identifier = Field(description="name of the layer (dataset) this file feeds")
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
    csv: CsvGeometry | None = Field(default=None, description="geometry columns of a CSV file")

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


class SpatialJoin(_Strict):
    """A spatial join run in PostGIS: every ``left`` row with aggregates of matching ``right`` rows."""

    name: Identifier = Field(description="name of the result dataset in the lake")
    left: Identifier = Field(description="layer whose rows (and attributes) are kept")
    right: Identifier = Field(description="layer matched against the left rows")
    predicate: Literal["intersects", "contains", "within"] = Field(
        default="intersects",
        description="spatial predicate, read as <left> <predicate> <right>",
    )
    how: Literal["left", "inner"] = Field(
        default="left",
        description="'left' keeps left rows without a match (count 0), 'inner' drops them",
    )
    aggregations: list[Aggregation] = Field(
        default_factory=lambda: [Aggregation(function="count", output="match_count")],
        min_length=1,
        description="aggregates over the matched right rows",
    )


class Manifest(_Strict):
    """A batch: its files, the CRS to work in, and the spatial join to run."""

    manifest_version: Literal[1] = Field(description="version of this manifest format")
    batch_id: BatchId
    target_crs: str = Field(description="CRS every layer is reprojected to, e.g. 'EPSG:3857'")
    files: list[DataFile] = Field(min_length=1, description="the batch's data files")
    join: SpatialJoin = Field(description="the spatial join to run on the loaded layers")
    recipes: dict[str, list[RecipeStep]] = Field(
        default_factory=dict,
        description="transformation recipe per layer name ('*': every layer without its own); "
        "a layer without one gets [reproject, make_valid(repair)]. Reprojection to target_crs "
        "runs first unless the recipe places it",
    )

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
    def layers(self) -> list[str]:
        """Layer names in the order their first file appears."""
        return list(dict.fromkeys(f.layer for f in self.files))


def cross_field_problems(document: object) -> list[str]:
    """Checks that span fields (layers named by the join exist, no duplicates).

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

    def known(name: object) -> bool:
        return name in layers or (isinstance(name, str) and name.startswith(tuple(prefixes)))

    recipes = document.get("recipes") if isinstance(document.get("recipes"), dict) else {}
    for name in recipes:
        if name != "*" and not known(name):
            problems.append(f"recipes.{name}: no file feeds layer {name!r}; "
                            f"expected one of {sorted(layers)} or '*'")
    join = document.get("join")
    if not isinstance(join, dict):
        return problems
    for side in ("left", "right"):
        layer = join.get(side)
        if isinstance(layer, str) and not known(layer):
            problems.append(f"join.{side}: layer {layer!r} is not fed by any file; "
                            f"expected one of {sorted(layers)}")
    if join.get("left") is not None and join.get("left") == join.get("right"):
        problems.append("join: left and right must be different layers")
    if join.get("name") in layers:
        problems.append(f"join.name: {join.get('name')!r} clashes with a layer of the same name")
    aggregations = join.get("aggregations") if isinstance(join.get("aggregations"), list) else []
    outputs = [a.get("output") for a in aggregations if isinstance(a, dict)]
    problems += [f"join.aggregations: output {dup!r} is used more than once"
                 for dup in sorted({o for o in outputs if o is not None and outputs.count(o) > 1})]
    return problems


def _describe(error: dict) -> str:
    location = ".".join(str(part) for part in error["loc"]) or "(manifest)"
    message = error["msg"].removeprefix("Value error, ")
    if error["type"] in ("missing", "extra_forbidden"):
        return f"{location}: {message}"
    received = error.get("input")
    if isinstance(received, dict | list):
        return f"{location}: {message}"
    return f"{location}: {message} (received {received!r})"


def parse_manifest(raw: bytes, manifest_key: str) -> Manifest:
    """Parse and validate a manifest; raise :class:`ManifestError` listing every problem."""
    try:
        document = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ManifestError(manifest_key, [f"not valid UTF-8 JSON: {exc}"]) from None
    try:
        return Manifest.model_validate(document)
    except ValidationError as exc:
        errors = [_describe(e) for e in exc.errors()]
        errors += [p for p in cross_field_problems(document) if not any(p in e for e in errors)]
        raise ManifestError(manifest_key, errors) from None


def batch_folder(manifest_key: str) -> str:
    """The key prefix the manifest's relative paths resolve against ('' at bucket root)."""
    folder = posixpath.dirname(manifest_key)
    return f"{folder}/" if folder else ""


def manifest_json_schema() -> dict:
    """The published JSON Schema of the manifest."""
    schema = Manifest.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["$id"] = "https://spatial-etl.example/schemas/manifest.schema.json"
    return schema


if __name__ == "__main__":
    sys.stdout.write(json.dumps(manifest_json_schema(), indent=2, sort_keys=True) + "\n")
