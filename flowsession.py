#!/usr/bin/env python3
"""flowsession: variational optical-flow motion correction for two-photon sessions.

flowsession registers two-photon microscopy recordings of one field of view:
every frame of a recording onto a reference (dense variational optical flow, the
Flow-Registration method of Flotho et al., J Biophotonics 2022,
https://doi.org/10.1002/jbio.202100330), and the recordings of a session onto a
center recording.  The numerics of the optical-flow core follow the MATLAB
Flow-Registration toolbox (``get_displacement.m``, ``level_solver.cpp``,
``imregister_wrapper_w.m``); the public names follow the pyflowreg package.

:Version: 0.1.0

Quickstart
----------
Register a built-in synthetic frame pair and print the recovered displacement::

    python flowsession.py demo

From Python::

    import numpy as np
    from flowsession import get_displacement, imregister_wrapper
    w = get_displacement(fixed, moving)            # (H, W, 2): u along columns, v along rows
    registered = imregister_wrapper(moving, w[..., 0], w[..., 1], fixed)

The sign convention is ``fixed(x, y) ~ moving(x + u(x, y), y + v(x, y))``: warping
the moving frame by ``w`` reproduces the fixed frame.

Requirements
------------
Python >= 3.11, numpy >= 1.26, numba >= 0.59, scipy, h5py, tifffile.
Tested with numpy 2.4, numba 0.68, Python 3.11.

Numba compiles the kernels on first use (a few seconds) and caches the machine
code when a writable cache location exists: ``NUMBA_CACHE_DIR`` if set,
otherwise the ``__pycache__`` folder beside this file.  On a read-only install
set ``NUMBA_CACHE_DIR`` to a writable folder (e.g. node-local scratch).

MATLAB compatibility
--------------------
``get_displacement`` reproduces the toolbox, including two of its quirks:

* the **row** ratio ``m / rows_level`` is used as the x (column) grid spacing
  and the column ratio as the y spacing (they differ only on pyramid levels
  whose aspect ratio differs from the full frame);
* the data-term nonlinearity of the level solver starts at 1 for the first
  channel only; further channels start at 0 and take part from the first
  nonlinearity update (iteration ``update_lag``) on.

``matlab_quirks=False`` switches both off: the column ratio is the x spacing,
and every channel starts with a nonlinearity of 1.

Warping follows MATLAB ``imwarp`` with a displacement field: a pixel samples the
moving image at ``(col + u, row + v)``; it is valid when that point lies inside
the sample grid, ``0 <= col + u <= W - 1`` and ``0 <= row + v <= H - 1``;
invalid pixels take the reference's value.  Cubic interpolation is Keys'
kernel with a = -0.5 and MATLAB ``interp2``'s extrapolated edge samples.
"""

__version__ = "0.1.0"

__all__ = [
    "ConfigError",
    "FlowSessionError",
    "InputError",
    "backward_valid_mask",
    "compute_batch_valid_masks",
    "get_displacement",
    "get_motion_tensor",
    "imregister_binary",
    "imregister_wrapper",
    "imregister_wrapper_w",
    "imresize",
    "level_solver",
    "main",
    "medfilt2_symmetric",
    "warping_depth",
]

###############################################################################
### Imports and optional dependencies
###############################################################################

import argparse
import logging
import math
import os
import sys
import tempfile
import time

import numpy as np

if __name__ == "__main__":
    # ``python flowsession.py`` and ``import flowsession`` share one module object
    # (one set of classes, one round of Numba compilation).
    sys.modules.setdefault("flowsession", sys.modules["__main__"])

log = logging.getLogger("flowsession")


def _numba_cache_usable():
    """Return True when Numba can write its on-disk cache for this file."""
    target = os.environ.get("NUMBA_CACHE_DIR")
    if not target:
        target = os.path.join(os.path.dirname(os.path.abspath(__file__)), "__pycache__")
    try:
        os.makedirs(target, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=target, prefix=".flowsession-probe-"):
            pass
    except OSError:
        return False
    return True


_NUMBA_CACHE = _numba_cache_usable()

import numba  # noqa: E402  (after the cache probe, before any kernel)

_njit = numba.njit(cache=_NUMBA_CACHE, nogil=True)
# Fused multiply-add only: no change to NaN/Inf semantics (unlike full fastmath).
_njit_contract = numba.njit(cache=_NUMBA_CACHE, nogil=True, fastmath={"contract"})

###############################################################################
### Constants
###############################################################################

#: SOR relaxation factor of ``level_solver.cpp``.
SOR_OMEGA = 1.95
#: Regulariser of the data-term nonlinearity psi = a (E + eps)^(a - 1).
PSI_EPS = 1e-5
#: Regulariser of the Zimmer normalisation of the gradient-constancy tensor.
ZIMMER_EPS = 1e-6
#: Pyramid levels stop once round(min_dim * eta^k) falls below this size.
MIN_LEVEL_SIZE = 10

#: Defaults of MATLAB ``get_displacement.m``.
GET_DISPLACEMENT_DEFAULTS = dict(
    alpha=(2.0, 2.0), update_lag=10, iterations=20, min_level=0, levels=50,
    eta=0.75, a_smooth=0.5, a_data=0.45,
)

_TENSOR_KINDS = {"gc": 0, "gray": 1}
_INTERPOLATION = {"nearest": 0, "linear": 1, "cubic": 2}

###############################################################################
### Errors
###############################################################################


class FlowSessionError(Exception):
    """Base class of the errors flowsession raises on purpose."""


class ConfigError(FlowSessionError, ValueError):
    """A configuration key or parameter value is invalid."""


class InputError(FlowSessionError, ValueError):
    """An input array or file cannot be used as given."""


###############################################################################
### Numba CPU kernels: resize (MATLAB imresize, bicubic with antialiasing)
###############################################################################
#
# Internal layout: an image plane is stored transposed, ``P[x, y]`` with x the
# column and y the row index, C-contiguous.  The lexicographic SOR sweep of the
# toolbox visits pixels column by column (outer loop over x, inner over y), so in
# this layout it walks memory contiguously.  Multi-channel images are
# ``(C, nx, ny)``.


@_njit
def _nb_round(x):
    """MATLAB ``round``: half away from zero."""
    r = math.floor(abs(x) + 0.5)
    return r if x >= 0 else -r


@_njit
def _nb_keys(x):
    """Keys cubic convolution kernel with a = -0.5 (MATLAB's ``cubic``)."""
    ax = abs(x)
    ax2 = ax * ax
    ax3 = ax2 * ax
    if ax <= 1.0:
        return 1.5 * ax3 - 2.5 * ax2 + 1.0
    if ax <= 2.0:
        return -0.5 * ax3 + 2.5 * ax2 - 4.0 * ax + 2.0
    return 0.0


@_njit
def _nb_resize_weights(in_len, out_len):
    """Weights and source indices of MATLAB ``imresize`` along one axis.

    Bicubic (Keys a = -0.5); when shrinking, the kernel is stretched by 1/scale
    (antialiasing); each output's weights are normalised to sum 1; taps outside
    the input are mirrored symmetrically (edge sample repeated).
    """
    scale = out_len / in_len
    width = 4.0 / scale if scale < 1.0 else 4.0
    ntap = int(math.ceil(width)) + 2
    wts = np.empty((out_len, ntap))
    idx = np.empty((out_len, ntap), np.int64)
    period = 2 * in_len
    for o in range(out_len):
        u = (o + 1) / scale + 0.5 * (1.0 - 1.0 / scale)
        left = math.floor(u - width / 2.0)
        total = 0.0
        for t in range(ntap):
            d = u - (left + t)
            if scale < 1.0:
                wv = scale * _nb_keys(scale * d)
            else:
                wv = _nb_keys(d)
            wts[o, t] = wv
            total += wv
        for t in range(ntap):
            wts[o, t] /= total
            k = (int(left) + t - 1) % period
            idx[o, t] = k if k < in_len else period - 1 - k
    return wts, idx


