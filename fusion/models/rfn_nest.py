"""RFN-Nest (Li, Wu and Kittler, "RFN-Nest: An end-to-end residual fusion network for infrared and
visible images", Information Fusion 73, 2021), written here from the paper's description.

Network on (B, 1, H, W) images in [0, 1]. Inputs are multiplied by ``intensity_scale`` (255, the
0-255 grey levels the paper's loss weights were set for) on the way in and divided by it on the way
out, and reflect-padded at the bottom/right to a multiple of 8 (three 2x2 max-poolings); the output
is cropped back, so any H, W works.

* Encoder (shared by both modalities): ``conv1x1(1 -> 16) + ReLU``, then four encoder blocks
  ECB(16 -> 64), ECB(64 -> 112), ECB(112 -> 160), ECB(160 -> 208) with a 2x2 max-pooling before each
  of the last three: multi-scale features Phi^1..Phi^4 at 1, 1/2, 1/4, 1/8 resolution.
* Residual fusion network: one RFN per scale m, on (Phi_ir^m, Phi_vi^m), C channels each:
  ``a = conv3x3(Phi_ir)``, ``b = conv3x3(Phi_vi)``, ``main = conv3x3(conv3x3(conv1x1_2C->C([a, b])))``,
  residual ``r = conv3x3_2C->C([Phi_ir, Phi_vi])``, ``Phi_f^m = main + r`` (ReLU after every conv).
* Nest-connection decoder (UNet++-like, nearest x2 up-sampling ``up``), decoder blocks DCB:
  ``x11 = DCB([P1, up P2])``, ``x21 = DCB([P2, up P3])``, ``x31 = DCB([P3, up P4])``,
  ``x12 = DCB([P1, x11, up x21])``, ``x22 = DCB([P2, x21, up x31])``,
  ``x13 = DCB([P1, x11, x12, up x22])``, output ``conv1x1(x13)`` (64 -> 1, linear).
* ECB / DCB(cin -> cout): ``conv3x3(cin -> cin/2) + ReLU``, ``conv1x1(cin/2 -> cout) + ReLU``;
  3x3 convolutions use reflection padding.

Training, two stages (phases):

* ``"autoencoder"`` (encoder + decoder; no fusion): ``L_auto = L_pix + lam L_ssim`` with
  ``L_pix = ||O - I||_F^2`` (mean over pixels) and ``L_ssim = 1 - SSIM(O, I)``, lam = 100, on each
  modality's images (the paper trains on MS-COCO; see fusion/README.md).
* ``"fusion"`` (the four RFNs; encoder and decoder frozen): ``L_RFN = alpha L_detail + L_feature``,
  ``L_detail = 1 - SSIM(O, I_vi)``, ``L_feature = sum_m w_m ||Phi_f^m - (w_ir Phi_ir^m + w_vi Phi_vi^m)||_F^2``
  (means), alpha = 700, w_ir = 6, w_vi = 3, w = (1, 10, 100, 1000).

:meth:`RFNNest.fusion_loss` scores any fused image with L_RFN by re-encoding it: Phi_f = E(fused)
(the frozen encoder's features of the image), so the trained model and max(IR, VI_Y) are scored the
same way; the ``fus`` component the model logs in the fusion phase is that score of its own output.
"""
from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from fuseseg.errors import ConfigError
from fusion.base import LuminanceFusion
from fusion.losses import ssim
from fusion.registry import register_method

__all__ = ["RFNNest", "PAPER_WIDTHS", "PAPER_FEATURE_WEIGHTS", "feature_loss"]

#: Widths of the encoder's four scales (the paper's 64, 112, 160, 208).
PAPER_WIDTHS = (64, 112, 160, 208)
#: w_m of L_feature, scales 1 (full resolution) .. 4.
PAPER_FEATURE_WEIGHTS = (1.0, 10.0, 100.0, 1000.0)
STEM_WIDTH = 16
#: Inputs are padded to a multiple of this (three 2x2 poolings).
MULTIPLE = 8
#: ``output_norm`` values: per-image min-max stretch of the decoded image (the release's), or none.
OUTPUT_NORMS = ("minmax", "none")
NORM_EPS = 1e-8


