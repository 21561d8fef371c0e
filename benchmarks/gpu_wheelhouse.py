"""Build a wheelhouse for installing flywheel on a GPU host with no internet, and plan how it travels there.

The wheels are exactly the versions in uv.lock (their sha256 checked against it), for the GPU host's platform
(Linux x86_64, CPython 3.12), fetched with `pip download`. Two selections:

    --profile run        (default) what a flywheel run needs (`flywheel iterate`, the Dagster job, its Pipes workloads)
                         and the GPU host lacks: the lock's runtime packages minus those its image already holds
                         (HOST_PACKAGES, from the device notes' package list, or `--host-freeze` with a `pip freeze`
                         taken there), and minus what only `flywheel ui` (dagster-webserver), the k8s backend
                         (dagster-k8s) and the PushT simulator (gym-pusht, pygame) use. The host's own torch,
                         transformers, numpy, ... are used as they are.
    --profile gpu-host   the same with those four: every flywheel feature on the GPU host.
    --profile all        every runtime package of the lock: a cluster node with Python 3.12 and nothing else.

The device tool carries at most 64 MiB per call, the working tree included. So the wheelhouse is packed into one
tar stream cut into parts that each fit beside the tree (`--part-mib`, default: 64 MiB minus the tree minus 2 MiB);
each call carries one part to /tmp/wheelhouse-parts on the warm machine, and the last one joins them and installs
every wheel with `pip install --no-index --no-deps --target /tmp/site`. The script prints those commands.

    .venv/bin/python benchmarks/gpu_wheelhouse.py                 # -> tmp/wheelhouse/ (ignored by git)
    .venv/bin/python benchmarks/gpu_wheelhouse.py --profile all --out wheelhouse-all --no-parts

Procedure and measured sizes: docs/gpu.md.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import re
import shutil
import subprocess
import sys
import tarfile
import tomllib
from pathlib import Path

from packaging.markers import Marker
from packaging.requirements import Requirement
from packaging.tags import compatible_tags, cpython_tags
from packaging.utils import parse_wheel_filename

REPO_ROOT = Path(__file__).resolve().parents[1]
DEVICE_CALL_MIB = 64
MARGIN_MIB = 2
INSTALL_DIR = "/tmp/site"
PARTS_DIR = "/tmp/wheelhouse-parts"

# The target: the GPU host's interpreter and platform (pip needs the manylinux tags spelled out).
TARGET_ENV = {"implementation_name": "cpython", "platform_machine": "x86_64", "platform_python_implementation": "CPython",
              "platform_system": "Linux", "python_full_version": "3.12.3", "python_version": "3.12",
              "sys_platform": "linux", "os_name": "posix", "platform_release": "", "platform_version": "",
              "implementation_version": "3.12.3"}
# pip matches a manylinux tag exactly, so every glibc version up to the host's (2.39) is listed, newest first.
PLATFORMS = [f"manylinux_2_{minor}_x86_64" for minor in range(39, 4, -1)] + [
    "manylinux2014_x86_64", "manylinux2010_x86_64", "manylinux1_x86_64", "linux_x86_64"]

# Python packages of the device machines' image ('cuda'), as the device notes list them (read 2026-11-17).
HOST_PACKAGES = """
absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs botorch build certifi
charset-normalizer chex click cloudpickle cmake colorama contourpy coverage cuda-bindings cuda-core cuda-pathfinder
cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn einops equinox etils execnet filelock flatbuffers flax fonttools
formulaic frozenlist fsspec gpytorch grpcio h11 h5py hf-xet httpcore httpx huggingface-hub humanize hypothesis idna
imageio iniconfig interface-meta jax jax-cuda13-pjrt jax-cuda13-plugin jaxlib jaxtyping jinja2 joblib kiwisolver
lazy-loader lightning lightning-utilities linear-operator lineax llvmlite lxml markdown markdown-it-py markupsafe
matplotlib mdurl meson ml-dtypes mpi4py mpmath msgpack multidict multipledispatch mypy-extensions nanobind narwhals
networkx ninja numba numba-cuda numpy numpyro nvidia-cublas nvidia-cuda-cupti nvidia-cuda-nvrtc nvidia-cuda-runtime
nvidia-cudnn-cu13 nvidia-cufft nvidia-cufile nvidia-curand nvidia-cusolver nvidia-cusparse nvidia-cusparselt-cu13
nvidia-ml-py nvidia-nccl-cu13 nvidia-nvjitlink nvidia-nvshmem-cu13 nvidia-nvtx onnx onnx-ir onnxruntime onnxscript
opencv-python-headless optax opt-einsum opt-einsum-fx optimistix orbax-checkpoint packaging pandas pathspec patsy peft
pillow pip pluggy portalocker prometheus-client propcache protobuf psutil pyarrow pybind11 py-cpuinfo pygments
pyparsing pyproject-hooks pyre-extensions pytest pytest-benchmark pytest-cov pytest-mock pytest-timeout pytest-xdist
python-dateutil pytorch-lightning pyyaml regex requests rich sacrebleu safetensors scikit-build-core scikit-image
scikit-learn scipy seaborn sentencepiece sentence-transformers setuptools shellingham simplejson six sortedcontainers
statsmodels sympy tabulate tensorboard tensorboard-data-server tensorstore threadpoolctl tifffile tiktoken timm
tokenizers toolz torch torchaudio torchdiffeq torch-geometric torchmetrics torchvision tqdm transformers treescope
triton typer typing-extensions typing-inspect urllib3 uvloop wadler-lindig werkzeug wheel wrapt xarray xxhash yarl zipp
""".split()

# Never carried to the GPU host even when it lacks them: opencv-python's GUI build would shadow the host's headless
# cv2 (flywheel needs only one of them), and torchcodec needs FFmpeg's shared libraries, which the host image lacks
# (flywheel reads every LeRobot video with video_backend="pyav").
GPU_HOST_SKIP = {"opencv-python", "torchcodec"}


# Project dependencies that a run never imports: the UI server, the k8s backend, the PushT simulator.
NOT_FOR_RUNS = {"dagster-webserver", "dagster-graphql", "dagster-k8s", "gym-pusht"}


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def locked_requirements() -> list[tuple[str, str, list[str]]]:
    """(name, version, sha256 hashes) of every runtime package uv.lock installs on the target platform."""
    text = subprocess.run(["uv", "export", "--frozen", "--no-dev", "--no-emit-project", "--format", "requirements-txt"],
                          cwd=REPO_ROOT, check=True, capture_output=True, text=True).stdout
    entries, current = [], None
    for raw in text.splitlines():
        line = raw.strip().rstrip("\\").strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("--hash=sha256:"):
            current[2].append(line.removeprefix("--hash=sha256:"))
            continue
        requirement = Requirement(line)
        if requirement.marker is not None and not Marker(str(requirement.marker)).evaluate(TARGET_ENV):
            current = (None, None, [])
            continue
        (pin,) = requirement.specifier
        current = (requirement.name, pin.version, [])
        entries.append(current)
    return [e for e in entries if e[0] is not None]


def _applies(dependency: dict) -> bool:
    return "marker" not in dependency or Marker(dependency["marker"]).evaluate(TARGET_ENV)


def lock_closure(leave_out: set[str]) -> set[str]:
    """Names of the packages the project's runtime dependencies pull in on the target (uv.lock's graph, extras and
    markers followed), without the project dependencies in `leave_out` (and what only they need)."""
    lock = tomllib.loads((REPO_ROOT / "uv.lock").read_text())
    packages = {normalize(p["name"]): p for p in lock["package"]}
    todo = [(normalize(d["name"]), tuple(d.get("extra", []))) for d in packages["flywheel"]["dependencies"]
            if _applies(d) and normalize(d["name"]) not in leave_out]
    seen: set[tuple[str, tuple]] = set()
    while todo:
        name, extras = todo.pop()
        if (name, extras) in seen:
            continue
        seen.add((name, extras))
        package = packages[name]
        optional = package.get("optional-dependencies", {})
        for dependency in package.get("dependencies", []) + [d for e in extras for d in optional.get(e, [])]:
            if _applies(dependency):
                todo.append((normalize(dependency["name"]), tuple(dependency.get("extra", []))))
    return {name for name, _ in seen}


def target_tags() -> list:
    """The wheel tags the GPU host's CPython 3.12 accepts, most specific first (what pip ranks by)."""
    return [*cpython_tags((3, 12), abis=["cp312"], platforms=PLATFORMS),
            *compatible_tags((3, 12), interpreter="cp312", platforms=PLATFORMS)]


