"""The small commands: --version, list-methods, config show, run --dry-run; shipped configs."""
from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from fuseseg.errors import ConfigError
from pipelines.cli import main
from pipelines.config import load_config, to_dict
from pipelines.configdoc import field_docs
from pipelines.experiment import ExperimentConfig, resolve_config, shipped_configs_dir

REPO = Path(__file__).resolve().parents[1]


def cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO), COLUMNS="200")
    return subprocess.run([sys.executable, "-m", "pipelines.cli", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def tree(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*")}


def test_version(capsys):
    from importlib.metadata import version

    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out.startswith(f"fuseseg {version('fuseseg')} ")


def test_list_methods_builtin_and_plugin(tmp_path):
    (tmp_path / "my_methods.py").write_text(textwrap.dedent('''
        from fusion.base import LuminanceFusion
        from fusion.registry import register_method

        @register_method("halfhalf")
        class HalfHalf(LuminanceFusion):
            """Half infrared, half visible. A second sentence that is left out."""
            def fuse_y(self, ir, vi_y):
                return (ir + vi_y) / 2
    '''))
    r = cli("list-methods", "--plugins", "my_methods", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    lines = {ln.split("│")[1].strip(): [c.strip() for c in ln.split("│")[2:5]]
             for ln in r.stdout.splitlines() if ln.startswith("│") and ln.split("│")[1].strip()}
    assert lines["halfhalf"] == ["no", "Half infrared, half visible.", "plug-in (my_methods)"]
    assert lines["sspfusion"][0] == "yes" and lines["sspfusion"][2] == "built-in (fusion.models.sspfusion)"
    # "IEEE Trans." is no sentence end: the one-line description keeps the whole reference
    assert lines["gff"][1].endswith("2013).") and lines["mean"][0] == "no"


def test_config_show_round_trips_and_documents_every_key(tmp_path):
    r = cli("config", "show", "msrs", "segmentation.epochs=170", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    shown = yaml.safe_load(r.stdout)   # valid YAML: the documentation is in comments
    expected = to_dict(load_config(ExperimentConfig, shipped_configs_dir() / "msrs.yaml",
                                   ["segmentation.epochs=170"]))
    assert shown == expected and shown["segmentation"]["epochs"] == 170
    before_name = r.stdout.split("\nname: msrs-paper\n")[0].splitlines()[-1]
    assert before_name.startswith("# run folder: <results_dir>/<name>")   # the key's documentation
    # docstring entries ("name / other: text") document both keys, continuation lines included
    from segmentation.config import SegConfig

    d = field_docs(SegConfig)
    assert d["lr"] == d["min_lr"] and "cosine decay" in d["lr"]
    assert "nproc_per_node=K" in d["batch_size"]   # a continuation line joined in
    # every key of the shipped configs has its documentation: a comment line just above it
    for name in ("default", "msrs", "table4"):
        lines = cli("config", "show", name, cwd=tmp_path).stdout.splitlines()
        bare = [ln for i, ln in enumerate(lines) if re.match(r"^\s*(- )?\w+:", ln)
                and not lines[i - 1].lstrip().startswith("#")]
        assert bare == [], (name, bare)


def test_config_show_unknown_name_is_a_usage_error(tmp_path):
    r = cli("config", "show", "nosuch", cwd=tmp_path)
    listed = (r.stdout + r.stderr).split("shipped configs:")[-1]
    assert r.returncode == 2 and all(f" {name}" in listed for name in ("default", "msrs", "table4"))


def test_resolve_config_names_and_files(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert resolve_config(None) == shipped_configs_dir() / "default.yaml"
    assert resolve_config("msrs") == resolve_config("configs/msrs.yaml") == shipped_configs_dir() / "msrs.yaml"
    (tmp_path / "mine.yaml").write_text("name: mine\n")
    assert resolve_config("mine.yaml") == Path("mine.yaml")


def test_help_texts_point_at_nothing_that_ships_only_with_the_repository():
    import argparse

    from pipelines.cli import build_parser

    def parsers(p):
        yield p
        for action in p._actions:
            if isinstance(action, argparse._SubParsersAction):
                for sub in action.choices.values():
                    yield from parsers(sub)

    texts = {p.prog: p.format_help() for p in parsers(build_parser())}
    assert "fuseseg metrics" in texts and "fuseseg config show" in texts
    for prog, text in texts.items():
        for repo_only in ("../shared", "shared/docs", "tests/", "DEVELOPERS.md"):
            assert repo_only not in text, f"`{prog} --help` points at {repo_only}"


def test_amp_off_written_bare_in_yaml_or_on_the_command_line_means_off(tmp_path):
    """YAML 1.1 reads a bare ``off`` as False; for a choice that has "off" it means "off"
    (``fuseseg run segmentation.amp=off`` once failed with "False is not one of ...")."""
    from pipelines.config import load_config
    from pipelines.experiment import ExperimentConfig, default_config_path

    cfg = load_config(ExperimentConfig, default_config_path(), ["segmentation.amp=off", "fusion_train.amp=off"])
    assert cfg.segmentation.amp == "off" and cfg.fusion_train.amp == "off"
    path = tmp_path / "c.yaml"
    path.write_text("segmentation:\n  amp: off\n")
    assert load_config(ExperimentConfig, path).segmentation.amp == "off"
    path.write_text("segmentation:\n  amp: on\n")   # no "on" choice: still an error naming the choices
    with pytest.raises(ConfigError, match=r"segmentation.amp: True is not one of 'auto', 'off', 'bf16', 'fp16'"):
        load_config(ExperimentConfig, path)
