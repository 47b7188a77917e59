#!/usr/bin/env python
"""Ingest: how fast a server can record rounds, plain and pipelined, against torch.save.

bench_store's synthetic run (its CNN-shaped model, its updates), one archive at a time so
that no other writer's background work shares the cores: for each policy, ``--rounds``
rounds of ``--per-round`` users are recorded (round 0 excluded from the figures) with

* ``plain``: every ``record_round`` commits before it returns;
* ``pipelined``: ``medustore.open(..., pipeline=2)``: ``record_round`` returns once the round
  is planned, coding and the commit run in the background; ``flush`` at the end.

Reported per policy and mode: the median time ``record_round`` keeps the server waiting
(latency), and the sustained time per round (all rounds, the final flush included: what a
server producing rounds back to back gets), as MB/s of float32 input; the peers' baseline
is ``torch.save`` of each update (one file per user and round).

    python benchmarks/bench_ingest.py                     # 1M parameters, 10 users, 12 rounds
    python benchmarks/bench_ingest.py --params 200000 --rounds 6 --json out.json
    PYTHONPATH=/path/to/older/checkout python benchmarks/bench_ingest.py --modes plain
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

sys.path.insert(0, str(Path(__file__).parent))
from bench_store import Run, policies  # noqa: E402

import medustore  # noqa: E402

NAMES = ("full", "lattice-4b", "medu", "medu+acc")


def record(run: Run, rounds: list[dict], path: Path, name: str, pipeline: int) -> dict:
    pol, acc = policies()[name]
    shutil.rmtree(path, ignore_errors=True)
    waits = []
    kwargs = {"pipeline": pipeline} if pipeline else {}  # older medustores lack it
    with medustore.open(path, "w", model=run.w0, policy=pol, accumulators=acc,
                        **kwargs) as store:
        flush = getattr(store, "flush", lambda: None)
        store.record_round(0, rounds[0], weights={u: run.weights[u] for u in rounds[0]})
        flush()
        start = time.perf_counter()
        for t in range(1, len(rounds)):
            w0 = time.perf_counter()
            store.record_round(t, rounds[t], weights={u: run.weights[u] for u in rounds[t]})
            waits.append(time.perf_counter() - w0)
        flush()
        total = time.perf_counter() - start
    n = len(rounds) - 1
    return {"latency_s": statistics.median(waits), "sustained_s": total / n}


def peers(rounds: list[dict], folder: Path) -> dict:
    import torch

    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    per = []
    for t, ups in enumerate(rounds[1:], start=1):
        w0 = time.perf_counter()
        for u, h in ups.items():
            torch.save(torch.from_numpy(h), folder / f"round{t:05d}_user{u:05d}.pt")
        per.append(time.perf_counter() - w0)
    return {"latency_s": statistics.median(per), "sustained_s": statistics.mean(per)}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--params", type=int, default=1_000_000)
    p.add_argument("--rounds", type=int, default=12)
    p.add_argument("--per-round", type=int, default=10)
    p.add_argument("--names", default=",".join(NAMES))
    p.add_argument("--modes", default="plain,pipelined",
                   help="plain, pipelined or both (an older medustore: plain)")
    p.add_argument("--out", type=Path, default=Path("/tmp/medustore-ingest"))
    p.add_argument("--json", type=Path)
    a = p.parse_args(argv)
    run = Run(a.params, a.rounds, max(a.per_round, 12), a.per_round)
    rounds = [run.updates(t) for t in range(a.rounds)]
    mb = a.per_round * a.params * 4 / 1e6  # float32 input per round
    res = {"params": a.params, "rounds": a.rounds, "per_round": a.per_round,
           "input_mb_per_round": mb,
           "machine": f"{platform.machine()}, {platform.python_version()}",
           "peers": peers(rounds, a.out / "peers"), "archives": {}}
    for name in a.names.split(","):
        res["archives"][name] = {mode: record(run, rounds, a.out / f"{name}-{mode}", name,
                                              depth)
                                 for mode, depth in (("plain", 0), ("pipelined", 2))
                                 if mode in a.modes.split(",")}
        print(f"{name}: {res['archives'][name]}", file=sys.stderr)
    shutil.rmtree(a.out, ignore_errors=True)
    print("| archive | mode | record_round waits (s) | MB/s | sustained s/round | MB/s | "
          "x torch.save |")
    print("|---|---|---|---|---|---|---|")
    base = res["peers"]["sustained_s"]
    print(f"| peers (torch.save) | - | {res['peers']['latency_s']:.3f} | "
          f"{mb / res['peers']['latency_s']:.0f} | {base:.3f} | {mb / base:.0f} | 1.0 |")
    for name, modes in res["archives"].items():
        for mode, r in modes.items():
            print(f"| {name} | {mode} | {r['latency_s']:.3f} | {mb / r['latency_s']:.0f} | "
                  f"{r['sustained_s']:.3f} | {mb / r['sustained_s']:.0f} | "
                  f"{r['sustained_s'] / base:.1f} |")
    if a.json:
        a.json.write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