@_njit
def _nb_resize_axis0(src, out_len):
    n0, n1 = src.shape
    wts, idx = _nb_resize_weights(n0, out_len)
    out = np.zeros((out_len, n1))
    for o in range(out_len):
        for t in range(wts.shape[1]):
            wv = wts[o, t]
            if wv == 0.0:
                continue
            s = idx[o, t]
            for b in range(n1):
                out[o, b] += wv * src[s, b]
    return out


@_njit
def _nb_resize_axis1(src, out_len):
    n0, n1 = src.shape
    wts, idx = _nb_resize_weights(n1, out_len)
    out = np.empty((n0, out_len))
    ntap = wts.shape[1]
    for a in range(n0):
        for o in range(out_len):
            acc = 0.0
            for t in range(ntap):
                acc += wts[o, t] * src[a, idx[o, t]]
            out[a, o] = acc
    return out


@_njit
def _nb_resize(src, nx_out, ny_out):
    """Resize a transposed plane ``(nx, ny)`` to ``(nx_out, ny_out)``.

    MATLAB resizes the dimension with the smaller scale first (rows on ties);
    rows are our axis 1.  An axis whose length does not change is left alone
    (MATLAB's weights are then exactly the identity).
    """
    nx, ny = src.shape
    if nx_out == nx and ny_out == ny:
        return src.copy()
    if ny_out / ny <= nx_out / nx:
        tmp = _nb_resize_axis1(src, ny_out) if ny_out != ny else src.copy()
        return _nb_resize_axis0(tmp, nx_out) if nx_out != nx else tmp
    tmp = _nb_resize_axis0(src, nx_out) if nx_out != nx else src.copy()
    return _nb_resize_axis1(tmp, ny_out) if ny_out != ny else tmp


@_njit
def _nb_resize_stack(src, nx_out, ny_out):
    """Resize every plane of a ``(C, nx, ny)`` stack."""
    out = np.empty((src.shape[0], nx_out, ny_out))
    for c in range(src.shape[0]):
        out[c] = _nb_resize(src[c], nx_out, ny_out)
    return out


###############################################################################
### Numba CPU kernels: warping (MATLAB imwarp with a displacement field)
###############################################################################


@_njit
def _nb_extrapolated(src):
    """Pad a plane by one sample with ``interp2``'s cubic edge rule.

    The virtual sample before the first is ``3 f[0] - 3 f[1] + f[2]`` (and
    likewise after the last), which keeps Keys' kernel exact for quadratics up
    to the border.  Axes shorter than 3 samples replicate the edge instead.
    """
    nx, ny = src.shape
    e = np.empty((nx + 2, ny + 2))
    for a in range(nx):
        for b in range(ny):
            e[a + 1, b + 1] = src[a, b]
    for a in range(1, nx + 1):
        if ny >= 3:
            e[a, 0] = 3.0 * e[a, 1] - 3.0 * e[a, 2] + e[a, 3]
            e[a, ny + 1] = 3.0 * e[a, ny] - 3.0 * e[a, ny - 1] + e[a, ny - 2]
        else:
            e[a, 0] = e[a, 1]
            e[a, ny + 1] = e[a, ny]
    for b in range(ny + 2):
        if nx >= 3:
            e[0, b] = 3.0 * e[1, b] - 3.0 * e[2, b] + e[3, b]
            e[nx + 1, b] = 3.0 * e[nx, b] - 3.0 * e[nx - 1, b] + e[nx - 2, b]
        else:
            e[0, b] = e[1, b]
            e[nx + 1, b] = e[nx, b]
    return e


@_njit
def _nb_cell(pos, n):
    """Left sample index and fraction of ``pos`` in ``[0, n - 1]``."""
    i = int(pos)
    if i > n - 2:
        i = n - 2
    if i < 0:
        i = 0
    return i, pos - i


@_njit
def _nb_warp_plane(src, u, v, hu, hv, fill, method, out, valid):
    """Backward warp of one transposed plane.

    ``out[x, y] = src(x + u[x, y] / hu, y + v[x, y] / hv)``; points outside the
    sample grid (or NaN) take ``fill[x, y]`` and ``valid[x, y] = False``.
    ``method``: 0 nearest, 1 linear, 2 cubic.
    """
    nx, ny = src.shape
    if method == 2:
        ext = _nb_extrapolated(src)
    else:
        ext = np.empty((1, 1))
    for x in range(nx):
        for y in range(ny):
            px = x + u[x, y] / hu
            py = y + v[x, y] / hv
            if not (px >= 0.0 and px <= nx - 1 and py >= 0.0 and py <= ny - 1):
                out[x, y] = fill[x, y]
                valid[x, y] = False
                continue
            valid[x, y] = True
            if method == 0:
                out[x, y] = src[int(_nb_round(px)), int(_nb_round(py))]
            elif method == 1:
                if nx == 1:
                    ix, tx = 0, 0.0
                else:
                    ix, tx = _nb_cell(px, nx)
                if ny == 1:
                    iy, ty = 0, 0.0
                else:
                    iy, ty = _nb_cell(py, ny)
                ix1 = min(ix + 1, nx - 1)
                iy1 = min(iy + 1, ny - 1)
                out[x, y] = ((1.0 - tx) * ((1.0 - ty) * src[ix, iy] + ty * src[ix, iy1])
                             + tx * ((1.0 - ty) * src[ix1, iy] + ty * src[ix1, iy1]))
            else:
                if nx == 1:
                    ix, tx = 0, 0.0
                else:
                    ix, tx = _nb_cell(px, nx)
                if ny == 1:
                    iy, ty = 0, 0.0
                else:
                    iy, ty = _nb_cell(py, ny)
                wy0 = _nb_keys(ty + 1.0)
                wy1 = _nb_keys(ty)
                wy2 = _nb_keys(1.0 - ty)
                wy3 = _nb_keys(2.0 - ty)
                y3 = min(iy + 3, ny + 1)
                acc = 0.0
                for p in range(4):
                    wx = _nb_keys(tx + 1.0 - p)
                    if wx == 0.0:
                        continue
                    xi = min(ix + p, nx + 1)
                    acc += wx * (wy0 * ext[xi, iy] + wy1 * ext[xi, iy + 1]
                                 + wy2 * ext[xi, iy + 2] + wy3 * ext[xi, y3])
                out[x, y] = acc


###############################################################################
### Numba CPU kernels: motion tensors
###############################################################################


@_njit
def _nb_grad0(f, h, out):
    """MATLAB/NumPy ``gradient`` along axis 0 (x): central inside, one-sided at ends."""
    n0, n1 = f.shape
    for a in range(n0):
        for b in range(n1):
            if n0 < 2:
                out[a, b] = 0.0
            elif a == 0:
                out[a, b] = (f[1, b] - f[0, b]) / h
            elif a == n0 - 1:
                out[a, b] = (f[a, b] - f[a - 1, b]) / h
            else:
                out[a, b] = (f[a + 1, b] - f[a - 1, b]) / (2.0 * h)


@_njit
def _nb_grad1(f, h, out):
    """``gradient`` along axis 1 (y)."""
    n0, n1 = f.shape
    for a in range(n0):
        for b in range(n1):
            if n1 < 2:
                out[a, b] = 0.0
            elif b == 0:
                out[a, b] = (f[a, 1] - f[a, 0]) / h
            elif b == n1 - 1:
                out[a, b] = (f[a, b] - f[a, b - 1]) / h
            else:
                out[a, b] = (f[a, b + 1] - f[a, b - 1]) / (2.0 * h)


@_njit
def _nb_pad_symmetric1(f):
    """Pad by one sample on every side, repeating the edge sample."""
    nx, ny = f.shape
    out = np.empty((nx + 2, ny + 2))
    for a in range(nx + 2):
        sa = min(max(a - 1, 0), nx - 1)
        for b in range(ny + 2):
            sb = min(max(b - 1, 0), ny - 1)
            out[a, b] = f[sa, sb]
    return out


@_njit
def _nb_repad_ring(f):
    """Overwrite the outer ring with the edge of the interior (symmetric re-pad)."""
    n0, n1 = f.shape
    for a in range(n0):
        sa = min(max(a, 1), n0 - 2)
        f[a, 0] = f[sa, 1]
        f[a, n1 - 1] = f[sa, n1 - 2]
    for b in range(n1):
        f[0, b] = f[1, b]
        f[n0 - 1, b] = f[n0 - 2, b]


