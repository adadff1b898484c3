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

Cross-day cases from a real recording (``--mean FILE``: a movie ``(T, H, W)`` or one image,
``.npy`` or TIFF; ``--rois``: a neurofinder ``regions.json`` of its cells): six sessions, each
the mean of its own sixth of the movie (its own activity), the center as it is and five others
seen through a known similarity transform plus a smooth deformation of 1.5 px, with one
day-to-day change each: ``shift`` (none), ``dim`` (grey levels 4-59 up to the 99.9th
percentile under a light spot, defocused), ``vignette`` (brightness falling to 25 % towards
one corner, an offset), ``rot+3 dim`` (rotated 3 degrees, scaled +2 %, dim), ``rot-3 cells``
(rotated -3 degrees, scaled -2 %, every cell's brightness multiplied by a random gain between
0.3 and 2.5: bright one day, dark the next), all with shot noise.  Per case and method:
endpoint error (px, mean over the overlap, 8 % border excluded) and, with ``--rois``, the
cells' masks brought into the center's grid through the field against their true place:
median centroid distance (px) and mean IoU.  ``--before FILE``: another ``flowsession.py``
(e.g. ``git show main:flowsession.py > /tmp/before/flowsession.py``) adds its default method
as a column; ``translation+flow`` is the default method without its global model.

    python benchmarks/stage2.py --sizes --mean movie.npy --rois regions.json --before b/flowsession.py

``--hard``: harder cross-day cases (``CROSS_DAY_HARD``: each day its own active cells, a small
z-shift, its own neuropil, another plane's cells, 2.5 px of deformation, +-3 degrees).
``--cellreg DIR``: CellReg's five real sample sessions (``SampleData``, github.com/zivlab/CellReg,
GPL-2), scored by the cells' mutual nearest-neighbour pairs; ``--cellreg-rotate`` turns them.
ROICaT's column needs ``--roicat-python``: an interpreter with ``roicat`` (no extras) and
``opencv-contrib-python-headless``, ``sparse``, ``optuna``, ``richfile``, ``tqdm``, ``psutil``:

    python3 -m venv --system-site-packages /tmp/roicat-venv
    /tmp/roicat-venv/bin/python -m pip install roicat opencv-contrib-python-headless \
        sparse optuna richfile tqdm psutil
    python benchmarks/stage2.py --sizes --cellreg CellReg/SampleData --roicat-python \
        /tmp/roicat-venv/bin/python

The error estimate (``--estimate``): per recording of the cross-day session and of a make_synth
session of six recordings (``--sizes``), Stage 2's estimated error against the true one, as
aligned and with one or two fields given a smooth error of known size. ``--timing``: the
cross-day session written as six 3-frame recordings, Stage 1 run, then ``run_stage2`` timed
without and with the estimate, alternating ``--repeats`` times. ``--safeguard``: whether a
recording ends worse than its rigid shift or its field's affine part, on the cross-day cases
and on days that share only part of their content with the center, and what the structure
correlation and the cycle estimate would choose.

    python benchmarks/stage2.py --estimate --sizes 256 --mean movie.npy --rois regions.json
    python benchmarks/stage2.py --timing --repeats 2 --mean movie.npy --rois regions.json
    python benchmarks/stage2.py --safeguard --mean movie.npy --rois regions.json
"""

import argparse
import dataclasses
import json
import math
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


# ROICaT's non-deep alignment as its pipeline runs it on mean images only: local brightness
# normalisation, ECC (euclidean) onto the center, then DeepFlow from the geometric result.  The
# package's __init__ imports its deep-learning parts, so only ``helpers``, ``util`` and
# ``tracking.alignment`` are loaded (and a torchvision that fails to import is stubbed: the
# ECC + DeepFlow path does not use it).
ROICAT = r"""
import sys, types, importlib.util, numpy as np
try:
    import torchvision  # noqa: F401
except Exception:
    sys.modules["torchvision"] = types.ModuleType("torchvision")
for name in ("roicat", "roicat.tracking"):
    spec = importlib.util.find_spec(name)
    mod = types.ModuleType(name)
    mod.__path__ = list(spec.submodule_search_locations)
    sys.modules[name] = mod
from roicat.tracking import alignment
d = np.load(sys.argv[1])
ims = [a[..., 0].astype(np.float32) for a in d["averages"]]
al = alignment.Aligner(use_match_search=True, um_per_pixel=1.0, device="cpu", verbose=False)
fov = al.augment_FOV_images(FOV_images=ims, spatialFootprints=None, normalize_FOV_intensities=True,
                            use_CLAHE=False, local_norm_sigma_um=12.0)
ecc = {"mode_transform": "euclidean", "n_iter": 200, "termination_eps": 1e-09,
       "gaussFiltSize": 1, "auto_fix_gaussFilt_step": 10}
al.fit_geometric(template=0, ims_moving=fov, template_method="image", method="ECC_cv2",
                 kwargs_method={"ECC_cv2": ecc}, constraint="affine", verbose=False)
al.transform_images_geometric(fov)
remap = al.fit_nonrigid(template=0, ims_moving=al.ims_registered_geo,
                        remappingIdx_init=al.remappingIdx_geo, template_method="image",
                        method="DeepFlow", kwargs_method={"DeepFlow": {}})
