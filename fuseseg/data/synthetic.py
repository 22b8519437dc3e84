"""Synthetic MSRS-like labelled infrared/visible street scenes.

``fuseseg`` must run on a fresh machine without a download, so it renders its own labelled
data set in the MSRS layout::

    OUT/{train,test}/{ir,vi,Segmentation_labels}/00001D.png, 00002N.png, ...

ir: (H, W) uint8; vi: (H, W, 3) uint8 RGB (files are BGR PNGs, as OpenCV writes them);
labels: (H, W) uint8 class ids 0..8 in MSRS's order (:data:`CLASS_NAMES`). Names carry MSRS's
day/night suffix (``D``/``N``) and are numbered continuously across train, then test.

How a scene is made
-------------------
*Geometry.* A pinhole camera at height ``h_c`` (m) above a flat ground plane looks along the
road. A 3-D point (X lateral, Y up, Z depth, metres) projects to::

    u = c_x + f (X - X_cam) / Z,        v = v_h + f (h_c - Y) / Z

(``v_h`` the horizon row), so objects shrink as 1/Z. Every object (road, curbs, cars, people,
...) is a set of planar parts whose corners are projected and filled with OpenCV.

*One map, three images.* All parts are drawn, far to near (painter's algorithm), into one
``uint16`` *material map*: each part gets a material id whose row in a look-up table holds its
class id, instance id, temperature-like infrared level, visible albedo (linear RGB), emission
and texture gains. The label map, the instance map, the infrared and the visible image are then
all look-ups of that same map, so labels are exactly the visible pixels of each object and the
three outputs agree by construction (occluded pixels belong to the nearer object).

*Physics, so the modalities complement each other.*

- Infrared = temperature: people hottest (skin > clothes), cars warm with hot wheels and engine,
  lamp heads warm, sky cold; cones, bumps, bikes and painted lines within a few grey levels of the
  road they stand on; guardrail metal a little colder. Smooth (low-frequency texture only),
  blurred (sigma 0.7..1.2 px) with sensor noise (sigma 1.2..2.5 grey levels).
- Visible = albedo x illumination + emission, gamma-encoded (``255 * sqrt(lin)``), with
  fine and mid-scale texture. Day: bright sun. Night (about half the scenes): weak ambient light,
  pools of light under street lamps and in front of head-lights, glowing lamps, lit windows and
  car lights, strong sensor noise, mostly dark clothing.

So at night people stand out in infrared but hardly in visible, and cones and bumps (orange/
white, yellow/black) stand out in visible but hardly in infrared; :func:`measure_contrast`
measures this and the tests assert it.
"""
from __future__ import annotations

import json
import math
import os
import re
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass
from pathlib import Path

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


# ----------------------------------------------------------------------------- layout
def _random_layout(rng, cam: Camera) -> dict:
    """Road width, sidewalks, and the camera's lateral place on the road."""
    road_w = _u(rng, 5.5, 11.0)
    return {"road_w": road_w, "walk_w": [_u(rng, 1.5, 4.0), _u(rng, 1.5, 4.0)],
            "curb_h": _u(rng, 0.1, 0.2), "z_far": 400.0}


def _near_z(cam: Camera, lo=1.15, hi=50.0, rng=None):
    return _loguniform(rng, cam.z_bottom * lo, max(hi, cam.z_bottom * lo * 1.5))


def _auto_objects(rng, cam: Camera, lay: dict) -> list[dict]:
    """Random object specs (kind + place); their remaining parameters come from _complete."""
    rw = lay["road_w"]
    half = rw / 2
    objs: list[dict] = []
    for side in (-1, 1):
        if rng.random() < 0.92:
            objs.append({"cls": "curve", "side": side})
    if rng.random() < 0.5:
        for side in ((-1,), (1,), (-1, 1))[int(rng.integers(3))]:
            za = cam.z_bottom * _u(rng, 0.8, 2.5)
            objs.append({"cls": "guardrail", "side": side, "Z0": za, "Z1": za + _u(rng, 15, 90)})
    lanes = [-rw / 4, rw / 4] if rw >= 7 else [0.0]
    for _ in range(int(rng.choice([0, 1, 1, 2, 2, 3, 4]))):
        if rng.random() < 0.25:                       # parked at the road edge
            side = 1 if rng.random() < 0.5 else -1
            X = side * (half - _u(rng, 1.0, 1.3))
        else:
            X = lanes[int(rng.integers(len(lanes)))] + _u(rng, -0.4, 0.4)
        objs.append({"cls": "car", "X": X, "Z": _near_z(cam, 1.3, 60, rng)})
    for _ in range(int(rng.choice([0, 1, 1, 2, 2, 3, 4, 5]))):
        if rng.random() < 0.6:
            side = 1 if rng.random() < 0.5 else -1
            X = side * (half + _u(rng, 0.3, max(0.4, lay["walk_w"][side > 0] - 0.3)))
        else:
            X = _u(rng, -half + 0.3, half - 0.3)
        objs.append({"cls": "person", "X": X, "Z": _near_z(cam, 1.1, 45, rng)})
    for _ in range(int(rng.choice([0, 0, 1, 1, 2]))):
        side = 1 if rng.random() < 0.5 else -1
        X = side * (half + _u(rng, -1.5, 1.0))
        Z = _near_z(cam, 1.2, 35, rng)
        objs.append({"cls": "bike", "X": X, "Z": Z})
        if rng.random() < 0.6:
            objs.append({"cls": "person", "X": X, "Z": Z * 0.999, "rider": True})
    if rng.random() < 0.5:
        X0, Z0 = _u(rng, -half + 0.4, half - 0.4), _near_z(cam, 1.1, 25, rng)
        dz, dx = _u(rng, 1.5, 4.0), _u(rng, -0.3, 0.3)
        for k in range(int(rng.integers(1, 7))):
            objs.append({"cls": "color_cone", "X": X0 + k * dx, "Z": Z0 + k * dz})
    if rng.random() < 0.45:
        objs.append({"cls": "bump", "Z": _near_z(cam, 1.2, 25, rng)})
    if rng.random() < 0.4:
        side = 1 if rng.random() < 0.5 else -1
        lay["walk_w"][side > 0] = max(lay["walk_w"][side > 0], _u(rng, 3.0, 5.0))
        X = side * (half + _u(rng, 1.0, lay["walk_w"][side > 0] - 1.0))
        Z0, dz = _near_z(cam, 1.1, 20, rng), _u(rng, 2.5, 3.2)
        for k in range(int(rng.integers(1, 6))):
            objs.append({"cls": "car_stop", "X": X, "Z": Z0 + k * dz})
    for _ in range(int(rng.integers(0, 4))):
        side = 1 if rng.random() < 0.5 else -1
        objs.append({"cls": "lamp", "X": side * (half + _u(rng, 0.3, 0.9)), "Z": _near_z(cam, 1.5, 60, rng),
                     "side": side})
    return objs


