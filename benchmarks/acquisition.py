#!/usr/bin/env python3
"""A volumetric ScanImage acquisition end to end: planes, channels, files, scan phase.

Writes a synthetic two-plane, two-channel acquisition split over three ScanImage-shaped
BigTIFF files (cut inside volumes, so planes and channels continue across files), every
odd row displaced by a known bidirectional scan phase, with known motion per plane
(``flowsession.synthetic_acquisition``).  It is then corrected four ways, all three
stages each:

* ``volume``: the acquisition as it is, ``bidi_correction = "auto"``;
* ``plain``: each plane's frames (same pixels, same phase) as its own one-file
  recording, ``bidi_correction = "auto"``: must equal ``volume``;
* ``no bidi``: the acquisition with ``bidi_correction = false``;
* ``clean``: each plane written without a scan phase, as its own recording (the best
  any correction of the phase can do).

Printed per plane: the estimated offset and the Stage 1 endpoint error against the
truth, the mean over the interior (a border of 8 px excluded) of |w - truth| after
removing the per-pixel time mean of the difference (each recording registers onto its
own reference), and the Pearson correlation of the corrected temporal average
(channel 1) with the true scene: the flow cannot remove a scan phase (its fields are
smooth, the phase alternates row by row), so without correction the phase stays in
every frame and blurs the average.

    python benchmarks/acquisition.py --size 96 --frames 50 --bidi 1.5
"""

import argparse
import json
import logging
import os
import shutil
import sys
import tempfile
import time

import h5py
import numpy as np
import tifffile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

import flowsession as fs  # noqa: E402

B = 8


def epe(folder, truth):
    with h5py.File(os.path.join(folder, "w.hdf5"), "r") as f:
        w = np.stack([f["u"][:], f["v"][:]], axis=-1)
    err = (w - truth)[:, B:-B, B:-B]
    err = err - err.mean(axis=0)
    return float(np.hypot(err[..., 0], err[..., 1]).mean())


