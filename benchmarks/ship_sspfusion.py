"""Turn a finished SSPFusion ``fuseseg train-fusion`` run into the shipped weights (maintainers only).

    python -m benchmarks.ship_sspfusion RUN_DIR

The same as ``python -m benchmarks.ship_fusion RUN_DIR --method sspfusion`` (see
:mod:`benchmarks.ship_fusion`): copies ``RUN_DIR/final.pt`` to ``fusion/weights/sspfusion.pt``
and writes ``fusion/weights/sspfusion.json`` beside it (command, recipe, data, steps, loss curve,
verdict, convergence, test-set metrics in the ``sspfusion`` preset, SHA-256).
"""
from __future__ import annotations

import sys
from pathlib import Path

from benchmarks.ship_fusion import curve_summary, plain, rec_vs_fus, structure_iou  # noqa: F401
from benchmarks.ship_fusion import main as ship_main


def main(argv=None) -> Path:
    argv = list(sys.argv[1:] if argv is None else argv)
    return ship_main([*argv, "--method", "sspfusion"])


if __name__ == "__main__":
    main()
