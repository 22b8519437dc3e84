"""The objects of a synthetic scene: the street layout, the random objects placed on it, each object's
parameters completed from the scene's random generator, and one drawer per kind."""
from __future__ import annotations

import numpy as np

from fuseseg.data.synthetic.canvas import (
    _BIKE_COLOURS,
    _CAR_COLOURS,
    _CLOTH_DAY,
    _CLOTH_NIGHT,
    CLASS_IDS,
    CLASS_NAMES,
    KINDS,
    NUM_CLASSES,
    Camera,
    _Canvas,
    _loguniform,
    _pick,
    _u,
)


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
    if kind in ("curve", "guardrail"):
        return _segments(o, rng, cam, lay, p)
    if kind == "bump":
        o.setdefault("X", 0.0)
    if "X" not in o or "Z" not in o:
        raise ValueError(f"object {o}: give its place as X, Z (metres) or x, y (foot pixel)")
    o["X"], o["Z"] = float(o["X"]), float(o["Z"])
    if o["Z"] <= 0.3:
        raise ValueError(f"object {o}: depth Z={o['Z']:.2f} m is behind or at the camera; use Z > 0.3")
    at = (o["X"], o["Z"])
    _fill_in(o, rng, lay, p)
    o["at"] = at
    return [o]


def _segments(o: dict, rng, cam: Camera, lay: dict, p: dict) -> list[dict]:
    """A curb or guardrail, its missing parameters filled from ``rng``, as depth segments."""
    kind = o["kind"]
    night, road = p["night"], p["ir_road"]
    half = lay["road_w"] / 2
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


def _fill_in(o: dict, rng, lay: dict, p: dict) -> None:
    """The missing parameters of a placed object (not a curb or guardrail), drawn from ``rng``."""
    kind = o["kind"]
    night, road = p["night"], p["ir_road"]
    half = lay["road_w"] / 2
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


