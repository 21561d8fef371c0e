"""Which peft versions can read the LoRA config an adapter file carries, before and after flywheel wrote it
portably.

diffusers' `load_lora_weights` rebuilds the adapter's config with `LoraConfig(**lora_adapter_metadata)`; a
field the installed peft does not know makes that a TypeError (diffusers: "`LoraConfig` class could not be
instantiated."), so a file written with peft 0.21's full `LoraConfig.to_dict()` cannot be loaded with an older
peft. This script writes real adapter files from the tiny pipeline with the current code (`save_adapter`) and
with the code before the change (flywheel/train/adapter_io.py at commit 7971738, loaded from git), installs
each listed peft release into its own throwaway folder (`uv pip install --no-deps --target`; nothing in the
project environment changes), and in a child process with that peft first on the path:

- builds `LoraConfig(**metadata)` (what diffusers does) and `LoraConfig.from_peft_type(**metadata)` (peft's
  own forward-compatible path, which drops unknown fields with a warning where the release has it);
- records whether each worked and the r, lora_alpha, use_dora and target_modules it got;
- lists the release's LoraConfig fields (PEFT_0_9_LORA_FIELDS in adapter_io is that list for 0.9.0).

    python benchmarks/peft_compat.py --out benchmarks/results     # ~2 min on a CPU; needs uv and the PyPI index

Writes <out>/peft-compat.json and <out>/peft-compat.md.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

BEFORE_COMMIT = "7971738"
DEFAULT_VERSIONS = ["0.9.0", "0.13.2", "0.15.2", "0.18.0", "0.20.0"]  # 0.16-0.17 do not import with transformers 5
CASES = [("lora", 16, 32.0), ("dora", 8, 8.0)]

CHILD = r"""
import dataclasses, json, sys, warnings
import peft
from peft import LoraConfig

out = {"peft": peft.__version__, "fields": sorted(f.name for f in dataclasses.fields(LoraConfig)), "files": {}}
for name, metadata in json.loads(sys.argv[1]).items():
    row = {}
    for how in ("LoraConfig(**metadata)", "LoraConfig.from_peft_type(**metadata)"):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                c = LoraConfig(**metadata) if how.startswith("LoraConfig(") else LoraConfig.from_peft_type(**metadata)
                row[how] = {"ok": True, "r": c.r, "lora_alpha": c.lora_alpha, "use_dora": getattr(c, "use_dora", None),
                            "target_modules": sorted(c.target_modules),
                            "warnings": [str(w.message)[:160] for w in caught if "Unexpected keyword" in str(w.message)]}
            except Exception as err:
                row[how] = {"ok": False, "error": f"{type(err).__name__}: {str(err)[:200]}"}
    out["files"][name] = row