def planned_sizes(selected: list[tuple[str, str, list[str]]]) -> dict[str, int]:
    """Bytes of the wheel pip would pick for each package, from uv.lock's file list (no download): what
    `--profile all` weighs (torch and the CUDA libraries included) without fetching gigabytes."""
    lock = tomllib.loads((REPO_ROOT / "uv.lock").read_text())
    files = {(normalize(p["name"]), p["version"]): p.get("wheels", []) for p in lock["package"]}
    rank = {tag: i for i, tag in enumerate(target_tags())}
    sizes = {}
    for name, version, _ in selected:
        best = None
        for wheel in files[(normalize(name), version)]:
            tags = parse_wheel_filename(wheel["url"].rsplit("/", 1)[-1])[3]
            score = min((rank[t] for t in tags if t in rank), default=None)
            if score is not None and (best is None or score < best[0]):
                best = (score, wheel["size"])
        if best is None:
            raise SystemExit(f"uv.lock has no wheel of {name}=={version} for CPython 3.12 on Linux x86_64")
        sizes[f"{name}=={version}"] = best[1]
    return sizes


def host_packages(freeze: Path | None) -> set[str]:
    if freeze is None:
        return {normalize(n) for n in HOST_PACKAGES}
    names = set()
    for line in freeze.read_text().splitlines():
        match = re.match(r"^([A-Za-z0-9][A-Za-z0-9._-]*)\s*(==|@)", line.strip())
        if match:
            names.add(normalize(match.group(1)))
    return names


