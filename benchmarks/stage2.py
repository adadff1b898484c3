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

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time

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


METHODS = {
    "rigid": None,  # the rigid step of the default method alone
    "flowsession": {"stage2_method": "flowsession"},
    "flowsession cs": {"stage2_method": "flowsession", "stage2_constancy_assumption": "cs"},
    "matlab": {"stage2_method": "matlab"},
}


def run_methods(averages, cfg):
    """Fields ``(N, H, W, 2)`` of every method, and whether each alignment is credible."""
    out, credible = {}, {}
    for name, over in METHODS.items():
        fields, ok = [np.zeros(averages.shape[1:3] + (2,))], [True]
        for avg in averages[1:]:
            if over is None:
                dx, dy, _, _ = fs.stage2_rigid_shift(averages[0], avg, cfg.cc_upsample)
                w = np.empty(avg.shape[:2] + (2,))
                w[..., 0], w[..., 1] = dx, dy
            else:
                w = fs.compute_between_displacement(
                    averages[0], avg, dataclasses.replace(cfg, **over)
                )
            fields.append(w)
            ok.append(fs.stage2_alignment_quality(averages[0], avg, w)["credible"])
        out[name], credible[name] = np.stack(fields), ok
    return out, credible


def run_pyflowreg(python, averages, work):
    if not python or not os.path.exists(python):
        return None
    src, dst = os.path.join(work, "pfr_in.npz"), os.path.join(work, "pfr_out.npy")
    np.savez(src, averages=averages)
    subprocess.check_call(
        [python, "-c", PFR, src, dst, work], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    return np.load(dst)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[64, 128, 256])
    ap.add_argument("--frames", type=int, default=30)
    ap.add_argument("--session", type=int, default=4)
    ap.add_argument("--seed", type=int, default=3)
    ap.add_argument("--relit", type=int, default=2, help="recording whose light changes")
    ap.add_argument("--make-synth", default=SYNTH)
    ap.add_argument(
        "--pyflowreg-python",
        default=os.path.expanduser("~/.cache/flowsession-bench/pfr-venv/bin/python"),
    )
    a = ap.parse_args()
    work = tempfile.mkdtemp(prefix="fs-stage2-")
    cfg = fs.SessionConfig(root=work, pattern="*.none")
    names = list(METHODS) + ["pyflowreg"]
    print(
        f"Stage 2 endpoint error (px), {a.session} recordings of {a.frames} frames, center "
        "rec_00; mean over the other recordings (+light: the relit recording alone); "
        "* = alignment flagged not credible"
    )
    print(f"{'case':12}" + "".join(f"{n:>16}" for n in names))
    rows = []
    for size in a.sizes:
        averages, G = make_session(work, size, a.frames, a.session, a.seed, a.make_synth)
        relit = averages.copy()
        relit[a.relit] = relight(relit[a.relit])
        border = max(4, round(0.08 * size))
        for case, avgs, which in (
            (f"{size}", averages, range(1, a.session)),
            (f"{size} +light", relit, [a.relit]),
        ):
            t0 = time.monotonic()
            fields, credible = run_methods(avgs, cfg)
            pfr = run_pyflowreg(a.pyflowreg_python, avgs, work)
            if pfr is not None:
                fields["pyflowreg"] = pfr
                credible["pyflowreg"] = [
                    fs.stage2_alignment_quality(avgs[0], avg, w)["credible"]
                    for avg, w in zip(avgs, pfr)
                ]
            row = {"case": case}
            cells = []
            for n in names:
                if n not in fields:
                    cells.append(f"{'-':>16}")
                    continue
                errs = [epe(fields[n][k], G[k], eval_mask(G[k], border)) for k in which]
                row[n] = float(np.mean(errs))
                flag = "*" if not all(credible[n][k] for k in which) else " "
                cells.append(f"{row[n]:>15.3f}{flag}")
            rows.append(row)
            print(f"{case:12}" + "".join(cells) + f"   ({time.monotonic() - t0:.0f} s)", flush=True)
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
