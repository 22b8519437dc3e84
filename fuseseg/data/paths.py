"""Path safety: names that become folder names, outputs kept inside their run folder (every file
written, links resolved at every level: :func:`confine_writes`), and outputs kept apart from the
inputs of the same command.

Every check raises a :class:`ConfigError` (a usage error) naming the key or option and the rule,
before anything is written.
"""
from __future__ import annotations

import os
import re
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
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


def same_file(a: Path | str, b: Path | str) -> bool:
    """True when ``a`` and ``b`` name one file: the same path once links and '..' are resolved,
    or the same inode (a hard link)."""
    if Path(a).resolve() == Path(b).resolve():
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:   # one of them does not exist (yet)
        return False


def check_not_an_input(out: Path | str | None, inputs: Mapping[str, Path | str | None], out_key: str) -> None:
    """Refuse an output file ``out`` (named ``out_key``, e.g. ``--json``) that is one of the input
    files ``inputs`` ({option: file}) of the same command: writing it would destroy that input."""
    if out is None:
        return
    for key, inp in inputs.items():
        if inp is not None and same_file(out, inp):
            raise ConfigError(f"{out_key} {out} is the input {key} {inp} (the same file); writing it would "
                              f"destroy your input. Give {out_key} another file name.")


# the folders whose writes are confined now ({absolute path: (what, users)}); process-wide, so the
# threads of a run (job executors run its stage chains in threads) are covered too
_CONFINED: dict[str, tuple[str, int]] = {}
_CONFINED_LOCK = threading.Lock()


@contextmanager
def confine_writes(root: Path | str, what: str = "the run folder") -> Iterator[None]:
    """While the block runs, every file written under ``root`` by fuseseg's writers (the atomic
    writers of ``fuseseg.data.io``, which every file of a run goes through) must stay inside
    ``root`` with every link on its way resolved: :func:`check_write_path` refuses a path that
    passes through a symbolic link leading out (say ``fused/mean/test`` replaced by a link)."""
    key = os.path.abspath(root)
    with _CONFINED_LOCK:
        _CONFINED[key] = (what, _CONFINED.get(key, (what, 0))[1] + 1)
    try:
        yield
    finally:
        with _CONFINED_LOCK:
            label, users = _CONFINED[key]
            if users <= 1:
                del _CONFINED[key]
            else:
                _CONFINED[key] = (label, users - 1)


def _inside(real: str, real_root: str) -> bool:
    return real == real_root or real.startswith(real_root.rstrip(os.sep) + os.sep)


def check_write_path(path: Path | str) -> None:
    """Refuse (ConfigError naming the link) to write ``path`` when it lies under a folder of
    :func:`confine_writes` but one of the folders on its way there is a symbolic link (or the
    folder itself resolves) outside that folder. The file name itself may be a link: a file is
    written by renaming over it, which replaces the link, never its target."""
    if not _CONFINED:
        return
    p = os.path.abspath(path)
    with _CONFINED_LOCK:
        roots = dict(_CONFINED)
    for root, (what, _) in roots.items():
        if not p.startswith(root.rstrip(os.sep) + os.sep):
            continue
        real_root = os.path.realpath(root)
        cur = root
        for part in Path(os.path.relpath(os.path.dirname(p), root)).parts:
            cur = os.path.join(cur, part)
            if os.path.islink(cur) and not _inside(os.path.realpath(cur), real_root):
                raise ConfigError(f"{p} would be written through the symbolic link {cur} (to "
                                  f"{os.readlink(cur)}), which leads outside {what} {root}; fuseseg writes "
                                  f"only inside it. Remove the link ({cur}), or choose another run folder "
                                  "(results_dir=... / name=...).")
        if not _inside(os.path.realpath(os.path.dirname(p)), real_root):
            raise ConfigError(f"{p} resolves to {os.path.realpath(p)}, outside {what} {root}; fuseseg writes "
                              "only inside it. Remove the link on its way, or choose another run folder "
                              "(results_dir=... / name=...).")
