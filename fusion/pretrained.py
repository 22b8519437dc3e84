"""Shipped (pretrained) fusion weights: checkpoints inside the package, with a JSON beside each.

``fusion/weights/<method>.pt`` is a final checkpoint of ``fuseseg train-fusion`` (tensors and
plain types only, loadable with ``torch.load(weights_only=True)``); ``fusion/weights/<method>.json``
records how it was made (recipe, data, steps, loss curve summary), its test-set metrics and the
file's SHA-256, which is checked before the weights are used, so a damaged or truncated file is a
clear error rather than a silently wrong model.

``checkpoint: pretrained`` in an experiment config, or ``fuseseg fuse --method sspfusion`` without
``--checkpoint``, uses them (:func:`resolve_checkpoint`). The reproducing command is in the JSON
(``command``) and in ``configs/sspfusion-pretrain.yaml``.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from fuseseg.data.io import sha256_file
from fuseseg.errors import CheckpointError

PRETRAINED = "pretrained"
WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"


def shipped_files(method: str) -> tuple[Path, Path]:
    """(checkpoint, JSON) paths of ``method``'s shipped weights (they may not exist)."""
    return WEIGHTS_DIR / f"{method}.pt", WEIGHTS_DIR / f"{method}.json"


def has_shipped(method: str | None) -> bool:
    """True when weights for ``method`` ship with this package."""
    return method is not None and all(p.is_file() for p in shipped_files(method))


def sha256(path: Path) -> str:
    """Hex SHA-256 of a file (the same digest the fuse provenance records)."""
    return sha256_file(path)


def shipped_info(method: str = "sspfusion") -> dict[str, Any]:
    """The JSON beside ``method``'s shipped checkpoint (recipe, data, steps, metrics, sha256)."""
    pt, js = shipped_files(method)
    if not js.is_file():
        raise CheckpointError(f"no shipped weights for fusion method {method!r} ({js} is absent). "
                              "Train it with `fuseseg train-fusion` and pass --checkpoint FILE.")
    try:
        return json.loads(js.read_text())
    except ValueError as exc:
        raise CheckpointError(f"the shipped weights' description {js} is damaged ({exc}); reinstall "
                              "fuseseg, or pass --checkpoint FILE with weights of your own.") from exc


def shipped_checkpoint(method: str = "sspfusion") -> Path:
    """Path of ``method``'s shipped checkpoint after checking its SHA-256 against the JSON."""
    pt, _ = shipped_files(method)
    info = shipped_info(method)
    if not pt.is_file():
        raise CheckpointError(f"the shipped weights {pt} are missing; reinstall fuseseg, or pass "
                              "--checkpoint FILE with weights of your own.")
    got = sha256(pt)
    if got != info.get("sha256"):
        raise CheckpointError(f"the shipped weights {pt} are damaged (SHA-256 {got[:12]}... differs "
                              f"from {str(info.get('sha256'))[:12]}... recorded in {pt.with_suffix('.json').name}); "
                              "reinstall fuseseg, or pass --checkpoint FILE with weights of your own.")
    return pt


def resolve_checkpoint(spec: str | Path | None, method: str | None) -> Path | None:
    """A checkpoint setting as a file: None stays None, ``"pretrained"`` is ``method``'s shipped
    checkpoint (checked), anything else a path."""
    if spec is None:
        return None
    if str(spec) == PRETRAINED:
        if method is None:
            raise CheckpointError("checkpoint: pretrained needs the method name (e.g. sspfusion).")
        return shipped_checkpoint(method)
    return Path(spec)


def describe(method: str = "sspfusion") -> str:
    """One line naming the shipped weights (for the note printed when they are used)."""
    info = shipped_info(method)
    pt, _ = shipped_files(method)
    return (f"using the shipped {method} weights ({pt.name}: {info.get('steps', '?')} steps on "
            f"{info.get('data_summary', 'see the JSON')})")
