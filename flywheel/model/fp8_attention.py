"""FP8 self-attention for sampling (opt-in: GenerateConfig.attention_fp8), through cuDNN's fp8 SDPA.

Attention over the 31,104 tokens of a 93x432x768 video is most of a sampling step (cuDNN bf16: 11.9 ms of
forward per block and batch item on an H200; its fp8 forward: 9.2 ms, benchmarks/attention_kernels.py).
This runs the DiT's self-attention (`attn1`, no mask) as cuDNN's FP8 (E4M3) SDPA forward:

- q, k and v are scaled per tensor to E4M3's range (amax -> 448) and cast; the descales go to the kernel;
- softmax probabilities are quantized with the fixed scale 448 (they lie in [0, 1]);
- the output is E4M3 too (on Hopper cuDNN has no bf16 output for fp8 attention), scaled by 448 / amax(v):
  every output row is a convex combination of v's rows, so |o| <= amax(v) never overflows; it is
  dequantized back to the model's dtype.

The kernel call is a `torch.library` custom op (opaque to torch.compile; the regional compile traces
around it) through the cuDNN frontend's Python graph API, one graph per shape and layout, built once.
The frontend (`nvidia-cudnn-frontend`) is not a flywheel dependency; without it, or without a GPU of
compute capability >= 9.0, asking for fp8 attention is an error naming the config field. Cross-attention
(512 text tokens) stays in bf16: it is a small share of the step.

`Fp8SelfAttentionProcessor` is diffusers' `CosmosAttnProcessor2_0` (the self-attention processor of the
Cosmos transformer) with the SDPA call made pluggable; `fp8_self_attention(transformer)` installs it on
every block's attn1 for a while and puts the original processors back.
"""

from __future__ import annotations

import contextlib
import importlib.util
import math
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from diffusers.models.embeddings import apply_rotary_emb

FP8_MAX = 448.0  # the largest finite float8_e4m3fn
MIN_CAPABILITY = (9, 0)  # cuDNN fp8 SDPA: Hopper and newer
INSTALL = "`pip install nvidia-cudnn-frontend`, tested with 1.32.0"


class Fp8AttentionUnavailable(RuntimeError):
    """FP8 attention was asked for where it cannot run."""


def fp8_attention_unavailable_reason(device: torch.device | str) -> str | None:
    """Why cuDNN fp8 attention cannot run on `device` (None: it can)."""
    device = torch.device(device)
    problems = []
    if device.type != "cuda":
        problems.append(f"a CUDA GPU with compute capability >= 9.0 (the model is on {device.type})")
    elif torch.cuda.get_device_capability(device) < MIN_CAPABILITY:
        major, minor = torch.cuda.get_device_capability(device)
        problems.append(f"a CUDA GPU with compute capability >= 9.0 ({torch.cuda.get_device_name(device)} "
                        f"has {major}.{minor})")
    if importlib.util.find_spec("cudnn") is None:
        problems.append(f"the cuDNN frontend ({INSTALL})")
    return " and ".join(problems) or None


def require_fp8_attention(device: torch.device | str, field: str) -> None:
    reason = fp8_attention_unavailable_reason(device)
    if reason is not None:
        raise Fp8AttentionUnavailable(f"{field}: fp8 attention needs {reason}; set {field}=false to run without it")


# --- the kernel ------------------------------------------------------------------------------


