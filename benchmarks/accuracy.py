#!/usr/bin/env python3
"""Accuracy of Stage 1 on noisy recordings: motion invented on a still movie, error under known motion.

For each data set (a *still* movie: no motion, or already registered) and each method, one run
prints side by side:

* **invented** -- Stage 1 on the still movie: mean over frames and interior pixels of
  |w - time-mean w| (px).  A perfect method returns a constant field; everything else is
  motion it made up from the noise and would put into the corrected movie.
* **EPE-rel** -- Stage 1 on the same movie moved by known motion (a rigid AR(1) walk of
  standard deviation 1.5 px plus a smooth non-rigid AR(1) field of 0.5 px per node on a
  5x5 grid, cubic interpolation): mean |d - time-mean d| with d = w - truth.  The per-pixel
  time mean is removed because every method registers onto its own reference.
* **bouts** / **events** -- EPE-rel under sudden motion, over all frames and over the event
  frames only (each event's frame and the two after it): a slow rigid drift (AR(1), 0.3 px
  standard deviation) and, every 15 to 45 frames (uniform, mean 30), an event -- with
  probability 1/2 a jump of 2-5 px in a random direction that relaxes back exponentially
  with a time constant of 40 frames, else a twitch of 2-4 px in a random direction lasting
  1-3 frames; the non-rigid field of the smooth profile, its amplitude doubled on the 3
  frames from each event.  This is how a head-fixed mouse moves when it grooms, licks or
  starts to run.
* **fps** -- frames per second of the correction of the moved movie (in process, after a
  warm-up; reference, flows, warps and writing included for flowsession).

A border of ``--border`` px (default 20) is excluded from both errors.

Methods: flowsession's presets ``fast`` and ``balanced`` with the default Stage 1 model and
with ``stage1_method = "matlab"`` (the toolbox's fixed parameters), and suite2p when it is
installed: ``suite2p.registration.registration_wrapper`` with suite2p's default registration
settings (rigid + non-rigid), its integer rigid shifts plus its block shifts expanded to a
dense field as suite2p applies them (bilinear between block centres, constant beyond them).

Data sets:

* ``synth-p2``, ``synth-p10``: make_synth still recordings (``--rigid-std 0 --nonrigid-amp 0``)
  at 2 and 10 photons/px baseline, ``--size`` px, ``--frames`` frames; needs
  ``--make-synth PATH`` (default ``../shared/bench/make_synth.py`` next to the project);
* ``real``: ``--real FILE`` (a TIFF or .npy movie ``(T, H, W)``), still or already registered --
  for instance the neurofinder training movie of the README's accuracy section (images
  ``image00000.tiff``-``image00599.tiff`` of github.com/neuhofmo/calcium-imaging-neuron-detection
  at commit bc3757c, central 256x256 crop); no data licence is stated, so it is not shipped.

    python benchmarks/accuracy.py --frames 200 --size 256 --real movie.tif
"""

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time

import h5py
import numpy as np
from scipy import ndimage

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

import flowsession as fs  # noqa: E402


def _ar1(rng, T, std, rho, size):
    """An AR(1) series (T, *size) of stationary std ``std`` and lag-1 correlation ``rho``."""
    x = np.zeros((T, *size))
    x[0] = rng.normal(0, std, size)
    for t in range(1, T):
        x[t] = rho * x[t - 1] + rng.normal(0, std * np.sqrt(1 - rho**2), size)
    return x


def _dense(nodes, H, W, grid):
    """Node displacements (T, grid, grid, 2) upsampled (cubic) to fields (T, H, W, 2)."""
    d = np.empty((len(nodes), H, W, 2))
    zoom = (H / grid, W / grid)
    for t in range(len(nodes)):
        for k in range(2):
            d[t, ..., k] = ndimage.zoom(nodes[t, ..., k], zoom, order=3, mode="nearest")[:H, :W]
    return d


def known_motion(shape, seed=0, rigid_std=1.5, nonrigid_std=0.5, grid=5):
    """Forward field d (T, H, W, 2) (x, y) of the known motion: rigid AR(1) + smooth AR(1)."""
    T, H, W = shape
    rng = np.random.default_rng(seed)
    rigid = _ar1(rng, T, rigid_std, 0.97, (2,))
    nodes = _ar1(rng, T, nonrigid_std, 0.9, (grid, grid, 2))
    return _dense(nodes, H, W, grid) + rigid[:, None, None, :]


