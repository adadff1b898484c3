#!/usr/bin/env python3
"""Stage 1 speed of this checkout against another one, runs alternating, in one table.

Each run is ``flowsession.py bench`` (the whole of Stage 1 on the synthetic
recording with known motion: reference, flows, warps, writing) in a fresh
process, with ``--method adaptive`` and ``--method matlab`` for this checkout and
the plain ``bench`` of the other checkout (``--against``, e.g. a ``git worktree``
of an older commit), in turn, ``--rounds`` times; an untimed warm-up run of each
compiles the kernels first.  Prints the median frames/s of every variant per
preset, the spread (min-max) and the ratio to the other checkout, so that shared,
noisy machines still give a fair comparison.

    git worktree add /tmp/old <commit>
    python benchmarks/speed.py --against /tmp/old --presets fast balanced quality

``--backend`` (and ``--backend-param KEY=VALUE``) runs every variant on another flow
backend, e.g. the default path of ``flowreg_torch`` before and after a change:

    python benchmarks/speed.py --against /tmp/old --backend flowreg_torch \
        --backend-param device=cpu --presets fast --size 128 --frames 200
"""

import argparse
import functools
import os
import re
import statistics
import subprocess
import sys

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
print = functools.partial(print, flush=True)  # figures appear as they are measured


def bench(checkout, preset, size, frames, method=None, backend=()):
    """frames/s of one ``bench`` run of ``checkout`` (a fresh process); ``backend``: more
    arguments of ``bench`` (``--backend``, ``--backend-param``)."""
    cmd = [sys.executable, os.path.join(checkout, "flowsession.py"), "bench"]
    cmd += ["--size", str(size), "--frames", str(frames), "--preset", preset, *backend]
    if method:
        cmd += ["--method", method]
    env = dict(os.environ, PYTHONPATH=checkout)
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=checkout)
    found = re.search(r"frames/s\s+([0-9.]+)", out.stdout)
    if not found:
        raise SystemExit(f"bench failed in {checkout}:\n{out.stdout}\n{out.stderr}")
    return float(found.group(1))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--against", required=True, help="another checkout of flowsession")
    ap.add_argument("--presets", nargs="+", default=["fast", "balanced"])
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--frames", type=int, default=800)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--backend", default="flowreg", help="flow_backend of every variant")
    ap.add_argument(
        "--backend-param", action="append", default=[], metavar="KEY=VALUE", help="(repeatable)"
    )
    args = ap.parse_args()
    backend = ["--backend", args.backend]
    for kv in args.backend_param:
        backend += ["--backend-param", kv]
    variants = {
        "other checkout": (args.against, None),
        "adaptive (default)": (HERE, "adaptive"),
        "matlab": (HERE, "matlab"),
    }
    print(
        f"Stage 1 bench, {args.size}x{args.size}, {args.frames} frames, {args.rounds} rounds, "
        f"flow_backend {args.backend} {' '.join(args.backend_param)}"
    )
    print(f"other checkout: {os.path.abspath(args.against)}")
    for preset in args.presets:
        for checkout, method in variants.values():  # warm-up: compilation
            bench(checkout, preset, args.size, 60, method, backend)
        fps = {k: [] for k in variants}
        for _ in range(args.rounds):
            for name, (checkout, method) in variants.items():
                fps[name].append(bench(checkout, preset, args.size, args.frames, method, backend))
        base = statistics.median(fps["other checkout"])
        print(f"\npreset {preset}")
        print(f"  {'variant':20s} {'median fps':>10s} {'min-max':>14s} {'ratio':>7s}")
        for name, vals in fps.items():
            med = statistics.median(vals)
            span = f"{min(vals):.1f}-{max(vals):.1f}"
            print(f"  {name:20s} {med:10.1f} {span:>14s} {med / base:7.3f}")


if __name__ == "__main__":
    main()
