"""The GPU acceptance script's CPU-side logic (no GPU in CI): the no-CUDA exit, argument errors,
and the check/table/JSON machinery with injected checks."""
from __future__ import annotations

import json

import pytest
import torch

from benchmarks import gpu_check as gc


class Clock:
    """A fake clock advancing ``step`` seconds per call."""

    def __init__(self, step: float = 1.0):
        self.t, self.step = 0.0, step

    def __call__(self) -> float:
        self.t += self.step
        return self.t


def _ok(ctx):
    ctx.append("ok")
    return {"img_per_s": 12.5}


def _boom(ctx):
    ctx.append("boom")
    raise RuntimeError("CUDA error: device-side assert")


def _skip(ctx):
    raise gc.Skip("needs CUDA")


def test_no_cuda_exits_1_with_one_clear_line(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gc.main(["--out", str(tmp_path / "x.json")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no CUDA device here" in err[0] and "--allow-cpu" in err[0]
    assert not (tmp_path / "x.json").exists()


def test_usage_errors_exit_2_and_list_names_every_check(capsys):
    assert gc.main(["--only", "environment,nope"]) == 2
    assert "unknown check(s) nope; valid: environment" in capsys.readouterr().err
    assert gc.main(["--list"]) == 0
    listed = [line.split()[0] for line in capsys.readouterr().out.splitlines()]
    assert listed == [name for name, _, _ in gc.CHECKS]
    # the list: AMP bf16 and fp16 + GradScaler in both trainers, compile, DDP/NCCL, OOM, paper config
    for needed in ("fusion_bf16_channels_last", "fusion_fp16_gradscaler", "fusion_torch_compile",
                   "segmentation_bf16", "segmentation_fp16_gradscaler", "ddp_nccl_1_process", "oom_report",
                   "paper_config_inference_memory"):
        assert needed in listed


def test_run_checks_reports_failures_and_goes_on():
    seen: list[str] = []
    checks = [("a", _ok, ""), ("b", _boom, ""), ("c", _skip, ""), ("d", _ok, "")]
    res = gc.run_checks(checks, seen, clock=Clock(1.0))
    assert [r.status for r in res] == ["PASS", "FAIL", "SKIP", "PASS"]
    assert seen == ["ok", "boom", "ok"]  # d still ran after b failed
    assert res[0].figures == {"img_per_s": 12.5} and res[0].seconds == 1.0
    assert res[1].error == "RuntimeError: CUDA error: device-side assert" and "Traceback" in res[1].detail
    assert res[2].error == "needs CUDA"
    assert gc.exit_code(res) == 1
    assert gc.exit_code([r for r in res if r.status != "FAIL"]) == 1  # a skip is no acceptance
    assert gc.exit_code([r for r in res if r.status != "FAIL"], allow_cpu=True) == 0
    assert gc.exit_code([r for r in res if r.status == "PASS"]) == 0


def test_budget_spent_fails_the_remaining_checks_unrun():
    seen: list[str] = []
    res = gc.run_checks([("a", _ok, ""), ("b", _ok, ""), ("c", _ok, "")], seen, budget_s=2.5, clock=Clock(1.0))
    # clock: start 1; a: check 2 (elapsed 1), t0 3, end 4; b: check 5 (elapsed 4 > 2.5) -> unrun
    assert [r.status for r in res] == ["PASS", "FAIL", "FAIL"] and seen == ["ok"]
    assert "budget is spent" in res[1].error


def test_table_and_record_hold_every_result(tmp_path):
    from rich.console import Console

    res = gc.run_checks([("a", _ok, ""), ("b", _boom, "")], [], clock=Clock(0.5))
    console = Console(record=True, width=200)
    console.print(gc.results_table(res))
    text = console.export_text()
    assert "PASS" in text and "FAIL" in text and "img_per_s=12.5" in text and "device-side assert" in text
    rec = gc.make_record(res, {"type": "cuda", "name": "Test GPU"}, ["gpu_check"], 12.0)
    assert (rec["passed"], rec["failed"], rec["skipped"]) == (1, 1, 0)
    back = json.loads(json.dumps(rec, default=str))
    assert [c["name"] for c in back["checks"]] == ["a", "b"] and back["checks"][1]["status"] == "FAIL"
    assert back["device"]["name"] == "Test GPU" and back["budget_s"] == gc.BUDGET_S


def test_cuda_only_checks_skip_on_cpu(tmp_path):
    ctx = gc.Ctx(device=torch.device("cpu"), work=tmp_path, cuda=False)
    cuda_only = [c for c in gc.CHECKS if c[0] not in ("environment", "fusion_bf16_channels_last",
                                                      "segmentation_bf16")]
    res = gc.run_checks(cuda_only, ctx)
    assert {r.status for r in res} == {"SKIP"}, [(r.name, r.error) for r in res if r.status != "SKIP"]
    env = gc.check_environment(ctx)
    assert env["device"] == "cpu" and env["amp_auto"] in ("bf16", "fp32")


def test_paper_config_is_read_from_msrs_yaml():
    seg, fusion_kwargs, fuse_batch = gc._paper_config()
    assert seg["encoder"] == "resnet50" and seg["crop_size"] == 480
    assert (seg["batch_size"], seg["frozen_batch_size"]) == (4, 8)
    assert isinstance(fusion_kwargs, dict) and fuse_batch >= 1


@pytest.mark.slow
def test_allow_cpu_runs_the_cpu_part_end_to_end(tmp_path, one_torch_thread):
    """The checks that can run on a CPU really run (both trainers, evaluation, precision records)."""
    out = tmp_path / "gpu.json"
    rc = gc.main(["--allow-cpu", "--only", "environment,fusion_bf16_channels_last,segmentation_bf16,oom_report",
                  "--out", str(out)])
    rec = json.loads(out.read_text())
    status = {c["name"]: c["status"] for c in rec["checks"]}
    assert status == {"environment": "PASS", "fusion_bf16_channels_last": "PASS", "segmentation_bf16": "PASS",
                      "oom_report": "SKIP"}, rec["checks"]
    assert rc == 0
