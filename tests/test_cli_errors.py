"""User mistakes end as one error line on stderr that names the file or key and the fix, never a
traceback: exit 2 for usage and config mistakes, 1 for the others (pipelines/cli.py's one
top-level handler). Each case here ended in a traceback, or was accepted, before."""
from __future__ import annotations

import errno
import os
import textwrap
from pathlib import Path

import pytest
import yaml

from pipelines.cli import main

PLUGINS = textwrap.dedent('''
    import torch
    from fusion.base import LuminanceFusion
    from fusion.registry import register_method

    @register_method("err_half_size")
    class HalfSize(torch.nn.Module):
        def forward(self, ir, vi):
            return vi[..., ::2, ::2]

    @register_method("err_bad_y")
    class BadY(LuminanceFusion):
        def fuse_y(self, ir, vi_y):
            return ir[..., :-1]

    @register_method("err_nan")
    class NaNs(torch.nn.Module):
        def forward(self, ir, vi):
            return vi * float("nan")

    @register_method("err_oom")
    class NoMemory(torch.nn.Module):
        def forward(self, ir, vi):
            raise MemoryError("cannot allocate 3.2 GiB")

    @register_method("err_bug")
    class Bug(torch.nn.Module):
        def forward(self, ir, vi):
            return {}["missing"]

    @register_method("err_255")
    class Scale255(torch.nn.Module):
        def forward(self, ir, vi):
            return vi.double() * 255.0

    @register_method("err_uint8")
    class Uint8(torch.nn.Module):
        def forward(self, ir, vi):
            return (vi * 255).to(torch.uint8)

    @register_method("err_exit")
    class Exits(torch.nn.Module):
        def forward(self, ir, vi):
            import sys
            sys.exit(3)
''')


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    from fuseseg.data.synthetic import make_synthetic

    ws = tmp_path_factory.mktemp("clierr")
    make_synthetic(ws / "data", 2, 2, size=(48, 64), seed=2, workers=1, progress=False)
    (ws / "err_plugins.py").write_text(PLUGINS)
    (ws / "afile").write_text("not a folder")
    return ws


def run_cli(capsys, *argv) -> tuple[int, str]:
    capsys.readouterr()
    rc = main([str(a) for a in argv])
    cap = capsys.readouterr()
    assert "Traceback" not in cap.err + cap.out
    return rc, cap.err


def one_line_error(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.strip() and not ln.startswith(("warning: ", "note: "))]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def fuse_args(ws, *extra, out="fused"):
    t = ws / "data" / "test"
    return ["fuse", "--ir", t / "ir", "--vi", t / "vi", "--out", ws / out, "--no-progress", *extra]


def test_outputs_that_are_files_or_folders(ws, capsys):
    t = ws / "data" / "test"
    f = ws / "afile"
    cases = [
        fuse_args(ws, "--method", "mean", out="afile"),
        ["metrics", "--ir", t / "ir", "--vi", t / "vi", "--fused", f"m={t / 'vi'}", "--out", f],
        ["train-fusion", f"data_root={ws / 'data'}", "--out", f],
        ["segment", "train", "--images", t / "vi", "--labels", t / "Segmentation_labels", "--out", f],
        ["compare", ws, "--out", f],
        ["fuse", "--method", "mean", "--ir", t / "ir", "--vi", t / "vi", "--out", f / "sub"],
    ]
    for argv in cases:
        rc, err = run_cli(capsys, *argv)
        line = one_line_error(err)
        assert rc == 2 and str(f) in line and "is a" in line and "folder" in line, (argv, line)
    rc, err = run_cli(capsys, "segment", "eval", "--checkpoint", ws / "none.pt", "--images", t / "vi",
                      "--labels", t / "Segmentation_labels", "--json", ws)
    assert rc == 2 and "--json" in one_line_error(err) and "is a folder; give a file name" in err


@pytest.mark.parametrize("device", ["banana", "gpu7"])
def test_bad_device_names_the_key(ws, capsys, device):
    rc, err = run_cli(capsys, *fuse_args(ws, "--method", "mean", "--device", device))
    assert rc == 2 and f"device {device!r} is not a device name" in one_line_error(err)
    rc, err = run_cli(capsys, "run", f"data.root={ws / 'data'}", f"results_dir={ws / 'res'}",
                      f"device={device}", "--only", "data")
    assert rc == 2 and "`device` key" in one_line_error(err)