H, W = ims[0].shape
yy, xx = np.mgrid[0:H, 0:W]
out = [np.stack([r[..., 0] - xx, r[..., 1] - yy], axis=-1) for r in remap]
out[0][:] = 0.0
np.save(sys.argv[2], np.nan_to_num(np.stack(out).astype(np.float64)))
"""


def run_roicat(python, averages, work):
    """ROICaT's fields ``(N, H, W, 2)`` onto ``averages[0]``, or None (reason printed)."""
    if not python or not os.path.exists(python):
        print(f"ROICaT skipped: no interpreter at {python} (--roicat-python)")
        return None
    src, dst = os.path.join(work, "roicat_in.npz"), os.path.join(work, "roicat_out.npy")
    np.savez(src, averages=averages)
    run = subprocess.run([python, "-c", ROICAT, src, dst], capture_output=True, text=True)
    if run.returncode != 0:
        last = (run.stderr.strip().splitlines() or ["no message"])[-1]
        print(f"ROICaT skipped: {last}")
        return None
    return np.load(dst)


def add_roicat(fields, credible, averages, python, work):
    """Adds ROICaT's column to ``fields`` and ``credible`` where it runs."""
    got = run_roicat(python, averages, work) if python else None
    if got is not None:
        fields["roicat"] = got
        credible["roicat"] = [
            fs.stage2_alignment_quality(averages[0], avg, w)["credible"]
            for avg, w in zip(averages, got)
        ]


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


CROSS_DAY = {
    # name: (dx, dy, rotation deg, scale, appearance change)
    "shift": (12.0, -7.0, 0.0, 1.0, None),
    "dim": (-9.0, 14.0, 0.0, 1.0, "dim"),
    "vignette": (6.0, 9.0, 0.0, 1.0, "vignette"),
    "rot+3 dim": (-5.0, -11.0, 3.0, 1.02, "dim"),
    "rot-3 cells": (8.0, 4.0, -3.0, 0.98, "cells"),
}


def load_days(path, n):
    """``n`` images ``(n, H, W)`` of one plane: a 2-D image repeated, or the means of ``n``
    consecutive blocks of a movie ``(T, H, W)`` (each day then has its own activity)."""
    if path.endswith(".npy"):
        img = np.load(path)
    else:
        import tifffile

        img = tifffile.imread(path)
    img = np.asarray(img, dtype=np.float64)
    if img.ndim == 2:
        return np.repeat(img[None], n, axis=0)
    return np.stack([b.mean(axis=0) for b in np.array_split(img, n)])


def roi_masks(path, shape):
    """Boolean masks of a neurofinder ``regions.json`` (``coordinates`` as (row, col))."""
    out = []
    with open(path) as fh:
        for region in json.load(fh):
            c = np.asarray(region["coordinates"], dtype=int).reshape(-1, 2)
            m = np.zeros(shape, dtype=bool)
            ok = (c[:, 0] >= 0) & (c[:, 0] < shape[0]) & (c[:, 1] >= 0) & (c[:, 1] < shape[1])
            m[c[ok, 0], c[ok, 1]] = True
            if m.sum() >= 10:
                out.append(m)
    return out


def day_map(shape, dx, dy, angle, scale, seed, amp=1.5):
    """``S(q) - q``: where pixel q of the day's image samples the anatomy (center's grid)."""
    from scipy.ndimage import gaussian_filter

    H, W = shape
    yy, xx = np.mgrid[0:H, 0:W].astype(np.float64)
    cy, cx = (H - 1) / 2, (W - 1) / 2
    t = math.radians(angle)
    x0, y0 = xx - cx, yy - cy
    sx = cx + scale * (math.cos(t) * x0 - math.sin(t) * y0) + dx
    sy = cy + scale * (math.sin(t) * x0 + math.cos(t) * y0) + dy
    rng = np.random.default_rng(seed)
    smooth = [gaussian_filter(rng.standard_normal(shape), H / 8, mode="wrap") for _ in range(2)]
    smooth = [amp * s / np.abs(s).max() for s in smooth]
    return np.stack([sx + smooth[0] - xx, sy + smooth[1] - yy], axis=-1)


def invert_map(d):
    """The registration field w with ``S(p + w(p)) = p`` (fixed-point iteration)."""
    from scipy.ndimage import map_coordinates

    H, W = d.shape[:2]
    yy, xx = np.mgrid[0:H, 0:W].astype(np.float64)
    w = -d.copy()
    for _ in range(30):
        coords = [yy + w[..., 1], xx + w[..., 0]]
        dq = np.stack(
            [map_coordinates(d[..., k], coords, order=1, mode="nearest") for k in (0, 1)], -1
        )
        w = -dq
    return w


def sample(img, d, order=3):
    from scipy.ndimage import map_coordinates

    H, W = img.shape
    yy, xx = np.mgrid[0:H, 0:W].astype(np.float64)
    return map_coordinates(img, [yy + d[..., 1], xx + d[..., 0]], order=order, mode="nearest")


def appearance(img, change, rng, masks):
    """One day's look: cells' brightness (before the warp, in the anatomy's grid)."""
    if change != "cells" or not masks:
        return img
    gain = np.ones(img.shape)
    for m in masks:
        gain[m] = rng.uniform(0.3, 2.5)
    from scipy.ndimage import gaussian_filter

    return img * gaussian_filter(gain, 1.0)


