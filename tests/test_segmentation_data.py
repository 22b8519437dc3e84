"""Labelled folders: label validation, grey -> 3 channels, normalisation, aligned augmentation,
and the typed config."""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from fuseseg.errors import ConfigError, DataError
from segmentation.config import SegConfig
from segmentation.data import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    LabelledFolder,
    apply_transform,
    build_train_transform,
    normalise,
)
from tests.conftest import write_png


def _folder(root: Path, n=2, size=(20, 24), label_fn=None, colour=False, seed=0):
    rng = np.random.default_rng(seed)
    for i in range(n):
        shape = size + (3,) if colour else size
        write_png(root / "img" / f"a{i}.png", rng.integers(0, 256, shape, dtype=np.uint8))
        lab = label_fn(i) if label_fn else rng.integers(0, 9, size, dtype=np.uint8)
        write_png(root / "lab" / f"a{i}.png", lab)
    return root / "img", root / "lab"


def test_stray_label_values_error_names_file_values_and_fix(tmp_path):
    def lab(i):
        a = np.zeros((20, 24), np.uint8)
        if i == 1:
            a[0, :3] = 12
            a[5, 5] = 200
            a[6, 6] = 255  # ignore is allowed
        return a

    ds = LabelledFolder(*_folder(tmp_path, label_fn=lab), num_classes=9)
    ds.load(0)  # clean
    with pytest.raises(DataError) as exc:
        ds.check_all()
    msg = str(exc.value)
    assert "a1.png" in msg and "12, 200" in msg and "0..8" in msg and "255" in msg
    assert "4 pixels" in msg and "remap" in msg
    with pytest.raises(DataError):
        ds[1]


def test_label_of_wrong_size_error(tmp_path):
    img, lab = _folder(tmp_path, n=1)
    write_png(lab / "a0.png", np.zeros((10, 24), np.uint8))
    with pytest.raises(DataError) as exc:
        LabelledFolder(img, lab).load(0)
    msg = str(exc.value)
    assert "a0.png" in msg and "10x24" in msg and "20x24" in msg and "nearest" in msg


def test_unpaired_files_error(tmp_path):
    img, lab = _folder(tmp_path, n=2)
    (lab / "a1.png").unlink()
    with pytest.raises(DataError, match="a1.png"):
        LabelledFolder(img, lab)


def test_grey_becomes_three_equal_channels_and_imagenet_normalisation(tmp_path):
    img, lab = _folder(tmp_path, n=1)
    raw = cv2.imread(str(img / "a0.png"), cv2.IMREAD_UNCHANGED)
    ds = LabelledFolder(img, lab, normalisation="imagenet")
    x, y = ds[0]
    assert x.shape == (3, 20, 24) and y.shape == (20, 24) and str(y.dtype) == "torch.int64"
    for c in range(3):  # undo the per-channel normalisation: every channel is the grey image
        back = (x[c].numpy() * IMAGENET_STD[c] + IMAGENET_MEAN[c]) * 255
        np.testing.assert_allclose(back, raw, atol=1e-3)
    u = normalise(np.full((2, 2, 3), 255, np.uint8), "unit")
    assert float(u.max()) == 1.0 and float(u.min()) == 1.0
    with pytest.raises(ConfigError, match="normalisation"):
        normalise(np.zeros((2, 2, 3), np.uint8), "zscore")


def test_augmentation_keeps_image_and_mask_aligned():
    """Mask = threshold of the image's own pixels; after the random scale/pad/crop/flip the mask
    must equal the threshold of the transformed image (except interpolation borders)."""
    rng = np.random.default_rng(0)
    small = rng.random((6, 8))
    img = (cv2.resize(small, (80, 60), interpolation=cv2.INTER_CUBIC) * 255).clip(0, 255).astype(np.uint8)
    img = np.repeat(img[..., None], 3, axis=2)
    mask = (img[..., 0] > 128).astype(np.uint8)
    tf = build_train_transform(64, (0.5, 2.0), hflip=True)
    changed_geometry = 0
    for seed in range(12):
        im_t, m_t = apply_transform(tf, img, mask, seed)
        assert im_t.shape == (64, 64, 3) and m_t.shape == (64, 64)
        assert set(np.unique(m_t).tolist()) <= {0, 1, 255}
        valid = m_t != 255
        assert np.all(im_t[~valid] == 0)  # pad: image 0 where mask 255
        thr = (im_t[..., 0] > 128).astype(np.uint8)
        # disagreements only at the threshold's border (bilinear vs nearest), which may also lie
        # just outside the crop: allow a 2-pixel frame
        border = cv2.dilate((cv2.Canny(thr * 255, 1, 1) > 0).astype(np.uint8), np.ones((5, 5), np.uint8)) > 0
        border[:2], border[-2:], border[:, :2], border[:, -2:] = True, True, True, True
        disagree = valid & (thr != m_t) & ~border
        assert disagree.sum() == 0, f"seed {seed}: {disagree.sum()} misaligned pixels"
        agree = (thr[valid] == m_t[valid]).mean()
        assert agree > 0.9  # a misaligned pair (e.g. only the image flipped) scores ~0.5
        # the transform really moves things around
        if im_t.shape[:2] != img.shape[:2] or valid.sum() < valid.size:
            changed_geometry += 1
    assert changed_geometry >= 3