@_njit
def _nb_zero_ring(f):
    n0, n1 = f.shape
    for a in range(n0):
        f[a, 0] = 0.0
        f[a, n1 - 1] = 0.0
    for b in range(n1):
        f[0, b] = 0.0
        f[n0 - 1, b] = 0.0


@_njit
def _nb_tensor_gc(f1, f2, hx, hy, J11, J22, J33, J12, J13, J23):
    """Gradient-constancy motion tensor with Zimmer normalisation.

    ``f1`` (reference) and ``f2`` (warped moving) are ``(nx, ny)`` planes; the
    outputs are ``(nx + 2, ny + 2)`` with a zero outer ring.  ``hx`` is the grid
    spacing along x (columns), ``hy`` along y (rows).  Mirrors
    ``get_motion_tensor_gc.m``.
    """
    F1 = _nb_pad_symmetric1(f1)
    F2 = _nb_pad_symmetric1(f2)
    NX, NY = F1.shape
    g1 = np.empty((NX, NY))
    g2 = np.empty((NX, NY))
    _nb_grad0(F1, hx, g1)
    _nb_grad0(F2, hx, g2)
    fx = 0.5 * (g1 + g2)
    ft = F2 - F1
    _nb_repad_ring(fx)
    _nb_repad_ring(ft)
    fxy = g1
    _nb_grad1(fx, hy, fxy)
    fxt = g2
    _nb_grad0(ft, hx, fxt)
    fyt = np.empty((NX, NY))
    _nb_grad1(ft, hy, fyt)
    hx2 = hx * hx
    hy2 = hy * hy
    for a in range(NX):
        for b in range(NY):
            if a == 0 or b == 0 or a == NX - 1 or b == NY - 1:
                J11[a, b] = 0.0
                J22[a, b] = 0.0
                J33[a, b] = 0.0
                J12[a, b] = 0.0
                J13[a, b] = 0.0
                J23[a, b] = 0.0
                continue
            fxx = 0.5 * ((F1[a - 1, b] - 2.0 * F1[a, b] + F1[a + 1, b]) / hx2
                         + (F2[a - 1, b] - 2.0 * F2[a, b] + F2[a + 1, b]) / hx2)
            fyy = 0.5 * ((F1[a, b - 1] - 2.0 * F1[a, b] + F1[a, b + 1]) / hy2
                         + (F2[a, b - 1] - 2.0 * F2[a, b] + F2[a, b + 1]) / hy2)
            cxy = fxy[a, b]
            cxt = fxt[a, b]
            cyt = fyt[a, b]
            rx = 1.0 / (fxx * fxx + cxy * cxy + ZIMMER_EPS)
            ry = 1.0 / (cxy * cxy + fyy * fyy + ZIMMER_EPS)
            J11[a, b] = rx * fxx * fxx + ry * cxy * cxy
            J22[a, b] = rx * cxy * cxy + ry * fyy * fyy
            J33[a, b] = rx * cxt * cxt + ry * cyt * cyt
            J12[a, b] = rx * fxx * cxy + ry * cxy * fyy
            J13[a, b] = rx * fxx * cxt + ry * cxy * cyt
            J23[a, b] = rx * cxy * cxt + ry * fyy * cyt


@_njit
def _nb_tensor_gray(f1, f2, hx, hy, J11, J22, J33, J12, J13, J23):
    """Brightness-constancy motion tensor (no normalisation).

    Frame-averaged first derivatives and the frame difference, on the
    symmetrically padded planes, ring re-padded; outputs with a zero ring.
    """
    F1 = _nb_pad_symmetric1(f1)
    F2 = _nb_pad_symmetric1(f2)
    NX, NY = F1.shape
    g1 = np.empty((NX, NY))
    g2 = np.empty((NX, NY))
    _nb_grad0(F1, hx, g1)
    _nb_grad0(F2, hx, g2)
    fx = 0.5 * (g1 + g2)
    _nb_grad1(F1, hy, g1)
    _nb_grad1(F2, hy, g2)
    fy = 0.5 * (g1 + g2)
    ft = F2 - F1
    _nb_repad_ring(fx)
    _nb_repad_ring(fy)
    _nb_repad_ring(ft)
    for a in range(NX):
        for b in range(NY):
            J11[a, b] = fx[a, b] * fx[a, b]
            J22[a, b] = fy[a, b] * fy[a, b]
            J33[a, b] = ft[a, b] * ft[a, b]
            J12[a, b] = fx[a, b] * fy[a, b]
            J13[a, b] = fx[a, b] * ft[a, b]
            J23[a, b] = fy[a, b] * ft[a, b]
    _nb_zero_ring(J11)
    _nb_zero_ring(J22)
    _nb_zero_ring(J33)
    _nb_zero_ring(J12)
    _nb_zero_ring(J13)
    _nb_zero_ring(J23)


###############################################################################
### Numba CPU kernels: level solver (level_solver.cpp)
###############################################################################


@_njit
def _nb_set_boundary(f):
    """Neumann halo: copy the adjacent interior values into the outer ring."""
    n0, n1 = f.shape
    for a in range(n0):
        f[a, 0] = f[a, 1]
        f[a, n1 - 1] = f[a, n1 - 2]
    for b in range(n1):
        f[0, b] = f[1, b]
        f[n0 - 1, b] = f[n0 - 2, b]


@_njit
def _nb_refresh(J11, J22, J33, J12, J13, J23, weight, local, a_data, du, dv, first,
                psi_all_ones, u, v, wxe, wye, omega, A12, Du, Dv, cu, cv):
    """Refresh the per-pixel constants of the sweep (interior pixels).

    The lagged data term enters through the channel sums
    ``A.. = sum_k W_k psi_k J.._k``: with ``first`` psi is the initial value (1
    for channel 0, and for every channel when ``psi_all_ones``; 0 otherwise,
    the toolbox's zero-filled start), else psi_k = a_k (E_k + eps)^(a_k - 1)
    with E_k the linearised data energy of the current increment, clamped at 0.
    From them and the smoothness edge weights ``wxe, wye``:
    ``Du = omega / (sum_nb w_nb + A11)`` (0 where that is 0),
    ``cu = sum_nb w_nb (u_nb - u_c) - A13``, likewise for v, and ``A12``.
    ``weight`` is ``(C, NX, NY)`` when ``local`` else ``(C, 1, 1)``.
    """
    C, NX, NY = J11.shape
    for a in range(1, NX - 1):
        for b in range(1, NY - 1):
            d = du[a, b]
            e = dv[a, b]
            s11 = 0.0
            s12 = 0.0
            s22 = 0.0
            s13 = 0.0
            s23 = 0.0
            for k in range(C):
                if first:
                    psi = 1.0 if (k == 0 or psi_all_ones) else 0.0
                else:
                    en = (J11[k, a, b] * d * d + J22[k, a, b] * e * e + J23[k, a, b] * e
                          + 2.0 * J12[k, a, b] * d * e + 2.0 * J13[k, a, b] * d
                          + J23[k, a, b] * e + J33[k, a, b])
                    if en < 0.0:
                        en = 0.0
                    psi = a_data[k] * (en + PSI_EPS) ** (a_data[k] - 1.0)
                wp = (weight[k, a, b] if local else weight[k, 0, 0]) * psi
                s11 += wp * J11[k, a, b]
                s12 += wp * J12[k, a, b]
                s22 += wp * J22[k, a, b]
                s13 += wp * J13[k, a, b]
                s23 += wp * J23[k, a, b]
            wl = wxe[a - 1, b]
            wr = wxe[a, b]
            wd = wye[a, b]
            wu = wye[a, b - 1]
            uc = u[a, b]
            vc = v[a, b]
            cu[a, b] = (wl * (u[a - 1, b] - uc) + wr * (u[a + 1, b] - uc)
                        + wd * (u[a, b + 1] - uc) + wu * (u[a, b - 1] - uc)) - s13
            cv[a, b] = (wl * (v[a - 1, b] - vc) + wr * (v[a + 1, b] - vc)
                        + wd * (v[a, b + 1] - vc) + wu * (v[a, b - 1] - vc)) - s23
            sw = wl + wr + wd + wu
            den = sw + s11
            Du[a, b] = omega / den if den != 0.0 else 0.0
            den = sw + s22
            Dv[a, b] = omega / den if den != 0.0 else 0.0
            A12[a, b] = s12


