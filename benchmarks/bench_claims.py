#!/usr/bin/env python
"""Claim bound benchmark: how many values legitimate chunks hold per byte, and what a
hostile chunk costs before it is refused.

The decoders bound a chunk's element count by its length (`VALUE_ALLOWANCE` +
`MAX_VALUES_PER_BYTE` per byte, see `medustore.codecs._format`). This script measures the
densest legitimate chunks of ``--values`` values (all-zero, constant, very coarse and
very fine steps, every lattice and dtype; thresholded chunks with empty or sparse masks)
and the time and peak traced memory of decoding hostile chunks (a zero chunk and a chunk
of constant pcodec streams that claim far more values than they hold), and the cost of
decoding a chunk at the allowance.

    python benchmarks/bench_claims.py               # 2**22 values, about half a minute
    python benchmarks/bench_claims.py --values 1048576
"""

from __future__ import annotations

import argparse
import struct
import time
import tracemalloc

import numpy as np
from pcodec import ChunkConfig, standalone

from medustore.codecs import DiffThresholdCodec, LatticeCodec
from medustore.codecs._format import MAX_VALUES_PER_BYTE, VALUE_ALLOWANCE
from medustore.testing import LATTICE_FIELDS, edit_field, reframe

INPUTS = {  # name: (value maker, codec kwargs to sweep)
    "zeros": (np.zeros, [dict(bits=1.0), dict(step=1.0)]),
    "constant": (lambda n: np.full(n, 3.0), [dict(bits=b) for b in (0.05, 1.0, 1.05, 4.0)]),
    "mid-cell": (lambda n: np.full(n, 0.5), [dict(step=1.0)]),
    "gaussian": (lambda n: np.random.default_rng(0).normal(size=n),
                 [dict(bits=0.05), dict(bits=1.0), dict(step=1e6), dict(step=1e-3)]),
}


def lattice_rows(n: int) -> list[tuple[float, str]]:
    """(values per chunk byte, description) of each legitimate lattice chunk."""
    rows = []
    for name, (make, sweeps) in INPUTS.items():
        for lattice in ("Z", "A2", "D4", "E8"):
            for dtype in ("f2", "f4", "f8"):
                x = make(n).astype(dtype)
                for kwargs in sweeps:
                    try:
                        enc = LatticeCodec(lattice, seed=1, **kwargs).encode(x)
                    except ValueError:  # step too fine for the dtype's range
                        continue
                    mode = "coded" if enc[7] else "zero"
                    rows.append((n / len(enc), f"{name} {lattice} {dtype} {kwargs} {mode} "
                                               f"({len(enc)} B)"))
    return rows


def threshold_rows(n: int) -> list[tuple[float, str]]:
    """(values per chunk byte, description) of thresholded chunks with sparse masks."""
    rng = np.random.default_rng(1)
    rows = []
    for survivors in (0, 1, 16, n // 1024):
        x = np.zeros(n, dtype="f4")
        x[rng.choice(n, survivors, replace=False)] = 1.0
        for inner in (None, LatticeCodec("E8", bits=1.0, seed=1)):
            enc = DiffThresholdCodec(inner=inner).encode(x)
            rows.append((n / len(enc), f"{survivors} survivors, inner {inner!r} "
                                       f"({len(enc)} B)"))
    return rows


def constant_stream_chunk(count: int) -> bytes:
    """A Z-lattice chunk whose one index stream is ``count`` zeros: valid, and the
    densest pcodec allows (a hostile chunk at the old limits, 2**28 values in ~13 KB)."""
    stream = standalone.simple_compress(np.zeros(count, dtype=np.int32), ChunkConfig())
    head = struct.pack("<BBBQdQBH", 1, 3, 1, count, 1.0, 1, 4, 1)
    return reframe(b"MDLC\x01" + head + struct.pack("<Q", len(stream)) + stream)


def measure(label: str, fn: object) -> None:
    tracemalloc.start()
    t0 = time.perf_counter()
    try:
        fn()
        outcome = "decoded"
    except ValueError as err:
        outcome = f"refused: {str(err)[:70]}..."
    dt = time.perf_counter() - t0
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    print(f"  {label}: {dt * 1e3:.2f} ms, peak {peak / 2**20:.2f} MiB traced, {outcome}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--values", type=int, default=2**22)
    args = parser.parse_args()
    n = args.values
    print(f"rule: count <= {VALUE_ALLOWANCE} + {MAX_VALUES_PER_BYTE} * chunk bytes")
    rows = lattice_rows(n)
    print(f"densest legitimate lattice chunks of {n} values (values per chunk byte):")
    for ratio, what in sorted(rows, reverse=True)[:6]:
        print(f"  {ratio:10.1f}  {what}")
    print("  densest coded chunk by input, Z / other lattices:")
    for name in INPUTS:
        coded = [(r, w) for r, w in rows if w.startswith(name + " ") and "coded" in w]
        z = max((r for r, w in coded if " Z " in w), default=0.0)
        other = max((r for r, w in coded if " Z " not in w), default=0.0)
        print(f"    {name:9s} {z:10.1f} / {other:.1f}")
    print("thresholded chunks, sparse masks:")
    for ratio, what in sorted(threshold_rows(n), reverse=True):
        print(f"  {ratio:10.1f}  {what}")

    print("hostile chunks, decoded without `out`:")
    zero = LatticeCodec().encode(np.zeros(8, dtype="f8"))
    measure(f"zero chunk of {len(zero)} B claiming 2**28 float64",
            lambda: LatticeCodec().decode(edit_field(zero, LATTICE_FIELDS, "count", 2**28)))
    hostile = constant_stream_chunk(2**27)
    measure(f"constant-stream chunk of {len(hostile)} B claiming 2**27 float64",
            lambda: LatticeCodec().decode(hostile))
    at_limit = constant_stream_chunk(VALUE_ALLOWANCE)
    measure(f"constant-stream chunk of {len(at_limit)} B at the allowance (2**22)",
            lambda: LatticeCodec().decode(at_limit))


if __name__ == "__main__":
    main()