def test_augmentation_is_a_function_of_seed_epoch_index(tmp_path):
    img, lab = _folder(tmp_path, n=2, size=(40, 48))
    ds = LabelledFolder(img, lab, transform=build_train_transform(32, (0.5, 1.5)), seed=3)
    ds.set_epoch(0)
    a0, b0 = ds[0]
    a0b, b0b = ds[0]
    assert (a0 == a0b).all() and (b0 == b0b).all()
    outs = set()
    for e in range(6):
        ds.set_epoch(e)
        outs.add(ds[0][0].numpy().tobytes())
    assert len(outs) >= 4  # epochs draw different crops


def test_flip_is_not_tied_to_scale():
    """Each transform draws from its own seed: with one shared stream the flip (u < 0.5) would be
    decided by the same number as the scale factor (1 + u), so only 2 of the 4 combinations of
    (zoomed > 1.5x, flipped) could occur."""
    img = np.tile((np.arange(32, dtype=np.uint8) * 8)[None, :, None], (32, 1, 3))
    mask = np.zeros((32, 32), np.uint8)
    tf = build_train_transform(32, (1.0, 2.0), hflip=True)
    combos = set()
    for s in range(40):
        out = apply_transform(tf, img, mask, s)[0][16, :, 0].astype(float)
        slope = (out[20] - out[10]) / 10  # +-8/scale
        combos.add((abs(slope) < 8 / 1.5, slope < 0))
    assert combos == {(False, False), (False, True), (True, False), (True, True)}


def test_config_validation_and_yaml_loading(tmp_path):
    from pipelines.config import load_config

    p = tmp_path / "seg.yaml"
    p.write_text("encoder: resnet18\nepochs: 5\nfrozen_epochs: 2\nscale_range: [0.75, 1.25]\n"
                 "encoder_weights: null\n")
    cfg = load_config(SegConfig, p, ["lr=1e-2", "miou_convention=exclude_background"])
    assert cfg.encoder == "resnet18" and cfg.scale_range == (0.75, 1.25) and cfg.lr == 0.01
    assert cfg.encoder_weights is None and cfg.miou_convention == "exclude_background"
    with pytest.raises(ConfigError, match="unknown key.*'epoch'"):
        load_config(SegConfig, None, ["epoch=3"])
    with pytest.raises(ConfigError, match="frozen_epochs"):
        load_config(SegConfig, None, ["epochs=3", "frozen_epochs=5"])
    with pytest.raises(ConfigError, match="crop_size.*multiple"):
        SegConfig(crop_size=100)
    with pytest.raises(ConfigError, match="miou_convention"):
        load_config(SegConfig, None, ["miou_convention=mean"])
    with pytest.raises(ConfigError, match="batch_size.*>= 2"):
        SegConfig(batch_size=1)
    assert SegConfig.from_saved(cfg.to_dict()) == cfg


def test_decoded_pairs_are_kept_within_the_memory_budget(tmp_path):
    """Within ``cache_mib`` a pair is decoded once (its files may then vanish); beyond it, or
    with 0, every read goes to disk. Cached and uncached reads give the same tensors."""
    img_dir, lab_dir = _folder(tmp_path, n=3, size=(20, 24), colour=True)
    tf = build_train_transform(16, (0.75, 1.5))
    fresh = LabelledFolder(img_dir, lab_dir, transform=tf, cache_mib=0)
    cached = LabelledFolder(img_dir, lab_dir, transform=tf)
    pair_bytes = 20 * 24 * 3 + 20 * 24
    budget = LabelledFolder(img_dir, lab_dir, transform=tf, cache_mib=2.5 * pair_bytes / 2 ** 20)
    for epoch in (0, 1):
        for ds in (fresh, cached, budget):
            ds.set_epoch(epoch)
        for i in range(3):
            x0, y0 = fresh[i]
            for ds in (cached, budget):
                x, y = ds[i]
                np.testing.assert_array_equal(x.numpy(), x0.numpy())
                np.testing.assert_array_equal(y.numpy(), y0.numpy())
    assert len(cached._cache) == 3 and len(budget._cache) == 2 and not fresh._cache
    assert budget._cached_bytes == 2 * pair_bytes
    for p in (*img_dir.iterdir(), *lab_dir.iterdir()):
        p.unlink()
    assert cached.load(2)[2] == "a2" and cached[2][0].shape == (3, 16, 16)   # from memory
    assert budget.load(1)[2] == "a1"
    with pytest.raises((DataError, OSError, FileNotFoundError)):
        budget.load(2)                                                     # over budget: from disk
    with pytest.raises((DataError, OSError, FileNotFoundError)):
        fresh.load(0)
