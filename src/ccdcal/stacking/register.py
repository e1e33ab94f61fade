"""Registration of calibrated light frames for stacking: star lists matched and transforms fitted.

* :func:`find_transform` matches two catalogues (:class:`ccdcal.stacking.stars.Stars`) by
  triangle invariants, picks the consensus similarity transform (RANSAC over triangle matches),
  then refines an affine (or similarity) transform by least squares on every matched star;
  :func:`register_frames` does it for a list.

Detection, frame quality and group flags live in :mod:`ccdcal.stacking.stars` (numba-free, for
the judging helper process); their names are importable from here too.

Coordinates everywhere are 0-based pixel centres with ``x`` the column and ``y`` the row, as
in ``sep`` and numpy (``data[y, x]``). A :class:`Transform` maps a point of the frame onto the
reference grid.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ccdcal._shared.jit import njit
from ccdcal.errors import CcdcalError, InputError

# the names that lived here before detection moved to .stars, importable from here still
from .stars import FrameQuality, Stars, detect_stars, flag_outliers, frame_quality  # noqa: F401

__all__ = ["RegistrationError", "Transform", "find_transform", "register_frames"]

#: Nearest neighbours (besides the star itself) that form triangles with each control star.
_TRIANGLE_NEIGHBOURS = 5
#: Matching radius in the (shortest/longest, middle/longest) side-ratio plane.
_INVARIANT_RADIUS = 0.03
#: Triangles whose longest side is shorter than this (px) are too noisy to describe.
_MIN_TRIANGLE_SIDE = 4.0
#: Proposed similarity scales outside this range are discarded (no sane pair of frames).
_SCALE_RANGE = (0.2, 5.0)
#: Matched stars at or above which the refinement fits an affine rather than a similarity.
_AFFINE_MIN_MATCHES = 10


class RegistrationError(CcdcalError):
    """Two star lists could not be matched; the message says why in one line."""

    exit_code = 1


# --------------------------------------------------------------------------------------------
# Transforms
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class Transform:
    """A 2-D affine map from a frame's pixel grid onto the reference grid.

    Attributes
    ----------
    matrix : numpy.ndarray
        3×3 homogeneous float64 matrix: ``[xr, yr, 1] = matrix @ [x, y, 1]`` with ``(x, y)``
        in the frame and ``(xr, yr)`` in the reference; 0-based pixel centres, x = column.
    n_matched : int
        Stars matched between the two lists in the final fit.
    rms : float
        RMS residual of those stars after the fit (px, reference grid).
    """

    matrix: np.ndarray
    n_matched: int = 0
    rms: float = 0.0

    def __post_init__(self) -> None:
        matrix = np.array(self.matrix, dtype=np.float64)
        if matrix.shape != (3, 3) or not np.all(np.isfinite(matrix)):
            raise InputError(f"a Transform needs a finite 3×3 matrix, got shape {matrix.shape}")
        matrix.setflags(write=False)
        object.__setattr__(self, "matrix", matrix)

    @classmethod
    def identity(cls, n_matched: int = 0) -> Transform:
        """The identity (the reference frame onto itself)."""
        return cls(np.eye(3), n_matched=n_matched, rms=0.0)

    @property
    def rotation(self) -> float:
        """Rotation angle (degrees, counter-clockwise in x/y, in (-180, 180])."""
        m = self.matrix
        angle = math.degrees(math.atan2(m[1, 0] - m[0, 1], m[0, 0] + m[1, 1]))
        return angle + 360.0 if angle <= -180.0 else angle

    @property
    def scale(self) -> float:
        """Linear scale factor, ``sqrt(|det|)`` of the 2×2 part."""
        return math.sqrt(abs(float(np.linalg.det(self.matrix[:2, :2]))))

    @property
    def shift(self) -> tuple[float, float]:
        """(dx, dy): where the frame's pixel (0, 0) lands on the reference grid."""
        return float(self.matrix[0, 2]), float(self.matrix[1, 2])

    def apply(self, x: np.ndarray | float, y: np.ndarray | float) -> tuple:
        """Map frame coordinates to the reference grid; arrays broadcast, scalars give floats."""
        x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
        m = self.matrix
        xr = m[0, 0] * x + m[0, 1] * y + m[0, 2]
        yr = m[1, 0] * x + m[1, 1] * y + m[1, 2]
        if xr.ndim == 0:
            return float(xr), float(yr)
        return xr, yr

    def inverse(self) -> Transform:
        """The map from the reference grid back onto the frame (rms in frame pixels)."""
        scale = self.scale
        return Transform(np.linalg.inv(self.matrix), n_matched=self.n_matched,
                         rms=self.rms / scale if scale > 0 else self.rms)

    def __repr__(self) -> str:
        dx, dy = self.shift
        return (f"Transform(shift=({dx:.2f}, {dy:.2f}), rotation={self.rotation:.3f}°, "
                f"scale={self.scale:.5f}, n_matched={self.n_matched}, rms={self.rms:.3f})")


