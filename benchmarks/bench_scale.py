#!/usr/bin/env python
"""Bookkeeping at scale: many users, many participants per round, a small model.

Each round draws ``--per-round`` participants uniformly (seeded) from a population of
``--population`` user ids and records them into a ``medu`` archive of a ``--params``-value
model. Reported: ``record_round`` wall seconds of the first and last 10 rounds (the model is
small, so this is the bookkeeping: index rows, user table, digest, commit), opening the
archive (best of 5 fresh readers), planning one user's removal (``error_budget``, with
the rounds whose rows it read), and the archive's size.

    python benchmarks/bench_scale.py                        # 1,000,000 population, 200 x 1000
    python benchmarks/bench_scale.py --population 50000 --rounds 60 --per-round 500
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import statistics
import sys
import time
from pathlib import Path

import numpy as np

import medustore


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--population", type=int, default=1_000_000)
    p.add_argument("--rounds", type=int, default=200)
    p.add_argument("--per-round", type=int, default=1000)
    p.add_argument("--params", type=int, default=1000)
    p.add_argument("--out", type=Path, default=Path("/tmp/medustore-scale"))
    p.add_argument("--json", type=Path)
    a = p.parse_args(argv)
    shutil.rmtree(a.out, ignore_errors=True)
    rng = np.random.default_rng(20251201)
    path = a.out / "scale"
    model = np.zeros(a.params, np.float32)
    times = []
    with medustore.open(path, "w", model=model, policy="medu") as store:
        for t in range(a.rounds):
            users = rng.choice(a.population, size=a.per_round, replace=False)
            ups = {int(u): rng.standard_normal(a.params).astype(np.float32) * 1e-2
                   for u in users}
            start = time.perf_counter()
            store.record_round(t, ups)
            times.append(time.perf_counter() - start)
            if t % 20 == 0:
                print(f"round {t}: {times[-1]:.3f} s, {len(store.users):,} users",
                      file=sys.stderr)
        target = int(store.users[0])
        store.compact(grace=0)
        n_users = len(store.users)
    budgets, opens = [], []
    for _ in range(5):  # a fresh reader each time: nothing cached
        t0 = time.perf_counter()
        reader = medustore.open(path)
        opens.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        budget = reader.error_budget(target)
        budgets.append(time.perf_counter() - t0)
        rounds_read = len(reader.index._lazy.rows) if reader.index._lazy else None
        loaded = reader.index.loaded
        reader.close()
    reader = medustore.open(path)
    res = {
        "population": a.population, "rounds": a.rounds, "per_round": a.per_round,
        "params": a.params, "users_seen": n_users,
        "first10_s": statistics.mean(times[:10]), "last10_s": statistics.mean(times[-10:]),
        "open_s": min(opens), "error_budget_s": min(budgets),
        "participations_of_user": budget.records_used + budget.records_missing,
        # what planning read: the rounds whose rows it loaded (round 0's at open, then the
        # user's), and whether it loaded the whole index (it must not)
        "rounds_read": rounds_read, "whole_index_loaded": loaded,
        "bytes": reader.nbytes_stored(), "machine": f"{platform.machine()}, "
        f"{platform.python_version()}",
    }
    res["growth"] = res["last10_s"] / res["first10_s"]
    reader.close()
    print(json.dumps(res, indent=2))
    if a.json:
        a.json.write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