def bouts_motion(shape, seed=0, drift_std=0.3, nonrigid_std=0.5, grid=5, tau=40.0):
    """Forward field d (T, H, W, 2) of the bouts profile (see the module docstring) and the
    event frames (T,) bool: each event's frame and the two after it."""
    T, H, W = shape
    rng = np.random.default_rng(seed + 1000)
    rigid = _ar1(rng, T, drift_std, 0.97, (2,))
    events = np.zeros(T, bool)
    boost = np.ones(T)
    t0 = int(rng.integers(15, 46))
    while t0 < T:
        angle = rng.uniform(0, 2 * np.pi)
        direction = np.array([np.cos(angle), np.sin(angle)])
        if rng.random() < 0.5:  # a jump that relaxes back
            amp = rng.uniform(2, 5)
            k = np.arange(T - t0)
            rigid[t0:] += amp * direction * np.exp(-k / tau)[:, None]
        else:  # a twitch
            amp = rng.uniform(2, 4)
            rigid[t0 : t0 + int(rng.integers(1, 4))] += amp * direction
        events[t0 : t0 + 3] = True
        boost[t0 : t0 + 3] = 2.0
        t0 += int(rng.integers(15, 46))
    nodes = _ar1(rng, T, nonrigid_std, 0.9, (grid, grid, 2))
    d = _dense(nodes, H, W, grid) * boost[:, None, None, None] + rigid[:, None, None, :]
    return d, events


def move(still, d):
    """Moved movie m(q) = still(q + d(q)) and the registration truth g, m(p + g(p)) = still(p)."""
    T, H, W = still.shape
    yy, xx = np.mgrid[0:H, 0:W].astype(np.float64)
    moved = np.empty(still.shape, np.float64)
    g = np.empty_like(d)
    for t in range(T):
        moved[t] = ndimage.map_coordinates(
            still[t].astype(np.float64),
            [yy + d[t, ..., 1], xx + d[t, ..., 0]],
            order=3,
            mode="reflect",
        )
        gt = -d[t].copy()
        for _ in range(20):  # fixed point g = -d(p + g)
            for k in range(2):
                gt[..., k] = -ndimage.map_coordinates(
                    d[t, ..., k], [yy + gt[..., 1], xx + gt[..., 0]], order=1, mode="nearest"
                )
        g[t] = gt
    if np.issubdtype(still.dtype, np.integer):
        info = np.iinfo(still.dtype)
        moved = np.clip(np.round(moved), info.min, info.max)
    return moved.astype(still.dtype), g


def invented(w, b, frames=None):
    """Mean |w - time-mean w| over interior pixels and ``frames`` (bool (T,); None: all)."""
    d = w[:, b:-b, b:-b]
    d = d - d.mean(axis=0)
    e = np.hypot(d[..., 0], d[..., 1])
    return float((e if frames is None else e[frames]).mean())


def epe_rel(w, truth, b, frames=None):
    return invented(w - truth, b, frames)


def run_flowsession(movie, preset, method, workers):
    tmp = tempfile.mkdtemp(prefix="flowsession-accuracy-")
    try:
        with h5py.File(os.path.join(tmp, "rec.h5"), "w") as f:
            f["ch1"] = movie
        opts = {"quality_setting": preset, "save_w": True}
        if method not in (None, "default"):
            opts["stage1_method"] = method
        cfg = fs.SessionConfig(
            root=tmp, pattern="*.h5", n_workers=workers, resume=False, flow_options=opts
        )
        t0 = time.perf_counter()
        out = fs.run_stage1(cfg)[0]
        dt = time.perf_counter() - t0
        with h5py.File(os.path.join(out, "w.hdf5"), "r") as f:
            w = np.stack([f["u"][:], f["v"][:]], axis=-1).astype(np.float64)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return w, dt


def suite2p_available():
    try:
        import suite2p  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - any import failure means "not usable here"
        return f"{type(exc).__name__}: {exc}".splitlines()[0][:120]
    return None


def run_suite2p(movie):
    """suite2p's default registration; its shifts as a dense field (T, H, W, 2) (x, y)."""
    import torch
    from suite2p import default_settings
    from suite2p.registration import nonrigid, registration_wrapper

    settings = default_settings()["registration"]
    T, H, W = movie.shape
    f_reg = np.ascontiguousarray(np.clip(movie, -32768, 32767).astype(np.int16))
    t0 = time.perf_counter()
    out = registration_wrapper(f_reg, settings=settings, device=torch.device("cpu"))
    dt = time.perf_counter() - t0
    w = np.zeros((T, H, W, 2))
    w[..., 0] += np.asarray(out["xoff"], np.float64)[:, None, None]
    w[..., 1] += np.asarray(out["yoff"], np.float64)[:, None, None]
    if settings["nonrigid"] and out.get("yoff1") is not None:
        yblock, xblock, nblocks = nonrigid.make_blocks(H, W, block_size=settings["block_size"])[:3]
        yc = np.array(yblock[:: nblocks[1]]).mean(axis=1).astype(int)
        xc = np.array(xblock[: nblocks[1]]).mean(axis=1).astype(int)
        ys, xs = np.arange(H), np.arange(W)
        for k, key in ((1, "yoff1"), (0, "xoff1")):
            blocks = np.asarray(out[key], np.float64).reshape(T, *nblocks)
            for t in range(T):
                rows = np.stack([np.interp(xs, xc, blocks[t, i]) for i in range(nblocks[0])])
                w[t, ..., k] += np.stack([np.interp(ys, yc, rows[:, j]) for j in range(W)], 1)
    return w, dt