@_njit
def _nb_smooth_weights(u, v, du, dv, a_smooth, alpha_x, alpha_y, hx, hy, wxe, wye):
    """Edge weights of the smoothness term.

    ``wxe[a, b]`` couples ``(a, b)`` and ``(a + 1, b)``; ``wye[a, b]`` couples
    ``(a, b)`` and ``(a, b + 1)``.  With ``a_smooth == 1`` they are the constants
    alpha/h^2; otherwise they carry the lagged diffusivity
    psi_s = a (|grad(u + du)|^2 + |grad(v + dv)|^2 + eps)^(a - 1), averaged over
    the two pixels, with MATLAB ``gradient`` over the whole haloed array.
    """
    NX, NY = u.shape
    cx = alpha_x / (hx * hx)
    cy = alpha_y / (hy * hy)
    if a_smooth == 1.0:
        wxe[:, :] = cx
        wye[:, :] = cy
        return
    uf = u + du
    vf = v + dv
    ux = np.empty((NX, NY))
    uy = np.empty((NX, NY))
    vx = np.empty((NX, NY))
    vy = np.empty((NX, NY))
    _nb_grad0(uf, hx, ux)
    _nb_grad1(uf, hy, uy)
    _nb_grad0(vf, hx, vx)
    _nb_grad1(vf, hy, vy)
    psi = ux
    for a in range(NX):
        for b in range(NY):
            s = (ux[a, b] * ux[a, b] + uy[a, b] * uy[a, b]
                 + vx[a, b] * vx[a, b] + vy[a, b] * vy[a, b])
            psi[a, b] = a_smooth * (s + PSI_EPS) ** (a_smooth - 1.0)
    for a in range(NX):
        for b in range(NY):
            wxe[a, b] = 0.5 * (psi[a, b] + psi[a + 1, b]) * cx if a + 1 < NX else 0.0
            wye[a, b] = 0.5 * (psi[a, b] + psi[a, b + 1]) * cy if b + 1 < NY else 0.0


@_njit_contract
def _nb_sor_sweep(du, dv, wxe, wye, uniform, A12, Du, Dv, cu, cv, omega):
    """One lexicographic SOR sweep, column by column, du before dv at each pixel.

    The update of a pixel depends on the pixel just updated before it (y - 1);
    that term is added last so the loop-carried chain is short.  With
    ``uniform`` the edge weights are the constants ``wxe[0, 0]``, ``wye[0, 0]``.
    """
    NX, NY = du.shape
    om1 = 1.0 - omega
    if uniform:
        cx = wxe[0, 0]
        cy = wye[0, 0]
        for a in range(1, NX - 1):
            for b in range(1, NY - 1):
                pu = (cx * (du[a - 1, b] + du[a + 1, b]) + cy * du[a, b + 1]
                      + cu[a, b] - A12[a, b] * dv[a, b])
                duc = om1 * du[a, b] + Du[a, b] * (pu + cy * du[a, b - 1])
                du[a, b] = duc
                pv = (cx * (dv[a - 1, b] + dv[a + 1, b]) + cy * dv[a, b + 1]
                      + cv[a, b] - A12[a, b] * duc)
                dv[a, b] = om1 * dv[a, b] + Dv[a, b] * (pv + cy * dv[a, b - 1])
        return
    for a in range(1, NX - 1):
        for b in range(1, NY - 1):
            wl = wxe[a - 1, b]
            wr = wxe[a, b]
            wd = wye[a, b]
            wu = wye[a, b - 1]
            pu = (wl * du[a - 1, b] + wr * du[a + 1, b] + wd * du[a, b + 1]
                  + cu[a, b] - A12[a, b] * dv[a, b])
            duc = om1 * du[a, b] + Du[a, b] * (pu + wu * du[a, b - 1])
            du[a, b] = duc
            pv = (wl * dv[a - 1, b] + wr * dv[a + 1, b] + wd * dv[a, b + 1]
                  + cv[a, b] - A12[a, b] * duc)
            dv[a, b] = om1 * dv[a, b] + Dv[a, b] * (pv + wu * dv[a, b - 1])


@_njit
def _nb_level_solver(J11, J22, J33, J12, J13, J23, weight, local, u, v, alpha_x, alpha_y,
                     iterations, update_lag, a_data, a_smooth, hx, hy, psi_all_ones,
                     du, dv):
    """Nonlinear SOR for the flow increment on one pyramid level.

    Tensors are ``(C, NX, NY)`` (haloed, transposed); ``weight`` is
    ``(C, NX, NY)`` when ``local`` else ``(C, 1, 1)``; ``u, v, du, dv`` are
    ``(NX, NY)``.  Iterations count from 1; the data and smoothness
    nonlinearities are refreshed when ``it % update_lag == 0``; the Neumann halo
    of the increments is reset before every sweep.  Writes ``du, dv`` (with halo).
    """
    NX, NY = u.shape
    du[:, :] = 0.0
    dv[:, :] = 0.0
    A12 = np.zeros((NX, NY))
    Du = np.zeros((NX, NY))
    Dv = np.zeros((NX, NY))
    cu = np.zeros((NX, NY))
    cv = np.zeros((NX, NY))
    wxe = np.empty((NX, NY))
    wye = np.empty((NX, NY))
    wxe[:, :] = alpha_x / (hx * hx)
    wye[:, :] = alpha_y / (hy * hy)
    uniform = a_smooth == 1.0
    _nb_refresh(J11, J22, J33, J12, J13, J23, weight, local, a_data, du, dv, True,
                psi_all_ones, u, v, wxe, wye, SOR_OMEGA, A12, Du, Dv, cu, cv)
    for it in range(1, iterations + 1):
        if it % update_lag == 0:
            if not uniform:
                _nb_smooth_weights(u, v, du, dv, a_smooth, alpha_x, alpha_y, hx, hy, wxe, wye)
            _nb_refresh(J11, J22, J33, J12, J13, J23, weight, local, a_data, du, dv, False,
                        psi_all_ones, u, v, wxe, wye, SOR_OMEGA, A12, Du, Dv, cu, cv)
        _nb_set_boundary(du)
        _nb_set_boundary(dv)
        _nb_sor_sweep(du, dv, wxe, wye, uniform, A12, Du, Dv, cu, cv, SOR_OMEGA)


###############################################################################
### Numba CPU kernels: 5x5 median filter (medfilt2 'symmetric')
###############################################################################


@_njit
def _nb_select(buf, n, k):
    """k-th smallest of ``buf[:n]`` (Wirth's selection; reorders buf)."""
    lo = 0
    hi = n - 1
    while lo < hi:
        x = buf[k]
        i = lo
        j = hi
        while True:
            while buf[i] < x:
                i += 1
            while x < buf[j]:
                j -= 1
            if i <= j:
                t = buf[i]
                buf[i] = buf[j]
                buf[j] = t
                i += 1
                j -= 1
            if i > j:
                break
        if j < k:
            lo = i
        if k < i:
            hi = j
    return buf[k]


@_njit
def _nb_pad_symmetric(src, p):
    """Pad by ``p`` samples on every side, mirrored with the edge repeated."""
    n0, n1 = src.shape
    out = np.empty((n0 + 2 * p, n1 + 2 * p))
    for a in range(n0 + 2 * p):
        k = (a - p) % (2 * n0)
        sa = k if k < n0 else 2 * n0 - 1 - k
        for b in range(n1 + 2 * p):
            k = (b - p) % (2 * n1)
            out[a, b] = src[sa, k if k < n1 else 2 * n1 - 1 - k]
    return out


