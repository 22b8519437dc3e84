"""GPU acceptance check: ``python -m benchmarks.gpu_check [--out FILE] [--only NAMES] [--list]``.

A maintainer with a CUDA machine runs this once (about 3-6 minutes on one GPU; the budget is 8)
to check everything the CPU-only CI cannot: both trainers for a few steps with AMP in bf16 and in
fp16 with a GradScaler, channels-last, ``torch.compile``, DistributedDataParallel over NCCL (one
process) and the ``torchrun`` launcher, the out-of-memory report, and the inference throughput
and peak memory of the paper config (``configs/msrs.yaml``). It prints ONE table (check, status,
seconds, key figures) and writes JSON (default ``results/benchmarks/gpu-check-<date>.json``).

Exit status: 0 when every check passed; 1 when any failed (each failure is caught, reported and
the other checks still run), or when no CUDA device is available (a one-line message says so);
2 for a usage error. ``--allow-cpu`` runs what can run without CUDA on the CPU (development of
this script; CUDA-only checks are then SKIPped) and never counts as an acceptance.

Every check is a function ``check(ctx) -> dict`` of key figures that raises on failure
(:data:`CHECKS`); :func:`run_checks`, :func:`results_table` and :func:`make_record` are the
machinery, tested on CPU with injected checks (tests/test_gpu_check.py).
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.common import REPO, RESULTS, library_versions, machine_info

BUDGET_S = 480.0  # the acceptance run must fit in 8 minutes


class Skip(Exception):
    """Raised by a check that cannot run here (e.g. CUDA-only under --allow-cpu)."""


@dataclass
class CheckResult:
    name: str
    status: str  # PASS, FAIL, SKIP
    seconds: float
    figures: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    detail: str | None = None  # the traceback of a failure (JSON only)


@dataclass
class Ctx:
    """What the checks share: the device, a scratch folder with a small synthetic data set."""

    device: Any  # torch.device
    work: Path
    cuda: bool
    data: Path | None = None
    memory: dict = field(default_factory=dict)

    def dataset(self) -> Path:
        """A small labelled synthetic set (MSRS layout), made once: 16 train + 8 test, 96x128."""
        if self.data is None:
            from fuseseg.data.synthetic import make_synthetic

            self.data = self.work / "data"
            make_synthetic(self.data, 16, 8, size=(96, 128), seed=0, workers=1, progress=False)
        return self.data


# ---------------------------------------------------------------- helpers of the checks
def _need_cuda(ctx: Ctx) -> None:
    if not ctx.cuda:
        raise Skip("needs CUDA")


def _sync(ctx: Ctx) -> None:
    if ctx.cuda:
        import torch

        torch.cuda.synchronize(ctx.device)


def _reset_peak(ctx: Ctx) -> None:
    if ctx.cuda:
        import torch

        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(ctx.device)


def _peak_gib(ctx: Ctx) -> float | None:
    if not ctx.cuda:
        return None
    import torch

    return round(torch.cuda.max_memory_allocated(ctx.device) / 2**30, 3)


def _per_s(ctx: Ctx, fn: Callable[[], Any], items: int, repeats: int = 5, warmup: int = 2) -> float:
    """Items per second of ``fn`` (median of ``repeats``, synchronised on CUDA)."""
    from benchmarks.common import timed

    return items / timed(fn, repeats=repeats, warmup=warmup, device=ctx.device if ctx.cuda else None).median


def _fusion_cfg(ctx: Ctx, **kw):
    from fusion.train import FusionTrainConfig

    base = dict(method="sspfusion", data_root=str(ctx.dataset()), split="train", structure_epochs=1,
                epochs=1, batch_size=4, crop_size=64, lr=1e-3, workers=0, seed=0,
                device=str(ctx.device), max_steps_per_epoch=3, log_every=1)
    base.update(kw)
    return FusionTrainConfig(**base)


def _seg_cfg(ctx: Ctx, **kw):
    from segmentation.config import SegConfig

    base = dict(encoder="resnet18", decoder_channels=64, epochs=2, frozen_epochs=1, batch_size=4,
                frozen_batch_size=4, crop_size=64, workers=0, device=str(ctx.device),
                max_steps_per_epoch=3)
    base.update(kw)
    return SegConfig(**base)


def _log_rows(path: Path) -> list[dict]:
    import csv

    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def _train_fusion(ctx: Ctx, name: str, **kw) -> tuple[dict, list[dict], float]:
    import torch

    from fusion.train import train_fusion

    out = ctx.work / name
    _reset_peak(ctx)
    t0 = time.perf_counter()
    final = train_fusion(_fusion_cfg(ctx, **kw), out, progress=False)
    _sync(ctx)
    seconds = time.perf_counter() - t0
    ck = torch.load(final, map_location="cpu", weights_only=False)
    rows = _log_rows(out / "log.csv")
    losses = [float(r["loss"]) for r in rows]
    if not rows or not all(v == v and abs(v) < float("inf") for v in losses):
        raise AssertionError(f"fusion training {name}: losses {losses}")
    return ck, rows, seconds


def _train_seg(ctx: Ctx, name: str, **kw) -> tuple[dict, dict, float]:
    import torch

    from segmentation.evaluate import evaluate_segmenter
    from segmentation.train import train_segmenter

    data = ctx.dataset()
    out = ctx.work / name
    _reset_peak(ctx)
    t0 = time.perf_counter()
    cfg = _seg_cfg(ctx, **kw)
    final = train_segmenter(data / "train" / "vi", data / "train" / "Segmentation_labels", cfg, out,
                            progress=False)
    _sync(ctx)
    seconds = time.perf_counter() - t0
    ck = torch.load(final, map_location="cpu", weights_only=False)
    last = torch.load(out / "last.pt", map_location="cpu", weights_only=False)
    rows = _log_rows(out / "log.csv")
    losses = [float(r["loss"]) for r in rows]
    if len(rows) != cfg.epochs or not all(v == v and abs(v) < float("inf") for v in losses):
        raise AssertionError(f"segmentation training {name}: log rows {rows}")
    res = evaluate_segmenter(final, data / "test" / "vi", data / "test" / "Segmentation_labels",
                             device=ctx.device, amp=cfg.amp)
    if not 0.0 <= res.miou <= 1.0:
        raise AssertionError(f"mIoU {res.miou} outside [0, 1]")
    return ck, {"last": last, "miou": res.miou, "eval_precision": res.precision, "losses": losses}, seconds


def _seg_step(ctx: Ctx, net, opt, crit, x, y):
    """One DeepLabV3+ optimiser step under ``amp=auto`` (benchmarks.common.seg_train_step)."""
    from benchmarks.common import seg_train_step

    return seg_train_step(net, opt, crit, x, y, ctx.device, "auto")


def _expect_precision(ck: dict, precision: str, channels_last: bool | None = None) -> None:
    got = ck.get("precision") or {}
    if got.get("precision") != precision:
        raise AssertionError(f"checkpoint precision {got!r}, expected {precision}")
    if channels_last is not None and got.get("channels_last") != channels_last:
        raise AssertionError(f"checkpoint channels_last {got!r}, expected {channels_last}")


# ---------------------------------------------------------------- the checks
def _nccl_version() -> str | None:
    import torch

    try:
        v = torch.cuda.nccl.version()
    except Exception:  # noqa: BLE001 - a build without NCCL: check_ddp_nccl reports it
        return None
    return ".".join(map(str, v)) if isinstance(v, tuple) else str(v)


def check_environment(ctx: Ctx) -> dict:
    import torch

    out = {"torch": torch.__version__, "cuda": torch.version.cuda, "device": str(ctx.device)}
    if ctx.cuda:
        p = torch.cuda.get_device_properties(ctx.device)
        out.update(name=p.name, memory_gib=round(p.total_memory / 2**30, 1),
                   capability=f"{p.major}.{p.minor}", bf16=torch.cuda.is_bf16_supported(),
                   cudnn=torch.backends.cudnn.version(), nccl=_nccl_version())
        x = torch.randn(256, 256, device=ctx.device)
        if not torch.allclose((x @ x).cpu(), x.cpu() @ x.cpu(), rtol=1e-2, atol=1e-2):
            raise AssertionError("a CUDA matmul disagrees with the CPU")
    from fuseseg.runtime import resolve_precision

    out["amp_auto"] = resolve_precision(ctx.device, "auto")
    return out


def check_fusion_bf16_channels_last(ctx: Ctx) -> dict:
    ck, rows, sec = _train_fusion(ctx, "fusion-bf16", amp="bf16", channels_last=True)
    _expect_precision(ck, "bf16", True)
    return {"seconds_train": round(sec, 1), "steps": ck["global_step"], "last_loss": float(rows[-1]["loss"]),
            "peak_gib": _peak_gib(ctx)}


def check_fusion_fp16_scaler(ctx: Ctx) -> dict:
    _need_cuda(ctx)
    from fuseseg.runtime import needs_grad_scaler

    if not needs_grad_scaler(ctx.device, "fp16"):
        raise AssertionError("amp=fp16 on CUDA does not ask for a GradScaler")
    ck, rows, sec = _train_fusion(ctx, "fusion-fp16", amp="fp16")
    _expect_precision(ck, "fp16", False)
    return {"seconds_train": round(sec, 1), "steps": ck["global_step"], "last_loss": float(rows[-1]["loss"]),
            "peak_gib": _peak_gib(ctx)}


def check_fusion_compile(ctx: Ctx) -> dict:
    _need_cuda(ctx)  # torch.compile on CPU works too, but takes minutes: not what this checks
    ck, rows, sec = _train_fusion(ctx, "fusion-compile", amp="auto", compile=True)
    return {"seconds_train_incl_compile": round(sec, 1), "steps": ck["global_step"],
            "last_loss": float(rows[-1]["loss"])}


def check_segmentation_bf16(ctx: Ctx) -> dict:
    ck, info, sec = _train_seg(ctx, "seg-bf16", amp="bf16")
    _expect_precision(ck, "bf16")
    if (info["eval_precision"] or {}).get("precision") != "bf16":
        raise AssertionError(f"evaluation precision {info['eval_precision']!r}")
    return {"seconds_train": round(sec, 1), "miou": round(info["miou"], 4), "peak_gib": _peak_gib(ctx)}


def check_segmentation_fp16_scaler(ctx: Ctx) -> dict:
    _need_cuda(ctx)
    ck, info, sec = _train_seg(ctx, "seg-fp16", amp="fp16")
    _expect_precision(ck, "fp16")
    scaler = info["last"].get("scaler")
    if not scaler or not scaler.get("scale", 0) > 0:
        raise AssertionError(f"fp16 training kept no GradScaler state: {scaler!r}")
    return {"seconds_train": round(sec, 1), "miou": round(info["miou"], 4), "loss_scale": float(scaler["scale"]),
            "peak_gib": _peak_gib(ctx)}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def check_ddp_nccl(ctx: Ctx) -> dict:
    """One-process DDP over NCCL: an all-reduce, then DDP-wrapped steps of both networks (the
    segmenter with its BatchNorms converted to SyncBatchNorm, as the trainer does on CUDA)."""
    _need_cuda(ctx)
    import torch
    import torch.distributed as dist

    from fuseseg.runtime import autocast
    from fusion.models.sspfusion import SSPFusion
    from fusion.train import _Losses
    from segmentation.losses import DiceCELoss
    from segmentation.model import build_model
    from segmentation.train import to_sync_batchnorm

    if not dist.is_available() or not dist.is_nccl_available():
        raise AssertionError("torch.distributed with NCCL is not available in this torch build")
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
    try:
        t = torch.full((4,), 3.0, device=ctx.device)
        dist.all_reduce(t)
        if not torch.equal(t.cpu(), torch.full((4,), 3.0)):
            raise AssertionError(f"all_reduce over 1 process changed the tensor: {t}")
        idx = [ctx.device.index or 0]
        # find_unused_parameters: this checks NCCL + DDP, not which SSPFusion switches leave
        # parameters unused (the trainer's ddp_find_unused setting is about that)
        fus = torch.nn.parallel.DistributedDataParallel(_Losses(SSPFusion().to(ctx.device)), device_ids=idx,
                                                        find_unused_parameters=True)
        opt = torch.optim.Adam(fus.parameters(), lr=1e-3)
        ir, vi = torch.rand(2, 1, 64, 64, device=ctx.device), torch.rand(2, 1, 64, 64, device=ctx.device)
        for _ in range(2):
            with autocast(ctx.device, "auto"):
                loss, _ = fus(ir, vi, "fusion")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        seg_model = to_sync_batchnorm(build_model(_seg_cfg(ctx).model_kwargs())).to(ctx.device)
        n_sync = sum(isinstance(m, torch.nn.SyncBatchNorm) for m in seg_model.modules())
        if n_sync == 0:
            raise AssertionError("no SyncBatchNorm layer after to_sync_batchnorm")
        seg = torch.nn.parallel.DistributedDataParallel(seg_model, device_ids=idx)
        sopt = torch.optim.SGD(seg.parameters(), lr=1e-3, momentum=0.9)
        x = torch.randn(4, 3, 64, 64, device=ctx.device)
        y = torch.randint(0, 9, (4, 64, 64), device=ctx.device)
        crit = DiceCELoss()
        for _ in range(2):
            sloss = _seg_step(ctx, seg, sopt, crit, x, y)
        if not (torch.isfinite(loss) and torch.isfinite(sloss)):
            raise AssertionError(f"non-finite DDP losses: fusion {loss}, segmentation {sloss}")
        return {"fusion_loss": round(float(loss), 4), "seg_loss": round(float(sloss), 4),
                "sync_batchnorm_layers": n_sync}
    finally:
        dist.destroy_process_group()


def check_torchrun_launcher(ctx: Ctx) -> dict:
    """``torchrun --nproc_per_node=1 -m pipelines.cli train-fusion``: the launcher path of
    ``fuseseg run --launcher torchrun``."""
    _need_cuda(ctx)
    import yaml

    from fusion.train import config_to_dict

    cfg_path = ctx.work / "torchrun.yaml"
    cfg_path.write_text(yaml.safe_dump(config_to_dict(_fusion_cfg(ctx, device="auto"))))
    out = ctx.work / "torchrun-out"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1",
           "-m", "pipelines.cli", "train-fusion", str(cfg_path), "--out", str(out)]
    res = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    if res.returncode != 0 or not (out / "final.pt").is_file():
        raise AssertionError(f"torchrun exited {res.returncode}: {res.stderr[-800:]}")
    return {"exit": res.returncode}


OOM_LIMIT_BYTES = 256 * 2**20


def _expect_oom(ctx: Ctx, fn: Callable[[], Any], key: str) -> str:
    """Run ``fn`` with this process's CUDA allocator capped at :data:`OOM_LIMIT_BYTES`; it must
    fail with fuseseg's one-line out-of-memory error naming ``key``."""
    import torch

    from fuseseg.errors import FusesegError

    torch.cuda.empty_cache()
    total = torch.cuda.get_device_properties(ctx.device).total_memory
    torch.cuda.set_per_process_memory_fraction(OOM_LIMIT_BYTES / total, ctx.device)
    try:
        fn()
    except FusesegError as exc:
        msg = str(exc)
        if "out of GPU memory" not in msg or key not in msg:
            raise AssertionError(f"the out-of-memory error does not name {key}: {msg}") from exc
        return msg
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, ctx.device)
        torch.cuda.empty_cache()
    raise AssertionError(f"no out-of-memory error with {OOM_LIMIT_BYTES >> 20} MiB of GPU memory (expected "
                         f"one naming {key})")


