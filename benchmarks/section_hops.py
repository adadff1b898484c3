"""How many section boundaries a Stage-1 frame crosses from read to write.

Runs Stage 1 on a small synthetic recording with a checkout's ``flowsession.py`` and
records every call between its functions (Python functions, and Numba kernels called
from Python) while one recording's frames go from the reader to the writers (the
reference is left out).  Each function belongs to the ``###`` banner above it; a call
or return from a function of one section into another is a crossing.  Prints the
sections visited and the distinct crossings (caller section -> callee section).

    python benchmarks/section_hops.py .              # this checkout
    python benchmarks/section_hops.py /tmp/old       # another checkout, for comparison
"""

import collections
import os
import sys
import tempfile
import threading

import numpy as np


def main(tree):
    sys.path.insert(0, os.path.abspath(tree))
    import numba
    import tifffile

    import flowsession as fs

    path = os.path.abspath(fs.__file__)
    lines = open(path, encoding="utf-8").read().split("\n")
    banners = [(i + 1, line[4:]) for i, line in enumerate(lines) if line.startswith("### ")]

    def section(lineno):
        found = None
        for start, name in banners:
            if start > lineno:
                break
            found = name
        return found

    frames = fs.synthetic_recording(n_frames=40, size=(64, 64), n_channels=1, seed=1)[0]
    folder = tempfile.mkdtemp()
    tifffile.imwrite(os.path.join(folder, "rec1.tif"), frames.astype(np.uint16))

    def config():
        return fs.SessionConfig(
            root=folder,
            pattern="rec*.tif",
            output_root=os.path.join(folder, "out"),
            final_results=os.path.join(folder, "fin"),
            n_workers=2,
            resume=False,
            flow_options={"quality_setting": "fast"},
        )

    fs.run_stage1(config())  # compiles every kernel the traced run calls
    crossings, visited, last = collections.Counter(), set(), {}
    depth = [0]  # 1: inside one recording's frames, outside the reference
    outer = {"_correct_recording", "_RecordingRun.run"}
    skipped = {"_reference_and_options", "_QualityAccumulator.finish"}

    def note(sec):
        if depth[0] != 1:
            return
        thread = threading.get_ident()
        visited.add(sec)
        if last.get(thread) not in (None, sec):
            crossings[(last[thread], sec)] += 1
        last[thread] = sec

    def profile(frame, event, arg):
        code = frame.f_code
        if code.co_filename != path:
            return
        if code.co_qualname in outer:
            depth[0] = {"call": 1, "return": 0}.get(event, depth[0])
        elif code.co_qualname in skipped:
            depth[0] += {"call": 1, "return": -1}.get(event, 0)
        if event == "call":
            note(section(code.co_firstlineno))
        elif event == "return" and frame.f_back is not None:
            if frame.f_back.f_code.co_filename == path:
                note(section(frame.f_back.f_code.co_firstlineno))

    for name, obj in list(vars(fs).items()):
        if isinstance(obj, numba.core.registry.CPUDispatcher):

            def shim(*args, _kernel=obj, _sec=section(obj.py_func.__code__.co_firstlineno)):
                caller = sys._getframe(1).f_code
                note(_sec)
                try:
                    return _kernel(*args)
                finally:
                    if caller.co_filename == path:
                        note(section(caller.co_firstlineno))

            setattr(fs, name, shim)
    threading.setprofile(profile)
    sys.setprofile(profile)
    try:
        fs.run_stage1(config())
    finally:
        sys.setprofile(None)
        threading.setprofile(None)
    print(f"{tree}: {len(visited)} sections visited, {len(crossings)} distinct crossings")
    for (a, b), n in sorted(crossings.items()):
        print(f"    {a} -> {b}  ({n} times)")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else ".")