def test_bad_counts_are_usage_errors(ws, capsys):
    for extra in (["--workers", "-1"], ["--batch-size", "0"]):
        with pytest.raises(SystemExit) as e:
            main([str(a) for a in fuse_args(ws, "--method", "mean", *extra)])
        assert e.value.code == 2
        assert f"argument {extra[0]}: {extra[1]} is too small" in capsys.readouterr().err
    for n in (300, -3):
        rc, err = run_cli(capsys, "check-data", ws / "data", "--num-classes", n)
        assert rc == 2 and f"--num-classes {n}: give 2..255" in one_line_error(err)


def test_method_settings_that_raise(ws, capsys):
    rc, err = run_cli(capsys, *fuse_args(ws, "--method", "gff", "--kwargs", "r1=-5"))
    line = one_line_error(err)
    assert rc == 2 and "'gff' rejected its settings" in line and "r1 must be an integer >= 0" in line


@pytest.mark.parametrize("method, code, text", [
    ("err_half_size", 1, "returned (1, 3, 24, 32) for visible input (1, 3, 48, 64)"),
    ("err_bad_y", 1, "err_bad_y failed on a batch"),
    ("err_nan", 1, "non-finite value(s)"),
    ("err_oom", 1, "out of CPU memory (cannot allocate 3.2 GiB)"),
    ("err_bug", 1, "unexpected KeyError: 'missing' (a bug in fuseseg or in a plug-in). Rerun with --traceback"),
    ("err_255", 1, "value(s) outside [0, 1] (range "),
    ("err_uint8", 1, "err_uint8 returned a uint8 tensor (values "),
    ("err_exit", 1, "err_exit called sys.exit(3) while fusing"),
])
def test_plugins_breaking_the_contract_are_rejected(ws, capsys, monkeypatch, method, code, text):
    monkeypatch.chdir(ws)
    out = f"out_{method}"
    rc, err = run_cli(capsys, *fuse_args(ws, "--method", method, "--plugins", "err_plugins", "--batch-size", "1",
                                         out=out))
    assert rc == code and text in one_line_error(err), err
    assert not list((ws / out).glob("*.png"))                  # nothing (black or partial) was written
    if method == "err_255":   # the count: visible values v/255 * 255 > 1.01, i.e. v >= 2 (independent count)
        import re

        from fuseseg.data.io import read_visible

        n, total, lo, hi = re.search(r"returned (\d+) of (\d+) value\(s\) outside \[0, 1\] \(range (\d+)\.\.(\d+)\)",
                                     err).groups()
        first = sorted((ws / "data" / "test" / "vi").glob("*.png"))[0]
        vi = read_visible(first)
        assert (int(n), int(total), int(lo), int(hi)) == (int((vi >= 2).sum()), vi.size, vi.min(), vi.max())
        assert "divide by 255" in err


def test_traceback_flag_shows_unexpected_errors(ws, capsys, monkeypatch):
    monkeypatch.chdir(ws)
    with pytest.raises(KeyError):
        main([str(a) for a in fuse_args(ws, "--method", "err_bug", "--plugins", "err_plugins", "--traceback")])


@pytest.mark.parametrize("err_no, text", [(errno.ENOSPC, "the disk is full"),
                                          (errno.EACCES, "make it writable"),
                                          (errno.EROFS, "read-only file system")])
def test_failed_writes_name_the_file_and_the_fix(ws, capsys, monkeypatch, err_no, text):
    import fusion.fuse

    def fail(path, img):
        raise OSError(err_no, os.strerror(err_no), str(path))

    monkeypatch.setattr(fusion.fuse, "write_image", fail)
    rc, err = run_cli(capsys, *fuse_args(ws, "--method", "mean", out="full"))
    line = one_line_error(err)
    assert rc == 1 and str(ws / "full") in line and os.strerror(err_no) in line and text in line


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_working_folder(ws, capsys, monkeypatch):
    ro = ws / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    monkeypatch.chdir(ro)
    try:
        rc, err = run_cli(capsys, "run", f"data.root={ws / 'data'}", "--only", "data")
    finally:
        ro.chmod(0o755)
    assert rc == 1 and "results" in one_line_error(err) and "make it writable" in err


