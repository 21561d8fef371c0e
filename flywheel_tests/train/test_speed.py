"""Training speed settings (flywheel.train.speed) change how a step runs, never what it computes.

On the tiny transformer (fp32, CPU): checkpointing none / full / selective and the regional compile give
the eager loss and gradients; selective checkpointing really keeps attention (backward never reruns it);
the compiled runner is one graph shared by every block; train_adapter applies and removes the settings;
the GPU benchmark script runs end to end on the tiny preset and writes its report.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError
from torch.utils._python_dispatch import TorchDispatchMode

from flywheel.train import TrainConfig, flow_matching_loss, sample_flow_draw, train_adapter
from flywheel.train.adapter_io import TRAINING_ADAPTER_NAME
from flywheel.train.lora import add_training_adapter
from flywheel.train.speed import ATTENTION_OPS, apply_training_speedups, build_optimizer_and_scheduler
from flywheel_tests.train import tiny_latent_cache  # noqa: F401  (session fixture)

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


def make_adapted(method: str):
    """A tiny Cosmos transformer (own copy, 4 blocks) with an adapter whose B is non-zero, plus one batch."""
    from diffusers import CosmosTransformer3DModel

    from flywheel.model.presets import TINY_TRANSFORMER

    torch.manual_seed(0)
    transformer = CosmosTransformer3DModel(**{**TINY_TRANSFORMER, "num_layers": 4}).eval()
    params = add_training_adapter(transformer, TrainConfig(rank=4, alpha=4, method=method))
    with torch.no_grad():
        for name, p in transformer.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)  # zero B would give A no gradient: compare real gradients
    generator = torch.Generator().manual_seed(1)
    latents = torch.randn(1, 16, 5, 8, 8, generator=generator)
    embeds = torch.randn(1, 12, 64, generator=generator)
    draw = sample_flow_draw(latents.shape, TrainConfig(cfg_dropout=0.0), torch.Generator().manual_seed(2))
    return transformer, params, (latents, embeds, draw, torch.zeros(1, 1, 64, 64))


@pytest.fixture(scope="module")
def adapted():
    return make_adapted("lora")


def loss_and_grads(transformer, params, batch, **settings):
    """Loss and adapter gradients of one step with `settings` applied (and removed after)."""
    config = TrainConfig(rank=4, alpha=4, **settings)
    undo = apply_training_speedups(transformer, config)
    transformer.train()
    try:
        for p in params:
            p.grad = None
        loss = flow_matching_loss(transformer, *batch)
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in params]
    finally:
        undo()
        transformer.eval()


class AttentionCounter(TorchDispatchMode):
    """Counts the SDPA kernel calls that actually run (a value selective checkpointing replays is not a call)."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.calls += func in ATTENTION_OPS
        return func(*args, **(kwargs or {}))


def assert_same(reference, got, what):
    (loss0, grads0), (loss1, grads1) = reference, got
    torch.testing.assert_close(loss1, loss0, rtol=1e-6, atol=1e-7, msg=f"{what}: loss differs")
    for g0, g1 in zip(grads0, grads1, strict=True):
        torch.testing.assert_close(g1, g0, rtol=1e-5, atol=1e-7, msg=f"{what}: gradients differ")


def test_checkpointing_modes_give_the_eager_loss_and_gradients(adapted):
    transformer, params, batch = adapted
    reference = loss_and_grads(transformer, params, batch)
    assert any(g.abs().sum() > 0 for g in reference[1]), "no gradient reached the adapter"
    for settings in (dict(activation_checkpointing="full"), dict(gradient_checkpointing=True),
                     dict(activation_checkpointing="selective"),
                     dict(activation_checkpointing="selective", selective_save="attention_matmul")):
        assert_same(reference, loss_and_grads(transformer, params, batch, **settings), str(settings))
    assert not transformer.gradient_checkpointing, "the settings must be removed after the step"


@pytest.mark.parametrize("mode, attention_calls_per_block", [("none", 2), ("full", 4), ("selective", 2)])
def test_selective_checkpointing_never_recomputes_attention(adapted, mode, attention_calls_per_block):
    """Self + cross attention run once per block in forward; full checkpointing reruns both in backward."""
    transformer, params, batch = adapted
    counter = AttentionCounter()
    with counter:
        loss_and_grads(transformer, params, batch, activation_checkpointing=mode)
    assert counter.calls == attention_calls_per_block * len(transformer.transformer_blocks)


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_regional_compile_matches_eager_and_shares_its_graphs_across_blocks(adapted, method):
    """torch.compile around the selectively checkpointed block (aot_eager: Dynamo + AOTAutograd + the
    checkpoint policy, without Inductor's slow CPU codegen; the GPU benchmark runs Inductor).

    Two graphs for any depth: block 0 (its input needs no grad: the patch embedding is frozen) and
    one reused by every later block. No graph break (a break inside a checkpoint means eager).
    """
    from torch._dynamo.utils import counters

    transformer, params, batch = adapted if method == "lora" else make_adapted(method)
    reference = loss_and_grads(transformer, params, batch)
    torch._dynamo.reset()
    counters.clear()
    compiled = loss_and_grads(transformer, params, batch, activation_checkpointing="selective", compile=True,
                              compile_backend="aot_eager")
    assert_same(reference, compiled, f"{method}: compile + selective")
    assert not counters["graph_break"], f"graph breaks: {dict(counters['graph_break'])}"
    assert counters["stats"]["unique_graphs"] == 2, "expected blocks 1..3 to share one compiled graph"
    assert_same(reference, loss_and_grads(transformer, params, batch, activation_checkpointing="selective",
                                          compile=True, compile_backend="aot_eager"), f"{method}: second run")
    assert counters["stats"]["unique_graphs"] == 2, "a second run must reuse the compiled graphs"
    torch._dynamo.reset()


