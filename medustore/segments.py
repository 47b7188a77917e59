"""Tensor-aligned segments: where a chunk of the flat model vector changes tensor.

The lossy codecs code each segment of a chunk with its own scale, so a small-scale tensor
(a BatchNorm or LayerNorm layer, a bias) gets noise sized for itself rather than for the
large tensors it shares a chunk with. Segments are the pieces of the model's tensors that
fall in a chunk; pieces shorter than `MIN_SEGMENT` join the segment before them (their few
values do not pay for a scale of their own), and the zero padding zarr adds to the last
chunk is a segment of its own (it codes to nothing).
"""

from __future__ import annotations

from functools import lru_cache

from medustore.layout import ModelLayout

__all__ = ["MIN_SEGMENT", "chunk_segments"]

#: Tensor pieces shorter than this share the previous segment's scale.
MIN_SEGMENT = 16


def chunk_segments(layout: ModelLayout, chunk: int) -> tuple[tuple[int, ...], ...]:
    """Segment lengths of every chunk of ``layout``'s flat vector cut every ``chunk`` values;
    each chunk's lengths sum to ``chunk`` (the last one's padding included)."""
    bounds = tuple(t.offset for t in layout.tensors) + (layout.size,)
    return _segments(bounds, chunk)


@lru_cache(maxsize=64)
def _segments(bounds: tuple[int, ...], chunk: int) -> tuple[tuple[int, ...], ...]:
    m = bounds[-1]
    out = []
    for start in range(0, m, chunk):
        stop = min(start + chunk, m)
        cuts = [b for b in bounds if start < b < stop]
        pieces = [b - a for a, b in zip([start, *cuts], [*cuts, stop], strict=True)]
        merged: list[int] = []
        for n in pieces:
            if merged and (n < MIN_SEGMENT or merged[-1] < MIN_SEGMENT):
                merged[-1] += n
            else:
                merged.append(n)
        if stop - start < chunk:
            merged.append(chunk - (stop - start))  # zarr's zero padding
        out.append(tuple(merged))
    return tuple(out)
