"""Checks of command-line paths and numbers shared by the sub-commands: a mistake is a one-line
ConfigError naming the option and the fix (exit 2), raised before any work starts."""
from __future__ import annotations

import argparse
from pathlib import Path

from fuseseg.errors import ConfigError


def out_folder(path: str | Path | None, option: str = "--out") -> Path | None:
    """``path`` as an output folder: an existing file there is an error (the folder is created later)."""
    if path is None:
        return None
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{option} {path} is an existing file, not a folder; give a folder path (it is "
                          "created when missing), or move the file away.")
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise ConfigError(f"{option} {path}: {parent} is a file, not a folder; give another path.")
            break
    return path


def out_file(path: str | Path | None, option: str) -> Path | None:
    """``path`` as an output file: an existing folder there is an error."""
    if path is None:
        return None
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"{option} {path} is a folder; give a file name, e.g. {option} {path / 'result.json'}.")
    out_folder(path.parent, f"{option} {path}: its folder")
    return path


def count(minimum: int):
    """An argparse type: an integer >= ``minimum`` (argparse reports a bad one, exit 2)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{value} is too small; give an integer >= {minimum}")
        return value

    parse.__name__ = f"integer >= {minimum}"
    return parse