def minmax_per_batch(x: torch.Tensor, eps: float = NORM_EPS) -> torch.Tensor:
    """(B, C, H, W) -> stretched to [0, 1] over the whole batch: ``(x - min) / (max - min + eps)``."""
    x = x.float()
    lo, hi = x.min(), x.max()
    return (x - lo) / (hi - lo + eps)


def minmax_per_image(x: torch.Tensor, eps: float = NORM_EPS) -> torch.Tensor:
    """(B, C, H, W) -> each image stretched to [0, 1]: ``(x - min) / (max - min + eps)`` over its
    C, H, W (a constant image gives 0)."""
    flat = x.float().flatten(1)
    lo = flat.min(dim=1).values.view(-1, 1, 1, 1)
    hi = flat.max(dim=1).values.view(-1, 1, 1, 1)
    return (x.float() - lo) / (hi - lo + eps)


def _pad_reflect(x: torch.Tensor, pads: tuple[int, int, int, int]) -> torch.Tensor:
    """F.pad with reflection, or replication where a side is too short to reflect."""
    h, w = x.shape[-2:]
    ok = max(pads[0], pads[1]) < w and max(pads[2], pads[3]) < h
    return F.pad(x, pads, mode="reflect" if ok else "replicate")


class _Conv(nn.Module):
    """Reflection-padded k x k convolution, ReLU unless ``last``."""

    def __init__(self, cin: int, cout: int, k: int, last: bool = False):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, k)
        self.p, self.last = k // 2, last

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.p:
            x = _pad_reflect(x, (self.p,) * 4)
        y = self.conv(x)
        return y if self.last else F.relu(y)