def test_unwritable_run_folder_is_one_line(ws, capsys, monkeypatch):
    """As root nothing is read-only: the refusal is simulated where the run folder is made."""
    import pathlib

    real = pathlib.Path.mkdir

    def mkdir(self, *a, **k):
        if "locked_out" in str(self):
            raise PermissionError(errno.EACCES, "Permission denied", str(self))
        return real(self, *a, **k)

    monkeypatch.setattr(pathlib.Path, "mkdir", mkdir)
    rc, err = run_cli(capsys, "run", f"data.root={ws / 'data'}", f"results_dir={ws / 'locked_out'}", "--only", "data")
    line = one_line_error(err)
    assert rc == 1 and "locked_out" in line and "Permission denied" in line and "results_dir=" in line


def write_cfg(ws: Path, name: str, **cfg) -> Path:
    base = {"name": name, "results_dir": str(ws / "results"), "device": "cpu", "data": {"root": str(ws / "data")},
            "fusion": [{"name": "mean"}]}
    base.update(cfg)
    p = ws / f"{name}.yaml"
    p.write_text(yaml.safe_dump(base))
    return p


@pytest.mark.parametrize("override, text", [
    ("fuse_batch_size=0", "fuse_batch_size=0: give at least 1"),
    ("report.bootstrap=0", "report.bootstrap=0: give at least 1 resample"),
    ("report.bootstrap=-5", "report.bootstrap=-5"),
    ("report.figure_scenes=-1", "report.figure_scenes=-1: give 0"),
    ("data.num_classes=300", "data.num_classes=300: give 2..255"),
    ("metrics.workers=0", "metrics.workers=0"),
    ("metrics.names=[EN,XYZ]", "metrics.names: unknown metric 'XYZ'"),
    ("fusion_train.epochs=0", "structure_epochs=0 and epochs=0 train nothing"),
    ("segmentation.lr=nan", "segmentation setting lr=nan: must be a positive number"),
    ("segmentation.lr=-1", "segmentation setting lr=-1.0: must be a positive number"),
])
def test_settings_checked_before_anything_runs(ws, capsys, override, text):
    extra = ["fusion_train.structure_epochs=0"] if override.startswith("fusion_train") else []
    rc, err = run_cli(capsys, "run", write_cfg(ws, "early"), override, *extra)
    assert rc == 2 and text in one_line_error(err), err
    assert not (ws / "results" / "early").exists()


def test_train_fusion_with_no_epochs_is_an_error(ws, capsys, tmp_path):
    rc, err = run_cli(capsys, "train-fusion", f"data_root={ws / 'data'}", "epochs=0", "structure_epochs=0",
                      "--out", tmp_path / "t")
    assert rc == 2 and "train nothing" in one_line_error(err)
    assert not (tmp_path / "t" / "final.pt").exists()


def test_images_under_vifs_minimum_fail_before_training(tmp_path, capsys, monkeypatch):
    from fuseseg.data.synthetic import make_synthetic

    make_synthetic(tmp_path / "small", 2, 2, size=(32, 40), seed=0, workers=1, progress=False)
    cfg = write_cfg(tmp_path, "small", data={"root": str(tmp_path / "small")},
                    fusion=[{"name": "sspfusion", "kwargs": {"levels": 2, "channels": [4, 8, 8]}}])
    rc, err = run_cli(capsys, "run", cfg)
    line = one_line_error(err)
    assert rc == 2 and "side of 32 px, under VIF's minimum of 41 px" in line
    assert "metrics.names=[EN,SD,SF,AG,MI,MSE,CC,PSNR,SCD,Qabf,SSIM,Nabf]" in line
    assert not list((tmp_path / "results" / "small" / "stages").glob("train_fusion*"))
    # the advice is a key `run` accepts: it gets past the check (stopped after the data stage here)
    rc, _ = run_cli(capsys, "run", cfg, "metrics.names=[EN,SD]", "--only", "data")
    assert rc == 0


