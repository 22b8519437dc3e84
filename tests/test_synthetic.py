"""The synthetic MSRS-like scene generator: labels, geometry, physics, determinism, layout, CLI."""
from __future__ import annotations

import hashlib
import math
import re
from pathlib import Path

import cv2
import numpy as np
import pytest
from scipy import ndimage

from fuseseg.data.synthetic import (
    CLASS_IDS,
    CLASS_NAMES,
    KINDS,
    make_synthetic,
    measure_contrast,
    object_contrast,
    render_scene,
    scene_rng,
)

SIZE = (240, 320)


def _dilate(mask: np.ndarray, r: int) -> np.ndarray:
    """Pixels within Euclidean distance r of mask (scipy, independent of the generator's cv2)."""
    return ndimage.distance_transform_edt(~mask) <= r


# ----------------------------------------------------------------------------- contrast metric
def test_object_contrast_hand_computed():
    # colour: object (100, 50, 50) on a constant (50, 50, 50) ring -> |delta| = 50, sigma = 0, c = 1
    img = np.full((20, 20, 3), 50.0)
    mask = np.zeros((20, 20), bool)
    mask[7:13, 7:13] = True
    img[mask] = (100, 50, 50)
    assert object_contrast(img, mask) == pytest.approx(50.0, rel=1e-12)
    # grey on a checkerboard 40/60: reference ring from scipy's exact Euclidean distance
    yy, xx = np.mgrid[:20, :20]
    grey = np.where((yy + xx) % 2 == 0, 40.0, 60.0)
    grey[mask] = 100.0
    d = ndimage.distance_transform_edt(~mask)
    ring = (d > 2) & (d <= 6)
    ref = abs(100.0 - grey[ring].mean()) / (grey[ring].std() + 1.0)
    assert object_contrast(grey.astype(np.uint8), mask) == pytest.approx(ref, rel=1e-9)
    assert 2.0 < ref < 6.0                                   # std ~ 10 -> about 50 / 11
    assert math.isnan(object_contrast(grey, np.zeros_like(mask)))
    # a neighbour (255) inside the ring changes the ring's statistics unless it is excluded
    img[4:16, 14:15] = 255
    neighbour = np.zeros_like(mask)
    neighbour[4:16, 14:15] = True
    assert object_contrast(img, mask) < 20
    assert object_contrast(img, mask, background=~mask & ~neighbour) == pytest.approx(50.0, rel=1e-12)


# ----------------------------------------------------------------------------- one object
@pytest.mark.parametrize("night", [False, True])
def test_one_person_labels_are_exactly_its_drawn_pixels(night):
    H, W = SIZE
    person = {"cls": "person", "x": W / 2, "y": 0.9 * H, "h": 1.75}
    ir0, vi0, lab0, meta0 = render_scene(scene_rng(7, 0), SIZE, night=night, objects=[])
    ir, vi, lab, meta = render_scene(scene_rng(7, 0), SIZE, night=night, objects=[person])
    assert set(np.unique(lab0)) == {0}
    assert set(np.unique(lab)) == {0, CLASS_IDS["person"]}
    mask = lab == CLASS_IDS["person"]
    assert np.array_equal(mask, meta["instances"] == 1)
    assert meta["objects"][0]["instance"] == 1 and meta["night"] is night
    # perspective: pixel height = h * f / Z = h * (y - horizon) / camera height (+-8 %)
    cam = meta["camera"]
    rows = np.flatnonzero(mask.any(1))
    expect = 1.75 * (0.9 * H - cam["horizon"]) / cam["cam_height"]
    assert abs((rows[-1] - rows[0] + 1) - expect) <= 0.08 * expect + 1, (rows[[0, -1]], expect)
    assert abs(rows[-1] - 0.9 * H) <= 1.5                   # feet on the requested row
    cols = np.flatnonzero(mask.any(0))
    assert abs((cols[0] + cols[-1]) / 2 - W / 2) <= 0.1 * expect
    # the images change only through the mask (plus the sensor blur: IR sigma <= 1.2 -> kernel
    # radius 5; VI sigma 0.6 -> radius 3) and change everywhere inside it
    ir_changed = ir.astype(int) != ir0
    vi_changed = (vi.astype(int) != vi0).any(-1)
    assert not (ir_changed & ~_dilate(mask, 5)).any()
    assert not (vi_changed & ~_dilate(mask, 3)).any()
    inner = ~_dilate(~mask, 2)
    assert inner.sum() > 50
    assert (ir.astype(int) - ir0)[inner].mean() > 50                      # people are hot
    assert ((ir.astype(int) - ir0)[inner] > 30).mean() > 0.9
    assert ir[mask].mean() > ir0[mask].mean() + 60