def check_oom_report(ctx: Ctx) -> dict:
    _need_cuda(ctx)
    from fusion.train import train_fusion
    from segmentation.train import train_segmenter

    data = ctx.dataset()
    seg = _seg_cfg(ctx, encoder="resnet50", decoder_channels=256, crop_size=512, batch_size=16,
                   frozen_batch_size=16, frozen_epochs=0, epochs=1, amp="off")
    seg_msg = _expect_oom(ctx, lambda: train_segmenter(
        data / "train" / "vi", data / "train" / "Segmentation_labels", seg, ctx.work / "oom-seg",
        progress=False), "segmentation.batch_size")
    fus_msg = _expect_oom(ctx, lambda: train_fusion(
        _fusion_cfg(ctx, batch_size=16, crop_size=None, amp="off", method_kwargs={"channels": [64, 128, 256, 512]}),
        ctx.work / "oom-fusion", progress=False), "fusion_train.batch_size")
    return {"segmentation": seg_msg[:120] + "...", "fusion": fus_msg[:120] + "..."}


def _paper_config() -> tuple[dict, dict, int]:
    from benchmarks.common import config_values

    seg = config_values("msrs", "segmentation", {"encoder": "resnet50", "crop_size": 480, "batch_size": 4,
                                                 "frozen_batch_size": 8, "decoder_channels": 256})
    import yaml

    path = REPO / "configs" / "msrs.yaml"
    doc = yaml.safe_load(path.read_text()) if path.is_file() else {}
    kwargs = next((m.get("kwargs") or {} for m in doc.get("fusion", []) if m.get("name") == "sspfusion"), {})
    return seg, kwargs, int(doc.get("fuse_batch_size", 8))


