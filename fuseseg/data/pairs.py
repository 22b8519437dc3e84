"""Pairing infrared/visible(/label) files by stem, and the MSRS data-set layout.

MSRS layout: ``ROOT/{train,test}/{ir,vi,Segmentation_labels}/NAME.png``. An unlabelled pair set
is any folder with ``ir/`` and ``vi/`` (e.g. ``../shared/data/real/msrs``). Files pair by stem;
the extension may differ between folders (``a.png`` pairs with ``a.jpg``).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from fuseseg.data.io import IMAGE_EXTS
from fuseseg.errors import DataError

MSRS_CLASSES = ("unlabelled", "car", "person", "bike", "curve", "car_stop", "guardrail",
                "color_cone", "bump")
IGNORE_INDEX = 255
_MSRS_STEM = re.compile(r"\d+([DN])")


def day_or_night(stem: str) -> str | None:
    """``'day'`` or ``'night'`` for an MSRS-style name (digits then D or N: ``00001D``, ``00417N``);
    None for any other name (``ten`` is not a night scene)."""
    m = _MSRS_STEM.fullmatch(stem)
    return None if m is None else ("day" if m.group(1) == "D" else "night")


@dataclass
class Layout:
    """Folder names of a data set (MSRS names by default)."""

    ir: str = "ir"   # infrared folder name
    vi: str = "vi"   # visible folder name
    labels: str = "Segmentation_labels"   # label folder name
    train: str = "train"   # training split folder name
    test: str = "test"   # test split folder name


def list_images(folder: Path | str, role: str = "image") -> dict[str, Path]:
    """Map stem -> path for the image files in ``folder`` (sorted by stem).

    Errors: the folder is missing, holds no images, or two files share a stem."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"{role} folder {folder} does not exist. Point the config (or the command "
                        "line) at an existing folder.")
    found: dict[str, Path] = {}
    for p in sorted(folder.iterdir()):
        if p.is_symlink() and not p.exists():
            raise DataError(f"{role} folder {folder}: {p.name} is a dangling symbolic link (its target "
                            f"{p.readlink()} does not exist); restore the target or delete the link.")
        if p.is_file() and p.suffix.lower() in IMAGE_EXTS and not p.name.startswith("."):
            if p.stem in found:
                raise DataError(f"{role} folder {folder} has two files with the stem {p.stem!r}: "
                                f"{found[p.stem].name} and {p.name}. Keep one of them.")
            found[p.stem] = p
    if not found:
        raise DataError(f"{role} folder {folder} holds no images ({', '.join(IMAGE_EXTS)}). "
                        "Check the path, or generate data with `fuseseg make-synthetic`.")
    return found


def match_stems(listings: dict[str, dict[str, Path]], folders: dict[str, Path] | None = None) -> list[str]:
    """The sorted stems present in every listing; a DataError naming the unmatched files otherwise.

    ``listings`` maps a role (``"ir"``, ``"vi"``, a method name ...) to :func:`list_images` output."""
    roles = list(listings)
    common = set.intersection(*(set(v) for v in listings.values()))
    problems = []
    for role in roles:
        extra = sorted(set(listings[role]) - common)
        if extra:
            where = f" ({folders[role]})" if folders and role in folders else ""
            shown = ", ".join(listings[role][s].name for s in extra[:5])
            more = f" and {len(extra) - 5} more" if len(extra) > 5 else ""
            problems.append(f"{len(extra)} file(s) in {role}{where} have no partner: {shown}{more}")
    if problems:
        raise DataError("unmatched file names: " + "; ".join(problems) +
                        ". Every image needs a partner with the same name (extension may differ) in "
                        f"each of: {', '.join(roles)}. Remove or rename the unmatched files.")
    return sorted(common)


@dataclass
class PairSet:
    """Infrared/visible pairs (and optionally labels) matched by stem."""

    ir_dir: Path
    vi_dir: Path
    labels_dir: Path | None = None
    stems: list[str] = field(default_factory=list)
    ir: dict[str, Path] = field(default_factory=dict)
    vi: dict[str, Path] = field(default_factory=dict)
    labels: dict[str, Path] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.stems)


def find_pairs(ir_dir: Path | str, vi_dir: Path | str, labels_dir: Path | str | None = None) -> PairSet:
    """Pair the files of ``ir_dir`` and ``vi_dir`` (and ``labels_dir``) by stem."""
    ir_dir, vi_dir = Path(ir_dir), Path(vi_dir)
    listings = {"ir": list_images(ir_dir, "infrared"), "vi": list_images(vi_dir, "visible")}
    folders = {"ir": ir_dir, "vi": vi_dir}
    if labels_dir is not None:
        labels_dir = Path(labels_dir)
        listings["labels"] = list_images(labels_dir, "label")
        folders["labels"] = labels_dir
    stems = match_stems(listings, folders)
    return PairSet(ir_dir, vi_dir, labels_dir, stems, listings["ir"], listings["vi"],
                   listings.get("labels", {}))


def split_dirs(root: Path | str, split: str | None, layout: Layout = Layout()) -> dict[str, Path]:
    """The folders of one split: ``{'ir', 'vi', 'labels'?}``.

    ``split=None`` means ``root`` itself holds ``ir/`` and ``vi/`` (an unlabelled pair set)."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"data folder {root} does not exist. Set data.root in the config, or run "
                        "`fuseseg make-synthetic` to create a synthetic data set there.")
    base = root / getattr(layout, split) if split else root
    if split and not base.is_dir():
        raise DataError(f"data folder {root} has no '{getattr(layout, split)}' split folder "
                        f"(expected {base}). MSRS layout: ROOT/{{train,test}}/{{ir,vi,"
                        f"{layout.labels}}}/NAME.png")
    dirs = {"ir": base / layout.ir, "vi": base / layout.vi}
    if (base / layout.labels).is_dir():
        dirs["labels"] = base / layout.labels
    return dirs


def load_split(root: Path | str, split: str | None, layout: Layout = Layout(),
               require_labels: bool = False) -> PairSet:
    """Pairs (with labels when the split has them) of one split of a data set."""
    dirs = split_dirs(root, split, layout)
    if require_labels and "labels" not in dirs:
        raise DataError(f"{Path(root) / (getattr(layout, split) if split else '')} has no "
                        f"'{layout.labels}' folder, but segmentation needs labels. Use a labelled "
                        "data set (MSRS layout) or the synthetic one.")
    return find_pairs(dirs["ir"], dirs["vi"], dirs.get("labels"))


def detect_splits(root: Path | str, layout: Layout = Layout()) -> list[str | None]:
    """``['train', 'test']`` (those present) for an MSRS-layout root, ``[None]`` for a bare pair set."""
    root = Path(root)
    present = [s for s in ("train", "test") if (root / getattr(layout, s)).is_dir()]
    if present:
        return present
    if (root / layout.ir).is_dir() or (root / layout.vi).is_dir():
        return [None]
    raise DataError(f"{root} is neither an MSRS-layout data set (train/ and test/ folders) nor a "
                    f"pair set ({layout.ir}/ and {layout.vi}/ folders). Check the path.")