def _complete(o: dict, rng, cam: Camera, lay: dict, p: dict) -> list[dict]:
    """Validate an object spec, fill missing parameters from ``rng``; long objects (curbs,
    guardrails) become several depth segments so the painter's algorithm handles occlusion."""
    o = dict(o)
    kind = o.get("cls", o.get("kind"))
    if isinstance(kind, (int, np.integer)):
        if not 1 <= int(kind) < NUM_CLASSES:
            raise ValueError(f"object {o}: class id {kind} is not a labelled class (1..8)")
        kind = CLASS_NAMES[int(kind)]
    if kind not in KINDS:
        raise ValueError(f"object {o}: unknown kind {kind!r}; valid: {', '.join(KINDS)}")
    o["kind"] = kind
    o["cls"] = CLASS_IDS.get(kind, 0)
    if "x" in o or "y" in o:
        if not ("x" in o and "y" in o):
            raise ValueError(f"object {o}: give both pixel coordinates x and y (foot point), or X and Z")
        o["X"], o["Z"] = cam.ground_point(float(o["x"]), float(o["y"]))
    night, road = p["night"], p["ir_road"]
    half = lay["road_w"] / 2
    if kind in ("curve", "guardrail"):
        side = int(o.get("side", 1))
        z0 = float(o.get("Z0", cam.z_bottom * 0.7))
        z1 = float(o.get("Z1", lay["z_far"] if kind == "curve" else z0 + 40))
        if kind == "curve":
            o.setdefault("X", side * half)
            o.setdefault("h", lay["curb_h"])
            o.setdefault("ir", road + (_u(rng, 6, 14) if night else -_u(rng, 5, 12)))
            o.setdefault("rgb", tuple(np.full(3, _u(rng, 0.45, 0.65))))
            o.setdefault("stripes", rng.random() < 0.25)
            ratio, step = 1.35, None
        else:
            o.setdefault("X", side * (half + _u(rng, 0.25, 0.6)))
            o.setdefault("h", _u(rng, 0.6, 0.9))
            o.setdefault("beam", rng.random() < 0.5)
            o.setdefault("ir", p["ir_walk"] - (_u(rng, 10, 20) if night else _u(rng, -5, 8)))
            o.setdefault("rgb", tuple(np.full(3, _u(rng, 0.5, 0.78))))
            ratio, step = None, _u(rng, 2.0, 3.5)
        bounds = [z0]
        while bounds[-1] < z1:
            bounds.append(min(z1, bounds[-1] * ratio if ratio else bounds[-1] + step))
            if len(bounds) > 400:
                break
        segs = []
        for k, (za, zb) in enumerate(zip(bounds[:-1], bounds[1:], strict=True)):
            seg = dict(o, side=side, Za=za, Zb=zb, Z=za, k=k)
            segs.append(seg)
        return segs
    if kind == "bump":
        o.setdefault("X", 0.0)
    if "X" not in o or "Z" not in o:
        raise ValueError(f"object {o}: give its place as X, Z (metres) or x, y (foot pixel)")
    o["X"], o["Z"] = float(o["X"]), float(o["Z"])
    if o["Z"] <= 0.3:
        raise ValueError(f"object {o}: depth Z={o['Z']:.2f} m is behind or at the camera; use Z > 0.3")
    at = (o["X"], o["Z"])
    if kind == "person":
        o.setdefault("h", _u(rng, 1.5, 1.9))
        o.setdefault("width", _u(rng, 0.65, 1.0))
        o.setdefault("stride", _u(rng, -0.22, 0.22))
        o.setdefault("skin_ir", p["ir_skin"] + _u(rng, -8, 6))
        o.setdefault("cloth_ir", o["skin_ir"] - _u(rng, 15, 45))
        o.setdefault("leg_ir", o["skin_ir"] - _u(rng, 25, 55))
        pal = _CLOTH_NIGHT if night and rng.random() < 0.8 else _CLOTH_DAY
        o.setdefault("top_rgb", _pick(rng, pal))
        o.setdefault("leg_rgb", _pick(rng, pal))
        o.setdefault("skin_rgb", tuple(np.array([0.55, 0.4, 0.3]) * _u(rng, 0.4, 1.1)))
    elif kind == "car":
        o.setdefault("L", _u(rng, 3.9, 4.8))
        o.setdefault("W", _u(rng, 1.65, 1.9))
        o.setdefault("H", _u(rng, 1.38, 1.75))
        o.setdefault("front", rng.random() < 0.4)      # facing the camera: head-lights visible
        o.setdefault("rgb", _pick(rng, _CAR_COLOURS, 0.08))
        o.setdefault("body_ir", road + _u(rng, 15, 45))
        o.setdefault("hot_ir", road + _u(rng, 70, 120))
        o.setdefault("lights_on", night or rng.random() < 0.15)
    elif kind == "bike":
        o.setdefault("squash", _u(rng, 0.35, 1.0))
        o.setdefault("facing", 1 if rng.random() < 0.5 else -1)
        o.setdefault("motor", rng.random() < 0.3)
        o.setdefault("rgb", _pick(rng, _BIKE_COLOURS, 0.1))
        o.setdefault("ir", road + _u(rng, -3, 4))
        o.setdefault("engine_ir", road + _u(rng, 60, 110))
    elif kind == "color_cone":
        o.setdefault("h", _u(rng, 0.45, 0.75))
        o.setdefault("rgb", _pick(rng, [(0.9, 0.32, 0.04), (0.92, 0.4, 0.03), (0.8, 0.1, 0.06)], 0.05))
        o.setdefault("bands", int(rng.integers(1, 3)))
        o.setdefault("ir", road + _u(rng, -2.0, 2.0))
    elif kind == "bump":
        o.setdefault("X0", -half)
        o.setdefault("X1", half)
        o.setdefault("depth", _u(rng, 0.5, 0.9))
        o.setdefault("h", _u(rng, 0.05, 0.09))
        o.setdefault("stripe", _u(rng, 0.35, 0.6))
        o.setdefault("ir", road + _u(rng, -0.8, 0.8))
    elif kind == "car_stop":
        o.setdefault("len", _u(rng, 1.4, 1.8))
        o.setdefault("h", _u(rng, 0.1, 0.16))
        o.setdefault("yellow", rng.random() < 0.6)
        o.setdefault("ir", p["ir_walk"] + (_u(rng, 8, 16) if night else _u(rng, -4, 8)))
    elif kind == "lamp":
        o.setdefault("side", 1 if o["X"] > 0 else -1)
        o.setdefault("h", _u(rng, 5.0, 8.0))
        o.setdefault("arm", _u(rng, 0.8, 1.8))
        o.setdefault("power", _u(rng, 0.08, 0.25))
    o["at"] = at
    return [o]


# ----------------------------------------------------------------------------- drawers
def _draw_curve(c: _Canvas, o, p, inst):
    s, X, h, za, zb = o["side"], o["X"], o["h"], o["Za"], o["Zb"]
    m = c.material(o["ir"], o["rgb"], cls=o["cls"], inst=inst, fine=0.06)
    if o["stripes"] and o["k"] % 2 == 1:
        m = c.material(o["ir"], (0.7, 0.6, 0.05) if s > 0 else (0.6, 0.08, 0.06), cls=o["cls"], inst=inst)
    top = c.material(o["ir"] + (2 if p["night"] else 4), tuple(min(1.0, v * 1.1) for v in o["rgb"]),
                     cls=o["cls"], inst=inst, fine=0.06)
    x2 = X + s * 0.22
    c.quad3d([X, x2, x2, X], [h, h, h, h], [za, za, zb, zb], top)
    c.quad3d([X, X, X, X], [0, h, h, 0], [za, za, zb, zb], m)


