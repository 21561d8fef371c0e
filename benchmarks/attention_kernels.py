"""The attention floor of the Cosmos Predict 2.5 2B training step: SDPA kernels at the recipe shape.

75% of a training step's model FLOPs are the DiT's self-attention over 31,104 tokens (93 frames at
432x768: 24 x 27 x 48 patches), 16 heads of 128, 28 blocks. This script times that attention alone,
forward and backward, per kernel, so the step's floor is a measured number rather than a guess:

  bf16 SDPA backends (torch): cuDNN (the default on Hopper), flash, memory-efficient;
  fp8 (E4M3) cuDNN attention through the cuDNN frontend's graph API (`nvidia-cudnn-frontend`, when
  importable): forward and backward, per-tensor scales, with its error against the bf16 result.

Per kernel: forward ms, backward ms, TFLOP/s, and the floor of 28 blocks (forward + backward, plus
one more forward where checkpointing recomputes attention). Writes <out>/attention-<gpu-slug>.json.

    python benchmarks/attention_kernels.py --out $OUT              # GPU
    python benchmarks/attention_kernels.py --tokens 4096 --out /tmp/a   # a smaller shape
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import re
import statistics
import sys
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

BLOCKS = 28
FP8_MAX = 448.0  # largest finite float8_e4m3fn


def attention_tflop(batch: int, heads: int, tokens: int, head_dim: int) -> tuple[float, float]:
    """(forward, backward) TFLOP of one non-causal attention: QK^T and PV forward; backward 2.5x (5 matmuls)."""
    forward = 4 * batch * heads * tokens * tokens * head_dim / 1e12
    return forward, 2.5 * forward


def cuda_ms(fn, warmup: int, reps: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def qkv(batch, heads, tokens, head_dim, seed=0, requires_grad=False):
    """q, k, v laid out as diffusers' attention hands them to SDPA: (B, S, H, D) storage viewed as (B, H, S, D)."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    out = []
    for _ in range(3):
        x = torch.randn(batch, tokens, heads, head_dim, device="cuda", dtype=torch.bfloat16, generator=g)
        out.append(x.transpose(1, 2).requires_grad_(requires_grad))
    return out


BACKENDS = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
            "efficient": SDPBackend.EFFICIENT_ATTENTION}


def time_bf16(backend: str, shape, warmup, reps) -> dict:
    q, k, v = qkv(*shape, requires_grad=True)
    grad_out = torch.randn_like(q)
    with sdpa_kernel(BACKENDS[backend]):
        def forward():
            with torch.no_grad():
                F.scaled_dot_product_attention(q, k, v)

        def forward_backward():
            out = F.scaled_dot_product_attention(q, k, v)
            torch.autograd.grad(out, (q, k, v), grad_out)

        fwd = cuda_ms(forward, warmup, reps)
        both = cuda_ms(forward_backward, warmup, reps)
    return dict(forward_ms=fwd, backward_ms=both - fwd)


# --- fp8 through the cuDNN frontend graph API --------------------------------------------------


