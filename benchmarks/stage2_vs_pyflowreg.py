#!/usr/bin/env python3
"""Stage 2 of flowsession and of pyflowreg on the same temporal averages, against the truth.

1. ``../shared/bench/make_synth.py --session N`` writes N recordings of one anatomy, each
   re-positioned by 5-20 px plus a smooth deformation, with the true field ``G_r`` that
   registers recording r's view onto recording 0's (``session_gt.npz``).
2. flowsession's Stage 1 corrects every recording once (``--preset``, ``save_w``).
3. Both tools' Stage 2 run on those same ``temporal_average.npy`` files with recording 0 as
   the center and their default parameters (pyflowreg's ``run_stage2`` reads the same layout).
4. Each recording's temporal average is registered onto a reference built from its own data,
   displaced from the motion-free view by the mean Stage 1 residual d_r (measured from the
   saved fields and the per-frame truth), so the expected Stage 2 field is
   ``G_r + d_0 - d_r``.  Mean endpoint error over the interior (``--border`` px excluded).

    python benchmarks/stage2_vs_pyflowreg.py --size 256 --frames 60 --session 4
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile

import h5py
import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

PFR = r"""
import sys
from pyflowreg.session.config import SessionConfig
from pyflowreg.session.stage2_between_avgs import run_stage2
root, out = sys.argv[1], sys.argv[2]
run_stage2(SessionConfig(root=root, pattern="rec_*.tif", output_root=out, center="rec_00.tif",
                         resume=False))
"""


def read_field(folder):
    with np.load(os.path.join(folder, "w_to_reference.npz")) as d:
        return np.stack([d["u"], d["v"]], axis=-1).astype(np.float64)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--frames", type=int, default=60)
    ap.add_argument("--session", type=int, default=4)
    ap.add_argument("--preset", default="balanced")
    ap.add_argument("--border", type=int, default=20)
    ap.add_argument("--seed", type=int, default=3)
    ap.add_argument(
        "--pyflowreg-python",
        default=os.path.expanduser("~/.cache/flowsession-bench/pfr-venv/bin/python"),
    )
    a = ap.parse_args()
    work = tempfile.mkdtemp(prefix="fs-stage2-")
    data = os.path.join(work, "data")
    subprocess.check_call(
        [
            sys.executable,
            os.path.join(ROOT, "..", "shared", "bench", "make_synth.py"),
            "--out",
            data,
            "--size",
            str(a.size),
            "--frames",
            str(a.frames),
            "--session",
            str(a.session),
            "--seed",
            str(a.seed),
        ],
        stdout=subprocess.DEVNULL,
    )
    sys.path.insert(0, ROOT)
    import flowsession as fs

    fs_out = os.path.join(work, "out_flowsession")
    cfg = fs.SessionConfig(
        root=data,
        pattern="rec_*.tif",
        output_root=fs_out,
        center="rec_00.tif",
        flow_options={
            "quality_setting": a.preset,
            "save_w": True,
            "reference_frames": list(range(min(50, a.frames))),
        },
    )
    fs.run_stage1(cfg)
    pfr_out = os.path.join(work, "out_pyflowreg")
    shutil.copytree(fs_out, pfr_out)
    fs.run_stage2(cfg)
    subprocess.check_call(
        [a.pyflowreg_python, "-c", PFR, data, pfr_out],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    G = np.load(os.path.join(data, "session_gt.npz"))["G"].astype(np.float64)
    b = a.border
    files = sorted(f for f in os.listdir(data) if f.startswith("rec_") and f.endswith(".tif"))
    delta = []
    for f in files:
        stem = f[:-4]
        truth = np.load(os.path.join(data, f"{stem}_flow_gt.npy")).astype(np.float64)
        with h5py.File(os.path.join(fs_out, stem, "w.hdf5"), "r") as h:
            w = np.stack([h["u"][:], h["v"][:]], axis=-1)
        delta.append((w - truth)[:, b:-b, b:-b].mean(axis=(0, 1, 2)))
    rows = []
    print(
        f"Stage 2, {a.session} recordings {a.size}x{a.size}, center rec_00, inputs: the same "
        f"temporal averages (flowsession Stage 1, {a.preset}); EPE px, {b}-px border excluded"
    )
    print(
        f"{'recording':10} {'offset px':>9} {'rigid only':>10} {'flowsession':>11} {'pyflowreg':>9}"
    )
    for k, f in enumerate(files[1:], start=1):
        stem = f[:-4]
        expected = G[k] + (delta[0] - delta[k])
        inner = (slice(b, -b), slice(b, -b))

        def epe(w):
            return float(np.hypot(*(w - expected)[inner].transpose(2, 0, 1)).mean())

        rigid = np.broadcast_to(expected[inner].reshape(-1, 2).mean(axis=0), expected.shape)
        row = dict(
            recording=stem,
            offset=float(np.hypot(*G[k][inner].reshape(-1, 2).mean(0))),
            rigid_only=epe(rigid),
            flowsession=epe(read_field(os.path.join(fs_out, stem))),
            pyflowreg=epe(read_field(os.path.join(pfr_out, stem))),
        )
        rows.append(row)
        print(
            f"{stem:10} {row['offset']:9.2f} {row['rigid_only']:10.3f} {row['flowsession']:11.3f} "
            f"{row['pyflowreg']:9.3f}"
        )
    mean = {
        k: float(np.mean([r[k] for r in rows])) for k in ("rigid_only", "flowsession", "pyflowreg")
    }
    print(
        f"{'mean':10} {'':9} {mean['rigid_only']:10.3f} {mean['flowsession']:11.3f} "
        f"{mean['pyflowreg']:9.3f}"
    )
    print("(rigid only: the best constant field, for scale)")
    print(json.dumps({"rows": rows, "mean": mean}))


if __name__ == "__main__":
    main()