def _block(cin: int, cout: int) -> nn.Sequential:
    """ECB / DCB: conv3x3 (cin -> cin/2) + ReLU, conv1x1 (cin/2 -> cout) + ReLU."""
    return nn.Sequential(_Conv(cin, cin // 2, 3), _Conv(cin // 2, cout, 1))


class _RFN(nn.Module):
    """Residual fusion block of one scale: (Phi_ir, Phi_vi) (B, C, h, w) x2 -> Phi_f (B, C, h, w)."""

    def __init__(self, c: int):
        super().__init__()
        self.conv_ir = _Conv(c, c, 3)
        self.conv_vi = _Conv(c, c, 3)
        self.main = nn.Sequential(_Conv(2 * c, c, 1), _Conv(c, c, 3), _Conv(c, c, 3))
        self.residual = _Conv(2 * c, c, 3)

    def forward(self, f_ir: torch.Tensor, f_vi: torch.Tensor) -> torch.Tensor:
        main = self.main(torch.cat([self.conv_ir(f_ir), self.conv_vi(f_vi)], dim=1))
        return main + self.residual(torch.cat([f_ir, f_vi], dim=1))


def feature_loss(fused: list[torch.Tensor], f_ir: list[torch.Tensor], f_vi: list[torch.Tensor],
                 w_ir: float, w_vi: float, weights: Iterable[float]) -> torch.Tensor:
    """``L_feature = sum_m w_m mean (Phi_f^m - (w_ir Phi_ir^m + w_vi Phi_vi^m))^2`` (float32 scalar)."""
    total = None
    for w, f, a, b in zip(weights, fused, f_ir, f_vi, strict=True):
        term = w * (f.float() - (w_ir * a.float() + w_vi * b.float())).pow(2).mean()
        total = term if total is None else total + term
    return total


@register_method("rfn_nest", trainable=True)
class RFNNest(LuminanceFusion):
    """RFN-Nest (Li et al., Inf. Fusion 2021): nest-connection auto-encoder with residual fusion networks.

    Keyword arguments (plain JSON values, kept in ``init_kwargs``):

    * ``widths`` ([64, 112, 160, 208], the paper's): encoder widths of the four scales.
    * ``lam`` (100.0): L_auto = L_pix + lam L_ssim.
    * ``alpha`` (700.0), ``w_ir`` (6.0), ``w_vi`` (3.0), ``feature_weights`` ([1, 10, 100, 1000]):
      L_RFN = alpha L_detail + sum_m w_m ||Phi_f - (w_ir Phi_ir + w_vi Phi_vi)||^2.
    * ``intensity_scale`` (255.0): grey level of white inside the network and its losses (the
      losses' balance depends on it; 1.0 works on [0, 1] directly).
    * ``output_norm`` ("minmax"): the decoded image is stretched to [0, 1],
      ``(O - min O) / (max O - min O + 1e-8)``, as the authors' release does: in training over the
      batch, before L_detail (a 32x32 crop alone may be nearly flat, and stretching it would blow up
      its noise); in the fused image per image (the release's test code, batch 1, before saving).
      L_feature asks for fused features at w_ir + w_vi = 9 times a source's, whose decoded image has
      no fixed grey level. "none": the raw output (clamped to [0, 1] by the contract; it saturated,
      measured in fusion/README.md).

    Phases ``("autoencoder", "fusion")``: encoder + decoder, then the RFNs with the rest frozen.
    """

    phases: tuple[str, ...] = ("autoencoder", "fusion")

    def __init__(self, widths: Iterable[int] = PAPER_WIDTHS, lam: float = 100.0, alpha: float = 700.0,
                 w_ir: float = 6.0, w_vi: float = 3.0, feature_weights: Iterable[float] = PAPER_FEATURE_WEIGHTS,
                 intensity_scale: float = 255.0, output_norm: str = "minmax"):
        super().__init__()
        if output_norm not in OUTPUT_NORMS:
            raise ConfigError(f"rfn_nest: `output_norm` must be one of {', '.join(OUTPUT_NORMS)}, got {output_norm!r}")
        try:
            widths = [int(c) for c in widths]
            feature_weights = [float(v) for v in feature_weights]
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"rfn_nest: `widths` and `feature_weights` must be lists of 4 numbers: {exc}") from exc
        if len(widths) != 4 or min(widths) < 2:
            raise ConfigError(f"rfn_nest: `widths` must be 4 integers >= 2 (one per scale), got {widths}")
        if len(feature_weights) != 4 or min(feature_weights) < 0:
            raise ConfigError(f"rfn_nest: `feature_weights` must be 4 numbers >= 0 (one per scale), "
                              f"got {feature_weights}")
        scalars = {"lam": lam, "alpha": alpha, "w_ir": w_ir, "w_vi": w_vi, "intensity_scale": intensity_scale}
        for key, val in scalars.items():
            if isinstance(val, bool) or not isinstance(val, (int, float)) or not val >= 0:
                raise ConfigError(f"rfn_nest: `{key}` must be a number >= 0, got {val!r}")
        if not intensity_scale > 0:
            raise ConfigError(f"rfn_nest: `intensity_scale` must be > 0, got {intensity_scale!r}")
        self.widths, self.feature_weights = tuple(widths), tuple(feature_weights)
        self.lam, self.alpha, self.w_ir, self.w_vi = float(lam), float(alpha), float(w_ir), float(w_vi)
        self.scale = float(intensity_scale)
        self.init_kwargs = {"widths": list(widths), "lam": self.lam, "alpha": self.alpha, "w_ir": self.w_ir,
                            "w_vi": self.w_vi, "feature_weights": list(feature_weights),
                            "intensity_scale": self.scale, "output_norm": output_norm}
        self.output_norm = output_norm
        c1, c2, c3, c4 = widths
        self.stem = _Conv(1, STEM_WIDTH, 1)
        self.ecb = nn.ModuleList([_block(STEM_WIDTH, c1), _block(c1, c2), _block(c2, c3), _block(c3, c4)])
        self.dcb11 = _block(c1 + c2, c1)
        self.dcb21 = _block(c2 + c3, c2)
        self.dcb31 = _block(c3 + c4, c3)
        self.dcb12 = _block(2 * c1 + c2, c1)
        self.dcb22 = _block(2 * c2 + c3, c2)
        self.dcb13 = _block(3 * c1 + c2, c1)
        self.out = _Conv(c1, 1, 1, last=True)
        self.rfn = nn.ModuleList([_RFN(c) for c in widths])
        # The paper gives no initialisation: PyTorch's default, except that the output bias starts at
        # mid-grey, so an untrained model gives a valid grey image instead of a clipped black one.
        with torch.no_grad():
            self.out.conv.bias.fill_(0.5 * self.scale)

    # ------------------------------------------------------------------ network
    def _pad(self, *xs: torch.Tensor) -> list[torch.Tensor]:
        h, w = xs[0].shape[-2:]
        ph, pw = (-h) % MULTIPLE, (-w) % MULTIPLE
        if ph == 0 and pw == 0:
            return list(xs)
        return [_pad_reflect(x, (0, pw, 0, ph)) for x in xs]

    def encode(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Padded (B, 1, H, W) image in [0, 1] -> [Phi^1..Phi^4] (of the image times intensity_scale)."""
        f = self.ecb[0](self.stem(x * self.scale))
        feats = [f]
        for ecb in self.ecb[1:]:
            f = ecb(F.max_pool2d(f, 2))
            feats.append(f)
        return feats

    def decode(self, f: list[torch.Tensor]) -> torch.Tensor:
        """[Phi^1..Phi^4] -> image (B, 1, H, W) in units of [0, 1] (divided by intensity_scale),
        float32, not clamped."""
        p1, p2, p3, p4 = f

        def up(x):
            return F.interpolate(x, scale_factor=2.0, mode="nearest")

        x11 = self.dcb11(torch.cat([p1, up(p2)], dim=1))
        x21 = self.dcb21(torch.cat([p2, up(p3)], dim=1))
        x12 = self.dcb12(torch.cat([p1, x11, up(x21)], dim=1))
        x31 = self.dcb31(torch.cat([p3, up(p4)], dim=1))
        x22 = self.dcb22(torch.cat([p2, x21, up(x31)], dim=1))
        x13 = self.dcb13(torch.cat([p1, x11, x12, up(x22)], dim=1))
        return self.out(x13).float() / self.scale

    def fuse_features(self, f_ir: list[torch.Tensor], f_vi: list[torch.Tensor]) -> list[torch.Tensor]:
        """The four RFNs: [Phi_f^1..Phi_f^4]."""
        return [rfn(a, b) for rfn, a, b in zip(self.rfn, f_ir, f_vi, strict=True)]

    def _output(self, decoded: torch.Tensor) -> torch.Tensor:
        """The fused image of a decoded (cropped) output: ``output_norm`` applied."""
        return minmax_per_image(decoded) if self.output_norm == "minmax" else decoded

    def fuse_y(self, ir: torch.Tensor, vi_y: torch.Tensor) -> torch.Tensor:
        """(B, 1, H, W) infrared and visible Y in [0, 1] -> fused Y (B, 1, H, W) (float32; with
        ``output_norm: minmax`` stretched to [0, 1] per image, else clamped by the contract's forward).
        Images fused in tiles (a side above fusion.fuse.TILE) are stretched per tile."""
        h, w = ir.shape[-2:]
        ir_p, vi_p = self._pad(ir, vi_y)
        return self._output(self.decode(self.fuse_features(self.encode(ir_p), self.encode(vi_p)))[..., :h, :w])

    # ------------------------------------------------------------------ training
    def autoencoder_loss(self, x: torch.Tensor, rec: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(L_auto, L_pix, L_ssim) of one reconstruction (images in [0, 1]; L_pix on the
        intensity_scale grey levels: ``scale^2 mean (O - I)^2``)."""
        pix = (self.scale ** 2) * (rec.float() - x.float()).pow(2).mean()
        l_ssim = 1.0 - ssim(rec.float(), x.float()).mean()
        return pix + self.lam * l_ssim, pix, l_ssim

    def _rfn_loss(self, out: torch.Tensor, vi_y: torch.Tensor, f_f: list, f_ir: list, f_vi: list):
        detail = 1.0 - ssim(out.float(), vi_y.float()).mean()
        feat = feature_loss(f_f, f_ir, f_vi, self.w_ir, self.w_vi, self.feature_weights)
        return self.alpha * detail + feat, detail, feat

    def training_losses(self, ir: torch.Tensor, vi_y: torch.Tensor, phase: str) -> tuple[torch.Tensor, dict[str, float]]:
        """Loss of one batch. ``"autoencoder"``: mean of L_auto over the infrared and the visible
        reconstructions (components ``pix, ssim, total``). ``"fusion"``: L_RFN (components
        ``detail, feature, fus, total``; ``fus`` is :meth:`fusion_loss` of the output)."""
        _check_phase(phase, self.phases)
        h, w = ir.shape[-2:]
        ir_p, vi_p = self._pad(ir, vi_y)
        if phase == "autoencoder":
            terms = [self.autoencoder_loss(x, self.decode(self.encode(xp))[..., :h, :w])
                     for x, xp in ((ir, ir_p), (vi_y, vi_p))]
            total, pix, l_ssim = (0.5 * (a + b) for a, b in zip(*terms, strict=True))
            return total, {"pix": float(pix.detach()), "ssim": float(l_ssim.detach()),
                           "total": float(total.detach())}
        with torch.no_grad():  # the encoder is frozen in this phase
            f_ir, f_vi = self.encode(ir_p), self.encode(vi_p)
        f_f = self.fuse_features(f_ir, f_vi)
        out = self.decode(f_f)[..., :h, :w]
        if self.output_norm == "minmax":   # the release's training: the batch's output stretched
            out = minmax_per_batch(out)
        total, detail, feat = self._rfn_loss(out, vi_y, f_f, f_ir, f_vi)
        with torch.no_grad():
            fus = self._score(out.detach(), vi_y, f_ir, f_vi)
        return total, {"detail": float(detail.detach()), "feature": float(feat.detach()),
                       "fus": float(fus), "total": float(total.detach())}

    def _score(self, fused: torch.Tensor, vi_y: torch.Tensor, f_ir: list, f_vi: list) -> torch.Tensor:
        """L_RFN of an image, its features re-encoded (f_ir/f_vi: the padded sources' features)."""
        (fused_p,) = self._pad(fused)
        return self._rfn_loss(fused, vi_y, self.encode(fused_p), f_ir, f_vi)[0]

    def fusion_loss(self, fused: torch.Tensor, ir: torch.Tensor, vi_y: torch.Tensor) -> torch.Tensor:
        """L_RFN of any fused Y (B, 1, H, W): ``alpha (1 - SSIM(F, VI)) + sum_m w_m mean (E(F)^m -
        (w_ir E(IR)^m + w_vi E(VI)^m))^2`` with E the encoder (float32 scalar)."""
        ir_p, vi_p = self._pad(ir, vi_y)
        return self._score(fused, vi_y, self.encode(ir_p), self.encode(vi_p))

    def parameters_for_phase(self, phase: str) -> list[nn.Parameter]:
        """``"autoencoder"``: encoder and decoder; ``"fusion"``: the four RFNs only."""
        _check_phase(phase, self.phases)
        rfn = {id(p) for p in self.rfn.parameters()}
        if phase == "fusion":
            return list(self.rfn.parameters())
        return [p for p in self.parameters() if id(p) not in rfn]


def _check_phase(phase: str, phases: tuple[str, ...]) -> None:
    if phase not in phases:
        raise ValueError(f"rfn_nest: unknown training phase {phase!r}; its phases are {list(phases)}")
