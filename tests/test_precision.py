"""Mixed precision on CPU and CUDA settings (fuseseg.runtime): what ``amp`` resolves to, that the
autocast context is really entered (or not) in both trainers, fuse and evaluation, that bf16 and
fp32 forward passes agree within stated tolerances, the fallback on CPUs without native bf16,
and that the precision is recorded (checkpoints, protocol)."""
from __future__ import annotations

import fusion_tiny
import pytest
import torch
from torch import nn

import segmentation.train as seg_train
from fuseseg import runtime
from fuseseg.errors import ConfigError
from fusion.models.sspfusion import SSPFusion
from fusion.train import FusionTrainConfig, train_fusion
from segmentation.config import SegConfig
from segmentation.model import build_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")
CPU = torch.device("cpu")


@pytest.fixture
def cpu_probe(monkeypatch):
    """Simulate a CPU: ``cpu_probe(native)`` replaces the bf16 probe (and clears its cache)."""

    def _set(native: bool):
        what = "AMX" if native else "AVX2 without AVX-512 BF16 or AMX"
        monkeypatch.setattr(runtime, "_probe_cpu_bf16", lambda: (native, what))
        monkeypatch.setattr(runtime, "_cpu_bf16", None)
        monkeypatch.setattr(runtime, "_notices", set())

    yield _set


# ---------------------------------------------------------------- resolution and the context
def test_precision_resolution_on_cpu(cpu_probe, capsys):
    cpu_probe(True)
    assert runtime.resolve_precision(CPU, "auto") == "bf16"
    assert runtime.resolve_precision(CPU, "off") == "fp32"
    assert runtime.resolve_precision(CPU, "bf16") == "bf16"
    assert capsys.readouterr().err == ""
    with pytest.raises(ConfigError, match="amp='fp16' needs a CUDA device"):
        runtime.resolve_precision(CPU, "fp16")
    with pytest.raises(ConfigError, match="amp='half' is not a precision setting"):
        runtime.resolve_precision(CPU, "half")
    assert not runtime.needs_grad_scaler(CPU, "auto")


def test_cpu_without_native_bf16_falls_back_to_fp32_with_one_notice(cpu_probe, capsys):
    cpu_probe(False)
    assert runtime.resolve_precision(CPU, "auto") == "fp32"
    assert runtime.resolve_precision(CPU, "auto") == "fp32"
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["note: this CPU has no native bf16 (AVX2 without AVX-512 BF16 or AMX); amp=auto "
                   "computes in fp32."]  # one line, printed once
    with runtime.autocast(CPU, "auto"):
        assert not torch.is_autocast_enabled("cpu")
    # asked for explicitly, bf16 still runs (emulated)
    assert runtime.resolve_precision(CPU, "bf16") == "bf16"
    assert runtime.precision_record(CPU, "auto") == {"amp": "auto", "precision": "fp32",
                                                      "channels_last": False}


def test_real_probe_matches_the_cpu_flags():
    native, what = runtime._probe_cpu_bf16()
    flags = set()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    except OSError:
        pytest.skip("no /proc/cpuinfo to compare with")
    if not flags or not torch.backends.mkldnn.is_available():
        pytest.skip("no CPU flags / oneDNN here")
    assert native == bool({"avx512_bf16", "amx_bf16"} & flags), what


@pytest.mark.parametrize("amp, entered", [("bf16", True), ("off", False)])
def test_autocast_context_is_entered_on_cpu_only_when_requested(amp, entered):
    a = torch.randn(8, 8)
    with runtime.autocast(CPU, amp):
        assert torch.is_autocast_enabled("cpu") is entered
        out = a @ a
    assert out.dtype == (torch.bfloat16 if entered else torch.float32)
    assert not torch.is_autocast_enabled("cpu")


def test_channels_last_follows_bf16_on_cpu(cpu_probe):
    cpu_probe(True)
    assert runtime.precision_record(CPU, "auto")["channels_last"] is True
    assert runtime.precision_record(CPU, "off")["channels_last"] is False
    assert runtime.precision_record(CPU, "off", channels_last=True)["channels_last"] is True
    x = torch.rand(2, 3, 8, 8)
    assert runtime.to_memory_format(x, True).is_contiguous(memory_format=torch.channels_last)
    assert runtime.to_memory_format(x, False) is x


# ---------------------------------------------------------------- bf16 vs fp32 agreement
def _scene(h=64, w=96, seed=0):
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(0, 1, h), torch.linspace(0, 1, w), indexing="ij")
    ir = (0.5 + 0.3 * torch.sin(9 * xx) * torch.cos(7 * yy) + 0.05 * torch.rand(h, w, generator=g))
    vi = 0.3 + 0.5 * xx * yy + 0.1 * torch.rand(h, w, generator=g)
    return ir.clamp(0, 1)[None, None], vi.clamp(0, 1).expand(3, h, w)[None].contiguous()


