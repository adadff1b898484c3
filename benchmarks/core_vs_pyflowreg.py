#!/usr/bin/env python3
"""Time one get_displacement call of flowsession and of pyflowreg on the same frame pair.

Both tools run in their own process on one thread (NUMBA_NUM_THREADS=1), with the
same parameters (the ``quality`` preset: alpha 1.5, levels 100, eta 0.8,
iterations 50, update_lag 5, a_smooth 1, a_data 0.45), on a synthetic pair with
known motion (``flowsession.synthetic_pair``, normalised to [0, 1]).  Each process
makes one untimed call first (JIT compilation), then ``--repeats`` timed calls;
the processes alternate (A B A B) so machine drift hits both.  Prints seconds per
call (median), the ratio, and each tool's mean endpoint error against the truth.

    python benchmarks/core_vs_pyflowreg.py --size 256 --rounds 3 \
        --pyflowreg-python ~/.cache/flowsession-bench/pfr-venv/bin/python
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
PARAMS = dict(
    alpha=(1.5, 1.5),
    levels=100,
    eta=0.8,
    iterations=50,
    update_lag=5,
    a_smooth=1.0,
    a_data=0.45,
    min_level=0,
)

WORKER = r"""
import json, sys, time
import numpy as np
tool, path, repeats, params = sys.argv[1], sys.argv[2], int(sys.argv[3]), json.loads(sys.argv[4])
d = np.load(path)
if tool == "flowsession":
    from flowsession import get_displacement
else:
    from pyflowreg.core.optical_flow import get_displacement
    params["alpha"] = tuple(params["alpha"])
w = get_displacement(d["fixed"], d["moving"], **params)        # compile / warm up
times = []
for _ in range(repeats):
    t0 = time.perf_counter()
    w = get_displacement(d["fixed"], d["moving"], **params)
    times.append(time.perf_counter() - t0)
b = 16
epe = np.hypot(*(w - d["w_true"])[b:-b, b:-b].transpose(2, 0, 1)).mean()
print(json.dumps({"times": times, "epe": float(epe)}))
"""


def run(python, tool, path, repeats):
    env = dict(
        os.environ,
        NUMBA_NUM_THREADS="1",
        OMP_NUM_THREADS="1",
        OPENBLAS_NUM_THREADS="1",
        MKL_NUM_THREADS="1",
        PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
    )
    out = subprocess.run(
        [python, "-c", WORKER, tool, path, str(repeats), json.dumps(PARAMS)],
        capture_output=True,
        text=True,
        env=env,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=3, help="alternating A/B rounds")
    ap.add_argument("--repeats", type=int, default=2, help="timed calls per process")
    ap.add_argument(
        "--pyflowreg-python",
        default=os.path.expanduser("~/.cache/flowsession-bench/pfr-venv/bin/python"),
    )
    a = ap.parse_args()
    sys.path.insert(0, ROOT)
    import flowsession as fs

    fixed, moving, w_true = fs.synthetic_pair(size=(a.size, a.size))
    lo, hi = min(fixed.min(), moving.min()), max(fixed.max(), moving.max())
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "pair.npz")
        np.savez(
            path, fixed=(fixed - lo) / (hi - lo), moving=(moving - lo) / (hi - lo), w_true=w_true
        )
        res = {"flowsession": [], "pyflowreg": []}
        epe = {}
        for _ in range(a.rounds):
            for tool, py in (("flowsession", sys.executable), ("pyflowreg", a.pyflowreg_python)):
                r = run(py, tool, path, a.repeats)
                res[tool] += r["times"]
                epe[tool] = r["epe"]
    med = {k: statistics.median(v) for k, v in res.items()}
    print(
        f"get_displacement, {a.size}x{a.size}, 1 channel, quality parameters, one thread, "
        f"median of {a.rounds * a.repeats} calls"
    )
    for tool in ("flowsession", "pyflowreg"):
        print(
            f"  {tool:12s} {med[tool]:7.3f} s/call   EPE {epe[tool]:.3f} px   "
            f"(min {min(res[tool]):.3f}, max {max(res[tool]):.3f})"
        )
    print(f"  speed-up     {med['pyflowreg'] / med['flowsession']:.2f}x")


if __name__ == "__main__":
    main()
