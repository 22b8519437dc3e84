"""Typed configs: dataclasses loaded from YAML, ``a.b=value`` overrides, resolved-config dumps.

Each stage owns a dataclass of its settings (e.g. ``fusion.train_config.FusionTrainConfig``,
``segmentation.config.SegConfig``); :class:`pipelines.experiment.ExperimentConfig` composes
them. This module turns YAML into those dataclasses: an unknown key is an error naming it and
the valid keys, a value of the wrong type is an error naming the key and the expected type.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin

import yaml

from fuseseg.errors import ConfigError

T = TypeVar("T")


def _type_name(tp) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _convert(value: Any, tp, where: str):
    """Check/convert ``value`` to the annotated type ``tp``; ConfigError naming ``where``."""
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(value, arg, where)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(f"{where}: {value!r} is not a valid {_type_name(tp)}")
    if origin is Literal:
        if isinstance(value, bool) and ("off" if value is False else "on") in get_args(tp):
            value = "off" if value is False else "on"   # YAML 1.1 reads a bare off / on as a boolean
        if value not in get_args(tp):
            raise ConfigError(f"{where}: {value!r} is not one of {', '.join(map(repr, get_args(tp)))}")
        return value
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping of {tp.__name__} settings, got {value!r}")
        return from_dict(tp, value, where)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        args = get_args(tp)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(args) != len(value):
                raise ConfigError(f"{where}: expected {len(args)} values, got {len(value)}")
            return tuple(_convert(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
        elem = args[0] if args else Any
        out = [_convert(v, elem, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(out) if origin is tuple else out
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        kt, vt = (get_args(tp) + (Any, Any))[:2]
        return {_convert(k, kt, where): _convert(v, vt, f"{where}.{k}") for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML reads 2e-4 as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{where}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    if tp is Path:
        if isinstance(value, (str, Path)):
            return Path(value)
        raise ConfigError(f"{where}: expected a path, got {value!r}")
    return value


MAX_SEED = 2**32 - 1   # numpy's legacy seeding takes 0..2**32-1; torch takes less than 2**64


def _check_seeds(value, where: str) -> None:
    for v in value if isinstance(value, (list, tuple)) else [value]:
        if isinstance(v, int) and not 0 <= v <= MAX_SEED:
            raise ConfigError(f"{where}: seed {v} is out of range; give a whole number from 0 to {MAX_SEED}.")


def from_dict(cls: type[T], data: dict, where: str = "config") -> T:
    """Build dataclass ``cls`` from ``data``, rejecting unknown keys and wrong types."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = [k for k in data if k not in fields]
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(map(repr, unknown))}. Valid keys: "
                          f"{', '.join(fields)}.")
    kwargs = {k: _convert(v, hints[k], f"{where}.{k}" if where else k) for k, v in data.items()}
    for k, v in kwargs.items():
        if k == "seed" or k.endswith(("_seed", "_seeds")):
            _check_seeds(v, f"{where}.{k}" if where else k)
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{where}: {exc}") from exc


def to_dict(obj) -> Any:
    """A dataclass (tree) as plain YAML-able Python data."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    if isinstance(obj, Path):
        return str(obj)
    return obj


def parse_overrides(overrides: list[str]) -> dict:
    """``['a.b=1', 'c=x']`` -> nested ``{'a': {'b': 1}, 'c': 'x'}`` (values parsed as YAML)."""
    tree: dict = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value (e.g. "
                              "fusion_train.epochs=3)")
        key, raw = item.split("=", 1)
        try:
            value = safe_yaml(raw) if raw != "" else ""
        except ConfigError as exc:
            raise ConfigError(f"override {key.strip()}: {exc}") from None
        except yaml.YAMLError:
            value = raw
        node = tree
        parts = key.strip().split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r} conflicts with another override of {p!r}")
        node[parts[-1]] = value
    return tree


def merge_dicts(base: dict, extra: dict) -> dict:
    """``base`` updated recursively with ``extra`` (nested mappings merged, other values replaced)."""
    out = dict(base)
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = merge_dicts(out[k], v)
        else:
            out[k] = v
    return out


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml's safe loader, but a key given twice in one mapping is an error (PyYAML keeps the last),
    and a document nested deeper than ``yaml_max_depth`` or expanding (through its ``*aliases``) to
    more than ``yaml_max_nodes`` values is refused before it is built (:mod:`fuseseg.limits`)."""

    def __init__(self, stream):
        from fuseseg.limits import current

        super().__init__(stream)
        lim = current()
        self._max_depth, self._max_nodes, self._depth = lim.yaml_max_depth, lim.yaml_max_nodes, 0

    def compose_node(self, parent, index):
        self._depth += 1
        try:
            if self._depth > self._max_depth:
                from fuseseg.limits import how_to_raise

                mark = self.peek_event().start_mark
                raise ConfigError(f"the YAML is nested more than {self._max_depth} levels deep (line "
                                  f"{mark.line + 1}); flatten it, or {how_to_raise('yaml_max_depth')}.")
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def compose_document(self):
        node = super().compose_document()
        self._check_expansion(node)
        return node

    def _check_expansion(self, root) -> None:
        """Count the values of the document with every alias expanded (memoised per node, so a
        "billion laughs" is measured without being built)."""
        from fuseseg.limits import how_to_raise

        size: dict[int, int] = {}
        depth: dict[int, int] = {}
        visiting: set[int] = set()
        stack = [(root, False)]
        while stack:
            node, done = stack.pop()
            if id(node) in size:
                continue
            if not done and id(node) in visiting:
                raise ConfigError(f"the YAML value at line {node.start_mark.line + 1} contains itself through "
                                  "an alias (*name inside &name); give the values without the loop.")
            visiting.add(id(node))
            children = [c for kv in node.value for c in kv] if isinstance(node, yaml.MappingNode) else \
                list(node.value) if isinstance(node, yaml.SequenceNode) else []
            if done or not children:
                size[id(node)] = 1 + sum(size[id(c)] for c in children)
                depth[id(node)] = 1 + max((depth[id(c)] for c in children), default=0)
                if depth[id(node)] > self._max_depth:
                    raise ConfigError(f"the YAML is nested more than {self._max_depth} levels deep once its "
                                      f"aliases (*name) are expanded (the value at line {node.start_mark.line + 1}); "
                                      f"flatten it, or {how_to_raise('yaml_max_depth')}.")
                if size[id(node)] > self._max_nodes:
                    raise ConfigError(f"the YAML expands to more than {self._max_nodes:,} values through its "
                                      f"anchors and aliases (&name / *name; the value at line "
                                      f"{node.start_mark.line + 1}); give the values without aliases, or "
                                      f"{how_to_raise('yaml_max_nodes')}.")
                continue
            stack.append((node, True))
            stack.extend((c, False) for c in children if id(c) not in size)

    def construct_mapping(self, node, deep=False):
        seen: dict = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise ConfigError(f"the key {key!r} appears twice in one mapping (lines {seen[key] + 1} and "
                                  f"{key_node.start_mark.line + 1}); keep one of them.")
            seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