def _draw_guardrail(c: _Canvas, o, p, inst):
    X, h, za, zb = o["X"], o["h"], o["Za"], o["Zb"]
    m = c.material(o["ir"], o["rgb"], cls=o["cls"], inst=inst, fine=0.03)
    dark = c.material(o["ir"] - 2, tuple(v * 0.6 for v in o["rgb"]), cls=o["cls"], inst=inst, fine=0.03)
    if o["beam"]:
        c.quad3d([X] * 4, [h - 0.32, h, h, h - 0.32], [za, za, zb, zb], m)
        c.quad3d([X] * 4, [h - 0.2, h - 0.12, h - 0.12, h - 0.2], [za, za, zb, zb], dark)
    else:
        for y in (h, h * 0.55):
            c.quad3d([X] * 4, [y - 0.06, y, y, y - 0.06], [za, za, zb, zb], m)
    w = 0.06                                               # post: a thin box, front face
    c.quad3d([X - w, X + w, X + w, X - w], [0, 0, h + 0.05, h + 0.05], [za] * 4, dark)


def _draw_person(c: _Canvas, o, p, inst):
    cam = c.cam
    X, Z, h, w, st = o["X"], o["Z"], o["h"], o["width"], o["stride"]
    y0 = 0.25 if o.get("rider") else 0.0
    cl, at = o["cls"], o["at"]
    skin = c.material(o["skin_ir"], o["skin_rgb"], cls=cl, inst=inst, at=at, ir_tex=0.3)
    top = c.material(o["cloth_ir"], o["top_rgb"], cls=cl, inst=inst, at=at, ir_tex=0.5, fine=0.06)
    legs = c.material(o["leg_ir"], o["leg_rgb"], cls=cl, inst=inst, at=at, ir_tex=0.5, fine=0.06)
    shoe = c.material(p["ir_road"] + 15, (0.05, 0.05, 0.05), cls=cl, inst=inst, at=at)

    def P(pts):                                            # (a lateral, b up) metres -> px
        a = np.asarray(pts, np.float64)
        return cam.project(X + a[:, 0], y0 + a[:, 1], Z)

    hip, sh, leg_w = 0.47 * h, 0.81 * h, 0.055 * h
    sw, hw = 0.13 * h * w, 0.095 * h * w
    spread = 0.2 * h * st if not o.get("rider") else 0.12 * h
    for sgn in (-1, 1):                                    # legs and shoes
        xf = sgn * (abs(spread) / 2 + 0.03 * h * w)
        xh = sgn * 0.045 * h * w
        c.poly(P([[xh - leg_w, hip], [xh + leg_w, hip], [xf + 0.6 * leg_w, 0.03 * h],
                  [xf - 0.6 * leg_w, 0.03 * h]]), legs)
        c.poly(P([[xf - 0.04 * h, 0.0], [xf + 0.05 * h, 0.0], [xf + 0.04 * h, 0.04 * h],
                  [xf - 0.03 * h, 0.04 * h]]), shoe)
    c.poly(P([[-hw, hip - 0.02 * h], [hw, hip - 0.02 * h], [sw, sh], [-sw, sh]]), top)
    swing = 0.07 * h * o["stride"] / 0.22
    for sgn in (-1, 1):                                    # arms, hands
        xs, xh = sgn * (sw - 0.01 * h), sgn * (sw + 0.01 * h) - sgn * swing
        c.poly(P([[xs - 0.03 * h, sh], [xs + 0.03 * h, sh], [xh + 0.025 * h, 0.5 * h],
                  [xh - 0.025 * h, 0.5 * h]]), top)
        c.ellipse(P([[xh, 0.48 * h]])[0], (0.025 * h * cam.px_per_m(Z),) * 2, skin)
    c.poly(P([[-0.03 * h, sh - 0.01 * h], [0.03 * h, sh - 0.01 * h], [0.03 * h, 0.86 * h],
              [-0.03 * h, 0.86 * h]]), skin)
    ppm = cam.px_per_m(Z)
    c.ellipse(P([[0.0, 0.915 * h]])[0], (0.055 * h * ppm, 0.07 * h * ppm), skin)


def _draw_car(c: _Canvas, o, p, inst):
    X, Z, L, Wd, Hc, cl, at = o["X"], o["Z"], o["L"], o["W"], o["H"], o["cls"], o["at"]
    cam = c.cam
    xl, xr = X - Wd / 2, X + Wd / 2
    z0, z1 = Z, Z + L
    rgb = np.asarray(o["rgb"])
    body = c.material(o["body_ir"], rgb, cls=cl, inst=inst, at=at, fine=0.015)
    side_m = c.material(o["body_ir"] - 4, rgb * 0.8, cls=cl, inst=inst, at=at, fine=0.015)
    top_m = c.material(o["body_ir"] - (10 if p["night"] else -8), np.minimum(1, rgb * 1.15 + 0.05),
                       cls=cl, inst=inst, at=at, fine=0.015)
    glass = c.material(p["ir_sky"] + 25, (0.05, 0.07, 0.1), cls=cl, inst=inst, at=at, fine=0.01)
    tyre = c.material(o["hot_ir"] - 10, (0.03, 0.03, 0.03), cls=cl, inst=inst, at=at)
    hot = c.material(o["hot_ir"], (0.04, 0.04, 0.045), cls=cl, inst=inst, at=at)
    bottom, belt = 0.28, 0.55 * Hc + 0.15
    # which side face the camera sees
    side_x = xl if xl > cam.cam_x else (xr if xr < cam.cam_x else None)
    if side_x is not None:
        c.quad3d([side_x] * 4, [bottom, belt, belt, bottom], [z0, z0, z1, z1], side_m)
        for zw in (z0 + 0.75, z1 - 0.8):                   # side wheels
            th = np.linspace(0, 2 * np.pi, 14, endpoint=False)
            c.poly(cam.project(side_x, 0.33 + 0.33 * np.sin(th), zw + 0.33 * np.cos(th)), tyre)
    c.quad3d([xl, xr, xr, xl], [belt] * 4, [z0, z0, z1, z1], top_m)
    ca, cb = z0 + (0.9 if not o["front"] else 1.3), z1 - (1.3 if not o["front"] else 0.9)
    xi, xo = xl + 0.12, xr - 0.12
    if side_x is not None:
        sx = xi if side_x == xl else xo
        c.quad3d([sx] * 4, [belt, Hc, Hc, belt], [ca + 0.25, ca + 0.5, cb - 0.3, cb], glass)
    c.quad3d([xi, xo, xo, xi], [Hc] * 4, [ca + 0.5, ca + 0.5, cb - 0.3, cb - 0.3], top_m)
    c.quad3d([xi, xo, xo, xi], [belt, belt, Hc, Hc], [ca + 0.05, ca + 0.05, ca + 0.5, ca + 0.5], glass)
    # near face (rear or front) with lights and wheels below the bumper
    c.quad3d([xl, xr, xr, xl], [bottom, bottom, belt, belt], [z0] * 4, body)
    for x in (xl + 0.12, xr - 0.42):
        c.quad3d([x, x + 0.3, x + 0.3, x], [0, 0, bottom + 0.02, bottom + 0.02], [z0 + 0.3] * 4, tyre)
    if o["front"]:
        c.quad3d([X - 0.45, X + 0.45, X + 0.45, X - 0.45], [0.35, 0.35, belt - 0.12, belt - 0.12], [z0] * 4, hot)
        lit = (0.9, 0.9, 0.8) if o["lights_on"] else (0.0, 0.0, 0.0)
        lamp = c.material(o["body_ir"] + 15, (0.8, 0.8, 0.75), cls=cl, inst=inst, at=at,
                          emit=tuple(v * 4.0 for v in lit))
    else:
        c.quad3d([X - 0.55, X - 0.35, X - 0.35, X - 0.55], [bottom + 0.02, bottom + 0.02, bottom + 0.1,
                 bottom + 0.1], [z0] * 4, hot)
        lit = (0.8, 0.03, 0.01) if o["lights_on"] else (0.0, 0.0, 0.0)
        lamp = c.material(o["body_ir"] + 8, (0.6, 0.04, 0.03), cls=cl, inst=inst, at=at,
                          emit=tuple(v * 1.2 for v in lit))
    yl0, yl1 = belt - 0.2, belt - 0.05
    for x in (xl + 0.06, xr - 0.3):
        c.quad3d([x, x + 0.24, x + 0.24, x], [yl0, yl0, yl1, yl1], [z0] * 4, lamp)
    plate = c.material(o["body_ir"], (0.8, 0.8, 0.75), cls=cl, inst=inst, at=at)
    c.quad3d([X - 0.22, X + 0.22, X + 0.22, X - 0.22], [0.4, 0.4, 0.52, 0.52], [z0] * 4, plate)