def test_perspective_far_objects_are_smaller():
    H, W = SIZE
    heights = {}
    for y in (0.95 * H, 0.7 * H):
        _, _, lab, meta = render_scene(scene_rng(3, 1), SIZE, night=False,
                                       objects=[{"cls": "car", "x": W / 2, "y": y, "front": False}])
        rows = np.flatnonzero((lab == CLASS_IDS["car"]).any(1))
        heights[y] = (rows[-1] - rows[0] + 1, y - meta["camera"]["horizon"])
    (h_near, d_near), (h_far, d_far) = heights[0.95 * H], heights[0.7 * H]
    assert h_far < h_near
    assert h_far / h_near == pytest.approx(d_far / d_near, rel=0.12)   # scale ~ 1/Z ~ (y - horizon)


def test_zoom_scales_objects_at_a_fixed_place_and_keeps_the_scene():
    """A person at a fixed 3-D place (X, Z) is h * f / Z px tall: ``zoom`` multiplies f, so its
    pixel height doubles at zoom 2, and the same rng gives the same scene (camera height, horizon,
    day/night) seen through the longer lens."""
    person = {"cls": "person", "X": 0.0, "Z": 14.0, "h": 1.75}
    tall, cams = {}, {}
    for zoom in (1.0, 2.0):
        _, _, lab, meta = render_scene(scene_rng(4, 0), SIZE, night=False, objects=[person], zoom=zoom)
        rows = np.flatnonzero((lab == CLASS_IDS["person"]).any(1))
        tall[zoom], cams[zoom] = rows[-1] - rows[0] + 1, meta["camera"]
    f1 = cams[1.0]["focal"]
    assert cams[2.0]["focal"] == pytest.approx(2 * f1)
    for key in ("horizon", "cam_height", "cx", "cam_x"):
        assert cams[2.0][key] == cams[1.0][key]
    assert tall[1.0] == pytest.approx(1.75 * f1 / 14.0, abs=2)         # pinhole: h f / Z (+-2 px)
    assert tall[2.0] == pytest.approx(2 * tall[1.0], abs=3)
    for bad in (0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="zoom"):
            render_scene(scene_rng(4, 0), SIZE, zoom=bad)


def test_zoom_is_a_config_key_and_a_cli_option(tmp_path):
    from fuseseg.errors import ConfigError
    from pipelines.cli import main
    from pipelines.experiment import SyntheticConfig

    with pytest.raises(ConfigError, match="zoom"):
        SyntheticConfig(zoom=0)
    assert main(["make-synthetic", str(tmp_path / "z"), "--train", "2", "--test", "1", "--size", "48", "64",
                 "--zoom", "1.5", "--workers", "1"]) == 0
    assert (tmp_path / "z" / "synthetic.json").read_text().count('"zoom": 1.5') == 1
    assert main(["make-synthetic", str(tmp_path / "y"), "--train", "2", "--test", "1", "--zoom", "-2"]) == 2


def test_nearer_objects_occlude_farther_ones():
    # shape parameters fixed, so each object has the same outline in every scene below
    person = {"cls": "person", "X": 0.0, "Z": 14.0, "h": 1.8, "width": 0.9, "stride": 0.1}
    car = {"cls": "car", "X": 0.3, "Z": 10.0, "front": False, "L": 4.4, "W": 1.8, "H": 1.5}
    _, _, lab_p, _ = render_scene(scene_rng(5, 0), SIZE, night=False, objects=[person])
    _, _, lab_c, _ = render_scene(scene_rng(5, 0), SIZE, night=False, objects=[car])
    for objs in ([person, car], [car, person]):              # list order does not matter
        _, _, lab, meta = render_scene(scene_rng(5, 0), SIZE, night=False, objects=objs)
        p_alone, c_alone = lab_p == CLASS_IDS["person"], lab_c == CLASS_IDS["car"]
        overlap = p_alone & c_alone
        assert overlap.sum() > 30                              # the car hides the person's legs
        assert np.array_equal(lab == CLASS_IDS["car"], c_alone)
        assert np.array_equal(lab == CLASS_IDS["person"], p_alone & ~c_alone)


