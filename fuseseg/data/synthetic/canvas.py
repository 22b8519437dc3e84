"""The synthetic scenes' vocabulary and drawing surface: the MSRS classes and object kinds, the
pinhole camera over a flat ground (:class:`Camera`), the canvas every object is drawn on (class,
instance, infrared level, visible albedo, emission and depth layers) and the colour palettes."""
from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np

CLASS_NAMES = ("unlabelled", "car", "person", "bike", "curve", "car_stop", "guardrail",
               "color_cone", "bump")
"""MSRS's 9 classes; the index is the label value (``curve`` is MSRS's spelling of curb)."""
NUM_CLASSES = len(CLASS_NAMES)
CLASS_IDS = {name: i for i, name in enumerate(CLASS_NAMES)}
KINDS = CLASS_NAMES[1:] + ("lamp",)
"""Object kinds accepted in ``render_scene(objects=...)``: every labelled class plus ``lamp``
(an unlabelled street lamp, bright at night)."""

_SHIFT = 4                    # sub-pixel bits for OpenCV drawing
_ONE = float(1 << _SHIFT)
_LIM = 2.0e6                  # clamp projected coordinates (px) so int32 fixed point never overflows


# ----------------------------------------------------------------------------- camera
@dataclass(frozen=True)
class Camera:
    """Pinhole camera over a flat ground plane (all lengths in metres, image coords in px).

    ``u = cx + focal * (X - cam_x) / Z``, ``v = horizon + focal * (cam_height - Y) / Z``."""

    height_px: int
    width_px: int
    focal: float
    cx: float
    horizon: float
    cam_height: float
    cam_x: float

    def project(self, X, Y, Z) -> np.ndarray:
        """(..., 2) array of (u, v) pixel coordinates of 3-D points (broadcast X, Y, Z)."""
        iz = 1.0 / np.asarray(Z, np.float64)
        u = self.cx + self.focal * (np.asarray(X, np.float64) - self.cam_x) * iz
        v = self.horizon + self.focal * (self.cam_height - np.asarray(Y, np.float64)) * iz
        out = np.empty(np.broadcast_shapes(np.shape(u), np.shape(v)) + (2,))
        out[..., 0] = u
        out[..., 1] = v
        return out

    def ground_point(self, u: float, v: float) -> tuple[float, float]:
        """(X, Z) of the ground point seen at pixel (u, v); v must lie below the horizon."""
        if v <= self.horizon + 1e-6:
            raise ValueError(f"pixel row {v} is not below the horizon row {self.horizon:.1f}: "
                             "objects must stand on the ground (give a larger y)")
        Z = self.focal * self.cam_height / (v - self.horizon)
        return self.cam_x + (u - self.cx) * Z / self.focal, Z

    def px_per_m(self, Z: float) -> float:
        """Image scale at depth Z: ``focal / Z`` pixels per metre."""
        return self.focal / Z

    @property
    def z_bottom(self) -> float:
        """Depth of the ground seen at the image's bottom row."""
        return self.focal * self.cam_height / (self.height_px - self.horizon)


def _u(rng, a, b):
    return float(rng.uniform(a, b))


def _loguniform(rng, a, b):
    return float(math.exp(rng.uniform(math.log(a), math.log(b))))


def valid_zoom(zoom) -> bool:
    """Whether ``zoom`` is a usable focal-length factor (a finite number > 0)."""
    return isinstance(zoom, (int, float)) and not isinstance(zoom, bool) and math.isfinite(zoom) and zoom > 0


def _random_camera(rng, H, W, zoom: float = 1.0) -> Camera:
    return Camera(height_px=H, width_px=W, focal=W * _u(rng, 0.75, 1.0) * zoom, cx=W * _u(rng, 0.35, 0.65),
                  horizon=H * _u(rng, 0.36, 0.48), cam_height=_u(rng, 1.4, 2.3), cam_x=0.0)


