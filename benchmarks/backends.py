#!/usr/bin/env python3
"""Flow backends side by side: Stage 1 frames/s and endpoint error on one synthetic recording.

The recording is ``flowsession._bench_recording`` (ring cells on a smooth background, every
frame moved by a rigid jitter plus a smooth field, Poisson noise), written once to HDF5;
Stage 1 (``run_stage1``: reference, flows, warps, writing) corrects it once per backend and
preset, like ``flowsession.py bench``.  The endpoint error is the mean over the interior
(a border of max(4, size/16) px excluded) of |w - truth| after removing the per-pixel time
mean of the difference (the recording registers onto its own reference), as in ``bench``.

Presets: for ``flowreg`` and ``flowreg_torch`` the flow option ``quality_setting``
(fast / balanced / quality: finest pyramid level 6 / 4 / 0); for ``diso`` its
``backend_params.preset`` (ultrafast / fast / medium), since the variational presets do
not apply to DIS.  Each backend's first configuration runs twice and only the second run
is timed (the first includes Numba compilation and torch start-up).

    python benchmarks/backends.py --size 256 --frames 50
"""

import argparse
import os
import shutil
import sys
import tempfile
import time

import h5py
import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

import flowsession as fs  # noqa: E402

RUNS = {
    "flowreg": [(q, {}, q) for q in ("fast", "balanced", "quality")],
    "flowreg_torch": [(q, {"device": "cpu"}, q) for q in ("fast", "balanced", "quality")],
    "diso": [(p, {"preset": p}, "quality") for p in ("ultrafast", "fast", "medium")],
}


def endpoint_error(w, w_true, border):
    err = (w - w_true)[:, border:-border, border:-border]
    err -= err.mean(axis=0)
    return float(np.hypot(err[..., 0], err[..., 1]).mean())


def stage1(root, backend, backend_params, quality, workers, n_frames):
    cfg = fs.SessionConfig(
        root=root,
        pattern="*.h5",
        n_workers=workers,
        resume=False,
        flow_backend=backend,
        backend_params=backend_params,
        flow_options={
            "quality_setting": quality,
            "save_w": True,
            "reference_frames": list(range(min(50, n_frames))),
        },
    )
    t0 = time.perf_counter()
    out = fs.run_stage1(cfg)[0]
    dt = time.perf_counter() - t0
    with h5py.File(os.path.join(out, "w.hdf5"), "r") as f:
        w = np.stack([f["u"][:], f["v"][:]], axis=-1).astype(np.float64)
    shutil.rmtree(out)
    return dt, w


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--frames", type=int, default=50)
    ap.add_argument("--workers", type=int, default=-1, help="Stage 1 threads (-1: all CPUs)")
    ap.add_argument("--backends", default="flowreg,flowreg_torch,diso")
    args = ap.parse_args(argv)
    frames, w_true = fs._bench_recording(args.frames, (args.size, args.size), 1)
    border = max(4, args.size // 16)
    moved = w_true[:, border:-border, border:-border]
    epe0 = float(np.hypot(*(moved - moved.mean(axis=0)).transpose(3, 0, 1, 2)).mean())
    tmp = tempfile.mkdtemp(prefix="flowsession-backends-")
    rows = []
    try:
        with h5py.File(os.path.join(tmp, "bench.h5"), "w") as f:
            f["ch1"] = frames[..., 0]
        for backend in args.backends.split(","):
            try:
                fs.make_backend(backend, RUNS[backend][0][1])
            except fs.ConfigError as exc:
                print(f"# {backend} skipped: {exc}")
                continue
            for k, (preset, params, quality) in enumerate(RUNS[backend]):
                if k == 0:  # compilation and start-up, once per backend
                    stage1(tmp, backend, params, quality, args.workers, args.frames)
                dt, w = stage1(tmp, backend, params, quality, args.workers, args.frames)
                rows.append((backend, preset, args.frames / dt, endpoint_error(w, w_true, border)))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    workers = fs.SessionConfig(root=".", n_workers=args.workers).n_workers_effective()
    print(
        f"Stage 1, {args.size}x{args.size}, {args.frames} frames, 1 channel, {workers} worker "
        f"thread(s); endpoint error without correction {epe0:.3f} px ({border}-px border "
        "excluded)"
    )
    print(f"| {'backend':13} | {'preset':9} | {'frames/s':>8} | {'EPE (px)':>8} |")
    print(f"|{'-' * 15}|{'-' * 11}|{'-' * 10}|{'-' * 10}|")
    for backend, preset, fps, epe in rows:
        print(f"| {backend:13} | {preset:9} | {fps:8.2f} | {epe:8.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