def _variance_preserving(model: nn.Module) -> nn.Module:
    """Re-initialise convolutions so activations keep their scale (PyTorch's default init shrinks
    them layer by layer, leaving a random SSPFusion's output at 0.5 +- 0.001: nothing to compare)."""
    for mod in model.modules():
        if isinstance(mod, nn.Conv2d):
            nn.init.kaiming_normal_(mod.weight, a=0.1, nonlinearity="leaky_relu")
            nn.init.zeros_(mod.bias)
    return model


def _both(model, *xs):
    with torch.inference_mode():
        ref = model(*xs)
        cl = [runtime.to_memory_format(x, True) for x in xs]
        with runtime.autocast(CPU, "bf16"):
            low = model.to(memory_format=torch.channels_last)(*cl)
    return ref, low.float()


@pytest.mark.parametrize("seed", [0, 1])
def test_sspfusion_bf16_forward_agrees_with_fp32(seed):
    """Tolerances (measured 4 seeds, torch 2.14.1): without the hard structure masks (use_spf
    False) bf16 stays within 0.02 of fp32 everywhere (measured <= 0.009; 0.02 = 5 grey levels)
    and 0.003 on average (measured <= 0.0015). With SPF a bf16 rounding can flip a pixel of a
    hard edge map S = G(P) near its threshold, which moves the fused pixels around it: mean
    difference <= 0.015 (measured <= 0.0094, under 3 grey levels) and 99th percentile <= 0.08
    (measured <= 0.053), while the output varies by 0.07-0.15 (std)."""
    torch.manual_seed(seed)
    ir, vi = _scene(seed=seed)
    model = _variance_preserving(SSPFusion()).eval()
    ref, low = _both(model, ir, vi)
    assert ref.std() > 0.05  # a test with something to compare
    d = (low - ref).abs()
    assert d.mean() <= 0.015 and torch.quantile(d.flatten(), 0.99) <= 0.08
    plain = SSPFusion(use_spf=False).eval()
    plain.load_state_dict(model.state_dict())
    ref, low = _both(plain, ir, vi)
    d = (low - ref).abs()
    assert d.max() <= 0.02 and d.mean() <= 0.003


def test_deeplab_bf16_forward_agrees_with_fp32():
    """DeepLabV3+ (default encoder) logits: bf16 within 1 % of the logits' spread on average
    (measured 0.17-0.24 %, 3 seeds) and within 5 % everywhere (measured <= 1.4 %). The class
    map of this random network agrees on >= 95 % of pixels (measured 97.3-99.9 %): untrained
    logits are nearly tied, so tiny differences flip the argmax where a trained one would not."""
    torch.manual_seed(0)
    model = build_model(SegConfig(decoder_channels=64).model_kwargs()).eval()
    x = torch.randn(2, 3, 96, 128)
    ref, low = _both(model, x)
    d = (low - ref).abs()
    assert d.mean() <= 0.01 * ref.std() and d.max() <= 0.05 * ref.std()
    assert (low.argmax(1) == ref.argmax(1)).float().mean() >= 0.95


# ---------------------------------------------------------------- the trainers really use it
@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    root = tmp_path_factory.mktemp("pairs")
    fusion_tiny.make_pairs(root, n=8, size=(40, 48))
    return root


def _fusion_cfg(root, amp):
    return FusionTrainConfig(method="tiny-trainable", plugins=["fusion_tiny"], data_root=str(root),
                             structure_epochs=1, epochs=1, batch_size=4, crop_size=32, workers=0,
                             lr=1e-2, seed=0, device="cpu", amp=amp, log_every=1)


@pytest.mark.parametrize("amp", ["bf16", "off"])
def test_fusion_trainer_enters_autocast_and_records_precision(pairs, tmp_path, monkeypatch, amp):
    seen = []
    orig = fusion_tiny.TinyFusion.training_losses

    def spy(self, ir, vi_y, phase):
        # (1-channel inputs count as both layouts; the 3-input-channel weight tells them apart)
        seen.append((torch.is_autocast_enabled("cpu"),
                     self.fuse[0].weight.is_contiguous(memory_format=torch.channels_last)))
        return orig(self, ir, vi_y, phase)

    monkeypatch.setattr(fusion_tiny.TinyFusion, "training_losses", spy)
    final = train_fusion(_fusion_cfg(pairs, amp), tmp_path / "run", progress=False)
    bf16 = amp == "bf16"
    assert len(seen) == 4 and all(s == (bf16, bf16) for s in seen)  # 2 phases x 2 steps
    ck = torch.load(final, map_location="cpu", weights_only=False)
    assert ck["precision"] == {"amp": amp, "precision": "bf16" if bf16 else "fp32", "channels_last": bf16}
    last = torch.load(tmp_path / "run" / "last.pt", map_location="cpu", weights_only=False)
    assert last["precision"] == ck["precision"]


def test_fusion_training_in_bf16_is_deterministic(pairs, tmp_path):
    a = train_fusion(_fusion_cfg(pairs, "bf16"), tmp_path / "a", progress=False)
    b = train_fusion(_fusion_cfg(pairs, "bf16"), tmp_path / "b", progress=False)
    c = train_fusion(_fusion_cfg(pairs, "off"), tmp_path / "c", progress=False)
    sa, sb, sc = (torch.load(p, map_location="cpu", weights_only=False)["state_dict"] for p in (a, b, c))
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert any(not torch.equal(sa[k], sc[k]) for k in sa)  # bf16 really computed something else


