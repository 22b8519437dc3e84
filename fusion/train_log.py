"""What a fusion training reports: the per-epoch sums (:class:`EpochAcc`) and rows of ``log.csv``,
the progress bar and the plain epoch line, TensorBoard scalars and images, and the verdict -- did
the model beat the trivial ``max(IR, VI_Y)`` on its own fusion loss (``verdict.json``)."""
from __future__ import annotations

import csv
import io
import json
import math
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fuseseg import runtime
from fuseseg.data.io import atomic_write_text, write_image
from fuseseg.progress import epoch_line, format_fields
from fuseseg.tblog import TrainingLog


def _log_columns(rows: list[dict]) -> list[str]:
    head, tail = ["phase", "epoch", "global_step"], ["loss", "lr", "images_per_s", "seconds"]
    comps: list[str] = []
    for r in rows:
        for k in r:
            if k not in head and k not in tail and k not in comps:
                comps.append(k)
    return head + comps + tail


def write_log(path: Path, rows: list[dict]) -> None:
    """Write the per-epoch rows as CSV atomically (columns: the union over rows)."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=_log_columns(rows), restval="", lineterminator="\n")
    writer.writeheader()
    for r in rows:
        writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()})
    atomic_write_text(path, buf.getvalue())


def format_components(comps: dict[str, float]) -> str:
    return " ".join(f"{k} {v:.4g}" for k, v in comps.items())


def progress_bar(console):
    from rich.progress import TextColumn

    from fuseseg.progress import make_progress

    bar = make_progress(TextColumn("{task.fields[info]}"), console=console)
    bar.start()
    return bar


def log_epoch(bar, task, tb: TrainingLog, row: dict[str, Any], phases, pi: int, n_epochs: int, method: str,
               model: nn.Module, ir: torch.Tensor | None, vi_y: torch.Tensor | None, n_images: int = 3) -> None:
    """An epoch's log row as one plain line (where the console is not a terminal; ETA from this
    epoch's time x the epochs left in every phase) and, with TensorBoard, as scalars
    (``loss/<component>``, ``lr``, ``images_per_s``) and up to ``n_images`` pairs of the epoch's last
    batch as infrared | visible Y | fused rows."""
    skip = ("phase", "epoch", "global_step", "seconds")
    if bar is not None:
        left = n_epochs - int(row["epoch"]) + sum(n for _, n in phases[pi + 1:])
        epoch_line(bar, task, f"train {method} {row['phase']} epoch {row['epoch']}/{n_epochs}: "
                   + format_fields({k: v for k, v in row.items() if k not in skip}),
                   eta_s=left * float(row["seconds"]))
    if tb.writer is None:
        return
    step = int(row["global_step"])
    tb.scalars(step, {k: v for k, v in row.items() if k not in skip + ("lr", "images_per_s")}, "loss/")
    tb.scalars(step, {"lr": row["lr"], "images_per_s": row["images_per_s"], "epoch_seconds": row["seconds"]})
    if ir is None:
        return
    net = runtime.unwrap(model)
    was_training = net.training
    net.eval()
    with torch.no_grad():
        a, b = ir[:n_images].float(), vi_y[:n_images].float()
        fused = net(a, b).float().clamp(0, 1)
    net.train(was_training)
    tb.images(step, f"fused/{row['phase']}", [[x[0].cpu().numpy() for x in (a[i], b[i], fused[i])]
                                               for i in range(a.shape[0])])


class EpochAcc:
    """Running sums of one epoch's loss components (resumable mid-epoch: :meth:`state`)."""

    def __init__(self, sums: dict, count: int, seconds: float):
        self.sums, self.count = dict(sums), count
        self.t_segment = time.perf_counter()
        self.t_start = self.t_segment - seconds

    @classmethod
    def resume(cls, state: dict | None) -> EpochAcc:
        state = state or {"sums": {}, "count": 0, "seconds": 0.0}
        return cls(state["sums"], state["count"], state["seconds"])

    def add(self, comps: dict[str, float], loss: float) -> None:
        self.count += 1
        for k, v in comps.items():
            self.sums[k] = self.sums.get(k, 0.0) + v
        self.sums["loss"] = self.sums.get("loss", 0.0) + loss

    def pause(self) -> None:
        self.seconds = time.perf_counter() - self.t_start

    def state(self) -> dict:
        return {"sums": dict(self.sums), "count": self.count,
                "seconds": getattr(self, "seconds", time.perf_counter() - self.t_start)}

    def rate(self, steps: int, batch: int) -> float:
        return steps * batch / max(1e-9, time.perf_counter() - self.t_segment)

    def row(self, phase: str, epoch: int, global_step: int, opt, steps_per_epoch: int, batch: int) -> dict:
        seconds = time.perf_counter() - self.t_start
        n = max(1, self.count)
        row: dict[str, Any] = {"phase": phase, "epoch": epoch, "global_step": global_step}
        row.update({k: v / n for k, v in self.sums.items() if k != "loss"})
        row.update({"loss": self.sums.get("loss", math.nan) / n, "lr": float(opt.param_groups[0]["lr"]),
                    "images_per_s": steps_per_epoch * batch / max(seconds, 1e-9), "seconds": seconds})
        return row