@_njit
def _nb_sort5(a0, a1, a2, a3, a4):
    """Sort five values with the optimal 9-comparator network (branch-free)."""
    a0, a1 = min(a0, a1), max(a0, a1)
    a3, a4 = min(a3, a4), max(a3, a4)
    a2, a4 = min(a2, a4), max(a2, a4)
    a2, a3 = min(a2, a3), max(a2, a3)
    a0, a3 = min(a0, a3), max(a0, a3)
    a0, a2 = min(a0, a2), max(a0, a2)
    a1, a4 = min(a1, a4), max(a1, a4)
    a1, a3 = min(a1, a3), max(a1, a3)
    a1, a2 = min(a1, a2), max(a1, a2)
    return a0, a1, a2, a3, a4


@_njit
def _nb_medfilt5(src, out):
    """5x5 median with symmetric padding (MATLAB ``medfilt2(A, [5 5], 'symmetric')``).

    Exact.  Each window's five x-columns are sorted (a sorted column is shared by
    the five windows that contain it as the window slides along y); sorting the
    rows of that 5x5 block as well leaves columns sorted, and then an entry
    (i, j) has at least (i+1)(j+1) entries <= it and (5-i)(5-j) entries >= it.
    Discarding those that cannot be the 13th smallest leaves 13 candidates, 6
    of the discarded lying below: the median is the 7th smallest candidate.
    """
    n0, n1 = src.shape
    pad = _nb_pad_symmetric(src, 2)
    cols = np.empty((n1 + 4, 5))
    cand = np.empty(13)
    for a in range(n0):
        for j in range(n1 + 4):
            c0, c1, c2, c3, c4 = _nb_sort5(pad[a, j], pad[a + 1, j], pad[a + 2, j],
                                           pad[a + 3, j], pad[a + 4, j])
            cols[j, 0] = c0
            cols[j, 1] = c1
            cols[j, 2] = c2
            cols[j, 3] = c3
            cols[j, 4] = c4
        for b in range(n1):
            r = _nb_sort5(cols[b, 0], cols[b + 1, 0], cols[b + 2, 0], cols[b + 3, 0], cols[b + 4, 0])
            cand[0] = r[3]
            cand[1] = r[4]
            r = _nb_sort5(cols[b, 1], cols[b + 1, 1], cols[b + 2, 1], cols[b + 3, 1], cols[b + 4, 1])
            cand[2] = r[2]
            cand[3] = r[3]
            cand[4] = r[4]
            r = _nb_sort5(cols[b, 2], cols[b + 1, 2], cols[b + 2, 2], cols[b + 3, 2], cols[b + 4, 2])
            cand[5] = r[1]
            cand[6] = r[2]
            cand[7] = r[3]
            r = _nb_sort5(cols[b, 3], cols[b + 1, 3], cols[b + 2, 3], cols[b + 3, 3], cols[b + 4, 3])
            cand[8] = r[0]
            cand[9] = r[1]
            cand[10] = r[2]
            r = _nb_sort5(cols[b, 4], cols[b + 1, 4], cols[b + 2, 4], cols[b + 3, 4], cols[b + 4, 4])
            cand[11] = r[0]
            cand[12] = r[1]
            out[a, b] = _nb_select(cand, 13, 6)


@_njit
def _nb_medfilt5_interior(f):
    """Median-filter the interior of a haloed array in place."""
    n0, n1 = f.shape
    inner = f[1:n0 - 1, 1:n1 - 1].copy()
    _nb_medfilt5(inner, f[1:n0 - 1, 1:n1 - 1])


###############################################################################
### Numba CPU kernels: coarse-to-fine driver (get_displacement.m)
###############################################################################


@_njit
def _nb_warping_depth(eta, levels, m, n):
    """Number of pyramid levels below full size (MATLAB ``warpingDepth.m``)."""
    d = float(min(m, n))
    count = 0
    for _ in range(levels):
        d = d * eta
        if _nb_round(d) < MIN_LEVEL_SIZE:
            break
        count += 1
    return count


@_njit
def _nb_pad_edge(f):
    """``add_boundary``: one-pixel halo replicating the edge (corners diagonal)."""
    return _nb_pad_symmetric1(f)


@_njit
def _nb_get_displacement(f1, f2, wvec, wmap, local_weight, u_init, v_init,
                         alpha_x, alpha_y, iterations, update_lag, a_data, a_smooth,
                         levels, eta, min_level, tensor_kind, quirks, out_u, out_v):
    """Coarse-to-fine variational optical flow of one frame pair.

    ``f1`` (reference) and ``f2`` (moving) are ``(C, nx, ny)`` transposed stacks;
    ``u_init, v_init, out_u, out_v`` are ``(nx, ny)``.  ``wvec`` holds per-channel
    weights, ``wmap`` ``(C, nx, ny)`` spatial weights used when ``local_weight``.
    """
    C, n, m = f1.shape
    max_y = _nb_warping_depth(eta, levels, m, m)
    max_x = _nb_warping_depth(eta, levels, n, n)
    cap = min(max_x, max_y) * 4
    max_y = min(max_y, cap)
    max_x = min(max_x, cap)
    top = max(max_x, max_y)
    if top <= min_level:
        min_level = top - 1
    if min_level < 0:
        min_level = 0
    u = np.zeros((1, 1))
    v = np.zeros((1, 1))
    for i in range(top, min_level - 1, -1):
        ly = int(_nb_round(m * eta ** min(i, max_y)))
        lx = int(_nb_round(n * eta ** min(i, max_x)))
        F1 = _nb_resize_stack(f1, lx, ly)
        F2 = _nb_resize_stack(f2, lx, ly)
        if quirks:
            hx = m / ly
            hy = n / lx
        else:
            hx = n / lx
            hy = m / ly
        if i == top:
            ui = _nb_resize(u_init, lx, ly)
            vi = _nb_resize(v_init, lx, ly)
            tmp = F2
        else:
            ui = _nb_resize(np.ascontiguousarray(u[1:-1, 1:-1]), lx, ly)
            vi = _nb_resize(np.ascontiguousarray(v[1:-1, 1:-1]), lx, ly)
            tmp = np.empty_like(F2)
            valid = np.empty((lx, ly), np.bool_)
            for c in range(C):
                _nb_warp_plane(F2[c], ui, vi, hx, hy, F1[c], 2, tmp[c], valid)
        u = _nb_pad_edge(ui)
        v = _nb_pad_edge(vi)
        NX = lx + 2
        NY = ly + 2
        J11 = np.empty((C, NX, NY))
        J22 = np.empty((C, NX, NY))
        J33 = np.empty((C, NX, NY))
        J12 = np.empty((C, NX, NY))
        J13 = np.empty((C, NX, NY))
        J23 = np.empty((C, NX, NY))
        if local_weight:
            weight = np.zeros((C, NX, NY))
        else:
            weight = np.empty((C, 1, 1))
        for c in range(C):
            if tensor_kind == 0:
                _nb_tensor_gc(F1[c], tmp[c], hx, hy, J11[c], J22[c], J33[c],
                              J12[c], J13[c], J23[c])
            else:
                _nb_tensor_gray(F1[c], tmp[c], hx, hy, J11[c], J22[c], J33[c],
                                J12[c], J13[c], J23[c])
            if local_weight:
                weight[c, 1:-1, 1:-1] = _nb_resize(wmap[c], lx, ly)
            else:
                weight[c, 0, 0] = wvec[c]
        scale = 1.0 if i == min_level else eta ** (-0.5 * i)
        du = np.empty((NX, NY))
        dv = np.empty((NX, NY))
        _nb_level_solver(J11, J22, J33, J12, J13, J23, weight, local_weight, u, v,
                         alpha_x * scale, alpha_y * scale, iterations, update_lag,
                         a_data, a_smooth, hx, hy, not quirks, du, dv)
        if min(lx, ly) > 5:
            _nb_medfilt5_interior(du)
            _nb_medfilt5_interior(dv)
        u += du
        v += dv
    wu = np.ascontiguousarray(u[1:-1, 1:-1])
    wv = np.ascontiguousarray(v[1:-1, 1:-1])
    if wu.shape[0] != n or wu.shape[1] != m:
        wu = _nb_resize(wu, n, m)
        wv = _nb_resize(wv, n, m)
    out_u[:, :] = wu
    out_v[:, :] = wv