print(json.dumps(out))
"""


def _module_from_commit(commit: str, path: str, name: str):
    source = subprocess.run(["git", "show", f"{commit}:{path}"], cwd=REPO, check=True, capture_output=True,
                            text=True).stdout
    file = Path(tempfile.mkdtemp()) / f"{name}.py"
    file.write_text(source)
    spec = importlib.util.spec_from_file_location(name, file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_adapters(root: Path) -> dict[str, dict]:
    """{"<code>-<method>": metadata} read back from adapter files written by the current and the old code."""
    import torch
    from safetensors import safe_open

    from flywheel.model.presets import load_pipeline
    from flywheel.train import TrainConfig
    from flywheel.train import adapter_io as current
    from flywheel.train.lora import add_training_adapter

    torch.set_num_threads(min(2, torch.get_num_threads()))
    before = _module_from_commit(BEFORE_COMMIT, "flywheel/train/adapter_io.py", "adapter_io_before")
    pipe = load_pipeline("tiny")
    metadata = {}
    for method, rank, alpha in CASES:
        for code, module in (("before", before), ("after", current)):
            add_training_adapter(pipe.transformer, TrainConfig(method=method, rank=rank, alpha=alpha))
            try:
                out = root / f"{code}-{method}"
                module.save_adapter(pipe.transformer, out, {"method": method, "rank": rank, "alpha": alpha})
            finally:
                current.remove_adapter(pipe)
            with safe_open(out / current.ADAPTER_WEIGHTS, framework="pt") as f:
                packed = json.loads(f.metadata()["lora_adapter_metadata"])
            metadata[f"{code}-{method} (r={rank}, alpha={alpha:g})"] = {
                k.removeprefix("transformer."): v for k, v in packed.items()}
    return metadata


def check_release(version: str, metadata: dict, work: Path) -> dict:
    target = work / f"peft-{version}"
    if not target.is_dir():
        subprocess.run(["uv", "pip", "install", "--quiet", "--no-deps", "--target", str(target), f"peft=={version}",
                        "--python", sys.executable], check=True)
    env = {**os.environ, "PYTHONPATH": str(target)}
    done = subprocess.run([sys.executable, "-c", CHILD, json.dumps(metadata)], env=env, capture_output=True, text=True)
    if done.returncode != 0:
        return {"peft": version, "import_error": done.stderr.strip().splitlines()[-1:]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def markdown(result: dict) -> str:
    lines = [f"# peft versions reading an adapter file's LoRA config ({result['date']}, {result['machine']})", "",
             "`LoraConfig(**metadata)` is what diffusers' `load_lora_weights` runs. before: flywheel at "
             f"{BEFORE_COMMIT} (full `LoraConfig.to_dict()` of peft {result['writer_peft']}); after: portable "
             "metadata (identity + non-default fields).", "",
             f"peft 0.9.0's LoraConfig fields equal adapter_io.PEFT_0_9_LORA_FIELDS: {result['fields_0_9_match']}. "
             f"Writer: peft {result['writer_peft']}, diffusers {result['diffusers']}, transformers "
             f"{result['transformers']}, Python {result['python']}.", "",
             "| peft | file | fields | `LoraConfig(**metadata)` | `from_peft_type` |", "|---|---|---|---|---|"]

    def cell(row: dict) -> str:
        if not row["ok"]:
            return "fails: " + row["error"].replace("|", "/")
        dropped = " (dropped unknown fields, warned)" if row.get("warnings") else ""
        return f"ok: r={row['r']} alpha={row['lora_alpha']:g} dora={row['use_dora']}{dropped}"

    for release in result["releases"]:
        if "import_error" in release:
            lines.append(f"| {release['peft']} | — | — | import failed: {release['import_error']} | |")
            continue
        for name, row in release["files"].items():
            fields = len(result["metadata"][name])
            lines.append(f"| {release['peft']} | {name} | {fields} | {cell(row['LoraConfig(**metadata)'])} | "
                         f"{cell(row['LoraConfig.from_peft_type(**metadata)'])} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--versions", nargs="+", default=DEFAULT_VERSIONS)
    args = parser.parse_args()
    import peft

    work = Path(tempfile.mkdtemp(prefix="peft-compat-"))
    metadata = write_adapters(work / "adapters")
    releases = [check_release(v, metadata, work) for v in args.versions]
    current = subprocess.run([sys.executable, "-c", CHILD, json.dumps(metadata)], capture_output=True, text=True,
                             check=True)
    releases.append(json.loads(current.stdout.strip().splitlines()[-1]))
    import diffusers
    import transformers

    from flywheel.train.adapter_io import PEFT_0_9_LORA_FIELDS

    fields_0_9 = next((r.get("fields") for r in releases if r.get("peft") == "0.9.0"), None)
    result = {"schema": "peft-compat/1", "date": datetime.date.today().isoformat(),
              "diffusers": diffusers.__version__, "transformers": transformers.__version__,
              "fields_0_9_match": None if fields_0_9 is None else set(fields_0_9) == PEFT_0_9_LORA_FIELDS,
              "machine": f"{platform.machine()} {platform.processor() or ''}".strip(), "python": platform.python_version(),
              "writer_peft": peft.__version__, "metadata": metadata, "releases": releases}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "peft-compat.json").write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
    (args.out / "peft-compat.md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
