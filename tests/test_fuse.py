"""The fuse stage: folders of mixed sizes and colour modes, closed-form reference outputs,
skip-existing, bounded batching, checkpoint rebuilding and its errors, real data, the CLI."""
from __future__ import annotations

import argparse
import os
from pathlib import Path

import cv2
import fusion_tiny
import numpy as np
import pytest
import torch

from fuseseg import runtime
from fuseseg.data.io import read_infrared, read_visible, write_image
from fuseseg.errors import CheckpointError, ConfigError
from fusion.fuse import fuse_arrays, fuse_folder, load_fusion_method, size_batches
from fusion.registry import list_methods

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
REAL = SHARED / "data" / "real"


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture
def mixed(tmp_path) -> Path:
    """Pairs of two sizes; RGB, grey and 'grey stored as 3 equal channels' visibles; a JPEG
    visible and a 16-bit infrared."""
    rng = np.random.default_rng(0)
    spec = {"a": ((30, 40), "rgb"), "b": ((30, 40), "rgb"), "c": ((30, 40), "grey"),
            "d": ((25, 33), "rgb"), "e": ((25, 33), "grey3"), "f": ((30, 40), "rgb"),
            "g": ((25, 33), "rgb16")}
    for stem, ((h, w), kind) in spec.items():
        ir = rng.integers(0, 256, (h, w), dtype=np.uint8)
        if kind == "rgb16":
            ir16 = (1000 + 40 * ir.astype(np.uint16))
            (tmp_path / "ir").mkdir(exist_ok=True)
            cv2.imwrite(str(tmp_path / "ir" / f"{stem}.png"), ir16)
        else:
            write_image(tmp_path / "ir" / f"{stem}.png", ir)
        vi = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        if kind == "grey":
            vi = vi[..., 0]
        elif kind == "grey3":
            vi = np.repeat(vi[..., :1], 3, axis=2)
        ext = ".jpg" if stem == "b" else ".png"
        write_image(tmp_path / "vi" / f"{stem}{ext}", vi)
    return tmp_path


def expected_max_fusion(ir_u8: np.ndarray, vi_u8: np.ndarray) -> np.ndarray:
    """Closed form of fused Y = max(IR, Y_vi) recoloured with the visible chroma: with
    BT.601 YCbCr, keeping Cb/Cr and replacing Y by Y' gives RGB' = RGB + (Y' - Y) per channel."""
    ir = ir_u8.astype(np.float64) / 255
    if vi_u8.ndim == 2:
        return np.clip(np.rint(255 * np.maximum(ir, vi_u8 / 255.0)), 0, 255)
    vi = vi_u8.astype(np.float64) / 255
    y = 0.299 * vi[..., 0] + 0.587 * vi[..., 1] + 0.114 * vi[..., 2]
    return np.clip(np.rint(255 * np.clip(vi + (np.maximum(ir, y) - y)[..., None], 0, 1)), 0, 255)


def test_fuse_folder_mixed_sizes_matches_closed_form(mixed, tmp_path):
    out = tmp_path / "out"
    method = load_fusion_method("test-max", device="cpu")
    s = fuse_folder(method, mixed / "ir", mixed / "vi", out, device="cpu", batch_size=2, progress=False)
    assert (s.pairs, s.written, s.skipped) == (7, 7, 0)
    assert sorted(p.name for p in out.iterdir()) == [".fuseseg-fuse.json", *(f"{c}.png" for c in "abcdefg")]
    for stem in "abcdefg":
        vi = read_visible(next((mixed / "vi").glob(f"{stem}.*")))
        ir = read_infrared(mixed / "ir" / f"{stem}.png")
        got = cv2.imread(str(out / f"{stem}.png"), cv2.IMREAD_UNCHANGED)
        colour = stem not in "ce"  # c: grey file, e: three equal channels
        assert got.shape == (vi.shape[:2] + ((3,) if colour else ())), stem
        if colour:
            got = cv2.cvtColor(got, cv2.COLOR_BGR2RGB)
        ref = expected_max_fusion(ir, vi if colour else (vi if vi.ndim == 2 else vi[..., 0]))
        assert np.abs(got.astype(np.int16) - ref).max() <= 1, stem