def _control(stars: Stars, max_control: int) -> np.ndarray:
    """(m, 2) positions of the brightest ``max_control`` stars."""
    order = np.argsort(-np.asarray(stars.flux, dtype=np.float64), kind="stable")[:max_control]
    return np.column_stack([np.asarray(stars.x, np.float64)[order],
                            np.asarray(stars.y, np.float64)[order]])


@njit(cache=True, nogil=True)
def nearest(query: np.ndarray, points: np.ndarray, bound: float) -> tuple[np.ndarray, np.ndarray]:
    """For each of the (q, 2) ``query`` points, the distance to and the index of the nearest of
    the (p, 2) ``points`` closer than ``bound``; (inf, p) where none is. Star lists hold at most
    a few hundred stars: a direct search is faster than building a tree."""
    n, m = query.shape[0], points.shape[0]
    dist = np.full(n, np.inf)
    index = np.full(n, m, np.int64)
    for i in range(n):
        best, k = bound * bound, m
        qx, qy = query[i, 0], query[i, 1]
        for j in range(m):
            dx, dy = qx - points[j, 0], qy - points[j, 1]
            d2 = dx * dx + dy * dy
            if d2 < best:
                best, k = d2, j
        if k < m:
            dist[i], index[i] = math.sqrt(best), k
    return dist, index


@njit(cache=True, nogil=True, inline="always")
def _within(a: np.ndarray, i: int, b: np.ndarray, j: int, r2: float) -> bool:
    d2 = 0.0
    for c in range(a.shape[1]):
        d2 += (a[i, c] - b[j, c]) ** 2
    return d2 <= r2


@njit(cache=True, nogil=True)
def _pairs_within(a: np.ndarray, b: np.ndarray, radius: float) -> tuple[np.ndarray, np.ndarray]:
    """Every pair (i, j) with ``|a[i] − b[j]| ≤ radius`` (rows of equal width), in order of i then j:
    counted, then filled (no list grows in the kernel)."""
    r2 = radius * radius
    count = 0
    for i in range(a.shape[0]):
        for j in range(b.shape[0]):
            count += _within(a, i, b, j, r2)
    ia, ib = np.empty(count, np.int64), np.empty(count, np.int64)
    k = 0
    for i in range(a.shape[0]):
        for j in range(b.shape[0]):
            if _within(a, i, b, j, r2):
                ia[k], ib[k] = i, j
                k += 1
    return ia, ib


