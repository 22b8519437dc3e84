"""SeAFusion (Tang, Yuan and Ma, "Image fusion in the loop of high-level vision tasks: a
semantic-aware real-time infrared and visible image fusion network", Information Fusion 82, 2022),
its fusion network and content loss, written here from the paper's description.

Network, on (B, 1, H, W) infrared ``ir`` and visible luminance ``vi_y`` in [0, 1], all at full
resolution (no down-sampling, so any H, W works without padding):

* feature extractor, one per modality (weights not shared): ``conv3x3(1 -> 16) + LReLU``, then two
  gradient residual dense blocks GRDB(16 -> 32) and GRDB(32 -> 48);
* GRDB(c -> c'): main stream ``d1 = LReLU(conv3x3_c->c(x))``, ``d2 = LReLU(conv3x3_2c->c([x, d1]))``,
  ``m = conv1x1_3c->c'([x, d1, d2])`` (dense connections, then a 1x1 conv to the output width);
  residual stream ``r = conv1x1_c->c'(|Sobel_x x| + |Sobel_y x|)`` (fixed Sobel per channel);
  output ``LReLU_0.1(m + r)``;
* image reconstructor: ``[F_ir, F_vi]`` (96 channels) -> conv3x3 96->64 -> 64->32 -> 32->16 (each
  with LReLU) -> conv3x3 16->1 -> Tanh, mapped to [0, 1] as ``(tanh(z) + 1) / 2``.

Content loss (the paper's Eqs.): ``L_content = L_int + alpha L_texture`` with
``L_int = mean |I_f - max(I_ir, I_vi)|`` and
``L_texture = mean | |grad I_f| - max(|grad I_ir|, |grad I_vi|) |``, ``|grad x| = |Sobel_x x| +
|Sobel_y x|``, alpha = 10. The paper's total fusion loss is ``L_f = L_content + beta L_semantic``;
the semantic loss comes from a segmentation network trained in alternation with the fusion
network (the paper's joint, "in the loop" rounds, with beta = gamma (m - 1) in round m). The rounds
are run by :mod:`pipelines.semantic_rounds` (``fusion_train.semantic_rounds``), with this
project's DeepLabV3+ in place of BiSeNet; here ``semantic_weight`` is beta, 0 by default (the
paper's first round, pure content loss), and :meth:`SeAFusion.set_semantic_loss` takes the
segmenter's loss. With beta > 0 the method asks the trainer for the batch's labels and visible
RGB (``batch_extras``); pairs without labels (RoadScene) add no semantic loss.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from fuseseg.errors import ConfigError
from fusion.base import LuminanceFusion
from fusion.losses import grad_loss, smooth_loss, sobel_l1
from fusion.registry import register_method

__all__ = ["SeAFusion", "GRDB", "content_loss", "EXTRACTOR_WIDTHS", "DECODER_WIDTHS"]

#: Widths of the feature extractor (per modality): stem, GRDB 1, GRDB 2 (the paper's 16, 32, 48).
EXTRACTOR_WIDTHS = (16, 32, 48)
#: Output widths of the reconstructor's layers after the 96-channel concatenation.
DECODER_WIDTHS = (64, 32, 16, 1)
_SLOPE = 0.2        # LReLU slope of the convolution layers
_GRDB_SLOPE = 0.1   # LReLU slope after the GRDB's sum of streams


def _conv(cin: int, cout: int, k: int = 3) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, k, padding=k // 2)


class GRDB(nn.Module):
    """Gradient residual dense block, (B, cin, H, W) -> (B, cout, H, W) (see the module doc)."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.dense1 = _conv(cin, cin)
        self.dense2 = _conv(2 * cin, cin)
        self.main_1x1 = _conv(3 * cin, cout, k=1)
        self.grad_1x1 = _conv(cin, cout, k=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        d1 = F.leaky_relu(self.dense1(x), _SLOPE)
        x1 = torch.cat([x, d1], dim=1)
        d2 = F.leaky_relu(self.dense2(x1), _SLOPE)
        main = self.main_1x1(torch.cat([x1, d2], dim=1))
        res = self.grad_1x1(sobel_l1(x))
        return F.leaky_relu(main + res, _GRDB_SLOPE)


class _Extractor(nn.Module):
    def __init__(self, widths: tuple[int, int, int]):
        super().__init__()
        self.stem = _conv(1, widths[0])
        self.grdb1 = GRDB(widths[0], widths[1])
        self.grdb2 = GRDB(widths[1], widths[2])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.grdb2(self.grdb1(F.leaky_relu(self.stem(x), _SLOPE)))


def content_loss(fused: torch.Tensor, ir: torch.Tensor, vi_y: torch.Tensor,
                 alpha: float = 10.0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``L_content = L_int + alpha L_texture`` of any fused Y (B, 1, H, W) (float32 scalar) and
    the unweighted parts ``{"int", "texture"}``. ``L_int = mean |F - max(IR, VI)|``,
    ``L_texture = mean | |grad F| - max(|grad IR|, |grad VI|) |`` (Sobel, ``|gx| + |gy|``,
    replicate padding)."""
    l_int = smooth_loss(fused, ir, vi_y)
    l_tex = grad_loss(fused, ir, vi_y)
    return l_int + alpha * l_tex, {"int": l_int, "texture": l_tex}


@register_method("seafusion", trainable=True)
class SeAFusion(LuminanceFusion):
    """SeAFusion (Tang et al., Inf. Fusion 2022): GRDB fusion network trained with the content loss.

    Keyword arguments (plain JSON values, kept in ``init_kwargs``):

    * ``alpha`` (10.0, the paper's): weight of L_texture in L_content = L_int + alpha L_texture.
    * ``semantic_weight`` (0.0): beta of L_f = L_content + beta L_semantic. The semantic loss is a
      callable set with :meth:`set_semantic_loss` (by :mod:`pipelines.semantic_rounds`); with
      beta > 0 and no callable set, training raises a ConfigError.

    One training phase, ``"fusion"``, over all parameters.
    """

    phases: tuple[str, ...] = ("fusion",)

    def __init__(self, alpha: float = 10.0, semantic_weight: float = 0.0):
        super().__init__()
        for key, val in (("alpha", alpha), ("semantic_weight", semantic_weight)):
            if isinstance(val, bool) or not isinstance(val, (int, float)) or not val >= 0:
                raise ConfigError(f"seafusion: `{key}` must be a number >= 0, got {val!r}")
        self.alpha, self.semantic_weight = float(alpha), float(semantic_weight)
        self.init_kwargs = {"alpha": self.alpha, "semantic_weight": self.semantic_weight}
        self.semantic_loss_fn: Callable[..., torch.Tensor] | None = None
        self.extract_ir = _Extractor(EXTRACTOR_WIDTHS)
        self.extract_vi = _Extractor(EXTRACTOR_WIDTHS)
        cins = (2 * EXTRACTOR_WIDTHS[-1],) + DECODER_WIDTHS[:-1]
        self.decoder = nn.ModuleList([_conv(ci, co) for ci, co in zip(cins, DECODER_WIDTHS, strict=True)])

    # ------------------------------------------------------------------ inference
    def fuse_y(self, ir: torch.Tensor, vi_y: torch.Tensor) -> torch.Tensor:
        """(B, 1, H, W) infrared and visible Y in [0, 1] -> fused Y (B, 1, H, W) in [0, 1] (float32)."""
        x = torch.cat([self.extract_ir(ir), self.extract_vi(vi_y)], dim=1)
        for conv in self.decoder[:-1]:
            x = F.leaky_relu(conv(x), _SLOPE)
        z = self.decoder[-1](x).float()
        return 0.5 * (torch.tanh(z) + 1.0)

    # ------------------------------------------------------------------ training
    @property
    def batch_extras(self) -> tuple[str, ...]:
        """The extra batch items training needs: labels and visible RGB when beta > 0."""
        return ("labels", "visible") if self.semantic_weight > 0 else ()

    def set_semantic_loss(self, fn: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor] | None) -> None:
        """Hook of the paper's semantic loss: ``fn(fused_y, visible, labels) -> scalar`` on the
        labelled samples of a batch (fused_y (b, 1, h, w), visible RGB (b, 3, h, w) in [0, 1],
        labels (b, h, w) int64, 255 = ignore); differentiable in ``fused_y`` (e.g. a frozen
        segmenter's loss on the recoloured fused image). ``None`` unsets."""
        if fn is not None and not callable(fn):
            raise TypeError(f"seafusion: the semantic loss must be callable, got {type(fn).__name__}")
        # kept outside the module tree: a segmenter behind the loss is neither a parameter to
        # train, nor part of the state_dict, nor switched by .train()/.to()
        object.__setattr__(self, "semantic_loss_fn", fn)

    def fusion_loss(self, fused: torch.Tensor, ir: torch.Tensor, vi_y: torch.Tensor) -> torch.Tensor:
        """L_content of any fused Y (B, 1, H, W) (float32 scalar); the trainer also scores
        max(IR, VI_Y) and the mean with it."""
        return content_loss(fused, ir, vi_y, self.alpha)[0]

    def training_losses(self, ir: torch.Tensor, vi_y: torch.Tensor, phase: str,
                        labels: torch.Tensor | None = None,
                        visible: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, float]]:
        """Loss of one batch (phase ``"fusion"``): ``L_content (+ beta L_semantic)``; components
        ``int, texture, fus`` (= L_content), with beta > 0 also ``semantic`` (the semantic loss
        over the batch's labelled samples, 0 when none is labelled) and ``labelled`` (their
        share of the batch), and ``total``."""
        _check_phase("seafusion", phase, self.phases)
        fused = self.fuse_y(ir, vi_y)
        l_content, parts = content_loss(fused, ir, vi_y, self.alpha)
        total = l_content
        out = {k: float(v.detach()) for k, v in parts.items()}
        out["fus"] = float(l_content.detach())
        if self.semantic_weight > 0:
            if self.semantic_loss_fn is None:
                raise ConfigError(
                    f"seafusion: semantic_weight={self.semantic_weight} needs a semantic loss, but none is set. "
                    "Train it with fusion_train.semantic_rounds (the segmentation-driven rounds), "
                    "with semantic_weight 0 (the paper's first round), or call model.set_semantic_loss(fn) first.")
            if labels is None or visible is None:
                raise ConfigError("seafusion: semantic_weight > 0 needs the batch's labels and visible RGB "
                                  "(the trainer passes them as batch_extras); none were given.")
            has = (labels != 255).flatten(1).any(1)
            if bool(has.any()):
                l_sem = self.semantic_loss_fn(fused[has], visible[has], labels[has]).float()
            else:   # no labelled pair in this batch: the semantic term is off for it
                l_sem = fused.sum() * 0.0
            total = total + self.semantic_weight * l_sem
            out["semantic"] = float(l_sem.detach())
            out["labelled"] = float(has.float().mean())
        out["total"] = float(total.detach())
        return total, out

    def parameters_for_phase(self, phase: str) -> list[nn.Parameter]:
        """All parameters (one phase)."""
        _check_phase("seafusion", phase, self.phases)
        return list(self.parameters())


def _check_phase(name: str, phase: str, phases: tuple[str, ...]) -> None:
    if phase not in phases:
        raise ValueError(f"{name}: unknown training phase {phase!r}; its phases are {list(phases)}")