def _labelled(root, n=6, size=(48, 48)):
    import numpy as np

    from tests.conftest import write_png

    rng = np.random.default_rng(0)
    for i in range(n):
        lab = np.zeros(size, np.uint8)
        lab[8:30, 10:40] = 1 + i % 3
        img = (40 * lab + rng.integers(0, 30, size)).astype(np.uint8)
        write_png(root / "img" / f"s{i}.png", img)
        write_png(root / "lab" / f"s{i}.png", lab)
    return root / "img", root / "lab"


@pytest.mark.parametrize("amp", ["bf16", "off"])
def test_segmentation_trainer_and_evaluation_enter_autocast(tmp_path, monkeypatch, amp):
    from segmentation.evaluate import evaluate_segmenter

    img, lab = _labelled(tmp_path)
    seen = []

    def spy_build(kwargs, weights=None):
        model = build_model(kwargs, weights)
        model.register_forward_pre_hook(lambda m, args: seen.append(
            (m.training, torch.is_autocast_enabled("cpu"),
             args[0].is_contiguous(memory_format=torch.channels_last))))
        return model

    monkeypatch.setattr(seg_train, "build_model", spy_build)
    cfg = SegConfig(encoder="tu-mobilenetv3_small_050", decoder_channels=16, epochs=1, frozen_epochs=0,
                    batch_size=2, frozen_batch_size=2, crop_size=32, workers=0, device="cpu", amp=amp,
                    max_steps_per_epoch=2)
    final = seg_train.train_segmenter(img, lab, cfg, tmp_path / "seg", progress=False)
    bf16 = amp == "bf16"
    assert len(seen) == 2 and all(s == (True, bf16, bf16) for s in seen)
    ck = torch.load(final, map_location="cpu", weights_only=False)
    assert ck["precision"]["precision"] == ("bf16" if bf16 else "fp32")

    entered = []
    import segmentation.evaluate as ev

    orig_predict = ev.predict

    def spy_predict(model, x, amp="auto"):
        with runtime.autocast(x.device, amp):
            entered.append(torch.is_autocast_enabled("cpu"))
        return orig_predict(model, x, amp)

    monkeypatch.setattr(ev, "predict", spy_predict)
    res = evaluate_segmenter(final, img, lab, device="cpu", amp=amp)
    assert entered and all(e is bf16 for e in entered)
    assert res.precision["precision"] == ("bf16" if bf16 else "fp32")


def test_fuse_runs_learned_methods_in_bf16_and_classical_ones_in_fp32(monkeypatch):
    import numpy as np

    from fusion import fuse
    from fusion.baselines import LaplacianPyramidFusion

    rng = np.random.default_rng(0)
    ir, vi = rng.integers(0, 256, (32, 48), dtype=np.uint8), rng.integers(0, 256, (32, 48, 3), dtype=np.uint8)
    seen = []

    class Probe(nn.Module):
        def __init__(self, learned):
            super().__init__()
            self.w = nn.Parameter(torch.ones(())) if learned else None

        def forward(self, a, b):
            seen.append(torch.is_autocast_enabled("cpu"))
            return b

    fuse.fuse_arrays(Probe(True), ir, vi, "cpu", amp="bf16")
    fuse.fuse_arrays(Probe(False), ir, vi, "cpu", amp="bf16")
    fuse.fuse_arrays(Probe(True), ir, vi, "cpu", amp="off")
    assert seen == [True, False, False]
    # a classical method's output does not depend on amp
    lap = LaplacianPyramidFusion()
    assert np.array_equal(fuse.fuse_arrays(lap, ir, vi, "cpu", amp="bf16"),
                          fuse.fuse_arrays(lap, ir, vi, "cpu", amp="off"))


# ---------------------------------------------------------------- protocol
def test_protocol_names_the_precision_and_differs_between_precisions(cpu_probe):
    from pipelines.experiment import ExperimentConfig
    from pipelines.runstate import fingerprint
    from pipelines.stages.base import precision_summary
    from pipelines.stages.segment import protocol_of

    cfg = ExperimentConfig()
    cfg.device = "cpu"
    cpu_probe(True)
    keys_bf16, text_bf16 = protocol_of(cfg)
    summary = precision_summary(cfg, "cpu")
    cpu_probe(False)
    keys_fp32, text_fp32 = protocol_of(cfg)
    assert keys_bf16["precision"] == "bf16" and keys_fp32["precision"] == "fp32"
    assert "bf16" in text_bf16 and "fp32" in text_fp32
    assert fingerprint(keys_bf16) != fingerprint(keys_fp32)
    assert summary["segmentation"]["precision"] == "bf16" and summary["cpu_bf16"]["native"] is True
    learned = [m.name for m in cfg.fusion if summary["fusion"][m.name]["amp"] != "off"]
    assert learned == ["sspfusion"]  # classical baselines compute in fp32
