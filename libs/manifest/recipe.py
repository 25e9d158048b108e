"""The transformation recipe a manifest declares: an ordered list of typed steps per layer.

The models here only describe and validate the recipe up front (types, parameters,
policies); ``libs.transformations.steps`` implements each step as a pure function of one
chunk. Every row a step removes is *rejected* (kept with a reason), never dropped silently,
so that rows in = rows out + rows rejected holds for every chunk.

Column references are checked here only for what needs no data: the reserved names
(``_row_id``, added by the transform; ``geometry`` and ``bbox``, the output's geometry and
covering columns) can be neither referenced nor produced. Whether a referenced column
exists is checked against a chunk's schema by ``libs.transformations.plan.plan_recipe``.

The model docstrings below become descriptions in the published manifest JSON Schema
(``schemas/manifest.schema.json``): changing one means regenerating that file.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator
from pyproj import CRS
from pyproj.exceptions import CRSError

#: The int64 column the transform adds first: the chunk's ``row_offset`` + the row's position.
ROW_ID = "_row_id"
#: Names a recipe may not produce: the row id, and the output's geometry and covering columns.
RESERVED_COLUMNS = (ROW_ID, "geometry", "bbox")


def _not_row_id(name: str) -> str:
    if name == ROW_ID:
        raise ValueError(f"{ROW_ID!r} is the row id the transform adds; a recipe cannot use it")
    return name


def _not_reserved(name: str) -> str:
    if name in RESERVED_COLUMNS:
        raise ValueError(f"{name!r} is reserved ({', '.join(RESERVED_COLUMNS)}); choose another name")
    return name


def _crs_or_none(value: str | None) -> str | None:
    if value is not None:
        try:
            CRS.from_user_input(value)
        except CRSError as exc:
            raise ValueError(f"{value!r} is not a CRS pyproj knows ({exc}); "
                             "expected e.g. 'EPSG:4326'") from None
    return value


#: A column name produced by the recipe must be a safe SQL identifier.
ColumnName = Annotated[str, Field(pattern=r"^[a-z_][a-z0-9_]{0,62}$"), AfterValidator(_not_reserved)]
#: A column the recipe reads: any existing attribute, but never the row id.
SourceColumn = Annotated[str, AfterValidator(_not_row_id)]


class _Step(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Reproject(_Step):
    """Reproject to the manifest's ``target_crs`` (inserted first when a recipe omits it).
    Coordinates are checked against the source CRS's valid domain before and the target's
    after (see docs/coordinate-domain.md)."""

    step: Literal["reproject"] = "reproject"
    # coordinate domain checks (issue 27)
    policy: Literal["reject", "fail"] = Field(
        default="reject", description="a geometry with a coordinate outside the source or "
        "target CRS's domain (or not finite after reprojection): 'reject' the row or 'fail' "
        "the run")
    clip_to_domain: bool = Field(
        default=False, description="move coordinates outside the source CRS's domain onto its "
        "edge, and clamp them to the target CRS's area of use before projecting (polar data "
        "in Web Mercator), instead of rejecting the row")


class MakeValid(_Step):
    """Invalid geometries: ``repair`` with GEOS make_valid, ``reject`` the row, or ``fail`` the run."""

    step: Literal["make_valid"] = "make_valid"
    policy: Literal["repair", "reject", "fail"] = "repair"


class DropEmpty(_Step):
    """Rows whose geometry is NULL or empty: ``reject`` them or ``fail`` the run."""

    step: Literal["drop_empty"] = "drop_empty"
    policy: Literal["reject", "fail"] = "reject"


class PromoteToMulti(_Step):
    """Point/LineString/Polygon become their Multi* type so a layer has one geometry type."""

    step: Literal["promote_to_multi"] = "promote_to_multi"


class Force2D(_Step):
    """Drop Z and M: every geometry keeps only x and y (both are kept unless a recipe drops them)."""

    step: Literal["force_2d"] = "force_2d"


class Simplify(_Step):
    """Topology-preserving simplification; ``tolerance`` in units of the target CRS."""

    step: Literal["simplify"] = "simplify"
    tolerance: float = Field(gt=0)


class FilterBBox(_Step):
    """Keep rows whose geometry intersects ``bbox`` (minx, miny, maxx, maxy); reject the rest."""

    step: Literal["filter_bbox"] = "filter_bbox"
    bbox: tuple[float, float, float, float]
    crs: Annotated[str | None, AfterValidator(_crs_or_none)] = Field(
        default=None, description="CRS of the bbox; default: target_crs")

    @model_validator(mode="after")
    def _ordered(self) -> FilterBBox:
        minx, miny, maxx, maxy = self.bbox
        if minx > maxx or miny > maxy:
            raise ValueError(f"bbox {list(self.bbox)} must be [minx, miny, maxx, maxy]")
        return self


class FilterAttribute(_Step):
    """Keep rows where ``column <op> value`` holds; reject the rest (NULL never matches
    a comparison)."""

    step: Literal["filter"] = "filter"
    column: SourceColumn
    op: Literal["==", "!=", "<", "<=", ">", ">=", "in", "not_in", "is_null", "not_null"]
    value: str | int | float | bool | list[str | int | float | bool] | None = None

    @model_validator(mode="after")
    def _value_fits_op(self) -> FilterAttribute:
        if self.op in ("is_null", "not_null"):
            if self.value is not None:
                raise ValueError(f"filter {self.op!r} takes no value")
        elif self.op in ("in", "not_in"):
            if not isinstance(self.value, list) or not self.value:
                raise ValueError(f"filter {self.op!r} needs a non-empty list value")
        elif self.value is None or isinstance(self.value, list):
            raise ValueError(f"filter {self.op!r} needs a single value")
        return self


class Derive(_Step):
    """Add a column computed from the geometry, measured in ``crs`` (default: target_crs)."""

    step: Literal["derive"] = "derive"
    column: ColumnName
    kind: Literal["area", "length", "centroid_x", "centroid_y"]
    crs: Annotated[str | None, AfterValidator(_crs_or_none)] = None


class Rename(_Step):
    """Rename columns: ``{"old": "new"}``."""

    step: Literal["rename"] = "rename"
    columns: dict[SourceColumn, ColumnName] = Field(min_length=1)

    @model_validator(mode="after")
    def _distinct_targets(self) -> Rename:
        targets = list(self.columns.values())
        clashing = sorted({t for t in targets if targets.count(t) > 1})
        if clashing:
            raise ValueError(f"rename maps several columns to {clashing}; each new name once")
        return self


class Cast(_Step):
    """Cast columns; a value that does not convert rejects its row."""

    step: Literal["cast"] = "cast"
    columns: dict[SourceColumn, Literal["int64", "float64", "string", "bool", "date", "timestamp"]] = (
        Field(min_length=1))


class NormalizeColumnNames(_Step):
    """Lower-case, replace anything but [a-z0-9_] with '_', prefix a leading digit with '_',
    truncate to 63 bytes, de-duplicate with numeric suffixes."""

    step: Literal["normalize_column_names"] = "normalize_column_names"


class DropDuplicates(_Step):
    """Reject rows that exactly repeat an earlier row of the chunk (attributes and geometry)."""

    step: Literal["drop_duplicates"] = "drop_duplicates"


RecipeStep = Annotated[
    Reproject | MakeValid | DropEmpty | PromoteToMulti | Force2D | Simplify | FilterBBox
    | FilterAttribute | Derive | Rename | Cast | NormalizeColumnNames | DropDuplicates,
    Field(discriminator="step"),
]

#: What a layer gets when the manifest names no recipe for it.
DEFAULT_RECIPE: tuple[RecipeStep, ...] = (Reproject(), MakeValid(policy="repair"))


def bad_geometry_policy(steps: list[RecipeStep] | tuple[RecipeStep, ...]) -> str:
    """What happens to a geometry no step can take (one over the vertex limit): 'fail' when
    the recipe's ``make_valid`` fails the run on bad geometries, else 'reject' (a geometry
    too large to process cannot be repaired)."""
    fails = any(isinstance(s, MakeValid) and s.policy == "fail" for s in steps)
    return "fail" if fails else "reject"


def effective_recipe(steps: list[RecipeStep] | tuple[RecipeStep, ...]) -> list[RecipeStep]:
    """The steps as run: reprojection first when the recipe does not place it itself."""
    steps = list(steps)
    if not any(isinstance(s, Reproject) for s in steps):
        steps.insert(0, Reproject())
    return steps
