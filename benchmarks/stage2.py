#!/usr/bin/env python3
"""Stage 2 endpoint error of every Stage-2 method (and of pyflowreg's Stage 2) side by side.

For each size, ``../shared/bench/make_synth.py --session N`` writes N recordings of one
anatomy; recording r sees it through a known field, and ``session_gt.npz`` holds ``G_r``,
the field that registers recording r's view onto recording 0's (the center).  Each
recording's temporal average is the mean of its raw frames registered with their true
per-frame field (a perfect Stage 1), so the expected Stage-2 field is exactly ``G_r`` and the
error measured is Stage 2's alone.  The case ``+light`` changes the brightness and contrast
of one recording's average as between imaging days (gain falling from 0.9 to 0.5 across the
frame, offset +30 % of the mean).

Endpoint error: mean ``|w - G_r|`` over the pixels whose match ``p + G_r(p)`` lies inside
the frame, a border of 8 % of the size excluded; the mean over the N - 1 recordings is
printed per method.  pyflowreg's ``compute_between_displacement`` runs with its
``SessionConfig`` defaults on the same averages when ``--pyflowreg-python`` exists.

    python benchmarks/stage2.py --sizes 64 128 256 --frames 30 --session 4
"""

import os
import subprocess
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

import flowsession as fs  # noqa: E402

SYNTH = os.path.join(ROOT, "..", "shared", "bench", "make_synth.py")

PFR = r"""
import sys, numpy as np
from pyflowreg.session.config import SessionConfig
from pyflowreg.session.stage2_between_avgs import compute_between_displacement
d = np.load(sys.argv[1])
avgs = d["averages"]
cfg = SessionConfig(root=sys.argv[3], pattern="*.none")
out = [np.zeros(avgs[0].shape[:2] + (2,))]
for a in avgs[1:]:
    out.append(compute_between_displacement(avgs[0], a, cfg))
np.save(sys.argv[2], np.stack(out).astype(np.float64))
"""


def make_session(work, size, frames, n, seed, synth=SYNTH):
    """Averages ``(N, H, W, 1)`` registered with the true per-frame fields, and ``G``."""
    data = os.path.join(work, f"synth_{size}")
    subprocess.check_call(
        [
            sys.executable,
            synth,
            "--out",
            data,
            "--size",
            str(size),
            "--frames",
            str(frames),
            "--session",
            str(n),
            "--seed",
            str(seed),
        ],
        stdout=subprocess.DEVNULL,
    )
    avgs = []
    for r in range(n):
        with fs.open_video(os.path.join(data, f"rec_{r:02d}.tif")) as reader:
            video = reader.read(0, len(reader)).astype(np.float64)
        truth = np.load(os.path.join(data, f"rec_{r:02d}_flow_gt.npy")).astype(np.float64)
        acc = np.zeros(video.shape[1:])
        for t in range(len(video)):
            acc += fs.imregister_wrapper(video[t], truth[t, ..., 0], truth[t, ..., 1], video[t])
        avgs.append(acc / len(video))
    G = np.load(os.path.join(data, "session_gt.npz"))["G"].astype(np.float64)
    return np.stack(avgs), G


def relight(avg):
    """A day-to-day brightness and contrast change: gain 0.9 -> 0.5 across x, offset +30 %."""
    gain = np.linspace(0.9, 0.5, avg.shape[1])[None, :, None]
    return gain * avg + 0.3 * avg.mean()


def eval_mask(g, border):
    H, W = g.shape[:2]
    yy, xx = np.mgrid[0:H, 0:W]
    x2, y2 = xx + g[..., 0], yy + g[..., 1]
    m = (x2 >= 0) & (x2 <= W - 1) & (y2 >= 0) & (y2 <= H - 1)
    inner = np.zeros_like(m)
    inner[border:-border, border:-border] = True
    return m & inner


def epe(w, g, mask):
    return float(np.hypot(*(w - g).transpose(2, 0, 1))[mask].mean())