@pytest.mark.parametrize("runner, recomputed_per_block", [("run_block_saving_attention", 0),
                                                           ("run_block_full_checkpoint", 2)])
def test_compiled_selective_checkpointing_keeps_attention_out_of_the_backward_graph(adapted, runner,
                                                                                   recomputed_per_block):
    """Under torch.compile the policy acts in the partitioner: the backward graph must not rerun attention."""
    from torch._dynamo.backends.common import aot_autograd

    from flywheel.train import speed

    backward_graphs = []

    def keep_backward(graph, example_inputs):
        backward_graphs.append(graph)
        return graph

    backend = aot_autograd(fw_compiler=lambda graph, example_inputs: graph, bw_compiler=keep_backward)
    transformer, params, batch = adapted
    torch._dynamo.reset()
    transformer.enable_gradient_checkpointing(gradient_checkpointing_func=torch.compile(getattr(speed, runner),
                                                                                         backend=backend))
    transformer.train()
    try:
        flow_matching_loss(transformer, *batch).backward()
    finally:
        transformer.disable_gradient_checkpointing()
        transformer.eval()
        torch._dynamo.reset()
    assert backward_graphs, "nothing was compiled"
    for graph in backward_graphs:
        # A recomputed attention shows up directly or replayed with its saved RNG state (run_with_rng_state).
        forward_attention = [n for n in graph.graph.nodes if n.op == "call_function"
                             and (n.target in ATTENTION_OPS or any(a in ATTENTION_OPS for a in n.args[:2]))]
        assert len(forward_attention) == recomputed_per_block, graph.graph


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_autocast_runs_the_fp32_adapter_in_the_bf16_base_dtype_with_the_fp32_result(method):
    """On a bf16 base the adapter's products run in bf16 under TrainConfig.autocast, not in fp32; the loss and
    gradients stay those of the fp32-adapter step within bf16 rounding; on an fp32 base it changes nothing."""
    from flywheel.train.speed import adapter_autocast

    transformer, params, batch = make_adapted(method)
    transformer.to(torch.bfloat16)
    for p in params:
        p.data = p.data.float()  # the adapter stays fp32, as add_training_adapter leaves it on a bf16 base
    lora_a = next(m for name, m in transformer.named_modules() if name.endswith(f"lora_A.{TRAINING_ADAPTER_NAME}"))
    seen = []
    lora_a.register_forward_hook(lambda module, args, out: seen.append(out.dtype))

    def step(autocast: bool):
        seen.clear()
        with adapter_autocast(transformer, TrainConfig(autocast=autocast)):
            return loss_and_grads(transformer, params, batch)

    fp32_loss, fp32_grads = step(False)
    assert seen and set(seen) == {torch.float32}  # DoRA calls lora_A more than once per forward
    mixed_loss, mixed_grads = step(True)
    assert seen and set(seen) == {torch.bfloat16}, "under autocast the adapter's product must run in the base's bf16"
    assert mixed_loss.dtype == torch.float32 and all(g.dtype == torch.float32 for g in mixed_grads)
    torch.testing.assert_close(mixed_loss, fp32_loss, rtol=2e-2, atol=0)
    flat = torch.cat([g.flatten() for g in fp32_grads]), torch.cat([g.flatten() for g in mixed_grads])
    assert flat[0].abs().sum() > 0
    assert torch.nn.functional.cosine_similarity(*flat, dim=0) > 0.99
    assert isinstance(adapter_autocast(make_adapted("lora")[0], TrainConfig()), contextlib.nullcontext), \
        "an fp32 base has nothing to autocast"


def test_config_checkpointing_fields():
    assert TrainConfig().on_device("cpu").activation_checkpointing == "none"
    # Left as None, the speed settings are the fast path on a GPU and plain eager on a CPU.
    gpu, cpu = TrainConfig().on_device("cuda:0"), TrainConfig().on_device("cpu")
    assert (gpu.activation_checkpointing, gpu.selective_save, gpu.compile) == ("selective", "attention_matmul", True)
    assert (cpu.activation_checkpointing, cpu.compile) == ("none", False)
    assert TrainConfig(gradient_checkpointing=True).on_device("cuda").activation_checkpointing == "full"
    chosen = TrainConfig(activation_checkpointing="none", compile=False).on_device("cuda")
    assert (chosen.activation_checkpointing, chosen.compile) == ("none", False), "explicit settings are kept"
    assert TrainConfig(gradient_checkpointing=True).on_device("cpu").activation_checkpointing == "full"
    assert TrainConfig(activation_checkpointing="selective").on_device("cpu").activation_checkpointing == "selective"
    with pytest.raises(ValidationError, match="contradicts"):
        TrainConfig(gradient_checkpointing=True, activation_checkpointing="none")
    with pytest.raises(ValidationError):
        TrainConfig(activation_checkpointing="some")