def find_pip() -> list[str]:
    for python in (sys.executable, shutil.which("python3") or "python3"):
        if subprocess.run([python, "-m", "pip", "--version"], capture_output=True).returncode == 0:
            return [python, "-m", "pip"]
    raise SystemExit("no pip found: run with a Python that has pip, or install pip for python3")


def download(selected: list[tuple[str, str, list[str]]], dest: Path) -> None:
    """pip download of exactly these versions for the target platform, checked against the lock's hashes."""
    dest.mkdir(parents=True, exist_ok=True)
    requirements = dest / "requirements.txt"
    requirements.write_text("".join(f"{name}=={version} " + " ".join(f"--hash=sha256:{h}" for h in hashes) + "\n"
                                    for name, version, hashes in selected))
    platforms = [arg for p in PLATFORMS for arg in ("--platform", p)]
    subprocess.run([*find_pip(), "download", "--quiet", "--no-deps", "--only-binary=:all:", "--require-hashes",
                    "--python-version", "3.12", "--implementation", "cp", *platforms, "-d", str(dest),
                    "-r", str(requirements)], check=True)


def tree_mib() -> float:
    """What the device tool sends besides the carried paths: tracked and untracked-not-ignored files."""
    files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO_ROOT,
                           check=True, capture_output=True).stdout.split(b"\0")
    paths = [REPO_ROOT / f.decode() for f in files if f]
    shared = REPO_ROOT / "shared"  # travels whole where the checkout has one
    if shared.is_dir():
        paths += [p for p in shared.rglob("*") if not p.is_relative_to(REPO_ROOT / "shared" / ".git")]
    return sum(p.stat().st_size for p in set(paths) if p.is_file()) / 2**20


def pack_parts(wheels: list[Path], out: Path, part_mib: float) -> list[Path]:
    """One uncompressed tar of the wheels (they are zip files already), cut into parts of at most `part_mib`."""
    bundle = out / "wheels.tar"
    with tarfile.open(bundle, "w") as tar:
        for wheel in sorted(wheels):
            tar.add(wheel, arcname=wheel.name)
    size, part_bytes = bundle.stat().st_size, int(part_mib * 2**20)
    count = max(1, math.ceil(size / part_bytes))
    parts = []
    with open(bundle, "rb") as src:
        for i in range(count):
            part = out / f"part-{i + 1:02d}-of-{count:02d}"
            part.write_bytes(src.read(part_bytes))
            parts.append(part)
    bundle.unlink()
    return parts


