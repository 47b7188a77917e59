#!/usr/bin/env python
"""Distributed replay benchmark: unlearning and reconstructing a model too large for one
dask worker's memory limit, on a LocalCluster of 1 and 2 worker processes.

Builds (once, under ``--archive``) a lossless archive of a float32 model of ``--params``
parameters, ``--rounds`` rounds of ``--users`` users each; then, for each worker count,
starts a LocalCluster (one thread per worker, ``--memory-limit`` per worker) and times
``unlearn(store, "u0", exact_accumulator=False, client=...)`` (w_T and every record of u0)
and ``reconstruct(store, 1, client=...)`` (w_0 and one aggregate): the first call (workers
open the archive and read its index) and the best of ``--repeat`` more. A thread samples
each worker process's RSS every 10 ms (psutil) for its peak. Every answer is checked
against the local replay, bit for bit. Finally (``--whole-task``) the local replay itself
is submitted as one task to a worker with the same limit, to show that it does not fit.

    python benchmarks/bench_distributed.py                       # 50M params, ~5 minutes
    python benchmarks/bench_distributed.py --quick                # 2M params: a smoke run
"""

from __future__ import annotations

import argparse
import os
import platform
import threading
import time
from pathlib import Path

import numpy as np
import psutil

import medustore
from medustore.replay import reconstruct, unlearn


def build(path: Path, params: int, rounds: int, users: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    w0 = rng.standard_normal(params, dtype=np.float32)
    with medustore.open(path, "w", model=w0, policy="full") as store:
        for t in range(rounds):
            ups = {f"u{u}": (0.01 * rng.standard_normal(params, dtype=np.float32))
                   for u in range(users)}
            store.record_round(t, ups, weights={u: float(k + 1) for k, u in enumerate(ups)})
            del ups


class PeakRSS:
    """Peak resident memory of some processes, sampled by a thread."""

    def __init__(self, pids: list[int], every: float = 0.01) -> None:
        self.procs = [psutil.Process(p) for p in pids]
        self.peak = dict.fromkeys(pids, 0)
        self.every = every
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            for p in self.procs:
                try:
                    self.peak[p.pid] = max(self.peak[p.pid], p.memory_info().rss)
                except psutil.NoSuchProcess:
                    pass
            time.sleep(self.every)

    def __enter__(self) -> PeakRSS:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def rss() -> int:
    return psutil.Process().memory_info().rss


def _worker_prepare() -> int:
    import medustore.distributed  # noqa: F401 - what a replay task imports

    return psutil.Process().memory_info().rss


def timed(fn, repeat: int) -> tuple[float, float, object]:
    t0 = time.perf_counter()
    out = fn()
    cold = time.perf_counter() - t0
    warm = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        warm.append(time.perf_counter() - t0)
    return cold, min(warm) if warm else float("nan"), out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--params", type=int, default=50_000_000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--users", type=int, default=3)
    ap.add_argument("--memory-limit", default="200MB", help="per worker (dask syntax)")
    ap.add_argument("--workers", default="1,2")
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--archive", type=Path, default=Path("/tmp/medustore-bench-distributed"))
    ap.add_argument("--quick", action="store_true",
                    help="smoke run: 2M params, one repeat, no whole-task run")
    ap.add_argument("--whole-task", action=argparse.BooleanOptionalAction, default=True,
                    help="also submit the local replay as one task (expected to be killed)")
    args = ap.parse_args()
    if args.quick:
        args.params, args.repeat, args.whole_task = 2_000_000, 1, False

    import dask
    import distributed
    from dask.utils import parse_bytes

    limit = parse_bytes(args.memory_limit)
    path = args.archive / f"p{args.params}-r{args.rounds}-u{args.users}"
    if not path.exists():
        t0 = time.perf_counter()
        build(path, args.params, args.rounds, args.users, seed=0)
        print(f"built {path} in {time.perf_counter() - t0:.1f} s")
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"{psutil.virtual_memory().total / 2**30:.1f} GiB; Python "
          f"{platform.python_version()}, dask {dask.__version__}, numpy {np.__version__}, "
          f"medustore {medustore.__version__}")

    store = medustore.open(path)
    m = store.layout.size
    print(f"archive: {m} float32 params ({4 * m / 1e6:.0f} MB; float64 answer "
          f"{8 * m / 1e6:.0f} MB), chunk {store.index.settings.chunk}, "
          f"{store.index.n_rounds} rounds x {args.users} users, "
          f"{store.nbytes_stored() / 1e9:.2f} GB stored; worker memory limit "
          f"{limit / 2**20:.0f} MiB")

    t0, r0 = time.perf_counter(), rss()
    want_u = unlearn(store, "u0", exact_accumulator=False, out="flat")
    t_local_u = time.perf_counter() - t0
    t0 = time.perf_counter()
    want_r = reconstruct(store, 1, out="flat")
    t_local_r = time.perf_counter() - t0
    print(f"local (this process, 2 decoding threads): unlearn {t_local_u:.2f} s, reconstruct "
          f"{t_local_r:.2f} s; client RSS grew by {(rss() - r0) / 1e6:.0f} MB")

    rows = []
    for n in (int(x) for x in args.workers.split(",")):
        with distributed.LocalCluster(n_workers=n, processes=True, threads_per_worker=1,
                                      memory_limit=limit, dashboard_address=None,
                                      silence_logs=40) as cluster, \
                distributed.Client(cluster) as client:
            base = client.run(_worker_prepare)
            pids = list(client.run(os.getpid).values())
            for what, fn, want in (
                    ("unlearn", lambda c=client: unlearn(store, "u0", exact_accumulator=False,
                                                         out="flat", client=c), want_u),
                    ("reconstruct", lambda c=client: reconstruct(store, 1, out="flat",
                                                                 client=c), want_r)):
                with PeakRSS(pids) as peak:
                    cold, warm, got = timed(fn, args.repeat)
                assert got.tobytes() == want.tobytes(), f"{what} differs from the local replay"
                rows.append((what, n, cold, warm, max(base.values()),
                             max(peak.peak.values())))
                print(f"{what:12s} workers={n}: first {cold:6.2f} s, best warm {warm:6.2f} s, "
                      f"worker RSS {max(base.values()) / 2**20:.0f} MiB idle -> peak "
                      f"{max(peak.peak.values()) / 2**20:.0f} MiB (limit {limit / 2**20:.0f})"
                      ", equal to local: yes")

    if args.whole_task:
        def whole(location: str) -> int:
            with medustore.open(location) as s:
                return unlearn(s, "u0", exact_accumulator=False, out="flat").size

        with dask.config.set({"distributed.scheduler.allowed-failures": 0}), \
                distributed.LocalCluster(n_workers=1, processes=True, threads_per_worker=1,
                                         memory_limit=limit, dashboard_address=None,
                                         silence_logs=50) as cluster, \
                distributed.Client(cluster) as client:
            t0 = time.perf_counter()
            try:
                client.submit(whole, str(path)).result()
                verdict = "finished (the model fits the limit)"
            except distributed.KilledWorker:
                verdict = "worker killed by the nanny (KilledWorker)"
            print(f"local replay as one task under the same limit: {verdict} after "
                  f"{time.perf_counter() - t0:.1f} s")

    print("\n| operation | workers | first call (s) | best warm (s) | worker RSS idle -> peak "
          "(MiB) |")
    print("|---|---|---|---|---|")
    for what, n, cold, warm, b, p in rows:
        print(f"| {what} | {n} | {cold:.2f} | {warm:.2f} | {b / 2**20:.0f} -> {p / 2**20:.0f} |")
    store.close()


if __name__ == "__main__":
    main()
