"""The `flywheel` command: run a whole iteration or one stage, inspect config, start the UIs.

    flywheel iterate                      # a full iteration on the embedded default (tiny preset, PushT)
    flywheel iterate --iterations 3       # three in a row, each on the dataset version the last one refreshed
    flywheel iterate --config my.yaml     # your data, your model
    flywheel train --set train.steps=200  # run up to one stage (upstream stages are reused from cache)
    flywheel config --show-defaults       # the default config as YAML
    flywheel ui                           # Dagster UI (+ MLflow UI) on the flywheel home
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = Path(__file__).with_name("default_config.yaml")

STAGE_COMMANDS = {
    "ingest": ("demonstrations", "ingest demonstrations into an episode manifest"),
    "clips": ("training_clips", "cut training clips and cache their latents and text embeddings"),
    "train": ("adapter", "train a LoRA/DoRA adapter on the cached clips"),
    "evaluate": ("adapter_evaluation", "compare the adapter with the base model on held-out clips"),
    "generate": ("synthetic_videos", "generate synthetic videos from clip first frames"),
    "label": ("pseudo_actions", "label synthetic videos with the inverse dynamics model"),
    "curate": ("curated_trajectories", "run the quality filter stack"),
    "refresh": ("refreshed_dataset", "write a new LeRobot dataset version with the accepted episodes"),
}


def parse_set(values: list[str]) -> dict:
    """`--set train.steps=10 --set generate.seeds=[0,1]` -> nested dict (values parsed as YAML)."""
    out: dict = {}
    for item in values:
        if "=" not in item:
            raise SystemExit(f"--set {item!r}: expected KEY=VALUE, e.g. --set train.steps=10")
        key, value = item.split("=", 1)
        node = out
        parts = key.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = yaml.safe_load(value)
    return out


def load_run_config(args):
    from flywheel.config import ConfigError, load_config

    overrides = parse_set(args.set or [])
    if args.home:
        overrides["home"] = args.home
    path = Path(args.config) if args.config else DEFAULT_CONFIG
    try:
        config = load_config(path, overrides)
    except ConfigError as e:
        raise SystemExit(str(e)) from None
    source = Path(config.ingest.source)
    if not source.is_absolute() and not source.exists() and (REPO_ROOT / source).exists():
        config.ingest.source = str(REPO_ROOT / source)
    return config


def cmd_run(args, until: str | None) -> int:
    from flywheel.iteration import run_iteration, run_iterations

    config = load_run_config(args)
    count = getattr(args, "iterations", 1)
    if count < 1:
        raise SystemExit(f"--iterations {count}: give 1 or more")
    if count == 1:
        results = run_iteration(config, until=until)
    else:
        history = run_iterations(config, count)
        print("\niterations:")
        for turn, done in enumerate(history, 1):
            demos, refreshed = done["demonstrations"], done["refreshed_dataset"]
            print(f"  {turn}: {demos.metadata.get('episodes')} episodes in -> "
                  f"+{refreshed.metadata.get('synthetic_episodes', 0)} synthetic -> {refreshed.path}")
        results = history[-1]
    print("\noutputs:")
    for name, r in results.items():
        print(f"  {name:22s} {r.path}")
        if r.preview:
            print(f"  {'':22s} preview: {r.preview}")
    return 0


def cmd_config(args) -> int:
    if args.validate:
        from flywheel.config import ConfigError, load_config

        try:
            load_config(args.validate)
        except ConfigError as e:
            print(e, file=sys.stderr)
            return 2
        print(f"{args.validate}: ok")
        return 0
    print(DEFAULT_CONFIG.read_text())
    return 0


def cmd_ui(args) -> int:
    from flywheel.defs.ui import start_ui

    return start_ui(home=args.home, port=args.port, mlflow_port=args.mlflow_port) or 0


def cmd_domain_add(args) -> int:
    from flywheel.defs.domains import add_domain

    ingest = {"camera_key": args.camera_key} if args.camera_key else {}
    source = str(Path(args.source).resolve()) if args.source else None
    add_domain(args.name, source=source, home=args.home, **ingest)
    print(f"domain {args.name!r} added" + (f" with demonstrations from {source}" if source else "")
          + "; materialize its assets from the Dagster UI (`flywheel ui`)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="flywheel",
        description="Adapt Cosmos Predict 2.5 to your robot with LoRA/DoRA, generate synthetic trajectories, keep "
        "the useful ones and fold them back into your LeRobot dataset.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add_run_args(p):
        p.add_argument("--config", help="YAML config (default: the embedded default, see `flywheel config`)")
        p.add_argument("--home", help="flywheel home (default: $FLYWHEEL_HOME or ./.flywheel)")
        p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config value, e.g. train.steps=10")

    p = sub.add_parser("iterate", help="run a whole flywheel iteration")
    add_run_args(p)
    p.add_argument("--iterations", type=int, default=1, metavar="N",
                   help="run N iterations in a row, each ingesting the dataset version the previous one refreshed")
    p.set_defaults(func=lambda a: cmd_run(a, None))
    for command, (stage, help_text) in STAGE_COMMANDS.items():
        p = sub.add_parser(command, help=f"{help_text} (runs upstream stages first, reusing cached results)")
        add_run_args(p)
        p.set_defaults(func=lambda a, s=stage: cmd_run(a, s))

    p = sub.add_parser("config", help="print the default config, or validate a config file")
    p.add_argument("--show-defaults", action="store_true", help="print the default config (the default action)")
    p.add_argument("--validate", metavar="FILE", help="validate FILE and exit (2 on errors)")
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

    try:
        from flywheel.lineage.cli import add_adapters_parser
    except ImportError:
        pass
    else:
        add_adapters_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
