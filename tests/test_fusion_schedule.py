"""Per-phase epochs of the fusion trainer (``fusion_train.phase_epochs``): the schedule it trains,
its record in checkpoints and config.yaml, resumption, and the errors of a bad setting, with the
tiny model of fusion_tiny.py (phases "structure", "fusion") and the peers' phase names."""
from __future__ import annotations

import csv
from pathlib import Path

import fusion_tiny
import pytest
import torch
import yaml

from fuseseg import runtime
from fuseseg.errors import ConfigError
from fusion.train import FusionTrainConfig, train_fusion
from fusion.train_config import phase_schedule

pytestmark = pytest.mark.usefixtures("one_torch_thread", "tiny_knobs")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("pairs")
    fusion_tiny.make_pairs(root, n=8, size=(40, 48))
    return root


make_cfg = fusion_tiny.train_config


def rows(out: Path) -> list[tuple[str, str, str]]:
    with open(out / "log.csv") as f:
        return [(r["phase"], r["epoch"], r["global_step"]) for r in csv.DictReader(f)]


def test_phase_epochs_override_the_structure_and_epochs_rule(data, tmp_path):
    # 8 pairs, batch 4: 2 steps per epoch; structure_epochs=3 and epochs=5 are overridden per phase
    cfg = make_cfg(data, structure_epochs=3, epochs=5, phase_epochs={"structure": 2, "fusion": 1})
    train_fusion(cfg, tmp_path, progress=False)
    assert rows(tmp_path) == [("structure", "1", "2"), ("structure", "2", "4"), ("fusion", "1", "6")]
    for name in ("final.pt", "last.pt"):
        ck = torch.load(tmp_path / name, map_location="cpu", weights_only=True)
        assert ck["schedule"] == [["structure", 2], ["fusion", 1]], name
        assert ck["config"]["phase_epochs"] == {"structure": 2, "fusion": 1}
    assert yaml.safe_load((tmp_path / "config.yaml").read_text())["phase_epochs"] == {"structure": 2, "fusion": 1}


def test_a_phase_left_out_keeps_the_rule_and_zero_skips_a_phase(data, tmp_path):
    cfg = make_cfg(data, structure_epochs=0, epochs=0, phase_epochs={"fusion": 1})  # accepted: fusion x1
    train_fusion(cfg, tmp_path / "a", progress=False)
    assert rows(tmp_path / "a") == [("fusion", "1", "2")]
    train_fusion(make_cfg(data, structure_epochs=1, epochs=4, phase_epochs={"fusion": 0}), tmp_path / "b",
                 progress=False)
    assert rows(tmp_path / "b") == [("structure", "1", "2")]


def test_unknown_phase_name_lists_the_methods_phases_before_training(data, tmp_path):
    cfg = make_cfg(data, phase_epochs={"autoencoder": 4})
    with pytest.raises(ConfigError) as e:
        train_fusion(cfg, tmp_path, progress=False)
    msg = str(e.value)
    assert "fusion_train.phase_epochs" in msg and "'autoencoder'" in msg
    assert "its phases are: structure, fusion" in msg and "\n" not in msg
    assert not (tmp_path / "last.pt").exists() and not (tmp_path / "log.csv").exists()


def test_resume_refuses_a_changed_phase_epochs(data, tmp_path):
    train_fusion(make_cfg(data, phase_epochs={"fusion": 1}), tmp_path, progress=False)
    ck = torch.load(tmp_path / "last.pt", map_location="cpu", weights_only=False)
    ck["complete"] = False
    runtime.save_checkpoint(tmp_path / "last.pt", ck)
    with pytest.raises(ConfigError, match=r"phase_epochs: \{'fusion': 1\} -> \{'fusion': 2\}"):
        train_fusion(make_cfg(data, phase_epochs={"fusion": 2}), tmp_path, resume=True, progress=False)


def test_schedule_of_the_peers_phase_names():
    assert phase_schedule("rfn_nest", ("autoencoder", "fusion"), 50, 300, {"autoencoder": 4, "fusion": 6}) \
        == [("autoencoder", 4), ("fusion", 6)]
    assert phase_schedule("rfn_nest", ("autoencoder", "fusion"), 50, 7, {"fusion": 2}) \
        == [("autoencoder", 7), ("fusion", 2)]
    assert phase_schedule("sspfusion", ("structure", "fusion"), 5, 7) == [("structure", 5), ("fusion", 7)]
    with pytest.raises(ConfigError, match=r"'fusoin'.*'didfuse'.*its phases are: autoencoder\."):
        phase_schedule("didfuse", ("autoencoder",), 1, 1, {"fusoin": 3})
    with pytest.raises(ConfigError, match=r"trains nothing \(autoencoder x0\)"):
        phase_schedule("didfuse", ("autoencoder",), 5, 5, {"autoencoder": 0})