def _triangles(xy: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Triangles of each star with its nearest neighbours, vertices in canonical order.

    Returns the vertex indices ``(T, 3)``, ordered as the vertex opposite the shortest,
    middle and longest side, and invariants ``(T, 3)``: shortest/longest and middle/longest
    side ratios (rotation-, scale- and shift-free) plus the orientation (±1, scaled so that
    mirror-image triangles never match).
    """
    n = len(xy)
    k = min(_TRIANGLE_NEIGHBOURS + 1, n)
    d2 = np.square(xy[:, None, :] - xy[None, :, :]).sum(axis=2)
    nn = np.argsort(d2, axis=1, kind="stable")[:, :k]
    combos = np.array(list(itertools.combinations(range(k), 3)))
    tri = np.unique(np.sort(nn[:, combos].reshape(-1, 3), axis=1), axis=0)
    pts = xy[tri]  # (T, 3, 2)
    opposite = np.stack([np.hypot(*(pts[:, 1] - pts[:, 2]).T),
                         np.hypot(*(pts[:, 0] - pts[:, 2]).T),
                         np.hypot(*(pts[:, 0] - pts[:, 1]).T)], axis=1)
    order = np.argsort(opposite, axis=1, kind="stable")
    tri = np.take_along_axis(tri, order, axis=1)
    sides = np.take_along_axis(opposite, order, axis=1)
    keep = sides[:, 2] >= _MIN_TRIANGLE_SIDE
    tri, sides = tri[keep], sides[keep]
    p = xy[tri]
    cross = ((p[:, 1, 0] - p[:, 0, 0]) * (p[:, 2, 1] - p[:, 0, 1])
             - (p[:, 1, 1] - p[:, 0, 1]) * (p[:, 2, 0] - p[:, 0, 0]))
    inv = np.column_stack([sides[:, 0] / sides[:, 2], sides[:, 1] / sides[:, 2],
                           10.0 * np.sign(cross)])
    return tri, inv


def _proposals(xy_f: np.ndarray, xy_r: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Similarity transforms ``z → a z + b`` (complex) proposed by matched triangles."""
    tri_f, inv_f = _triangles(xy_f)
    tri_r, inv_r = _triangles(xy_r)
    if len(tri_f) == 0 or len(tri_r) == 0:
        return np.empty(0, complex), np.empty(0, complex)
    i_f, i_r = _pairs_within(np.ascontiguousarray(inv_f), np.ascontiguousarray(inv_r), _INVARIANT_RADIUS)
    if i_f.size == 0:
        return np.empty(0, complex), np.empty(0, complex)
    zf = xy_f[tri_f[i_f], 0] + 1j * xy_f[tri_f[i_f], 1]
    zr = xy_r[tri_r[i_r], 0] + 1j * xy_r[tri_r[i_r], 1]
    a, b = _similarity_complex(zf, zr, np.ones(zf.shape))
    scale = np.abs(a)
    ok = np.isfinite(a) & (scale > _SCALE_RANGE[0]) & (scale < _SCALE_RANGE[1])
    return a[ok], b[ok]


def _similarity_complex(zs: np.ndarray, zd: np.ndarray,
                        w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Weighted least-squares ``zd ≈ a zs + b`` along the last axis (complex points)."""
    wsum = w.sum(axis=-1)
    ms = (w * zs).sum(axis=-1) / wsum
    md = (w * zd).sum(axis=-1) / wsum
    ds, dd = zs - ms[..., None], zd - md[..., None]
    with np.errstate(divide="ignore", invalid="ignore"):
        a = (w * dd * np.conj(ds)).sum(axis=-1) / (w * np.abs(ds) ** 2).sum(axis=-1)
    return a, md - a * ms


def _consensus(a: np.ndarray, b: np.ndarray, xy_f: np.ndarray, xy_r: np.ndarray,
               tolerance: float) -> tuple[int, np.ndarray | None]:
    """The proposal with the most control stars landing within ``tolerance`` of a reference
    control star (ties: smallest summed squared distance); its count and 3×3 matrix.

    Proposals are tried in the order of their votes (how many proposals agree with each to
    within 0.3° of rotation, 1 % of scale and ``tolerance`` of shift: a true transform is
    proposed by many matched triangles, a chance match by one), the best voted first; the
    search ends at a chunk whose best proposal places 80 % of the shorter control list of 10 or
    more stars (no chance alignment does; the refinement that follows fits all the matched stars
    anyway)."""
    zf = xy_f[:, 0] + 1j * xy_f[:, 1]
    key = np.column_stack([np.round(np.log(np.abs(a)) / 0.01), np.round(np.angle(a) / math.radians(0.3)),
                           np.round(b.real / tolerance), np.round(b.imag / tolerance)]).astype(np.int64)
    _, group, votes = np.unique(key, axis=0, return_inverse=True, return_counts=True)
    order = np.argsort(-votes[group.ravel()], kind="stable")
    a, b = a[order], b[order]
    # short lists (under 10 control stars) are searched whole: a chance alignment of a few stars
    # could otherwise end the search
    shorter = min(len(xy_f), len(xy_r))
    enough = math.ceil(0.8 * shorter) if shorter >= 10 else shorter + 1
    best_count, best_cost, best = 0, math.inf, None
    chunk = max(1, 200_000 // max(1, len(zf)))
    starts = [0, *range(min(64, len(a)), len(a), chunk)]
    for start, stop in zip(starts, [*starts[1:], len(a)], strict=True):
        if start >= stop:
            continue
        za = a[start:stop, None] * zf[None, :] + b[start:stop, None]
        d, _ = nearest(np.column_stack([za.real.ravel(), za.imag.ravel()]), xy_r, tolerance)
        d = d.reshape(za.shape)
        hit = np.isfinite(d)
        count = hit.sum(axis=1)
        cost = np.where(hit, d * d, 0.0).sum(axis=1)
        score = count * 1e6 - cost / (tolerance * tolerance * (len(zf) + 1))
        j = int(np.argmax(score))
        if count[j] > best_count or (count[j] == best_count and cost[j] < best_cost):
            best_count, best_cost, best = int(count[j]), float(cost[j]), start + j
        if best_count >= enough:
            break
    if best is None:
        return 0, None
    return best_count, _complex_matrix(a[best], b[best])


def _complex_matrix(a: complex, b: complex) -> np.ndarray:
    """The 3×3 matrix of ``z → a z + b``."""
    return np.array([[a.real, -a.imag, b.real], [a.imag, a.real, b.imag], [0.0, 0.0, 1.0]])


def _fit(src: np.ndarray, dst: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Weighted least-squares matrix mapping ``src`` onto ``dst``: affine with
    ``_AFFINE_MIN_MATCHES`` or more pairs, similarity with fewer."""
    if len(src) < _AFFINE_MIN_MATCHES:
        a, b = _similarity_complex(src[:, 0] + 1j * src[:, 1], dst[:, 0] + 1j * dst[:, 1], w)
        return _complex_matrix(complex(a), complex(b))
    sw = np.sqrt(w)[:, None]
    design = np.column_stack([src, np.ones(len(src))]) * sw
    coef, *_ = np.linalg.lstsq(design, dst * sw, rcond=None)
    return np.vstack([coef.T, [0.0, 0.0, 1.0]])


def _centroid_variance(stars: Stars) -> np.ndarray:
    """Per-star centroid variance (px²), ≈ (FWHM / S/N)² plus a (0.01 px)² floor, S/N from the
    flux against the sky noise in a disc of radius FWHM."""
    flux = np.asarray(stars.flux, np.float64)
    fwhm = np.asarray(stars.fwhm, np.float64)
    noise = float(stars.background_rms) * math.sqrt(math.pi) * fwhm
    with np.errstate(divide="ignore", invalid="ignore"):
        sigma2 = (fwhm * noise / flux) ** 2 + 1e-4
    sigma2 = np.where(np.isfinite(sigma2) & (sigma2 > 0), sigma2, np.nan)
    fill = float(np.nanmedian(sigma2)) if np.isfinite(sigma2).any() else 1.0
    return np.where(np.isfinite(sigma2), sigma2, fill)


def _match(matrix: np.ndarray, xy_f: np.ndarray, xy_r: np.ndarray,
           tol: float) -> tuple[np.ndarray, np.ndarray]:
    """One-to-one nearest-neighbour pairs (frame index, reference index) within ``tol``."""
    p = np.ascontiguousarray(xy_f @ matrix[:2, :2].T + matrix[:2, 2])
    d, j = nearest(p, xy_r, tol)
    i = np.flatnonzero(np.isfinite(d))
    i = i[np.argsort(d[i], kind="stable")]
    _, first = np.unique(j[i], return_index=True)
    i = np.sort(i[first])
    return i, j[i]


def _clipped_fit(src: np.ndarray, dst: np.ndarray,
                 w: np.ndarray) -> tuple[np.ndarray, int, float]:
    """Fit, then drop pairs beyond 4σ of the residuals and refit (up to 3 times); returns the
    matrix, the pairs kept and their RMS residual (px)."""
    for _ in range(4):
        matrix = _fit(src, dst, w)
        resid = np.hypot(*(src @ matrix[:2, :2].T + matrix[:2, 2] - dst).T)
        sigma = math.sqrt(float(np.median(resid ** 2)) / (2.0 * math.log(2.0)))
        keep = resid <= max(4.0 * sigma, 0.05)
        if keep.all() or keep.sum() < 3:
            break
        src, dst, w = src[keep], dst[keep], w[keep]
    return matrix, len(src), float(np.sqrt(np.mean(resid ** 2)))


def _refine(matrix: np.ndarray, stars: Stars, reference: Stars,
            tolerance: float) -> tuple[np.ndarray, int, float]:
    """Match every star under ``matrix`` and refit, three times with shrinking tolerance;
    returns the matrix, the number of matched stars and their RMS residual (px)."""
    xy_f = np.column_stack([np.asarray(stars.x, np.float64), np.asarray(stars.y, np.float64)])
    xy_r = np.column_stack([np.asarray(reference.x, np.float64),
                            np.asarray(reference.y, np.float64)])
    var_f, var_r = _centroid_variance(stars), _centroid_variance(reference)
    tol, n_matched, rms = tolerance, 0, math.nan
    for _ in range(3):
        i, j = _match(matrix, xy_f, xy_r, tol)
        if len(i) < 3:
            break
        scale2 = abs(float(np.linalg.det(matrix[:2, :2])))
        w = 1.0 / (var_f[i] * scale2 + var_r[j])
        matrix, n_matched, rms = _clipped_fit(xy_f[i], xy_r[j], w)
        tol = min(tol, max(tolerance / 3.0, 5.0 * rms))
    return matrix, n_matched, rms


def find_transform(stars: Stars, reference_stars: Stars, *, max_control: int = 50,
                   tolerance: float = 3.0) -> Transform:
    """Find the transform that maps ``stars`` (a frame) onto ``reference_stars``.

    Triangles are built from each of the brightest ``max_control`` stars of both lists and
    its 5 nearest neighbours, described by their side ratios and orientation, and matched by
    those; each triangle match proposes a similarity (any rotation including a 180°
    meridian flip, any shift, scale within 0.2–5; mirror images are not matched). The
    proposal putting the most control stars within ``tolerance`` px of a reference star wins;
    then all stars are matched one-to-one under it and an affine (≥ 10 matches) or similarity
    is fitted by weighted least squares, three times with shrinking tolerance and 4σ clipping.

    Parameters
    ----------
    stars, reference_stars : Stars
        The frame's and the reference's catalogues.
    max_control : int
        Brightest stars of each list used for triangle matching.
    tolerance : float
        Match radius (px, reference grid) for the consensus count and the first refinement.

    Raises
    ------
    RegistrationError
        Fewer than 3 stars in either list, or no transform matched enough control stars (at
        least 4, or all of a shorter list, and at least 20 % of the smaller control list).
    """
    if max_control < 3 or not tolerance > 0:
        raise InputError(f"find_transform needs max_control ≥ 3 and tolerance > 0, got "
                         f"{max_control} and {tolerance}")
    for label, cat in (("in the frame", stars), ("in the reference", reference_stars)):
        if len(cat) < 3:
            raise RegistrationError(f"only {len(cat)} stars found {label}; needs at least 3")
    xy_f, xy_r = _control(stars, max_control), _control(reference_stars, max_control)
    a, b = _proposals(xy_f, xy_r)
    smaller = min(len(xy_f), len(xy_r))
    need = min(smaller, max(4, math.ceil(0.2 * smaller)))
    count, matrix = _consensus(a, b, xy_f, xy_r, tolerance) if a.size else (0, None)
    if matrix is None or count < need:
        raise RegistrationError(f"no transform matched more than {count} stars (needs {need} "
                                f"of the brightest {smaller})")
    matrix, n_matched, rms = _refine(matrix, stars, reference_stars, tolerance)
    if n_matched < 3:
        raise RegistrationError(f"no transform matched more than {max(count, n_matched)} stars "
                                f"after refinement")
    return Transform(matrix, n_matched=n_matched, rms=rms)


def register_frames(stars_list: Sequence[Stars], reference_index: int, *, max_control: int = 50,
                    tolerance: float = 3.0) -> list[Transform | RegistrationError]:
    """Transforms of every frame onto the frame ``reference_index``.

    Returns, per frame, its :class:`Transform` (the identity for the reference) or the
    :class:`RegistrationError` that explains why it could not be registered.
    """
    if not -len(stars_list) <= reference_index < len(stars_list):
        raise InputError(f"reference_index {reference_index} is outside the {len(stars_list)} "
                         f"frames")
    reference = stars_list[reference_index]
    ref_pos = reference_index % len(stars_list)
    out: list[Transform | RegistrationError] = []
    for k, stars in enumerate(stars_list):
        if k == ref_pos:
            out.append(Transform.identity(n_matched=len(reference)))
            continue
        try:
            out.append(find_transform(stars, reference, max_control=max_control,
                                      tolerance=tolerance))
        except RegistrationError as exc:
            out.append(exc)
    return out
