"""Path safety: names that become folder names, outputs kept inside their run folder, and outputs
kept apart from the inputs of the same command.

Every check raises a :class:`ConfigError` (a usage error) naming the key or option and the rule,
before anything is written.
"""
from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path

from fuseseg.errors import ConfigError

_PLAIN = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.+-]*")
PLAIN_NAME_RULE = ("a plain name: letters, digits, '_', '-', '+' and '.', not starting with '.' "
                   "(no '/', no '..', not empty, not an absolute path)")


def check_plain_name(value: object, key: str) -> str:
    """``value`` when it is a plain name (one folder name, see :data:`PLAIN_NAME_RULE`), else a
    ConfigError naming ``key``: such names are joined into paths of the run folder."""
    if not isinstance(value, str) or not _PLAIN.fullmatch(value):
        raise ConfigError(f"{key}: {value!r} is not {PLAIN_NAME_RULE}; it names a folder inside the run "
                          "folder. Rename it, e.g. to 'my_method'.")
    return value


def is_within(path: Path | str, root: Path | str) -> bool:
    """True when ``path`` is ``root`` or lies inside it, after resolving symlinks and '..'."""
    return Path(path).resolve().is_relative_to(Path(root).resolve())


def ensure_inside(path: Path | str, root: Path | str, what: str = "a stage") -> Path:
    """``path`` when it resolves inside ``root`` (symlinks followed), else a ConfigError: nothing is
    ever written outside the run folder."""
    if not is_within(path, root) or Path(path).resolve() == Path(root).resolve():
        raise ConfigError(f"{what} would write {path}, which resolves to {Path(path).resolve()}, outside the "
                          f"run folder {Path(root).resolve()} (a symbolic link or '..' leads out of it). "
                          "Remove the link, or choose another run folder (results_dir=... / name=...).")
    return Path(path)


def check_disjoint(out: Path | str | None, inputs: Mapping[str, Path | str | None], out_key: str) -> None:
    """Refuse an output ``out`` (named ``out_key``, e.g. ``--out``) that is, contains or lies inside
    one of the ``inputs`` ({option: folder or file}) of the same command: it would overwrite or add
    files to them."""
    if out is None:
        return
    o = Path(out).resolve()
    for key, inp in inputs.items():
        if inp is None:
            continue
        i = Path(inp).resolve()
        if o == i or o.is_relative_to(i) or i.is_relative_to(o):
            how = "is" if o == i else "lies inside" if o.is_relative_to(i) else "contains"
            raise ConfigError(f"{out_key} {out} {how} the input {key} {inp}; writing there would overwrite "
                              f"or add files to your inputs. Give {out_key} a folder of its own.")
