"""A resolved config as YAML with every key's documentation (``fuseseg config show``).

The documentation comes from the config dataclasses themselves, where it is written once:

* the comment on a field's line (``seed: int = 0   # ...``) or the comment lines just above it;
* else an entry ``name: text`` (or ``name / other: text``) in the class docstring, continuation
  lines indented (the style of :class:`segmentation.config.SegConfig`);
* else, for a field holding a dataclass, the first line of that class's docstring.

The output is valid YAML (the documentation is in comments), so it can be saved and edited as a
config file.
"""
from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import io
import re
import textwrap
import tokenize
import typing

import yaml

from pipelines.config import to_dict


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """``{field name: one-paragraph documentation}`` of dataclass ``cls`` (fields without any
    documentation are left out)."""
    docs: dict[str, str] = {}
    try:
        src = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):  # pragma: no cover - classes built at run time
        src = ""
    if src:
        comments: dict[int, str] = {}
        for tok in tokenize.generate_tokens(io.StringIO(src).readline):
            if tok.type == tokenize.COMMENT:
                comments[tok.start[0]] = tok.string.lstrip("#").strip()
        lines = src.splitlines()
        body = ast.parse(src).body[0].body
        for node in body:
            if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
                text = [comments[ln] for ln in range(node.lineno, node.end_lineno + 1) if ln in comments]
                if not text:  # comment lines directly above the field
                    ln = node.lineno - 1
                    while ln >= 1 and lines[ln - 1].strip().startswith("#"):
                        text.insert(0, comments.get(ln, ""))
                        ln -= 1
                if text:
                    docs[node.target.id] = " ".join(t for t in text if t)
    names = {f.name for f in dataclasses.fields(cls)}
    doc = inspect.cleandoc(cls.__doc__ or "")
    entry = re.compile(r"^(?P<keys>[a-z_][a-z0-9_]*(?:\s*/\s*[a-z_][a-z0-9_]*)*):\s+(?P<text>.*)$")
    current: list[str] | None = None
    for line in doc.splitlines():
        m = entry.match(line)
        if m:
            keys = [k.strip() for k in m["keys"].split("/")]
            current = [k for k in keys if k in names]
            for k in current:
                docs.setdefault(k, m["text"].strip())
        elif current and line.startswith((" ", "\t")) and line.strip():
            for k in current:
                docs[k] = f"{docs[k]} {line.strip()}"
        else:
            current = None
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        inner = _dataclass_of(hints.get(f.name))
        if f.name not in docs and inner is not None and inner.__doc__ \
                and not inner.__doc__.startswith(inner.__name__ + "("):  # not dataclass's generated doc
            docs[f.name] = inspect.cleandoc(inner.__doc__).split("\n")[0]
    return docs


def _dataclass_of(tp):
    """The dataclass that annotation ``tp`` holds (directly or in a list/Optional), else None."""
    if dataclasses.is_dataclass(tp):
        return tp
    for arg in typing.get_args(tp):
        if dataclasses.is_dataclass(arg):
            return arg
    return None


def _scalar(value) -> str:
    text = yaml.safe_dump(to_dict(value), default_flow_style=True, width=10**9, sort_keys=False).strip()
    return text[:-4].rstrip() if text.endswith("\n...") else text


def _comment(doc: str, indent: str, width: int = 96) -> list[str]:
    return [f"{indent}# {line}" for line in textwrap.wrap(doc, max(40, width - len(indent) - 2))]


def documented_yaml(cfg, indent: str = "") -> str:
    """``cfg`` (a dataclass tree) as YAML, each key preceded by its documentation comment."""
    return "\n".join(_lines(cfg, indent)) + "\n"


def _lines(obj, indent: str) -> list[str]:
    out: list[str] = []
    docs = field_docs(type(obj))
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if f.name in docs:
            out += _comment(docs[f.name], indent)
        if dataclasses.is_dataclass(value):
            out.append(f"{indent}{f.name}:")
            out += _lines(value, indent + "  ")
        elif isinstance(value, (list, tuple)) and value and all(dataclasses.is_dataclass(v) for v in value):
            out.append(f"{indent}{f.name}:")
            for item in value:
                item_lines = _lines(item, indent + "    ")
                first = next(i for i, ln in enumerate(item_lines) if not ln.lstrip().startswith("#"))
                item_lines[first] = f"{indent}  - " + item_lines[first][len(indent) + 4:]
                out += item_lines
        else:
            out.append(f"{indent}{f.name}: {_scalar(value)}")
    return out