###############################################################################
### CUDA kernels (lazy)
###############################################################################
#
# The GPU backend (``flow_backend = "flowreg_cuda"``) imports numba.cuda only when
# it is chosen.  Not part of this version.

###############################################################################
### Optical-flow driver: input checks and public wrappers
###############################################################################


def _as_image(a, name):
    """Return ``a`` as a float64 ``(H, W, C)`` array, checking it."""
    arr = np.asarray(a)
    if arr.dtype == object or not (np.issubdtype(arr.dtype, np.number) or arr.dtype == bool):
        msg = f"{name} must be a numeric array, got dtype {arr.dtype}"
        raise InputError(msg)
    if arr.ndim not in (2, 3):
        msg = f"{name} must be (H, W) or (H, W, C), got shape {arr.shape}"
        raise InputError(msg)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if min(arr.shape) == 0:
        msg = f"{name} is empty (shape {arr.shape})"
        raise InputError(msg)
    arr = arr.astype(np.float64, copy=False)
    if not np.all(np.isfinite(arr)):
        bad = int(np.count_nonzero(~np.isfinite(arr)))
        msg = f"{name} has {bad} NaN or infinite values; replace them before registration"
        raise InputError(msg)
    return arr


def _to_internal(img):
    """``(H, W, C)`` -> transposed contiguous ``(C, W, H)``."""
    return np.ascontiguousarray(np.transpose(img, (2, 1, 0)))


def _field_to_internal(f, shape, name):
    arr = np.asarray(f, dtype=np.float64)
    if arr.shape != shape:
        msg = f"{name} must have shape {shape}, got {arr.shape}"
        raise InputError(msg)
    if not np.all(np.isfinite(arr)):
        msg = f"{name} has NaN or infinite values"
        raise InputError(msg)
    return np.ascontiguousarray(arr.T)


def _positive(name, value, *, allow_zero=False):
    try:
        x = float(value)
    except (TypeError, ValueError):
        msg = f"{name} must be a number, got {value!r}"
        raise ConfigError(msg) from None
    if not math.isfinite(x) or x < 0 or (x == 0 and not allow_zero):
        msg = f"{name} must be {'>= 0' if allow_zero else '> 0'}, got {value!r}"
        raise ConfigError(msg)
    return x


def _count(name, value, minimum):
    try:
        ok = (not isinstance(value, (bool, np.bool_)) and float(value).is_integer()
              and value >= minimum)
    except (TypeError, ValueError, OverflowError):
        ok = False
    if not ok:
        msg = f"{name} must be an integer >= {minimum}, got {value!r}"
        raise ConfigError(msg)
    return int(value)


def _channel_vector(name, value, n_channels, *, normalise=False, fill=None):
    """Scalar or 1-D per-channel parameter -> float64 vector of length C."""
    arr = np.atleast_1d(np.asarray(value, dtype=np.float64)).ravel()
    if arr.size == 1:
        arr = np.full(n_channels, arr[0])
    elif arr.size != n_channels:
        if fill is None:
            msg = f"{name} has {arr.size} entries for {n_channels} channels"
            raise ConfigError(msg)
        arr = np.concatenate([arr, np.full(max(0, n_channels - arr.size), fill)])[:n_channels]
    if not np.all(np.isfinite(arr)) or np.any(arr < 0):
        msg = f"{name} must be finite and >= 0, got {value!r}"
        raise ConfigError(msg)
    if normalise:
        total = arr.sum()
        if total <= 0:
            msg = f"{name} must not be all zero"
            raise ConfigError(msg)
        arr = arr / total
    return np.ascontiguousarray(arr)


def warping_depth(eta, levels, m, n):
    """Number of pyramid levels below full size, as MATLAB ``warpingDepth.m``.

    Counts the levels k = 1..levels with ``round(min(m, n) * eta^k) >= 10``
    (MATLAB rounding, half away from zero), stopping at the first that is not.
    """
    return int(_nb_warping_depth(float(eta), int(levels), int(m), int(n)))


def imresize(image, size):
    """Resize like MATLAB ``imresize(image, size, 'bicubic', 'Antialiasing', true)``.

    Parameters
    ----------
    image : array_like, (H, W) or (H, W, C)
    size : (rows, cols)

    Returns
    -------
    ndarray, float64, (rows, cols) or (rows, cols, C)
    """
    arr = np.asarray(image, dtype=np.float64)
    rows, cols = (int(s) for s in size)
    if rows < 1 or cols < 1:
        msg = f"imresize: output size must be positive, got {size!r}"
        raise InputError(msg)
    squeeze = arr.ndim == 2
    img = arr[:, :, None] if squeeze else arr
    out = _nb_resize_stack(_to_internal(img), cols, rows)
    out = np.transpose(out, (2, 1, 0))
    return np.ascontiguousarray(out[:, :, 0] if squeeze else out)


def get_motion_tensor(f1, f2, hx=1.0, hy=1.0, const_assumption="gc"):
    """Motion tensor of a reference/moving pair, as ``get_motion_tensor_gc.m``.

    Parameters
    ----------
    f1, f2 : (H, W) arrays
        Reference and (warped) moving image.
    hx, hy : float
        Grid spacing along x (columns) and y (rows).
    const_assumption : {"gc", "gray"}
        Gradient constancy with Zimmer normalisation, or brightness constancy.

    Returns
    -------
    J11, J22, J33, J12, J13, J23 : ndarray, (H + 2, W + 2), zero outer ring.
    """
    kind = _tensor_kind(const_assumption)
    a = np.asarray(f1, dtype=np.float64)
    b = np.asarray(f2, dtype=np.float64)
    if a.ndim != 2 or a.shape != b.shape:
        msg = f"get_motion_tensor needs two 2-D images of one shape, got {a.shape} and {b.shape}"
        raise InputError(msg)
    out = [np.empty((a.shape[1] + 2, a.shape[0] + 2)) for _ in range(6)]
    kern = _nb_tensor_gc if kind == 0 else _nb_tensor_gray
    kern(np.ascontiguousarray(a.T), np.ascontiguousarray(b.T), float(hx), float(hy), *out)
    return tuple(np.ascontiguousarray(J.T) for J in out)


def level_solver(J11, J22, J33, J12, J13, J23, weight, u, v, alpha, iterations,
                 update_lag, a_data, a_smooth, hx, hy, *, matlab_quirks=True):
    """Solve for the flow increment on one pyramid level, as ``level_solver.cpp``.

    Parameters
    ----------
    J11 .. J23 : (M, N) or (M, N, C)
        Motion tensor of the level with its one-pixel halo.
    weight : scalar, (C,) or (M, N, C)
        Per-channel or per-pixel channel weights (used as given).
    u, v : (M, N)
        Current flow of the level (full-resolution pixels), with halo.
    alpha : float or (alpha_x, alpha_y)
    iterations, update_lag : int
    a_data : float or (C,)
    a_smooth, hx, hy : float

    Returns
    -------
    du, dv : ndarray, (M, N)
    """
    Js = [np.asarray(J, dtype=np.float64) for J in (J11, J22, J33, J12, J13, J23)]
    Js = [J[:, :, None] if J.ndim == 2 else J for J in Js]
    shape = Js[0].shape
    if any(J.shape != shape for J in Js) or len(shape) != 3:
        msg = "level_solver: the six tensor components must share one (M, N[, C]) shape"
        raise InputError(msg)
    M, N, C = shape
    w = np.asarray(weight, dtype=np.float64)
    if w.ndim == 3 or (w.ndim == 2 and C == 1 and w.shape == (M, N)):
        w = w.reshape(M, N, -1)
        if w.shape != (M, N, C):
            msg = f"level_solver: spatial weight must be {(M, N, C)}, got {w.shape}"
            raise InputError(msg)
        wint = np.ascontiguousarray(np.transpose(w, (2, 1, 0)))
        local = True
    else:
        wint = _channel_vector("weight", w, C).reshape(C, 1, 1)
        local = False
    al = np.atleast_1d(np.asarray(alpha, dtype=np.float64))
    ax, ay = (al[0], al[0]) if al.size == 1 else (al[0], al[1])
    du = np.empty((N, M))
    dv = np.empty((N, M))
    _nb_level_solver(*[np.ascontiguousarray(np.transpose(J, (2, 1, 0))) for J in Js], wint, local,
                     _field_to_internal(u, (M, N), "u"), _field_to_internal(v, (M, N), "v"),
                     float(ax), float(ay), int(iterations), int(update_lag),
                     _channel_vector("a_data", a_data, C), float(a_smooth),
                     float(hx), float(hy), not matlab_quirks, du, dv)
    return np.ascontiguousarray(du.T), np.ascontiguousarray(dv.T)


