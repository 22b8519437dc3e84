"""SSPFusion (Yang et al., arXiv 2309.14745): semantic structure-preserving infrared-visible fusion,
read as in ``../shared/docs/sspfusion-spec.md``; every open choice is argued in ``fusion/README.md``.

Data flow on (B, 1, H, W) inputs in [0, 1] (infrared ``ir`` and visible luminance ``vi_y``),
after reflect-padding H, W to a multiple of 2^(N+1):

1. SFE encoder, one per modality (weights not shared): a full-resolution stem gives F^0, then for
   k = 1..N a stride-2 3x3 convolution D^k = down_k(F^{k-1}) and a residual block
   F^k = res_k(D^k), at 1/2^k resolution with ``channels[k]`` channels.
2. Structure branch R, one per modality: "the SFE without skip connections and residual
   blocks". With ``structure_branch="shared"`` (default) R reuses the encoder's stem and
   down-sampling convolutions, skipping the residual blocks: R^0 = F^0, R^k = down_k(R^{k-1});
   with ``"separate"`` R has its own plain stem/down convolutions. At each level a 3x3 head gives
   P^k = sigmoid(head_k(R^k)), (B, 1, H/2^k, W/2^k).
3. Hard structure maps S^k (no gradient): ``structure_map="G"`` -> S^k = G(P^k) (Sobel edges of
   P^k above their mean, :func:`fusion.structure.structure_map`); ``"threshold"`` -> S^k = [P^k > 0.5].
4. SPF at every level k = 1..N: M_ir = S_ir (1 - S_vi), M_vi = S_vi (1 - S_ir);
   F^_ir = F_ir + M_ir F_ir, F^_vi = F_vi + M_vi F_vi; Z^k = act(conv1x1([F^_ir, F^_vi])).
   Without SPF (``use_spf=False``) or without SFE (``use_sfe=False``, masks all zero):
   Z^k = act(conv1x1([F_ir, F_vi])). The stems are merged the same way (no masks) into Z^0.
5. U-shaped decoder: d = Z^N; for k = N-1..0: d = block_k([upsample_bilinear(d), Z^k]); the
   fused Y is sigmoid(conv3x3(d)) (``output="sigmoid"``, the paper), or clamp(max(IR, VI_Y) +
   conv3x3(d), 0, 1) (``output="max_residual"``), cropped back to H x W.

Losses (:mod:`fusion.losses`): phase "structure": L_rec = mean over both modalities and all N
levels of Charbonnier(P^k, G(resize_k(input))); phase "fusion":
``alpha L_rec + L_ssim + L_smooth + L_grad``.
"""
from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from fuseseg.errors import ConfigError
from fusion.base import LuminanceFusion
from fusion.losses import REC_REDUCTIONS, fusion_loss, rec_loss
from fusion.registry import register_method
from fusion.structure import high_pass, structure_map, structure_pyramid, xor_masks

__all__ = ["SSPFusion", "restoring_clamp", "sspfusion_no_sfe", "sspfusion_no_spf", "PAPER_LIKE_CHANNELS"]

DEFAULT_CHANNELS = (16, 32, 48, 64)
#: Widths of a typical U-Net-sized variant (the paper gives none); ~17x the default's FLOPs.
PAPER_LIKE_CHANNELS = (32, 64, 128, 256)
_NEG_SLOPE = 0.1
#: Output activations: the paper's sigmoid; a clamped linear head; max(IR, VI_Y) + a clamped residual.
OUTPUTS = ("sigmoid", "clamp", "max_residual", "max_detail")
#: Weight initialisations: PyTorch's default (kaiming-uniform, a = sqrt(5)); He-normal for LeakyReLU.
INITS = ("default", "kaiming")
#: Gradient of the [0, 1] clamp of the "clamp" / "max_residual" outputs (see :func:`restoring_clamp`).
CLAMP_GRADS = ("restoring", "zero")


