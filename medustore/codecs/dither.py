"""The counter-based dither of chunk format version 2: a pure function of (seed, position).

Version 1 chunks draw their dither from a PCG64 stream (`medustore.codecs.lattice.dither`),
which only numpy reproduces and only sequentially. Version 2 computes every dither value
on its own from the chunk's 64-bit seed and the value's position with 64-bit integer
arithmetic, so any framework with wrapping 64-bit integers (numpy, torch on CPU or GPU)
computes the same bits, in any order, in slabs of any size. Definition (all arithmetic
modulo 2**64, ``>>`` a logical shift)::

    mix(z)   = z ^= z >> 30; z *= 0xBF58476D1CE4E5B9; z ^= z >> 27;
               z *= 0x94D049BB133111EB; z ^= z >> 31        (SplitMix64's finaliser)
    key      = mix(seed + 0x9E3779B97F4A7C15)               (SplitMix64's first output)
    h(p)     = mix(key ^ (p * 0x9E3779B97F4A7C15))          (p = 0, 1, 2, ...: the position)
    r(p)     = (h(p) >> 11) * 2**-53                        (exact: a float64 in [0, 1))
    u(p)     = w[p mod n] * r(p)                            (one float64 multiply)

``p`` counts the coded values of the chunk (block ``b``, coordinate ``j``: ``p = b n + j``,
``n`` the lattice dimension) and ``w`` is the lattice's box-shaped fundamental cell
(`Lattice.widths`: the basis is diagonal, so "applying the basis" is one correctly
rounded multiply per value; no matmul, no fused multiply-add, hence bit-identical results
on every IEEE-754 machine). XOR rather than addition with the position keeps the streams
of two keys from being shifted copies of each other.

`uniform` / `dither_values` are the numpy implementation the codec uses;
`uniform_torch` / `dither_values_torch` compute the same bits with torch int64 tensors
(wrapping multiplies; the logical shifts emulated by an arithmetic shift and a mask), for
encoders that run where the tensors live. torch is imported only by those two.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from medustore.codecs.lattices import Lattice

__all__ = ["GAMMA", "chunk_key", "dither_values", "dither_values_torch", "mix64", "uniform",
           "uniform_torch"]

GAMMA = 0x9E3779B97F4A7C15
_M1 = 0xBF58476D1CE4E5B9
_M2 = 0x94D049BB133111EB
_MASK64 = (1 << 64) - 1


def mix64(z: int) -> int:
    """SplitMix64's finaliser on a Python int (the reference definition)."""
    z &= _MASK64
    z ^= z >> 30
    z = (z * _M1) & _MASK64
    z ^= z >> 27
    z = (z * _M2) & _MASK64
    return z ^ (z >> 31)


def chunk_key(seed: int) -> int:
    """The per-chunk key ``mix(seed + GAMMA)`` of a 64-bit seed."""
    if not (isinstance(seed, (int, np.integer)) and 0 <= int(seed) < 2**64):
        raise ValueError(f"dither seed must be an int in [0, 2**64), got {seed!r}")
    return mix64(int(seed) + GAMMA)


def _check_range(offset: int, n: int) -> None:
    if not (0 <= offset and 0 <= n and offset + n <= 2**62):
        raise ValueError(f"dither positions [{offset}, {offset + n}) out of range")


_U30, _U27, _U31, _U11 = (np.uint64(s) for s in (30, 27, 31, 11))


def uniform(seed: int, offset: int, n: int, out: np.ndarray | None = None) -> np.ndarray:
    """``r(p)`` for ``p = offset .. offset + n - 1`` as float64 (numpy).

    ``out``, if given, is a float64 array of ``n`` values written in place.
    """
    _check_range(offset, n)
    key = np.uint64(chunk_key(seed))
    z = np.arange(offset, offset + n, dtype=np.uint64)
    z *= np.uint64(GAMMA)  # wraps modulo 2**64
    z ^= key
    t = np.empty_like(z)
    np.right_shift(z, _U30, out=t)
    z ^= t
    z *= np.uint64(_M1)
    np.right_shift(z, _U27, out=t)
    z ^= t
    z *= np.uint64(_M2)
    np.right_shift(z, _U31, out=t)
    z ^= t
    z >>= _U11
    if out is None:
        out = np.empty(n, dtype=np.float64)
    np.multiply(z, 2.0**-53, out=out, casting="unsafe")  # z < 2**53: exact
    return out


def dither_values(seed: int, offset: int, n: int, lattice: Lattice | str) -> np.ndarray:
    """``u(p)`` for ``p = offset .. offset + n - 1``: flat float64 (numpy)."""
    from medustore.codecs.lattices import get_lattice

    lat = lattice if not isinstance(lattice, str) else get_lattice(lattice)
    u = uniform(seed, offset, n)
    widths = lat.widths.tolist()
    for j, w in enumerate(widths):
        if w != 1.0:  # times 1.0 is exact: skipped
            first = (j - offset) % lat.dim
            u[first::lat.dim] *= w
    return u


def _signed(v: int) -> int:
    v &= _MASK64
    return v - (1 << 64) if v >= 1 << 63 else v


def _lsr(torch: Any, z: Any, s: int) -> Any:
    # logical right shift of int64: arithmetic shift, then clear the sign-extended bits
    return torch.bitwise_and(torch.bitwise_right_shift(z, s), (1 << (64 - s)) - 1)


def uniform_torch(seed: int, offset: int, n: int, device: Any = None) -> Any:
    """``r(p)`` for ``p = offset .. offset + n - 1``: a float64 torch tensor, bit-identical
    to `uniform` (int64 arithmetic wraps modulo 2**64 in torch, as two's complement)."""
    import torch

    _check_range(offset, n)
    key = _signed(chunk_key(seed))
    z = torch.arange(offset, offset + n, dtype=torch.int64, device=device)
    z = z * _signed(GAMMA)
    z = torch.bitwise_xor(z, key)
    z = torch.bitwise_xor(z, _lsr(torch, z, 30))
    z = z * _signed(_M1)
    z = torch.bitwise_xor(z, _lsr(torch, z, 27))
    z = z * _signed(_M2)
    z = torch.bitwise_xor(z, _lsr(torch, z, 31))
    z = _lsr(torch, z, 11)
    return z.to(torch.float64) * (2.0**-53)


def dither_values_torch(seed: int, offset: int, n: int, lattice: Lattice | str,
                        device: Any = None) -> Any:
    """``u(p)`` for ``p = offset .. offset + n - 1``: a float64 torch tensor, bit-identical
    to `dither_values`."""
    from medustore.codecs.lattices import get_lattice

    lat = lattice if not isinstance(lattice, str) else get_lattice(lattice)
    u = uniform_torch(seed, offset, n, device=device)
    for j, w in enumerate(lat.widths.tolist()):
        if w != 1.0:
            first = (j - offset) % lat.dim
            u[first::lat.dim] *= w
    return u
