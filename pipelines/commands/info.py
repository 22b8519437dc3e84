"""The small commands: ``fuseseg list-methods`` and ``fuseseg config show``.

    fuseseg list-methods [CONFIG] [--plugins MOD,MOD]
    fuseseg config show [default|msrs|FILE] [key=value ...]
"""
from __future__ import annotations

from pipelines.console import console


def register(sub) -> None:
    lm = sub.add_parser("list-methods", help="list the registered fusion methods (built-in and plug-ins)",
                        description="List every registered fusion method: name, whether the pipeline "
                        "trains it, its one-line description and where it comes from (built-in, or the "
                        "plug-in module that registered it). Plug-ins are the modules of CONFIG's "
                        "`plugins:` list and of --plugins.")
    lm.add_argument("config", nargs="?", help="experiment YAML whose plugins: to load (optional)")
    lm.add_argument("--plugins", help="comma-separated plug-in modules to load")
    lm.set_defaults(func=list_methods_cmd)

    cfg = sub.add_parser("config", help="show a resolved config with every key documented",
                         description="Configs: `fuseseg config show [default|msrs|FILE] [key=value ...]` "
                         "prints the resolved config (defaults filled in, overrides applied) as YAML, "
                         "each key preceded by its documentation; save it to start a config of your own.")
    csub = cfg.add_subparsers(dest="config_command", metavar="ACTION", required=True)
    show = csub.add_parser("show", help="print the resolved config with the documentation of every key")
    show.add_argument("config", nargs="?", help="a shipped config name (default, msrs) or a YAML file "
                      "(default: default)")
    show.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    show.set_defaults(func=config_show_cmd)


def method_rows(plugins: list[str]) -> list[dict]:
    """One dict per registered method: name, trainable, description, origin."""
    from fusion.registry import BUILTIN_MODULES, get_entry, list_methods, load_plugins

    load_plugins(plugins)
    rows = []
    for name in list_methods():
        e = get_entry(name)
        origin = f"built-in ({e.module})" if e.module in BUILTIN_MODULES else f"plug-in ({e.module})"
        rows.append({"name": name, "trainable": e.trainable, "description": e.description, "origin": origin})
    return rows


def list_methods_cmd(args) -> int:
    from rich.table import Table

    from pipelines.commands.run import load_experiment

    plugins = list(load_experiment(args.config, []).plugins) if args.config else []
    plugins += [p.strip() for p in (args.plugins or "").split(",") if p.strip()]
    t = Table(title="Registered fusion methods")
    for col in ("method", "trainable", "description", "origin"):
        t.add_column(col)
    for r in method_rows(plugins):
        t.add_row(r["name"], "yes" if r["trainable"] else "no", r["description"], r["origin"])
    console.print(t)
    return 0


def config_show_cmd(args) -> int:
    from pipelines.commands.run import load_experiment
    from pipelines.configdoc import documented_yaml
    from pipelines.experiment import resolve_config

    overrides = list(args.overrides)
    config = args.config
    if config and "=" in config:
        overrides, config = [config, *overrides], None
    cfg = load_experiment(config, overrides)
    # plain print: the YAML must reach a file or pipe byte for byte (no wrapping, no markup)
    print(f"# fuseseg config show: {resolve_config(config)}"
          + (f" with {' '.join(overrides)}" if overrides else ""))
    print(documented_yaml(cfg), end="")
    return 0