def lighting(img, change, rng):
    """One day's light, focus and detector: vignetting, dimming, noise (in the day's grid)."""
    from scipy.ndimage import gaussian_filter

    H, W = img.shape
    yy, xx = np.mgrid[0:H, 0:W] / max(H, W)
    lo, hi = np.percentile(img, [0.5, 99.5])
    x = (img - lo) / (hi - lo)
    photons = 200.0
    if change == "dim":  # another focus and a light spot off the center
        spot = np.exp(-((xx - 0.25) ** 2 + (yy - 0.7) ** 2) / 0.3)
        x = gaussian_filter(x, 1.0) * (0.2 + 0.8 * spot)
        photons = 40.0
    elif change == "vignette":
        x = x * (1.0 - 0.75 * np.hypot(xx, yy) / math.sqrt(2)) + 0.15
    x = rng.poisson(np.clip(x, 0, None) * photons) / photons
    if change == "dim":  # a few dozen grey levels, as a badly set detector gives
        return np.clip(np.round(4 + 55 * x / max(np.percentile(x, 99.9), 1e-9)), 0, 255)
    return 1000.0 * x


def cross_day_session(days, masks, seed):
    """Averages ``(N, H, W, 1)`` (the center first), true fields ``G`` and day maps ``D``
    ``(N, H, W, 2)``, and the cases' names; ``days``: one real image per session."""
    rng = np.random.default_rng(seed)
    shape = days.shape[1:]
    zero = np.zeros(shape + (2,))
    avgs, G, D, names = [lighting(days[0], None, rng)], [zero], [zero], ["center"]
    for k, (name, (dx, dy, angle, scale, change)) in enumerate(CROSS_DAY.items()):
        d = day_map(shape, dx, dy, angle, scale, seed + k)
        img = appearance(days[(k + 1) % len(days)], change, rng, masks)
        avgs.append(lighting(sample(img, d), change, rng))
        G.append(invert_map(d))
        D.append(d)
        names.append(name)
    return np.stack(avgs)[..., None], np.stack(G), np.stack(D), names


# Harder cross-day cases (``--hard``): on top of each case's light, every non-center day has
# its own set of active cells (each cell's brightness times a log-normal gain, a quarter of
# them nearly dark: cells that appear and disappear), a focal plane a little off (the whole
# image blurred, a third of the cells swollen and dimmed as a z-shift shows them), its own
# neuropil (a smooth +-40 % modulation of everything outside the cells), a smooth deformation
# of 2.5 px, and the remount of the ``rot`` cases.
CROSS_DAY_HARD = {
    # name: (dx, dy, rotation deg, scale, lighting change)
    "other plane": (10.0, -6.0, 0.0, 1.0, "plane"),
    "cells rot+3": (-7.0, 9.0, 3.0, 1.02, None),
    "dim rot-3": (5.0, 12.0, -3.0, 0.98, "dim"),
    "vignette rot+3": (-11.0, -4.0, 3.0, 0.99, "vignette"),
    "neuropil rot-3": (6.0, 5.0, -3.0, 1.01, None),
}


def hard_appearance(img, masks, rng, neuropil=0.4, plane=0.0):
    """Another day's cells, focus and neuropil (in the anatomy's grid); ``plane``: the
    weight of another focal plane's cells mixed in (the image turned by 90 degrees), half
    the cells nearly dark (a session sharing few cells)."""
    from scipy.ndimage import binary_dilation, gaussian_filter

    H, W = img.shape
    cells = np.zeros((H, W), dtype=bool)
    gain = np.ones((H, W))
    swollen = np.zeros((H, W), dtype=bool)
    for m in masks:
        g = 0.4 if rng.random() < (0.5 if plane else 0.25) else float(rng.lognormal(0.0, 0.5))
        gain[m] = g
        cells |= m
        if rng.random() < 1 / 3:
            swollen |= binary_dilation(m, iterations=2)
    field = gaussian_filter(rng.standard_normal((H, W)), H / 16, mode="wrap")
    field /= np.abs(field).max()
    background = np.where(cells, 1.0, 1.0 + neuropil * field)
    out = img * gaussian_filter(gain, 1.0) * gaussian_filter(background, 1.0)
    blurred = gaussian_filter(out, 2.0) * 0.8
    out = np.where(swollen, np.maximum(blurred, 0.8 * out), out)
    if plane:
        out = (1 - plane) * out + plane * np.rot90(out) * out.mean() / np.rot90(out).mean()
    return gaussian_filter(out, 0.7)


def cross_day_session_hard(days, masks, seed):
    """``cross_day_session`` of the ``CROSS_DAY_HARD`` cases."""
    rng = np.random.default_rng(seed)
    shape = days.shape[1:]
    zero = np.zeros(shape + (2,))
    avgs, G, D, names = [lighting(days[0], None, rng)], [zero], [zero], ["center"]
    for k, (name, (dx, dy, angle, scale, change)) in enumerate(CROSS_DAY_HARD.items()):
        d = day_map(shape, dx, dy, angle, scale, seed + 10 + k, amp=2.5)
        plane = 0.5 if change == "plane" else 0.0
        img = hard_appearance(days[(k + 1) % len(days)], masks, rng, plane=plane)
        change = None if change == "plane" else change
        avgs.append(lighting(sample(img, d), change, rng))
        G.append(invert_map(d))
        D.append(d)
        names.append(name)
    return np.stack(avgs)[..., None], np.stack(G), np.stack(D), names