class _RestoringClamp(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x.clamp(0.0, 1.0)

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        # a gradient-descent step moves x by -g: let g through inside [0, 1], and outside it
        # wherever that step points back into [0, 1]
        keep = ((x >= 0) & (x <= 1)) | ((x > 1) & (g > 0)) | ((x < 0) & (g < 0))
        return g * keep.to(g.dtype)


def restoring_clamp(x: torch.Tensor) -> torch.Tensor:
    """``clamp(x, 0, 1)`` whose gradient does not die outside [0, 1]: inside, the gradient is g (as
    torch's clamp); outside, g passes where a descent step (``-g``) moves x back towards [0, 1] and
    is 0 where it would push x further out. torch's clamp gives 0 to every pixel outside, so a head
    whose output leaves [0, 1] everywhere (the 12,000-step SSPFusion run of fusion/README.md: a fused
    image of all ones from fusion epoch 15 on) gets no gradient and never comes back."""
    return _RestoringClamp.apply(x)


def _torch_clamp(x: torch.Tensor) -> torch.Tensor:
    return x.clamp(0.0, 1.0)


def _conv(cin: int, cout: int, k: int = 3, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, k, stride=stride, padding=k // 2)


def _act() -> nn.Module:
    return nn.LeakyReLU(_NEG_SLOPE, inplace=True)


class _ResBlock(nn.Module):
    """``act(x + conv(act(conv(x))))``, channels preserved."""

    def __init__(self, c: int):
        super().__init__()
        self.body = nn.Sequential(_conv(c, c), _act(), _conv(c, c))
        self.act = _act()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(x + self.body(x))


class _ModalityEncoder(nn.Module):
    """SFE of one modality: encoder (stem, down_k, res_k) and, if ``structure_branch`` is not
    None, the structure branch R (heads, plus own plain convs when ``"separate"``)."""

    def __init__(self, channels: tuple[int, ...], structure_branch: str | None):
        super().__init__()
        c = channels
        n = len(c) - 1
        self.stem = nn.Sequential(_conv(1, c[0]), _act(), _conv(c[0], c[0]), _act())
        self.down = nn.ModuleList([nn.Sequential(_conv(c[k - 1], c[k], stride=2), _act())
                                   for k in range(1, n + 1)])
        self.res = nn.ModuleList([_ResBlock(c[k]) for k in range(1, n + 1)])
        self.structure_branch = structure_branch
        if structure_branch == "separate":
            self.s_stem = nn.Sequential(_conv(1, c[0]), _act())
            self.s_down = nn.ModuleList([
                nn.Sequential(_conv(c[k - 1], c[k], stride=2), _act(), _conv(c[k], c[k]), _act())
                for k in range(1, n + 1)])
        if structure_branch is not None:
            self.heads = nn.ModuleList([_conv(c[k], 1) for k in range(1, n + 1)])

    def encode(self, x: torch.Tensor) -> list[torch.Tensor]:
        """x (B, 1, H, W) -> [F^0, ..., F^N], F^k (B, channels[k], H/2^k, W/2^k)."""
        feats = [self.stem(x)]
        for down, res in zip(self.down, self.res, strict=True):
            feats.append(res(down(feats[-1])))
        return feats

    def structure(self, x: torch.Tensor, stem: torch.Tensor | None = None) -> list[torch.Tensor]:
        """x (B, 1, H, W) -> [P^1, ..., P^N], P^k (B, 1, H/2^k, W/2^k) in (0, 1). ``stem``: F^0
        if already computed (re-used by the shared branch)."""
        if self.structure_branch == "shared":
            r = self.stem(x) if stem is None else stem
            downs = self.down
        else:
            r = self.s_stem(x)
            downs = self.s_down
        preds = []
        for down, head in zip(downs, self.heads, strict=True):
            r = down(r)
            preds.append(torch.sigmoid(head(r)))
        return preds

    def structure_phase_parameters(self) -> list[nn.Parameter]:
        """Every parameter on R's path (shared stem/down convs included)."""
        if self.structure_branch == "shared":
            mods = [self.stem, self.down, self.heads]
        else:
            mods = [self.s_stem, self.s_down, self.heads]
        return [p for m in mods for p in m.parameters()]

    def structure_only_parameters(self) -> list[nn.Parameter]:
        """Parameters that only R uses (the fused output depends on them only through masks)."""
        if self.structure_branch is None:
            return []
        mods = [self.heads] if self.structure_branch == "shared" else [self.s_stem, self.s_down, self.heads]
        return [p for m in mods for p in m.parameters()]


@register_method("sspfusion", trainable=True)
class SSPFusion(LuminanceFusion):
    """SSPFusion: structure-preserving IR-visible fusion network (SFE + SPF + U-shaped decoder).

    Keyword arguments (plain JSON values, kept in ``self.init_kwargs`` for checkpoints):

    * ``levels`` (N, default 3): number of stride-2 levels; inputs are padded to a multiple of
      2^(N+1).
    * ``channels`` (default ``(16, 32, 48, 64)``): widths of the stem and of levels 1..N
      (length N+1). ``PAPER_LIKE_CHANNELS = (32, 64, 128, 256)`` is a U-Net-sized alternative.
    * ``use_sfe`` (True): structure branch + L_rec; False = ablation "w/o SFE" (no branch,
      masks all zero, no L_rec, single training phase).
    * ``use_spf`` (True): mask-enhanced merge; False = ablation "w/o SPF" (plain concatenation
      merge; the structure branch still trains with L_rec).
    * ``structure_map`` ("G"): hard maps S = G(P) ("G") or S = [P > 0.5] ("threshold").
    * ``structure_branch`` ("shared"): R re-uses the encoder's stem/down convolutions
      ("shared") or has its own ("separate").
    * ``charbonnier_eps`` (1.0, the paper's eps) and ``alpha`` (0.01): L_total = alpha L_rec + L_fus.
    * ``w_ssim``, ``w_smooth``, ``w_grad`` (1.0 each, the paper's 1:1:1): weights of L_fus.
    * ``grad_gain`` (1.0, the paper's): L_grad's target is ``grad_gain`` times the stronger input's
      gradient (:func:`fusion.losses.grad_loss`); > 1 asks for a sharpened max (a departure).
    * ``output`` ("sigmoid", the paper's): the fused Y is ``sigmoid(z)`` of the head's output z;
      ``"clamp"``: ``clamp(z, 0, 1)``; ``"max_residual"``: ``clamp(max(IR, VI_Y) + z, 0, 1)`` with
      the head initialised to zero, so training starts at the pixel-wise max (fusion/README.md);
      ``"max_detail"``: ``clamp(max(IR, VI_Y) + z - blur(z), 0, 1)``, the same but only the high-pass
      of z (Gaussian sigma 1, :func:`fusion.structure.high_pass`) is added: detail, no smooth
      intensity shift (the issue #22 measurements in fusion/README.md: why).
    * ``init`` ("default": PyTorch's; "kaiming": He-normal for LeakyReLU(0.1), zero biases).
    * ``rec_reduction`` ("norm", the paper's Eq. 7: ``sqrt(||P - S||^2 + eps^2)`` per image, level
      and modality; "mean": the per-pixel Charbonnier mean, for comparison).
    * ``clamp_grad`` ("restoring"): the gradient of the [0, 1] clamp of the "clamp" and
      "max_residual" outputs: "restoring" (:func:`restoring_clamp`: a saturated output still gets the
      gradient that brings it back) or "zero" (torch's clamp: none outside [0, 1]). The forward
      pass, and so the fused image, is the same.

    Training interface (used by :mod:`fusion.train`): ``phases``, ``training_losses``,
    ``parameters_for_phase``; inference: ``fuse_y`` / ``forward`` (the fusion contract).
    """

    #: Training phases of the default configuration (instances set their own, see __init__).
    phases: tuple[str, ...] = ("structure", "fusion")

    def __init__(self, levels: int = 3, channels: Iterable[int] = DEFAULT_CHANNELS, use_sfe: bool = True,
                 use_spf: bool = True, structure_map: str = "G", charbonnier_eps: float = 1.0,
                 alpha: float = 0.01, structure_branch: str = "shared", w_ssim: float = 1.0,
                 w_smooth: float = 1.0, w_grad: float = 1.0, output: str = "sigmoid",
                 init: str = "default", rec_reduction: str = "norm", clamp_grad: str = "restoring",
                 grad_gain: float = 1.0):
        super().__init__()
        channels = tuple(int(c) for c in channels)
        if int(levels) != levels or levels < 1:
            raise ConfigError(f"sspfusion: `levels` must be an integer >= 1, got {levels!r}")
        levels = int(levels)
        if len(channels) != levels + 1 or min(channels) < 1:
            raise ConfigError(f"sspfusion: `channels` needs levels + 1 = {levels + 1} positive widths "
                              f"(stem, then levels 1..{levels}), got {list(channels)}; fix the method's kwargs.")
        if structure_map not in ("G", "threshold"):
            raise ConfigError(f"sspfusion: `structure_map` must be 'G' or 'threshold', got {structure_map!r}")
        if structure_branch not in ("shared", "separate"):
            raise ConfigError(f"sspfusion: `structure_branch` must be 'shared' or 'separate', got {structure_branch!r}")
        if output not in OUTPUTS:
            raise ConfigError(f"sspfusion: `output` must be one of {', '.join(OUTPUTS)}, got {output!r}")
        if rec_reduction not in REC_REDUCTIONS:
            raise ConfigError(f"sspfusion: `rec_reduction` must be one of {', '.join(REC_REDUCTIONS)}, "
                              f"got {rec_reduction!r}")
        if clamp_grad not in CLAMP_GRADS:
            raise ConfigError(f"sspfusion: `clamp_grad` must be one of {', '.join(CLAMP_GRADS)}, got {clamp_grad!r}")
        if init not in INITS:
            raise ConfigError(f"sspfusion: `init` must be one of {', '.join(INITS)}, got {init!r}")
        if min(w_ssim, w_smooth, w_grad) < 0:
            raise ConfigError(f"sspfusion: loss weights w_ssim, w_smooth, w_grad must be >= 0, got "
                              f"{w_ssim!r}, {w_smooth!r}, {w_grad!r}")
        if not grad_gain > 0:
            raise ConfigError(f"sspfusion: `grad_gain` must be > 0 (the paper's is 1.0), got {grad_gain!r}")
        if charbonnier_eps < 0 or alpha < 0:
            raise ConfigError(f"sspfusion: `charbonnier_eps` and `alpha` must be >= 0, got "
                              f"{charbonnier_eps!r} and {alpha!r}")
        self.init_kwargs = {"levels": levels, "channels": list(channels), "use_sfe": bool(use_sfe),
                            "use_spf": bool(use_spf), "structure_map": structure_map,
                            "charbonnier_eps": float(charbonnier_eps), "alpha": float(alpha),
                            "structure_branch": structure_branch, "w_ssim": float(w_ssim),
                            "w_smooth": float(w_smooth), "w_grad": float(w_grad), "output": output,
                            "init": init, "rec_reduction": rec_reduction, "clamp_grad": clamp_grad,
                            "grad_gain": float(grad_gain)}
        self.loss_weights = {k: self.init_kwargs[k] for k in ("w_ssim", "w_smooth", "w_grad", "grad_gain")}
        self.output = output
        self._clamp = restoring_clamp if clamp_grad == "restoring" else _torch_clamp
        self.levels, self.channels = levels, channels
        self.use_sfe, self.use_spf = bool(use_sfe), bool(use_spf)
        self.structure_map_mode = structure_map
        self.charbonnier_eps, self.alpha = float(charbonnier_eps), float(alpha)
        self.rec_reduction = rec_reduction
        self.phases = ("structure", "fusion") if self.use_sfe else ("fusion",)
        branch = structure_branch if self.use_sfe else None
        self.enc_ir = _ModalityEncoder(channels, branch)
        self.enc_vi = _ModalityEncoder(channels, branch)
        self.merge = nn.ModuleList([nn.Sequential(_conv(2 * c, c, k=1), _act()) for c in channels])
        self.dec = nn.ModuleList([
            nn.Sequential(_conv(channels[k + 1] + channels[k], channels[k]), _act(),
                          _conv(channels[k], channels[k]), _act())
            for k in range(levels)])
        self.head = _conv(channels[0], 1)
        if init == "kaiming":
            self._kaiming_init()
        if output in ("max_residual", "max_detail"):  # start exactly at max(IR, VI_Y)
            nn.init.zeros_(self.head.weight)
            nn.init.zeros_(self.head.bias)

    def _kaiming_init(self) -> None:
        """He-normal weights for LeakyReLU(0.1) (fan-in), zero biases, on every convolution."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, a=_NEG_SLOPE, nonlinearity="leaky_relu")
                nn.init.zeros_(m.bias)

    # ------------------------------------------------------------------ helpers
    @property
    def multiple(self) -> int:
        """Inputs are padded to a multiple of this: 2^(N+1)."""
        return 2 ** (self.levels + 1)

    def _pad(self, *xs: torch.Tensor) -> list[torch.Tensor]:
        """Pad each (B, C, H, W) at the bottom/right to a multiple of 2^(N+1): reflect, or replicate
        where the padding is not smaller than the side (reflect cannot pad that far)."""
        h, w = xs[0].shape[-2:]
        m = self.multiple
        ph, pw = (-h) % m, (-w) % m
        if ph == 0 and pw == 0:
            return list(xs)
        mode = "reflect" if (ph < h and pw < w) else "replicate"
        return [F.pad(x, (0, pw, 0, ph), mode=mode) for x in xs]

    def _hard_map(self, p: torch.Tensor) -> torch.Tensor:
        """S = G(P) or [P > 0.5]; binary, no gradient, P's dtype."""
        with torch.no_grad():
            if self.structure_map_mode == "G":
                return structure_map(p.detach())
            return (p.detach() > 0.5).to(p.dtype)

    def predict_structure(self, ir: torch.Tensor, vi_y: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Soft structure maps ([P_ir^1..N], [P_vi^1..N]) of padded inputs (structure branch only)."""
        if not self.use_sfe:
            raise ConfigError("sspfusion: this model was built with use_sfe=False and has no structure branch")
        return self.enc_ir.structure(ir), self.enc_vi.structure(vi_y)

    def _run(self, ir: torch.Tensor, vi_y: torch.Tensor, need_structure: bool):
        """Network on padded inputs: (fused_y (B,1,H,W), P_ir list or None, P_vi list or None)."""
        f_ir, f_vi = self.enc_ir.encode(ir), self.enc_vi.encode(vi_y)
        p_ir = p_vi = None
        if self.use_sfe and (self.use_spf or need_structure):
            p_ir = self.enc_ir.structure(ir, f_ir[0])
            p_vi = self.enc_vi.structure(vi_y, f_vi[0])
        fused = []
        for k in range(self.levels + 1):
            a, b = f_ir[k], f_vi[k]
            if k > 0 and self.use_spf and self.use_sfe:
                m_ir, m_vi = xor_masks(self._hard_map(p_ir[k - 1]), self._hard_map(p_vi[k - 1]))
                a = a + m_ir.to(a.dtype) * a
                b = b + m_vi.to(b.dtype) * b
            fused.append(self.merge[k](torch.cat([a, b], dim=1)))
        d = fused[-1]
        for k in range(self.levels - 1, -1, -1):
            up = F.interpolate(d, size=fused[k].shape[-2:], mode="bilinear", align_corners=False)
            d = self.dec[k](torch.cat([up, fused[k]], dim=1))
        return self._output(self.head(d), ir, vi_y), p_ir, p_vi

    def _output(self, z: torch.Tensor, ir: torch.Tensor, vi_y: torch.Tensor) -> torch.Tensor:
        """The fused Y from the head's output ``z`` (see ``output`` in the class doc), in float32
        (under bf16 autocast a bf16 image would be off by up to half a grey level near 1)."""
        z = z.float()
        if self.output == "sigmoid":
            return torch.sigmoid(z)
        if self.output == "clamp":
            return self._clamp(z)
        if self.output == "max_detail":
            z = high_pass(z)
        return self._clamp(torch.maximum(ir, vi_y).float() + z)

    # ------------------------------------------------------------------ inference
    def fuse_y(self, ir: torch.Tensor, vi_y: torch.Tensor) -> torch.Tensor:
        """(B, 1, H, W) infrared and visible Y in [0, 1] -> fused Y (B, 1, H, W) in [0, 1], any H, W."""
        h, w = ir.shape[-2:]
        ir_p, vi_p = self._pad(ir, vi_y)
        fused, _, _ = self._run(ir_p, vi_p, need_structure=False)
        return fused[..., :h, :w]

    # ------------------------------------------------------------------ training
    def _rec_loss(self, ir: torch.Tensor, vi_y: torch.Tensor, p_ir: list, p_vi: list) -> torch.Tensor:
        """L_rec: mean over both modalities and N levels of Eq. 7 for P^k against G(area_resize_k(x)):
        ``sqrt(||P - S||^2 + eps^2)`` per image (``rec_reduction="norm"``, the paper) or the
        per-pixel ``mean sqrt((P - S)^2 + eps^2)`` (``"mean"``)."""
        terms = []
        for img, preds in ((ir, p_ir), (vi_y, p_vi)):
            for p, s in zip(preds, structure_pyramid(img, self.levels), strict=True):
                terms.append(rec_loss(p, s, self.charbonnier_eps, self.rec_reduction))
        return torch.stack(terms).mean()

    def training_losses(self, ir: torch.Tensor, vi_y: torch.Tensor, phase: str) -> tuple[torch.Tensor, dict[str, float]]:
        """Loss of one batch. ir, vi_y: (B, 1, H, W) in [0, 1] (padded here if needed).

        * ``phase="structure"``: L_rec only (structure branch; components ``rec, total``);
        * ``phase="fusion"``: ``alpha L_rec + L_ssim + L_smooth + L_grad`` (components
          ``rec, ssim, smooth, grad, total``; ``rec`` absent when use_sfe=False).

        Losses are float32 scalars (computed outside autocast)."""
        if phase not in self.phases:
            raise ValueError(f"sspfusion: unknown training phase {phase!r} for this model; its phases are "
                             f"{list(self.phases)} (use_sfe={self.use_sfe}).")
        h, w = ir.shape[-2:]
        ir_p, vi_p = self._pad(ir, vi_y)
        if phase == "structure":
            p_ir, p_vi = self.predict_structure(ir_p, vi_p)
            rec = self._rec_loss(ir_p, vi_p, p_ir, p_vi)
            return rec, {"rec": float(rec.detach()), "total": float(rec.detach()),
                         **self._structure_iou(ir_p, vi_p, p_ir, p_vi)}
        fused, p_ir, p_vi = self._run(ir_p, vi_p, need_structure=True)
        fused = fused[..., :h, :w]
        l_fus, fus_parts = fusion_loss(fused, ir, vi_y, **self.loss_weights)
        total = l_fus
        parts = {}
        if self.use_sfe:
            rec = self._rec_loss(ir_p, vi_p, p_ir, p_vi)
            total = total + self.alpha * rec
            parts["rec"] = float(rec.detach())
        parts.update({k: float(v.detach()) for k, v in fus_parts.items()})
        parts.update(fus=float(l_fus.detach()), total=float(total.detach()))
        if self.use_sfe:
            parts.update(self._structure_iou(ir_p, vi_p, p_ir, p_vi))
        return total, parts

    def fusion_loss(self, fused: torch.Tensor, ir: torch.Tensor, vi_y: torch.Tensor) -> torch.Tensor:
        """L_fus of any fused Y (B, 1, H, W) with this model's loss weights (scalar, float32); the
        trainer scores ``max(IR, VI_Y)`` and the mean with it on every batch (diagnostics)."""
        return fusion_loss(fused, ir, vi_y, **self.loss_weights)[0]

    @torch.no_grad()
    def _structure_iou(self, ir: torch.Tensor, vi_y: torch.Tensor, p_ir: list, p_vi: list) -> dict[str, float]:
        """Per level k: IoU of ``P^k > 0.5`` against ``S_gt^k``, pixels of both modalities pooled
        (``iou1..iouN``; 1.0 when both are empty)."""
        out = {}
        gts = (structure_pyramid(ir, self.levels), structure_pyramid(vi_y, self.levels))
        for k in range(self.levels):
            inter = union = 0.0
            for preds, gt in zip((p_ir, p_vi), gts, strict=True):
                a, b = preds[k].detach().float() > 0.5, gt[k] > 0.5
                inter += float((a & b).sum())
                union += float((a | b).sum())
            out[f"iou{k + 1}"] = inter / union if union else 1.0
        return out

    @torch.no_grad()
    def phase_snapshot(self, ir: torch.Tensor, vi_y: torch.Tensor, phase: str, n: int = 4) -> dict[str, torch.Tensor]:
        """Pictures of the end of ``phase`` for the run folder (the trainer writes them as PNGs):
        after the structure phase, per crop i < ``n`` one grey (H', W') image ``structure_i`` in
        [0, 1] with one row per modality (infrared, then visible Y): the input crop, then P^1..P^N
        and S_gt^1..S_gt^N (each level scaled up to the crop size, nearest neighbour). {} for other
        phases or without the structure branch."""
        if phase != "structure" or not self.use_sfe:
            return {}
        ir, vi_y = self._pad(ir[:n].float(), vi_y[:n].float())
        p_ir, p_vi = self.predict_structure(ir, vi_y)
        size = ir.shape[-2:]
        out = {}
        for i in range(ir.shape[0]):
            rows = []
            for img, preds in ((ir, p_ir), (vi_y, p_vi)):
                maps = [img[i:i + 1]]
                maps += [F.interpolate(p[i:i + 1].float(), size=size, mode="nearest") for p in preds]
                maps += [F.interpolate(s, size=size, mode="nearest")
                         for s in structure_pyramid(img[i:i + 1], self.levels)]
                rows.append(torch.cat([F.pad(m, (0, 2), value=1.0) for m in maps], dim=-1))
            out[f"structure_{i}"] = torch.cat([F.pad(r, (0, 0, 0, 2), value=1.0) for r in rows], dim=-2)[0, 0]
        return out

    def parameters_for_phase(self, phase: str) -> list[nn.Parameter]:
        """Parameters to optimise in ``phase``: "structure" -> the structure branches' path (both
        modalities; with the shared branch this includes the encoders' stem and down convs);
        "fusion" -> all parameters."""
        if phase not in self.phases:
            raise ValueError(f"sspfusion: unknown training phase {phase!r} for this model; its phases are "
                             f"{list(self.phases)} (use_sfe={self.use_sfe}).")
        if phase == "structure":
            return self.enc_ir.structure_phase_parameters() + self.enc_vi.structure_phase_parameters()
        return list(self.parameters())

    def structure_only_parameters(self) -> list[nn.Parameter]:
        """Parameters used by nothing but the structure branches (empty when use_sfe=False)."""
        return self.enc_ir.structure_only_parameters() + self.enc_vi.structure_only_parameters()


def _ablation(name: str, switch: str, **kwargs) -> SSPFusion:
    if kwargs.pop(switch, False) is not False:
        raise ConfigError(f"fusion method {name!r} fixes {switch}=False; remove `{switch}` from its kwargs "
                          "or use method 'sspfusion'.")
    return SSPFusion(**{switch: False}, **kwargs)


@register_method("sspfusion_no_sfe", trainable=True)
def sspfusion_no_sfe(**kwargs) -> SSPFusion:
    """SSPFusion without SFE (ablation): no structure branch, masks all zero, no L_rec."""
    return _ablation("sspfusion_no_sfe", "use_sfe", **kwargs)


@register_method("sspfusion_no_spf", trainable=True)
def sspfusion_no_spf(**kwargs) -> SSPFusion:
    """SSPFusion without SPF (ablation): plain concatenation merge; structure branch kept."""
    return _ablation("sspfusion_no_spf", "use_spf", **kwargs)


sspfusion_no_sfe.phases = ("fusion",)
sspfusion_no_spf.phases = ("structure", "fusion")
