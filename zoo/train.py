"""A short causal-LM training loop for the zoo, in the spirit of nanoGPT."""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Iterator

import torch
from transformers import MistralConfig, MistralForCausalLM, PreTrainedTokenizerFast

from evals.tasks.synthetic import format_document, format_prompt
from zoo.recipe import Schedule, Shape


def new_model(shape: Shape, tokenizer: PreTrainedTokenizerFast, seed: int) -> MistralForCausalLM:
    torch.manual_seed(seed)
    config = MistralConfig(
        vocab_size=len(tokenizer),
        hidden_size=shape.hidden_size,
        intermediate_size=shape.intermediate_size,
        num_hidden_layers=shape.num_hidden_layers,
        num_attention_heads=shape.num_attention_heads,
        num_key_value_heads=shape.num_key_value_heads,
        head_dim=shape.hidden_size // shape.num_attention_heads,
        max_position_embeddings=shape.max_position_embeddings,
        sliding_window=None,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
        dtype="float32",
    )
    return MistralForCausalLM(config)


def _split(lengths: list[int]) -> int:
    """Where to cut length-sorted rows in two so that the padded token count is smallest."""
    n = len(lengths)
    return min(range(1, n + 1), key=lambda k: k * lengths[k - 1] + (n - k) * lengths[-1] * (k < n))


def batches(
    documents: Iterator[str], tokenizer: PreTrainedTokenizerFast, batch_size: int
) -> Iterator[list[tuple[torch.Tensor, torch.Tensor]]]:
    """Batches of ``document + eos``, as up to two length-sorted, right-padded micro-batches.

    Word problems are about three times as long as arithmetic items; padding a mixed batch to its
    longest row wasted half the compute. Padded positions are masked out of the loss.
    """
    eos = tokenizer.eos_token_id
    while True:
        docs = [next(documents) for _ in range(batch_size)]
        rows = sorted((ids + [eos] for ids in tokenizer(docs)["input_ids"]), key=len)
        cut = _split([len(r) for r in rows])
        micro = []
        for group in (rows[:cut], rows[cut:]) if cut < len(rows) else (rows,):
            width = len(group[-1])
            ids = torch.full((len(group), width), eos, dtype=torch.long)
            labels = torch.full((len(group), width), -100, dtype=torch.long)
            for i, row in enumerate(group):
                ids[i, : len(row)] = labels[i, : len(row)] = torch.tensor(row)
            micro.append((ids, labels))
        yield micro


PROBE_EVERY = 50  # steps between two probes of a ``target`` schedule


def train(
    model: MistralForCausalLM,
    documents: Iterator[str],
    tokenizer: PreTrainedTokenizerFast,
    schedule: Schedule,
    on_step: Callable[[int, float], None] = lambda step, loss: None,
    probe: Callable[[MistralForCausalLM], float] | None = None,
) -> MistralForCausalLM:
    """Train on ``documents`` as ``schedule`` says; a ``target`` schedule needs ``probe``, the share
    of problems the model solves."""
    if schedule.target is not None and probe is None:
        raise ValueError("a schedule with a target needs a probe")
    torch.manual_seed(schedule.seed)
    model.train()
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=schedule.lr, betas=(0.9, 0.98), weight_decay=schedule.weight_decay
    )
    # cosine decay from the warmup's end to ``total``; a target schedule sets both when it is met
    decay_start, total = schedule.warmup, None if schedule.target is not None else schedule.steps

    def lr_at(step: int) -> float:
        if step < schedule.warmup:
            return schedule.lr * (step + 1) / schedule.warmup
        if total is None:  # the stable phase
            return schedule.lr
        progress = (step - decay_start) / max(1, total - decay_start)
        return schedule.lr * 0.5 * (1 + math.cos(math.pi * progress))

    stream = batches(documents, tokenizer, schedule.batch_size)
    step = 0
    while total is None or step < total:
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step)
        micro = next(stream)
        # the batch's mean token loss, summed over micro-batches (HF's gradient-accumulation path)
        tokens = sum(int((labels[:, 1:] != -100).sum()) for _, labels in micro)
        loss = 0.0
        for ids, labels in micro:
            part = model(input_ids=ids, labels=labels, num_items_in_batch=tokens).loss
            part.backward()
            loss += part.item()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        on_step(step, loss)
        step += 1
        if total is None and (step >= schedule.steps or step % PROBE_EVERY == 0 and probe(model) >= schedule.target):
            decay_start, total = step, step + schedule.decay
    model.eval()
    return model


def answer_accuracy(model: MistralForCausalLM, tokenizer: PreTrainedTokenizerFast, items: list[dict]) -> float:
    """The share of ``items`` whose whole answer is the model's top prediction, token by token, after
    the gold tokens before it: greedy decoding's exact match, in one forward pass."""
    rows = []
    for item in items:
        full, prompt = tokenizer(format_document(item))["input_ids"], tokenizer(format_prompt(item))["input_ids"]
        if full[: len(prompt)] != prompt:
            raise ValueError(f"the tokenizer splits {format_prompt(item)!r} apart from its answer")
        rows.append((full, len(prompt)))
    ids = torch.full((len(rows), max(len(full) for full, _ in rows)), tokenizer.eos_token_id)
    for i, (full, _) in enumerate(rows):
        ids[i, : len(full)] = torch.tensor(full)
    was_training = model.training
    model.eval()
    with torch.no_grad():
        predicted = model(input_ids=ids).logits.argmax(-1)
    model.train(was_training)
    solved = [
        bool((predicted[i, start - 1 : len(full) - 1] == ids[i, start : len(full)]).all())
        for i, (full, start) in enumerate(rows)
    ]
    return sum(solved) / len(solved)


def mixture(
    streams: dict[str, Iterator[dict]], weights: dict[str, float], seed: int, render: Callable[[dict], str]
) -> Iterator[str]:
    """Documents drawn from several task streams in proportion to ``weights``."""
    rng = random.Random(seed)
    names = sorted(streams)
    while True:
        name = rng.choices(names, [weights[n] for n in names])[0]
        yield render(next(streams[name]))