def test_batching_does_not_change_results_and_skip_existing(mixed, tmp_path):
    torch.manual_seed(0)
    model = fusion_tiny.TinyFusion(width=4)
    s1 = fuse_folder(model, mixed / "ir", mixed / "vi", tmp_path / "b1", device="cpu", batch_size=1,
                     progress=False)
    s4 = fuse_folder(model, mixed / "ir", mixed / "vi", tmp_path / "b4", device="cpu", batch_size=4,
                     progress=False)
    assert s1.written == s4.written == 7
    for stem in "abcdefg":
        a = cv2.imread(str(tmp_path / "b1" / f"{stem}.png"), cv2.IMREAD_UNCHANGED).astype(int)
        b = cv2.imread(str(tmp_path / "b4" / f"{stem}.png"), cv2.IMREAD_UNCHANGED).astype(int)
        assert np.abs(a - b).max() <= 1
    # a second run skips everything; after deleting one output only that one is redone
    mtimes = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "b4").iterdir()}
    again = fuse_folder(model, mixed / "ir", mixed / "vi", tmp_path / "b4", device="cpu", progress=False)
    assert (again.written, again.skipped) == (0, 7)
    (tmp_path / "b4" / "d.png").unlink()
    redo = fuse_folder(model, mixed / "ir", mixed / "vi", tmp_path / "b4", device="cpu", progress=False)
    assert (redo.written, redo.skipped) == (1, 6)
    for p in (tmp_path / "b4").iterdir():
        assert p.name == "d.png" or p.stat().st_mtime_ns == mtimes[p.name]
    # no temporaries left; the one hidden file is the record of the method that made the images
    assert [p.name for p in (tmp_path / "b4").iterdir() if p.name.startswith(".")] == [".fuseseg-fuse.json"]
    full = fuse_folder(model, mixed / "ir", mixed / "vi", tmp_path / "b4", device="cpu",
                       skip_existing=False, progress=False)
    assert full.written == 7


def test_size_batches_groups_by_shape_with_bounded_memory():
    shapes = [(10 + k, 12) for k in range(10)]
    stream_len = 53
    state = {"taken": 0, "max_pending": 0}

    def stream():
        for i in range(stream_len):
            state["taken"] += 1
            yield (f"s{i}", None, np.zeros(shapes[i % 10], np.uint8))

    seen = []
    for batch in size_batches(stream(), batch_size=4):
        state["max_pending"] = max(state["max_pending"], state["taken"] - len(seen))
        assert 1 <= len(batch) <= 4 and len({b[2].shape for b in batch}) == 1
        seen.extend(b[0] for b in batch)
    assert sorted(seen) == sorted(f"s{i}" for i in range(stream_len))
    assert state["max_pending"] <= 4 * 4 + 1  # bounded by max_pending, not by the stream length


def test_fuse_arrays_shapes_and_grey3():
    method = load_fusion_method("test-max", device="cpu")
    ir = np.full((5, 7), 200, np.uint8)
    vi = np.zeros((5, 7, 3), np.uint8)
    vi[..., 0] = 50
    out = fuse_arrays(method, ir, vi)
    assert out.shape == (5, 7, 3) and out.dtype == np.uint8
    np.testing.assert_array_less(np.abs(out.astype(int) - expected_max_fusion(ir, vi)), 2)
    assert fuse_arrays(method, ir, vi[..., 0]).shape == (5, 7)
    assert fuse_arrays(method, ir, np.repeat(vi[..., :1], 3, 2)).shape == (5, 7)


# ---------------------------------------------------------------------- checkpoints
def _save(path, method="tiny-trainable", kwargs=None, sd=None, kind="fusion"):
    torch.manual_seed(1)
    model = fusion_tiny.TinyFusion(width=4)
    runtime.save_checkpoint(path, {"kind": kind, "method": method, "kwargs": kwargs or {"width": 4},
                                   "state_dict": sd if sd is not None else model.state_dict()})
    return model


def test_rebuild_from_checkpoint_alone(tmp_path):
    model = _save(tmp_path / "m.pt").eval()
    rebuilt = load_fusion_method(checkpoint=tmp_path / "m.pt", device="cpu")
    assert isinstance(rebuilt, fusion_tiny.TinyFusion) and not rebuilt.training
    ir, vi = torch.rand(2, 1, 9, 11), torch.rand(2, 3, 9, 11)
    with torch.no_grad():
        assert torch.equal(rebuilt(ir, vi), model(ir, vi))
    assert isinstance(load_fusion_method("tiny-trainable", tmp_path / "m.pt", device="cpu"),
                      fusion_tiny.TinyFusion)