@pytest.mark.parametrize("value,words", [({"fusion": -1}, ["phase_epochs", "integers >= 0"]),
                                         ({"fusion": "many"}, ["phase_epochs.fusion", "integer"]),
                                         ("fusion", ["phase_epochs", "mapping"])])
def test_bad_phase_epochs_values_are_config_errors_naming_the_key(tmp_path, value, words):
    from pipelines.commands.fusion import load_train_config

    path = tmp_path / "t.yaml"
    path.write_text(yaml.safe_dump({"method": "rfn_nest", "synthetic_pairs": 2, "phase_epochs": value}))
    with pytest.raises(ConfigError) as e:
        load_train_config(path, [])
    for w in words:
        assert w in str(e.value), str(e.value)


def test_yaml_and_overrides_reach_the_config(tmp_path):
    from pipelines.commands.fusion import load_train_config

    path = tmp_path / "t.yaml"
    path.write_text("method: rfn_nest\nsynthetic_pairs: 2\nphase_epochs: {autoencoder: 4, fusion: 6}\n")
    cfg = load_train_config(path, ["phase_epochs.fusion=9"])
    assert cfg.phase_epochs == {"autoencoder": 4, "fusion": 9}
    assert cfg.schedule(("autoencoder", "fusion")) == [("autoencoder", 4), ("fusion", 9)]


def test_experiment_check_names_the_method_with_a_bad_phase_name():
    from pipelines.experiment import FusionMethodConfig
    from pipelines.stages.train_fusion import check_fusion_methods

    good = FusionMethodConfig(name="rfn", method="rfn_nest", kwargs={"widths": [4, 4, 4, 4]},
                              train={"phase_epochs": {"autoencoder": 1, "fusion": 1}})
    check_fusion_methods([good], FusionTrainConfig())
    bad = FusionMethodConfig(name="dd", method="didfuse", train={"phase_epochs": {"fusion": 1}})
    with pytest.raises(ConfigError, match=r"fusion\[dd\].*'fusion'.*its phases are: autoencoder"):
        check_fusion_methods([bad], FusionTrainConfig())


def test_report_protocol_line_states_the_methods_own_schedule():
    from pipelines.config import load_config
    from pipelines.experiment import ExperimentConfig
    from pipelines.stages.segment import protocol_of

    repo = Path(__file__).resolve().parents[1]
    cfg = load_config(ExperimentConfig, repo / "configs" / "default.yaml",
                      ["fusion=[{name: rfn, method: rfn_nest, train: {phase_epochs: {autoencoder: 4, fusion: 6}}}, "
                       "{name: dd, method: didfuse}]", "fusion_train.epochs=3", "device=cpu"])
    text = protocol_of(cfg)[1]
    assert "rfn trained from scratch here (4 autoencoder + 6 fusion epochs," in text
    assert "dd trained from scratch here (3 autoencoder epochs," in text


def test_runs_from_before_phase_epochs_stay_current_and_resumable(data, tmp_path):
    """A checkpoint whose config lacks phase_epochs (written before the key existed) resumes; the
    pipeline's training fingerprint leaves the key out while it is empty."""
    from pipelines.stages.train_fusion import train_inputs

    cfg = make_cfg(data, structure_epochs=1, epochs=2)
    assert "phase_epochs" not in train_inputs(cfg)
    assert train_inputs(make_cfg(data, phase_epochs={"fusion": 3}))["phase_epochs"] == {"fusion": 3}
    train_fusion(make_cfg(data, structure_epochs=1, epochs=1), tmp_path, progress=False)
    ck = torch.load(tmp_path / "last.pt", map_location="cpu", weights_only=False)
    del ck["config"]["phase_epochs"]
    ck["config"]["epochs"] = 2
    ck["complete"] = False
    runtime.save_checkpoint(tmp_path / "last.pt", ck)
    train_fusion(cfg, tmp_path, resume=True, progress=False)   # no "config differs" error
    assert rows(tmp_path)[-1] == ("fusion", "2", "6")
    with pytest.raises(ConfigError, match=r"phase_epochs: \{\} -> \{'fusion': 3\}"):
        ck["config"].pop("phase_epochs", None)
        runtime.save_checkpoint(tmp_path / "last.pt", ck)
        train_fusion(make_cfg(data, structure_epochs=1, epochs=2, phase_epochs={"fusion": 3}), tmp_path,
                     resume=True, progress=False)
