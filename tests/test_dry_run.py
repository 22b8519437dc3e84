"""What `--dry-run` says about a stage: named fingerprints and the record's inputs."""
from __future__ import annotations

import json

from pipelines.runstate import explain_stage, fingerprint, mark_stage_done, named_fingerprint


def test_named_fingerprint_keeps_the_positional_value():
    # records written before named fingerprints existed stay current (no stage is redone)
    cfg = {"lr": 0.1, "epochs": 3, "sub": {"a": 1}}
    fp = named_fingerprint("train", data="abc", fusion_train=cfg, precision="fp32")
    assert fp == fingerprint("train", "abc", cfg, "fp32")
    assert set(fp.parts) == {"data", "fusion_train.lr", "fusion_train.epochs", "fusion_train.sub.a", "precision"}
    assert fp.parts["fusion_train.lr"] == fingerprint(0.1)


def test_explain_names_what_changed(tmp_path):
    old = named_fingerprint("train", data="abc", fusion_train={"lr": 0.1, "epochs": 3})
    assert explain_stage(tmp_path, "train_fusion/x", old) == (False, "never run here")
    mark_stage_done(tmp_path, "train_fusion/x", old, 1.0)
    assert json.loads((tmp_path / "stages" / "train_fusion__x.json").read_text())["inputs"] == old.parts
    assert explain_stage(tmp_path, "train_fusion/x", old) == (True, "up to date")
    new = named_fingerprint("train", data="abd", fusion_train={"lr": 0.2, "epochs": 3})
    assert explain_stage(tmp_path, "train_fusion/x", new) == (False, "changed: data, fusion_train.lr")
    # a record of an older fuseseg names no inputs: said so, not guessed
    mark_stage_done(tmp_path, "train_fusion/x", fingerprint("train", "abc"), 1.0)
    assert explain_stage(tmp_path, "train_fusion/x", new)[1].endswith("(the record names no inputs)")
    rec = json.loads((tmp_path / "stages" / "train_fusion__x.json").read_text())
    (tmp_path / "stages" / "train_fusion__x.json").write_text(json.dumps({**rec, "status": "submitted"}))
    assert explain_stage(tmp_path, "train_fusion/x", new) == (False, "last run did not finish (status 'submitted')")
