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

Recordings that move (``--raw FILE ...`` and/or ``--short``; then only these are measured): per
method the rigid motion left in the corrected movie -- each frame's shift against the mean of
the other frames (tapered cross-correlation after a 1-px blur, over the interior), as the norm
of the per-axis standard deviations / the largest shift, px; every method's fields applied by
the same bilinear warp.  ``--raw``: real raw recordings (TIFF, .npy or the first 3-d data set
of an HDF5 file), for instance ``sima/tests/data/example.tif`` of github.com/losonczylab/sima
(20 frames 128x256 that move within and between frames; GPL-2.0, not shipped).  ``--short``:
two short recordings cut from ``--real`` and moved by known jumps (`jumps_motion`): 20 frames
of a 128-row band, jumps to 8.5 px, and 30 frames of the whole frame binned 4x4 to 64x64, jumps
to 13 px; their EPE-rel is printed too, and the residual of the cut before it was moved (the
measure's floor on noisy frames).

    python benchmarks/accuracy.py --presets balanced --raw example.tif --short --real movie.tif
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


def _shift(frame, ref):
    """Rigid shift (dx, dy) of ``frame`` against ``ref`` (both (H, W)), px: the peak of their
    cross-correlation (both tapered by a Hann window and made zero-mean under it), refined by
    a parabola through the peak and its neighbours on each axis."""
    H, W = ref.shape
    win = np.outer(np.hanning(H), np.hanning(W))
    a, b = frame * win, ref * win
    a = (a - win * (a.sum() / win.sum())) * win
    b = (b - win * (b.sum() / win.sum())) * win
    c = np.fft.irfft2(np.fft.rfft2(a) * np.conj(np.fft.rfft2(b)), s=(H, W))
    c = np.fft.fftshift(c)
    i, j = np.unravel_index(np.argmax(c), c.shape)
    out = []
    for p, n, axis in ((j, W, 1), (i, H, 0)):
        lo, mid, hi = (c[i, (p + k) % n] if axis else c[(p + k) % n, j] for k in (-1, 0, 1))
        den = lo - 2 * mid + hi
        out.append(p - n // 2 + (0.5 * (lo - hi) / den if den < 0 else 0.0))
    return np.array(out)


def residual_motion(movie, border):
    """Rigid motion left in a movie ``(T, H, W)``: each frame's shift (`_shift`, after a
    Gaussian blur of 1 px against noise) against the mean of the other frames, over the
    interior (``border`` px off each side).  NaN pixels (sampled outside the frame, see
    `unwarp`) count in neither: the mean of the others is taken where they are valid, and
    they are filled with the mean of their image before the blur.  Returns (norm of the
    per-axis standard deviations of the shifts, the largest shift's length), px."""
    m = np.asarray(movie, np.float64)[:, border : movie.shape[1] - border]
    m = m[:, :, border : m.shape[2] - border]
    valid = np.isfinite(m)
    total, count = np.where(valid, m, 0.0).sum(axis=0), valid.sum(axis=0)

    def filled(img, ok):
        return ndimage.gaussian_filter(np.where(ok, img, img[ok].mean() if ok.any() else 0), 1)

    s = []
    for t in range(len(m)):
        n = count - valid[t]
        others = np.where(n > 0, (total - np.where(valid[t], m[t], 0.0)) / np.maximum(n, 1), np.nan)
        s.append(_shift(filled(m[t], valid[t]), filled(others, np.isfinite(others))))
    s = np.array(s)
    return float(np.hypot(*s.std(axis=0))), float(np.hypot(*(s - s.mean(axis=0)).T).max())


def unwarp(movie, w):
    """The movie ``(T, H, W)`` corrected by fields ``w`` ``(T, H, W, 2)``: frame t at p + w(p)
    (bilinear; NaN where p + w(p) is outside the frame), the same warp for every method."""
    T, H, W = movie.shape
    yy, xx = np.mgrid[0:H, 0:W].astype(np.float64)
    out = np.empty((T, H, W))
    for t in range(T):
        out[t] = ndimage.map_coordinates(
            np.asarray(movie[t], np.float64),
            [yy + w[t, ..., 1], xx + w[t, ..., 0]],
            order=1,
            mode="constant",
            cval=np.nan,
        )
    return out


def jumps_motion(shape, seed=0, largest=13.0, n_jumps=3, nonrigid_std=0.3, grid=5):
    """Forward field d (T, H, W, 2) of a short recording that jumps: the frame holds still
    (a drift of 0.2 px standard deviation) between ``n_jumps`` jumps at random frames, each
    to a new place up to ``largest`` px from the start in a random direction (the largest
    exactly ``largest`` px away), one of them a twitch of 1-2 frames that comes back; a
    smooth non-rigid field of ``nonrigid_std`` px per node."""
    T, H, W = shape
    rng = np.random.default_rng(seed + 2000)
    rigid = _ar1(rng, T, 0.2, 0.9, (2,))
    at = np.sort(rng.choice(np.arange(2, T - 2), n_jumps, replace=False))
    amps = rng.uniform(0.4, 1.0, n_jumps) * largest
    amps[rng.integers(n_jumps)] = largest
    place = np.zeros((T, 2))
    for k, t0 in enumerate(at):
        angle = rng.uniform(0, 2 * np.pi)
        to = amps[k] * np.array([np.cos(angle), np.sin(angle)])
        if k == n_jumps - 1:  # a twitch of 1-2 frames that comes back
            place[t0 : t0 + int(rng.integers(1, 3))] = to
        else:
            place[t0:] = to
    rigid += place
    nodes = _ar1(rng, T, nonrigid_std, 0.9, (grid, grid, 2))
    return _dense(nodes, H, W, grid) + rigid[:, None, None, :]


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
    # suite2p's non-rigid step needs at least two blocks along each side: on smaller
    # frames its blocks shrink to half the side (its default elsewhere)
    settings["block_size"] = [min(b, n // 2) for b, n in zip(settings["block_size"], (H, W))]
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
    elif path.endswith((".h5", ".hdf5")):
        with h5py.File(path, "r") as f:
            sets = []
            f.visititems(lambda n, o: sets.append(n) if getattr(o, "ndim", 0) == 3 else None)
            if not sets:
                raise SystemExit(f"{path}: no 3-d data set (T, H, W) in this HDF5 file")
            m = f[sets[0]][:]
            if m.shape[-1] < m.shape[0] and m.shape[-1] < m.shape[1]:
                m = np.moveaxis(m, -1, 0)  # (H, W, T), as some tools store it
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
    ap.add_argument(
        "--raw",
        nargs="*",
        default=[],
        help="real raw recordings that move (TIFF, .npy or HDF5): the rigid motion each method "
        "leaves in them",
    )
    ap.add_argument(
        "--short",
        action="store_true",
        help="short recordings cut from --real, moved by known jumps (20 frames 128x256 up to "
        "8.5 px, 30 frames 64x64 up to 13 px)",
    )
    a = ap.parse_args()
    s2p_missing = "switched off (--no-suite2p)" if a.no_suite2p else suite2p_available()
    if a.raw or a.short:
        short = []
        if a.short:
            if not a.real:
                raise SystemExit("--short cuts its recordings from --real FILE: give it")
            still = load_movie(a.real, None)
            T, H, W = still.shape
            # 20 frames: a 128-row band across the middle; 30 frames: the whole frame
            # binned 4x4 to 64x64 (a low-zoom scan: a 64x64 crop is too noisy to align)
            cut20 = still[:20, (H - 128) // 2 : (H - 128) // 2 + 128, :256]
            cut30 = still[:30, : H // 4 * 4, : W // 4 * 4].astype(np.float64)
            cut30 = cut30.reshape(30, H // 4, 4, W // 4, 4).mean(axis=(2, 4))
            for cut, largest in ((cut20, 8.5), (cut30.astype(still.dtype), 13.0)):
                d = jumps_motion(cut.shape, seed=a.seed, largest=largest)
                moved, truth = move(cut, d)
                T, h, w = cut.shape
                short.append((f"{T} frames {h}x{w}, jumps to {largest:g} px", moved, truth, cut))
        raw = [(os.path.basename(f), load_movie(f, a.frames), None, None) for f in a.raw]
        moving_table(raw + short, a.presets, s2p_missing, a.workers)
        return

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


def moving_table(recordings, presets, s2p_missing, workers):
    """Recordings that move, ``(name, movie, truth or None, still or None)``: per method the
    rigid motion left in the corrected movie (`residual_motion`: norm of per-axis std /
    largest, px) and, where the motion is known, the EPE-rel over all frames (in brackets);
    ``still``: the movie before it was moved, whose residual is the measure's floor (what
    noise alone makes it read)."""
    run_flowsession(recordings[0][1][:30], presets[0], None, workers)  # warm the caches
    cols = [(f"{p} default", p, None) for p in presets]
    cols += [(f'{p} "matlab"', p, "matlab") for p in presets]
    if s2p_missing is None:
        cols.append(("suite2p", None, None))
    table = []
    for name, movie, truth, still in recordings:
        H, W = movie.shape[1:]
        b = min(20, min(H, W) // 8)
        if truth is not None:  # not the content `move` mirrored in at the edges
            b = max(b, int(np.ceil(np.abs(truth).max())) + 1)
        floor = "-" if still is None else "{:.2f} / {:.2f}".format(*residual_motion(still, b))
        row = [("uncorrected", residual_motion(movie, b), None)]
        if truth is not None:
            row[0] = (*row[0][:2], epe_rel(np.zeros_like(truth), truth, b))
        for label, preset, method in cols:
            if preset is None:
                w, _ = run_suite2p(movie)
            else:
                w, _ = run_flowsession(movie, preset, method, workers)
            epe = None if truth is None else epe_rel(w, truth, b)
            row.append((label, residual_motion(unwarp(movie, w), b), epe))
            print(
                f"{name}: {label}: residual {row[-1][1][0]:.2f} / {row[-1][1][1]:.2f} px"
                + ("" if epe is None else f", EPE-rel {epe:.3f} px"),
                flush=True,
            )
        table.append((f"{name} ({len(movie)}x{H}x{W}, border {b})", floor, row))
    print()
    print("Rigid motion left (each frame against the mean of the others: norm of the per-axis")
    print("std / largest, px); in brackets EPE-rel (px) where the motion is known; floor: the")
    print("residual of the movie before it was moved")
    print("| recording | floor | " + " | ".join(lab for lab, _, _ in table[0][2]) + " |")
    print("|---" * (len(table[0][2]) + 2) + "|")
    for name, floor, row in table:
        cells = [
            f"{r[0]:.2f} / {r[1]:.2f}" + ("" if e is None else f" ({e:.3f})") for _, r, e in row
        ]
        print(f"| {name} | {floor} | " + " | ".join(cells) + " |")
    if s2p_missing is not None:
        print(f"suite2p absent: {s2p_missing}")


def _row(r):
    return f"{r[0]:10} {r[1]:32} " + " ".join(f"{v:9.3f}" for v in r[2:6]) + f" {r[6]:8.1f}"


if __name__ == "__main__":
    main()