def test_fused_adamw_steps_like_the_default(adapted):
    transformer, params, _ = adapted
    device = torch.device("cpu")
    assert build_optimizer_and_scheduler(params, TrainConfig(), device)[0].param_groups[0]["fused"] is None, \
        "fused_optimizer=None must keep the default AdamW on CPU"
    constant_lr = dict(warmup_steps=0, f_start=1.0, f_max=1.0, f_min=1.0)
    results = []
    for fused in (False, True):
        weights = [p.detach().clone().requires_grad_(True) for p in params[:4]]
        optimizer, _ = build_optimizer_and_scheduler(weights, TrainConfig(fused_optimizer=fused, **constant_lr), device)
        assert bool(optimizer.param_groups[0]["fused"]) is fused
        for w in weights:
            w.grad = torch.full_like(w, 0.5)
        optimizer.step()
        results.append(weights)
    for before, plain, fused in zip(params[:4], *results, strict=True):
        torch.testing.assert_close(fused, plain)
        assert not torch.equal(plain, before), "the optimizer step changed nothing"


def test_train_adapter_with_selective_checkpointing_trains_the_same_adapter(tiny_pipe, tiny_latent_cache, tmp_path):
    common = dict(rank=4, alpha=4, steps=2, learning_rate=1e-2, warmup_steps=0, f_start=1.0, f_max=1.0, f_min=1.0,
                  checkpoint_every=1000)
    plain = train_adapter(tiny_latent_cache, tiny_pipe, TrainConfig(**common), tmp_path / "plain")
    selective = train_adapter(tiny_latent_cache, tiny_pipe, TrainConfig(activation_checkpointing="selective", **common),
                              tmp_path / "selective")
    assert selective.losses == pytest.approx(plain.losses, rel=1e-5)
    assert not tiny_pipe.transformer.gradient_checkpointing, "train_adapter must remove its speed settings"
    from flywheel.train.adapter_io import read_saved_adapter

    weights0, _ = read_saved_adapter(plain.adapter_dir)
    weights1, _ = read_saved_adapter(selective.adapter_dir)
    assert weights0.keys() == weights1.keys()
    for key in weights0:
        torch.testing.assert_close(weights1[key], weights0[key], rtol=1e-4, atol=1e-6)


def test_benchmark_smoke_run_on_tiny_writes_its_report(tiny_pipe, tmp_path):
    spec = importlib.util.spec_from_file_location("cosmos_predict25_bench", REPO / "benchmarks" / "cosmos_predict25.py")
    bench = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = bench  # dataclasses look their module up there
    spec.loader.exec_module(bench)
    report = bench.main(["--preset", "tiny", "--device", "cpu", "--quick", "--no-compile", "--out", str(tmp_path)])

    written = json.loads((tmp_path / "cpu-tiny.json").read_text())
    assert written == json.loads(json.dumps(report))
    assert {"gpu", "software", "date", "workloads"} <= written.keys()
    assert {"torch", "diffusers", "transformers", "peft", "cuda"} <= written["software"].keys()
    expected = {"train_lora[eager+full]", "train_lora[eager+selective(attention)]", "train_dora[eager+selective(attention)]",
                "train_lora", "train_dora", "generate_i2w"}
    assert expected <= written["workloads"].keys()
    for name, w in written["workloads"].items():
        assert {"baseline_s", "ours_s", "speedup", "peak_gib", "tflops", "notes"} <= w.keys(), name
    for name in expected:
        w = written["workloads"][name]
        assert w["baseline_s"] > 0 and w["ours_s"] > 0 and w["speedup"] == pytest.approx(w["baseline_s"] / w["ours_s"], rel=0.05)
    assert written["workloads"]["generate_i2w"]["psnr_db"] >= 60, "fp32 fast sampler must match the stock frames"
    table = (tmp_path / "cpu-tiny.md").read_text()
    assert "| generate_i2w |" in table and "| train_lora |" in table


def test_out_of_memory_advice_names_the_next_setting_to_change():
    from flywheel.train.speed import memory_advice

    default = memory_advice(TrainConfig())  # on a GPU: selective, keeping attention and large projections
    assert default.index("train.selective_save: attention") < default.index("train.activation_checkpointing: full")
    assert "batch_size" not in default
    assert "train.activation_checkpointing: selective" in memory_advice(TrainConfig(activation_checkpointing="none"))
    low = memory_advice(TrainConfig(selective_save="attention", batch_size=4))
    assert "selective_save" not in low and "full" in low and "train.batch_size (now 4)" in low
    floor = memory_advice(TrainConfig(activation_checkpointing="full"))
    assert "clips.num_frames" in floor
