"""One synthetic scene rendered: the background, the lights, and the infrared and visible images
(:func:`render_scene`)."""
from __future__ import annotations

import math
from dataclasses import asdict

import cv2
import numpy as np

from fuseseg.data.synthetic.canvas import (
    Camera,
    _Canvas,
    _pick,
    _random_camera,
    _scene_params,
    _u,
    valid_zoom,
)
from fuseseg.data.synthetic.objects import _DRAWERS, _auto_objects, _complete, _near_z, _random_layout


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


