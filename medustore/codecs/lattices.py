"""Lattices and their exact closest-point algorithms (Conway & Sloane, 1982).

Each lattice is given in its natural coordinates (Z^n, A2 with unit minimum distance,
D4 as the integer vectors of even sum, E8 = D8 u (D8 + 1/2)). All searches are vectorised:
they take an ``(N, n)`` float64 array and return the nearest lattice point of every row.

Besides the search, a lattice here knows two things that make dithered coding cheap:

* a *box-shaped fundamental cell* ``[0, w_1) x ... x [0, w_n)``: every point of space has
  exactly one lattice point ``v`` with ``x - v`` in the box. Drawing the dither uniformly
  over that box needs no closest-point search to regenerate when decoding;
* an *integer index* per lattice point, ``k_j = floor(v_j / w_j)``, one stream per
  coordinate. Coding the streams separately loses nothing to the parity constraints of
  D4 and E8 (the constrained coordinate is coded at half resolution), and for A2 the two
  streams follow orthogonal directions, so they are nearly independent on white data.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

__all__ = ["Lattice", "LATTICES", "get_lattice", "SHANNON_G"]

#: Normalized second moment of the ideal (n -> infinity) quantiser cell, 1 / (2 pi e).
SHANNON_G = 1.0 / (2.0 * np.pi * np.e)

_SQRT3 = float(np.sqrt(3.0))


def _round(y: np.ndarray) -> np.ndarray:
    # Round half away from zero would also do; ties have probability zero under a dither.
    return np.rint(y)


# ---------------------------------------------------------------- closest points


def _closest_z(y: np.ndarray) -> np.ndarray:
    return _round(y)


def _closest_a2(y: np.ndarray) -> np.ndarray:
    # A2 = R u (R + (1/2, sqrt3/2)), R the rectangular lattice Z x sqrt3 Z. The nearest
    # point of a union of cosets is the nearer of the nearest points of each coset.
    x0, x1 = y[:, 0], y[:, 1] / _SQRT3
    a0, a1 = _round(x0), _round(x1)
    b0, b1 = _round(x0 - 0.5) + 0.5, _round(x1 - 0.5) + 0.5
    da = (x0 - a0) ** 2 + 3.0 * (x1 - a1) ** 2
    db = (x0 - b0) ** 2 + 3.0 * (x1 - b1) ** 2
    use_b = db < da
    out = np.empty_like(y)
    out[:, 0] = np.where(use_b, b0, a0)
    out[:, 1] = np.where(use_b, b1, a1) * _SQRT3
    return out


def _closest_d(y: np.ndarray) -> np.ndarray:
    # D_n: round every coordinate; if the sum is odd, round the worst coordinate the
    # other way (Conway & Sloane, algorithm for D_n).
    f = _round(y)
    odd = (f.sum(axis=1) % 2) != 0
    if np.any(odd):
        rows = np.flatnonzero(odd)
        r = y[rows] - f[rows]
        k = np.argmax(np.abs(r), axis=1)
        rk = r[np.arange(rows.size), k]
        f[rows, k] += np.where(rk >= 0, 1.0, -1.0)
    return f


def _closest_e8(y: np.ndarray) -> np.ndarray:
    # E8 = D8 u (D8 + 1/2).
    a = _closest_d(y)
    b = _closest_d(y - 0.5) + 0.5
    da = np.einsum("ij,ij->i", y - a, y - a)
    db = np.einsum("ij,ij->i", y - b, y - b)
    return np.where((db < da)[:, None], b, a)


# ---------------------------------------------------------------- integer indices
# k_j = floor(v_j / w_j); the inverse maps rebuild v from k using the coset structure.


def _from_index_z(k: np.ndarray) -> np.ndarray:
    return k.astype(np.float64)


def _from_index_a2(k: np.ndarray) -> np.ndarray:
    c = (k[:, 0] & 1).astype(np.float64)  # coset: which of R, R + (1/2, sqrt3/2)
    out = np.empty(k.shape, dtype=np.float64)
    out[:, 0] = 0.5 * k[:, 0]
    out[:, 1] = (k[:, 1] + 0.5 * c) * _SQRT3
    return out


def _from_index_d(k: np.ndarray) -> np.ndarray:
    out = k.astype(np.float64)
    parity = k[:, :-1].sum(axis=1) & 1  # the last coordinate makes the sum even
    out[:, -1] = 2.0 * k[:, -1] + parity
    return out


def _from_index_e8(k: np.ndarray) -> np.ndarray:
    c = k[:, 0] & 1  # coset of D8 fixed by the first coordinate (coded at width 1/2)
    half = 0.5 * c.astype(np.float64)
    out = k.astype(np.float64) + half[:, None]
    out[:, 0] = 0.5 * k[:, 0]
    z_first = (k[:, 0] - c) // 2  # the D8 part of the first coordinate
    parity = (z_first + k[:, 1:-1].sum(axis=1)) & 1
    out[:, -1] = 2.0 * k[:, -1] + parity + half
    return out


# ---------------------------------------------------------------- coding contexts
# The streams of a block are not independent: the coset of A2 and E8 (fixed by the first
# coordinate) shifts every other coordinate by half a step, and the parity constraint of
# D4 and E8 fixes the low bit of the last one. Coding coordinate j separately for each
# value of such a context (known to the decoder from coordinates < j) recovers what
# separate streams would lose: 0.05 bit/dim for A2 at 2 bits (docs/codecs.md).


def _contexts_none(k: np.ndarray, j: int) -> tuple[np.ndarray | None, int]:
    return None, 1


def _contexts_a2(k: np.ndarray, j: int) -> tuple[np.ndarray | None, int]:
    return (k[:, 0] & 1, 2) if j == 1 else (None, 1)


def _contexts_d4(k: np.ndarray, j: int) -> tuple[np.ndarray | None, int]:
    return (k[:, :3].sum(axis=1) & 1, 2) if j == 3 else (None, 1)


def _contexts_e8(k: np.ndarray, j: int) -> tuple[np.ndarray | None, int]:
    if j == 0:
        return None, 1
    c = k[:, 0] & 1
    if j < 7:
        return c, 2
    parity = (((k[:, 0] - c) // 2) + k[:, 1:7].sum(axis=1)) & 1
    return 2 * parity + c, 4


# ---------------------------------------------------------------- the lattice type


@dataclass(frozen=True, eq=False)
class Lattice:
    """A lattice quantiser in natural coordinates.

    Attributes
    ----------
    name, dim
        Identifier (``"Z"``, ``"A2"``, ``"D4"``, ``"E8"``) and dimension ``n``.
    code
        One-byte identifier written in chunk headers.
    volume
        Volume of a fundamental cell in natural coordinates.
    G
        Normalized second moment of the Voronoi cell (Conway & Sloane, table 2.3).
    covering_radius
        Largest distance from a point of space to its nearest lattice point.
    widths
        Side lengths of the box-shaped fundamental cell used for the dither and the indices.
    """

    name: str
    dim: int
    code: int
    volume: float
    G: float
    covering_radius: float
    widths: np.ndarray
    _closest: Callable[[np.ndarray], np.ndarray]
    _from_index: Callable[[np.ndarray], np.ndarray]
    _contexts: Callable[[np.ndarray, int], tuple[np.ndarray | None, int]]

    def contexts(self, k: np.ndarray, j: int) -> tuple[np.ndarray | None, int]:
        """Coding context of column ``j`` of indices ``k``, from columns ``< j`` only.

        Returns ``(ctx, n)``: an int array with values in ``range(n)``, or ``(None, 1)``.
        """
        return self._contexts(k, j)

    def closest(self, y: np.ndarray) -> np.ndarray:
        """Nearest lattice point of every row of ``y`` (shape ``(N, dim)``, float64)."""
        return self._closest(y)

    def to_index(self, v: np.ndarray) -> np.ndarray:
        """Integer index ``(N, dim)`` of lattice points ``v``."""
        return np.floor(v / self.widths + 1e-6).astype(np.int64)

    def from_index(self, k: np.ndarray) -> np.ndarray:
        """Lattice points ``(N, dim)`` of integer indices ``k``; inverse of `to_index`."""
        return self._from_index(k)

    @property
    def scale_per_dim(self) -> float:
        """``volume ** (1/dim)``: natural length of a cell of unit volume per dimension."""
        return float(self.volume ** (1.0 / self.dim))

    def __repr__(self) -> str:
        return f"Lattice({self.name!r})"


def _lattice(name, dim, code, volume, G, rho, widths, closest, from_index, ctx) -> Lattice:
    return Lattice(name, dim, code, float(volume), G, float(rho),
                   np.asarray(widths, dtype=np.float64), closest, from_index, ctx)


LATTICES: dict[str, Lattice] = {
    lat.name: lat
    for lat in (
        _lattice("Z", 1, 1, 1.0, 1.0 / 12.0, 0.5, [1.0], _closest_z, _from_index_z,
                 _contexts_none),
        _lattice("A2", 2, 2, _SQRT3 / 2.0, 5.0 / (36.0 * _SQRT3), 1.0 / _SQRT3,
                 [0.5, _SQRT3], _closest_a2, _from_index_a2, _contexts_a2),
        _lattice("D4", 4, 4, 2.0, 0.0766032346, 1.0, [1.0, 1.0, 1.0, 2.0],
                 _closest_d, _from_index_d, _contexts_d4),
        _lattice("E8", 8, 8, 1.0, 929.0 / 12960.0, 1.0, [0.5] + [1.0] * 6 + [2.0],
                 _closest_e8, _from_index_e8, _contexts_e8),
    )
}
_BY_CODE = {lat.code: lat for lat in LATTICES.values()}


def get_lattice(name: str | int) -> Lattice:
    """Look a lattice up by name (``"Z"``, ``"A2"``, ``"D4"``, ``"E8"``) or header code."""
    table = _BY_CODE if isinstance(name, int) else LATTICES
    try:
        return table[name]
    except (KeyError, TypeError):
        raise ValueError(
            f"unknown lattice {name!r}; choose one of {', '.join(LATTICES)}"
        ) from None
