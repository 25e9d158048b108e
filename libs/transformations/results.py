"""Gathering a batch's transformed chunks into the index the later stages read, reconciling
counts as they arrive: rows in = rows out + rows rejected, per chunk and per batch.

The transform tasks finish in any order (on any node); ``TransformResults`` takes each
result as it comes and, once every chunk is in, builds the transformed ``ChunkIndex`` in the
sharded chunks' order, with each layer's rejects, reject reasons and geometry types.
``check_reject_fractions`` then fails a layer with more bad rows than its manifest allows.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from itertools import islice

from libs.descriptors import Chunk, ChunkIndex, LayerChunks, TransformedChunk
from libs.errors import InputDataError, ReconciliationError
from libs.manifest.rejects import LISTED_PROBLEMS, breach_message, counts_as_problem


class TransformResults:
    """The transformed chunks of ``sharded``, added one by one (``add``), then ``index()``."""

    def __init__(self, sharded: ChunkIndex, target_crs: str) -> None:
        self.sharded = sharded
        self.target_crs = target_crs
        self._results: dict[tuple[str, int], TransformedChunk] = {}
        self.rows_in = 0
        self.rows_out = 0
        self.rows_rejected = 0

    def add(self, source: Chunk, result: TransformedChunk) -> None:
        """Take the result of transforming ``source``; raise if its counts do not reconcile."""
        rejected = result.rejects.rows if result.rejects else 0
        if result.rows_in != source.rows or result.chunk.rows + rejected != source.rows:
            raise ReconciliationError(
                f"batch {self.sharded.batch_id!r}, layer {source.layer!r}, chunk "
                f"{source.ordinal}: {source.rows} rows sharded, {result.rows_in} read, "
                f"{result.chunk.rows} out, {rejected} rejected")
        self._results[(source.layer, source.ordinal)] = result
        self.rows_in += result.rows_in
        self.rows_out += result.chunk.rows
        self.rows_rejected += rejected

    def reject_reasons(self) -> dict[str, dict[str, int]]:
        """Rejected rows per layer (in the batch's order) and recipe step (``read`` and
        ``vertex_limit``: set apart by the shard stage)."""
        reasons: dict[str, dict[str, int]] = {}
        for layer in self.sharded.layers:
            counts = reasons[layer.layer] = dict(self.sharded.shard_reject_steps.get(layer.layer,
                                                                                     {}))
            for chunk in layer.chunks:
                result = self._results.get((layer.layer, chunk.ordinal))
                for reason, count in (result.reject_reasons if result else {}).items():
                    counts[reason] = counts.get(reason, 0) + count
        return reasons

    def index(self) -> ChunkIndex:
        """The transformed batch; raises unless every sharded chunk was added and the batch's
        rows reconcile."""
        batch_id = self.sharded.batch_id
        expected = {(c.layer, c.ordinal) for layer in self.sharded.layers for c in layer.chunks}
        if set(self._results) != expected:
            raise ReconciliationError(f"batch {batch_id!r}: {len(expected)} chunks sharded but "
                                      f"{len(self._results)} transformed")
        layers, rejects, types = [], [], {}
        # rows the shard stage already rejected (over the vertex limit) join the layer's own
        shard_rejects = {x.layer: list(x.chunks) for x in self.sharded.rejects}
        for layer in self.sharded.layers:
            done = [self._results[(layer.layer, c.ordinal)] for c in layer.chunks]
            layers.append(LayerChunks(layer=layer.layer, crs=self.target_crs, chunks=[
                r.chunk.model_copy(update={"source_rows": r.rows_in}) for r in done]))
            layer_rejects = [r.rejects for r in done if r.rejects is not None]
            layer_rejects += shard_rejects.get(layer.layer, [])
            if layer_rejects:
                rejects.append(LayerChunks(layer=layer.layer, crs=layer.crs, chunks=layer_rejects))
            types[layer.layer] = sorted({t for r in done for t in r.geometry_types})
        index = ChunkIndex(batch_id=batch_id, staging_bucket=self.sharded.staging_bucket,
                           prefix=self.sharded.prefix, layers=layers, sources=self.sharded.sources,
                           rejects=rejects, geometry_types=types)
        rows_rejected = sum(r.rows for r in rejects)
        rows_in = self.sharded.rows + sum(r.rows for r in self.sharded.rejects)
        if rows_in != index.rows + rows_rejected:
            raise ReconciliationError(
                f"batch {batch_id!r}: {rows_in} rows sharded or rejected by the shard stage but "
                f"{index.rows} transformed + {rows_rejected} rejected")
        return index


def check_reject_fractions(index: ChunkIndex, reasons: dict[str, dict[str, int]],
                           limit_for: Callable[[str], float],
                           problems_of: Callable[[Chunk], Iterable[tuple[str, str]]]) -> None:
    """Raise :class:`InputDataError` for the first layer of the transformed ``index`` whose
    rows rejected as bad data (``reasons``: per layer and step; selections do not count)
    exceed ``limit_for(layer)``, listing the first problems (``problems_of`` reads a rejects
    chunk's (step, reason) pairs; only a breaching layer's are read)."""
    rejects = {x.layer: x.chunks for x in index.rejects}
    for layer in index.layers:
        counts = reasons.get(layer.layer, {})
        bad = sum(n for step, n in counts.items() if counts_as_problem(step))
        total = layer.rows + sum(counts.values())
        if not bad or bad <= limit_for(layer.layer) * total:
            continue
        listed = (pair for chunk in rejects.get(layer.layer, []) for pair in problems_of(chunk)
                  if counts_as_problem(pair[0]))
        raise InputDataError(breach_message(layer.layer, bad, total, limit_for(layer.layer),
                                            islice(listed, LISTED_PROBLEMS)))