def medfilt2_symmetric(a):
    """5x5 median filter with symmetric padding (MATLAB ``medfilt2(a, [5 5], 'symmetric')``)."""
    arr = np.ascontiguousarray(np.asarray(a, dtype=np.float64))
    if arr.ndim != 2:
        msg = f"medfilt2_symmetric needs a 2-D array, got shape {arr.shape}"
        raise InputError(msg)
    out = np.empty_like(arr)
    _nb_medfilt5(arr, out)
    return out


def _tensor_kind(name):
    try:
        return _TENSOR_KINDS[name]
    except (KeyError, TypeError):
        msg = (f"const_assumption must be one of {sorted(_TENSOR_KINDS)}, got {name!r}")
        raise ConfigError(msg) from None


def get_displacement(fixed, moving, *, alpha=GET_DISPLACEMENT_DEFAULTS["alpha"],
                     update_lag=GET_DISPLACEMENT_DEFAULTS["update_lag"],
                     iterations=GET_DISPLACEMENT_DEFAULTS["iterations"],
                     min_level=GET_DISPLACEMENT_DEFAULTS["min_level"],
                     levels=GET_DISPLACEMENT_DEFAULTS["levels"],
                     eta=GET_DISPLACEMENT_DEFAULTS["eta"],
                     a_smooth=GET_DISPLACEMENT_DEFAULTS["a_smooth"],
                     a_data=GET_DISPLACEMENT_DEFAULTS["a_data"],
                     weight=None, uv=None, const_assumption="gc", matlab_quirks=True):
    """Dense displacement field registering ``moving`` onto ``fixed``.

    Variational optical flow (gradient constancy with Zimmer normalisation,
    generalised Charbonnier data and smoothness terms), solved coarse to fine
    with nonlinear SOR on every level; mirrors MATLAB ``get_displacement.m`` of
    the Flow-Registration toolbox (Flotho et al., J Biophotonics 2022,
    https://doi.org/10.1002/jbio.202100330).

    Parameters
    ----------
    fixed, moving : (H, W) or (H, W, C) arrays of one shape
        Reference and moving frame; any real dtype, computed in float64.
    alpha : float or (alpha_x, alpha_y)
        Smoothness weight; scaled by eta^(-i/2) on pyramid level i.
    update_lag : int
        SOR iterations between updates of the lagged nonlinearities.
    iterations : int
        SOR iterations per level.
    min_level : int
        Finest level solved (0 = full resolution); coarser results are
        upsampled bicubically at the end.
    levels : int
        Maximum pyramid depth.
    eta : float in (0, 1]
        Downsampling factor between levels.
    a_smooth : float
        Exponent of the smoothness penalty (1 = quadratic).
    a_data : float or (C,)
        Exponent of the data penalty per channel.
    weight : None, (C,), (H, W) or (H, W, C)
        Channel weights.  None: 1/C each.  A vector is normalised to sum 1.  A
        spatial map is used as given (repeated over channels when 2-D).
    uv : None or (H, W, 2)
        Initial field (u, v); enters through the smoothness term of the
        coarsest level, as in the toolbox.
    const_assumption : {"gc", "gray"}
        Data term: gradient constancy (toolbox default) or brightness constancy.
    matlab_quirks : bool
        True reproduces the toolbox exactly (see the module docstring).

    Returns
    -------
    w : ndarray, float64, (H, W, 2)
        ``w[..., 0] = u`` along columns, ``w[..., 1] = v`` along rows, in pixels:
        ``fixed(x, y) ~ moving(x + u, y + v)``.
    """
    f1 = _as_image(fixed, "fixed")
    f2 = _as_image(moving, "moving")
    if f1.shape != f2.shape:
        msg = f"fixed and moving must have the same shape, got {f1.shape} and {f2.shape}"
        raise InputError(msg)
    H, W, C = f1.shape
    al = np.atleast_1d(np.asarray(alpha, dtype=np.float64)).ravel()
    if al.size not in (1, 2):
        msg = f"alpha must be a number or a pair, got {alpha!r}"
        raise ConfigError(msg)
    ax = _positive("alpha", al[0])
    ay = _positive("alpha", al[-1])
    eta = _positive("eta", eta)
    if eta > 1:
        msg = f"eta must be in (0, 1], got {eta!r}"
        raise ConfigError(msg)
    levels = _count("levels", levels, 0)
    min_level = _count("min_level", min_level, 0)
    iterations = _count("iterations", iterations, 0)
    update_lag = _count("update_lag", update_lag, 1)
    a_smooth = _positive("a_smooth", a_smooth)
    ad = _channel_vector("a_data", a_data, C)
    if np.any(ad <= 0):
        msg = f"a_data must be > 0, got {a_data!r}"
        raise ConfigError(msg)
    kind = _tensor_kind(const_assumption)
    local = False
    wmap = np.zeros((C, 1, 1))
    if weight is None:
        wvec = np.full(C, 1.0 / C)
    else:
        w = np.asarray(weight, dtype=np.float64)
        if w.ndim >= 2:
            if w.ndim == 2:
                w = np.repeat(w[:, :, None], C, axis=2)
            if w.shape != (H, W, C):
                msg = f"spatial weight must be (H, W) or (H, W, C) = {(H, W, C)}, got {np.shape(weight)}"
                raise ConfigError(msg)
            if not np.all(np.isfinite(w)) or np.any(w < 0):
                msg = "spatial weight must be finite and >= 0"
                raise ConfigError(msg)
            local = True
            wmap = _to_internal(w)
            wvec = np.zeros(C)
        else:
            wvec = _channel_vector("weight", w, C, normalise=True, fill=1.0 / C)
    if uv is None:
        ui = np.zeros((W, H))
        vi = np.zeros((W, H))
    else:
        uvarr = np.asarray(uv, dtype=np.float64)
        if uvarr.shape != (H, W, 2):
            msg = f"uv must have shape {(H, W, 2)}, got {uvarr.shape}"
            raise InputError(msg)
        ui = _field_to_internal(uvarr[..., 0], (H, W), "uv[..., 0]")
        vi = _field_to_internal(uvarr[..., 1], (H, W), "uv[..., 1]")
    out_u = np.empty((W, H))
    out_v = np.empty((W, H))
    _nb_get_displacement(_to_internal(f1), _to_internal(f2), wvec, wmap, local, ui, vi,
                         ax, ay, iterations, update_lag, ad, a_smooth, levels, eta,
                         min_level, kind, bool(matlab_quirks), out_u, out_v)
    return np.stack([out_u.T, out_v.T], axis=-1)


###############################################################################
### Warping and masks
###############################################################################


def _method_code(interpolation_method):
    try:
        return _INTERPOLATION[interpolation_method]
    except (KeyError, TypeError):
        msg = (f"interpolation_method must be one of {sorted(_INTERPOLATION)}, "
               f"got {interpolation_method!r}")
        raise ConfigError(msg) from None


def _warp(f2, u, v, f1, method):
    """Warp ``f2`` (H, W[, C]) by (u, v); returns (registered, valid (H, W))."""
    code = _method_code(method)
    mov = np.asarray(f2, dtype=np.float64)
    squeeze = mov.ndim == 2
    mov = mov[:, :, None] if squeeze else mov
    if mov.ndim != 3:
        msg = f"image must be (H, W) or (H, W, C), got shape {np.shape(f2)}"
        raise InputError(msg)
    H, W, C = mov.shape
    ref = np.asarray(f1, dtype=np.float64)
    ref = ref[:, :, None] if ref.ndim == 2 else ref
    if ref.shape != mov.shape:
        msg = f"reference shape {np.shape(f1)} does not match image shape {np.shape(f2)}"
        raise InputError(msg)
    ui = _field_to_internal(u, (H, W), "u")
    vi = _field_to_internal(v, (H, W), "v")
    src = _to_internal(mov)
    fill = _to_internal(ref)
    out = np.empty_like(src)
    valid = np.empty((W, H), np.bool_)
    for c in range(C):
        _nb_warp_plane(src[c], ui, vi, 1.0, 1.0, fill[c], code, out[c], valid)
    reg = np.transpose(out, (2, 1, 0))
    reg = reg[:, :, 0] if squeeze else reg
    return np.ascontiguousarray(reg), np.ascontiguousarray(valid.T)