def per_tensor_e4m3(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x scaled so its amax is 448 and cast to float8_e4m3fn (strides kept), and the descale (fp32 [1,1,1,1])."""
    amax = x.detach().abs().amax().float().clamp(min=1e-12)
    return (x * (FP8_MAX / amax)).to(torch.float8_e4m3fn), (amax / FP8_MAX).reshape(1, 1, 1, 1)


class _CudnnFp8Forward:
    """The cuDNN fp8 SDPA forward graph for one (shape, strides, device): built once, executed per call."""

    _graphs: dict[tuple, _CudnnFp8Forward] = {}

    @classmethod
    def get(cls, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> _CudnnFp8Forward:
        key = tuple((tuple(x.shape), x.stride()) for x in (q, k, v)) + (q.device, scale)
        if key not in cls._graphs:
            cls._graphs[key] = cls(q, k, v, scale)
        return cls._graphs[key]

    def __init__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float):
        import cudnn

        dt = cudnn.data_type
        self.cudnn = cudnn
        self.handle = cudnn.create_handle()
        graph = cudnn.pygraph(io_data_type=dt.FP8_E4M3, intermediate_data_type=dt.FLOAT, compute_data_type=dt.FLOAT,
                              handle=self.handle)
        one = torch.ones(1, 1, 1, 1, device=q.device)
        self.q, self.k, self.v = (graph.tensor(dim=list(x.shape), stride=list(x.stride()), data_type=dt.FP8_E4M3)
                                  for x in (q, k, v))
        self.scalars = {name: graph.tensor_like(one) for name in
                        ("descale_q", "descale_k", "descale_v", "descale_s", "scale_s", "scale_o")}
        o, _, amax_s, amax_o = graph.sdpa_fp8(q=self.q, k=self.k, v=self.v, is_inference=True, attn_scale=scale,
                                              use_causal_mask=False, **self.scalars)
        # The output is laid out contiguously whatever the inputs' strides, as the op's fake says.
        o.set_output(True).set_dim(list(q.shape)).set_stride(list(_contiguous_strides(q.shape))).set_data_type(
            dt.FP8_E4M3)
        for amax in (amax_s, amax_o):
            amax.set_output(True).set_dim([1, 1, 1, 1]).set_stride([1, 1, 1, 1]).set_data_type(dt.FLOAT)
        graph.build([cudnn.heur_mode.A])
        self.graph, self.o, self.amax = graph, o, (amax_s, amax_o)
        self.workspace = torch.empty(graph.get_workspace_size(), device=q.device, dtype=torch.uint8)
        self.fixed = {"descale_s": torch.full_like(one, 1 / FP8_MAX), "scale_s": torch.full_like(one, FP8_MAX)}

    def __call__(self, q8, k8, v8, descale_q, descale_k, descale_v) -> tuple[torch.Tensor, torch.Tensor]:
        """(o as a contiguous float8 tensor, its descale)."""
        self.cudnn.set_stream(handle=self.handle, stream=torch.cuda.current_stream(q8.device).cuda_stream)
        o8 = torch.empty(q8.shape, dtype=torch.float8_e4m3fn, device=q8.device)
        scale_o = 1 / descale_v  # |o| <= amax(v): o's amax maps to at most 448
        values = dict(descale_q=descale_q, descale_k=descale_k, descale_v=descale_v, scale_o=scale_o, **self.fixed)
        pack = {self.q: q8.view(torch.uint8), self.k: k8.view(torch.uint8), self.v: v8.view(torch.uint8),
                self.o: o8.view(torch.uint8)}
        pack.update({self.scalars[name]: value for name, value in values.items()})
        pack.update({a: torch.empty(1, 1, 1, 1, device=q8.device) for a in self.amax})
        self.graph.execute(pack, self.workspace, handle=self.handle)
        return o8, descale_v


@torch.library.custom_op("flywheel::fp8_sdpa", mutates_args=())
def fp8_sdpa(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float) -> torch.Tensor:
    """Non-causal attention of (B, H, S, D) tensors as cuDNN fp8 SDPA; the result in the query's dtype."""
    (q8, dq), (k8, dk), (v8, dv) = (per_tensor_e4m3(x) for x in (query, key, value))
    o8, descale_o = _CudnnFp8Forward.get(q8, k8, v8, scale)(q8, k8, v8, dq, dk, dv)
    return (o8.to(torch.float32) * descale_o).to(query.dtype)


@fp8_sdpa.register_fake
def _(query, key, value, scale):
    return torch.empty(query.shape, dtype=query.dtype, device=query.device)


def _contiguous_strides(shape) -> tuple[int, ...]:
    strides, step = [], 1
    for size in reversed(shape):
        strides.append(step)
        step *= size
    return tuple(reversed(strides))


def emulated_fp8_sdpa(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float) -> torch.Tensor:
    """What the kernel computes, in plain torch (any device): q, k, v and the output rounded through E4M3
    with the same per-tensor scales; the softmax kept exact. The reference for tests and benchmarks."""
    (q8, dq), (k8, dk), (v8, dv) = (per_tensor_e4m3(x) for x in (query, key, value))
    q, k, v = (x8.float() * d for x8, d in ((q8, dq), (k8, dk), (v8, dv)))
    out = F.scaled_dot_product_attention(q, k, v, scale=scale)
    o8 = (out / dv).to(torch.float8_e4m3fn)
    return (o8.float() * dv).to(query.dtype)


# --- the processor ---------------------------------------------------------------------------


class Fp8SelfAttentionProcessor:
    """diffusers' CosmosAttnProcessor2_0 for a block's self-attention, the attention call pluggable.

    `attention(q, k, v, scale)` gets (B, H, S, D) tensors; unmasked calls go to it, masked ones to SDPA.
    """

    def __init__(self, attention: Callable[..., torch.Tensor] = fp8_sdpa):
        self.attention = attention

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, image_rotary_emb: torch.Tensor | None = None):
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        query = attn.to_q(hidden_states).unflatten(2, (attn.heads, -1)).transpose(1, 2)
        key = attn.to_k(context).unflatten(2, (attn.heads, -1)).transpose(1, 2)
        value = attn.to_v(context).unflatten(2, (attn.heads, -1)).transpose(1, 2)
        query, key = attn.norm_q(query), attn.norm_k(key)
        if image_rotary_emb is not None:
            query = apply_rotary_emb(query, image_rotary_emb, use_real=True, use_real_unbind_dim=-2)
            key = apply_rotary_emb(key, image_rotary_emb, use_real=True, use_real_unbind_dim=-2)
        # Grouped-query attention: repeat k/v heads up to the query's (none in Cosmos 2.5, kept for parity).
        key = key.repeat_interleave(query.size(3) // key.size(3), dim=3)
        value = value.repeat_interleave(query.size(3) // value.size(3), dim=3)
        if attention_mask is None:
            out = self.attention(query, key, value, 1 / math.sqrt(query.size(-1)))
        else:
            out = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask)
        out = out.transpose(1, 2).flatten(2, 3).type_as(query)
        return attn.to_out[1](attn.to_out[0](out))


@contextlib.contextmanager
def fp8_self_attention(transformer: torch.nn.Module, field: str = "GenerateConfig.attention_fp8",
                       attention: Callable[..., torch.Tensor] | None = None) -> Iterator[None]:
    """Every DiT block's self-attention through `Fp8SelfAttentionProcessor` inside; the original processors after.

    `attention` replaces the cuDNN kernel (tests pass `emulated_fp8_sdpa` or SDPA); without it the
    device must be able to run the kernel (`require_fp8_attention`).
    """
    if attention is None:
        require_fp8_attention(transformer.device, field)
    blocks = list(transformer.transformer_blocks)
    originals = [block.attn1.processor for block in blocks]
    processor = Fp8SelfAttentionProcessor(attention or fp8_sdpa)
    try:
        for block in blocks:
            block.attn1.set_processor(processor)
        yield
    finally:
        for block, original in zip(blocks, originals, strict=True):
            block.attn1.set_processor(original)