def test_checkpoint_errors_name_file_and_fix(tmp_path):
    bad = tmp_path / "corrupt.pt"
    bad.write_bytes(b"this is not a checkpoint")
    with pytest.raises(CheckpointError, match=r"corrupt\.pt is corrupt.*retrain"):
        load_fusion_method(checkpoint=bad, device="cpu")
    _save(tmp_path / "m.pt")
    with pytest.raises(CheckpointError, match=r"holds fusion method 'tiny-trainable', not 'test-max'.*--method tiny-trainable"):
        load_fusion_method("test-max", tmp_path / "m.pt", device="cpu")
    _save(tmp_path / "wide.pt", kwargs={"width": 8})  # weights of width 4 stored with width=8
    # refused before the wider model is allocated (counted on the meta device; fuseseg.limits)
    with pytest.raises(CheckpointError, match=r"wide\.pt: its kwargs describe a 'tiny-trainable' model of [\d,]+ "
                                              r"parameters but its weights hold only [\d,]+ values"):
        load_fusion_method(checkpoint=tmp_path / "wide.pt", device="cpu")
    _save(tmp_path / "narrow.pt", kwargs={"width": 2})  # weights of width 4 stored with width=2
    with pytest.raises(CheckpointError, match=r"narrow\.pt does not fit this model.*size mismatch"):
        load_fusion_method(checkpoint=tmp_path / "narrow.pt", device="cpu")
    _save(tmp_path / "seg.pt", kind="segmentation")
    with pytest.raises(CheckpointError, match="not a fusion checkpoint"):
        load_fusion_method(checkpoint=tmp_path / "seg.pt", device="cpu")
    _save(tmp_path / "gone.pt", method="no-such-method")
    with pytest.raises(CheckpointError, match="'no-such-method', which is not registered"):
        load_fusion_method(checkpoint=tmp_path / "gone.pt", device="cpu")
    with pytest.raises(ConfigError, match="learned model.*--checkpoint"):
        load_fusion_method("tiny-trainable", device="cpu")
    with pytest.raises(ConfigError, match="unknown fusion method 'nope'"):
        load_fusion_method("nope", device="cpu")


# ---------------------------------------------------------------------- real data, CLI
@pytest.mark.skipif(not REAL.is_dir(), reason=f"shared real data not found at {REAL}")
@pytest.mark.parametrize("name", ["msrs", "roadscene", "tno"])
def test_fuse_real_folders_subset(name, tmp_path):
    src = REAL / name
    if not src.is_dir():
        pytest.skip(f"{src} is absent")
    stems = sorted(p.stem for p in (src / "ir").iterdir())[:2]
    for role in ("ir", "vi"):
        (tmp_path / role).mkdir()
        for p in (src / role).iterdir():
            if p.stem in stems:
                os.symlink(p, tmp_path / role / p.name)
    method_name = "mean" if "mean" in list_methods() else "test-max"
    method = load_fusion_method(method_name, device="cpu")
    s = fuse_folder(method, tmp_path / "ir", tmp_path / "vi", tmp_path / "out", device="cpu",
                    progress=False)
    assert s.written == 2
    for stem in stems:
        vi = read_visible(next((tmp_path / "vi").glob(f"{stem}.*")))
        grey = vi.ndim == 2 or (np.array_equal(vi[..., 0], vi[..., 1]) and np.array_equal(vi[..., 1], vi[..., 2]))
        got = cv2.imread(str(tmp_path / "out" / f"{stem}.png"), cv2.IMREAD_UNCHANGED)
        assert got.shape == vi.shape[:2] + (() if grey else (3,))
        assert got.std() > 1  # not a blank image
    assert (name == "tno") == grey  # TNO stores grey visibles as 3 equal channels


def test_fuse_cli_with_checkpoint(mixed, tmp_path, capsys):
    from pipelines.commands import fusion as cmd

    parser = argparse.ArgumentParser()
    cmd.register(parser.add_subparsers())
    _save(tmp_path / "m.pt")
    args = parser.parse_args(["fuse", "--checkpoint", str(tmp_path / "m.pt"), "--ir", str(mixed / "ir"),
                              "--vi", str(mixed / "vi"), "--out", str(tmp_path / "o"), "--device", "cpu",
                              "--batch-size", "3", "--no-progress"])
    assert args.func(args) == 0
    assert len(list((tmp_path / "o").glob("*.png"))) == 7
    assert "fused 7 pair(s)" in capsys.readouterr().out
    args = parser.parse_args(["fuse", "--method", "tiny-trainable", "--ir", str(mixed / "ir"), "--vi",
                              str(mixed / "vi"), "--out", str(tmp_path / "o2"), "--no-progress"])
    with pytest.raises(ConfigError, match="--checkpoint"):
        args.func(args)


# ---------------------------------------------------------------------- tiling (any size)
@pytest.mark.parametrize("name, kwargs", [("laplacian", {}), ("gff", {}),
                                          ("sspfusion", {"levels": 2, "channels": [4, 8, 8]})])
