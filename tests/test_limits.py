"""Resource limits and silent corruption (issue #24, items 5 and 6): inputs whose headers,
settings or kwargs ask for huge memory are refused before anything is allocated, with one line
naming the file or key, the limit and how to raise it; NaN/inf pixels are errors, not black.

No test here allocates more than a few MB with the new code; the crafted sizes are chosen so
that even the old code (which allocated before checking) stays under ~150 MB."""
from __future__ import annotations

import struct
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from fuseseg.errors import CheckpointError, ConfigError, DataError


# ---------------------------------------------------------------------- crafted images
def png_declaring(path: Path, width: int, height: int, depth: int = 8, colour: int = 0) -> Path:
    """A valid-looking PNG (signature, IHDR with correct CRC, a tiny IDAT, IEND) whose header says
    ``width`` x ``height``: a few dozen bytes on disk, never decodable to that size."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, depth, colour, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + chunk(b"IEND", b""))
    return path


def test_png_header_over_the_pixel_limit_is_refused_before_decoding(tmp_path):
    from fuseseg.data.io import read_infrared, read_visible

    p = png_declaring(tmp_path / "bomb.png", 8000, 8000)      # 64 MPixel > the 50 MPixel default
    assert p.stat().st_size < 200
    for reader in (read_infrared, read_visible):
        with pytest.raises(DataError) as e:
            reader(p)
        msg = str(e.value)
        assert str(p) in msg and "8000x8000 = 64,000,000 pixels" in msg and "50,000,000" in msg
        assert "limits.max_pixels" in msg and "FUSESEG_MAX_PIXELS" in msg and "\n" not in msg


def test_decoded_bytes_limit_counts_channels_and_bit_depth(tmp_path, monkeypatch):
    from fuseseg.data.header import read_header
    from fuseseg.data.io import read_visible

    p = png_declaring(tmp_path / "rgba16.png", 4000, 4000, depth=16, colour=6)
    head = read_header(p)
    assert (head.width, head.height, head.channels, head.bytes_per_sample) == (4000, 4000, 4, 2)
    assert head.decoded_bytes == 4000 * 4000 * 4 * 2                          # 128,000,000 bytes
    monkeypatch.setenv("FUSESEG_MAX_IMAGE_BYTES", "100000000")
    with pytest.raises(DataError) as e:
        read_visible(p)
    assert str(p) in str(e.value) and "122 MiB decoded" in str(e.value) and "FUSESEG_MAX_IMAGE_BYTES" in str(e.value)


@pytest.mark.parametrize("ext, shape, dtype", [(".png", (30, 41), np.uint8), (".png", (30, 41, 3), np.uint16),
                                               (".jpg", (30, 41, 3), np.uint8), (".bmp", (30, 41, 3), np.uint8),
                                               (".tif", (30, 41), np.float32), (".tif", (30, 41, 3), np.uint16)])
def test_headers_agree_with_the_decoder_and_the_limit_can_be_raised(tmp_path, monkeypatch, ext, shape, dtype):
    from fuseseg.data.header import read_header
    from fuseseg.data.io import read_visible

    p = tmp_path / f"img{ext}"
    assert cv2.imwrite(str(p), np.full(shape, 7, dtype))
    decoded = cv2.imread(str(p), cv2.IMREAD_UNCHANGED)              # the independent reference
    head = read_header(p)
    assert (head.height, head.width) == decoded.shape[:2]
    assert head.bytes_per_sample == decoded.dtype.itemsize
    monkeypatch.setenv("FUSESEG_MAX_PIXELS", str(30 * 41 - 1))
    with pytest.raises(DataError, match="1,230 pixels, over the limit of 1,229"):
        read_visible(p)
    monkeypatch.setenv("FUSESEG_MAX_PIXELS", str(30 * 41))
    assert read_visible(p).shape[:2] == (30, 41)


def test_config_limits_win_over_the_environment(monkeypatch):
    import fuseseg.limits as lim

    monkeypatch.setattr(lim, "_configured", {})
    monkeypatch.setenv("FUSESEG_MAX_PIXELS", "1234")
    assert lim.current().max_pixels == 1234
    lim.configure(max_pixels=99, max_image_bytes=None)
    assert lim.current().max_pixels == 99 and lim.current().max_image_bytes == lim.Limits().max_image_bytes
    import os
    assert os.environ["FUSESEG_MAX_PIXELS"] == "99"       # job processes started later inherit it
    with pytest.raises(ConfigError, match="limits.max_pixels=0"):
        lim.configure(max_pixels=0)


# ---------------------------------------------------------------------- NaN / inf pixels
def test_float_tiff_with_nan_or_inf_is_an_error_not_black(tmp_path):
    from fuseseg.data.io import read_infrared

    img = np.linspace(0.0, 1.0, 32 * 40, dtype=np.float32).reshape(32, 40)
    p = tmp_path / "ok.tif"
    cv2.imwrite(str(p), img)
    good = read_infrared(p)
    assert good.min() == 0 and good.max() == 255                     # min-max stretch of a clean image
    img[3, 4], img[5, 6], img[7, 8] = np.nan, np.inf, -np.inf
    cv2.imwrite(str(tmp_path / "bad.tif"), img)
    with pytest.raises(DataError) as e:
        read_infrared(tmp_path / "bad.tif")
    assert str(tmp_path / "bad.tif") in str(e.value) and "3 of 1280 pixel value(s) are NaN or infinite" in str(e.value)


# ---------------------------------------------------------------------- config sizes and seeds
@pytest.mark.parametrize("override, text", [
    ("data.synthetic.size=[0,0]", "data.synthetic.size=[0, 0]: give a height and width of at least 16"),
    ("data.synthetic.size=[-5,100]", "data.synthetic.size=[-5, 100]"),
    ("data.synthetic.size=[100000,100000]", "10,000,000,000 pixels per image, over the limit of 50,000,000"),
    ("fusion_train.synthetic_size=[100000,100000]", "fusion_train.synthetic_size=[100000, 100000]"),
    ("data.synthetic.test=-1", "data.synthetic.train=160, test=-1"),
    ("seed=1000000000000000000000000", "seed 1000000000000000000000000 is out of range"),
    ("seg_seeds=[0,-1]", "seg_seeds: seed -1 is out of range"),
    ("segmentation.seed=4294967296", "segmentation.seed: seed 4294967296 is out of range"),
    ("limits.max_model_parameters=-3", "limits.max_model_parameters=-3"),
])
def test_sizes_and_seeds_are_checked_when_the_config_is_read(override, text):
    from pipelines.config import load_config
    from pipelines.experiment import ExperimentConfig

    with pytest.raises(ConfigError) as e:
        load_config(ExperimentConfig, None, [override])
    assert text in str(e.value)


def test_the_pixel_limit_of_the_config_bounds_synthetic_sizes():
    from pipelines.config import load_config
    from pipelines.experiment import ExperimentConfig

    with pytest.raises(ConfigError, match="over the limit of 40,000; .*limits.max_pixels"):
        load_config(ExperimentConfig, None, ["limits.max_pixels=40000", "data.synthetic.size=[200,201]"])
    cfg = load_config(ExperimentConfig, None, ["limits.max_pixels=40200", "data.synthetic.size=[200,201]",
                                               "fusion_train.synthetic_size=[100,100]"])
    assert cfg.data.synthetic.size == (200, 201)


# ---------------------------------------------------------------------- YAML
def laughs(levels: int, width: int = 9) -> str:
    """A "billion laughs": ``width ** levels`` strings through anchors and aliases under
    fusion[].kwargs, in a few hundred bytes."""
    lines = ["name: x", "fusion:", "  - name: mean", "    kwargs:", "      l0: &l0 [" + ",".join(["lol"] * width) + "]"]
    for i in range(1, levels):
        lines.append(f"      l{i}: &l{i} [" + ",".join([f"*l{i - 1}"] * width) + "]")
    return "\n".join(lines) + "\n"


def test_billion_laughs_is_measured_not_built():
    from pipelines.config import safe_yaml

    text = laughs(9)                                    # 9**9 = 387 million strings once expanded
    assert len(text) < 800
    with pytest.raises(ConfigError) as e:
        safe_yaml(text)
    msg = str(e.value)
    assert "expands to more than 1,000,000 values" in msg and "FUSESEG_YAML_MAX_NODES" in msg and len(msg) < 300
    assert safe_yaml(laughs(3))["fusion"][0]["kwargs"]["l2"][8][8][8] == "lol"    # small ones still load


def test_yaml_limits_can_be_raised_through_the_environment(monkeypatch):
    from pipelines.config import safe_yaml

    monkeypatch.setenv("FUSESEG_YAML_MAX_NODES", "500")
    with pytest.raises(ConfigError, match="more than 500 values"):
        safe_yaml(laughs(3))                             # 9 + 81 + 729 strings
    monkeypatch.setenv("FUSESEG_YAML_MAX_DEPTH", "4")           # mapping, 3 lists, the number: 5
    with pytest.raises(ConfigError, match="nested more than 4 levels"):
        safe_yaml("a: [[[1]]]")
    monkeypatch.setenv("FUSESEG_YAML_MAX_DEPTH", "5")
    assert safe_yaml("a: [[[1]]]") == {"a": [[[1]]]}


def test_deep_and_self_referencing_yaml():
    from pipelines.config import safe_yaml

    with pytest.raises(ConfigError, match=r"nested more than 100 levels deep \(line 1\)"):
        safe_yaml("a: " + "[" * 5000 + "]" * 5000)
    with pytest.raises(ConfigError, match="once its aliases"):     # depth built from aliases
        safe_yaml("\n".join(["a0: &a0 [[[[[[[[1]]]]]]]]"] +
                            [f"a{i}: &a{i} [[[[[[[[*a{i - 1}]]]]]]]]" for i in range(1, 30)]))
    with pytest.raises(ConfigError, match="contains itself through an alias"):
        safe_yaml("a: &x [1, *x]")


# ---------------------------------------------------------------------- model widths
def fusion_ckpt(path: Path, kwargs: dict) -> Path:
    from fuseseg.runtime import save_checkpoint
    from fusion.registry import create_method

    save_checkpoint(path, {"kind": "fusion", "method": "sspfusion", "kwargs": kwargs,
                           "state_dict": create_method("sspfusion").state_dict()})
    return path


def test_fusion_checkpoint_widths_are_checked_before_allocating(tmp_path, monkeypatch):
    from fuseseg.runtime import _count_on_meta
    from fusion.fuse import load_fusion_method
    from fusion.registry import create_method

    wide = {"channels": [16, 32, 48, 700]}
    n = _count_on_meta(lambda **kw: create_method("sspfusion", **kw), wide)
    real = create_method("sspfusion", **wide)            # 76 MB once, as the reference count
    assert n == sum(p.numel() for p in real.parameters()) > 10_000_000
    del real
    p = fusion_ckpt(tmp_path / "wide.pt", wide)
    allocated = []
    real_empty = torch.empty

    def watch(*a, **k):
        t = real_empty(*a, **k)
        if t.device.type == "cpu" and t.numel() > 1_000_000:
            allocated.append(t.numel())
        return t

    monkeypatch.setattr(torch, "empty", watch)
    with pytest.raises(CheckpointError) as e:              # the default limit passes; the weights do not match
        load_fusion_method(checkpoint=p, device="cpu")
    assert str(p) in str(e.value) and f"{n:,} parameters but its weights hold only" in str(e.value)
    monkeypatch.setenv("FUSESEG_MAX_MODEL_PARAMETERS", "1000000")
    with pytest.raises(CheckpointError) as e:
        load_fusion_method(checkpoint=p, device="cpu")
    assert f"{n:,} parameters, over the limit of 1,000,000" in str(e.value)
    assert "limits.max_model_parameters" in str(e.value) and "FUSESEG_MAX_MODEL_PARAMETERS" in str(e.value)
    assert not allocated
    monkeypatch.setenv("FUSESEG_MAX_MODEL_PARAMETERS", "600000")    # the shipped-size model still loads
    ok = load_fusion_method(checkpoint=fusion_ckpt(tmp_path / "ok.pt", {}), device="cpu")
    assert sum(p.numel() for p in ok.parameters()) == _count_on_meta(lambda **kw: create_method("sspfusion"), {})


def test_segmentation_checkpoint_widths_and_fields(tmp_path, monkeypatch):
    from fuseseg.runtime import save_checkpoint
    from segmentation.config import SegConfig
    from segmentation.model import ARCH, build_model, model_from_checkpoint

    kwargs = SegConfig(encoder="resnet18").model_kwargs()
    state = build_model(kwargs, None).state_dict()
    stored = sum(v.numel() for v in state.values())

    def ckpt(name, **fields):
        p = tmp_path / name
        save_checkpoint(p, {"kind": "segmentation", "arch": ARCH, "kwargs": kwargs, "state_dict": state, **fields})
        return p

    model, _ = model_from_checkpoint(ckpt("ok.pt"), "cpu")
    assert sum(v.numel() for v in model.state_dict().values()) == stored
    wide = ckpt("wide.pt", kwargs={**kwargs, "decoder_channels": 1024})
    with pytest.raises(CheckpointError, match=r"wide.pt: its kwargs describe a DeepLabV3\+ segmenter of [\d,]+ "
                                              r"parameters but its weights hold only"):
        model_from_checkpoint(wide, "cpu")
    monkeypatch.setenv("FUSESEG_MAX_MODEL_PARAMETERS", "5000000")
    with pytest.raises(CheckpointError, match="over the limit of 5,000,000"):
        model_from_checkpoint(wide, "cpu")
    monkeypatch.delenv("FUSESEG_MAX_MODEL_PARAMETERS")
    for name, fields, text in [("list.pt", {"kwargs": [1, 2]}, "lack a class count"),
                               ("noclasses.pt", {"kwargs": {**kwargs, "classes": "nine"}}, "lack a class count"),
                               ("badstate.pt", {"state_dict": {"w": 3}}, "`state_dict` field is not a mapping of tensors"),
                               ("badkw.pt", {"kwargs": {**kwargs, "encoder_name": "no_such_net"}}, "do not build a DeepLabV3+")]:
        with pytest.raises(CheckpointError) as e:
            model_from_checkpoint(ckpt(name, **fields), "cpu")
        assert name in str(e.value) and text in str(e.value), str(e.value)
