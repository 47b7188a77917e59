"""`MeduPolicy`: the MEDU hierarchy that decides what a round stores and how.

1. User sparsification: keep all participants, the top ``keep_top``, or a ``keep_fraction``
   of them, ranked by the score ``p_u * ||d_t^u||`` (the users that deviate most from the
   aggregate, which are the ones an operator will want to remove); ``always_keep`` users
   are stored whatever their score.
2. Differential thresholding: record level, skip ``(t, u)`` when
   ``||d_t^u|| <= kappa * ||hbar_t||``; coordinate level, `DiffThresholdCodec` zeroes the
   entries ``|d_i| <= coord_threshold * rms(d)``.
3. Random lattice coding: `LatticeCodec` (``lattice``, ``bits``) codes the survivors;
   aggregates are coded with ``aggregate_bits`` (or losslessly).

A policy is a frozen dataclass; its JSON form lives in the store's attributes, so any
reader decodes without being told the configuration.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

import numpy as np

from medustore.codecs import DiffThresholdCodec, LatticeCodec, get_lattice

__all__ = ["MeduPolicy", "PRESETS", "parse_policy"]

UserId = int | str


@dataclass(frozen=True)
class MeduPolicy:
    """What a round stores and how it is coded.

    Parameters
    ----------
    keep_top, keep_fraction
        Stage 1: keep at most ``keep_top`` users, or ``ceil(keep_fraction * |C_t|)``,
        per round by score ``p_u * ||d_t^u||``; both None keeps every participant.
    always_keep
        Users stored in every round they take part in, whatever their score.
    kappa
        Stage 2a: skip records with ``||d_t^u|| <= kappa * ||hbar_t||`` (0 keeps them).
    coord_threshold
        Stage 2b: zero the entries ``|d_i| <= coord_threshold * rms(d)`` of each chunk
        (None: no coordinate thresholding).
    lattice, bits
        Stage 3: lattice and resolution of record coding; ``lattice=None`` stores records
        as lossless float32.
    aggregate_bits
        Resolution of the per-round aggregate (same lattice); None stores it losslessly.
    keep_aggregates
        Store each round's aggregate ``hbar_t``. Unlearning needs it only in rounds where
        every participant is removed (without it, the error budget counts ``||hbar_t||``
        there); `reconstruct` needs it always.
    chunk_size
        Parameters per chunk: records of larger models are split along the model.
    seed
        Key of content-derived dither seeds (``LatticeCodec(key=...)``): the same run
        recorded twice gives the same bytes. None draws fresh seeds.
    name
        The preset this policy came from, for display.
    """

    keep_top: int | None = None
    keep_fraction: float | None = None
    always_keep: tuple[UserId, ...] = ()
    kappa: float = 0.0
    coord_threshold: float | None = None
    lattice: str | None = None
    bits: float = 4.0
    aggregate_bits: float | None = None
    keep_aggregates: bool = True
    chunk_size: int = 2**20
    seed: int | None = None
    name: str = "custom"

    def __post_init__(self) -> None:
        if self.keep_top is not None and self.keep_fraction is not None:
            raise ValueError("MeduPolicy: give keep_top or keep_fraction, not both")
        if self.keep_top is not None and (isinstance(self.keep_top, bool) or not isinstance(
                self.keep_top, int) or self.keep_top < 1):
            raise ValueError(f"MeduPolicy: keep_top must be an int >= 1, got {self.keep_top!r}")
        if self.keep_fraction is not None and not 0.0 < self.keep_fraction <= 1.0:
            raise ValueError(
                f"MeduPolicy: keep_fraction must be in (0, 1], got {self.keep_fraction!r}"
            )
        if not (math.isfinite(self.kappa) and self.kappa >= 0):
            raise ValueError(f"MeduPolicy: kappa must be finite and >= 0, got {self.kappa!r}")
        if self.coord_threshold is not None and not (
                math.isfinite(self.coord_threshold) and self.coord_threshold >= 0):
            raise ValueError("MeduPolicy: coord_threshold must be finite and >= 0, or None")
        if self.lattice is not None:
            get_lattice(self.lattice)
            LatticeCodec(self.lattice, bits=self.bits)  # validates bits
            if self.aggregate_bits is not None:
                LatticeCodec(self.lattice, bits=self.aggregate_bits)
        if not (isinstance(self.chunk_size, int) and self.chunk_size >= 64):
            raise ValueError(f"MeduPolicy: chunk_size must be an int >= 64, got {self.chunk_size}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(
                self.seed, int) or not 0 <= self.seed < 2**64):
            raise ValueError(f"MeduPolicy: seed must be an int in [0, 2**64), got {self.seed!r}")
        object.__setattr__(self, "always_keep", tuple(self.always_keep))

    # ------------------------------------------------------------------ stage 1 + 2a

    def select(self, users: Sequence[UserId], weights: np.ndarray, dnorms: np.ndarray,
               agg_norm: float) -> np.ndarray:
        """Boolean mask of the participants whose records are stored this round."""
        n = len(users)
        score = weights * dnorms
        keep = np.ones(n, dtype=bool)
        limit = n
        if self.keep_top is not None:
            limit = min(n, self.keep_top)
        elif self.keep_fraction is not None:
            limit = min(n, math.ceil(self.keep_fraction * n - 1e-9))
        if limit < n:
            order = np.argsort(-score, kind="stable")
            keep[:] = False
            keep[order[:limit]] = True
        if self.kappa > 0:
            keep &= dnorms > self.kappa * agg_norm
        if self.always_keep:
            forced = set(self.always_keep)
            keep |= np.array([u in forced for u in users], dtype=bool)
        return keep

    # ------------------------------------------------------------------ stage 2b + 3

    def record_codec(self) -> LatticeCodec | DiffThresholdCodec | None:
        """The codec of record chunks (None: lossless float32 bytes + zstd)."""
        inner = None if self.lattice is None else LatticeCodec(self.lattice, bits=self.bits,
                                                               key=self.seed)
        if self.coord_threshold is not None:
            return DiffThresholdCodec(relative=self.coord_threshold, inner=inner)
        return inner

    def aggregate_codec(self) -> LatticeCodec | None:
        """The codec of aggregate chunks (None: lossless)."""
        if self.lattice is None or self.aggregate_bits is None:
            return None
        return LatticeCodec(self.lattice, bits=self.aggregate_bits, key=self.seed)

    def record_serializer(self) -> dict | None:
        """zarr v3 serializer of record chunks (None: lossless float32 bytes + zstd)."""
        codec = self.record_codec()
        return None if codec is None else _serializer(codec)

    def aggregate_serializer(self) -> dict | None:
        """zarr v3 serializer of aggregate chunks (None: lossless)."""
        codec = self.aggregate_codec()
        return None if codec is None else _serializer(codec)

    def _chunks(self, x: np.ndarray) -> Iterator[tuple[np.ndarray, int]]:
        """Each chunk of ``x`` as its codec sees it, with the number of real values: zarr
        pads a partial last chunk with the fill value (0) to the full chunk length."""
        c = min(self.chunk_size, x.size)
        for start in range(0, x.size, c):
            part = np.asarray(x[start : start + c], dtype=np.float64)
            n = part.size
            if n < c:
                part = np.concatenate([part, np.zeros(c - n)])
            yield part, n

    def expected_error(self, d: np.ndarray,
                       segments: Sequence[Sequence[int]] | None = None
                       ) -> tuple[float, float, int]:
        """``(E||e||^2, ||zeroed||, survivors)`` of coding record ``d`` under this policy.

        ``segments``: per chunk, the segment lengths its chunk is encoded with
        (`medustore.segments.chunk_segments`: they sum to the chunk length, the zero
        padding of the last chunk included); None codes each chunk as one segment.
        Mirrors the codecs chunk by chunk and segment by segment (the same thresholds,
        survivors and cell sizes), so the store can keep the error budget of each record
        without decoding it later.
        """
        evar, zsq, surv = 0.0, 0.0, 0
        chunks = list(self._chunks(d))
        segs = self._segments(segments, chunks)
        for (part, n), seg in zip(chunks, segs, strict=True):
            lengths: Sequence[int] | None = seg
            if self.coord_threshold is not None:
                keep, counts = DiffThresholdCodec(relative=self.coord_threshold).survivors(
                    part, seg)  # the zero padding is always below tau
                small = ~keep
                zsq += float(np.dot(part[small], part[small]))
                part, lengths = part[keep], counts
                n = part.size
            surv += n
            if self.lattice is not None and part.size:
                # The padding is coded too when it shares a segment (it sets the step)
                # but its error is dropped.
                codec = LatticeCodec(self.lattice, bits=self.bits)
                evar += codec.expected_error(part, lengths, real=n)
        return evar, math.sqrt(zsq), surv

    def expected_aggregate_error(self, hbar: np.ndarray,
                                 segments: Sequence[Sequence[int]] | None = None) -> float:
        """``E||e||^2`` of coding the aggregate ``hbar`` (``segments`` as in
        `expected_error`)."""
        if self.lattice is None or self.aggregate_bits is None or not self.keep_aggregates:
            return 0.0
        codec = LatticeCodec(self.lattice, bits=self.aggregate_bits)
        chunks = list(self._chunks(hbar))
        segs = self._segments(segments, chunks)
        return sum(codec.expected_error(part, seg, real=n)
                   for (part, n), seg in zip(chunks, segs, strict=True))

    @staticmethod
    def _segments(segments: Sequence[Sequence[int]] | None,
                  chunks: list[tuple[np.ndarray, int]]) -> list[Sequence[int] | None]:
        if segments is None:
            return [None] * len(chunks)
        segments = list(segments)
        if len(segments) != len(chunks):
            raise ValueError(
                f"MeduPolicy: {len(segments)} chunk segment tables for {len(chunks)} chunks")
        return segments

    # ------------------------------------------------------------------ JSON form

    def to_json(self) -> dict:
        data = asdict(self)
        data["always_keep"] = list(self.always_keep)
        return data

    @classmethod
    def from_json(cls, data: dict) -> MeduPolicy:
        known = set(cls.__dataclass_fields__)
        unknown = set(data) - known
        if unknown:
            raise ValueError(
                f"archive policy has unknown fields {sorted(unknown)}; upgrade medustore")
        data = dict(data)
        data["always_keep"] = tuple(data.get("always_keep", ()))
        return cls(**data)

    def evolve(self, **changes: Any) -> MeduPolicy:
        """A copy with some fields changed (``name`` becomes "custom" unless given)."""
        changes.setdefault("name", "custom")
        return replace(self, **changes)

    def describe(self) -> str:
        """One line saying what the policy does."""
        parts = []
        if self.keep_top is not None:
            parts.append(f"top {self.keep_top} users/round")
        elif self.keep_fraction is not None:
            parts.append(f"top {self.keep_fraction:.0%} users/round")
        else:
            parts.append("all users")
        if self.always_keep:
            parts.append(f"always {list(self.always_keep)}")
        if self.kappa:
            parts.append(f"kappa {self.kappa:g}")
        if self.coord_threshold is not None:
            parts.append(f"coord tau {self.coord_threshold:g} rms")
        if not self.keep_aggregates:
            agg = "not kept"
        elif self.lattice is None or self.aggregate_bits is None:
            agg = "lossless"
        else:
            agg = f"{self.aggregate_bits:g} bits"
        if self.lattice is None:
            parts.append(f"float32 lossless (aggregate {agg})")
        else:
            parts.append(f"{self.lattice} lattice {self.bits:g} bits (aggregate {agg})")
        return f"{self.name}: " + ", ".join(parts)


def _serializer(codec: Any) -> dict:
    config = codec.get_config()
    name = config.pop("id")
    return {"name": name, "configuration": config}


#: Named presets. ``full`` is the uncompressed reference (what peers store); ``lattice``
#: keeps every record, lattice-coded; ``medu`` applies the whole hierarchy with defaults
#: measured on the demo setting (docs/results.md: 4810 parameters, 20 users, 30 rounds):
#: - the top 5% of users per round by ``p_u ||d||`` (1 of 20): the malicious user in every
#:   round of the IID demo, but in only 18 of 30 rounds of a Dirichlet(0.5) split, where
#:   ``keep_fraction=0.1`` keeps it in all (78x instead of 103x); the error budget reports
#:   the missed rounds before unlearning;
#: - coordinates: only exact zeros dropped (thresholds of 0.25-1 rms add more error than
#:   the bytes they save are worth);
#: - Z lattice at 1.5 bits: pcodec spends ~22 bytes per coded stream and A2/E8 code 3/17
#:   streams per chunk, more than their lower error is worth on small models (2 bits:
#:   Z 2.33, A2 2.56, E8 3.61 bits per parameter on the demo);
#: - aggregates at 0.5 bit, kept for `reconstruct` and all-removed rounds: dithered
#:   indices cost ~0.85 KB a round here whatever the resolution below 1 bit.
#: The demo's archive is then 103x smaller than float32 history, and unlearning from it
#: lands 0.20 (L2) from unlearning from ``full``, which is 1.28 from retraining.
PRESETS: dict[str, MeduPolicy] = {
    "full": MeduPolicy(name="full"),
    "lattice": MeduPolicy(lattice="E8", bits=4.0, aggregate_bits=8.0, name="lattice"),
    "medu": MeduPolicy(keep_fraction=0.05, coord_threshold=0.0, lattice="Z", bits=1.5,
                       aggregate_bits=0.5, name="medu"),
}


def parse_policy(policy: str | MeduPolicy | dict | None) -> MeduPolicy:
    """A `MeduPolicy` from a preset name, a policy, its JSON form, or None (``medu``)."""
    if policy is None:
        return PRESETS["medu"]
    if isinstance(policy, MeduPolicy):
        return policy
    if isinstance(policy, dict):
        return MeduPolicy.from_json(policy)
    if isinstance(policy, str):
        if policy not in PRESETS:
            raise ValueError(
                f"unknown policy preset {policy!r}; choose one of {', '.join(PRESETS)}")
        return PRESETS[policy]
    raise TypeError(
        f"policy must be a preset name, a MeduPolicy or a dict, got {type(policy).__name__}")