def check_paper_inference_and_memory(ctx: Ctx) -> dict:
    """configs/msrs.yaml on this GPU (amp=auto): SSPFusion fusing 480x640 pairs at the fuse batch,
    contiguous and channels-last; DeepLabV3+ evaluation at 480x640 (batch 1) and the peak memory
    of its worst training step (batch 8 frozen / batch 4 full at 480 crops)."""
    _need_cuda(ctx)
    import torch

    from fuseseg.runtime import autocast, to_memory_format
    from fusion.models.sspfusion import SSPFusion
    from segmentation.config import SegConfig
    from segmentation.evaluate import predict
    from segmentation.losses import DiceCELoss
    from segmentation.model import build_model, set_phase, train_mode
    from segmentation.train import build_optimizer

    seg, fkwargs, fuse_batch = _paper_config()
    out: dict[str, Any] = {}
    model = SSPFusion(**fkwargs).to(ctx.device).eval()
    ir = torch.rand(fuse_batch, 1, 480, 640, device=ctx.device)
    vi = torch.rand(fuse_batch, 3, 480, 640, device=ctx.device)
    outputs = {}
    for cl in (False, True):
        model = model.to(memory_format=torch.channels_last if cl else torch.contiguous_format)
        a, b = to_memory_format(ir, cl), to_memory_format(vi, cl)
        _reset_peak(ctx)

        def fuse(a=a, b=b, model=model):
            with torch.inference_mode(), autocast(ctx.device, "auto"):
                return model(a, b)

        tag = "channels_last" if cl else "contiguous"
        out[f"sspfusion_pairs_per_s_{tag}"] = round(_per_s(ctx, fuse, fuse_batch), 1)
        out[f"sspfusion_peak_gib_{tag}"] = _peak_gib(ctx)
        outputs[cl] = fuse().float()
    diff = float((outputs[True] - outputs[False]).abs().max())
    out["sspfusion_channels_last_max_diff"] = round(diff, 5)
    if diff > 0.1:
        raise AssertionError(f"channels-last SSPFusion output differs by {diff} from contiguous")

    cfg = SegConfig(encoder=seg["encoder"], decoder_channels=seg["decoder_channels"], crop_size=seg["crop_size"])
    net = build_model(cfg.model_kwargs()).to(ctx.device).eval()
    x = torch.randn(1, 3, 480, 640, device=ctx.device)
    _reset_peak(ctx)
    out["deeplab_eval_images_per_s"] = round(_per_s(ctx, lambda: predict(net, x, "auto"), 1), 1)
    out["deeplab_eval_peak_gib"] = _peak_gib(ctx)
    crit = DiceCELoss()
    for phase, batch in (("frozen", seg["frozen_batch_size"]), ("full", seg["batch_size"])):
        set_phase(net, phase)
        train_mode(net)
        opt = build_optimizer(net, cfg)
        xb = torch.randn(batch, 3, seg["crop_size"], seg["crop_size"], device=ctx.device)
        yb = torch.randint(0, 9, (batch, seg["crop_size"], seg["crop_size"]), device=ctx.device)

        def step(xb=xb, yb=yb, opt=opt):
            _seg_step(ctx, net, opt, crit, xb, yb)

        _reset_peak(ctx)
        out[f"deeplab_train_{phase}_b{batch}_images_per_s"] = round(_per_s(ctx, step, batch, repeats=3, warmup=1), 1)
        out[f"deeplab_train_{phase}_b{batch}_peak_gib"] = _peak_gib(ctx)
    return out


