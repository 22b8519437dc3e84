"""Segmentation trainer under DDP (2 gloo processes on CPU) and Ctrl-C (SIGINT) handling.

DDP: gradients are averaged (identical parameters on both ranks), only rank 0 writes files, and
2 processes sharing a global batch of 2b equal 1 process with batch 2b when the loss decomposes over the batch (see
``test_ddp_two_processes`` for why that needs BatchNorm/dropout in eval mode and CE only).
Ctrl-C: stop at the next step with the exact position in last.pt; resume == uninterrupted run.
"""
from __future__ import annotations

import copy
import csv
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.nn.modules.batchnorm import _BatchNorm

import segmentation.train as seg_train
from fuseseg.runtime import StopRequest, load_checkpoint, seed_everything
from segmentation.config import SegConfig
from segmentation.model import build_model

REPO = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent
TIMING = ("images_per_s", "seconds")
TINY = dict(encoder="tu-mobilenetv3_small_050", decoder_channels=16, crop_size=32, workers=0,
            device="cpu", lr=0.05, min_lr=0.0, epochs=2, frozen_epochs=1)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def write_scenes(root: Path, n: int, size: int = 40, seed: int = 0, ignore_row: bool = True):
    """``n`` RGB scenes of ``size`` x ``size``: noise plus rectangles of class k drawn brighter
    with k; labels 0..8 (top row 255 = ignore when ``ignore_row``)."""
    import cv2

    rng = np.random.default_rng(seed)
    (root / "img").mkdir(parents=True, exist_ok=True)
    (root / "lab").mkdir(parents=True, exist_ok=True)
    for i in range(n):
        img = rng.integers(0, 30, (size, size, 3)).astype(np.uint8)
        lab = np.zeros((size, size), np.uint8)
        for _ in range(3):
            k = int(rng.integers(1, 9))
            y0, x0 = (int(v) for v in rng.integers(0, size - 10, 2))
            img[y0:y0 + 12, x0:x0 + 12] = 25 * k + rng.integers(0, 20, 3)
            lab[y0:y0 + 12, x0:x0 + 12] = k
        if ignore_row:
            lab[0] = 255
        assert cv2.imwrite(str(root / "img" / f"s{i}.png"), img)
        assert cv2.imwrite(str(root / "lab" / f"s{i}.png"), lab)
    return str(root / "img"), str(root / "lab")


def all_eval(model: torch.nn.Module) -> None:
    """Replacement for segmentation.model.train_mode: every BatchNorm (and the ASPP dropout) in
    eval mode, so the forward pass of a batch is the concatenation of its samples' passes."""
    model.eval()


def _rows(path: Path) -> list[dict]:
    with path.open() as f:
        return [{k: v for k, v in r.items() if k not in TIMING} for r in csv.DictReader(f)]


