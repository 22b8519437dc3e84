"""The one registry of fusion methods, and the one contract every method obeys.

Contract
--------
A fusion method is an object built by ``create_method(name, **kwargs)``. Called as
``method(ir, vi)`` it takes

* ``ir``: infrared, float tensor (B, 1, H, W) with values in [0, 1];
* ``vi``: visible, float tensor (B, C, H, W), C = 3 (RGB) or 1 (grey), values in [0, 1];

and returns the fused image, a float tensor (B, C, H, W) in [0, 1] with the visible's channel
count (grey visible -> grey fused). Inputs are on one device; the output is on the same device.
The fuse stage checks every output: a wrong shape, a NaN/inf value, an integer tensor, or a value
outside [0, 1] by more than 0.01 (``fusion.fuse.RANGE_TOLERANCE``; e.g. a 0..255 image) is an
error naming the method and the counts, never silently clipped. Clamp to [0, 1] before returning.
A method must raise an exception to fail, never call ``sys.exit`` (that is reported as an error
naming the method too).
Methods must accept any H, W (pad internally if they need a multiple of something).

Methods that fuse luminance only subclass :class:`fusion.base.LuminanceFusion`, which converts
the visible to YCbCr, fuses Y with the infrared and puts the visible Cb/Cr back.

Registering
-----------
``@register_method("name")`` on a class or factory function. ``trainable=True`` marks a learned
model (a ``torch.nn.Module``) that the pipeline can train with :mod:`fusion.train`; such a model
implements ``training_losses(ir, vi_y, phase) -> (loss, {name: value})`` and names its training
phases in a ``phases`` class attribute. User plug-ins are modules listed in a config's
``plugins:`` list; :func:`load_plugins` imports them, and their decorators register the methods.
"""
from __future__ import annotations

import importlib
import re
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from fuseseg.errors import ConfigError


@dataclass(frozen=True)
class MethodEntry:
    name: str
    factory: Callable[..., Any]
    trainable: bool
    description: str
    module: str


_REGISTRY: dict[str, MethodEntry] = {}
_BUILTINS_LOADED = False
BUILTIN_MODULES = ("fusion.baselines", "fusion.models.sspfusion", "fusion.models.seafusion",
                   "fusion.models.didfuse", "fusion.models.rfn_nest")


def register_method(name: str, *, trainable: bool = False, description: str | None = None):
    """Decorator: register ``factory`` under ``name``. A second registration of a name is an error."""

    def decorator(factory):
        if name in _REGISTRY:
            prev = _REGISTRY[name]
            raise ValueError(f"fusion method {name!r} is already registered (by {prev.module}); "
                             "choose another name for your method.")
        doc = description or _one_line(factory.__doc__ or "")
        _REGISTRY[name] = MethodEntry(name, factory, trainable, doc, getattr(factory, "__module__", "?"))
        return factory

    return decorator


def _one_line(doc: str) -> str:
    """The first sentence of a docstring's first paragraph, on one line."""
    para = " ".join(doc.strip().split("\n\n")[0].split())
    for m in re.finditer(r"\.\s", para):
        word = para[:m.start()].split()[-1]
        if word[0].islower() or word[-1] in ")]" or word[-1].isdigit():  # not "IEEE Trans."
            return para[:m.start() + 1]
    return para


def _load_builtins() -> None:
    global _BUILTINS_LOADED
    if not _BUILTINS_LOADED:
        _BUILTINS_LOADED = True
        for mod in BUILTIN_MODULES:
            try:
                importlib.import_module(mod)
            except ModuleNotFoundError as exc:  # a built-in module not written yet
                if exc.name != mod:
                    raise


def list_methods() -> list[str]:
    """Sorted names of every registered method (built-ins and loaded plug-ins)."""
    _load_builtins()
    return sorted(_REGISTRY)


def get_entry(name: str) -> MethodEntry:
    """The registry entry of ``name``; a ConfigError listing the valid names if unknown."""
    _load_builtins()
    if name not in _REGISTRY:
        raise ConfigError(f"unknown fusion method {name!r}. Registered methods: "
                          f"{', '.join(sorted(_REGISTRY)) or '(none)'}. A method of your own must be "
                          "registered with @register_method in a module listed under `plugins:`.")
    return _REGISTRY[name]


def create_method(name: str, **kwargs):
    """Build the registered method ``name`` with ``kwargs``."""
    entry = get_entry(name)
    try:
        return entry.factory(**kwargs)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"fusion method {name!r} rejected its settings {kwargs}: {exc}. "
                          "Check the method's keyword arguments in the config.") from exc
    except SystemExit as exc:
        raise ConfigError(f"fusion method {name!r} (from {entry.module}) called sys.exit({exc.code!r}) while being "
                          "built; a plug-in must raise an exception instead, never exit the program.") from None


def load_plugins(modules: list[str] | tuple[str, ...]) -> list[str]:
    """Import each plug-in module (dotted name, importable from the working directory or
    sys.path). Returns the names of the methods they registered. A module that fails to import is
    a ConfigError that shows its error."""
    import sys
    from pathlib import Path

    _load_builtins()
    before = set(_REGISTRY)
    cwd = str(Path.cwd())
    if cwd not in sys.path:
        sys.path.insert(0, cwd)
    for mod in modules:
        if mod in sys.modules:
            continue
        try:
            importlib.import_module(mod)
        except SystemExit as exc:
            raise ConfigError(f"plug-in module {mod!r} (listed under `plugins:`) called sys.exit({exc.code!r}) "
                              "while being imported; a plug-in must raise an exception instead.") from None
        except Exception as exc:  # show the plug-in's own error
            tb = "".join(traceback.format_exception_only(type(exc), exc)).strip()
            raise ConfigError(f"plug-in module {mod!r} (listed under `plugins:`) failed to import: "
                              f"{tb}. Fix the module, or make sure it is importable from the working "
                              "directory (python -c 'import {0}').".replace("{0}", mod)) from exc
    return sorted(set(_REGISTRY) - before)
