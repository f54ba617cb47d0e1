"""Evaluation speed: soupsearch's Evaluator against a raw batched ``model.generate`` on the same prompts.

    python benchmarks/eval_bench.py                       # pico zoo, CPU
    python benchmarks/eval_bench.py --zoo tiny
    python benchmarks/eval_bench.py --shape 7b --device cuda --fewshot 16 --max-gen-toks 256

Reports items/s for both, and the Evaluator's overhead share: the part of an evaluation spent
outside the model's own forward passes and generate (request handling, filtering, metrics,
statistics, bookkeeping). ``--shape 7b`` swaps the zoo model for a randomly initialised model with
Mistral-7B layer shapes (bf16, the zoo's tokenizer): speed only, its answers are noise, so
generation runs to the token budget every time.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
from transformers import AutoTokenizer, MistralConfig, MistralForCausalLM  # noqa: E402

from evals.harness import Evaluator, load_model  # noqa: E402
from evals.spec import TaskSpec  # noqa: E402
from evals.tasks import BUNDLED_TASKS  # noqa: E402

MISTRAL_7B = dict(
    hidden_size=4096,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=8,
    intermediate_size=14336,
    max_position_embeddings=4096,
)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def raw_generate(model, tokenizer, prompts: list[str], budgets: list[int], batch_size: int, device: str) -> float:
    """Seconds for plain greedy ``generate`` over the prompts in order, batch by batch, left-padded."""
    tokenizer.padding_side = "left"
    _sync(device)
    start = time.perf_counter()
    for i in range(0, len(prompts), batch_size):
        batch = tokenizer(prompts[i : i + batch_size], return_tensors="pt", padding=True).to(device)
        out = model.generate(
            **batch,
            max_new_tokens=max(budgets[i : i + batch_size]),
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
        )
        tokenizer.batch_decode(out[:, batch["input_ids"].shape[1] :])
    _sync(device)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--zoo", choices=["pico", "tiny"], default="pico")
    parser.add_argument("--model", default="specialist-gsm8k", help="zoo model to score (default specialist-gsm8k)")
    parser.add_argument("--shape", choices=["zoo", "7b"], default="zoo")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--split", choices=["search", "select", "test"], default="search")
    parser.add_argument("--fewshot", type=int, help="few-shot examples per prompt (default: each task's own, 0)")
    parser.add_argument("--max-gen-toks", type=int, help="token budget per answer (default: each task's own, 48)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    from zoo.build import open_zoo  # the benchmark only borrows the zoo; evals never imports search

    folder = open_zoo(args.zoo, progress=False) / args.model
    if args.shape == "7b":
        tokenizer = AutoTokenizer.from_pretrained(folder)
        config = MistralConfig(vocab_size=len(tokenizer), **MISTRAL_7B)
        model = MistralForCausalLM(config).to(device=args.device, dtype=torch.bfloat16).eval()
    else:
        model, tokenizer = load_model(folder, args.device)
    gen = {"max_gen_toks": args.max_gen_toks} if args.max_gen_toks else None
    specs = [TaskSpec(task=t, num_fewshot=args.fewshot, gen_kwargs=gen) for t in BUNDLED_TASKS]
    evaluator = Evaluator(model, tokenizer, specs)
    evaluator.score(args.split)  # warm-up: builds the prompts and probes the batch size, once
    runs = [evaluator.score(args.split) for _ in range(args.repeats)]
    items = sum(len(s.per_item) for s in runs[0].values())

    requests = [
        r
        for name in BUNDLED_TASKS
        for r in evaluator.built_requests(name, args.split, evaluator.item_ids(name, args.split))
    ]
    prompts = [r.args[0] for r in requests]
    budgets = [r.args[1].get("max_gen_toks", evaluator.lm.max_gen_toks) for r in requests]
    raw_tokenizer = AutoTokenizer.from_pretrained(folder)
    raw_tokenizer.pad_token = raw_tokenizer.pad_token or raw_tokenizer.eos_token
    raw = [
        raw_generate(model, raw_tokenizer, prompts, budgets, evaluator.batch_size, args.device)
        for _ in range(args.repeats)
    ]

    seconds = statistics.median(r.seconds for r in runs)
    device = (
        torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor() or platform.machine()
    )
    print(f"machine: {device}, torch {torch.__version__}, {torch.get_num_threads()} thread(s)")
    print(
        f"model: {args.zoo}/{args.model} shape={args.shape}, {sum(p.numel() for p in model.parameters()):,} parameters"
    )
    print(f"items: {items} ({args.split} split of {', '.join(BUNDLED_TASKS)}), batch size {evaluator.batch_size}")
    print(f"evaluator: {items / seconds:8.1f} items/s  (median of {args.repeats}: {seconds:.3f} s)")
    print(
        f"  overhead share: {statistics.median(r.overhead_share for r in runs):.1%} "
        f"(min {min(r.overhead_share for r in runs):.1%}, max {max(r.overhead_share for r in runs):.1%})"
    )
    print(
        f"raw generate: {items / statistics.median(raw):8.1f} items/s  (median {statistics.median(raw):.3f} s, "
        "no stop sequences: every answer runs to its token budget)"
    )


if __name__ == "__main__":
    main()