CHECKS: list[tuple[str, Callable[[Ctx], dict], str]] = [
    ("environment", check_environment, "CUDA device, versions, a matmul against the CPU"),
    ("fusion_bf16_channels_last", check_fusion_bf16_channels_last, "SSPFusion trainer, amp=bf16, channels-last"),
    ("fusion_fp16_gradscaler", check_fusion_fp16_scaler, "SSPFusion trainer, amp=fp16 with GradScaler"),
    ("fusion_torch_compile", check_fusion_compile, "SSPFusion trainer with compile=true"),
    ("segmentation_bf16", check_segmentation_bf16, "DeepLabV3+ trainer + evaluation, amp=bf16"),
    ("segmentation_fp16_gradscaler", check_segmentation_fp16_scaler, "DeepLabV3+ trainer, amp=fp16 with GradScaler"),
    ("ddp_nccl_1_process", check_ddp_nccl, "DDP over NCCL, 1 process, SyncBatchNorm"),
    ("torchrun_launcher", check_torchrun_launcher, "torchrun --nproc_per_node=1 train-fusion"),
    ("oom_report", check_oom_report, "out-of-memory errors name the batch-size key"),
    ("paper_config_inference_memory", check_paper_inference_and_memory,
     "msrs.yaml: fuse/eval throughput, peak memory"),
]