def cell_scores(w, g, d, masks):
    """Median centroid distance (px) and mean IoU of the cells' masks brought into the
    center's grid through ``w`` against their true place (cells inside the overlap only).

    The day's image shows anatomy point ``S(q) = q + d(q)`` at its pixel q, so a cell's
    mask ``m`` in the day's grid is ``m(S(q))`` and, brought back through w, ``m(S(p + w(p)))``;
    the true field g gives back m itself."""
    from scipy.ndimage import map_coordinates

    H, W = w.shape[:2]
    yy, xx = np.mgrid[0:H, 0:W].astype(np.float64)
    qy, qx = yy + w[..., 1], xx + w[..., 0]
    sx = qx + map_coordinates(d[..., 0], [qy, qx], order=1, mode="nearest")
    sy = qy + map_coordinates(d[..., 1], [qy, qx], order=1, mode="nearest")
    outside = (qx < 0) | (qx > W - 1) | (qy < 0) | (qy > H - 1)
    inside = eval_mask(g, 2)
    dist, iou = [], []
    for m in masks:
        if not inside[m].all():
            continue
        r0, r1 = np.nonzero(m.any(axis=1))[0][[0, -1]]
        c0, c1 = np.nonzero(m.any(axis=0))[0][[0, -1]]
        pad = 40
        sl = (slice(max(r0 - pad, 0), r1 + pad + 1), slice(max(c0 - pad, 0), c1 + pad + 1))
        back = map_coordinates(m.astype(np.float64), [sy[sl], sx[sl]], order=1, cval=0.0)
        got = (back >= 0.5) & ~outside[sl]
        ms = m[sl]
        if not got.any():
            dist.append(float("inf"))
            iou.append(0.0)
            continue
        c_true = np.array(np.nonzero(ms)).mean(axis=1)
        c_got = np.array(np.nonzero(got)).mean(axis=1)
        dist.append(float(np.hypot(*(c_true - c_got))))
        iou.append(float((ms & got).sum() / (ms | got).sum()))
    return float(np.median(dist)), float(np.mean(iou))


def load_before(path):
    """The module of another ``flowsession.py``, imported by name as ``flowsession_before``
    from a copy beside it (Numba's cache needs a module it can import again)."""
    import importlib
    import shutil

    folder = os.path.dirname(os.path.abspath(path))
    copy = os.path.join(folder, "flowsession_before.py")
    if not os.path.exists(copy) or open(copy, "rb").read() != open(path, "rb").read():
        shutil.copyfile(path, copy)
    sys.path.insert(0, folder)
    try:
        return importlib.import_module("flowsession_before")
    finally:
        sys.path.remove(folder)


def cross_day_fields(averages, cfg, before=None):
    """Fields ``(N, H, W, 2)`` per method on the cross-day session, credibility, seconds."""
    variants = {"rigid": None}
    if before is not None:
        variants["before"] = before
    variants.update({"translation+flow": "translation", "flowsession": fs, "matlab": "matlab"})
    out, credible, seconds = {}, {}, {}
    for name, how in variants.items():
        t0 = time.monotonic()
        fields, ok = [np.zeros(averages.shape[1:3] + (2,))], [True]
        for avg in averages[1:]:
            if how is None:
                dx, dy, _, _ = fs.stage2_rigid_shift(averages[0], avg, cfg.cc_upsample)
                w = np.empty(avg.shape[:2] + (2,))
                w[..., 0], w[..., 1] = dx, dy
            elif how == "matlab":
                w = fs.compute_between_displacement(
                    averages[0], avg, dataclasses.replace(cfg, stage2_method="matlab")
                )
            elif how == "translation":
                model, fs.STAGE2_GLOBAL_MODEL = fs.STAGE2_GLOBAL_MODEL, "translation"
                try:
                    w = fs.compute_between_displacement(averages[0], avg, cfg)
                finally:
                    fs.STAGE2_GLOBAL_MODEL = model
            else:
                c = how.SessionConfig(root=cfg.root, pattern="*.none")
                w = how.compute_between_displacement(averages[0], avg, c)
            fields.append(w)
            ok.append(fs.stage2_alignment_quality(averages[0], avg, w)["credible"])
        out[name], credible[name] = np.stack(fields), ok
        seconds[name] = time.monotonic() - t0
    return out, credible, seconds


def every_method(a, averages):
    """Every method's fields onto ``averages[0]``: flowsession's variants (and ``--before``),
    then pyflowreg and ROICaT where their interpreters run; with each one's credibility flags
    (Stage 2's own check) and seconds."""
    work = tempfile.mkdtemp(prefix="fs-stage2-")
    cfg = fs.SessionConfig(root=work, pattern="*.none")
    before = load_before(a.before) if a.before else None
    fields, credible, seconds = cross_day_fields(averages, cfg, before)
    add_peers(fields, credible, averages, a, work)
    return fields, credible, seconds


