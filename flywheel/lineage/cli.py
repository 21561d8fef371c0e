"""`flywheel adapters list | show | lineage | promote | rollback`: adapter governance from a terminal.

Wired into `flywheel/cli.py` through `add_adapters_parser(subparsers)`; also runnable on its own:
    python -m flywheel.lineage.cli adapters list --home .flywheel
Human-readable tables by default, `--json` for scripts. Importing this module does not import mlflow.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

LIST_COLUMNS = ("domain", "version", "aliases", "lineage", "iteration", "method", "rank", "alpha", "parent_version", "gate",
                "created")


def add_adapters_parser(subparsers) -> argparse.ArgumentParser:
    adapters = subparsers.add_parser("adapters", help="adapter versions: list, show, lineage, promote, rollback")
    adapters.set_defaults(func=run_adapters_command)  # for a top-level CLI that dispatches on args.func
    actions = adapters.add_subparsers(dest="adapters_command", required=True)

    def common(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
        parser.add_argument("--home", default=None, help="flywheel home (default $FLYWHEEL_HOME or ./.flywheel)")
        parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
        return parser

    listing = common(actions.add_parser("list", help="adapter versions, newest first"))
    listing.add_argument("--domain", default=None)
    listing.set_defaults(adapters_handler=_list)

    show = common(actions.add_parser("show", help="one adapter version (default: champion)"))
    show.add_argument("domain")
    show.add_argument("version", nargs="?", default=None)
    show.set_defaults(adapters_handler=_show)

    lineage = common(actions.add_parser("lineage", help="what an adapter came from and produced, or where a synthetic episode came from"))
    lineage.add_argument("domain")
    lineage.add_argument("version", nargs="?", default=None, help="adapter version (default: champion)")
    lineage.add_argument("--dataset", default=None, help="refreshed dataset version digest (with --episode)")
    lineage.add_argument("--episode", type=int, default=None, help="episode index in --dataset")
    lineage.add_argument("--synthetic-set", default=None, help="synthetic set digest (with --episode-id)")
    lineage.add_argument("--episode-id", default=None, help="episode id in --synthetic-set")
    lineage.set_defaults(adapters_handler=_lineage)

    promote = common(actions.add_parser("promote", help="make a version champion if its recorded evaluation passes "
                                                        "the adapter gate (gates.adapter of the config)"))
    promote.add_argument("domain")
    promote.add_argument("version")
    promote.add_argument("--config", default=None, help="YAML whose gates.adapter criteria apply (default: the defaults)")
    promote.add_argument("--set", action="append", metavar="KEY=VALUE", help="e.g. gates.adapter.max_ssim_drop=0.02")
    promote.add_argument("--reason", default="")
    promote.set_defaults(adapters_handler=_promote)

    rollback = common(actions.add_parser("rollback", help="move champion back to an earlier champion"))
    rollback.add_argument("domain")
    rollback.add_argument("--to", dest="to_version", default=None, help="earlier champion version (default: the previous one)")
    rollback.add_argument("--reason", default="")
    rollback.set_defaults(adapters_handler=_rollback)
    return adapters


def run_adapters_command(args: argparse.Namespace) -> int:
    """Dispatch a parsed `adapters ...` command. Expected errors (flywheel.errors: a refused promotion or
    rollback, an unknown version) reach the `flywheel` command's handler: one line, exit code 2."""
    from mlflow.exceptions import MlflowException  # e.g. "Model Version ... not found"

    from flywheel.errors import DataError

    try:
        args.adapters_handler(args)
    except (LookupError, MlflowException) as err:
        raise DataError(str(err).splitlines()[0]) from None
    return 0


def _list(args) -> None:
    from flywheel.lineage.registry import list_adapters

    rows = list_adapters(args.home, args.domain)
    if args.json:
        return _print_json(rows)
    if not rows:
        print("no adapters registered" + (f" for domain {args.domain}" if args.domain else ""))
        return None
    _print_table(rows, LIST_COLUMNS)