@pytest.mark.parametrize("kind", KINDS)
def test_every_kind_renders_alone(kind):
    H, W = SIZE
    spec = {"cls": kind, "x": W * 0.55, "y": 0.85 * H}
    if kind in ("curve", "guardrail"):
        spec = {"cls": kind, "side": 1}
    _, _, lab, meta = render_scene(scene_rng(11, 2), SIZE, night=True, objects=[spec])
    want = CLASS_IDS.get(kind, 0)
    assert set(np.unique(lab)) == ({0, want} if want else {0})
    if want:
        assert (lab == want).sum() >= 15


def test_bad_object_specs_are_rejected_with_the_fix():
    with pytest.raises(ValueError, match=r"unknown kind 'tree'.*valid: car, person"):
        render_scene(scene_rng(0, 0), SIZE, objects=[{"cls": "tree", "X": 0, "Z": 10}])
    with pytest.raises(ValueError, match=r"not below the horizon.*larger y"):
        render_scene(scene_rng(0, 0), SIZE, objects=[{"cls": "person", "x": 10, "y": 1}])
    with pytest.raises(ValueError, match=r"give its place as X, Z"):
        render_scene(scene_rng(0, 0), SIZE, objects=[{"cls": "car"}])


# ----------------------------------------------------------------------------- scene statistics
def test_every_class_appears_and_about_half_are_night():
    seen, nights = set(), 0
    n = 24
    for i in range(n):
        ir, vi, lab, meta = render_scene(scene_rng(1, i), SIZE)
        assert ir.shape == SIZE and ir.dtype == np.uint8
        assert vi.shape == SIZE + (3,) and vi.dtype == np.uint8
        assert lab.dtype == np.uint8 and lab.max() < len(CLASS_NAMES)
        seen |= set(np.unique(lab).tolist())
        nights += meta["night"]
    assert seen == set(range(len(CLASS_NAMES))), f"classes never seen: {set(range(9)) - seen}"
    assert 0.25 * n <= nights <= 0.75 * n, f"{nights} of {n} scenes are night scenes"


def test_modalities_are_complementary():
    """At night people stand out far more in infrared than in visible; cones and bumps stand out
    far more in visible than in infrared, by day and by night (object_contrast, median over
    instances)."""
    ratios = {}
    night = measure_contrast(n_scenes=16, size=SIZE, seed=1, night=True)
    day = measure_contrast(n_scenes=16, size=SIZE, seed=2, night=False)
    msg = "\n".join(f"{when:5s} {k:10s} ir {v['ir']:6.2f}  vi {v['vi']:6.2f}  (n={v['n']})"
                    for when, table in (("night", night), ("day", day)) for k, v in table.items())
    ratios["person night ir/vi"] = night["person"]["ir"] / night["person"]["vi"]
    for cls in ("color_cone", "bump"):
        ratios[f"{cls} night vi/ir"] = night[cls]["vi"] / night[cls]["ir"]
        ratios[f"{cls} day vi/ir"] = day[cls]["vi"] / day[cls]["ir"]
    msg += "\n" + ", ".join(f"{k} = {v:.1f}" for k, v in ratios.items())
    for table in (night, day):
        for cls in ("person", "color_cone", "bump"):
            assert table[cls]["n"] >= 3, msg
    assert all(r >= 3.0 for r in ratios.values()), msg
    # both modalities together see everything: each class stands out in at least one of them
    for v in night.values():
        assert max(v["ir"], v["vi"]) > 0.3, msg