def install_commands(parts: list[Path], out: Path) -> list[str]:
    """The device commands, one per call, that bring the parts over and install them into INSTALL_DIR (the last
    one can go on with the work: docs/gpu.md starts the iteration benchmark there)."""
    rel = out.resolve().relative_to(REPO_ROOT)
    commands = []
    for i, part in enumerate(parts, 1):
        command = f"mkdir -p {PARTS_DIR} && cp {rel}/{part.name} {PARTS_DIR}/"
        if i == len(parts):
            command += (f" && mkdir -p /tmp/wheelhouse && cat {PARTS_DIR}/part-* | tar -x -C /tmp/wheelhouse"
                        f" && python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade"
                        f" --target {INSTALL_DIR} /tmp/wheelhouse/*.whl || exit 1; export PYTHONPATH={INSTALL_DIR};"
                        f" python3 -m pip check | head -20; python3 -c 'import dagster, mlflow, lerobot, av, diffusers;"
                        f" print(\"installed\", dagster.__version__, mlflow.__version__, diffusers.__version__)'")
        commands.append(f"carry [\"{rel}/{part.name}\"]: {command}")
    return commands


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--profile", choices=["run", "gpu-host", "all"], default="run")
    parser.add_argument("--host-freeze", type=Path, help="`pip freeze` of the GPU host (default: HOST_PACKAGES)")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "tmp" / "wheelhouse")
    parser.add_argument("--part-mib", type=float, help="largest part (default: 64 MiB - working tree - 2 MiB)")
    parser.add_argument("--no-parts", action="store_true", help="keep the wheels as files (a cluster copy, no device)")
    parser.add_argument("--plan-only", action="store_true", help="print what would be fetched and its size (from "
                                                                 "uv.lock's file list), download nothing")
    args = parser.parse_args(argv)

    locked = locked_requirements()
    wanted = lock_closure(NOT_FOR_RUNS if args.profile == "run" else set())
    selected = [e for e in locked if normalize(e[0]) in wanted]
    if args.profile != "all":
        have = host_packages(args.host_freeze)
        selected = [e for e in selected if normalize(e[0]) not in have and normalize(e[0]) not in GPU_HOST_SKIP]
    planned = planned_sizes(selected)
    if args.plan_only:
        total = sum(planned.values()) / 2**20
        largest = sorted(((round(b / 2**20, 1), n) for n, b in planned.items()), reverse=True)[:8]
        print(f"profile {args.profile}: {len(selected)} wheels, {total:.1f} MiB")
        print("largest:", ", ".join(f"{n} {mib} MiB" for mib, n in largest))
        return {"profile": args.profile, "packages": len(selected), "total_mib": round(total, 1), "largest": largest}
    out = args.out.resolve()
    if out.exists():
        shutil.rmtree(out)
    wheels_dir = out / "wheels"
    download(selected, wheels_dir)
    wheels = sorted(wheels_dir.glob("*.whl"))
    sizes = {w.name: w.stat().st_size for w in wheels}
    if sum(sizes.values()) != sum(planned.values()):  # pip picked other files than uv.lock's best match
        print(f"note: downloaded {sum(sizes.values())} bytes, uv.lock's best matches weigh {sum(planned.values())}")
    total_mib = sum(sizes.values()) / 2**20
    report = {"profile": args.profile, "packages": len(selected), "wheels": len(wheels),
              "total_mib": round(total_mib, 1), "largest": sorted(((round(s / 2**20, 1), n) for n, s in sizes.items()),
                                                                  reverse=True)[:8],
              "selected": [f"{n}=={v}" for n, v, _ in selected]}
    if not args.no_parts:
        tree = tree_mib()
        part_mib = args.part_mib or DEVICE_CALL_MIB - tree - MARGIN_MIB
        if part_mib < 4:
            raise SystemExit(f"the working tree is {tree:.1f} MiB: no room beside it for wheels in a 64 MiB call")
        parts = pack_parts(wheels, out, part_mib)
        shutil.rmtree(wheels_dir)
        (out / "requirements.txt").unlink(missing_ok=True)
        report.update(tree_mib=round(tree, 1), part_mib=round(part_mib, 1), parts=[p.name for p in parts],
                      device_commands=install_commands(parts, out))
    (out / "wheelhouse.json").write_text(json.dumps(report, indent=2))
    print(f"{report['wheels']} wheels ({report['packages']} packages, profile {args.profile}): {total_mib:.1f} MiB "
          f"in {out}")
    print("largest:", ", ".join(f"{n} {s} MiB" for s, n in report["largest"]))
    for i, command in enumerate(report.get("device_commands", []), 1):
        print(f"device call {i}: {command}")
    return report


if __name__ == "__main__":
    main()