@torch.no_grad()
def trivial_fusion_losses(model: nn.Module, ir: torch.Tensor, vi_y: torch.Tensor) -> dict[str, float]:
    """``fus_max`` and ``fus_mean``: the model's fusion loss (``model.fusion_loss``) of the trivial
    answers ``max(IR, VI_Y)`` and ``(IR + VI_Y) / 2`` on the same batch; {} for a method without
    ``fusion_loss``. A trained model whose ``fus`` is not below ``fus_max`` has not learned what
    its own loss rewards."""
    fn = getattr(model, "fusion_loss", None)
    if fn is None:
        return {}
    ir, vi_y = ir.float(), vi_y.float()
    return {"fus_max": float(fn(torch.maximum(ir, vi_y), ir, vi_y)),
            "fus_mean": float(fn(0.5 * (ir + vi_y), ir, vi_y))}


def save_snapshots(model: nn.Module, ir: torch.Tensor | None, vi_y: torch.Tensor | None, phase: str,
                   out_dir: Path, enabled: bool = True) -> list[Path]:
    """At the end of ``phase``: the method's ``phase_snapshot(ir, vi_y, phase)`` pictures (optional;
    {name: (H, W) grey tensor in [0, 1]}) of the phase's last batch, written atomically as
    ``out_dir/snapshots/<phase>/<name>.png``; the paths written (none unless ``enabled``: rank 0)."""
    fn = getattr(model, "phase_snapshot", None)
    if fn is None or ir is None or not enabled:
        return []
    was_training = model.training
    model.eval()
    try:
        pictures = fn(ir, vi_y, phase)
    finally:
        model.train(was_training)
    paths = []
    for name, img in pictures.items():
        path = out_dir / "snapshots" / phase / f"{name}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        write_image(path, (img.float().clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy())
        paths.append(path)
    return paths


def verdict(rows: list[dict]) -> dict[str, Any]:
    """Did the model beat ``max(IR, VI_Y)`` on its own fusion loss? Judged on the last fusion
    epoch's means (``fus`` against ``fus_max`` on the same batches). ``status``: "converged"
    (fus < fus_max), "undertrained" (not), or "unknown" (no such columns)."""
    last = next((r for r in reversed(rows) if r.get("phase") == "fusion"), None)
    if last is None or "fus" not in last or "fus_max" not in last:
        return {"status": "unknown", "reason": "no fusion epoch with fus / fus_max columns"}
    out = {k: float(last[k]) for k in ("fus", "fus_max", "fus_mean") if k in last}
    out.update(epoch=int(last["epoch"]), global_step=int(last["global_step"]))
    out["beat_max"] = out["fus"] < out["fus_max"]
    out["status"] = "converged" if out["beat_max"] else "undertrained"
    ious = {k: float(v) for k, v in last.items() if k.startswith("iou")}
    if ious:
        out["structure_iou"] = ious
    return out


def report_verdict(v: dict[str, Any], out_dir: Path, console) -> None:
    """Write ``verdict.json`` into the run folder and print the verdict (loudly when undertrained)."""
    atomic_write_text(out_dir / "verdict.json", json.dumps(v, indent=2) + "\n")
    if v["status"] == "unknown":
        console.print(f"verdict: not measured ({v['reason']})")
    elif v["beat_max"]:
        console.print(f"verdict: converged: fusion loss {v['fus']:.4f} < {v['fus_max']:.4f} of "
                      f"max(IR, VI_Y) (mean: {v.get('fus_mean', math.nan):.4f}) in the last epoch")
    else:
        console.print(f"[bold red]WARNING: UNDERTRAINED[/]: fusion loss {v['fus']:.4f} is not below "
                      f"{v['fus_max']:.4f}, the loss of the trivial max(IR, VI_Y), in the last epoch. "
                      "The model has not learned what its loss rewards: train longer (epochs), "
                      "or see fusion/README.md for a converging recipe.")


#: loss_convergence: a phase has converged when at most this share of its total loss drop
#: happened in the last quarter of its epochs.
PLATEAU_SHARE = 0.1


def loss_convergence(rows: list[dict], plateau_share: float = PLATEAU_SHARE) -> dict[str, Any]:
    """Has each phase's own training loss (the epoch means of ``loss`` in ``log.csv``) stopped
    falling? Per phase with n epochs: ``first``, ``last``, ``ref`` = the mean k = max(1, n // 4)
    epochs before the last, and ``late_share = (ref - last) / (first - last)``, the share of the
    phase's drop made in its last k epochs. ``status``: "converged" (the loss fell and
    late_share <= ``plateau_share``), "still falling" (it fell, but more than that share late),
    "not falling" (last >= first), "unknown" (fewer than 2 epochs). Overall: "converged" when
    every phase is, else the first phase's status that is not."""
    phases: dict[str, list[float]] = {}
    for r in rows:
        if r.get("loss") not in (None, ""):
            phases.setdefault(r["phase"], []).append(float(r["loss"]))
    out: dict[str, Any] = {"rule": f"per phase: share of the loss drop made in the last quarter of its "
                                   f"epochs <= {plateau_share:g}", "phases": {}}
    for phase, losses in phases.items():
        n = len(losses)
        one: dict[str, Any] = {"epochs": n, "first": losses[0], "last": losses[-1]}
        if n < 2:
            one["status"] = "unknown"
        elif losses[-1] >= losses[0]:
            one["status"] = "not falling"
        else:
            k = max(1, n // 4)
            one.update(window_epochs=k, ref=losses[-1 - k])
            one["late_share"] = (losses[-1 - k] - losses[-1]) / (losses[0] - losses[-1])
            one["status"] = "converged" if one["late_share"] <= plateau_share else "still falling"
        out["phases"][phase] = one
    bad = [p["status"] for p in out["phases"].values() if p["status"] != "converged"]
    out["status"] = bad[0] if bad else ("converged" if out["phases"] else "unknown")
    return out
