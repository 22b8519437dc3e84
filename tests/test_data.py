"""Data layer: pairing, image reading and every bad-input error (message content asserted)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import REAL, require_shared, write_png

from fuseseg.data.colour import recolour, rgb_to_ycbcr, rgb_to_ycbcr_np, ycbcr_to_rgb, ycbcr_to_rgb_np
from fuseseg.data.io import read_infrared, read_label, read_visible, write_image
from fuseseg.data.pairs import Layout, detect_splits, find_pairs, load_split
from fuseseg.data.validate import validate_pairset
from fuseseg.errors import DataError


def test_pairs_match_by_stem_across_extensions(tmp_path):
    write_png(tmp_path / "ir" / "a.png", np.zeros((4, 5), np.uint8))
    write_png(tmp_path / "vi" / "a.jpg", np.zeros((4, 5, 3), np.uint8))
    ps = find_pairs(tmp_path / "ir", tmp_path / "vi")
    assert ps.stems == ["a"] and ps.vi["a"].suffix == ".jpg"


def test_unmatched_names_reports_counts_and_first_files(make_pairs):
    root = make_pairs(n=2)
    for i in range(7):
        write_png(root / "ir" / f"extra{i}.png", np.zeros((24, 32), np.uint8))
    write_png(root / "vi" / "lonely.png", np.zeros((24, 32, 3), np.uint8))
    with pytest.raises(DataError) as e:
        find_pairs(root / "ir", root / "vi")
    msg = str(e.value)
    assert "7 file(s) in ir" in msg and "extra0.png" in msg and "and 2 more" in msg
    assert "1 file(s) in vi" in msg and "lonely.png" in msg
    assert "Remove or rename" in msg


def test_missing_and_empty_folders(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        find_pairs(tmp_path / "nope", tmp_path / "vi")
    (tmp_path / "ir").mkdir()
    with pytest.raises(DataError, match="holds no images.*make-synthetic"):
        find_pairs(tmp_path / "ir", tmp_path / "ir")
    with pytest.raises(DataError, match="neither an MSRS-layout"):
        detect_splits(tmp_path / "ir")


def test_size_mismatch_names_both_files(make_pairs):
    root = make_pairs(n=2)
    write_png(root / "vi" / "00001D.png", np.zeros((20, 30, 3), np.uint8))
    with pytest.raises(DataError) as e:
        validate_pairset(find_pairs(root / "ir", root / "vi"))
    msg = str(e.value)
    assert "different sizes" in msg and "00001D.png" in msg and "30x20" in msg and "32x24" in msg


@pytest.mark.parametrize("content,expect", [
    (b"", r"empty \(0 bytes\)"),
    (b"this is text, not an image", "truncated or not a PNG"),
])
def test_bad_files(tmp_path, content, expect):
    p = tmp_path / "x.png"
    p.write_bytes(content)
    with pytest.raises(DataError, match=expect) as e:
        read_infrared(p)
    assert str(p) in str(e.value)


def test_truncated_png(tmp_path):
    p = write_png(tmp_path / "t.png", np.random.default_rng(0).integers(0, 256, (64, 64), dtype=np.uint8))
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match="truncated") as e:
        read_visible(p)
    assert "t.png" in str(e.value)


def test_unreadable_jpg(tmp_path):
    p = tmp_path / "x.jpg"
    p.write_bytes(b"garbage" * 10)
    with pytest.raises(DataError, match="not a readable image"):
        read_visible(p)


def test_infrared_channels(tmp_path):
    g = np.arange(12, dtype=np.uint8).reshape(3, 4)
    p = write_png(tmp_path / "same.png", np.stack([g, g, g], -1))
    assert np.array_equal(read_infrared(p), g)
    diff = np.stack([g, g, g + 1], -1)
    p2 = write_png(tmp_path / "diff.png", diff)
    with pytest.raises(DataError, match="3 channels that differ.*swapped"):
        read_infrared(p2)


def test_grey_visible_accepted_and_rgb_order(tmp_path):
    g = np.full((3, 4), 7, np.uint8)
    assert read_visible(write_png(tmp_path / "g.png", g)).shape == (3, 4)
    rgb = np.zeros((2, 2, 3), np.uint8)
    rgb[..., 0] = 200  # red
    out = read_visible(write_png(tmp_path / "c.png", rgb))
    assert out[0, 0].tolist() == [200, 0, 0]


def test_16bit_infrared_mappings(tmp_path):
    import cv2
    raw = np.array([[1000, 1500], [2000, 3000]], np.uint16)
    p = tmp_path / "ir16.png"
    cv2.imwrite(str(p), raw)
    mm = read_infrared(p, ir16="minmax")
    assert mm.dtype == np.uint8 and mm.min() == 0 and mm.max() == 255
    assert mm[0, 1] == round((1500 - 1000) / 2000 * 255)
    sc = read_infrared(p, ir16="scale")
    assert sc[1, 1] == round(3000 / 257)
    with pytest.raises(DataError, match="unknown 16-bit mapping"):
        read_infrared(p, ir16="bogus")


def test_labels_wrong_size_and_stray_values(make_pairs):
    root = make_pairs(n=3, labels=True)
    write_png(root / "Segmentation_labels" / "00001D.png", np.zeros((10, 10), np.uint8))
    bad = np.zeros((24, 32), np.uint8)
    bad[0, 0], bad[0, 1], bad[0, 2] = 9, 255, 42
    write_png(root / "Segmentation_labels" / "00002N.png", bad)
    with pytest.raises(DataError) as e:
        validate_pairset(find_pairs(root / "ir", root / "vi", root / "Segmentation_labels"))
    msg = str(e.value)
    assert "2 problem(s)" in msg
    assert "00001D.png is 10x10 but its images are 32x24" in msg
    assert "00002N.png has values [9, 42] outside 0..8" in msg


def test_label_colour_palette_rejected(tmp_path):
    p = write_png(tmp_path / "l.png", np.dstack([np.zeros((2, 2), np.uint8), np.ones((2, 2), np.uint8),
                                                  np.zeros((2, 2), np.uint8)]))
    with pytest.raises(DataError, match="single-channel class ids"):
        read_label(p)


def test_summary_counts(make_pairs):
    root = make_pairs(n=5, labels=True)
    s = validate_pairset(find_pairs(root / "ir", root / "vi", root / "Segmentation_labels"))
    assert s.pairs == 5 and s.day == 3 and s.night == 2
    assert s.sizes[(24, 32)] == 5 and s.class_pixels.sum() == 5 * 24 * 32


def test_msrs_layout_split(tmp_path, make_pairs):
    make_pairs(n=2, labels=True, root=tmp_path / "ds" / "train")
    make_pairs(n=1, labels=True, root=tmp_path / "ds" / "test")
    assert detect_splits(tmp_path / "ds") == ["train", "test"]
    ps = load_split(tmp_path / "ds", "test", require_labels=True)
    assert len(ps) == 1 and ps.labels
    with pytest.raises(DataError, match="no 'val' split|no 'tr' split"):
        load_split(tmp_path / "ds", "train", Layout(train="tr"))


def test_write_image_atomic_roundtrip(tmp_path):
    rgb = np.random.default_rng(1).integers(0, 256, (5, 6, 3), dtype=np.uint8)
    write_image(tmp_path / "o.png", rgb)
    assert np.array_equal(read_visible(tmp_path / "o.png"), rgb)
    assert not [p for p in tmp_path.iterdir() if p.suffix == ".tmp"]


def test_colour_matches_opencv_and_round_trips():
    import cv2
    rgb = np.random.default_rng(2).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    ours = rgb_to_ycbcr_np(rgb)                       # Y, Cb, Cr on 0..255
    ycrcb = cv2.cvtColor(rgb.astype(np.float32) / 255, cv2.COLOR_RGB2YCrCb)  # float: exact formula
    assert np.abs(ours[..., 0] / 255 - ycrcb[..., 0]).max() < 1e-6
    # chroma offset: 128 on the uint8 scale, 0.5 on the float scale (OpenCV's two conventions)
    assert np.abs((ours[..., 1] - 128) / 255 - (ycrcb[..., 2] - 0.5)).max() < 1e-6
    assert np.abs(rgb_to_ycbcr_np(rgb / 255.0)[..., 1:] - ycrcb[..., [2, 1]]).max() < 1e-6
    back = np.clip(np.rint(ycbcr_to_rgb_np(np.rint(ours), scale="255")), 0, 255)
    assert np.abs(back - rgb).max() <= 1.0             # uint8 round trip within 1/255
    x = torch.from_numpy(rgb).permute(2, 0, 1)[None].double() / 255
    assert torch.allclose(ycbcr_to_rgb(rgb_to_ycbcr(x)), x, atol=1e-12)
    assert torch.allclose(rgb_to_ycbcr(x)[0].permute(1, 2, 0), torch.from_numpy(rgb_to_ycbcr_np(rgb / 255.0)))
    assert torch.allclose(recolour(rgb_to_ycbcr(x)[:, :1], x), x, atol=1e-12)


def test_real_sets_validate():
    for name in ("msrs", "tno", "roadscene"):
        root = require_shared(f"data/real/{name}")
        ps = find_pairs(root / "ir", root / "vi")
        assert len(ps) > 0
    s = validate_pairset(find_pairs(REAL / "tno" / "ir", REAL / "tno" / "vi"))
    assert s.pairs == 25
