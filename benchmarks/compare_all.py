"""Stage 1 side by side with pyflowreg for several frame sizes and channel counts in one run.

Runs ``../shared/bench/compare_stage1.py`` (the shared side-by-side comparison: same synthetic
recording with known motion, both tools as separate processes through their public session
APIs, whole-process frames/s, peak memory, endpoint error of the saved fields) once per size and
channel count, one after the other, and prints every table.

Two-channel recordings: the generator saves a ``(T, H, W, 2)`` array with no axis metadata,
so TIFF stores one ``(W, 2)`` page per row; pyflowreg (0.1.0a9) reads that as T*H frames of
W x 2 pixels (flowsession guesses (T, H, W, C), with a warning).  For two channels this script
therefore generates the recording itself (same generator, same arguments and seeds as the shared
script) and rewrites the same pixels as one page per frame with two samples per pixel, which both
tools read as (T, H, W, 2); the shared script then finds the data and uses it.  The reader of
the fields also undoes pyflowreg's two-channel field layout (``u`` stored as ``(T*H, W, 2)``)
should it meet one.

    python benchmarks/compare_all.py --configs 256:200:1 256:200:2 512:60:1 512:60:2
"""

import argparse
import importlib.util
import os
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))


def load_shared(path):
    spec = importlib.util.spec_from_file_location("compare_stage1", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def read_w(folder):
    """(T, H, W, 2) fields of ``folder``: flowsession's w.hdf5 or pyflowreg's w.h5."""
    import h5py

    for name in ("w.hdf5", "w.h5", "w.hdf"):
        path = os.path.join(folder, name)
        if not os.path.exists(path):
            continue
        with h5py.File(path, "r") as f:
            u, v = f["u"][()], f["v"][()]
            shape = f["u"].attrs.get("original_shape_THWC")
        if u.ndim == 3 and shape is not None and u.shape[2] == 2 and u.shape[0] % u.shape[1] == 0:
            # pyflowreg's two-channel layout: frames * rows stacked along axis 0, the last
            # axis is either (u, v) or the two channels holding one field.  The comparison
            # uses square frames, so H = W.
            T, H, W = u.shape[0] // u.shape[1], u.shape[1], u.shape[1]
            if np.array_equal(u[..., 0], u[..., 1]):
                uu, vv = u[..., 0], v[..., 0]
            else:
                uu, vv = u[..., 0], u[..., 1]
            u, v = uu.reshape(T, H, W), vv.reshape(T, H, W)
        return np.stack([u, v], axis=-1).astype(np.float64)
    raise SystemExit(f"no displacement file (w.hdf5 / w.h5) in {folder}")


def prepare_two_channel(shared_dir, work, size, frames, seed=1):
    """Generate the recordings the shared script would, stored as (T, H, W) pages of 2 samples."""
    import subprocess

    import tifffile

    gen = [sys.executable, os.path.join(shared_dir, "make_synth.py")]
    for sub, sz, fr, sd in (("data", size, frames, seed), ("tiny", "64", "8", "0")):
        out = os.path.join(work, sub)
        subprocess.check_call(
            gen
            + [
                "--out",
                out,
                "--size",
                str(sz),
                "--frames",
                str(fr),
                "--channels",
                "2",
                "--seed",
                str(sd),
            ],
            stdout=subprocess.DEVNULL,
        )
        path = os.path.join(out, "rec_00.tif")
        movie = tifffile.imread(path)
        assert movie.ndim == 4 and movie.shape[-1] == 2, movie.shape
        tifffile.imwrite(
            path, movie, photometric="minisblack", planarconfig="contig", metadata={"axes": "TYXS"}
        )


def main():
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--configs",
        nargs="+",
        default=["256:200:1", "256:200:2", "512:60:1", "512:60:2"],
        help="size:frames:channels for each comparison",
    )
    ap.add_argument("--presets", nargs="+", default=["fast", "balanced", "quality"])
    ap.add_argument(
        "--shared", default=os.path.join(HERE, "..", "..", "shared", "bench", "compare_stage1.py")
    )
    ap.add_argument("--json-prefix", default=None, help="write <prefix>_<size>_<channels>.json")
    ap.add_argument("--repeats", type=int, default=1)
    a = ap.parse_args()
    mod = load_shared(os.path.abspath(a.shared))
    mod.read_w = read_w
    for cfg in a.configs:
        size, frames, channels = cfg.split(":")
        argv = [
            "compare_stage1.py",
            "--project",
            os.path.join(HERE, ".."),
            "--size",
            size,
            "--frames",
            frames,
            "--channels",
            channels,
            "--repeats",
            str(a.repeats),
            "--presets",
            *a.presets,
        ]
        if a.json_prefix:
            argv += ["--json", f"{a.json_prefix}_{size}_{channels}.json"]
        if channels == "2":
            import tempfile

            work = tempfile.mkdtemp(prefix="fs-bench-2ch-")
            prepare_two_channel(os.path.dirname(os.path.abspath(a.shared)), work, size, frames)
            argv += ["--workdir", work]
        sys.argv = argv
        mod.main()
        sys.stdout.flush()


if __name__ == "__main__":
    main()