def imregister_wrapper(f2, u, v, f1, interpolation_method="cubic"):
    """Backward-warp ``f2`` by the field (u, v); out-of-grid pixels come from ``f1``.

    ``registered(y, x) = f2(y + v(y, x), x + u(y, x))`` with MATLAB ``imwarp``
    semantics (module docstring).  Returns float64 of ``f2``'s shape.
    """
    return _warp(f2, u, v, f1, interpolation_method)[0]


def imregister_wrapper_w(f2, w, f1, interpolation_method="cubic"):
    """MATLAB ``imregister_wrapper_w``: ``(registered, idx)`` for a field ``w`` (H, W, 2).

    ``idx`` is the boolean valid mask (the in-grid set).
    """
    warr = np.asarray(w, dtype=np.float64)
    if warr.ndim != 3 or warr.shape[2] != 2:
        msg = f"w must have shape (H, W, 2), got {warr.shape}"
        raise InputError(msg)
    return _warp(f2, warr[..., 0], warr[..., 1], f1, interpolation_method)


def backward_valid_mask(u, v):
    """Boolean (H, W): True where ``(col + u, row + v)`` lies in the sample grid.

    That is ``0 <= col + u <= W - 1`` and ``0 <= row + v <= H - 1``; NaN is invalid.
    """
    uu = np.asarray(u, dtype=np.float64)
    vv = np.asarray(v, dtype=np.float64)
    if uu.ndim != 2 or uu.shape != vv.shape:
        msg = f"u and v must be 2-D of one shape, got {uu.shape} and {vv.shape}"
        raise InputError(msg)
    H, W = uu.shape
    x = np.arange(W)[None, :] + uu
    y = np.arange(H)[:, None] + vv
    with np.errstate(invalid="ignore"):
        return (x >= 0) & (x <= W - 1) & (y >= 0) & (y <= H - 1)


def imregister_binary(mask, u, v):
    """Warp a binary mask: nearest-neighbour sample, threshold 0.5, AND in-grid.

    Returns boolean (H, W).
    """
    m = np.asarray(mask)
    if m.ndim != 2:
        msg = f"mask must be 2-D, got shape {m.shape}"
        raise InputError(msg)
    reg, valid = _warp(m.astype(np.float64), u, v, np.zeros(m.shape), "nearest")
    return (reg > 0.5) & valid


def compute_batch_valid_masks(w):
    """Valid masks of a batch of fields ``w`` (T, H, W, 2) as uint8 (T, H, W): 255 valid, 0 not."""
    warr = np.asarray(w)
    if warr.ndim != 4 or warr.shape[3] != 2:
        msg = f"w must have shape (T, H, W, 2), got {warr.shape}"
        raise InputError(msg)
    out = np.empty(warr.shape[:3], np.uint8)
    for t in range(warr.shape[0]):
        out[t] = np.where(backward_valid_mask(warr[t, ..., 0], warr[t, ..., 1]), 255, 0)
    return out


###############################################################################
### Built-in example
###############################################################################


def _synthetic_scene(x, y, seed=7, n_cells=60, size=(128, 128)):
    """Analytic two-photon-like scene evaluated at arbitrary points.

    Ring-shaped cells and small blobs on a smooth background; ``x`` and ``y`` are
    column and row coordinates (any shape).  Exact at every point, so a moved
    frame can be made without interpolation.
    """
    rng = np.random.default_rng(seed)
    H, W = size
    img = 40.0 + 10.0 * np.sin(x / 17.0) * np.cos(y / 23.0)
    cx = rng.uniform(0, W, n_cells)
    cy = rng.uniform(0, H, n_cells)
    rad = rng.uniform(3.0, 6.0, n_cells)
    amp = rng.uniform(60.0, 140.0, n_cells)
    for k in range(n_cells):
        r = np.hypot(x - cx[k], y - cy[k])
        img = img + amp[k] * np.exp(-((r - rad[k]) ** 2) / 2.0)
    return img


def synthetic_pair(size=(128, 128), shift=(2.6, -1.7), seed=7):
    """A reference frame and a moving frame with known displacement.

    The moving frame is the scene translated by ``shift = (dx, dy)`` plus a smooth
    non-rigid wobble; returns ``(fixed, moving, w_true)`` with ``w_true`` (H, W, 2)
    such that ``fixed(p) = moving(p + w_true(p))``.
    """
    H, W = size
    yy, xx = np.mgrid[0:H, 0:W].astype(np.float64)
    fixed = _synthetic_scene(xx, yy, seed, size=size)
    wu = shift[0] + 0.6 * np.sin(2 * np.pi * yy / H)
    wv = shift[1] + 0.6 * np.cos(2 * np.pi * xx / W)
    # moving(p + w(p)) = scene(p): invert q = p + w(p) by fixed-point iteration.
    px, py = xx.copy(), yy.copy()
    for _ in range(50):
        px = xx - (shift[0] + 0.6 * np.sin(2 * np.pi * py / H))
        py = yy - (shift[1] + 0.6 * np.cos(2 * np.pi * px / W))
    moving = _synthetic_scene(px, py, seed, size=size)
    return fixed, moving, np.stack([wu, wv], axis=-1)


###############################################################################
### Command line
###############################################################################


def _cmd_demo(args):
    size = (args.size, args.size)
    fixed, moving, w_true = synthetic_pair(size=size)
    t0 = time.perf_counter()
    w = get_displacement(fixed / fixed.max(), moving / fixed.max(), alpha=args.alpha,
                         iterations=args.iterations, update_lag=5, eta=0.8, levels=100,
                         a_smooth=1.0)
    dt = time.perf_counter() - t0
    b = 8
    inner = (slice(b, -b), slice(b, -b))
    epe = np.hypot(*(w[inner] - w_true[inner]).transpose(2, 0, 1))
    epe0 = np.hypot(*w_true[inner].transpose(2, 0, 1))
    print(f"synthetic {size[0]}x{size[1]} pair, known motion: translation + smooth wobble")
    print(f"true mean displacement      u = {w_true[..., 0].mean():+.3f} px, "
          f"v = {w_true[..., 1].mean():+.3f} px")
    print(f"recovered mean displacement u = {w[..., 0].mean():+.3f} px, "
          f"v = {w[..., 1].mean():+.3f} px")
    print(f"mean endpoint error {epe.mean():.3f} px (no correction: {epe0.mean():.3f} px), "
          f"interior, {b}-px border excluded")
    print(f"time {dt:.2f} s (first call includes compilation)")
    return 0 if epe.mean() < 0.5 * epe0.mean() else 1


def _build_parser():
    p = argparse.ArgumentParser(prog="flowsession", description=__doc__.split("\n\n")[0])
    p.add_argument("--version", action="version", version=f"flowsession {__version__}")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True)
    d = sub.add_parser("demo", help="register a built-in synthetic frame pair")
    d.add_argument("--size", type=int, default=128, help="frame size in pixels (default 128)")
    d.add_argument("--alpha", type=float, default=1.5)
    d.add_argument("--iterations", type=int, default=50)
    d.set_defaults(func=_cmd_demo)
    return p


def main(argv=None) -> int:
    """Command-line entry point; returns the process exit code."""
    parser = _build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(message)s")
    try:
        return int(args.func(args))
    except FlowSessionError as exc:
        log.error("%s", exc)
        return 2
    except Exception as exc:  # CLI boundary: one line, non-zero exit
        log.error("unexpected error: %s: %s", type(exc).__name__, exc)
        log.debug("traceback", exc_info=True)
        return 1


if __name__ == "__main__":
    sys.exit(main())
