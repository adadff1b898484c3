#!/usr/bin/env python3
"""Stage 1 with ``flowreg_cuda`` and with ``flowreg`` on the same synthetic recording.

Needs a machine with an NVIDIA GPU (not run in CI).  The recording is
``flowsession._bench_recording`` (ring cells, a rigid jitter plus a smooth field
per frame, Poisson noise) with its true fields; each backend runs the whole of
Stage 1 (reference, flows, warps, writing) on it, the first run of each after an
untimed warm-up on a short recording (JIT compilation).  Prints frames/s and the
mean endpoint error against the truth for both, and their fields' difference.

    python benchmarks/cuda_stage1.py --size 512 --frames 1000 --preset quality
    python benchmarks/cuda_stage1.py --size 512 --frames 2000 --preset balanced \
        --precision float32 --cpu-frames 100
"""

import argparse
import os
import shutil
import sys
import tempfile
import time

import h5py
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import flowsession as fs  # noqa: E402


def stage1(frames, backend, backend_params, preset, workers):
    """Run Stage 1 on ``frames``; returns (seconds, fields (T, H, W, 2))."""
    tmp = tempfile.mkdtemp(prefix="flowsession-cuda-bench-")
    try:
        with h5py.File(os.path.join(tmp, "rec.h5"), "w") as f:
            for c in range(frames.shape[3]):
                f[f"ch{c + 1}"] = frames[..., c]
        cfg = fs.SessionConfig(
            root=tmp,
            pattern="*.h5",
            n_workers=workers,
            resume=False,
            flow_backend=backend,
            backend_params=backend_params,
            flow_options={
                "quality_setting": preset,
                "save_w": True,
                "reference_frames": list(range(min(50, len(frames)))),
            },
        )
        t0 = time.perf_counter()
        out = fs.run_stage1(cfg)[0]
        dt = time.perf_counter() - t0
        with h5py.File(os.path.join(out, "w.hdf5"), "r") as f:
            w = np.stack([f["u"][:], f["v"][:]], axis=-1).astype(np.float64)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dt, w


def epe(w, truth, size):
    b = max(4, size // 16)
    err = (w - truth)[:, b:-b, b:-b]
    err -= err.mean(axis=0)  # the recording registers onto its own reference
    return float(np.hypot(err[..., 0], err[..., 1]).mean())


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--frames", type=int, default=1000)
    p.add_argument(
        "--cpu-frames",
        type=int,
        default=None,
        help="frames for the CPU run (default: --frames; the CPU is much slower)",
    )
    p.add_argument("--channels", type=int, default=1)
    p.add_argument("--preset", default="quality", choices=["quality", "balanced", "fast"])
    p.add_argument("--precision", default="float32", choices=["float32", "float64"])
    p.add_argument("--device", type=int, default=0)
    p.add_argument("--batch-frames", type=int, default=None)
    p.add_argument("--workers", type=int, default=-1, help="CPU threads (default: all)")
    a = p.parse_args(argv)
    size = (a.size, a.size)
    frames, truth = fs._bench_recording(a.frames, size, a.channels)
    warm, _ = fs._bench_recording(8, size, a.channels, seed=2)
    gpu_params = {"device": a.device, "precision": a.precision}
    if a.batch_frames:
        gpu_params["batch_frames"] = a.batch_frames
    n_cpu = a.cpu_frames or a.frames
    print(f"Stage 1, {a.size}x{a.size}, {a.channels} channel(s), preset {a.preset}")
    results = {}
    for name, params, n in (("flowreg_cuda", gpu_params, a.frames), ("flowreg", {}, n_cpu)):
        stage1(warm, name, params, a.preset, a.workers)  # compilation
        dt, w = stage1(frames[:n], name, params, a.preset, a.workers)
        results[name] = w
        print(
            f"  {name:13s} {n / dt:9.1f} frames/s  ({n} frames, {dt:.1f} s)   "
            f"endpoint error {epe(w, truth[:n], a.size):.3f} px"
        )
    n = min(a.frames, n_cpu)
    diff = np.abs(results["flowreg_cuda"][:n] - results["flowreg"][:n]).max()
    print(
        f"  largest field difference between the backends: {diff:.3g} px "
        "(red-black vs the toolbox's SOR order; see flowsession's CUDA section)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