# ---------------------------------------------------------------- machinery
def run_checks(checks: list[tuple[str, Callable[[Any], dict], str]], ctx: Any, budget_s: float = BUDGET_S,
               clock: Callable[[], float] = time.perf_counter,
               progress: Callable[[str], None] | None = None) -> list[CheckResult]:
    """Run every check in order; a raised exception is a FAIL (the others still run), :class:`Skip`
    a SKIP; once ``budget_s`` is spent the remaining checks FAIL unrun."""
    results = []
    start = clock()
    for name, fn, _desc in checks:
        if clock() - start > budget_s:
            results.append(CheckResult(name, "FAIL", 0.0, error=f"not run: the {budget_s:.0f} s budget is spent"))
            continue
        if progress is not None:
            progress(name)
        t0 = clock()
        try:
            figs = fn(ctx) or {}
            results.append(CheckResult(name, "PASS", clock() - t0, dict(figs)))
        except Skip as exc:
            results.append(CheckResult(name, "SKIP", clock() - t0, error=str(exc)))
        except Exception as exc:  # noqa: BLE001 - a failing check is reported, the others still run
            results.append(CheckResult(name, "FAIL", clock() - t0, error=f"{type(exc).__name__}: {exc}"[:500],
                                       detail=traceback.format_exc()[-4000:]))
    return results


