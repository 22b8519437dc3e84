"""DIDFuse (Zhao, Xu, Zhang, Liu, Zhang and Li, "DIDFuse: Deep image decomposition for infrared and
visible image fusion", IJCAI 2020): a base/detail decomposition auto-encoder, written here from the
paper's description (its Table 1 network and Eq. of the total loss).

Network on (B, 1, H, W) images in [0, 1], all at full resolution (3x3 convolutions, reflection
padding; any H, W works):

* encoder (shared by both modalities): ``F1 = PReLU(BN(conv 1->64))``, ``F2 = PReLU(BN(conv 64->64))(F1)``,
  base ``B = tanh(BN(conv 64->64))(F2)``, detail ``D = tanh(BN(conv 64->64))(F2)``;
* decoder: ``G5 = PReLU(BN(conv 128->64))([B, D])``, ``G6 = PReLU(BN(conv 128->64))([G5, F2])``,
  ``I = sigmoid(conv 128->1)([G6, F1])`` (skip connections from the first two encoder layers).

Training (one phase, ``"autoencoder"``; both modalities of a pair at once), the paper's loss::

    L = tanh(||B_V - B_I||^2) - a1 tanh(||D_V - D_I||^2) + a2 f(I, I^) + a3 f(V, V^) + a4 ||grad V - grad V^||_1
    f(X, X^) = ||X - X^||^2 + lam (1 - SSIM(X, X^)) / 2

a1 = 0.5, a2 = a3 = 2, a4 = 10, lam = 5 (the paper's). Norms are per-element means (see
fusion/README.md). Fusion happens only at test time, with a rule on the four encoder outputs
(``F1, F2, B, D``) of both images: ``sum`` (the paper's main choice), ``average`` or ``l1_norm``
(weights from the 3x3 box mean of each map's channel L1 norm). DIDFuse has no fusion loss: it
never scores a fused image, so the model has no ``fusion_loss`` and the trainer's fus/fus_max
diagnostics and verdict do not apply (verdict "unknown").
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn

from fuseseg.errors import ConfigError
from fusion.base import LuminanceFusion
from fusion.losses import sobel_l1, ssim
from fusion.registry import register_method

__all__ = ["DIDFuse", "FUSION_RULES", "DECOMPOSITION_NORMS", "l1_norm_fuse"]

WIDTH = 64
#: Test-time fusion rules for the encoder outputs.
FUSION_RULES = ("sum", "average", "l1_norm")
#: Distance inside the tanh of the decomposition terms: the paper's squared L2 ("l2", a mean of
#: squares) or a mean absolute difference ("l1").
DECOMPOSITION_NORMS = ("l2", "l1")
_EPS = 1e-8


def _pad1(x: torch.Tensor) -> torch.Tensor:
    """Pad H, W by one pixel each side: reflect, or replicate on a side of one pixel."""
    mode = "reflect" if min(x.shape[-2:]) > 1 else "replicate"
    return F.pad(x, (1, 1, 1, 1), mode=mode)


class _Layer(nn.Module):
    """Reflection-padded 3x3 convolution, optional BatchNorm, then an activation."""

    def __init__(self, cin: int, cout: int, act: str, bn: bool = True):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3)
        self.bn = nn.BatchNorm2d(cout) if bn else nn.Identity()
        self.act = {"prelu": nn.PReLU(), "tanh": nn.Tanh(), "sigmoid": nn.Sigmoid()}[act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.conv(_pad1(x))))


def l1_norm_fuse(a: torch.Tensor, b: torch.Tensor, radius: int = 1) -> torch.Tensor:
    """L1-norm rule of two (B, C, H, W) maps: activity ``A_k = box_r(sum_c |a_c|)`` (mean over a
    (2r+1)^2 window, zero padding), ``w_k = A_k / (A_a + A_b)``, result ``w_a a + w_b b`` (equal
    weights where both activities are zero)."""
    k = 2 * radius + 1
    act_a = F.avg_pool2d(a.abs().sum(dim=1, keepdim=True), k, stride=1, padding=radius, count_include_pad=True)
    act_b = F.avg_pool2d(b.abs().sum(dim=1, keepdim=True), k, stride=1, padding=radius, count_include_pad=True)
    tot = act_a + act_b
    w_a = torch.where(tot > _EPS, act_a / tot.clamp_min(_EPS), torch.full_like(tot, 0.5))
    return w_a * a + (1.0 - w_a) * b


@register_method("didfuse", trainable=True)
class DIDFuse(LuminanceFusion):
    """DIDFuse (Zhao et al., IJCAI 2020): base/detail decomposition auto-encoder, fused by a rule.

    Keyword arguments (plain JSON values, kept in ``init_kwargs``):

    * ``fusion_rule`` ("sum", the paper's main one; "average"; "l1_norm"): test-time rule.
    * ``alpha1`` (0.5), ``alpha2`` (2.0), ``alpha3`` (2.0), ``alpha4`` (10.0), ``lam`` (5.0): the
      paper's loss weights (detail term, IR reconstruction, VI reconstruction, VI gradient, SSIM).
    * ``decomposition_norm`` ("l2", the paper's squared L2; "l1": mean absolute difference).

    One training phase, ``"autoencoder"``, over all parameters.
    """

    phases: tuple[str, ...] = ("autoencoder",)

    def __init__(self, fusion_rule: str = "sum", alpha1: float = 0.5, alpha2: float = 2.0,
                 alpha3: float = 2.0, alpha4: float = 10.0, lam: float = 5.0,
                 decomposition_norm: str = "l2"):
        super().__init__()
        if fusion_rule not in FUSION_RULES:
            raise ConfigError(f"didfuse: `fusion_rule` must be one of {', '.join(FUSION_RULES)}, "
                              f"got {fusion_rule!r}")
        if decomposition_norm not in DECOMPOSITION_NORMS:
            raise ConfigError(f"didfuse: `decomposition_norm` must be one of {', '.join(DECOMPOSITION_NORMS)}, "
                              f"got {decomposition_norm!r}")
        weights = {"alpha1": alpha1, "alpha2": alpha2, "alpha3": alpha3, "alpha4": alpha4, "lam": lam}
        for key, val in weights.items():
            if isinstance(val, bool) or not isinstance(val, (int, float)) or not val >= 0:
                raise ConfigError(f"didfuse: `{key}` must be a number >= 0, got {val!r}")
        self.weights = {k: float(v) for k, v in weights.items()}
        self.fusion_rule, self.decomposition_norm = fusion_rule, decomposition_norm
        self.init_kwargs = {"fusion_rule": fusion_rule, **self.weights, "decomposition_norm": decomposition_norm}
        c = WIDTH
        self.enc1 = _Layer(1, c, "prelu")
        self.enc2 = _Layer(c, c, "prelu")
        self.enc_base = _Layer(c, c, "tanh")
        self.enc_detail = _Layer(c, c, "tanh")
        self.dec5 = _Layer(2 * c, c, "prelu")
        self.dec6 = _Layer(2 * c, c, "prelu")
        self.dec7 = _Layer(2 * c, 1, "sigmoid", bn=False)

    # ------------------------------------------------------------------ network
    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(B, 1, H, W) -> (F1, F2, B, D), each (B, 64, H, W)."""
        f1 = self.enc1(x)
        f2 = self.enc2(f1)
        return f1, f2, self.enc_base(f2), self.enc_detail(f2)

    def decode(self, f1: torch.Tensor, f2: torch.Tensor, base: torch.Tensor, detail: torch.Tensor) -> torch.Tensor:
        """Four (B, 64, H, W) maps -> image (B, 1, H, W) in (0, 1), float32."""
        g5 = self.dec5(torch.cat([base, detail], dim=1))
        g6 = self.dec6(torch.cat([g5, f2], dim=1))
        return self.dec7(torch.cat([g6, f1], dim=1)).float()

    def _rule(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        if self.fusion_rule == "sum":
            return a + b
        if self.fusion_rule == "average":
            return 0.5 * (a + b)
        return l1_norm_fuse(a, b)

    def fuse_y(self, ir: torch.Tensor, vi_y: torch.Tensor) -> torch.Tensor:
        """(B, 1, H, W) infrared and visible Y in [0, 1] -> fused Y (B, 1, H, W) in (0, 1): the
        fusion rule on each encoder output, then the decoder."""
        feats_ir, feats_vi = self.encode(ir), self.encode(vi_y)
        return self.decode(*(self._rule(a, b) for a, b in zip(feats_ir, feats_vi, strict=True)))

    # ------------------------------------------------------------------ training
    def _dist(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        d = a.float() - b.float()
        return d.pow(2).mean() if self.decomposition_norm == "l2" else d.abs().mean()

    def training_losses(self, ir: torch.Tensor, vi_y: torch.Tensor, phase: str) -> tuple[torch.Tensor, dict[str, float]]:
        """The paper's loss of one batch (phase ``"autoencoder"``). Components: ``base`` and
        ``detail`` (the distances inside the tanh), ``rec_ir`` and ``rec_vi`` (f of each
        reconstruction), ``grad`` (||grad V - grad V^||_1) and ``total``."""
        if phase not in self.phases:
            raise ValueError(f"didfuse: unknown training phase {phase!r}; its phases are {list(self.phases)}")
        w = self.weights
        f_ir, f_vi = self.encode(ir), self.encode(vi_y)
        rec_ir, rec_vi = self.decode(*f_ir), self.decode(*f_vi)
        d_base, d_detail = self._dist(f_vi[2], f_ir[2]), self._dist(f_vi[3], f_ir[3])
        l_ir, l_vi = self.reconstruction_loss(ir, rec_ir), self.reconstruction_loss(vi_y, rec_vi)
        l_grad = gradient_l1(vi_y, rec_vi)
        total = (torch.tanh(d_base) - w["alpha1"] * torch.tanh(d_detail) + w["alpha2"] * l_ir
                 + w["alpha3"] * l_vi + w["alpha4"] * l_grad)
        parts = {"base": d_base, "detail": d_detail, "rec_ir": l_ir, "rec_vi": l_vi, "grad": l_grad,
                 "total": total}
        return total, {k: float(v.detach()) for k, v in parts.items()}

    def reconstruction_loss(self, x: torch.Tensor, rec: torch.Tensor) -> torch.Tensor:
        """``f(X, X^) = mean (X - X^)^2 + lam (1 - SSIM(X, X^)) / 2`` (float32 scalar)."""
        mse = (x.float() - rec.float()).pow(2).mean()
        return mse + self.weights["lam"] * 0.5 * (1.0 - ssim(x.float(), rec.float()).mean())

    def parameters_for_phase(self, phase: str) -> list[nn.Parameter]:
        """All parameters (one phase)."""
        if phase not in self.phases:
            raise ValueError(f"didfuse: unknown training phase {phase!r}; its phases are {list(self.phases)}")
        return list(self.parameters())


def gradient_l1(x: torch.Tensor, rec: torch.Tensor) -> torch.Tensor:
    """``||grad X - grad X^||_1`` as a mean over pixels and both components: ``grad`` is the Sobel
    derivative scaled to unit gain on a linear ramp (kernel / 8, replicate padding), so the value is
    ``mean(|Sobel_x d| + |Sobel_y d|) / 16`` with ``d = X - X^`` (Sobel is linear). float32 scalar."""
    d = x.float() - rec.float()
    with _autocast_off(d.device):   # Sobel is a convolution: keep it in float32
        return sobel_l1(d).mean() / 16.0


def _autocast_off(device: torch.device):
    """A context that disables autocast on ``device`` if it is on there (else does nothing)."""
    if device.type in ("cpu", "cuda") and torch.is_autocast_enabled(device.type):
        return torch.autocast(device_type=device.type, enabled=False)
    return contextlib.nullcontext()
