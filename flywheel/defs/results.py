"""Stage results <-> Dagster events: what an asset reports, and how the next asset finds it.

Large data never goes through IO managers. An asset writes its artifact to the flywheel home and reports
its path, key (content hash, also the asset's data version) and the numbers an operator wants
(flywheel.stages.StageResult.as_metadata); the next asset reads the latest materialization of its upstream
for the same domain back into a StageResult. Re-materializing one asset
(e.g. `synthetic_videos` with more seeds) so reuses every upstream result instead of recomputing it.
"""

from __future__ import annotations

import base64
import io
import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import dagster as dg

from flywheel.stages import PATH_KEYS, StageResult

# What an asset's metadata holds for the UI only: not read back as part of the stage's result.
UI_ONLY = ("preview_image", "size_mb", "inputs")
PREVIEW_MAX_WIDTH = 1024
PREVIEW_MAX_BYTES = 450_000  # metadata lives in the event log: keep the embedded image small


def dagster_metadata(meta: dict[str, Any]) -> dict[str, dg.MetadataValue]:
    out: dict[str, dg.MetadataValue] = {}
    for k, v in meta.items():
        if k in PATH_KEYS and isinstance(v, str):
            out[k] = dg.MetadataValue.path(v)
        elif isinstance(v, bool):
            out[k] = dg.MetadataValue.bool(v)
        elif isinstance(v, int):
            out[k] = dg.MetadataValue.int(v)
        elif isinstance(v, float):  # 4 significant digits: for reading (the artifact keeps the exact values)
            out[k] = dg.MetadataValue.float(float(f"{v:.4g}")) if math.isfinite(v) else dg.MetadataValue.text(str(v))
        elif isinstance(v, (dict, list, tuple)):
            out[k] = dg.MetadataValue.json(v if not isinstance(v, tuple) else list(v))
        elif v is None:
            out[k] = dg.MetadataValue.null()
        else:
            out[k] = dg.MetadataValue.text(str(v))
    return out


def preview_markdown(image: str | Path | None, title: str = "preview") -> dg.MetadataValue | None:
    """An image (contact sheet, loss curve) embedded as markdown, so the asset page shows it."""
    if not image or not Path(image).is_file():
        return None
    from PIL import Image

    with Image.open(image) as im:
        im = im.convert("RGB")
        if im.width > PREVIEW_MAX_WIDTH:
            im = im.resize((PREVIEW_MAX_WIDTH, round(im.height * PREVIEW_MAX_WIDTH / im.width)), Image.Resampling.BILINEAR)
        buf = io.BytesIO()
        im.save(buf, format="PNG", optimize=True)
        mime = "png"
        if buf.tell() > PREVIEW_MAX_BYTES:
            buf = io.BytesIO()
            im.save(buf, format="JPEG", quality=80)
            mime = "jpeg"
    data = base64.b64encode(buf.getvalue()).decode()
    return dg.MetadataValue.md(f"![{title}](data:image/{mime};base64,{data})\n\n`{image}`")


def materialize(result: StageResult, check_results: Iterable[dg.AssetCheckResult] = (), preview_title: str = "preview",
                links: dict[str, dg.MetadataValue] | None = None,
                inputs: dict[str, StageResult] | None = None) -> dg.MaterializeResult:
    """The MaterializeResult of a stage: its metadata, an embedded preview, the upstream keys it used, and
    `links` (typed entries such as the MLflow run and model version URLs)."""
    meta = result.as_metadata()
    metadata = dagster_metadata(meta) | dict(links or {})
    if result.path.is_dir():
        metadata["size_mb"] = dg.MetadataValue.float(round(directory_bytes(result.path) / 1e6, 3))
    preview = preview_markdown(result.preview, preview_title)
    if preview is not None:
        metadata["preview_image"] = preview
    if inputs:
        metadata["inputs"] = dg.MetadataValue.json({name: r.key for name, r in inputs.items()})
    return dg.MaterializeResult(
        metadata=metadata,
        data_version=dg.DataVersion(result.key),
        check_results=list(check_results),
    )


def directory_bytes(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


def latest(context, asset: str) -> StageResult | None:
    """The latest materialization of `asset` for this run's domain, or None."""
    domain = partition_of(context)
    records = context.instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=dg.AssetKey(asset), asset_partitions=[domain]), limit=1)
    if not records.records:
        return None
    materialization = records.records[0].asset_materialization
    return StageResult.from_metadata({k: (v.value if isinstance(v, dg.MetadataValue) else v)
                                      for k, v in materialization.metadata.items() if k not in UI_ONLY})


def upstream(context, asset: str) -> StageResult:
    """The latest result of `asset` for this run's domain; a clear failure when there is none or it is gone."""
    from flywheel.errors import DataError

    domain = partition_of(context)
    result = latest(context, asset)
    if result is None:
        raise DataError(f"`{asset}` has not been materialized for domain {domain!r}; materialize it (or the whole "
                        "flywheel_iteration job) first")
    if not result.path.exists():
        raise DataError(f"`{asset}` for domain {domain!r} points at {result.path}, which no longer exists; "
                        f"materialize `{asset}` again")
    return result


def partition_of(context) -> str:
    """The domain a step runs for (asset and asset-check contexts alike)."""
    key = getattr(context, "partition_key", None) if not isinstance(context, dg.AssetCheckExecutionContext) else None
    if key is None:
        key = context.op_execution_context.partition_key
    return key
