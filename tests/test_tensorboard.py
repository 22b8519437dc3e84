"""TensorBoard logging of the segmenter with validation: val_miou reaches the event file."""
from __future__ import annotations

import csv

import pytest

pytest.importorskip("tensorboard", reason="tensorboard is the optional `tensorboard` extra (also in dev)")


@pytest.mark.slow
def test_segmenter_logs_val_miou_and_losses(tmp_path, one_torch_thread):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from segmentation.config import SegConfig
    from segmentation.train import train_segmenter
    from tests.test_segmentation_train import make_scenes

    tr = make_scenes(tmp_path / "train", 4)
    te = make_scenes(tmp_path / "test", 2, seed=5)
    cfg = SegConfig(encoder="tu-mobilenetv3_small_050", decoder_channels=16, epochs=2, frozen_epochs=1,
                    batch_size=2, frozen_batch_size=2, crop_size=32, workers=0, val_every=1, device="cpu")
    final = train_segmenter(*tr, cfg, tmp_path / "out", progress=False, val_images_dir=te[0],
                            val_labels_dir=te[1], tensorboard=True)
    with (final.parent / "log.csv").open() as f:
        rows = list(csv.DictReader(f))
    acc = EventAccumulator(str(final.parent / "tensorboard"))
    acc.Reload()
    assert {"loss/total", "loss/ce", "loss/dice", "lr", "images_per_s", "val_miou"} <= set(acc.Tags()["scalars"])
    assert [(e.step, round(e.value, 5)) for e in acc.Scalars("val_miou")] == \
        [(int(r["epoch"]), round(float(r["val_miou"]), 5)) for r in rows]
    assert [e.step for e in acc.Scalars("lr")] == [1, 2]


def test_missing_package_is_a_one_line_error(monkeypatch, tmp_path):
    import builtins

    from fuseseg.errors import ConfigError
    from fuseseg.tblog import TrainingLog

    real = builtins.__import__

    def no_tensorboard(name, *a, **k):
        if name.startswith("torch.utils.tensorboard"):
            raise ImportError("No module named 'tensorboard'")
        return real(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_tensorboard)
    with pytest.raises(ConfigError, match="pip install tensorboard"):
        TrainingLog(tmp_path, enabled=True)
    TrainingLog(tmp_path, enabled=False).scalars(1, {"x": 1.0})   # disabled: a no-op, no import
    assert not (tmp_path / "tensorboard").exists()