def add_peers(fields, credible, averages, a, work):
    """pyflowreg's and ROICaT's fields onto ``averages[0]`` beside flowsession's, where their
    interpreters run, each judged by Stage 2's own credibility check."""
    pfr = run_pyflowreg(a.pyflowreg_python, averages, work)
    if pfr is not None:
        fields["pyflowreg"] = pfr
        credible["pyflowreg"] = [
            fs.stage2_alignment_quality(averages[0], avg, w)["credible"]
            for avg, w in zip(averages, pfr)
        ]
    add_roicat(fields, credible, averages, a.roicat_python, work)


def cross_day(a):
    """The cross-day table: per case and method, endpoint error / centroid / IoU."""
    days = load_days(a.mean, 1 + len(CROSS_DAY))
    masks = roi_masks(a.rois, days.shape[1:]) if a.rois else []
    make = cross_day_session_hard if a.hard else cross_day_session
    averages, G, D, names = make(days, masks, a.cross_seed)
    fields, credible, seconds = every_method(a, averages)
    methods = list(fields)
    H, W = averages.shape[1:3]
    print(
        f"Cross-day cases from {os.path.basename(a.mean)} ({H}x{W}, {len(masks)} cells): "
        "endpoint error px / median cell centroid error px / mean cell IoU; "
        "* = flagged not credible"
    )
    print(f"{'case':12}" + "".join(f"{n:>24}" for n in methods))
    border = max(4, round(0.08 * min(H, W)))
    totals = {n: [] for n in methods}
    for k in range(1, len(averages)):
        cells = []
        for n in methods:
            e = epe(fields[n][k], G[k], eval_mask(G[k], border))
            c, i = cell_scores(fields[n][k], G[k], D[k], masks) if masks else (np.nan, np.nan)
            totals[n].append((e, c, i))
            flag = " " if credible[n][k] else "*"
            cells.append(f"{e:>9.2f} {c:>6.2f} {i:>5.3f}{flag}")
        print(f"{names[k]:12}" + "".join(f"{x:>24}" for x in cells), flush=True)
    print(
        f"{'mean':12}"
        + "".join(
            f"{'{:>9.2f} {:>6.2f} {:>5.3f} '.format(*np.mean(totals[n], axis=0)):>24}"
            for n in methods
        )
    )
    print(
        f"{'seconds':12}"
        + "".join(f"{seconds.get(n, float('nan')):>23.1f} " for n in methods)
        + f"  ({len(averages) - 1} alignments)"
    )


def load_cellreg(folder):
    """CellReg's sample sessions (``spatial_footprints_0N.mat``, ``allFiltersMat`` cells x H x W,
    github.com/zivlab/CellReg ``SampleData``, GPL-2): one image per session, the sum of its
    cells' footprints each scaled to a peak of 1, zero-padded to one shape, and each cell's
    footprint-weighted centroid ``(x, y)`` in its own session's grid."""
    import glob

    from scipy.io import loadmat

    paths = sorted(glob.glob(os.path.join(folder, "spatial_footprints_*.mat")))
    if len(paths) < 2:
        raise SystemExit(f"--cellreg {folder}: no spatial_footprints_*.mat (CellReg SampleData)")
    footprints = [loadmat(p)["allFiltersMat"].astype(np.float64) for p in paths]
    H = max(f.shape[1] for f in footprints)
    W = max(f.shape[2] for f in footprints)
    images, centroids = [], []
    for f in footprints:
        f = f / np.maximum(f.max(axis=(1, 2), keepdims=True), 1e-12)
        img = np.zeros((H, W))
        img[: f.shape[1], : f.shape[2]] = f.sum(axis=0)
        images.append(img)
        yy, xx = np.mgrid[0 : f.shape[1], 0 : f.shape[2]]
        mass = f.sum(axis=(1, 2))
        centroids.append(
            np.stack([(f * xx).sum(axis=(1, 2)) / mass, (f * yy).sum(axis=(1, 2)) / mass], -1)
        )
    return np.stack(images), centroids, [os.path.basename(p) for p in paths]


def to_center_grid(points, w):
    """Points ``(n, 2)`` of a session's grid in the center's grid: p with p + w(p) = q."""
    from scipy.ndimage import map_coordinates

    p = points.copy()
    for _ in range(20):
        wp = np.stack(
            [
                map_coordinates(w[..., k], [p[:, 1], p[:, 0]], order=1, mode="nearest")
                for k in (0, 1)
            ],
            -1,
        )
        p = points - wp
    return p


def landmark_scores(center, moved, radius):
    """Cells paired as mutual nearest neighbours closer than ``radius`` px: how many, and the
    median distance of the pairs (px)."""
    from scipy.spatial import cKDTree

    d1, i1 = cKDTree(moved).query(center)
    _, i2 = cKDTree(center).query(moved)
    pair = (i2[i1] == np.arange(len(center))) & (d1 < radius)
    return int(pair.sum()), float(np.median(d1[pair])) if pair.any() else float("nan")