def _short(figs: dict, width: int = 90) -> str:
    text = ", ".join(f"{k}={v}" for k, v in figs.items())
    return text if len(text) <= width else text[: width - 3] + "..."


def results_table(results: list[CheckResult], title: str = "fuseseg GPU acceptance check"):
    from rich.table import Table

    t = Table(title=title)
    for col in ("check", "status", "seconds", "figures / error"):
        t.add_column(col, justify="right" if col == "seconds" else "left", overflow="fold")
    style = {"PASS": "green", "FAIL": "bold red", "SKIP": "yellow"}
    for r in results:
        t.add_row(r.name, f"[{style[r.status]}]{r.status}[/]", f"{r.seconds:.1f}",
                  r.error if r.status != "PASS" else _short(r.figures))
    return t


def exit_code(results: list[CheckResult], allow_cpu: bool = False) -> int:
    """0 when nothing failed (and, for an acceptance, nothing was skipped), else 1."""
    if any(r.status == "FAIL" for r in results):
        return 1
    if not allow_cpu and any(r.status == "SKIP" for r in results):
        return 1
    return 0


def make_record(results: list[CheckResult], device: dict, argv: list[str], wall_s: float) -> dict:
    return {"date": dt.datetime.now().isoformat(timespec="seconds"), "command": list(argv),
            "machine": machine_info(), "device": device, "versions": library_versions(),
            "wall_s": round(wall_s, 1), "budget_s": BUDGET_S,
            "passed": sum(r.status == "PASS" for r in results),
            "failed": sum(r.status == "FAIL" for r in results),
            "skipped": sum(r.status == "SKIP" for r in results),
            "checks": [asdict(r) for r in results]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu_check", description=__doc__.splitlines()[0])
    p.add_argument("--out", metavar="FILE", help="JSON path (default results/benchmarks/gpu-check-<date>.json)")
    p.add_argument("--only", metavar="NAMES", help="comma-separated subset of the checks (see --list)")
    p.add_argument("--list", action="store_true", help="list the checks and exit")
    p.add_argument("--device", default="cuda", help="CUDA device (default cuda, i.e. cuda:0)")
    p.add_argument("--allow-cpu", action="store_true",
                   help="without CUDA, run what can run on the CPU (developing this script; not an acceptance)")
    args = p.parse_args(argv)
    argv = list(sys.argv if argv is None else argv)
    if args.list:
        for name, _fn, desc in CHECKS:
            print(f"{name:32s} {desc}")
        return 0
    known = [c[0] for c in CHECKS]
    wanted = [n.strip() for n in (args.only or "").split(",") if n.strip()]
    bad = [n for n in wanted if n not in known]
    if bad:
        print(f"gpu_check: --only: unknown check(s) {', '.join(bad)}; valid: {', '.join(known)}", file=sys.stderr)
        return 2
    checks = [c for c in CHECKS if not wanted or c[0] in wanted]

    import torch

    cuda = torch.cuda.is_available()
    if not cuda and not args.allow_cpu:
        print("gpu_check: no CUDA device here (torch.cuda.is_available() is False); run it on a machine "
              "with an NVIDIA GPU and a CUDA build of torch (or pass --allow-cpu to try the CPU part).",
              file=sys.stderr)
        return 1
    try:
        device = torch.device(args.device) if cuda else torch.device("cpu")
        if device.type == "cuda":
            if device.index is None:
                device = torch.device("cuda", 0)
            torch.cuda.set_device(device)
    except (RuntimeError, ValueError) as exc:
        print(f"gpu_check: --device {args.device!r} is not usable here ({exc}); give e.g. cuda or cuda:0.",
              file=sys.stderr)
        return 2
    from rich.console import Console

    console = Console(stderr=True)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="fuseseg-gpu-check-") as tmp:
        ctx = Ctx(device=device, work=Path(tmp), cuda=device.type == "cuda")
        results = run_checks(checks, ctx, budget_s=BUDGET_S if ctx.cuda else float("inf"),
                             progress=lambda n: console.print(f"[cyan]> {n}[/]"))
    wall = time.perf_counter() - t0
    dev = {"type": device.type, "name": torch.cuda.get_device_name(device) if ctx.cuda else "cpu"}
    record = make_record(results, dev, argv, wall)
    Console(width=max(Console().width, 120)).print(results_table(
        results, f"fuseseg GPU acceptance check on {dev['name']}: {record['passed']} passed, "
                 f"{record['failed']} failed, {record['skipped']} skipped, {wall:.0f} s"))
    from fuseseg.data.io import atomic_write_text

    path = Path(args.out) if args.out else RESULTS / f"gpu-check-{dt.date.today().isoformat()}.json"
    atomic_write_text(path, json.dumps(record, indent=2, default=str) + "\n")
    print(f"written: {path}")
    return exit_code(results, args.allow_cpu)


if __name__ == "__main__":
    try:
        raise SystemExit(main())
    except KeyboardInterrupt:
        print("gpu_check: interrupted", file=sys.stderr)
        raise SystemExit(130) from None