def _draw_bike(c: _Canvas, o, p, inst):
    cam = c.cam
    X, Z, q, d, cl, at = o["X"], o["Z"], o["squash"], o["facing"], o["cls"], o["at"]
    ppm = cam.px_per_m(Z)
    frame = c.material(o["ir"], o["rgb"], cls=cl, inst=inst, at=at, fine=0.02)
    tyre = c.material(o["ir"] + 4, (0.03, 0.03, 0.03), cls=cl, inst=inst, at=at)

    def P(a, b):
        return cam.project(X + d * q * np.asarray(a, np.float64), b, Z)

    r = 0.34
    rear, front = P(-0.52, r), P(0.52, r)
    ring = max(1.0, 0.06 * ppm)
    for ctr in (rear, front):
        c.ellipse(ctr, (r * q * ppm, r * ppm), tyre, thickness=int(round(ring)))
    seat, head, crank = P(-0.2, 0.88), P(0.36, 0.92), P(0.0, 0.32)
    t = max(1.0, 0.04 * ppm)
    for a, b in ((rear, seat), (seat, crank), (crank, rear), (seat, head), (head, crank), (head, front)):
        c.line(a, b, t, frame)
    c.line(head, P(0.42, 1.05), t, frame)
    c.line(P(0.35, 1.05), P(0.5, 1.05), t, frame)
    c.line(P(-0.3, 0.92), P(-0.1, 0.92), max(1.0, 0.05 * ppm), tyre)      # saddle
    if o["motor"]:
        eng = c.material(o["engine_ir"], (0.12, 0.12, 0.13), cls=cl, inst=inst, at=at)
        c.poly(P([-0.3, 0.3, 0.3, -0.3], [0.25, 0.25, 0.6, 0.6]).reshape(-1, 2), eng)
        c.poly(P([-0.45, 0.35, 0.25, -0.4], [0.6, 0.65, 0.85, 0.8]).reshape(-1, 2), frame)


def _draw_cone(c: _Canvas, o, p, inst):
    cam = c.cam
    X, Z, h, cl, at = o["X"], o["Z"], o["h"], o["cls"], o["at"]
    body = c.material(o["ir"], o["rgb"], cls=cl, inst=inst, at=at, fine=0.03)
    white = c.material(o["ir"] + 0.5, (0.85, 0.85, 0.85), cls=cl, inst=inst, at=at, fine=0.02,
                       emit=(0.02, 0.02, 0.02) if p["night"] else (0, 0, 0))
    base = c.material(o["ir"] - 0.5, (0.04, 0.04, 0.04), cls=cl, inst=inst, at=at)

    def P(a, b):
        return cam.project(X + np.asarray(a, np.float64), np.asarray(b, np.float64), Z)

    bw, tw, hb = 0.22 * h / 0.6, 0.03, 0.06 * h
    c.poly(P([-bw * 1.5, bw * 1.5, bw * 1.4, -bw * 1.4], [0, 0, hb, hb]), base)

    def wid(y):
        return bw + (tw - bw) * (y - hb) / (h - hb)

    c.poly(P([-bw, bw, tw, -tw], [hb, hb, h, h]), body)
    bands = [(0.55, 0.7)] if o["bands"] == 1 else [(0.4, 0.5), (0.65, 0.75)]
    for f0, f1 in bands:
        y0, y1 = hb + f0 * (h - hb), hb + f1 * (h - hb)
        c.poly(P([-wid(y0), wid(y0), wid(y1), -wid(y1)], [y0, y0, y1, y1]), white)


def _draw_bump(c: _Canvas, o, p, inst):
    Z, h, dz, cl = o["Z"], o["h"], o["depth"], o["cls"]
    glow = (0.06, 0.048, 0.0) if p["night"] else (0, 0, 0)        # retro-reflective paint
    yel = c.material(o["ir"], (0.85, 0.68, 0.04), cls=cl, inst=inst, fine=0.04, emit=glow)
    blk = c.material(o["ir"] - 0.5, (0.04, 0.04, 0.035), cls=cl, inst=inst, fine=0.04)
    yel_f = c.material(o["ir"] - 0.5, (0.7, 0.55, 0.03), cls=cl, inst=inst, fine=0.04, emit=glow)
    blk_f = c.material(o["ir"] - 1.0, (0.03, 0.03, 0.03), cls=cl, inst=inst, fine=0.04)
    n = max(1, int(round((o["X1"] - o["X0"]) / o["stripe"])))
    xs = np.linspace(o["X0"], o["X1"], n + 1)
    for k in range(n):
        a, b = xs[k], xs[k + 1]
        top, front = (yel, yel_f) if k % 2 == 0 else (blk, blk_f)
        c.quad3d([a, b, b, a], [h] * 4, [Z + 0.12, Z + 0.12, Z + dz - 0.12, Z + dz - 0.12], top)
        c.quad3d([a, b, b, a], [0, 0, h, h], [Z, Z, Z + 0.12, Z + 0.12], front)


def _draw_car_stop(c: _Canvas, o, p, inst):
    X, Z, ln, h, cl, at = o["X"], o["Z"], o["len"], o["h"], o["cls"], o["at"]
    if o["yellow"]:
        col, end = (0.8, 0.62, 0.06), (0.05, 0.05, 0.05)
    else:
        col, end = (0.55, 0.55, 0.52), (0.8, 0.62, 0.06)
    m = c.material(o["ir"], col, cls=cl, inst=inst, at=at, fine=0.05)
    mt = c.material(o["ir"] + 2, tuple(min(1, v * 1.15) for v in col), cls=cl, inst=inst, at=at, fine=0.05)
    me = c.material(o["ir"], end, cls=cl, inst=inst, at=at)
    x0, x1, d = X - ln / 2, X + ln / 2, 0.18
    c.quad3d([x0, x1, x1, x0], [h] * 4, [Z, Z, Z + d, Z + d], mt)
    c.quad3d([x0, x1, x1, x0], [0, 0, h, h], [Z] * 4, m)
    for a in (x0, x1 - 0.25):
        c.quad3d([a, a + 0.25, a + 0.25, a], [0, 0, h, h], [Z] * 4, me)


