"""Bounds of the shard stage (:class:`ShardLimits`) and the sort memory budget they imply."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ShardLimits:
    """Bounds of the shard stage; the defaults suit a 2-core worker with 2-8 GiB.

    * ``chunk_rows`` (100k-1M) and ``chunk_bytes`` (8-512 MiB) bound every chunk: rows, and
      in-memory (Arrow) bytes, checked again on the encoding (a single row larger than
      ``chunk_bytes`` still makes a chunk). The bytes bound a transform task's memory for heavy
      geometries: 20 MiB holds 250k points, 184k three-point lines, 140k small polygons.
    * ``read_batch_rows`` (16k-256k): rows per streamed batch, and ``read_batch_bytes``
      (16-256 MiB) its in-memory bound: readers shrink the rows per batch from the bytes per
      row seen so far (``batch_rows_for``), so a file of heavy rows is read in small batches.
    * ``max_file_bytes``: a landed file larger than this is refused before it is downloaded.
    * ``max_vertices``: a geometry with more vertices is rejected (or fails the run) before
      any bounds, validity check, reprojection or Hilbert key is computed for it.
    ``docs/limits.md`` says why each default is what it is.
    * ``max_zip_bytes`` / ``max_zip_ratio``: what a zip may inflate to, in total and as a
      multiple of the archive's size; checked before GDAL opens it.
    * ``sort_memory_bytes`` (128 MiB-2 GiB): memory for sorting. A layer up to half of it is
      sorted in memory; a larger one externally, in buckets of about 1/8 of it.
    * ``encode_threads`` (1-cores): chunks gathered and encoded in parallel.
    """

    chunk_rows: int = 250_000
    chunk_bytes: int = 20 * 2**20
    read_batch_rows: int = 65_536
    max_zip_bytes: int = 20 * 2**30
    max_zip_ratio: float = 100.0
    sort_memory_bytes: int = 256 * 2**20
    encode_threads: int = 2
    read_batch_bytes: int = 64 * 2**20
    max_file_bytes: int = 8 * 2**30
    max_vertices: int = 1_000_000

    def __post_init__(self) -> None:
        for name in ("chunk_rows", "chunk_bytes", "read_batch_rows", "max_zip_bytes",
                     "sort_memory_bytes", "encode_threads", "read_batch_bytes", "max_file_bytes",
                     "max_vertices"):
            if getattr(self, name) < 1:
                raise ValueError(f"ShardLimits.{name} must be >= 1, got {getattr(self, name)}")
        if self.max_zip_ratio <= 0:
            raise ValueError(f"ShardLimits.max_zip_ratio must be > 0, got {self.max_zip_ratio}")

    def batch_rows_for(self, bytes_per_row: float) -> int:
        """Rows per read batch for rows of ``bytes_per_row`` (as seen so far): at most
        ``read_batch_rows``, and about ``read_batch_bytes`` of them, never fewer than one."""
        if bytes_per_row <= 0:
            return self.read_batch_rows
        return max(1, min(self.read_batch_rows, int(self.read_batch_bytes // bytes_per_row)))

    @property
    def in_memory_sort_bytes(self) -> int:
        """A layer (or an external-sort bucket) up to this size is sorted in memory."""
        return self.sort_memory_bytes // 2

