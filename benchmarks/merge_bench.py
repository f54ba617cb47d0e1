"""Candidate build time: merge_core's engine vs mergekit's in-memory API vs mergekit-yaml.

    python benchmarks/merge_bench.py            # ~0.1B-parameter Mistral shape on the CPU
    python benchmarks/merge_bench.py --quick    # a tiny shape, one repeat (CI)
    python benchmarks/merge_bench.py --device cuda --shape 2b   # a 2.0B-parameter Mistral shape on a GPU

Parents are random-weight Mistral folders (a base and fine-tunes = base + small noise) written to
a temporary folder. The engine is timed after one warm-up build (which fills the per-study cache;
that precompute is reported on its own). Each of the three is run ``--repeats`` times and its
fastest run is reported: on a shared machine the fastest run is the one least disturbed by other
work, and all three get the same number of tries. On a GPU the table adds the memory-bandwidth floor
(bytes of all inputs read + the output written, over the measured device copy bandwidth) and
peak device memory.
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml
from safetensors.torch import save_file
from transformers import MistralConfig

from merge_core import Engine, Parents

SHAPES = {  # name: (hidden, layers, heads, kv heads, intermediate, vocab)
    "quick": (256, 2, 4, 2, 704, 4000),
    "0.1b": (768, 8, 12, 4, 2688, 32000),
    "2b": (4096, 8, 32, 8, 14336, 32000),
}
METHODS = {  # method: (fine-tunes used, trial parameters)
    "linear": (
        3,
        lambda models, base: {
            "models": [{"model": m, "parameters": {"weight": w}} for m, w in zip([base, *models[:2]], (0.5, 0.3, 0.2))]
        },
    ),
    "slerp": (
        1,
        lambda models, base: {
            "base_model": base,
            "parameters": {"t": [0.2, 0.7]},
            "models": [{"model": base}, {"model": models[0]}],
        },
    ),
    "task_arithmetic": (3, lambda models, base: _task_family(models, base)),
    "ties": (3, lambda models, base: _task_family(models, base)),
    "dare_ties": (3, lambda models, base: _task_family(models, base)),
    "dare_linear": (3, lambda models, base: _task_family(models, base)),
}


def _task_family(models: list[str], base: str) -> dict:
    return {
        "base_model": base,
        "models": [
            {"model": m, "parameters": {"weight": w, "density": d}}
            for m, w, d in zip(models, (0.5, 0.3, 0.4), (0.3, 0.5, 0.7))
        ],
    }


def write_parents(folder: Path, shape: str, dtype: torch.dtype) -> list[str]:
    hidden, layers, heads, kv, intermediate, vocab = SHAPES[shape]
    config = MistralConfig(
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        intermediate_size=intermediate,
        vocab_size=vocab,
        tie_word_embeddings=False,
        dtype=str(dtype).removeprefix("torch."),
        architectures=["MistralForCausalLM"],
    )
    head = hidden // heads
    shapes = {
        "model.embed_tokens.weight": (vocab, hidden),
        "model.norm.weight": (hidden,),
        "lm_head.weight": (vocab, hidden),
    }
    for i in range(layers):
        prefix = f"model.layers.{i}."
        shapes.update(
            {
                prefix + "input_layernorm.weight": (hidden,),
                prefix + "post_attention_layernorm.weight": (hidden,),
                prefix + "self_attn.q_proj.weight": (heads * head, hidden),
                prefix + "self_attn.k_proj.weight": (kv * head, hidden),
                prefix + "self_attn.v_proj.weight": (kv * head, hidden),
                prefix + "self_attn.o_proj.weight": (hidden, heads * head),
                prefix + "mlp.gate_proj.weight": (intermediate, hidden),
                prefix + "mlp.up_proj.weight": (intermediate, hidden),
                prefix + "mlp.down_proj.weight": (hidden, intermediate),
            }
        )
    generator = torch.Generator().manual_seed(0)
    base = {name: torch.randn(s, generator=generator) * 0.02 for name, s in shapes.items()}
    paths = []
    for index in range(4):
        path = folder / ("base" if index == 0 else f"tuned-{index}")
        path.mkdir()
        tensors = (
            base
            if index == 0
            else {name: value + torch.randn(value.shape, generator=generator) * 1e-3 for name, value in base.items()}
        )
        save_file(
            {name: value.to(dtype).contiguous() for name, value in tensors.items()},
            path / "model.safetensors",
            metadata={"format": "pt"},
        )
        config.save_pretrained(path)
        paths.append(str(path))
    return paths


def mergekit_api(engine: Engine, config: dict, device: torch.device) -> float:
    """One candidate through mergekit.merge_methods.api.merge_state_dicts, as a search would call it."""
    from mergekit.merge_methods import merge_state_dicts

    plan = engine.plan(config)
    models = list(dict.fromkeys(s.model for job in plan.jobs for s in job.sources))
    state_dicts = {
        m: {
            job.name: engine.parents.stored(m, next(s.tensor for s in job.sources if s.model == m)) for job in plan.jobs
        }
        for m in models
    }
    first = plan.jobs[0]
    base = first.sources[first.base].model if first.base is not None else None
    parameters = {**first.shared, **first.per_input}
    if "t" in first.shared:  # per-layer gradient values: one entry per tensor group
        from mergekit.merge_methods import PerGroupValues

        parameters["t"] = PerGroupValues([job.shared["t"] for job in plan.jobs])
    torch.manual_seed(0)
    started = time.perf_counter()
    merge_state_dicts(state_dicts, plan.method, parameters=parameters, base=base)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - started


def mergekit_yaml(config: dict, folder: Path, device: torch.device) -> float:
    config_file = folder / "bench.yaml"
    config_file.write_text(yaml.safe_dump(config))
    out = folder / f"out-{time.monotonic_ns()}"
    command = [str(Path(sys.executable).parent / "mergekit-yaml"), str(config_file), str(out)]
    if device.type == "cuda":
        command.append("--cuda")
    started = time.perf_counter()
    subprocess.run(command, check=True, capture_output=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    return time.perf_counter() - started


def copy_bandwidth(device: torch.device) -> float:
    """Bytes read plus bytes written per second for a large device-to-device copy."""
    source = torch.empty(256 * 1024 * 1024, dtype=torch.uint8, device=device)
    target = torch.empty_like(source)
    target.copy_(source)
    torch.cuda.synchronize(device)
    started = time.perf_counter()
    for _ in range(10):
        target.copy_(source)
    torch.cuda.synchronize(device)
    return 10 * 2 * source.numel() / (time.perf_counter() - started)


def main(argv: list[str] | None = None) -> None:
    args = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    args.add_argument("--quick", action="store_true", help="tiny shape, one repeat, for CI")
    args.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    args.add_argument("--shape", choices=sorted(SHAPES), help="default 0.1b (cpu) or 2b (cuda)")
    args.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args.add_argument("--repeats", type=int, default=3)
    args.add_argument("--methods", default=",".join(METHODS))
    args.add_argument("--no-yaml", action="store_true", help="skip mergekit-yaml (disk to disk)")
    opts = args.parse_args(argv)
    shape = "quick" if opts.quick else opts.shape or ("2b" if opts.device == "cuda" else "0.1b")
    repeats = 1 if opts.quick else opts.repeats
    device = torch.device(opts.device)
    dtype = getattr(torch, opts.dtype)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        paths = write_parents(folder, shape, dtype)
        parents = Parents.open(paths, device)
        parents.load()
        params = sum(t.numel() for t in parents[paths[0]].tensors.values())
        bandwidth = copy_bandwidth(device) if device.type == "cuda" else None
        print(
            f"# {shape} Mistral shape, {params / 1e6:.0f}M parameters, {opts.dtype}, {device}, "
            f"{platform.processor() or platform.machine()}, torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads"
        )
        print(
            "| method | engine s | precompute s | mergekit API s | API/engine | "
            "mergekit-yaml s | yaml/engine |" + (" x floor | peak GiB |" if bandwidth else "")
        )
        print("|---|---|---|---|---|---|---|" + ("---|---|" if bandwidth else ""))
        for method in opts.methods.split(","):
            tuned, make = METHODS[method]
            config = {"merge_method": method, "dtype": opts.dtype, **make(paths[1 : 1 + tuned], paths[0])}
            engine = Engine(parents)
            started = time.perf_counter()
            engine.build(config, seed=0)
            precompute = time.perf_counter() - started
            reports = [engine.build(config, seed=seed + 1) for seed in range(repeats)]
            ours = min(r.seconds for r in reports)
            api = min(mergekit_api(engine, config, device) for _ in range(repeats))
            disk = None if opts.no_yaml else min(mergekit_yaml(config, folder, device) for _ in range(repeats))
            row = f"| {method} | {ours:.3f} | {precompute:.3f} | {api:.3f} | {api / ours:.1f} | " + (
                f"{disk:.1f} | {disk / ours:.0f} |" if disk else "- | - |"
            )
            if bandwidth:
                plan = engine.plan(config)
                moved = sum(parents[s.model].headers[s.tensor].nbytes for j in plan.jobs for s in j.sources)
                moved += engine.candidate.nbytes
                row += f" {ours / (moved / bandwidth):.1f} | {reports[-1].peak_cuda_bytes / 2**30:.1f} |"
            print(row, flush=True)


if __name__ == "__main__":
    main()