def _show(args) -> None:
    from flywheel.lineage.registry import champion_stack, governance_history, show_adapter

    info = show_adapter(args.home, args.domain, args.version)
    history = governance_history(args.home, args.domain)
    if args.json:
        return _print_json(info | {"champion_stack": champion_stack(args.home, args.domain), "history": history})
    for key in ("registered_model", "version", "aliases", "description", "lineage", "base_model", "method", "rank",
                "alpha", "iteration", "parent_version", "adapter_digest", "training_dataset_digest", "training_run_id",
                "model_id", "gate", "url"):
        print(f"{key:>24}  {info[key]}")
    for label, metrics in (("eval", info["eval"]), ("base eval", info["base_eval"])):
        if metrics:
            print(f"{label:>24}  " + ", ".join(f"{k}={v:.6g}" for k, v in sorted(metrics.items())))
    if history:
        print("\ngovernance history:")
        _print_table(history, ("event", "version", "previous_champion", "actor", "reasons", "reason", "run_id"))


def _lineage(args) -> None:
    from flywheel.lineage.query import ancestry_of_adapter, lineage_of_synthetic_episode, products_of_adapter
    from flywheel.lineage.registry import champion_version

    if args.dataset or args.synthetic_set:
        result = lineage_of_synthetic_episode(
            args.home, args.domain, dataset_digest=args.dataset, episode_index=args.episode,
            synthetic_set_digest=args.synthetic_set, episode_id=args.episode_id,
        )
        if args.json:
            return _print_json(result)
        adapter = result["adapter"] or {}
        if "dataset_digest" in result:
            print(f"{'dataset episode':>16}  {result['dataset_digest'][:16]} #{result['episode_index']}")
        for key, value in (
            ("synthetic set", f"{result['synthetic_set_digest'][:16]} / {result['episode_id']}"),
            ("prompt", result["prompt"]),
            ("seed", result["seed"]),
            ("adapter version", adapter.get("version", "none (base model)")),
            ("base model", f"{adapter.get('base_model_id', result['base_model_id'])}@{adapter.get('base_revision', '')}"),
            ("training data", adapter.get("training_dataset_digest", "")),
            ("generation run", result["generation_run_id"]),
        ):
            print(f"{key:>16}  {value}")
        return None
    version = args.version or champion_version(args.home, args.domain)
    if version is None:
        raise LookupError(f"domain {args.domain} has no champion; name a version")
    ancestry = ancestry_of_adapter(args.home, args.domain, version)
    products = products_of_adapter(args.home, args.domain, version)
    if args.json:
        return _print_json({"ancestry": ancestry, "products": products})
    print(f"adapter {ancestry[0]['registered_model']} v{version}, ancestry (newest first):")
    _print_table(ancestry, ("version", "iteration", "method", "base_model_id", "base_revision", "training_dataset_digest", "parent_version"))
    print("\nsynthetic sets generated:")
    _print_table(products["synthetic_sets"], ("digest", "iteration", "run_id")) if products["synthetic_sets"] else print("  none")
    print("\ndataset versions folding them in:")
    _print_table(products["dataset_versions"], ("digest", "run_id")) if products["dataset_versions"] else print("  none")


def _actor(args) -> str:
    return f"user {os.environ.get('USER', 'unknown')} via `flywheel adapters {args.adapters_command}`"


def _promote(args) -> None:
    from flywheel.config import load_config
    from flywheel.decisions import promote_by_hand

    gate = load_config(args.config, set_args=args.set or []).gates.adapter
    decision = promote_by_hand(args.home, args.domain, str(args.version), gate, _actor(args))
    if args.json:
        return _print_json(decision.model_dump())
    print(f"flywheel-{args.domain} v{args.version} is now champion: {decision.line()}")


def _rollback(args) -> None:
    from flywheel.decisions import rollback

    decision = rollback(args.home, args.domain, args.to_version, _actor(args), reason=args.reason)
    if args.json:
        return _print_json(decision.model_dump())
    print(decision.line())


def _print_json(payload: Any) -> None:
    print(json.dumps(payload, indent=2, sort_keys=True, default=str))


def _print_table(rows: list[dict[str, Any]], columns: tuple[str, ...]) -> None:
    def cell(value: Any) -> str:
        text = ",".join(value) if isinstance(value, list) else ("" if value is None else str(value))
        return text[:16] if len(text) == 64 else text  # full sha256 digests are unreadable in a table

    cells = [[cell(row.get(c)) for c in columns] for row in rows]
    widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(columns)]
    print("  ".join(c.upper().ljust(w) for c, w in zip(columns, widths)))
    for row in cells:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths)))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="flywheel", description="flywheel adapter governance")
    subparsers = parser.add_subparsers(dest="command", required=True)
    add_adapters_parser(subparsers)
    args = parser.parse_args(argv)
    return run_adapters_command(args)


if __name__ == "__main__":
    sys.exit(main())