def cellreg_case(a):
    """CellReg's five real sessions (one-photon, days apart, cells only): each session aligned
    onto the first (CellReg's own reference), its cells' centroids brought into the first
    session's grid; cells paired as mutual nearest neighbours within 6 px (CellReg's 14 um at
    its 2.35 um per px): pairs found / median pair distance.  No independent matching exists,
    so this measures how well the cells' positions agree after the alignment, not the truth."""
    images, cents, names = load_cellreg(a.cellreg)
    if a.cellreg_rotate:  # a remounted animal: every later session turned and scaled a little
        for k in range(1, len(images)):
            sign = 1 if k % 2 else -1
            d = day_map(images.shape[1:], 4.0 * sign, -3.0, 3.0 * sign, 1 + 0.02 * sign, k, 0.0)
            images[k] = sample(images[k], d, order=1)
            cents[k] = to_center_grid(cents[k], d)
            names[k] += f" rot{sign * 3:+d}"
    averages = images[..., None] * 1000.0
    fields, credible, seconds = every_method(a, averages)
    methods = list(fields)
    H, W = images.shape[1:]
    print(
        f"CellReg sample sessions ({H}x{W}, {sum(map(len, cents))} cells): mutual nearest "
        "neighbours within 6 px: pairs / median distance px; * = flagged not credible"
    )
    print(f"{'session':24}" + "".join(f"{n:>18}" for n in methods))
    totals = {n: [] for n in methods}
    for k in range(1, len(images)):
        cells = []
        for n in methods:
            moved = to_center_grid(cents[k], fields[n][k])
            npair, dist = landmark_scores(cents[0], moved, 6.0)
            totals[n].append((npair, dist))
            flag = " " if credible[n][k] else "*"
            cells.append(f"{npair:>9d} {dist:>6.2f}{flag}")
        print(f"{names[k]:24}" + "".join(f"{x:>18}" for x in cells), flush=True)
    print(
        f"{'mean':24}"
        + "".join(
            f"{'{:>9.1f} {:>6.2f} '.format(*np.mean(totals[n], axis=0)):>18}" for n in methods
        )
    )


def session_of(averages, root, frames=3):
    """A session folder of one recording per average (``frames`` copies of it, uint16
    TIFF) whose Stage 1 has run, centred on the first; returns its ``SessionConfig``."""
    import tifffile

    os.makedirs(root, exist_ok=True)
    for k, avg in enumerate(averages):
        a = np.asarray(avg, dtype=np.float64)[..., 0]
        img = np.round(60000.0 * (a - a.min()) / max(np.ptp(a), 1e-12)).astype(np.uint16)
        tifffile.imwrite(
            os.path.join(root, f"rec_{k:02d}.tif"),
            np.repeat(img[None], frames, 0),
            imagej=True,
            metadata={"axes": "TYX"},
        )
    cfg = fs.SessionConfig(
        root=root,
        pattern="rec_*.tif",
        center="rec_00.tif",
        n_workers=2,
        flow_options={"quality_setting": "fast", "reference_frames": list(range(frames))},
    )
    fs.run_stage1(cfg)
    return cfg


def stage2_timing(a):
    """Wall time of ``run_stage2`` on the cross-day session (six 512-px averages from
    ``--mean``), without and with the error estimate, in one run, and the load around it."""
    days = load_days(a.mean, 1 + len(CROSS_DAY))
    masks = roi_masks(a.rois, days.shape[1:]) if a.rois else []
    averages, _, _, _ = cross_day_session(days, masks, a.cross_seed)
    cfg = dataclasses.replace(
        session_of(averages, tempfile.mkdtemp(prefix="fs-stage2-time-")), resume=False
    )
    print(f"Stage 2 of {len(averages)} recordings of {averages.shape[1]}x{averages.shape[2]}:")
    for _ in range(a.repeats):
        for label, on in (("without the error estimate", False), ("with the error estimate", True)):
            fs.STAGE2_ESTIMATE = on
            load0 = os.getloadavg()[0]
            t0 = time.monotonic()
            fs.run_stage2(cfg)
            dt = time.monotonic() - t0
            print(
                f"  {label:28} {dt:6.1f} s   (load average {load0:.1f} before, "
                f"{os.getloadavg()[0]:.1f} after)",
                flush=True,
            )
    fs.STAGE2_ESTIMATE = True


def wrong_field(shape, amp, seed):
    """A smooth error field of mean size about ``amp`` px (a wrong alignment)."""
    from scipy.ndimage import gaussian_filter

    rng = np.random.default_rng(seed)
    e = np.stack([gaussian_filter(rng.standard_normal(shape), shape[0] / 6) for _ in (0, 1)], -1)
    e += rng.standard_normal(2)[None, None, :] * np.abs(e).mean()
    return amp * e / np.hypot(e[..., 0], e[..., 1]).mean()


def estimate_rows(label, averages, fields, G, names, cfg, spoil=()):
    """(case, recording, true endpoint error, estimate) of each non-center recording, the
    fields of ``spoil`` (index, error field) given an error first."""
    fields = fields.copy()
    for k, err in spoil:
        fields[k] = fields[k] + err
    H, W = averages.shape[1:3]
    border = max(4, round(0.08 * min(H, W)))
    t0 = time.monotonic()
    est = fs._stage2_error_estimates(averages, fields, 0, cfg)
    dt = time.monotonic() - t0
    rows = []
    for k in range(1, len(averages)):
        true = epe(fields[k], G[k], eval_mask(G[k], border))
        rows.append((label, names[k], true, est[k]))
    return rows, dt