def test_duplicate_yaml_keys(ws, capsys):
    p = ws / "dup.yaml"
    p.write_text("name: a\nsegmentation:\n  epochs: 3\n  epochs: 30\n")
    rc, err = run_cli(capsys, "run", p)
    line = one_line_error(err)
    assert rc == 2 and str(p) in line and "'epochs' appears twice" in line and "lines 3 and 4" in line


def test_only_msrs_names_count_as_day_or_night(make_pairs):
    from fuseseg.data.pairs import day_or_night, find_pairs
    from fuseseg.data.validate import validate_pairset

    assert [day_or_night(s) for s in ("00001D", "01234N", "ten", "dawn", "N", "1n", "00001DN")] == \
        ["day", "night", None, None, None, None, None]
    root = make_pairs(n=2)
    for name in ("ten.png", "DN.png"):
        for sub in ("ir", "vi"):
            (root / sub / name).write_bytes((root / sub / "00001D.png").read_bytes())
    s = validate_pairset(find_pairs(root / "ir", root / "vi"))
    assert (s.day, s.night, s.other) == (1, 1, 2)


def test_dangling_symlinks_are_reported(ws, tmp_path, capsys):
    import shutil

    root = tmp_path / "d"
    shutil.copytree(ws / "data", root)
    link = root / "test" / "ir" / "00009D.png"
    link.symlink_to(tmp_path / "gone.png")
    rc, err = run_cli(capsys, "check-data", root)
    assert rc == 1 and "00009D.png is a dangling symbolic link" in err and "gone.png" in err
    rc, err = run_cli(capsys, "run", f"data.root={root}", f"results_dir={tmp_path / 'r'}", "--only", "data")
    assert rc == 1 and "dangling symbolic link" in one_line_error(err)


def test_error_lines_go_to_stderr_not_stdout(ws, capsys):
    capsys.readouterr()
    assert main(["check-data", str(ws / "data"), "--num-classes", "1"]) == 2
    cap = capsys.readouterr()
    assert "error:" in cap.err and "error:" not in cap.out


def test_plugin_exiting_at_import_is_named(ws, capsys, monkeypatch):
    monkeypatch.chdir(ws)
    (ws / "err_exit_import.py").write_text("import sys\nsys.exit(4)\n")
    rc, err = run_cli(capsys, *fuse_args(ws, "--method", "mean", "--plugins", "err_exit_import", out="exit_imp"))
    assert rc == 2 and "plug-in module 'err_exit_import'" in one_line_error(err) and "sys.exit(4)" in err


def _laughs(levels: int) -> bytes:
    """A "billion laughs" under fusion[].kwargs: 9**levels strings from a few hundred bytes."""
    lines = ["name: x", "fusion:", "  - name: mean", "    kwargs:", "      a: &a [" + ",".join(["lol"] * 9) + "]"]
    lines += [f"      {c}: &{c} [" + ",".join([f"*{p}"] * 9) + "]" for p, c in zip("abcdefgh", "bcdefghi"[:levels - 1])]
    return ("\n".join(lines) + "\n").encode()


@pytest.mark.parametrize("text, limit, expect", [
    (b"name: \xff\xfe x\n", None, "is not UTF-8 text (byte 0xff at offset 6)"),
    (("a: " + "[" * 5000 + "]" * 5000 + "\n").encode(), None, "nested more than 100 levels deep"),
    # 9**5 = 59049 strings: small enough that the old code's 350 KB error line stays cheap
    (_laughs(5), "10000", "expands to more than 10,000 values"),
])
def test_hostile_or_damaged_yaml_is_one_line(ws, capsys, monkeypatch, text, limit, expect):
    if limit:
        monkeypatch.setenv("FUSESEG_YAML_MAX_NODES", limit)
    p = ws / "hostile.yaml"
    p.write_bytes(text)
    rc, err = run_cli(capsys, "run", p)
    line = one_line_error(err)
    assert rc == 2 and str(p) in line and expect in line and len(line) < 400, line


