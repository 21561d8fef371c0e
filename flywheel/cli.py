"""The `flywheel` command: a launcher of the flywheel's Dagster job, and the tools around it.

    flywheel iterate                      # one iteration of the default domain (embedded sample, tiny-pusht, CPU)
    flywheel iterate --iterations 3       # three in a row, each on the dataset version the last one refreshed
    flywheel iterate --config my.yaml     # your data, your model (merged over the defaults)
    flywheel train --set train.steps=200  # the job up to one stage (upstream results are reused)
    flywheel config                       # the default config as YAML, every key documented
    flywheel ui                           # Dagster UI (+ MLflow UI) on the flywheel home

Every run is a run of the Dagster job `flywheel_iteration` on the home's Dagster instance (<home>/dagster):
it shows in `flywheel ui` like a run launched there, with the same checks. An expected problem (bad data,
a bad config value, a refused gate) prints one message and exits with code 2; `--debug` (or FLYWHEEL_DEBUG=1)
adds the traceback. A bug prints its traceback and exits with code 1.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import traceback
from pathlib import Path

from flywheel.errors import ConfigError, DecisionRefused, FlywheelError

EXIT_REFUSED = 2  # an expected error: bad input, bad config, a refused decision (the message says which)


def load_run_config(args):
    from flywheel.config import load_config

    overrides = {"home": args.home} if getattr(args, "home", None) else None
    if getattr(args, "domain", None) is not None:  # `--domain ''` is a bad name, not "the default"
        from flywheel.domains import check_domain_name

        overrides = (overrides or {}) | {"domain": check_domain_name(args.domain)}
    config = load_config(args.config, overrides=overrides, set_args=args.set or [])
    if not domain_was_given(args) and config.ingest.source:
        # your data is not the sample's domain: name the domain after the dataset instead of adding its
        # adapters to the sample's line
        from flywheel.domains import domain_for_source

        config.domain = domain_for_source(config.ingest.source)
    if config.home is None:
        from flywheel.store import resolve_home

        config.home = str(resolve_home())
    return config


def domain_was_given(args) -> bool:
    """--domain, `--set domain=...`, or a `domain:` key in the --config file."""
    import yaml

    if getattr(args, "domain", None) or any(item.split("=", 1)[0] == "domain" for item in (args.set or [])):
        return True
    if args.config and Path(args.config).is_file():
        data = yaml.safe_load(Path(args.config).read_text()) or {}
        return isinstance(data, dict) and "domain" in data
    return False


def cmd_run(args, until: str | None) -> int:
    from flywheel.defs.launch import launch
    from flywheel.defs.terminal import Terminal, install_terminal

    count = getattr(args, "iterations", 1)
    if count < 1:
        raise ConfigError(f"--iterations {count}: give 1 or more")
    config = load_run_config(args)
    logging.getLogger("mlflow").setLevel(logging.WARNING)  # its "creating tables" notes are not the user's concern
    terminal = Terminal.on_stderr()
    install_terminal(terminal)
    say = terminal.line
    history = []
    try:
        for turn in range(count):
            if history:
                previous = history[-1]
                build_on = previous.check("build_on_policy" if config.gates.refresh.evidence == "policy" else "build_on")
                refreshed = previous.results.get("refreshed_dataset")
                if refreshed is None or (build_on is not None and not build_on.passed):
                    say(f"[iterations] stopping after {turn} of {count}: "
                          f"{build_on.description if build_on else 'no refreshed dataset version'}")
                    break
                config = config.model_copy(deep=True)
                config.ingest.source = str(refreshed.path)
                say(f"[iterations] {turn + 1}/{count}: ingesting the refreshed version {refreshed.path}")
            scope = (f" {until} alone" if getattr(args, "only", False) else f" up to {until}") if until else ""
            say(f"[run] domain {config.domain}: Dagster job flywheel_iteration{scope} on {Path(config.home) / 'dagster'}")
            outcome = launch(config, until, only=getattr(args, "only", False))
            history.append(outcome)
            say(f"[run] Dagster run {outcome.run_id} {'succeeded' if outcome.success else 'failed'} "
                  f"(`flywheel ui --home {config.home}` shows it)")
            if not outcome.success:
                terminal.close()  # the failed stage's bar is still drawn: clear it so the message starts a line
                return report_failure(outcome)
    finally:
        terminal.close()
        install_terminal(None)
    print_outputs(history)
    return 0


def report_failure(outcome) -> int:
    if outcome.unexpected:
        for error in outcome.unexpected:
            print(error, file=sys.stderr)
        return 1
    print(f"error: {outcome.why()}", file=sys.stderr)
    return EXIT_REFUSED


def print_outputs(history) -> None:
    if len(history) > 1:
        print("\niterations:")
        for turn, outcome in enumerate(history, 1):
            demos, refreshed = outcome.results.get("demonstrations"), outcome.results.get("refreshed_dataset")
            if demos and refreshed:
                print(f"  {turn}: {demos.metadata.get('episodes')} episodes in -> "
                      f"+{refreshed.metadata.get('synthetic_episodes', 0)} synthetic -> {refreshed.path}")
    print("\noutputs:")
    for name, result in history[-1].results.items():
        print(f"  {name:22s} {result.path}")
        if result.preview:
            print(f"  {'':22s} preview: {result.preview}")


def cmd_config(args) -> int:
    from flywheel.config import DEFAULT_CONFIG_FILE, load_config

    if args.validate:
        load_config(args.validate)
        print(f"{args.validate}: ok")
        return 0
    print(DEFAULT_CONFIG_FILE.read_text(), end="")
    return 0


def cmd_ui(args) -> int:
    from flywheel.defs.ui import start_ui

    return start_ui(home=args.home, port=args.port, mlflow_port=args.mlflow_port) or 0


def cmd_domain_add(args) -> int:
    from flywheel.defs.partitions import add_domain

    ingest = {"camera_key": args.camera_key} if args.camera_key else {}
    source = str(Path(args.source).resolve()) if args.source else None
    add_domain(args.name, source=source, home=args.home, **ingest)
    print(f"domain {args.name!r} added" + (f" with demonstrations from {source}" if source else "")
          + "; run it with `flywheel iterate --domain " + args.name + "` or from the Dagster UI (`flywheel ui`)")
    return 0


def cmd_gc(args) -> int:
    from flywheel.retention import Policy, apply, plan
    from flywheel.store import resolve_home

    policy = Policy(keep_datasets=args.keep_datasets, min_age_s=args.min_age_hours * 3600)
    home = resolve_home(args.home)
    if args.dry_run:
        current = plan(home, policy)
        print("\n".join(current.lines()))
        print(f"(dry run: nothing deleted; `flywheel gc --home {home}` deletes these)")
        return 0
    removal = apply(home, policy)
    for name in removal.removed:
        print(f"removed {name}")
    for name, why in removal.skipped.items():
        print(f"kept {name}: {why}")
    print(f"freed {removal.freed_bytes / 1e6:.1f} MB in {len(removal.removed)} item(s)")
    return 0


def cmd_adapters_import(args) -> int:
    from flywheel.config import load_config
    from flywheel.decisions import import_adapter_file

    config = load_config(args.config, overrides={"home": args.home} if args.home else None, set_args=args.set or [])
    version, adapter_dir = import_adapter_file(
        config, Path(args.path), args.domain, alpha=args.alpha, rank=args.rank,
        actor=f"user {os.environ.get('USER', 'unknown')} via `flywheel adapters import`")
    print(f"imported {args.path} as flywheel-{args.domain} v{version} (candidate, lineage external): {adapter_dir}\n"
          f"it becomes champion only through the adapter gate: `flywheel evaluate --domain {args.domain} --only "
          f"--set evaluate.adapter={version}` evaluates it against the base model and the champion and decides")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from flywheel.lineage.cli import add_adapters_parser
    from flywheel.pipeline import STAGE_LIST

    parser = argparse.ArgumentParser(
        prog="flywheel",
        description="Adapt Cosmos Predict 2.5 to your robot with LoRA/DoRA, generate synthetic trajectories, keep "
        "the useful ones and fold them back into your LeRobot dataset.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__,
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks of expected errors too")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add_run_args(p):
        p.add_argument("--config", help="YAML merged over the defaults (see `flywheel config`)")
        p.add_argument("--home", help="flywheel home (default: $FLYWHEEL_HOME or ./.flywheel)")
        p.add_argument("--domain", help="the domain to run (default: the config's, pusht-rotated)")
        p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config value, e.g. train.steps=10")

    p = sub.add_parser("iterate", help="run a whole flywheel iteration (the Dagster job flywheel_iteration)")
    add_run_args(p)
    p.add_argument("--iterations", type=int, default=1, metavar="N",
                   help="run N iterations in a row, each ingesting the dataset version the previous one refreshed")
    p.set_defaults(func=lambda a: cmd_run(a, None))
    for stage in STAGE_LIST:
        p = sub.add_parser(stage.command, help=f"{stage.help} (the job up to {stage.asset}; upstream results are reused)")
        add_run_args(p)
        p.add_argument("--only", action="store_true", help=f"materialize {stage.asset} alone, on the domain's latest "
                                                           "upstream results (an experiment: e.g. other seeds)")
        p.set_defaults(func=lambda a, s=stage.asset: cmd_run(a, s))

    p = sub.add_parser("config", help="print the default config (every key documented), or validate a config file")
    p.add_argument("--show-defaults", action="store_true", help="print the default config (the default action)")
    p.add_argument("--validate", metavar="FILE", help="validate FILE (merged over the defaults) and exit")
    p.set_defaults(func=cmd_config)

    p = sub.add_parser("ui", help="start the Dagster UI and the MLflow UI on the flywheel home")
    p.add_argument("--home", help="flywheel home (default: $FLYWHEEL_HOME or ./.flywheel)")
    p.add_argument("--port", type=int, default=3000)
    p.add_argument("--mlflow-port", type=int, default=5000)
    p.set_defaults(func=cmd_ui)

    p = sub.add_parser("domain", help="manage domains (Dagster partitions: a robot cell, camera view or task family)")
    domain_sub = p.add_subparsers(dest="domain_command", required=True, metavar="ACTION")
    p = domain_sub.add_parser("add", help="add a domain partition, optionally with its demonstrations source")
    p.add_argument("name", help="domain name: lowercase letters, digits, '-' and '_'")
    p.add_argument("--source", help="LeRobot dataset root (v3.0 or v2.1) or raw video folder for the domain")
    p.add_argument("--camera-key", help="camera to use (default: the dataset's first)")
    p.add_argument("--home", help="flywheel home (default: $FLYWHEEL_HOME or ./.flywheel)")
    p.set_defaults(func=cmd_domain_add)

    p = sub.add_parser("gc", help="delete what no champion, candidate, recent dataset version or running iteration "
                                  "needs (lineage-aware); --dry-run lists it with sizes")
    p.add_argument("--home", help="flywheel home (default: $FLYWHEEL_HOME or ./.flywheel)")
    p.add_argument("--dry-run", action="store_true", help="list what would go and its size, delete nothing")
    p.add_argument("--keep-datasets", type=int, default=3, metavar="N", help="newest dataset versions kept per domain")
    p.add_argument("--min-age-hours", type=float, default=1.0, metavar="H", help="artifacts younger than this stay")
    p.set_defaults(func=cmd_gc)

    adapters = add_adapters_parser(sub)
    actions = next(a for a in adapters._actions if isinstance(a, argparse._SubParsersAction))
    p = actions.add_parser("import", help="register a LoRA/DoRA adapter trained elsewhere (diffusers recipe file, "
                                          "peft dir) as a candidate, after checking it against the base model")
    p.add_argument("path", help="pytorch_lora_weights.safetensors, or a directory holding it / a peft adapter")
    p.add_argument("--domain", required=True, help="the domain whose adapter line it joins")
    p.add_argument("--alpha", type=float, default=None, help="LoRA alpha, required when the file does not record it")
    p.add_argument("--rank", type=int, default=None, help="LoRA rank, checked against the file's")
    p.add_argument("--config", help="YAML merged over the defaults: its model.preset is the base checked against")
    p.add_argument("--home", help="flywheel home (default: $FLYWHEEL_HOME or ./.flywheel)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="e.g. model.preset=tiny")
    p.set_defaults(func=cmd_adapters_import)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    debug = args.debug or os.environ.get("FLYWHEEL_DEBUG", "") not in ("", "0")
    try:
        return args.func(args)
    except FlywheelError as e:
        if debug:
            traceback.print_exc()
        kind = "refused" if isinstance(e, DecisionRefused) else "error"
        print(f"{kind}: {e}", file=sys.stderr)
        return EXIT_REFUSED
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
