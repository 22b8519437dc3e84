"""Resource limits: inputs are checked against them *before* memory is spent on them.

A crafted or mistaken input (a small PNG whose header declares 20000x20000 pixels, a checkpoint
whose ``kwargs`` describe a model of billions of weights, a YAML "billion laughs") is refused with
one line naming the file or key, the limit and how to raise it, instead of asking for gigabytes.

=========================  ===============  ==============================  ========================
limit                      default          environment variable            config key
=========================  ===============  ==============================  ========================
pixels per image           50,000,000       ``FUSESEG_MAX_PIXELS``          ``limits.max_pixels``
decoded bytes per image    512 MiB          ``FUSESEG_MAX_IMAGE_BYTES``     ``limits.max_image_bytes``
parameters of a model      200,000,000      ``FUSESEG_MAX_MODEL_PARAMETERS``  ``limits.max_model_parameters``
YAML nodes (aliases        1,000,000        ``FUSESEG_YAML_MAX_NODES``      (environment only: read
expanded)                                                                   before the config is)
YAML nesting depth         100              ``FUSESEG_YAML_MAX_DEPTH``      (environment only)
=========================  ===============  ==============================  ========================

A config key (``fuseseg run``) wins over the environment variable, which wins over the default.
The pixel limit also bounds ``data.synthetic.size`` and ``fusion_train.synthetic_size``.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, fields, replace

from fuseseg.errors import ConfigError


@dataclass(frozen=True)
class Limits:
    max_pixels: int = 50_000_000
    max_image_bytes: int = 512 * 2**20
    max_model_parameters: int = 200_000_000
    yaml_max_nodes: int = 1_000_000
    yaml_max_depth: int = 100


ENV = {"max_pixels": "FUSESEG_MAX_PIXELS", "max_image_bytes": "FUSESEG_MAX_IMAGE_BYTES",
       "max_model_parameters": "FUSESEG_MAX_MODEL_PARAMETERS", "yaml_max_nodes": "FUSESEG_YAML_MAX_NODES",
       "yaml_max_depth": "FUSESEG_YAML_MAX_DEPTH"}
CONFIG_KEYS = {"max_pixels": "limits.max_pixels", "max_image_bytes": "limits.max_image_bytes",
               "max_model_parameters": "limits.max_model_parameters"}

_configured: dict[str, int] = {}


def _positive(value, where: str) -> int:
    try:
        n = int(str(value).replace("_", ""))
    except ValueError:
        n = 0
    if n < 1:
        raise ConfigError(f"{where}={value!r}: give a positive whole number")
    return n


def current() -> Limits:
    """The limits in force: :func:`configure`'d values, else the environment, else the defaults."""
    values = {}
    for f in fields(Limits):
        if f.name in _configured:
            values[f.name] = _configured[f.name]
        elif os.environ.get(ENV[f.name], "").strip():
            values[f.name] = _positive(os.environ[ENV[f.name]].strip(), ENV[f.name])
    return replace(Limits(), **values)


def configure(**values: int | None) -> None:
    """Set limits for this process (the ``limits:`` section of a config); None leaves one as it is.
    They are also exported to the environment, so worker and job processes started later inherit
    them."""
    for name, value in values.items():
        if name not in ENV:
            raise ConfigError(f"unknown limit {name!r}; valid: {', '.join(ENV)}")
        if value is not None:
            _configured[name] = _positive(value, CONFIG_KEYS.get(name, ENV[name]))
            os.environ[ENV[name]] = str(_configured[name])


def how_to_raise(name: str) -> str:
    """'set limits.max_pixels=N (config) or FUSESEG_MAX_PIXELS=N (environment)'."""
    key = CONFIG_KEYS.get(name)
    return (f"raise it with {key}=N (a `fuseseg run` config key or override) or the environment "
            f"variable {ENV[name]}=N" if key else f"raise it with the environment variable {ENV[name]}=N")


def check_image_shape(size, key: str, max_pixels: int | None = None) -> None:
    """Refuse an (H, W) setting ``key`` (e.g. ``data.synthetic.size``) with a side under 16 or more
    pixels than ``max_pixels`` (default: :func:`current`), as a ConfigError naming the key."""
    h, w = (int(v) for v in size)
    if h < 16 or w < 16:
        raise ConfigError(f"{key}={[h, w]}: give a height and width of at least 16 pixels each, e.g. [192, 256].")
    limit = max_pixels or current().max_pixels
    if h * w > limit:
        raise ConfigError(f"{key}={[h, w]}: {h * w:,} pixels per image, over the limit of {limit:,}; give a "
                          f"smaller size, or {how_to_raise('max_pixels')}.")