def _draw_lamp(c: _Canvas, o, p, inst):
    X, Z, h, s = o["X"], o["Z"], o["h"], o["side"]
    pole = c.material(p["ir_walk"] - 3, (0.35, 0.36, 0.38), fine=0.02, at=o["at"])
    head_emit = (2.5, 2.2, 1.6) if p["night"] else (0, 0, 0)
    head = c.material(p["ir_walk"] + (25 if p["night"] else 5), (0.7, 0.7, 0.65), emit=head_emit)
    c.quad3d([X - 0.07, X + 0.07, X + 0.05, X - 0.05], [0, 0, h, h], [Z] * 4, pole)
    xe = X - s * o["arm"]
    c.quad3d([X, xe, xe, X], [h - 0.08, h - 0.04, h + 0.03, h], [Z] * 4, pole)
    c.quad3d([xe - 0.22, xe + 0.22, xe + 0.18, xe - 0.18], [h - 0.12, h - 0.12, h - 0.02, h - 0.02], [Z] * 4, head)


_DRAWERS = {"curve": _draw_curve, "guardrail": _draw_guardrail, "person": _draw_person,
            "car": _draw_car, "bike": _draw_bike, "color_cone": _draw_cone, "bump": _draw_bump,
            "car_stop": _draw_car_stop, "lamp": _draw_lamp}


# ----------------------------------------------------------------------------- background
def _draw_background(c: _Canvas, rng, lay: dict, p: dict) -> None:
    """Sky, ground, road, sidewalks, lane markings, then buildings, trees and hedges (all
    unlabelled), far laterally first. Nothing drawn here can hide a labelled object: the
    labelled objects stand on the road and sidewalks, nearer the camera's line of sight."""
    cam, H, W = c.cam, c.cam.height_px, c.cam.width_px
    night = p["night"]
    sky = c.material(p["ir_sky"], (0, 0, 0), ir_tex=2.0, fine=0.0,
                     emit=(0.004, 0.005, 0.012) if night else tuple(np.array([0.35, 0.5, 0.8]) * _u(rng, 0.6, 1.0)))
    c.map[:] = sky
    zn, zf = cam.z_bottom * 0.6, lay["z_far"]
    half, wl, wr = lay["road_w"] / 2, lay["walk_w"][0], lay["walk_w"][1]
    ground = c.material(p["ir_veg"] + 5, p["grass_rgb"], ir_tex=1.5, fine=0.15, mid=0.25)
    c.poly(np.array([[-W * 20, cam.horizon + 0.5], [W * 21, cam.horizon + 0.5], [W * 21, H + 2],
                     [-W * 20, H + 2]]), ground)
    walk = c.material(p["ir_walk"], p["walk_rgb"], ir_tex=0.8, fine=0.1)
    road = c.material(p["ir_road"], p["road_rgb"], ir_tex=0.8, fine=0.12, mid=0.05)
    c.quad3d([-half - wl, -half, -half, -half - wl], [0] * 4, [zn, zn, zf, zf], walk)
    c.quad3d([half, half + wr, half + wr, half], [0] * 4, [zn, zn, zf, zf], walk)
    c.quad3d([-half, half, half, -half], [0] * 4, [zn, zn, zf, zf], road)
    paint = c.material(p["ir_road"] - _u(rng, 1.0, 3.0), (0.75, 0.75, 0.72), ir_tex=0.6, fine=0.05,
                       emit=(0.006, 0.006, 0.006) if night else (0, 0, 0))
    lw = _u(rng, 0.1, 0.16)
    for x in (-half + 0.25, half - 0.25 - lw):               # solid edge lines
        c.quad3d([x, x + lw, x + lw, x], [0] * 4, [zn, zn, 120, 120], paint)
    n_lanes = 2 if lay["road_w"] < 9 else 3
    dash, gap, off = _u(rng, 2.0, 4.0), _u(rng, 4.0, 8.0), _u(rng, 0, 6)
    for k in range(1, n_lanes):
        x = -half + k * lay["road_w"] / n_lanes - lw / 2
        z = zn + off
        while z < 90:
            c.quad3d([x, x + lw, x + lw, x], [0] * 4, [z, z, z + dash, z + dash], paint)
            z += dash + gap
    if rng.random() < 0.2:                                   # zebra crossing
        zc = _near_z(cam, 1.3, 18, rng)
        for x in np.arange(-half + 0.5, half - 0.5, 1.0):
            c.quad3d([x, x + 0.5, x + 0.5, x], [0] * 4, [zc, zc, zc + 3, zc + 3], paint)
    veg = p["veg_rgb"]
    for s, w in ((-1, wl), (1, wr)):
        edge = half + w
        if rng.random() < 0.6:                               # buildings with windows
            xb = s * (edge + _u(rng, 4, 15))
            z = _u(rng, 8, 30)
            for _ in range(int(rng.integers(1, 4))):
                z1, hb = z + _u(rng, 10, 40), _u(rng, 5, 25)
                wall_rgb = _pick(rng, [(0.5, 0.48, 0.45), (0.6, 0.55, 0.45), (0.35, 0.35, 0.38),
                                       (0.55, 0.3, 0.25)])
                wall = c.material(p["ir_build"], wall_rgb, ir_tex=1.0, fine=0.04, mid=0.05)
                c.quad3d([xb] * 4, [0, hb, hb, 0], [z, z, z1, z1], wall)
                win_dark = c.material(p["ir_build"] - 4, (0.06, 0.08, 0.1), fine=0.02)
                win_lit = c.material(p["ir_build"] + 6, (0.3, 0.3, 0.25), fine=0.02,
                                     emit=(0.25, 0.2, 0.1) if night else (0, 0, 0))
                zs = np.arange(z + 1.0, z1 - 1.5, 3.0)
                ys = np.arange(1.0, hb - 1.5, 3.0)
                if zs.size and ys.size:
                    zz, yy = (a.ravel()[:, None] for a in np.meshgrid(zs, ys, indexing="ij"))
                    quads = cam.project(xb, yy + np.array([0, 1.4, 1.4, 0]), zz + np.array([0, 0, 1.5, 1.5]))
                    lit = rng.random(len(quads)) < (0.3 if night else 0.0)
                    c.polys(quads[~lit], win_dark)
                    c.polys(quads[lit], win_lit)
                z = z1 + _u(rng, 0, 10)
        zs_t = np.sort(rng.uniform(3, 90, int(rng.integers(0, 9))))[::-1]
        for zt in zs_t:                                      # trees, far first
            xt = s * (edge + _u(rng, 0.8, 4))
            ht, rc = _u(rng, 4, 10), _u(rng, 1.2, 3.0)
            trunk = c.material(p["ir_veg"] + 3, (0.12, 0.09, 0.06), fine=0.1)
            crown = c.material(p["ir_veg"] + _u(rng, -3, 3), _pick(rng, [veg], 0.2), ir_tex=2.5,
                               fine=0.25, mid=0.45)
            c.quad3d([xt - 0.15, xt + 0.15, xt + 0.12, xt - 0.12], [0, 0, ht, ht], [zt] * 4, trunk)
            ppm = cam.px_per_m(zt)
            for _ in range(int(rng.integers(3, 7))):
                ctr = cam.project(xt + _u(rng, -0.6, 0.6) * rc, ht + _u(rng, -0.3, 0.6) * rc, zt)
                c.ellipse(ctr, (rc * ppm * _u(rng, 0.5, 0.9), rc * ppm * _u(rng, 0.45, 0.8)), crown,
                          angle=_u(rng, 0, 180))
        if rng.random() < 0.5:                               # hedge along the sidewalk
            xh, hh = s * (edge + 0.2), _u(rng, 0.7, 1.6)
            za = cam.z_bottom * _u(rng, 0.6, 3)
            zb = za + _u(rng, 10, 80)
            hedge = c.material(p["ir_veg"] + 2, _pick(rng, [veg], 0.2), ir_tex=2.0, fine=0.25, mid=0.45)
            hedge_top = c.material(p["ir_veg"] - 2, tuple(v * 1.2 for v in _pick(rng, [veg], 0.2)),
                                   ir_tex=2.0, fine=0.25, mid=0.45)
            c.quad3d([xh, xh + s * 1.0, xh + s * 1.0, xh], [hh] * 4, [za, za, zb, zb], hedge_top)
            c.quad3d([xh] * 4, [0, hh, hh, 0], [za, za, zb, zb], hedge)