def safe_yaml(text: str):
    """``text`` parsed as YAML with :class:`_UniqueKeyLoader` (duplicate keys, depth and alias
    expansion checked)."""
    return yaml.load(text, Loader=_UniqueKeyLoader)


def read_yaml(path: Path | str) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist. Give a path to a YAML file, e.g. "
                          "configs/default.yaml.")
    try:
        data = safe_yaml(path.read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError as exc:
        raise ConfigError(f"config file {path} is not UTF-8 text (byte {exc.object[exc.start]:#04x} at "
                          f"offset {exc.start}); save it as UTF-8 (a YAML config is plain text).") from None
    except ConfigError as exc:
        raise ConfigError(f"config file {path}: {exc}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must be a mapping of settings at the top level")
    return data


def load_config(cls: type[T], path: Path | str | None = None, overrides: list[str] | None = None) -> T:
    """Load ``cls`` from the YAML file ``path`` (defaults when None) with ``key=value`` overrides."""
    data = read_yaml(path) if path else {}
    data = merge_dicts(data, parse_overrides(overrides or []))
    where = str(path) if path else "config"
    return from_dict(cls, data, where)


def load_section_config(cls: type[T], section: str, path: Path | str | None, overrides: list[str],
                        inherit: tuple[str, ...] = ()) -> T:
    """``cls`` from a YAML file holding its keys at the top level or under ``section:`` (an
    experiment file), plus ``key=value`` or ``section.key=value`` overrides. Top-level keys named in
    ``inherit`` (e.g. ``plugins``) are copied into the section when it lacks them."""
    data, where = {}, section
    if path is not None:
        raw = read_yaml(path)
        if section in raw:
            data, where = dict(raw[section] or {}), f"{path}: {section}"
            for key in inherit:
                if raw.get(key) and key not in data:
                    data[key] = raw[key]
        else:
            data, where = raw, str(path)
    extra = parse_overrides(overrides)
    if isinstance(extra.get(section), dict):
        extra = merge_dicts({k: v for k, v in extra.items() if k != section}, extra[section])
    return from_dict(cls, merge_dicts(data, extra), where)


def dump_config(cfg, path: Path | str) -> None:
    """Write the resolved config ``cfg`` as YAML to ``path`` (atomically)."""
    from fuseseg.data.io import atomic_write_text

    atomic_write_text(path, yaml.safe_dump(to_dict(cfg), sort_keys=False))


def check_config_kept(read: Path | str | None, written: Path, text: str, how: str) -> None:
    """Refuse when the config file ``read`` (given by the user) is the file ``written`` that the
    command is about to replace with ``text``: the user's edits and comments would be lost. The
    same text (a config.yaml fuseseg wrote, unchanged) is rewritten harmlessly. ``how``: the fix."""
    from fuseseg.data.paths import same_file

    if read is None or not same_file(read, written):
        return
    try:
        if Path(read).read_text() == text:
            return
    except (OSError, UnicodeDecodeError):
        pass
    raise ConfigError(f"the config file {read} is {written}, which this command rewrites with the resolved "
                      f"config: your file (its edits and comments) would be lost. {how}")