def estimate_table(a):
    """Estimated against true Stage-2 error per recording: the cross-day cases (``--mean``)
    and a make_synth session, as Stage 2 aligns them and with one or two recordings
    given a wrong field (a smooth error of known size added to the computed one)."""
    work = tempfile.mkdtemp(prefix="fs-stage2-est-")
    cfg = fs.SessionConfig(root=work, pattern="*.none")
    sessions = []
    if a.mean:
        days = load_days(a.mean, 1 + len(CROSS_DAY))
        masks = roi_masks(a.rois, days.shape[1:]) if a.rois else []
        averages, G, _, names = cross_day_session(days, masks, a.cross_seed)
        sessions.append(("real", averages, G, names))
    for size in a.sizes:
        averages, G = make_session(work, size, a.frames, 6, a.seed, a.make_synth)
        sessions.append((f"synth{size}", averages, G, [f"rec_{k:02d}" for k in range(6)]))
    rows, times = [], []
    for label, averages, G, names in sessions:
        fields = np.stack(
            [np.zeros(averages.shape[1:3] + (2,))]
            + [fs.compute_between_displacement(averages[0], avg, cfg) for avg in averages[1:]]
        )
        shape = averages.shape[1:3]
        cases = [
            (f"{label}", ()),
            (f"{label}, 2nd +3 px", ((2, wrong_field(shape, 3.0, 1)),)),
            (f"{label}, 4th +1 px", ((4, wrong_field(shape, 1.0, 2)),)),
            (
                f"{label}, 1st +8, 3rd +0.7 px",
                ((1, wrong_field(shape, 8.0, 3)), (3, wrong_field(shape, 0.7, 4))),
            ),
            (f"{label}, 5th +25 px", ((5, wrong_field(shape, 25.0, 5)),)),
        ]
        for case, spoil in cases:
            r, dt = estimate_rows(case, averages, fields, G, names, cfg, spoil)
            rows += r
            times.append(dt)
            for case_, name, true, est in r:
                e = "-" if est is None else f"{est:.2f}"
                print(f"{case_:28} {name:12} {true:8.2f} {e:>8}", flush=True)
    t = np.array([r[2] for r in rows])
    e = np.array([np.nan if r[3] is None else r[3] for r in rows])
    ok = np.isfinite(e)
    ratio = e[ok] / t[ok]
    print(
        f"{ok.sum()} recordings: Pearson r {np.corrcoef(t[ok], e[ok])[0, 1]:.3f}, "
        f"of the logs {np.corrcoef(np.log(t[ok]), np.log(e[ok]))[0, 1]:.3f}; estimate / "
        f"true: median {np.median(ratio):.2f}, 10th-90th percentile "
        f"{np.percentile(ratio, 10):.2f}-{np.percentile(ratio, 90):.2f}; "
        f"{np.mean(times):.1f} s per estimate"
    )
    print(
        json.dumps([[c, n, round(x, 3), None if y is None else round(y, 3)] for c, n, x, y in rows])
    )


def affine_part(w, border):
    """The least-squares affine fit of a field (its global part), inside ``border``."""
    H, W = w.shape[:2]
    yy, xx = np.mgrid[0:H, 0:W].astype(np.float64)
    sl = (slice(border, H - border), slice(border, W - border))
    A = np.stack([np.ones(xx[sl].size), xx[sl].ravel(), yy[sl].ravel()], 1)
    out = np.empty_like(w)
    for k in (0, 1):
        c = np.linalg.lstsq(A, w[sl][..., k].ravel(), rcond=None)[0]
        out[..., k] = c[0] + c[1] * xx + c[2] * yy
    return out


