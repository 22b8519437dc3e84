"""``fuseseg status RUN_DIR``: every stage and job of a run folder, and its state.

done (seconds, job id, mIoU of a segment run), running (job id, elapsed), queued, failed (the
job's log), finished (a job's result not yet collected by ``fuseseg run``), waiting (not
submitted yet). Read-only: it takes no lock and changes nothing.
"""
from __future__ import annotations

import json
from pathlib import Path

from rich.table import Table

from fuseseg.errors import ConfigError
from pipelines.console import console

STYLE = {"done": "green", "running": "cyan", "queued": "blue", "failed": "bold red", "finished": "green",
         "waiting": "dim"}


def register(sub) -> None:
    p = sub.add_parser("status", help="state of every stage / job of a run folder (done, running, queued, failed)",
                       description="A table of every stage of RUN_DIR: done, running (job id, elapsed), "
                       "queued, failed (log path), waiting; the mIoU of finished segment runs.")
    p.add_argument("run_dir", type=Path, help="run folder (results/<name>)")
    p.add_argument("--json", action="store_true", help="print the rows as JSON instead of a table")
    p.set_defaults(func=status)


def status(args) -> int:
    from pipelines.jobs import status_rows

    run_dir = args.run_dir
    if not (run_dir / "stages").is_dir() and not (run_dir / "config.yaml").is_file():
        raise ConfigError(f"{run_dir} is not a fuseseg run folder (it has no stages/ or config.yaml); give "
                          "the folder `fuseseg run` wrote, e.g. results/default.")
    rows = status_rows(run_dir)
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    table = Table(title=f"{run_dir}")
    for col, just in (("stage", "left"), ("state", "left"), ("job", "right"), ("time", "right"),
                      ("mIoU", "right"), ("detail / log", "left")):
        table.add_column(col, justify=just, overflow="fold")
    for r in rows:
        miou = f"{100 * r['miou']:.2f}" if isinstance(r.get("miou"), (int, float)) else ""
        table.add_row(r["stage"], f"[{STYLE.get(r['state'], '')}]{r['state']}[/]", r["job"], r["elapsed"], miou,
                      r["log"] or r["detail"])
    console.print(table)
    counts = {}
    for r in rows:
        counts[r["state"]] = counts.get(r["state"], 0) + 1
    console.print(", ".join(f"{n} {s}" for s, n in counts.items()), highlight=False)
    return 0
