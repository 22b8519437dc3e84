"""The fusion contract (fusion/registry.py docstring), checked for EVERY registered method.

Parametrised over ``list_methods()``, so a method registered later (SSPFusion, a plug-in loaded by
a built-in module) is checked without editing this file. Each method is built with its default
kwargs, on CPU, in eval mode."""
from __future__ import annotations

import functools

import pytest
import torch
from torch import nn

from fuseseg.data.colour import rgb_to_ycbcr
from fuseseg.errors import ConfigError
from fusion import registry
from fusion.base import LuminanceFusion
from fusion.registry import create_method, list_methods, register_method

# The built-in methods only (registered by fusion's own modules): the registry also holds whatever
# plug-ins other test modules imported before this one was collected, and the parametrisation
# must not depend on test order (test_method_list_does_not_depend_on_test_order).
METHODS = [n for n in list_methods() if registry.get_entry(n).module.startswith("fusion.")]
SIZES = [(37, 53), (64, 80)]


@functools.cache
def built(name: str):
    m = create_method(name)
    if isinstance(m, nn.Module):
        m.eval()
    return m


def fuse(name: str, ir: torch.Tensor, vi: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return built(name)(ir, vi)


def inputs(b: int, c: int, h: int, w: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random IR in [0, 1] and a visible of moderate saturation (so its chroma is not clipped)."""
    g = torch.Generator().manual_seed(seed)
    ir = torch.rand(b, 1, h, w, generator=g)
    vi = 0.2 + 0.6 * torch.rand(b, c, h, w, generator=g)
    return ir, vi


def test_builtin_methods_are_registered():
    assert {"mean", "max", "laplacian", "gff", "gtf"} <= set(METHODS), METHODS


def test_method_list_does_not_depend_on_test_order():
    """A fresh interpreter that first imports another test module's plug-in (as an earlier test
    module does) builds the same parametrisation as a bare one."""
    import subprocess
    import sys
    from pathlib import Path

    here = Path(__file__).resolve().parent
    code = ("import sys; sys.path[:0] = [{t!r}, {r!r}]; {pre}import test_fusion_contract as t; "
            "print(','.join(t.METHODS))")
    out = [subprocess.run([sys.executable, "-c", code.format(t=str(here), r=str(here.parent), pre=pre)],
                          capture_output=True, text=True, check=True).stdout.strip()
           for pre in ("", "import fusion_tiny; ")]
    assert out[0] == out[1] == ",".join(METHODS), out
    assert "tiny-trainable" not in METHODS


@pytest.mark.parametrize("name", METHODS)
@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("channels", [3, 1], ids=["rgb", "grey"])
def test_output_shape_dtype_range_device(name, size, channels):
    ir, vi = inputs(2, channels, *size)
    out = fuse(name, ir, vi)
    assert isinstance(out, torch.Tensor)
    assert tuple(out.shape) == (2, channels, *size), f"{name}: shape {tuple(out.shape)}"
    assert out.dtype == torch.float32, f"{name}: dtype {out.dtype}"
    assert out.device == ir.device
    assert torch.isfinite(out).all(), f"{name}: non-finite output"
    assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0, \
        f"{name}: range [{float(out.min())}, {float(out.max())}]"


@pytest.mark.parametrize("name", METHODS)
def test_luminance_methods_keep_visible_chroma(name):
    if not isinstance(built(name), LuminanceFusion):
        pytest.skip(f"{name} is not a LuminanceFusion; its chroma is its own business")
    ir, vi = inputs(2, 3, 37, 53, seed=1)
    out = fuse(name, ir, vi)
    # Where no RGB channel of the output is clipped, Cb/Cr must be the visible's exactly.
    unclipped = ((out > 1e-4) & (out < 1 - 1e-4)).all(dim=1)
    assert unclipped.float().mean() > 0.5, f"{name}: too few unclipped pixels to test the chroma"
    cbcr_out, cbcr_vi = rgb_to_ycbcr(out)[:, 1:], rgb_to_ycbcr(vi)[:, 1:]
    err = (cbcr_out - cbcr_vi).abs().amax(dim=1)[unclipped]
    assert float(err.max()) < 1e-3, f"{name}: chroma differs by {float(err.max()):.2e}"


@pytest.mark.parametrize("name", METHODS)
def test_batch_equals_items_fused_alone(name):
    ir, vi = inputs(2, 3, 37, 53, seed=2)
    together = fuse(name, ir, vi)
    for i in range(2):
        alone = fuse(name, ir[i:i + 1], vi[i:i + 1])
        diff = float((together[i:i + 1] - alone).abs().max())
        # 1e-4: 40x finer than the 1/255 the output is stored at; a batch-dependent method (batch
        # statistics, a per-batch stretch) differs by far more. Finer than that is float32 noise,
        # amplified by a per-image stretch of an untrained network's near-flat output (rfn_nest).
        assert diff <= 1e-4, f"{name}: item {i} fused in a batch differs by {diff:.2e} from alone"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device here")
@pytest.mark.parametrize("name", METHODS)
def test_cuda_output_on_input_device_and_matches_cpu(name):
    ir, vi = inputs(1, 3, 37, 53, seed=3)
    m = create_method(name)
    if isinstance(m, nn.Module):
        m = m.eval().to("cuda")
    with torch.no_grad():
        out = m(ir.cuda(), vi.cuda())
    assert out.device.type == "cuda"
    cpu = fuse(name, ir, vi)
    assert tuple(out.shape) == tuple(cpu.shape)
    if not getattr(registry.get_entry(name), "trainable", False):  # classical: same numbers
        assert float((out.cpu() - cpu).abs().max()) < 1e-3


def test_contract_shape_errors_name_the_problem():
    m = create_method("mean")
    with pytest.raises(ValueError, match=r"infrared must be \(B, 1, H, W\)"):
        m(torch.rand(1, 3, 8, 8), torch.rand(1, 3, 8, 8))
    with pytest.raises(ValueError, match=r"visible must be \(B, 1 or 3, H, W\)"):
        m(torch.rand(1, 1, 8, 8), torch.rand(1, 2, 8, 8))
    with pytest.raises(ValueError, match="differ in batch or size"):
        m(torch.rand(1, 1, 8, 8), torch.rand(1, 3, 8, 9))


def test_unknown_method_lists_every_valid_name():
    with pytest.raises(ConfigError) as e:
        create_method("no-such-fusion")
    msg = str(e.value)
    assert "'no-such-fusion'" in msg and "@register_method" in msg
    for name in METHODS:
        assert name in msg, f"{name} missing from: {msg}"


def test_bad_kwargs_name_the_method():
    with pytest.raises(ConfigError, match="'laplacian' rejected its settings"):
        create_method("laplacian", not_a_setting=3)


def test_duplicate_registration_rejected(monkeypatch):
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))  # restored afterwards

    @register_method("tmp-contract-dup")
    class First(LuminanceFusion):
        """Temporary method."""

        def fuse_y(self, ir, vi_y):
            return ir

    with pytest.raises(ValueError) as e:
        register_method("tmp-contract-dup")(lambda: None)
    assert "'tmp-contract-dup' is already registered" in str(e.value)
    assert __name__ in str(e.value)  # names the module that registered it first
    assert registry.get_entry("tmp-contract-dup").factory is First
    with pytest.raises(ValueError, match="'mean' is already registered"):
        register_method("mean")(lambda: None)
