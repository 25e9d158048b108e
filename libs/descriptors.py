"""The small descriptions the stages hand each other: where chunks are, how many rows, what area.

Ops pass these between each other (through the IO manager) and to Ray tasks; the data
itself stays in object storage under the run's staging prefix (``libs.lake.keys`` names it).
"""

from __future__ import annotations

from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict, Field

BBox = tuple[float, float, float, float]


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SourceFile(_Frozen):
    """A landed file as it was read: key, checksum, size."""

    bucket: str
    key: str
    sha256: str
    size: int
    layer: str
    rows: int


class Chunk(_Frozen):
    """One GeoParquet chunk in the staging bucket."""

    key: str
    layer: str
    ordinal: int = Field(description="position of the chunk within its layer")
    row_offset: int = Field(description="rows of the layer before this chunk")
    rows: int
    bbox: BBox | None = Field(description="minx, miny, maxx, maxy; None when every row is empty")
    crs: str = Field(description="CRS of the chunk's coordinates (authority code or WKT)")
    bytes: int
    sha256: str
    source_rows: int | None = Field(
        default=None,
        description="for a transformed chunk: rows of the sharded chunk it came from, i.e. its "
        "_row_id span [row_offset, row_offset + source_rows)",
    )

    @property
    def id_span(self) -> tuple[int, int]:
        """The [start, end) range of ``_row_id`` values this chunk owns."""
        return self.row_offset, self.row_offset + (self.source_rows if self.source_rows is not None
                                                   else self.rows)


class LayerChunks(_Frozen):
    """All chunks of one layer."""

    layer: str
    crs: str
    chunks: list[Chunk]

    @property
    def rows(self) -> int:
        return sum(c.rows for c in self.chunks)

    @property
    def bbox(self) -> BBox | None:
        boxes = [c.bbox for c in self.chunks if c.bbox is not None]
        if not boxes:
            return None
        return (
            min(b[0] for b in boxes),
            min(b[1] for b in boxes),
            max(b[2] for b in boxes),
            max(b[3] for b in boxes),
        )


class ChunkIndex(_Frozen):
    """What shard (and then transform) produced for a batch."""

    batch_id: str
    staging_bucket: str
    prefix: str = Field(description="run-scoped staging prefix the chunks live under")
    layers: list[LayerChunks]
    sources: list[SourceFile]
    rejects: list[LayerChunks] = Field(
        default_factory=list, description="rejected rows per layer: the shard stage's (geometries over the "
        "vertex limit) and, once transformed, the recipe's")
    geometry_types: dict[str, list[str]] = Field(
        default_factory=dict, description="geometry types per layer")
    shard_reject_steps: dict[str, dict[str, int]] = Field(  # issue 27
        default_factory=dict, description="rows the shard stage rejected, per layer and step "
        "('read': unreadable rows, 'vertex_limit')")

    @property
    def rows(self) -> int:
        return sum(layer.rows for layer in self.layers)


class TransformedChunk(_Frozen):
    """What transforming one chunk produced: the output chunk and, if any, its rejects.

    Both carry a ``_row_id`` column (the input chunk's ``row_offset`` + the row's position
    in it), so every output and rejected row maps back to one sharded row.
    rows_in = chunk.rows + (rejects.rows if rejects else 0).
    """

    rows_in: int
    chunk: Chunk
    rejects: Chunk | None
    reject_reasons: dict[str, int] = Field(default_factory=dict,
                                           description="rejected rows per recipe step")
    geometry_types: list[str] = Field(default_factory=list,
                                      description="geometry types of the output chunk")
    peak_rss: int | None = Field(
        default=None, description="peak resident memory (bytes) of the process that ran the "
        "transform, when it reports it (a Ray worker does): compared with its memory request")


@dataclass(frozen=True)
class StagedPart:
    """One staged GeoParquet object destined for the lake (a chunk, a rejects chunk or a part
    of a join result), with what the completion manifest lists of it."""

    staging_key: str
    rows: int
    bytes: int
    sha256: str