def safeguard_table(a):
    """Would a recording end better on the global part of its field than on the flow's?
    Per recording of the cross-day sessions (``--mean``, seeds 3 and 4) and of sessions
    whose days share only part of their content with the center (the rest the movie
    turned upside down): the true error of the rigid shift, of the Stage-2 field's affine
    part and of the field; the structure correlation and the cycle estimate of the affine
    part and of the field (and of the rigid shift); and the rules "keep the affine part
    (the rigid shift) where the field's estimate is over twice its estimate and 0.3 px
    more"."""
    days = load_days(a.mean, 1 + len(CROSS_DAY))
    masks = roi_masks(a.rois, days.shape[1:]) if a.rois else []
    cfg = fs.SessionConfig(root=tempfile.mkdtemp(prefix="fs-stage2-guard-"), pattern="*.none")
    flip = days[:, ::-1, ::-1].copy()
    sessions = [(f"real s{seed}", days, masks, seed) for seed in (3, 4)]
    for share, seed in ((0.45, 3), (0.3, 5), (0.2, 6), (0.2, 3)):
        mixed = share * days + (1.0 - share) * np.roll(flip, 1, axis=0)
        sessions.append((f"shared {share:.0%} s{seed}", mixed, [], seed))
    print(
        f"{'session':16} {'recording':12} {'rigid':>6} {'affine':>6} {'field':>6} "
        f"{'r aff':>6} {'r fld':>6} {'e rig':>6} {'e aff':>6} {'e fld':>6} guard"
    )
    res = []
    for label, d, m, seed in sessions:
        averages, G, _, names = cross_day_session(d, m, seed)
        if label.startswith("shared"):  # the center as it is: only the days mix
            averages[0] = lighting(days[0], None, np.random.default_rng(0))[..., None]
        H, W = averages.shape[1:3]
        border = max(4, round(0.08 * min(H, W)))
        zero = np.zeros((H, W, 2))
        fields, parts, rigid = [zero], [zero], [zero]
        for avg in averages[1:]:
            w = fs.compute_between_displacement(averages[0], avg, cfg)
            dx, dy, _, _ = fs.stage2_rigid_shift(averages[0], avg, cfg.cc_upsample)
            fields.append(w)
            parts.append(affine_part(w, border))
            rigid.append(np.broadcast_to(np.array([dx, dy]), (H, W, 2)))
        e_f = fs._stage2_error_estimates(averages, fields, 0, cfg)
        e_a = fs._stage2_error_estimates(averages, parts, 0, cfg)
        e_r = fs._stage2_error_estimates(averages, rigid, 0, cfg)
        for k in range(1, len(averages)):
            mask = eval_mask(G[k], border)
            tr, ta, tf = (epe(x[k], G[k], mask) for x in (rigid, parts, fields))
            ra, rf = (
                fs.stage2_alignment_quality(averages[0], averages[k], x[k])["correlation_after"]
                for x in (parts, fields)
            )
            keep_part = e_f[k] > 2 * e_a[k] and e_f[k] - e_a[k] > 0.3
            keep_rigid = e_f[k] > 2 * e_r[k] and e_f[k] - e_r[k] > 0.3
            res.append((tr, ta, tf, ta if keep_part else tf, ra > rf, tr if keep_rigid else tf))
            print(
                f"{label:16} {names[k]:12} {tr:6.2f} {ta:6.2f} {tf:6.2f} {ra:6.3f} {rf:6.3f} "
                f"{e_r[k]:6.2f} {e_a[k]:6.2f} {e_f[k]:6.2f} "
                f"{'affine part' if keep_part else '-'} {'rigid' if keep_rigid else '-'}",
                flush=True,
            )
    r = np.array(res)
    print(
        f"{len(r)} recordings: the field worse than the rigid shift in {int((r[:, 2] > r[:, 0]).sum())}, "
        f"than its affine part in {int((r[:, 2] > r[:, 1]).sum())}; the correlation prefers the "
        f"affine part in {int(r[:, 4].sum())}; mean error: field {r[:, 2].mean():.3f}, affine "
        f"part {r[:, 1].mean():.3f}, with the rule {r[:, 3].mean():.3f} px "
        f"(worse than the field in {int((r[:, 3] > r[:, 2] + 1e-9).sum())}), with the rigid "
        f"rule {r[:, 5].mean():.3f} px (worse than the field in "
        f"{int((r[:, 5] > r[:, 2] + 1e-9).sum())})"
    )


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", type=int, nargs="*", default=[64, 128, 256])
    ap.add_argument("--frames", type=int, default=30)
    ap.add_argument("--session", type=int, default=4)
    ap.add_argument("--seed", type=int, default=3)
    ap.add_argument("--relit", type=int, default=2, help="recording whose light changes")
    ap.add_argument("--make-synth", default=SYNTH)
    ap.add_argument(
        "--pyflowreg-python",
        default=os.path.expanduser("~/.cache/flowsession-bench/pfr-venv/bin/python"),
    )
    ap.add_argument(
        "--roicat-python",
        default=os.path.expanduser("~/.cache/flowsession-bench/roicat-venv/bin/python"),
        help="an interpreter with roicat and opencv-contrib-python-headless (DeepFlow)",
    )
    ap.add_argument("--mean", help="a real mean image or movie for the cross-day cases")
    ap.add_argument("--rois", help="neurofinder regions.json of the cells of --mean")
    ap.add_argument("--before", help="another flowsession.py whose default is compared")
    ap.add_argument("--cross-seed", type=int, default=1)
    ap.add_argument("--hard", action="store_true", help="the harder cross-day cases")
    ap.add_argument("--cellreg", help="CellReg's SampleData folder (spatial_footprints_*.mat)")
    ap.add_argument(
        "--cellreg-rotate",
        action="store_true",
        help="turn the CellReg sessions after the first by +-3 degrees, scale +-2 %%",
    )
    ap.add_argument(
        "--timing",
        action="store_true",
        help="time run_stage2 on the --mean session without and with the error estimate",
    )
    ap.add_argument("--repeats", type=int, default=1, help="--timing: alternating repeats")
    ap.add_argument(
        "--estimate",
        action="store_true",
        help="the error estimate against the true error (--mean cases, make_synth --sizes)",
    )
    ap.add_argument(
        "--safeguard",
        action="store_true",
        help="the field against its affine part and the rigid shift, and a cycle-based guard",
    )
    a = ap.parse_args()
    if a.safeguard:
        safeguard_table(a)
        return
    if a.estimate:
        estimate_table(a)
        return
    if a.timing:
        stage2_timing(a)
        return
    if a.cellreg:
        cellreg_case(a)
    if a.mean:
        cross_day(a)
    if not a.sizes:
        return
    work = tempfile.mkdtemp(prefix="fs-stage2-")
    cfg = fs.SessionConfig(root=work, pattern="*.none")
    names = list(METHODS) + ["pyflowreg", "roicat"]
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
            add_peers(fields, credible, avgs, a, work)
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