def synth_still(make_synth, photons, size, frames, seed, folder):
    out = os.path.join(folder, f"still_p{photons:g}")
    cmd = [sys.executable, make_synth, "--out", out, "--size", str(size), "--frames", str(frames)]
    cmd += ["--seed", str(seed), "--photons", str(photons), "--rigid-std", "0"]
    cmd += ["--nonrigid-amp", "0"]
    subprocess.run(cmd, check=True, capture_output=True)
    import tifffile

    return tifffile.imread(os.path.join(out, "rec_00.tif"))


def load_movie(path, frames):
    if path.endswith(".npy"):
        m = np.load(path)
    else:
        import tifffile

        m = tifffile.imread(path)
    if m.ndim != 3:
        raise SystemExit(f"{path}: expected a (T, H, W) movie, got shape {m.shape}")
    return m[:frames]


def main():
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--frames", type=int, default=200)
    ap.add_argument("--seed", type=int, default=3)
    ap.add_argument("--border", type=int, default=20)
    ap.add_argument("--workers", type=int, default=-1)
    ap.add_argument("--photons", type=float, nargs="*", default=[2, 10])
    ap.add_argument("--real", default=None, help="a still real movie (TIFF or .npy, (T, H, W))")
    ap.add_argument(
        "--make-synth",
        default=os.path.join(os.path.dirname(os.path.dirname(HERE)), "shared/bench/make_synth.py"),
    )
    ap.add_argument("--presets", nargs="*", default=["fast", "balanced"])
    ap.add_argument("--methods", nargs="*", default=["adaptive", "matlab"])
    ap.add_argument("--no-suite2p", action="store_true")
    a = ap.parse_args()

    tmp = tempfile.mkdtemp(prefix="flowsession-accuracy-data-")
    data = []
    try:
        if a.photons and os.path.exists(a.make_synth):
            for p in a.photons:
                data.append(
                    (f"synth-p{p:g}", synth_still(a.make_synth, p, a.size, a.frames, a.seed, tmp))
                )
        elif a.photons:
            print(f"make_synth not found at {a.make_synth}: synthetic data sets skipped")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if a.real:
        data.append(("real", load_movie(a.real, a.frames)))
    if not data:
        raise SystemExit("no data set: give --real FILE or --make-synth PATH")

    methods = [(f"flowsession {p} {m}", p, m) for p in a.presets for m in a.methods]
    s2p_missing = "switched off (--no-suite2p)" if a.no_suite2p else suite2p_available()
    if s2p_missing is None:
        methods.append(("suite2p (rigid + non-rigid)", None, None))
    warm = data[0][1][:30]
    run_flowsession(warm, "fast", None, a.workers)  # compile / load the Numba caches

    rows = []
    head = f"{'data':10} {'method':32} {'invented':>9} {'EPE-rel':>9} {'bouts':>9} {'events':>9}"
    head += f" {'fps':>8}"
    print(head)
    for name, still in data:
        moved, truth = move(still, known_motion(still.shape, seed=a.seed))
        bd, events = bouts_motion(still.shape, seed=a.seed)
        b_moved, b_truth = move(still, bd)
        zero = np.zeros_like(truth)
        for label, preset, method in methods:
            if preset is None:
                w0, _ = run_suite2p(still)
                w1, dt = run_suite2p(moved)
                w2, _ = run_suite2p(b_moved)
            else:
                w0, _ = run_flowsession(still, preset, method, a.workers)
                w1, dt = run_flowsession(moved, preset, method, a.workers)
                w2, _ = run_flowsession(b_moved, preset, method, a.workers)
            rows.append(
                (
                    name,
                    label,
                    invented(w0, a.border),
                    epe_rel(w1, truth, a.border),
                    epe_rel(w2, b_truth, a.border),
                    epe_rel(w2, b_truth, a.border, events),
                    len(moved) / dt,
                )
            )
            print(_row(rows[-1]), flush=True)
        rows.append(
            (
                name,
                "no correction",
                0.0,
                epe_rel(zero, truth, a.border),
                epe_rel(zero, b_truth, a.border),
                epe_rel(zero, b_truth, a.border, events),
                float("nan"),
            )
        )
    print()
    shape = data[0][1].shape
    print(
        f"Stage 1 accuracy, {shape[1]}x{shape[2]}, {shape[0]} frames, border {a.border} px "
        f"(invented: still movie; EPE-rel: the movie moved by known smooth motion; bouts: "
        f"moved by the bouts profile, all frames; events: its event frames; px)"
    )
    if s2p_missing is not None:
        print(f"suite2p absent: {s2p_missing}")
    print(head)
    for r in rows:
        print(_row(r))


def _row(r):
    return f"{r[0]:10} {r[1]:32} " + " ".join(f"{v:9.3f}" for v in r[2:6]) + f" {r[6]:8.1f}"


if __name__ == "__main__":
    main()