# ----------------------------------------------------------------------------- data set
def _hashes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_gives_identical_files_for_any_worker_count(tmp_path):
    a = make_synthetic(tmp_path / "a", 5, 3, size=(64, 96), seed=5, workers=1, progress=False)
    b = make_synthetic(tmp_path / "b", 5, 3, size=(64, 96), seed=5, workers=2, progress=False)
    make_synthetic(tmp_path / "c", 5, 3, size=(64, 96), seed=6, workers=1, progress=False)
    ha, hb, hc = _hashes(tmp_path / "a"), _hashes(tmp_path / "b"), _hashes(tmp_path / "c")
    assert len(ha) == 8 * 3 + 1 and ha == hb
    assert a["names"] == b["names"] and b["workers"] == 2
    assert {k: v for k, v in ha.items() if k.endswith(".png")} != \
        {k: v for k, v in hc.items() if k.endswith(".png")}
    assert not list((tmp_path / "a").rglob("*.tmp"))           # atomic writes leave no temp files


def test_msrs_layout_and_day_night_naming(tmp_path):
    n_train, n_test = 12, 6
    s = make_synthetic(tmp_path, n_train, n_test, size=(96, 128), seed=0, workers=1, progress=False)
    names = {}
    for split, count in (("train", n_train), ("test", n_test)):
        sets = [sorted(p.name for p in (tmp_path / split / sub).iterdir())
                for sub in ("ir", "vi", "Segmentation_labels")]
        assert sets[0] == sets[1] == sets[2] and len(sets[0]) == count
        names[split] = sets[0]
        assert names[split] == s["names"][split]
    allnames = names["train"] + names["test"]
    assert [int(n[:5]) for n in allnames] == list(range(1, n_train + n_test + 1))
    assert all(re.fullmatch(r"\d{5}[DN]\.png", n) for n in allnames)
    # the suffix matches the content: night visible images are much darker, files are what MSRS has
    brightness = {"D": [], "N": []}
    for split in ("train", "test"):
        for n in names[split]:
            ir = cv2.imread(str(tmp_path / split / "ir" / n), cv2.IMREAD_UNCHANGED)
            vi = cv2.imread(str(tmp_path / split / "vi" / n), cv2.IMREAD_UNCHANGED)
            lab = cv2.imread(str(tmp_path / split / "Segmentation_labels" / n), cv2.IMREAD_UNCHANGED)
            assert ir.shape == (96, 128) and vi.shape == (96, 128, 3) and lab.shape == (96, 128)
            assert lab.max() <= 8
            brightness[n[5]].append(vi.mean())
    assert brightness["D"] and brightness["N"]
    assert max(brightness["N"]) < min(brightness["D"])
    assert s["night_fraction"] == pytest.approx(len(brightness["N"]) / (n_train + n_test))


def test_regenerating_replaces_the_old_set_but_never_foreign_images(tmp_path):
    make_synthetic(tmp_path / "d", 6, 2, size=(32, 48), seed=0, workers=1, progress=False)
    s = make_synthetic(tmp_path / "d", 3, 1, size=(32, 48), seed=9, workers=1, progress=False)
    for split in ("train", "test"):
        assert sorted(p.name for p in (tmp_path / "d" / split / "ir").iterdir()) == s["names"][split]
    foreign = tmp_path / "mine" / "train" / "vi" / "photo.png"
    foreign.parent.mkdir(parents=True)
    foreign.write_bytes(b"not ours")
    from fuseseg.errors import DataError
    with pytest.raises(DataError, match=r"did not write.*Choose an empty or new output folder"):
        make_synthetic(tmp_path / "mine", 2, 1, size=(32, 48), progress=False)
    assert foreign.read_bytes() == b"not ours"


def test_make_synthetic_rejects_bad_counts(tmp_path):
    with pytest.raises(ValueError, match=r"at least one scene \(got train=0, test=0\)"):
        make_synthetic(tmp_path, 0, 0, progress=False)


# ----------------------------------------------------------------------------- CLI
def test_cli_make_synthetic(tmp_path, capsys):
    from pipelines.cli import main

    rc = main(["make-synthetic", str(tmp_path / "d"), "--train", "3", "--test", "2", "--size", "48", "64",
               "--seed", "4", "--workers", "1"])
    assert rc == 0
    assert len(list((tmp_path / "d" / "test" / "vi").glob("0000[45][DN].png"))) == 2
    assert "3 train + 2 test pairs" in " ".join(capsys.readouterr().out.split())
    rc = main(["make-synthetic", str(tmp_path / "e"), "--train", "0", "--test", "0"])
    assert rc == 2
    out = " ".join(capsys.readouterr().err.split())          # rich wraps long lines
    assert "--train 0 --test 0" in out and "at least one pair" in out