def test_large_pairs_are_fused_in_tiles_that_match_the_untiled_result(name, kwargs):
    """A forced small tile (192 px with a 64 px margin) on a moderate size: away from the image
    border the tiled result equals the untiled one within one grey level. (Measured, 2026-12-01:
    identical for all three; with a 32 px margin the pyramid's context no longer fits: up to 21.)"""
    import fusion.fuse as ff
    from fusion.registry import create_method

    torch.manual_seed(0)
    method = create_method(name, **kwargs)
    if isinstance(method, torch.nn.Module):
        method.eval()
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:200, 0:260]
    ir = (120 + 80 * np.sin(xx / 9.0) * np.cos(yy / 13.0) + rng.normal(0, 8, yy.shape)).clip(0, 255).astype(np.uint8)
    vi = np.stack([(100 + 60 * np.cos(xx / 7.0 + c) + rng.normal(0, 8, yy.shape)).clip(0, 255)
                   for c in range(3)], -1).astype(np.uint8)
    whole = ff._run(method, [ir], [vi], torch.device("cpu"), "off", name, tile=4096)[0]
    calls = []
    real = ff._call

    def counting(*a, **k):
        calls.append(tuple(a[2].shape))
        return real(*a, **k)

    ff._call = counting
    try:
        tiled = ff._run(method, [ir], [vi], torch.device("cpu"), "off", name, tile=192, margin=64)[0]
    finally:
        ff._call = real
    assert len(calls) == 20 and max(max(s[-2:]) for s in calls) <= 192  # 4 x 5 tiles of <= 192 px
    assert tiled.shape == whole.shape == (200, 260, 3)
    diff = np.abs(tiled.astype(int) - whole.astype(int))[16:-16, 16:-16]
    assert diff.max() <= 1 and diff.mean() <= 0.05, (diff.max(), diff.mean())


@pytest.mark.slow
def test_compiled_fusing_matches_eager_and_reuses_its_graphs(mixed, tmp_path):
    """fuse_folder(compile=True): torch.compile'd network, same images as eager within one grey
    level; one CompiledMethod per method object (the second folder reuses it)."""
    from fusion.fuse import compiled_method

    torch.manual_seed(0)
    model = fusion_tiny.TinyFusion(width=4).eval()
    eager = fuse_folder(model, mixed / "ir", mixed / "vi", tmp_path / "eager", device="cpu", batch_size=4,
                        progress=False)
    comp = fuse_folder(model, mixed / "ir", mixed / "vi", tmp_path / "comp", device="cpu", batch_size=4,
                       progress=False, compile=True)
    assert eager.written == comp.written == 7
    cm = compiled_method(model)
    assert cm is compiled_method(model) and cm.failed is None and cm.method is model
    for stem in "abcdefg":
        a = cv2.imread(str(tmp_path / "eager" / f"{stem}.png"), cv2.IMREAD_UNCHANGED).astype(int)
        b = cv2.imread(str(tmp_path / "comp" / f"{stem}.png"), cv2.IMREAD_UNCHANGED).astype(int)
        assert a.shape == b.shape and np.abs(a - b).max() <= 1
    # classical methods have nothing to compile: returned as they are
    gff = load_fusion_method("gff")
    assert compiled_method(gff) is gff


def test_compile_failure_falls_back_to_eager_with_one_notice(mixed, tmp_path, monkeypatch, capsys):
    from fusion import fuse as fuse_mod

    def broken_compile(module, **kw):
        def fail(*a, **k):
            raise RuntimeError("no C++ compiler found\nmore lines")
        return fail

    monkeypatch.setattr(fuse_mod.torch, "compile", broken_compile)
    monkeypatch.setattr(runtime, "_notices", set())
    torch.manual_seed(0)
    model = fusion_tiny.TinyFusion(width=4).eval()
    ref = fuse_folder(model, mixed / "ir", mixed / "vi", tmp_path / "eager", device="cpu", progress=False)
    out = fuse_folder(model, mixed / "ir", mixed / "vi", tmp_path / "comp", device="cpu", progress=False,
                      compile=True, name="tiny")
    assert ref.written == out.written == 7
    err = capsys.readouterr().err
    assert err.count("torch.compile failed") == 1
    assert "tiny: torch.compile failed (RuntimeError: no C++ compiler found); fusing without it" in err
    assert fuse_mod.compiled_method(model).failed == "no C++ compiler found"
    for stem in "abcdefg":
        a = cv2.imread(str(tmp_path / "eager" / f"{stem}.png"), cv2.IMREAD_UNCHANGED)
        b = cv2.imread(str(tmp_path / "comp" / f"{stem}.png"), cv2.IMREAD_UNCHANGED)
        np.testing.assert_array_equal(a, b)