def quantize(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-tensor E4M3: (fp8 tensor with x's strides, descale = amax / 448 as a [1,1,1,1] fp32 tensor)."""
    amax = x.detach().abs().amax().float().clamp(min=1e-12)
    scale = FP8_MAX / amax
    return (x * scale).to(torch.float8_e4m3fn), (1 / scale).reshape(1, 1, 1, 1)


def scalar(value: float) -> torch.Tensor:
    return torch.full((1, 1, 1, 1), value, device="cuda", dtype=torch.float32)


class Fp8Attention:
    """cuDNN fp8 SDPA forward + backward graphs for one shape (built once, executed per call)."""

    def __init__(self, cudnn, shape, out_dtype: str, grad_dtype: str):
        self.cudnn = cudnn
        self.handle = cudnn.create_handle()
        cudnn.set_stream(handle=self.handle, stream=torch.cuda.current_stream().cuda_stream)
        batch, heads, tokens, head_dim = shape
        self.attn_scale = 1 / math.sqrt(head_dim)
        dt = cudnn.data_type
        kinds = {"bf16": dt.BFLOAT16, "fp8": dt.FP8_E4M3}
        self.out_dtype, self.grad_dtype = out_dtype, grad_dtype
        like = torch.empty(batch, tokens, heads, head_dim, device="cuda", dtype=torch.uint8).transpose(1, 2)
        stats = torch.empty(batch, heads, tokens, 1, device="cuda", dtype=torch.float32)
        one = scalar(1.0)

        fwd = cudnn.pygraph(io_data_type=dt.FP8_E4M3, intermediate_data_type=dt.FLOAT, compute_data_type=dt.FLOAT,
                            handle=self.handle)
        t = {n: fwd.tensor_like(like).set_data_type(dt.FP8_E4M3) for n in ("q", "k", "v")}
        for n in ("descale_q", "descale_k", "descale_v", "descale_s", "scale_s", "scale_o"):
            t[n] = fwd.tensor_like(one)
        o, st, amax_s, amax_o = fwd.sdpa_fp8(q=t["q"], k=t["k"], v=t["v"], descale_q=t["descale_q"],
                                            descale_k=t["descale_k"], descale_v=t["descale_v"],
                                            descale_s=t["descale_s"], scale_s=t["scale_s"], scale_o=t["scale_o"],
                                            is_inference=False, attn_scale=self.attn_scale, use_causal_mask=False)
        o.set_output(True).set_dim(list(like.shape)).set_stride(list(like.stride())).set_data_type(kinds[out_dtype])
        st.set_output(True).set_dim(list(stats.shape)).set_stride(list(stats.stride())).set_data_type(dt.FLOAT)
        for a in (amax_s, amax_o):
            a.set_output(True).set_dim([1, 1, 1, 1]).set_stride([1, 1, 1, 1]).set_data_type(dt.FLOAT)
        fwd.build([cudnn.heur_mode.A])
        self.fwd, self.fwd_t = fwd, dict(t, o=o, stats=st, amax_s=amax_s, amax_o=amax_o)

        bwd = cudnn.pygraph(io_data_type=dt.FP8_E4M3, intermediate_data_type=dt.FLOAT, compute_data_type=dt.FLOAT,
                            handle=self.handle)
        b = {n: bwd.tensor_like(like).set_data_type(dt.FP8_E4M3) for n in ("q", "k", "v")}
        b["o"] = bwd.tensor_like(like).set_data_type(kinds[out_dtype])
        b["dO"] = bwd.tensor_like(like).set_data_type(dt.FP8_E4M3)
        b["stats"] = bwd.tensor_like(stats)
        for n in ("descale_q", "descale_k", "descale_v", "descale_o", "descale_dO", "descale_s", "descale_dP",
                  "scale_s", "scale_dQ", "scale_dK", "scale_dV", "scale_dP"):
            b[n] = bwd.tensor_like(one)
        outs = bwd.sdpa_fp8_backward(attn_scale=self.attn_scale, use_causal_mask=False, **b)
        names = ("dQ", "dK", "dV", "amax_dQ", "amax_dK", "amax_dV", "amax_dP")
        for n, x in zip(names, outs):
            if n.startswith("amax"):
                x.set_output(True).set_dim([1, 1, 1, 1]).set_stride([1, 1, 1, 1]).set_data_type(dt.FLOAT)
            else:
                x.set_output(True).set_dim(list(like.shape)).set_stride(list(like.stride())).set_data_type(
                    kinds[grad_dtype])
        bwd.build([cudnn.heur_mode.A])
        self.bwd, self.bwd_t = bwd, dict(b, **dict(zip(names, outs)))
        self.workspace = torch.empty(max(fwd.get_workspace_size(), bwd.get_workspace_size()), device="cuda",
                                     dtype=torch.uint8)

    def _empty(self, like, kind):
        dtype = torch.bfloat16 if kind == "bf16" else torch.float8_e4m3fn
        return torch.empty(like.shape[0], like.shape[2], like.shape[1], like.shape[3], device="cuda",
                           dtype=dtype).transpose(1, 2)

    @staticmethod
    def _raw(x):
        return x.view(torch.uint8) if x.dtype == torch.float8_e4m3fn else x

    def forward(self, q8, k8, v8, dq, dk, dv, scale_o):
        t = self.fwd_t
        o = self._empty(q8, self.out_dtype)
        stats = torch.empty(q8.shape[0], q8.shape[1], q8.shape[2], 1, device="cuda", dtype=torch.float32)
        amax_s, amax_o = scalar(0.0), scalar(0.0)
        pack = {t["q"]: self._raw(q8), t["k"]: self._raw(k8), t["v"]: self._raw(v8), t["descale_q"]: dq,
                t["descale_k"]: dk, t["descale_v"]: dv, t["descale_s"]: scalar(1 / FP8_MAX),
                t["scale_s"]: scalar(FP8_MAX), t["scale_o"]: scale_o, t["o"]: self._raw(o), t["stats"]: stats,
                t["amax_s"]: amax_s, t["amax_o"]: amax_o}
        self.fwd.execute(pack, self.workspace, handle=self.handle)
        return o, stats, amax_o

    def backward(self, q8, k8, v8, o, stats, do8, scales: dict):
        b = self.bwd_t
        grads = [self._empty(q8, self.grad_dtype) for _ in range(3)]
        amaxes = [scalar(0.0) for _ in range(4)]
        pack = {b["q"]: self._raw(q8), b["k"]: self._raw(k8), b["v"]: self._raw(v8), b["o"]: self._raw(o),
                b["dO"]: self._raw(do8), b["stats"]: stats}
        pack.update({b[n]: scales[n] for n in ("descale_q", "descale_k", "descale_v", "descale_o", "descale_dO",
                                                "descale_dP", "scale_dQ", "scale_dK", "scale_dV", "scale_dP")})
        pack.update({b["descale_s"]: scalar(1 / FP8_MAX), b["scale_s"]: scalar(FP8_MAX)})
        pack.update({b[n]: self._raw(g) for n, g in zip(("dQ", "dK", "dV"), grads)})
        pack.update({b[n]: a for n, a in zip(("amax_dQ", "amax_dK", "amax_dV", "amax_dP"), amaxes)})
        self.bwd.execute(pack, self.workspace, handle=self.handle)
        return grads, amaxes


def time_bf16_plans(cudnn, shape, warmup, reps) -> dict:
    """Every cuDNN engine plan the frontend proposes for bf16 SDPA forward and backward, each timed.

    torch's cuDNN backend runs the heuristics' first plan; a faster one here would be worth selecting.
    """
    batch, heads, tokens, head_dim = shape
    dt = cudnn.data_type
    handle = cudnn.create_handle()
    cudnn.set_stream(handle=handle, stream=torch.cuda.current_stream().cuda_stream)
    q, k, v = qkv(*shape)
    o, grad_out = torch.empty_like(q), qkv(*shape, seed=1)[0]
    stats = torch.empty(batch, heads, tokens, 1, device="cuda", dtype=torch.float32)
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    scale = 1 / math.sqrt(head_dim)
    out: dict = {}

    def graph():
        return cudnn.pygraph(io_data_type=dt.BFLOAT16, intermediate_data_type=dt.FLOAT, compute_data_type=dt.FLOAT,
                             handle=handle)

    fwd = graph()
    t = {n: fwd.tensor_like(x) for n, x in (("q", q), ("k", k), ("v", v))}
    o_t, st_t = fwd.sdpa(q=t["q"], k=t["k"], v=t["v"], is_inference=False, attn_scale=scale, use_causal_mask=False)
    o_t.set_output(True).set_dim(list(o.shape)).set_stride(list(o.stride()))
    st_t.set_output(True).set_dim(list(stats.shape)).set_stride(list(stats.stride())).set_data_type(dt.FLOAT)
    fwd_pack = {t["q"]: q, t["k"]: k, t["v"]: v, o_t: o, st_t: stats}

    bwd = graph()
    b = {n: bwd.tensor_like(x) for n, x in (("q", q), ("k", k), ("v", v), ("o", o), ("dO", grad_out))}
    b["stats"] = bwd.tensor_like(stats)
    grads = bwd.sdpa_backward(attn_scale=scale, use_causal_mask=False, **b)
    for g_t, g in zip(grads, (dq, dk, dv)):
        g_t.set_output(True).set_dim(list(g.shape)).set_stride(list(g.stride()))
    bwd_pack = {b[n]: x for n, x in (("q", q), ("k", k), ("v", v), ("o", o), ("dO", grad_out), ("stats", stats))}
    bwd_pack.update(dict(zip(grads, (dq, dk, dv))))

    for name, g, pack in (("forward", fwd, fwd_pack), ("backward", bwd, bwd_pack)):
        g.validate()
        g.build_operation_graph()
        g.create_execution_plans([cudnn.heur_mode.A, cudnn.heur_mode.FALLBACK])
        g.check_support()
        plans = []
        for index in range(g.get_execution_plan_count()):
            try:
                g.build_plan_at_index(index)
                workspace = torch.empty(g.get_workspace_size(), device="cuda", dtype=torch.uint8)
                ms = cuda_ms(lambda: g.execute_plan_at_index(pack, workspace, index, handle=handle), warmup, reps)
                plans.append(dict(index=index, name=g.get_plan_name_at_index(index)[:90], ms=round(ms, 3)))
            except Exception as e:
                plans.append(dict(index=index, error=f"{type(e).__name__}: {e}".splitlines()[0][:120]))
        out[f"{name}_plans"] = plans
        timed = [p["ms"] for p in plans if "ms" in p]
        out[f"{name}_ms"] = min(timed) if timed else None
        out[f"{name}_first_plan_ms"] = timed[0] if timed else None
    if out["forward_ms"] is None or out["backward_ms"] is None:
        raise RuntimeError(f"no plan ran: {out}")
    return out


def time_fp8(cudnn, shape, out_dtype, grad_dtype, warmup, reps) -> dict:
    attn = Fp8Attention(cudnn, shape, out_dtype, grad_dtype)
    q, k, v = qkv(*shape)
    grad_out = qkv(*shape, seed=1)[0]
    (q8, dq), (k8, dk), (v8, dv) = quantize(q), quantize(k), quantize(v)
    do8, ddo = quantize(grad_out)
    scale_o = scalar(1.0) if out_dtype == "bf16" else 1 / dv  # |O| <= max|V|
    o, stats, amax_o = attn.forward(q8, k8, v8, dq, dk, dv, scale_o)
    descale_o = scalar(1.0) if out_dtype == "bf16" else dv
    # Gradient scales: a first backward with unit scales measures the amaxes (delayed scaling's first step).
    scales = dict(descale_q=dq, descale_k=dk, descale_v=dv, descale_o=descale_o, descale_dO=ddo,
                  descale_dP=scalar(1.0), scale_dQ=scalar(1.0), scale_dK=scalar(1.0), scale_dV=scalar(1.0),
                  scale_dP=scalar(1.0))
    _, amaxes = attn.backward(q8, k8, v8, o, stats, do8, scales)
    amax_dq, amax_dk, amax_dv, amax_dp = (a.clamp(min=1e-12) for a in amaxes)
    scales.update(scale_dP=FP8_MAX / amax_dp, descale_dP=amax_dp / FP8_MAX)
    if grad_dtype == "fp8":
        scales.update(scale_dQ=FP8_MAX / amax_dq, scale_dK=FP8_MAX / amax_dk, scale_dV=FP8_MAX / amax_dv)
    fwd_ms = cuda_ms(lambda: attn.forward(q8, k8, v8, dq, dk, dv, scale_o), warmup, reps)
    bwd_ms = cuda_ms(lambda: attn.backward(q8, k8, v8, o, stats, do8, scales), warmup, reps)

    # Error against bf16 cuDNN attention on the same inputs.
    grads, _ = attn.backward(q8, k8, v8, o, stats, do8, scales)
    qr, kr, vr = (x.detach().requires_grad_(True) for x in (q, k, v))
    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
        ref = F.scaled_dot_product_attention(qr, kr, vr)
        ref_grads = torch.autograd.grad(ref, (qr, kr, vr), grad_out)
    o_deq = o.float() * (descale_o if out_dtype == "fp8" else 1.0).reshape(())
    grad_deq = [g.float() * (1 if grad_dtype == "bf16" else (a / FP8_MAX).reshape(()))
                for g, a in zip(grads, (amax_dq, amax_dk, amax_dv))]

    def rel(a, b):
        return float((a.float() - b.float()).norm() / b.float().norm())

    def cos(a, b):
        return float(F.cosine_similarity(a.float().flatten(), b.float().flatten(), dim=0))

    return dict(forward_ms=fwd_ms, backward_ms=bwd_ms, out_rel_err=rel(o_deq, ref),
                grad_rel_err=[rel(g, r) for g, r in zip(grad_deq, ref_grads)],
                grad_cosine=[cos(g, r) for g, r in zip(grad_deq, ref_grads)])


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--tokens", type=int, default=31104)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--out", default="benchmarks/results")
    args = p.parse_args(argv)
    shape = (args.batch, args.heads, args.tokens, args.head_dim)
    fwd_tflop, bwd_tflop = attention_tflop(*shape)
    results: dict[str, dict] = {}
    gpu = torch.cuda.get_device_name()
    print(f"{gpu}: attention {shape}, {fwd_tflop:.2f} TFLOP forward, {bwd_tflop:.2f} backward", flush=True)

    def record(name, fn):
        try:
            r = fn()
        except Exception as e:
            traceback.print_exc()
            r = dict(error=f"{type(e).__name__}: {e}".splitlines()[0][:300])
        if "forward_ms" in r:
            fwd, bwd = r["forward_ms"], r["backward_ms"]
            r.update(forward_tflops=round(fwd_tflop / fwd * 1e3, 1), backward_tflops=round(bwd_tflop / bwd * 1e3, 1),
                     step_floor_s=round(BLOCKS * (fwd + bwd) / 1e3, 3),
                     step_floor_recompute_s=round(BLOCKS * (2 * fwd + bwd) / 1e3, 3))
        results[name] = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()}
        print(name, json.dumps(results[name]), flush=True)

    for backend in BACKENDS:
        record(f"bf16[{backend}]", lambda: time_bf16(backend, shape, args.warmup, args.reps))
    try:
        import cudnn
        cudnn_frontend = cudnn.__version__
    except Exception as e:
        cudnn_frontend = None
        results["fp8"] = dict(error=f"cuDNN frontend not importable: {e}")
    if cudnn_frontend:
        record("bf16[cudnn frontend, every plan]", lambda: time_bf16_plans(cudnn, shape, args.warmup, args.reps))
        for out_dtype, grad_dtype in (("bf16", "bf16"), ("fp8", "bf16"), ("fp8", "fp8")):
            record(f"fp8[o={out_dtype},grads={grad_dtype}]",
                   lambda: time_fp8(cudnn, shape, out_dtype, grad_dtype, args.warmup, args.reps))
    report = dict(schema="flywheel-attention-kernels/1", gpu=gpu,
                  date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                  software=dict(torch=torch.__version__, cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version(),
                                cudnn_frontend=cudnn_frontend, python=sys.version.split()[0]),
                  shape=dict(batch=args.batch, heads=args.heads, tokens=args.tokens, head_dim=args.head_dim),
                  tflop=dict(forward=round(fwd_tflop, 3), backward=round(bwd_tflop, 3)), blocks=BLOCKS,
                  kernels=results)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"attention-{re.sub(r'[^a-z0-9]+', '-', gpu.lower()).strip('-')}.json"
    path.write_text(json.dumps(report, indent=2))
    print(f"wrote {path}")
    return report


if __name__ == "__main__":
    main()