@pytest.mark.parametrize("override, expect", [
    ("data.synthetic.size=[0,0]", "data.synthetic.size=[0, 0]: give a height and width of at least 16"),
    ("seed=1000000000000000000000000", "seed 1000000000000000000000000 is out of range"),
])
def test_bad_sizes_and_seeds_fail_at_validation(ws, capsys, override, expect):
    rc, err = run_cli(capsys, "run", f"results_dir={ws / 'results'}", "name=val", override, "--only", "data")
    assert rc == 2 and expect in one_line_error(err)
    assert not (ws / "results" / "val").exists()


@pytest.mark.parametrize("fields, expect", [
    ({"method": 5}, "its `method` field is 5, not a method name"),
    ({"kwargs": [1, 2]}, "its `kwargs` field is list"),
    ({"state_dict": {"w": "x"}}, "its `state_dict` field is not a mapping of tensors"),
    ({"kwargs": {"channels": [16, 32, 48, 700]}}, "parameters but its weights hold only"),
    ({"verdict": [1]}, None),
])
def test_malformed_checkpoint_fields_name_the_file(ws, capsys, fields, expect):
    from fuseseg.runtime import save_checkpoint
    from fusion.registry import create_method

    p = ws / "crafted.pt"
    save_checkpoint(p, {"kind": "fusion", "method": "sspfusion", "kwargs": {},
                        "state_dict": create_method("sspfusion").state_dict(), **fields})
    rc, err = run_cli(capsys, *fuse_args(ws, "--checkpoint", p, "--overwrite", out="crafted"))
    if expect is None:   # a damaged verdict is ignored: the weights are fine
        assert rc == 0, err
    else:
        line = one_line_error(err)
        assert rc == 1 and str(p) in line and expect in line, line


def test_malformed_stage_records_are_named_and_redone(ws, capsys):
    import json

    args = ["run", f"data.root={ws / 'data'}", f"results_dir={ws / 'results'}", "name=recs", "--only", "data"]
    assert run_cli(capsys, *args)[0] == 0
    rec = ws / "results" / "recs" / "stages" / "data.json"
    good = json.loads(rec.read_text())
    for bad in ([1, 2], {**good, "inputs": [1]}, {**good, "fingerprint": 5}, {"status": "done"}):
        rec.write_text(json.dumps(bad))
        rc, err = run_cli(capsys, *args)
        assert rc == 0 and f"the stage record {rec} is damaged" in err, err
        assert json.loads(rec.read_text())["fingerprint"] == good["fingerprint"]      # redone and rewritten
        rec.write_text(json.dumps(bad))
        rc, err = run_cli(capsys, "status", ws / "results" / "recs")
        assert rc == 0, err


@pytest.mark.parametrize("table, expect", [
    ("{not json", "it is not readable JSON"),
    ('{"rows": 5}', "not an object with a `protocol` mapping and a `rows` list"),
    ('{"protocol": {}, "rows": [{"variant": "ir", "seeds": 1, "miou": [0.5], "pixel_accuracy": [0.9, 0]}]}',
     "row 'ir' lacks `seeds` or a [mean, std] `miou`"),
])
def test_damaged_miou_table_in_compare_is_named(ws, capsys, table, expect):
    run = ws / "damaged_run"
    (run / "tables").mkdir(parents=True, exist_ok=True)
    (run / "tables" / "miou.json").write_text(table)
    rc, err = run_cli(capsys, "compare", run)
    line = one_line_error(err)
    assert rc == 1 and str(run / "tables" / "miou.json") in line and expect in line, line


def test_full_disk_during_an_atomic_write_names_the_file(ws, capsys, monkeypatch):
    """A failed write() or fsync() raises OSError without a file name; the message must name it."""
    import fuseseg.data.io as fio

    real = fio.os.fsync

    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(fio.os, "fsync", full)
    try:
        rc, err = run_cli(capsys, *fuse_args(ws, "--method", "mean", out="disk_full"))
    finally:
        monkeypatch.setattr(fio.os, "fsync", real)
    line = one_line_error(err)
    assert rc == 1 and str(ws / "disk_full") in line and "the disk is full" in line, line
    assert not [p for p in (ws / "disk_full").iterdir() if p.name.endswith(".tmp")]