def fidelity(folder, plane, size):
    """Pearson r of a recording's corrected temporal average (channel 1) with the true
    scene, moved onto the average by their rigid shift (interior only)."""
    avg = np.load(os.path.join(folder, "temporal_average.npy"))[..., 0]
    yy, xx = np.mgrid[0 : size[0], 0 : size[1]].astype(float)
    cells = max(8, size[0] * size[1] // 250)
    scene = fs._synthetic_scene(xx, yy, seed=1000 * (3 + plane), n_cells=cells, size=size)
    dx, dy = fs.estimate_rigid_shift(avg, scene, upsample=20)
    scene = fs._synthetic_scene(xx + dx, yy + dy, seed=1000 * (3 + plane), n_cells=cells, size=size)
    a, b = avg[B:-B, B:-B].ravel(), scene[B:-B, B:-B].ravel()
    return float(np.corrcoef(a, b)[0, 1])


def session(root, frames, **kw):
    flow = {
        "quality_setting": "balanced",
        "reference_frames": list(range(min(20, frames))),
        "save_w": True,
        "weight": [1, 0],
    }
    return fs.SessionConfig(root=root, flow_options=flow, sigma_smooth=2.0, **kw)


def write_plain(folder, frames):
    os.makedirs(folder, exist_ok=True)
    tifffile.imwrite(
        os.path.join(folder, "file_00001.tif"),
        np.moveaxis(frames, -1, 1).astype(np.int16),
        imagej=True,
        metadata={"axes": "TCYX"},
    )


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", type=int, default=96)
    ap.add_argument("--frames", type=int, default=50)
    ap.add_argument("--bidi", type=float, default=1.5)
    ap.add_argument("--keep", help="folder to keep the files in (default: a temporary one)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    top = args.keep or tempfile.mkdtemp(prefix="flowsession-acq-")
    shutil.rmtree(top, ignore_errors=True)
    size = (args.size, args.size)
    vol = os.path.join(top, "volume")
    planes, truth = fs.synthetic_acquisition(
        vol, n_frames=args.frames, size=size, n_files=3, bidi=args.bidi
    )
    # (its own truth: the noise draws consume the generator unevenly, so the motion differs)
    clean = [fs.synthetic_recording(args.frames, size, 2, seed=3 + k) for k in range(2)]
    files = sorted(f for f in os.listdir(vol) if f.endswith(".tif"))
    pages = [len(tifffile.TiffFile(os.path.join(vol, f)).pages) for f in files]
    print(
        f"acquisition: 2 planes x 2 channels x {args.frames} volumes of {args.size}x{args.size}, "
        f"files {', '.join(f'{f} ({n} pages)' for f, n in zip(files, pages))}; "
        f"scan phase {args.bidi:+.2f} px; flow weight [1, 0] (aligned on channel 1)"
    )
    t0 = time.monotonic()
    fs.run_all_stages(session(vol, args.frames, bidi_correction="auto"))
    t_vol = time.monotonic() - t0
    nob = os.path.join(top, "nobidi")
    shutil.copytree(vol, nob, ignore=shutil.ignore_patterns("compensated_outputs", "final*"))
    fs.run_all_stages(session(nob, args.frames))
    rows = []
    for k in range(2):
        plain, ideal = os.path.join(top, f"plain{k}"), os.path.join(top, f"clean{k}")
        write_plain(plain, planes[k])
        write_plain(ideal, clean[k][0])
        fs.run_all_stages(session(plain, args.frames, bidi_correction="auto"))
        fs.run_all_stages(session(ideal, args.frames))
        out = os.path.join(vol, "compensated_outputs", f"plane{k}", "file_00001")
        status = json.load(open(os.path.join(out, "status.json")))["stage1"]
        pout = os.path.join(plain, "compensated_outputs", "file_00001")
        pstatus = json.load(open(os.path.join(pout, "status.json")))["stage1"]
        with h5py.File(os.path.join(out, "compensated.hdf5")) as a:
            with h5py.File(os.path.join(pout, "compensated.hdf5")) as b:
                same = all(np.array_equal(a[c][:], b[c][:]) for c in ("ch1", "ch2"))
        rows.append(
            (
                k,
                status["bidi_offset"],
                pstatus["bidi_offset"],
                epe(out, truth[k]),
                epe(pout, truth[k]),
                "yes" if same else "NO",
                epe(os.path.join(nob, "compensated_outputs", f"plane{k}", "file_00001"), truth[k]),
                epe(os.path.join(ideal, "compensated_outputs", "file_00001"), clean[k][1]),
                fidelity(out, k, size),
                fidelity(
                    os.path.join(nob, "compensated_outputs", f"plane{k}", "file_00001"), k, size
                ),
                fidelity(os.path.join(ideal, "compensated_outputs", "file_00001"), k, size),
            )
        )
    print(f"volume run (3 stages, 2 planes): {t_vol:.1f} s; outputs in {vol}")
    print(
        "plane  offset (volume / plain)  EPE volume  EPE plain  identical  "
        "EPE no bidi  EPE clean   (px)   average vs truth r: volume / no bidi / clean"
    )
    for k, ov, op, ev, ep, same, en, ec, rv, rn, rc in rows:
        print(
            f"{k:5d}  {ov:+7.3f} / {op:+7.3f}     {ev:10.3f} {ep:10.3f}  {same:>9s}  "
            f"{en:11.3f} {ec:10.3f}          {rv:.4f} / {rn:.4f} / {rc:.4f}"
        )
    for k in range(2):
        print(
            f"final_results/plane{k}:",
            ", ".join(
                sorted(
                    f
                    for f in os.listdir(os.path.join(vol, "final_results", f"plane{k}"))
                    if not f.startswith(".")
                )
            ),
        )
    if not args.keep:
        shutil.rmtree(top, ignore_errors=True)


if __name__ == "__main__":
    main()