# ----------------------------------------------------------------------------- canvas
class _Canvas:
    """The material map being drawn and its look-up table (one row per material id).

    Row fields: class id, instance id, infrared level (grey), infrared texture gain, visible
    albedo (linear RGB), emission (linear RGB), fine/mid visible texture gains, and the ground
    point (X, Z) whose lamp light illuminates the material (NaN: use the per-pixel ground light).
    """

    def __init__(self, cam: Camera):
        self.cam = cam
        self.map = np.zeros((cam.height_px, cam.width_px), np.uint16)
        self.rows: list[tuple] = []

    def material(self, ir, rgb, *, cls=0, inst=0, emit=(0.0, 0.0, 0.0), ir_tex=0.6, fine=0.04,
                 mid=0.0, at=(math.nan, math.nan)) -> int:
        self.rows.append((cls, inst, float(ir), float(ir_tex), *map(float, rgb), *map(float, emit),
                          float(fine), float(mid), float(at[0]), float(at[1])))
        if len(self.rows) >= 65535:
            raise RuntimeError("synthetic scene uses more than 65534 materials")
        return len(self.rows)        # id 0 is never used by a part

    @staticmethod
    def _fx(pts) -> np.ndarray:
        a = np.minimum(np.maximum(np.asarray(pts, np.float64), -_LIM), _LIM)
        return np.rint(a * _ONE).astype(np.int32)

    def poly(self, pts, m: int, convex: bool = True) -> None:
        """Fill the polygon ``pts`` ((N, 2) px) with material ``m``."""
        p = self._fx(pts)
        if convex:
            cv2.fillConvexPoly(self.map, p, int(m), cv2.LINE_8, _SHIFT)
        else:
            cv2.fillPoly(self.map, [p], int(m), lineType=cv2.LINE_8, shift=_SHIFT)

    def polys(self, quads, m: int) -> None:
        """Fill several non-overlapping polygons ((n, k, 2) px) with material ``m``."""
        if len(quads):
            cv2.fillPoly(self.map, list(self._fx(quads)), int(m), lineType=cv2.LINE_8, shift=_SHIFT)

    def quad3d(self, X, Y, Z, m: int) -> None:
        """Fill the projection of a planar 3-D quad (4 corners, arrays X, Y, Z) with ``m``."""
        self.poly(self.cam.project(X, Y, Z), m)

    def ellipse(self, c, axes, m: int, angle=0.0, thickness=-1) -> None:
        cc = tuple(int(v) for v in self._fx(c))
        ax = tuple(max(0, int(round(a * _ONE))) for a in axes)
        cv2.ellipse(self.map, cc, ax, float(angle), 0.0, 360.0, int(m), int(thickness), cv2.LINE_8, _SHIFT)

    def line(self, p0, p1, thickness_px: float, m: int) -> None:
        cv2.line(self.map, tuple(int(v) for v in self._fx(p0)), tuple(int(v) for v in self._fx(p1)),
                 int(m), max(1, int(round(thickness_px))), cv2.LINE_8, _SHIFT)

    def table(self) -> np.ndarray:
        """(n_materials + 1, 14) float64 look-up table; row 0 is a dummy."""
        tab = np.zeros((len(self.rows) + 1, 14), np.float64)
        tab[1:] = np.asarray(self.rows, np.float64)
        tab[0, 12:] = math.nan
        return tab


# ----------------------------------------------------------------------------- palettes
_CAR_COLOURS = [(0.75, 0.75, 0.75), (0.55, 0.56, 0.58), (0.05, 0.05, 0.06), (0.6, 0.06, 0.05),
                (0.08, 0.15, 0.45), (0.3, 0.3, 0.32), (0.8, 0.8, 0.78), (0.15, 0.25, 0.15)]
_CLOTH_DAY = [(0.05, 0.05, 0.06), (0.12, 0.12, 0.14), (0.08, 0.12, 0.3), (0.45, 0.08, 0.08),
              (0.6, 0.6, 0.6), (0.75, 0.72, 0.6), (0.2, 0.35, 0.2), (0.5, 0.4, 0.3), (0.7, 0.55, 0.1)]
_CLOTH_NIGHT = [(0.04, 0.04, 0.05), (0.08, 0.08, 0.1), (0.06, 0.08, 0.16), (0.15, 0.12, 0.1),
                (0.22, 0.22, 0.24), (0.3, 0.06, 0.06)]
_BIKE_COLOURS = [(0.05, 0.05, 0.05), (0.6, 0.05, 0.05), (0.1, 0.2, 0.55), (0.7, 0.7, 0.7),
                 (0.1, 0.4, 0.15), (0.8, 0.6, 0.05)]


def _pick(rng, palette, jitter=0.15):
    c = np.asarray(palette[int(rng.integers(len(palette)))], np.float64)
    return tuple(np.clip(c * rng.uniform(1 - jitter, 1 + jitter, 3), 0.0, 1.0))


def _scene_params(rng, night: bool) -> dict:
    """Per-scene radiometry: infrared levels (grey) of the backgrounds, light levels."""
    p = {"night": night}
    if night:
        p["ir_road"] = _u(rng, 35, 60)
        p["ir_sky"] = _u(rng, 3, 12)
        p["ir_veg"] = p["ir_road"] - _u(rng, 6, 16)
        p["ir_walk"] = p["ir_road"] + _u(rng, -8, 4)
        p["ir_build"] = p["ir_road"] + _u(rng, -6, 8)
        p["ir_skin"] = _u(rng, 200, 245)
        p["ambient"] = _u(rng, 0.003, 0.012)
    else:
        p["ir_road"] = _u(rng, 60, 95)
        p["ir_sky"] = _u(rng, 12, 35)
        p["ir_veg"] = p["ir_road"] - _u(rng, 15, 35)
        p["ir_walk"] = p["ir_road"] + _u(rng, -15, 0)
        p["ir_build"] = p["ir_road"] + _u(rng, -20, 5)
        p["ir_skin"] = _u(rng, 185, 225)
        p["ambient"] = _u(rng, 0.45, 0.9)
    p["road_rgb"] = tuple(np.full(3, _u(rng, 0.12, 0.28)) * rng.uniform(0.95, 1.05, 3))
    p["walk_rgb"] = tuple(np.clip(np.array(_pick(rng, [(0.45, 0.42, 0.38), (0.5, 0.3, 0.25),
                                                       (0.35, 0.36, 0.38)])), 0, 1))
    p["grass_rgb"] = _pick(rng, [(0.12, 0.22, 0.06), (0.2, 0.2, 0.08), (0.25, 0.2, 0.15)])
    p["veg_rgb"] = _pick(rng, [(0.05, 0.14, 0.04), (0.08, 0.18, 0.05), (0.1, 0.15, 0.08)])
    return p


