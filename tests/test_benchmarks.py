"""The benchmark aggregator's pure helpers (no timing assertions: speed is what benchmarks report)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from benchmarks import common
from benchmarks.__main__ import NAMES, figures_of, parse_only, run_all
from benchmarks.bench_dataloading import verdict
from benchmarks.bench_e2e import config_path, parse_precisions, stage_summary
from benchmarks.bench_memory import extrapolate, saved_tensor_bytes


class FakeClock:
    """Each call returns the next value of ``ticks``."""

    def __init__(self, ticks):
        self.ticks = list(ticks)

    def __call__(self):
        return self.ticks.pop(0)


def test_timed_median_of_repeats_after_warmup_with_fake_clock():
    calls = []
    # 3 timed calls: durations 5, 1, 3 (clock read before and after each) -> median 3
    clock = FakeClock([0, 5, 10, 11, 20, 23])
    t = common.timed(lambda: calls.append(1), repeats=3, warmup=2, clock=clock)
    assert len(calls) == 5  # 2 warm-ups + 3 timed
    assert t.times == [5, 1, 3] and t.repeats == 3 and t.warmup == 2
    assert t.median == 3
    assert t.per_s(6) == pytest.approx(2.0)
    assert t.as_dict() == {"median_s": 3, "times_s": [5, 1, 3], "warmup": 2}
    # even number of repeats: mean of the two middle values
    t = common.timed(lambda: None, repeats=4, warmup=0, clock=FakeClock([0, 1, 0, 2, 0, 4, 0, 8]))
    assert t.median == 3
    with pytest.raises(ValueError, match="repeats must be >= 1"):
        common.timed(lambda: None, repeats=0)


def test_timed_cpu_device_does_not_synchronise(monkeypatch):
    seen = []
    monkeypatch.setattr(common, "synchronize", lambda d: seen.append(d))
    common.timed(lambda: None, repeats=2, warmup=0, device="cpu", clock=FakeClock([0, 1, 0, 1]))
    assert seen == ["cpu"] * 4  # before and after each timed call; a no-op for CPU
    assert not common._is_cuda("cpu") and common._is_cuda("cuda:0") and not common._is_cuda(None)


def test_record_has_expected_keys_and_round_trips(tmp_path):
    figs = [common.figure("s", "a", 1.23456789, "ms", "median"), common.figure("s", "b", 7, "img/s")]
    assert figs[0] == {"section": "s", "figure": "a", "value": 1.23457, "unit": "ms", "note": "median"}
    rec = common.make_record(figs, {"x": {"seconds": 1.0, "result": {"p": tmp_path}}}, quick=True,
                             command=["python", "-m", "benchmarks"])
    path = common.write_record(rec, tmp_path / "out" / "b.json")
    data = json.loads(path.read_text())
    assert set(data) == set(common.RECORD_KEYS)
    assert {"cpu_model", "cores", "memory_gib", "load_average"} <= set(data["machine"])
    assert data["device"]["type"] in ("cpu", "cuda") and "torch_threads" in data["device"]
    assert {"torch", "numpy", "opencv", "smp", "timm", "albumentations"} <= set(data["versions"])
    assert data["figures"] == figs and data["quick"] is True
    assert data["benchmarks"]["x"]["result"]["p"] == str(tmp_path)  # non-JSON values as strings
    with pytest.raises(ValueError, match="make_record"):
        common.write_record({"figures": []}, tmp_path / "bad.json")
    assert common.default_record_path(__import__("datetime").date(2026, 1, 2)).name == "2026-01-02.json"


def test_only_parsing_and_failure_is_reported_not_raised(monkeypatch):
    assert parse_only(None) == list(NAMES)
    assert parse_only("e2e, memory") == ["e2e", "memory"]
    with pytest.raises(SystemExit, match="unknown benchmark.*nope.*valid: metrics"):
        parse_only("metrics,nope")
    import benchmarks.bench_memory as bm

    monkeypatch.setattr(bm, "run", lambda quick: (_ for _ in ()).throw(RuntimeError("boom")))
    figs, raw = run_all(["memory"], quick=True)
    assert figs[0]["figure"] == "FAILED" and "boom" in figs[0]["value"]
    assert raw["memory"]["error"] == "RuntimeError: boom"


def test_old_module_adapter_maps_results_to_figures():
    r = {"seconds_for_1000": 11.4, "size": [240, 320], "render_ms_median": 3.0,
         "make_synthetic": {"2": {"pairs_per_s": 90.0, "pairs": 200}}}
    by = {f["figure"]: f for f in figures_of("synthetic", object(), r)}
    assert by["1000 pairs with all cores"]["value"] == 11.4
    assert by["make_synthetic, 2 worker(s)"]["unit"] == "pairs/s"


def test_gflops_figures_sit_next_to_both_matmul_rates():
    rates = {"fp32": 300.0, "bf16": 1800.0}
    figs = common.gflops_figures("s", "net", 90.0, rates)
    assert [f["figure"] for f in figs] == ["net", "  net / fp32 matmul", "  net / bf16 matmul"]
    assert figs[1]["value"] == pytest.approx(0.3) and figs[2]["value"] == pytest.approx(0.05)
    assert "fp32 matmul 300" in figs[0]["note"] and "bf16 matmul 1800" in figs[0]["note"]
    assert [f["value"] for f in common.rate_figures("s", rates)] == [300.0, 1800.0]


def test_matmul_rates_time_a_slow_precision_fewer_times():
    """A precision whose first call overruns the budget (bf16 emulated: ~60 s per 2048^2 matmul)
    gets 1 timed call after it instead of 2 warm-ups + 5; rates are 2 n^3 / median seconds."""
    durations = [0.1] * 6 + [60.0] * 2          # fp32: first + 5 timed; bf16: first + 1 timed
    ticks, now = [], [0.0]

    def clock():                                 # t0, t1 pairs: each pair lasts the next duration
        if len(ticks) % 2 == 1:
            now[0] += durations[len(ticks) // 2]
        ticks.append(now[0])
        return now[0]

    rates = common.matmul_rates(n=64, repeats=5, budget_s=20.0, clock=clock)
    assert len(ticks) == 2 * len(durations)     # 6 fp32 calls timed, 2 bf16 calls timed
    assert rates["fp32"] == pytest.approx(2 * 64 ** 3 / 0.1 / 1e9)
    assert rates["bf16"] == pytest.approx(2 * 64 ** 3 / 60.0 / 1e9)


def _prec(amp):
    return {"precision": "fp32" if amp == "off" else "bf16", "channels_last": amp != "off"}


def test_sspfusion_and_segmentation_figures_show_both_precisions_and_rates():
    from benchmarks import bench_segmentation, bench_sspfusion

    rates = {"fp32": 300.0, "bf16": 1800.0}
    by_amp = {amp: {"amp": amp, **_prec(amp), "inference_ms_per_pair": ms, "best_batch": 2,
                    "best_pairs_per_s": 1000 / ms, "train_batch": 4, "train_images_per_s": ips,
                    "achieved_gflops_per_s": 33.7 / ms * 1e3}
              for amp, ms, ips in (("off", 250.0, 4.0), ("auto", 100.0, 10.0))}
    r = {"gflops_per_pair": 33.7, "train_crop": 256, "matmul_2048_gflops_per_s": rates, "by_amp": by_amp,
         "speedup_inference": 2.5, "speedup_training": 2.5, "baseline_ms_per_pair": 257.0,
         "inference_vs_baseline": 2.57, "bf16_vs_fp32_grey_levels": {"mean": 0.5, "max": 9.0}}
    by = {f["figure"]: f for f in bench_sspfusion.figures(r)}
    assert by["amp=off (fp32) inference 480x640, batch 1"]["value"] == 250.0
    assert by["amp=auto (bf16, channels-last) inference 480x640, batch 1"]["value"] == 100.0
    # 33.7 GFLOP in 0.1 s = 337 GFLOP/s = 337/1800 of the bf16 matmul
    ratio = by["  amp=auto (bf16, channels-last) achieved (batch 1 inference) / bf16 matmul"]["value"]
    assert ratio == pytest.approx(337 / 1800, rel=1e-4)
    assert by["fp32 matmul 2048x2048 (this run)"]["value"] == 300.0
    assert by["bf16 matmul 2048x2048 (this run)"]["value"] == 1800.0
    assert not any("compiled" in k for k in by)   # a record without the compiled measurement
    r["compiled"] = {"amp": "auto", "inference_ms_per_pair": 50.0, "compile_seconds": 14.0, "fell_back": None,
                     "achieved_gflops_per_s": 674.0, "vs_eager_grey_levels": {"mean": 0.1, "max": 1.0}}
    r["compiled_vs_baseline"] = 257.0 / 50.0
    by = {f["figure"]: f for f in bench_sspfusion.figures(r)}
    tag = "amp=auto compiled (fuse_compile: true)"
    assert by[f"{tag} inference 480x640, batch 1"]["value"] == 50.0
    assert by[f"{tag} compiling (first call)"]["value"] == 14.0
    assert by[f"  {tag} achieved / bf16 matmul"]["value"] == pytest.approx(674 / 1800, rel=1e-4)
    assert by["compiled inference vs issue #13 baseline (257 ms)"]["value"] == pytest.approx(5.14)
    r["compiled"]["fell_back"] = "no compiler"
    assert "FELL BACK" in {f["figure"]: f for f in bench_sspfusion.figures(r)}[f"{tag} inference 480x640, batch 1"]["note"]

    row = {"encoder": "e", "role": "reference 192^2 b8", "train_crop": 192, "train_batch": 8,
           "frozen_batch": 16, "train_full_images_per_s": 52.0, "train_gflops_per_s": 180.0,
           "train_frozen_images_per_s": None, "infer_480x640_images_per_s": None}
    seg = {"matmul_2048_gflops_per_s": rates, "reference_speedup": 2.5, "reference_vs_baseline": 2.5,
           "baseline_images_per_s": 20.8,
           "encoders": [{**row, "amp": a, **_prec(a)} for a in ("off", "auto")]}
    figs = bench_segmentation.figures(seg)
    names = [f["figure"] for f in figs]
    assert "  e (reference 192^2 b8) amp=auto (bf16) train achieved / bf16 matmul" in names
    assert "  e (reference 192^2 b8) amp=off (fp32) train achieved / fp32 matmul" in names
    assert names[:2] == ["fp32 matmul 2048x2048 (this run)", "bf16 matmul 2048x2048 (this run)"]


def test_loading_verdict_share():
    # train 10/s, load 90/s: per sample 1/90 + 1/10 s, loading share (1/90)/(1/90+1/10) = 10/100
    v = verdict(90.0, 10.0)
    assert v["loading_share"] == pytest.approx(0.1) and not v["bottleneck"]
    assert verdict(10.0, 10.0) == {"loading_share": 0.5, "bottleneck": True}


def test_stage_summary_sums_kinds(tmp_path):
    st = tmp_path / "stages"
    st.mkdir()
    for key, sec, t in (("data", 2.0, "01"), ("segment/ir/seed0", 3.0, "02"), ("segment/vi/seed0", 4.5, "03")):
        (st / f"{key.replace('/', '__')}.json").write_text(json.dumps(
            {"key": key, "seconds": sec, "peak_rss_mib": 100.0, "finished": f"2026-01-01T00:00:{t}"}))
    recs, kinds = stage_summary(tmp_path)
    assert [r["key"] for r in recs] == ["data", "segment/ir/seed0", "segment/vi/seed0"]
    assert kinds == {"data": 2.0, "segment": 7.5}


def test_saved_tensor_count_matches_hand_count():
    import torch

    assert extrapolate(10, 14, 8, b1=1, b2=2) == 38  # 10 + 7 * 4
    assert extrapolate(10, 18, 8) == 34  # batch 2 -> 10, batch 4 -> 18: 4 per sample
    w = torch.nn.Parameter(torch.ones(4, 3))
    x = torch.ones(5, 4, requires_grad=True)

    def step():
        h = x @ w             # saves x (5x4 float32 = 80 B) and w (a parameter: excluded)
        return (h * h).sum()  # mul saves h twice (one storage, 5x3x4 = 60 B)

    assert saved_tensor_bytes(step, [w]) == 80 + 60


def test_e2e_precision_runs_are_parsed_in_order_and_unknown_names_refused():
    assert parse_precisions("default,fp32") == ("default", "fp32")
    assert parse_precisions(" fp32 , auto,fp32") == ("fp32", "auto")
    with pytest.raises(ValueError, match="unknown bf32.*choose from default, fp32, auto"):
        parse_precisions("default,bf32")
    with pytest.raises(ValueError, match="nothing given"):
        parse_precisions(" , ")


def test_e2e_config_by_name_or_path_and_unknown_names_listed(tmp_path):
    assert config_path("table4") == common.REPO / "configs" / "table4.yaml"
    own = tmp_path / "mine.yaml"
    own.write_text("name: mine\n")
    assert config_path(str(own)) == own.resolve()
    with pytest.raises(FileNotFoundError, match=r"--config tabel4: .*'table4'"):
        config_path("tabel4")


def test_e2e_reports_every_stage_at_both_precisions():
    from benchmarks.bench_e2e import figures

    def one(name, scale, overrides):
        stages = [{"key": "train_fusion/sspfusion", "seconds": 100.0 * scale, "peak_rss_mib": 900.0},
                  {"key": "segment/ir/seed0", "seconds": 60.0 * scale, "peak_rss_mib": 1200.0}]
        return {"quick": False, "wall_s": 200.0 * scale, "cpu_user_s": 1.0, "cpu_sys_s": 0.0,
                "max_process_rss_mib": 1200.0, "peak_tree_rss_mib": 1300.0, "overrides": overrides,
                "seconds_by_kind": {"train_fusion": 100.0 * scale, "segment": 60.0 * scale}, "stages": stages}

    runs = {"default": one("default", 1.0, []), "fp32": one("fp32", 2.0, ["fusion_train.amp=off"]),
            "auto": one("auto", 1.0, ["fusion_train.amp=auto"])}
    rates = {"before": {"fp32": 300.0, "bf16": 1900.0}, "after": {"fp32": 250.0, "bf16": 1700.0}}
    by = {f["figure"]: f for f in figures({**runs["default"], "by_precision": runs,
                                           "matmul_2048_gflops_per_s": rates})}
    assert by["fp32 matmul 2048x2048 (this run), before the runs"]["value"] == 300.0
    assert by["bf16 matmul 2048x2048 (this run), after the runs"]["value"] == 1700.0
    assert by["train_fusion/sspfusion [fp32]"]["value"] == 200.0
    assert by["train_fusion/sspfusion [auto]"]["value"] == 100.0
    assert by["segment/ir/seed0 [fp32]"]["value"] == 120.0 and by["[fp32] wall time"]["value"] == 400.0
    assert by["[default] wall time"]["note"] == "config as is"


def test_figures_table_keeps_brackets_in_names():
    """Figure names are plain text: rich would read "[fp32]" as a style tag and drop it."""
    from rich.console import Console

    figs = [common.figure("e2e", "[fp32] wall time", 571.0, "s"), common.figure("e2e", "[default] wall time", 435.0, "s")]
    con = Console(width=120, record=True)
    con.print(common.figures_table(figs))
    text = con.export_text()
    assert "[fp32] wall time" in text and "[default] wall time" in text and "571" in text


def test_contention_helpers(monkeypatch):
    from benchmarks.bench_contention import child_env, figures, split_steps

    assert split_steps(7, 3) == [3, 2, 2] and split_steps(2, 5) == [1, 1] and split_steps(4, 1) == [4]
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    env = child_env()   # each loop's mode chooses its threads: no inherited OMP_NUM_THREADS
    assert "OMP_NUM_THREADS" not in env and env["PYTHONPATH"].split(":")[0] == str(common.REPO)
    loop = {"images_per_s": 10.0, "last_epoch_images_per_s": 9.0, "threads_per_epoch": [2]}
    r = {"matmul_n": 256, "matmul_gflops_per_s": {"fp32": 100.0, "bf16": 50.0},
         "scenarios": {"default x1": [{**loop, "images_per_s": 60.0}], "default x2": [loop, {**loop, "images_per_s": 5.0}],
                       "policy x1": [{**loop, "images_per_s": 60.0}], "policy x2": [{**loop, "images_per_s": 45.0}] * 2},
         "load_average_before": (0.5, 0, 0), "load_average_after": (2.0, 0, 0)}
    rows = {f["figure"]: f["value"] for f in figures(r)}
    assert rows["default: 2 loops together / 1 alone"] == 0.25    # (10 + 5) / 60
    assert rows["policy: 2 loops together / 1 alone"] == 1.5      # (45 + 45) / 60
    assert rows["fp32 matmul 256x256 (this run)"] == 100.0 and rows["load average before / after"] == "0.50 / 2.00"


@pytest.mark.skipif(not Path("/proc/self/smaps_rollup").is_file(), reason="needs Linux /proc smaps_rollup")
def test_tree_pss_counts_pages_shared_by_a_forked_child_once():
    """Parent touches 200 MiB, forks: the child shares those pages (copy-on-write). Summed RSS
    counts them twice, summed PSS once (each process 1/2)."""
    body = ("import os, sys, time, numpy as np\n"
            "from benchmarks.bench_e2e import tree_pss_mib, tree_rss_mib\n"
            "a = np.ones(200 * 2**20 // 8)\n"
            "pid = os.fork()\n"
            "if pid == 0:\n"
            "    time.sleep(30); os._exit(0)\n"
            "time.sleep(1.0)\n"
            "print(tree_rss_mib(os.getpid()), tree_pss_mib(os.getpid()))\n"
            "os.kill(pid, 9)\n")
    r = subprocess.run([sys.executable, "-c", body], cwd=common.REPO, capture_output=True, text=True, timeout=60,
                       env={**os.environ, "PYTHONPATH": str(common.REPO)})
    assert r.returncode == 0, r.stderr[-2000:]
    rss, pss = map(float, r.stdout.split())
    assert rss > 400                      # the 200 MiB counted in both processes
    assert rss - pss > 180                # ... and once in the PSS sum
    assert pss > 200                      # the array itself is still counted


def test_sharpen_oracle_blur_matches_opencv_and_sharpening_is_exact():
    """benchmarks.sharpen_oracle: its Gaussian blur equals OpenCV's (5x5, sigma 1, reflect-101);
    the unsharp probe is M + k (M - blur M) clipped; a flat image is left unchanged."""
    import cv2

    from benchmarks.sharpen_oracle import SharpenedMax
    from fusion.structure import gaussian_blur

    rng = np.random.default_rng(0)
    img = rng.random((23, 31)).astype(np.float32)
    want = cv2.GaussianBlur(img.astype(np.float64), (5, 5), 1.0, borderType=cv2.BORDER_REFLECT_101)
    got = gaussian_blur(torch.from_numpy(img)[None, None])[0, 0].double().numpy()
    np.testing.assert_allclose(got, want, atol=1e-6)
    two = gaussian_blur(torch.from_numpy(np.stack([img, img[::-1].copy()]))[None])[0].double().numpy()
    np.testing.assert_allclose(two[1], cv2.GaussianBlur(img[::-1].astype(np.float64), (5, 5), 1.0,
                                                        borderType=cv2.BORDER_REFLECT_101), atol=1e-6)
    ir = torch.from_numpy(rng.random((1, 1, 23, 31)).astype(np.float32))
    vi = torch.from_numpy(rng.random((1, 1, 23, 31)).astype(np.float32))
    m = np.maximum(ir.numpy(), vi.numpy())[0, 0].astype(np.float64)
    blur_m = cv2.GaussianBlur(m, (5, 5), 1.0, borderType=cv2.BORDER_REFLECT_101)
    out = SharpenedMax("unsharp", 0.3).fuse_y(ir, vi)[0, 0].double().numpy()
    np.testing.assert_allclose(out, np.clip(m + 0.3 * (m - blur_m), 0, 1), atol=1e-6)
    flat = torch.full((1, 1, 9, 9), 0.4)
    assert torch.allclose(SharpenedMax("weak-hp", 1.0).fuse_y(flat, flat), flat)
    with pytest.raises(ValueError, match="unsharp or weak-hp"):
        SharpenedMax("blur", 1.0)


def test_lfus_optimum_lowers_the_loss_from_the_max_and_highpass_form_keeps_local_means():
    """benchmarks.lfus_optimum: Adam on the fused image lowers L_fus below the max's (recomputed
    here); the high-pass form's correction F - M has little coarse content (a sigma-3 blur keeps
    a small share of it), the free form's keeps more."""
    from benchmarks.lfus_optimum import VARIANTS, LossOptimum
    from fusion.losses import fusion_loss
    from fusion.structure import gaussian_blur

    rng = np.random.default_rng(5)
    base = torch.from_numpy(cv_smooth(rng.random((40, 48)))).float()[None, None]
    ir, vi = (0.2 + 0.5 * base).clamp(0, 1), (0.6 - 0.4 * base.flip(-1)).clamp(0, 1)
    m = torch.maximum(ir, vi)
    corrections = {}
    for form in ("free", "highpass"):
        probe = LossOptimum(form, (1.0, 1.0, 1.0), steps=40, lr=0.003)
        fused = probe.fuse_y(ir, vi)
        lmax, lopt = probe.losses[0]
        assert lmax == pytest.approx(float(fusion_loss(m, ir, vi)[0]), rel=1e-6)
        assert lopt == pytest.approx(float(fusion_loss(fused, ir, vi)[0]), rel=1e-6)
        assert lopt < lmax - 1e-3
        corrections[form] = fused - m
    inner = (slice(None), slice(None), slice(10, -10), slice(10, -10))
    mean_of = {f: float(gaussian_blur(c, 3.0, 9)[inner].abs().mean() / c[inner].abs().mean())
               for f, c in corrections.items()}
    assert mean_of["highpass"] < 0.5 * mean_of["free"], mean_of
    with pytest.raises(ValueError, match="free or highpass"):
        LossOptimum("lowpass", (1, 1, 1), 1, 0.01)
    assert set(VARIANTS) >= {"paper", "hp-paper"}


def cv_smooth(a: np.ndarray) -> np.ndarray:
    import cv2

    return cv2.GaussianBlur(a, (0, 0), 3.0)