# ---------------------------------------------------------------------- DDP
def ddp_worker(rank: int, world: int, port: int, data: tuple[str, str], cfgs: dict, out: str) -> None:
    """torch.multiprocessing.spawn target: run A (normal training) then run B (all BatchNorm in
    eval mode); record every file write and this rank's final model in ``out/ranks``."""
    os.environ.update({"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world),
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    torch.set_num_threads(1)
    import segmentation.train as st

    writes, models = [], []
    real_save, real_text, real_build = st.save_checkpoint, st.atomic_write_text, st.build_model

    def save(path, payload):
        writes.append(str(path))
        real_save(path, payload)

    def text(path, content):
        writes.append(str(path))
        real_text(path, content)

    def build(*args, **kwargs):
        models.append(real_build(*args, **kwargs))
        return models[-1]

    st.save_checkpoint, st.atomic_write_text, st.build_model = save, text, build
    ranks = Path(out) / "ranks"
    for name in ("a", "b"):
        val = {}
        if name == "b":  # B also validates (sharded over the ranks) on cfgs["val"]
            st.train_mode = all_eval
            val = {"val_images_dir": cfgs["val"][0], "val_labels_dir": cfgs["val"][1]}
        st.train_segmenter(*data, SegConfig(**cfgs[name]), Path(out) / name, progress=False, **val)
        torch.save(models[-1].state_dict(), ranks / f"{name}{rank}.pt")
    (ranks / f"writes{rank}.json").write_text(json.dumps(writes))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_two_processes(tmp_path, monkeypatch):
    if not torch.distributed.is_available():
        pytest.skip("torch.distributed is not available in this torch build")
    # 8 scenes of 40x40, crops 32x32 without rescaling: no padding, no ignored pixels
    data = write_scenes(tmp_path / "data", 8, ignore_row=False)
    # A: the real protocol (train-mode BatchNorm, Dice + CE), 2 steps per epoch on each rank
    cfg_a = dict(TINY, batch_size=4, frozen_batch_size=4, scale_range=(0.75, 1.25))  # global: 2 per rank
    # B: CE only (Dice is a ratio of sums over each process's batch, so Dice over 2 x b crops is
    # not the mean of two per-process Dice values) on crops without ignored pixels (CE is a mean
    # over each process's non-ignored pixels: equal counts make the mean of the two means the
    # global mean), with BatchNorm and dropout in eval mode (all_eval): on CPU/gloo BatchNorm
    # statistics are per process (PyTorch's SyncBatchNorm needs CUDA) and dropout masks are
    # drawn per process. Then DDP's averaged gradient is the one-process gradient on 2b crops,
    # up to float32 rounding (so fp32: bf16 rounds each process's half batch differently).
    cfg_b = dict(TINY, batch_size=4, frozen_batch_size=4, scale_range=(1.0, 1.0), dice_weight=0.0,
                 lr=0.3, val_every=2, amp="off")
    val = write_scenes(tmp_path / "val", 5, size=48, seed=7)   # odd: the ranks' shards differ in size
    out = tmp_path / "ddp"
    (out / "ranks").mkdir(parents=True)
    script = ("import torch.multiprocessing as mp, test_segmentation_ddp as t\n"
              f"mp.spawn(t.ddp_worker, args=(2, {_free_port()}, {data!r}, "
              f"{{'a': {cfg_a!r}, 'b': {cfg_b!r}, 'val': {val!r}}}, {str(out)!r}), nprocs=2)\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), str(REPO)])}
    res = subprocess.run([sys.executable, "-c", script], env=env, cwd=tmp_path, capture_output=True,
                         timeout=900)  # ~190 s on the shared 2-core machine under load
    assert res.returncode == 0, res.stderr.decode()[-3000:]
    ranks = out / "ranks"

    # only rank 0 wrote files, and those are the run's complete set
    writes = [json.loads((ranks / f"writes{r}.json").read_text()) for r in (0, 1)]
    assert writes[1] == []
    for name in ("a", "b"):
        assert {Path(p).name for p in writes[0] if Path(p).parent == out / name} == {
            "config.yaml", "log.csv", "last.pt", "final.pt"}
        assert sorted(p.name for p in (out / name).iterdir()) == [
            "config.yaml", "final.pt", "last.pt", "log.csv"]
    assert [r["steps"] for r in _rows(out / "a" / "log.csv")] == ["2", "2"]  # (8 // 2) // 2

    # A: gradients were averaged -> identical parameters on both ranks; BatchNorm running
    # statistics are per process on CPU (they differ), and the checkpoint holds rank 0's
    a0, a1 = torch.load(ranks / "a0.pt"), torch.load(ranks / "a1.pt")
    final_a = load_checkpoint(out / "a" / "final.pt")["state_dict"]
    params = {n for n, _ in build_model(SegConfig(**cfg_a).model_kwargs()).named_parameters()}
    seed_everything(0)
    init = build_model(SegConfig(**cfg_a).model_kwargs()).state_dict()
    for k in params:
        assert torch.equal(a0[k], a1[k]), k
    assert max((a0[k] - init[k]).abs().max().item() for k in params if k.startswith("encoder.")) > 1e-3
    for k in final_a:
        assert torch.equal(final_a[k], a0[k]), k
    stats = [k for k in a0 if k.endswith("running_mean") and not k.startswith("encoder.")]
    assert stats and any(not torch.equal(a0[k], a1[k]) for k in stats)

    # B: 2 processes sharing the global batch of 4 == 1 process with batch 4 after the same 4 steps
    # (2 frozen, 2 full): the same config means the same optimisation, whatever the process count
    monkeypatch.setattr(seg_train, "train_mode", all_eval)
    one = seg_train.train_segmenter(*data, SegConfig(**cfg_b),
                                    tmp_path / "one", progress=False)
    one_ck, ddp_ck = load_checkpoint(one), load_checkpoint(out / "b" / "final.pt")
    assert one_ck["global_step"] == ddp_ck["global_step"] == 4
    b0, b1 = torch.load(ranks / "b0.pt"), torch.load(ranks / "b1.pt")
    moved = {k: (one_ck["state_dict"][k] - init[k]).abs().max().item() for k in params}
    assert max(moved[k] for k in moved if k.startswith("encoder.")) > 1e-3  # trained in phase 2
    assert max(moved[k] for k in moved if k.startswith("decoder.")) > 1e-3
    for k, v in one_ck["state_dict"].items():
        torch.testing.assert_close(ddp_ck["state_dict"][k], v, rtol=0, atol=1e-5, msg=k)
        assert torch.equal(b0[k], b1[k]), k  # BN in eval: even the buffers agree across ranks
    # DDP validation (each rank scores its shard, the matrices are summed) == one process scoring
    # every validation image once with the final weights
    from segmentation.evaluate import evaluate_segmenter

    single = evaluate_segmenter(out / "b" / "final.pt", *val, device="cpu", amp="off")
    np.testing.assert_array_equal(np.asarray(ddp_ck["val_confusion"]), np.asarray(single.confusion))
    assert np.asarray(single.confusion).sum() == 5 * 48 * 48 - 5 * 48      # each image once (top rows ignored)
    # the logged CE per epoch (mean over all ranks' steps) agrees too
    for r1, r2 in zip(_rows(tmp_path / "one" / "log.csv"), _rows(out / "b" / "log.csv"), strict=True):
        assert float(r1["ce"]) == pytest.approx(float(r2["ce"]), abs=1e-5)


def test_to_sync_batchnorm_keeps_timm_activations_and_state():
    model = build_model(SegConfig(**TINY).model_kwargs())
    kinds = {type(m).__name__ for m in model.modules() if isinstance(m, _BatchNorm)}
    assert {"BatchNormAct2d", "BatchNorm2d"} <= kinds  # timm's fused BN+activation is present
    keys = list(model.state_dict())
    x = torch.randn(2, 3, 32, 32)
    original = copy.deepcopy(model)
    ref_eval = model.eval()(x)
    ids = {id(p) for p in model.parameters()}
    sync = seg_train.to_sync_batchnorm(model)
    bns = [m for m in sync.modules() if isinstance(m, _BatchNorm)]
    assert len(bns) > 40 and all(isinstance(m, torch.nn.SyncBatchNorm) for m in bns)
    assert list(sync.state_dict()) == keys and {id(p) for p in sync.parameters()} == ids
    # in eval mode, and in train mode without a process group, the synchronised layers compute
    # the same thing (torch.nn.SyncBatchNorm.convert_sync_batchnorm fails this: it replaces
    # BatchNormAct2d by a plain SyncBatchNorm, dropping the activation)
    assert torch.equal(sync.eval()(x), ref_eval)
    torch.manual_seed(1)  # same ASPP dropout mask
    ref_train = original.train()(x)
    torch.manual_seed(1)
    assert torch.equal(sync.train()(x), ref_train)


# ---------------------------------------------------------------------- Ctrl-C
SIG = dict(TINY, batch_size=2, frozen_batch_size=2, scale_range=(0.75, 1.25), val_every=1)


@pytest.fixture(scope="module")
def sig_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("sig")
    return write_scenes(root / "train", 6), write_scenes(root / "val", 2, size=48, seed=3)


def _train(sig_data, out: Path, **kw) -> Path:
    (img, lab), (vimg, vlab) = sig_data
    return seg_train.train_segmenter(img, lab, SegConfig(**SIG), out, progress=False,
                                     val_images_dir=vimg, val_labels_dir=vlab, **kw)


@pytest.fixture(scope="module")
def straight(sig_data, tmp_path_factory) -> Path:
    """The uninterrupted run: 2 epochs (frozen, full) x 3 steps."""
    return _train(sig_data, tmp_path_factory.mktemp("straight") / "run")


def _sigint_on_call(monkeypatch, calls: tuple[int, ...], signals: int = 1) -> None:
    """Send this process ``signals`` SIGINTs (a Ctrl-C) from inside the loss of the given steps."""

    class Interrupting(seg_train.DiceCELoss):
        n = 0

        def forward(self, logits, target):
            Interrupting.n += 1
            if Interrupting.n in calls:
                for _ in range(signals):
                    os.kill(os.getpid(), signal.SIGINT)
            return super().forward(logits, target)

    monkeypatch.setattr(seg_train, "DiceCELoss", Interrupting)


# call k = global step k; 3 steps per epoch: mid-frozen epoch, the last step of epoch 1 (stops at
# step 0 of epoch 2, after the switch to the full phase), mid-full epoch
@pytest.mark.parametrize("call,epoch,step,phase", [(2, 0, 2, "frozen"), (3, 1, 0, "full"),
                                                    (5, 1, 2, "full")])
def test_sigint_stops_at_next_step_and_resume_equals_uninterrupted(
        sig_data, straight, tmp_path, monkeypatch, capsys, call, epoch, step, phase):
    out = tmp_path / "run"
    before = signal.getsignal(signal.SIGINT)
    with monkeypatch.context() as mp:
        _sigint_on_call(mp, (call,))
        with pytest.raises(KeyboardInterrupt):
            _train(sig_data, out)
    assert signal.getsignal(signal.SIGINT) is before  # our handler was removed again
    err = " ".join(capsys.readouterr().err.split())
    (img, lab), (vimg, vlab) = sig_data
    assert f"interrupted: saved {out / 'last.pt'} at epoch {epoch + 1}/2, step {step}/3 done" in err
    assert (f"Resume with: fuseseg segment train --images {img} --labels {lab} --out {out} "
            f"--val-images {vimg} --val-labels {vlab} --resume") in err
    ck = load_checkpoint(out / "last.pt")
    assert (ck["epoch"], ck["step_in_epoch"], ck["global_step"], ck["phase"]) == (epoch, step, call, phase)
    assert ck["sampler"]["start_batch"] == step and ck["sampler"]["world"] == 1
    assert ck["scheduler"]["step"] == call and not (out / "final.pt").exists()
    assert (ck["epoch_acc"] is None) == (step == 0) or ck["epoch_acc"]["sums"][3] == step
    final = _train(sig_data, out, resume=True)
    a, b = load_checkpoint(final), load_checkpoint(straight)
    for k in b["state_dict"]:
        assert torch.equal(a["state_dict"][k], b["state_dict"][k]), k
    np.testing.assert_array_equal(a["val_confusion"], b["val_confusion"])
    assert _rows(out / "log.csv") == _rows(straight.parent / "log.csv")  # losses, lr, mIoU


def test_second_sigint_stops_at_once(sig_data, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    _sigint_on_call(monkeypatch, (4,), signals=2)  # step 1 of epoch 2: epoch 1 is in last.pt
    with pytest.raises(KeyboardInterrupt) as info:
        _train(sig_data, out)
    assert str(info.value) == ""  # raised by the handler, not by a saving stop
    assert "holds the last completed epoch. Resume with" in " ".join(capsys.readouterr().err.split())
    ck = load_checkpoint(out / "last.pt")
    assert (ck["epoch"], ck["step_in_epoch"], ck["global_step"]) == (1, 0, 3)


def test_stop_request_handler_and_agreement():
    stop = StopRequest()
    before = signal.getsignal(signal.SIGINT)
    with stop:
        assert signal.getsignal(signal.SIGINT) is stop
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.requested and stop.agreed(torch.device("cpu"), 1)
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is before
    assert not StopRequest().agreed(torch.device("cpu"), 1)