# ----------------------------------------------------------------------------- light, images
def _light_sources(objs: list[dict], p: dict) -> np.ndarray:
    """(n, 4) rows (X, Z, height, peak) of lights that illuminate the ground at night."""
    rows = []
    for o in objs:
        if o["kind"] == "lamp":
            rows.append((o["X"] - o["side"] * o["arm"], o["Z"], o["h"], o["power"]))
        elif o["kind"] == "car" and o["front"] and o["lights_on"]:
            rows.append((o["X"], max(0.5, o["Z"] - 6.0), 1.2, 0.12))
    return np.asarray(rows, np.float64).reshape(-1, 4)


def _illuminance(X, Z, lights: np.ndarray) -> np.ndarray:
    """Ground illuminance from point lights: ``sum_k peak_k * h_k^3 / (d_k^2 + h_k^2)^(3/2)``
    (inverse-square law times the cosine of incidence, normalised to ``peak`` at the foot)."""
    X = np.asarray(X, np.float32)
    Z = np.asarray(Z, np.float32)
    E = np.zeros(np.broadcast_shapes(X.shape, Z.shape), np.float32)
    for lx, lz, lh, pk in lights:
        q = (X - np.float32(lx)) ** 2 + (Z - np.float32(lz)) ** 2 + np.float32(lh * lh)
        E += np.float32(pk * lh ** 3) / (q * np.sqrt(q))
    return E


def _normal(rng, shape) -> np.ndarray:
    """Standard normal float32 noise of ``shape``, seeded from ``rng`` (OpenCV's generator is
    about 4x faster than numpy's for this; the seed keeps it deterministic)."""
    cv2.setRNGSeed(int(rng.integers(1, 2 ** 31 - 1)))
    out = np.empty((shape[0], int(np.prod(shape[1:]))), np.float32)
    cv2.randn(out, 0.0, 1.0)
    return out.reshape(shape)


def _blur_small(img: np.ndarray, sigma: float, factor: int = 4) -> np.ndarray:
    """Gaussian blur with a large ``sigma`` computed at 1/factor resolution (for glows)."""
    H, W = img.shape[:2]
    small = cv2.resize(img, (max(1, W // factor), max(1, H // factor)), interpolation=cv2.INTER_AREA)
    small = cv2.GaussianBlur(small, (0, 0), max(0.5, sigma / factor))
    return cv2.resize(small, (W, H), interpolation=cv2.INTER_LINEAR)


def _render_images(c: _Canvas, rng, p: dict, lights: np.ndarray):
    """Look up the material map: label, instances, infrared and visible images.

    Visible encoding: ``vi = 255 * sqrt(clip(lin, 0, 1))`` (display gamma 2) plus noise."""
    cam, H, W = c.cam, c.cam.height_px, c.cam.width_px
    f32 = np.float32
    tab64 = c.table()
    tab = tab64.astype(f32)
    M = c.map
    label = tab64[:, 0].astype(np.uint8)[M]
    instances = tab64[:, 1].astype(np.uint16)[M]
    fine = _normal(rng, (H, W))
    mid = cv2.GaussianBlur(_normal(rng, (H, W)), (0, 0), 2.0) * f32(3.2)
    coarse = cv2.resize(_normal(rng, (max(2, H // 24), max(2, W // 24))), (W, H),
                        interpolation=cv2.INTER_CUBIC)
    # infrared: level + smooth texture + non-uniformity, optics blur, sensor noise
    ir = tab[:, 2][M] + tab[:, 3][M] * mid + f32(2.0) * coarse
    ir = cv2.GaussianBlur(ir, (0, 0), _u(rng, 0.7, 1.2))
    ir += _normal(rng, (H, W)) * f32(_u(rng, 1.2, 2.5))
    ir_u8 = np.clip(np.rint(ir), 0, 255).astype(np.uint8)
    # visible: albedo * (1 + texture) * illumination + emission (+ glow), gamma, noise
    gain = np.clip(1.0 + tab[:, 10][M] * fine + tab[:, 11][M] * mid, 0.2, 3.0)
    night = p["night"]
    tint = np.array([1.0, 0.9, 0.7] if night else [1.0, 0.98, 0.95], f32)
    if night:
        # light at each object's foot point, or per-pixel ground light below the horizon
        at = tab64[:, 12:14]
        has = np.isfinite(at[:, 0])
        Em = np.full(len(tab), p["ambient"], f32)
        if has.any() and len(lights):
            Em[has] += _illuminance(at[has, 0], at[has, 1], lights)
        E = Em[M]
        h0 = int(min(H, max(0, math.floor(cam.horizon) + 1)))
        if len(lights) and h0 < H:
            dv = np.arange(h0, H, dtype=np.float64)[:, None] - cam.horizon
            Zg = cam.focal * cam.cam_height / dv
            Xg = cam.cam_x + (np.arange(W)[None, :] - cam.cx) * Zg / cam.focal
            Eg = _illuminance(Xg, Zg, lights) + f32(p["ambient"])
            low = E[h0:]
            np.copyto(low, Eg, where=~has[M[h0:]])
        light = gain * E
    else:
        light = gain * (f32(p["ambient"]) * (1.0 + f32(0.12) * coarse))
    lin = tab[:, 4:7][M] * (light[..., None] * tint)
    emit_rows = np.flatnonzero(tab[:, 7:10].max(1) > 0)
    if emit_rows.size:
        emit = tab[:, 7:10][M]
        hz = int(min(H, max(0, math.ceil(cam.horizon))))
        if hz:                                        # sky: brighter towards the horizon
            rowf = np.clip(0.75 + 0.35 * np.arange(hz, dtype=f32) / max(cam.horizon, 1.0), 0.75, 1.1)
            emit[:hz] *= np.where(M[:hz] == 1, rowf[:, None], f32(1.0))[..., None]
        lin += emit
        if night:
            bright = emit * (tab[:, 7:10].max(1) > 0.05).astype(f32)[M][..., None]
            lin += _blur_small(bright, 0.025 * W) * f32(_u(rng, 0.5, 1.0)) \
                + cv2.GaussianBlur(bright, (0, 0), max(0.6, 0.006 * W)) * f32(0.6)
    vi = np.sqrt(np.clip(lin, 0.0, 1.0)) * f32(255.0)
    vi = cv2.GaussianBlur(vi, (0, 0), 0.6)
    sigma = _u(rng, 3.0, 6.5) if night else _u(rng, 1.0, 2.5)
    vi += _normal(rng, (H, W, 3)) * f32(sigma)
    vi_u8 = np.clip(np.rint(vi), 0, 255).astype(np.uint8)
    return ir_u8, vi_u8, label, instances


def render_scene(rng: np.random.Generator, size: tuple[int, int] = (240, 320), night: bool | None = None,
                 objects: list[dict] | None = None, zoom: float = 1.0):
    """Render one labelled infrared/visible street scene.

    Args:
        rng: the scene's random generator (all randomness comes from it).
        size: (H, W) in pixels.
        night: night scene; None draws it (probability 1/2).
        objects: None for a random scene, or an explicit list of object specs (then *only*
            these objects are drawn on the random road and background). A spec is a dict with
            ``cls`` (a class name or id 1..8 of :data:`CLASS_NAMES`, or ``"lamp"``) and a place:
            ``X``, ``Z`` (metres: lateral from the road centre, depth) or ``x``, ``y`` (pixel
            column and row of its foot point; the row must lie below the horizon). ``curve`` and
            ``guardrail`` take ``side`` (-1 left, +1 right) and optional ``Z0``, ``Z1`` instead;
            ``bump`` takes ``Z``. Any other parameter (e.g. ``h`` height in m) overrides the
            random one.
        zoom: focal-length factor (> 0): the camera's focal length is ``zoom * (0.75..1.0) * W``
            px, so every object appears ``zoom`` times larger (a narrower field of view of the
            same street). 1.0 is the original camera; the random draws do not depend on it, so
            the same ``rng`` gives the same scene, only seen through a longer lens.

    Returns:
        ``(ir, vi, label, meta)``: ir (H, W) uint8; vi (H, W, 3) uint8 RGB; label (H, W) uint8
        class ids 0..8; meta dict with ``night``, ``camera`` (the :class:`Camera` fields),
        ``road_width``, ``objects`` (the completed specs: kind, cls, X, Z, instance, ...) and
        ``instances`` ((H, W) uint16, 0 = no labelled object, k = the object whose
        ``instance`` is k; all segments of a curb or guardrail share one id).
    """
    H, W = int(size[0]), int(size[1])
    if H < 16 or W < 16:
        raise ValueError(f"size {size}: the synthetic scene needs at least 16x16 pixels")
    # independent streams (camera/layout, background, objects, image noise): an explicit object
    # list changes the objects' stream only, so the rest of the scene stays the same
    r_cam, r_bg, r_obj, r_img = (np.random.default_rng(int(s))
                                 for s in rng.integers(0, 2 ** 63 - 1, size=4, dtype=np.int64))
    if night is None:
        night = bool(r_cam.random() < 0.5)
    if not valid_zoom(zoom):
        raise ValueError(f"zoom={zoom!r}: give a focal-length factor > 0 (1.0 = the original camera)")
    cam = _random_camera(r_cam, H, W, float(zoom))
    lay = _random_layout(r_cam, cam)
    cam = Camera(**{**asdict(cam), "cam_x": _u(r_cam, -0.3, 0.3) * lay["road_w"]})
    p = _scene_params(r_cam, bool(night))
    specs = _auto_objects(r_obj, cam, lay) if objects is None else list(objects)
    completed: list[dict] = []
    inst = 0
    for spec in specs:
        parts = _complete(spec, r_obj, cam, lay, p)
        if parts[0]["cls"] > 0:
            inst += 1
        for part in parts:
            part["instance"] = inst if part["cls"] > 0 else 0
        completed.extend(parts)
    c = _Canvas(cam)
    _draw_background(c, r_bg, lay, p)
    order = sorted(range(len(completed)), key=lambda i: (-completed[i]["Z"], i))
    for i in order:
        o = completed[i]
        _DRAWERS[o["kind"]](c, o, p, o["instance"])
    lights = _light_sources(completed, p) if night else np.zeros((0, 4))
    ir, vi, label, instances = _render_images(c, r_img, p, lights)
    meta = {"night": bool(night), "camera": asdict(cam), "road_width": lay["road_w"],
            "objects": [{k: v for k, v in o.items() if k != "at"} for o in completed],
            "instances": instances}
    return ir, vi, label, meta


# ----------------------------------------------------------------------------- contrast
def object_contrast(image: np.ndarray, mask: np.ndarray, gap: float = 2.0, width: float = 4.0,
                    c: float = 1.0, background: np.ndarray | None = None) -> float:
    """Contrast of an object against a ring of background around it (a Fisher-like ratio).

    With per-channel means ``mu_o`` (object pixels) and ``mu_r`` (ring pixels) and the ring's
    per-channel variances ``var_r``::

        C = || mu_o - mu_r ||_2 / (sqrt(mean_ch var_r) + c)

    i.e. how many background standard deviations the object's mean colour lies from its
    surroundings (1 channel for grey images, RGB distance for colour). The ring holds the pixels
    whose Euclidean distance to the mask lies in ``(gap, gap + width]`` (the gap keeps the blur of
    the object's own edge out of it) and, if ``background`` is given, to ``background`` pixels
    (e.g. ``label == 0``, so neighbouring objects do not count as background); ``c`` (grey levels)
    keeps the ratio finite on noiseless backgrounds. NaN when the mask or the ring is empty.

    Args: image (H, W) or (H, W, C) any numeric dtype; mask, background (H, W) bool.
    Returns C >= 0.
    """
    obj = np.asarray(mask, bool)
    if not obj.any() or obj.all():
        return math.nan
    dist = cv2.distanceTransform((~obj).astype(np.uint8), cv2.DIST_L2, cv2.DIST_MASK_PRECISE)
    ring = (dist > gap) & (dist <= gap + width)
    if background is not None:
        ring &= np.asarray(background, bool)
    if not ring.any():
        return math.nan
    img = np.asarray(image, np.float64)
    img = img[..., None] if img.ndim == 2 else img
    vr = img[ring]
    sr = math.sqrt(float(vr.var(0).mean()))
    return float(np.linalg.norm(img[obj].mean(0) - vr.mean(0)) / (sr + c))


def measure_contrast(n_scenes: int = 16, size: tuple[int, int] = (240, 320), seed: int = 0,
                     night: bool | None = None, min_pixels: int = 30) -> dict:
    """Median :func:`object_contrast` per class and modality over ``n_scenes`` random scenes.

    Every labelled instance with at least ``min_pixels`` visible pixels counts once; its ring is
    restricted to unlabelled pixels (contrast against the background, not against neighbours,
    e.g. a bump against the road rather than the curbs at its ends). Returns
    ``{class_name: {"ir": median, "vi": median, "n": instances}}`` for the classes seen."""
    vals: dict[int, dict[str, list[float]]] = {}
    for i in range(n_scenes):
        rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(i,)))
        ir, vi, label, meta = render_scene(rng, size, night=night)
        inst = meta["instances"]
        seen = set()
        for o in meta["objects"]:
            k = o["instance"]
            if k == 0 or k in seen:
                continue
            seen.add(k)
            m = inst == k
            if int(m.sum()) < min_pixels:
                continue
            d = vals.setdefault(o["cls"], {"ir": [], "vi": []})
            d["ir"].append(object_contrast(ir, m, background=label == 0))
            d["vi"].append(object_contrast(vi, m, background=label == 0))
    return {CLASS_NAMES[k]: {"ir": float(np.nanmedian(v["ir"])), "vi": float(np.nanmedian(v["vi"])),
                             "n": len(v["ir"])} for k, v in sorted(vals.items())}


# ----------------------------------------------------------------------------- data set
def scene_rng(seed: int, index: int) -> np.random.Generator:
    """The generator of scene ``index`` of a data set with ``seed`` (independent of workers)."""
    return np.random.default_rng(np.random.SeedSequence(int(seed), spawn_key=(int(index),)))


def _write_png(path: Path, img: np.ndarray) -> None:
    from fuseseg.data.io import write_image
    write_image(path, img)


def _render_chunk(out: str, seed: int, size: tuple[int, int], n_train: int, indices: list[int],
                  zoom: float = 1.0):
    """Worker: render and write scenes ``indices``; returns (index, name, night, class counts)."""
    threads = cv2.getNumThreads()
    cv2.setNumThreads(1)                      # one process per core; restored for in-process use
    res = []
    try:
        for i in indices:
            ir, vi, label, meta = render_scene(scene_rng(seed, i), size, zoom=zoom)
            name = f"{i + 1:05d}{'N' if meta['night'] else 'D'}.png"
            split = Path(out) / ("train" if i < n_train else "test")
            _write_png(split / "ir" / name, ir)
            _write_png(split / "vi" / name, vi)
            _write_png(split / "Segmentation_labels" / name, label)
            res.append((i, name, meta["night"], np.bincount(label.ravel(), minlength=NUM_CLASSES)))
    finally:
        cv2.setNumThreads(threads)
    return res


_SUBDIRS = ("ir", "vi", "Segmentation_labels")


def _clear_previous(out: Path) -> None:
    """Remove a previous synthetic set's images from ``out``; refuse to touch other images."""
    old = [f for split in ("train", "test") for sub in _SUBDIRS
           for f in sorted((out / split / sub).glob("*")) if f.is_file()]
    if not old:
        return
    if not (out / "synthetic.json").is_file():
        from fuseseg.errors import DataError
        raise DataError(f"{out}: holds {len(old)} files (e.g. {old[0]}) that make-synthetic did not "
                        "write (no synthetic.json there). Choose an empty or new output folder, or "
                        "remove those files.")
    for f in old:
        if re.fullmatch(r"\d{5}[DN]\.png", f.name):
            f.unlink()


def make_synthetic(out, n_train: int, n_test: int, size: tuple[int, int] = (240, 320), seed: int = 0,
                   workers: int | None = None, progress: bool = True, zoom: float = 1.0) -> dict:
    """Render a labelled MSRS-like data set into ``out`` (MSRS layout, see the module docstring).

    Scene ``i`` (0-based, train first, then test) uses :func:`scene_rng` (seed, i), so the same
    seed gives byte-identical files for any number of workers. Files are written atomically.
    A previous synthetic set in ``out`` (recognised by its ``synthetic.json``) is replaced; a
    folder holding other images is refused (DataError), never overwritten. ``workers`` processes
    (None: os.cpu_count()) render chunks of scenes. Also writes ``out/synthetic.json`` (the
    summary without timings).

    Returns the summary: ``out, train, test, size, seed, names`` per split, ``night_fraction``,
    ``class_pixel_fraction`` and ``class_image_count`` (per class name), ``seconds``,
    ``pairs_per_s``, ``workers``. ``zoom``: the cameras' focal-length factor (see
    :func:`render_scene`); recorded in the summary when it is not 1.
    """
    from fuseseg.data.io import atomic_write_text

    n_train, n_test = int(n_train), int(n_test)
    if n_train < 0 or n_test < 0 or n_train + n_test == 0:
        raise ValueError(f"make_synthetic: need n_train >= 0, n_test >= 0 and at least one scene "
                         f"(got train={n_train}, test={n_test})")
    H, W = (int(v) for v in size)
    if H < 16 or W < 16:
        raise ValueError(f"make_synthetic: size {size} too small; use at least 16 16")
    if not valid_zoom(zoom):
        raise ValueError(f"make_synthetic: zoom={zoom!r}; give a focal-length factor > 0 (1.0 = the original camera)")
    zoom = float(zoom)
    out = Path(out)
    _clear_previous(out)
    n = n_train + n_test
    workers = max(1, min(int(workers or os.cpu_count() or 1), n))
    t0 = time.perf_counter()
    results = []
    chunk = max(1, min(32, math.ceil(n / (workers * 4))))
    chunks = [list(range(a, min(n, a + chunk))) for a in range(0, n, chunk)]
    bar = None
    if progress:
        from fuseseg.progress import make_progress

        bar = make_progress()
        bar.start()
        task = bar.add_task("synthetic scenes", total=n)
    try:
        if workers == 1:
            for ch in chunks:
                results.extend(_render_chunk(str(out), seed, (H, W), n_train, ch, zoom))
                if bar:
                    bar.advance(task, len(ch))
        else:
            import multiprocessing as mp
            with ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn")) as ex:
                futs = [ex.submit(_render_chunk, str(out), seed, (H, W), n_train, ch, zoom) for ch in chunks]
                for fut in as_completed(futs):
                    r = fut.result()
                    results.extend(r)
                    if bar:
                        bar.advance(task, len(r))
    finally:
        if bar:
            bar.stop()
    seconds = time.perf_counter() - t0
    results.sort(key=lambda r: r[0])
    counts = np.sum([r[3] for r in results], axis=0)
    present = np.sum([r[3] > 0 for r in results], axis=0)
    summary = {
        "out": str(out), "train": n_train, "test": n_test, "size": [H, W], "seed": int(seed),
        **({"zoom": zoom} if zoom != 1.0 else {}),
        "names": {"train": [r[1] for r in results[:n_train]], "test": [r[1] for r in results[n_train:]]},
        "night_fraction": float(np.mean([r[2] for r in results])),
        "class_pixel_fraction": {CLASS_NAMES[k]: float(counts[k] / counts.sum()) for k in range(NUM_CLASSES)},
        "class_image_count": {CLASS_NAMES[k]: int(present[k]) for k in range(NUM_CLASSES)},
    }
    manifest = {"generator": "fuseseg.data.synthetic", **{k: v for k, v in summary.items() if k != "out"}}
    atomic_write_text(out / "synthetic.json", json.dumps(manifest, indent=1) + "\n")
    summary.update(seconds=seconds, pairs_per_s=n / seconds if seconds > 0 else math.inf, workers=workers)
    return summary
