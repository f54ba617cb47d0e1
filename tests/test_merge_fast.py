"""Fast paths against mergekit's own in-memory API: exact equality, exact top-k, seeded masks."""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch
from merge_configs import configs

from merge_core import Engine, Parents, kernels, methods
from merge_core.methods.task_arithmetic import dare_mask
from merge_core.parents import Parent

FAST_CASES = [
    "linear",
    "linear_negative_unnormalized",
    "slerp_gradient",
    "task_arithmetic",
    "ties",
    "ties_rescaled",
    "ties_filters_lambda",
    "slices_two_slerp_bf16_out",
    "task_arithmetic_bf16",
]
MODELS = ["base", "specialist-addition", "specialist-subtraction", "specialist-multiplication", "specialist-gsm8k"]


VARIANTS = {  # name: (a config of merge_configs, global parameters added, top-level keys added)
    "slerp_gradient": ("slerp_gradient", {}, {}),
    "task_arithmetic": ("task_arithmetic", {}, {}),
    "ties": ("ties", {}, {}),
    "ties_rescaled": ("ties", {"rescale": True}, {}),
    "dare_ties": ("dare_ties", {}, {}),
    "dare_linear": ("dare_linear", {}, {}),
    "dare_linear_fp16": ("dare_linear", {}, {"dtype": "float16"}),
    "dare_ties_bf16": ("dare_ties", {}, {"dtype": "bfloat16"}),
}


def variant(zoo: Path, name: str) -> dict:
    key, parameters, top = VARIANTS[name]
    config = copy.deepcopy(configs(zoo)[key]) | top
    config["parameters"] = config.get("parameters", {}) | parameters
    return config


@pytest.fixture(scope="module")
def parents(pico_zoo):
    loaded = Parents.open([pico_zoo / name for name in MODELS])
    loaded.load()
    return loaded


def weights(engine: Engine) -> dict[str, torch.Tensor]:
    return {name: tensor.clone() for name, tensor in engine.candidate.tensors.items()}


def build(parents: Parents, config: dict, fast: bool, seed: int = 0) -> dict[str, torch.Tensor]:
    engine = Engine(parents, use_fast_paths=fast)
    report = engine.build(config, seed=seed)
    assert report.fast_path == fast
    return weights(engine)


@pytest.fixture(params=["default", "1000-element-blocks", "gpu-layout"])
def block(request, monkeypatch):
    """Pico tensors fit in one default CPU block and in one kernel span, so also split them (torch
    blocks and kernel spans of 1000 elements); and walk whole tensors however small the CPU block
    is, as the fast paths do on a GPU."""
    if request.param != "default":
        monkeypatch.setattr("merge_core.methods.common.CPU_BLOCK", 1000)
        monkeypatch.setattr("merge_core.methods.common.KERNEL_MIN_SPAN", 1000)
    if request.param == "gpu-layout":
        monkeypatch.setattr("merge_core.methods.common.block", lambda numel, device: max(1, numel))


@pytest.mark.parametrize("name", FAST_CASES)
def test_fast_path_equals_mergekit_api_bit_for_bit(name, parents, pico_zoo, block):
    config = variant(pico_zoo, name) if name in VARIANTS else configs(pico_zoo)[name]
    ours, mergekit = build(parents, config, fast=True), build(parents, config, fast=False)
    for tensor, value in mergekit.items():
        assert torch.equal(ours[tensor], value), tensor


def test_new_densities_reuse_the_study_cache(parents, pico_zoo):
    config = copy.deepcopy(configs(pico_zoo)["ties"])
    engine = Engine(parents)
    engine.build(config)
    cached = len(engine.cache.values)
    for model in config["models"]:
        model["parameters"]["density"] = 0.05
    engine.build(config)
    assert len(engine.cache.values) == cached
    assert all(torch.equal(engine.candidate.tensors[k], v) for k, v in build(parents, config, fast=False).items())


def quantized_parents(zoo: Path, step: float) -> Parents:
    """Base and one fine-tune whose task vector takes few distinct magnitudes: many top-k ties."""
    base, tuned = Parent.open(zoo / "base"), Parent.open(zoo / "specialist-gsm8k")
    stored = Parents([base, tuned])
    stored.load()
    for name, value in base.tensors.items():
        tau = ((tuned.tensors[name] - value) / step).round().clamp(-3, 3) * step
        tuned.tensors[name] = value + tau
    return stored


@pytest.mark.parametrize("density", [0.0001, 0.37, 0.9])
def test_ties_keeps_exactly_mergekits_top_k_under_ties(density, pico_zoo):
    stored = quantized_parents(pico_zoo, step=1e-3)
    config = {
        "merge_method": "ties",
        "base_model": str(pico_zoo / "base"),
        "models": [{"model": str(pico_zoo / "specialist-gsm8k"), "parameters": {"weight": 1.0, "density": density}}],
    }
    ours, mergekit = build(stored, config, fast=True), build(stored, config, fast=False)
    base, tuned = stored[pico_zoo / "base"].tensors, stored[pico_zoo / "specialist-gsm8k"].tensors
    for name, value in mergekit.items():
        assert torch.equal(ours[name], value), name
        changed = int((ours[name] != base[name]).sum())
        nonzero = int((tuned[name] != base[name]).sum())
        assert changed == min(nonzero, max(1, int(density * value.numel()))), name


def test_sign_consensus_breaks_exact_cancellations_towards_plus_as_mergekit(pico_zoo, block):
    """Two task vectors that are exact negatives: every sum is +0, the majority sign is +."""
    step = 2.0**-10
    base, plus, minus = (Parent.open(pico_zoo / name) for name in MODELS[:3])
    stored = Parents([base, plus, minus])
    stored.load()
    for name, value in base.tensors.items():
        base.tensors[name] = (value / step).round() * step
        tau = ((plus.tensors[name] - value) / step).round().clamp(-3, 3) * step
        plus.tensors[name], minus.tensors[name] = base.tensors[name] + tau, base.tensors[name] - tau
    config = {
        "merge_method": "ties",
        "base_model": str(pico_zoo / MODELS[0]),
        "models": [
            {"model": str(pico_zoo / name), "parameters": {"weight": 0.5, "density": 1.0}} for name in MODELS[1:3]
        ],
    }
    ours, mergekit = build(stored, config, fast=True), build(stored, config, fast=False)
    moved = 0
    for name, value in mergekit.items():
        assert torch.equal(ours[name], value), name
        moved += int((value > base.tensors[name]).sum())
        assert not (value < base.tensors[name]).any(), name  # only the + side agrees
    assert moved > 0


def assert_equals_mergekit_given_the_same_masks(parents: Parents, config: dict, seed: int = 7) -> None:
    """Our fast path against mergekit's API, with mergekit's torch.bernoulli handed our DARE masks
    (ignored by methods without random masks)."""
    engine = Engine(parents)
    engine.build(config, seed=seed)
    ours = weights(engine)
    plan = engine.plan(config)
    masks = iter(
        [
            dare_mask(job.shape, job.per_input["density"][source.model], seed, job, source.model, torch.device("cpu"))
            for job in plan.jobs
            for i, source in enumerate(job.sources)
            if i != job.base
        ]
    )

    def same_masks(probabilities: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return next(masks).to(probabilities.dtype)

    with mock.patch("mergekit.sparsify.torch.bernoulli", side_effect=same_masks) as bernoulli:
        mergekit = build(parents, config, fast=False, seed=seed)
    if bernoulli.called:
        assert next(masks, None) is None  # mergekit drew exactly one mask per task vector
    for tensor, value in mergekit.items():
        assert torch.equal(ours[tensor], value), tensor


@pytest.mark.parametrize("name", ["dare_ties", "dare_linear", "dare_linear_fp16", "dare_ties_bf16"])
def test_dare_fast_path_equals_mergekit_given_the_same_masks(name, parents, pico_zoo, block):
    """fp32 runs the fused kernels; fp16 and bf16 run torch ops on the CPU's masks."""
    assert_equals_mergekit_given_the_same_masks(parents, variant(pico_zoo, name))


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_footprint_bounds_what_the_fast_paths_allocate(name, parents, pico_zoo, block):
    """The engine decides residency from `methods.footprint` before anything is built."""
    config = variant(pico_zoo, name)
    engine = Engine(parents)
    plan = engine.plan(config)
    values, scratch = methods.footprint(plan, parents)
    engine.build(plan, seed=1)
    assert engine.cache.scratch.nbytes == scratch  # exact: masks, |masked|, kept flags, terms
    assert engine.cache.values_nbytes == values > 0  # exact: task vectors, ranks, norms, dots


@pytest.mark.parametrize(
    "method,fast", [("dare_ties", True), ("dare_linear", True), ("della", False), ("della_linear", False)]
)
def test_random_merges_depend_on_seed_not_on_order(method, fast, parents, pico_zoo):
    config = configs(pico_zoo)[method]
    engine = Engine(parents, use_fast_paths=fast)
    plan = engine.plan(config)
    engine.build(plan, seed=3)
    first = weights(engine)
    engine.build(dataclasses.replace(plan, jobs=tuple(reversed(plan.jobs))), seed=3)
    assert all(torch.equal(engine.candidate.tensors[k], v) for k, v in first.items())
    engine.build(plan, seed=4)
    assert not all(torch.equal(engine.candidate.tensors[k], v) for k, v in first.items())


@pytest.mark.parametrize("density", [0.0, 0.3, 0.5, 0.9, 1.0])
def test_cpu_dare_mask_is_bernoulli_with_the_requested_density(density):
    job = dataclasses.make_dataclass("Job", ["name"])("model.layers.0.mlp.up_proj.weight")
    numel = 3_000_017
    mask = dare_mask((numel,), density, 5, job, "tuned", torch.device("cpu"))
    assert set(mask.unique().tolist()) <= {0.0, 1.0}
    sigma = (density * (1 - density) / numel) ** 0.5
    assert abs(mask.mean().item() - density) <= 5 * sigma + 1e-9
    assert torch.equal(mask, dare_mask((numel,), density, 5, job, "tuned", torch.device("cpu")))
    if 0 < density < 1:
        assert not torch.equal(mask, dare_mask((numel,), density, 6, job, "tuned", torch.device("cpu")))


def test_cpu_dare_draws_are_splitmix64_and_any_range_draws_the_same_elements():
    """The first outputs of SplitMix64 seeded with 1234567, from the reference implementation
    (Vigna, splitmix64.c): an element is kept when the top 32 bits of its output are below the cut."""
    reference = [
        6457827717110365317,
        3203168211198807973,
        9817491932198370423,
        4593380528125082431,
        16408922859458223821,
    ]
    for index, output in enumerate(reference):
        kept = np.empty(1, dtype=np.uint8)
        for cut in (output >> 32, (output >> 32) + 1):
            kernels.keep_mask(1234567, cut, index, kept)
            assert kept[0] == (output >> 32 < cut)
    whole = np.empty(10_000, dtype=np.uint8)
    kernels.keep_mask(99, kernels.threshold(0.4), 0, whole)
    piece = np.empty(777, dtype=np.uint8)
    kernels.keep_mask(99, kernels.threshold(0.4), 4321, piece)
    assert np.array_equal(piece, whole[4321 : 4321 + 777])


def many_parents(zoo: Path, folder: Path, count: int) -> tuple[Parents, list[str]]:
    """The base and ``count`` fine-tunes: folders linking to one specialist's files, each given
    its own task vector in memory (random noise, larger for each, so that signs disagree)."""
    names = []
    for index in range(count):
        name = folder / f"tuned-{index}"
        name.mkdir()
        for file in (zoo / "specialist-gsm8k").iterdir():
            (name / file.name).symlink_to(file)
        names.append(str(name))
    stored = Parents([Parent.open(zoo / "base"), *(Parent.open(name) for name in names)])
    stored.load()
    generator = torch.Generator().manual_seed(0)
    base = stored[zoo / "base"].tensors
    for index, name in enumerate(names):
        tensors = stored[name].tensors
        for key, value in base.items():
            noise = torch.randn(value.shape, generator=generator) * 1e-2 * (index + 1)
            tensors[key] = value + noise
    return stored, names


@pytest.mark.parametrize("method", ["ties", "dare_ties"])
def test_twenty_models_sum_in_torchs_order(method, pico_zoo, tmp_path, block):
    """Past 16 models torch sums a [models, n] tensor over dim 0 in a cascade, not in row order."""
    stored, names = many_parents(pico_zoo, tmp_path, 20)
    config = {
        "merge_method": method,
        "base_model": str(pico_zoo / "base"),
        "models": [
            {"model": name, "parameters": {"weight": 0.1 + 0.05 * index - 0.5 * (index == 3), "density": 0.7}}
            for index, name in enumerate(names)
        ],
    }
    assert_equals_mergekit_given_the_same_masks(stored, config)


def test_kernels_compile_once_then_every_process_reads_them_from_numbas_cache(pico_zoo, tmp_path):
    """A fresh numba cache: the first process compiles each kernel its builds use, a second one
    compiles none (a run also builds every method once before its first trial)."""
    builds = f"""
import json, sys
from pathlib import Path
sys.path.insert(0, "tests")
from merge_configs import configs
from merge_core import Engine, Parents, kernels
zoo = Path({str(pico_zoo)!r})
engine = Engine(Parents.open(zoo / name for name in {MODELS!r}))
for name in ("slerp_gradient", "dare_ties"):
    engine.build({{**configs(zoo)[name], "dtype": "float32"}}, seed=1)
print(json.dumps({{name: [sum(getattr(kernels, name).stats.cache_hits.values()),
                          sum(getattr(kernels, name).stats.cache_misses.values())]
                   for name in ("slerp", "task_arithmetic", "masked_abs")}}))
"""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "NUMBA_CACHE_DIR": str(tmp_path)}
    first, second = (
        json.loads(
            subprocess.run(
                [sys.executable, "-c", builds], env=env, capture_output=True, text=True, check=True, timeout=600
            ).stdout
        )
        for _ in range(2)
    )
    assert all(misses > 0 for _, misses in first.values()), first  # compiled: nothing was cached yet
    assert all(hits > 0 and misses == 0 for hits, misses in second.values()), second


@pytest.mark.parametrize(
    "inherited",
    [{}, {"NUMBA_NUM_THREADS": "2", "SOUPSEARCH_NUMBA_THREADS_FROM_OMP": "2"}],
    ids=["fresh", "child of a process limited to 2"],
)
def test_a_process_limited_by_omp_num_threads_keeps_torch_at_that_limit_after_a_merge(pico_zoo, inherited):
    """numba's kernels share OpenMP with torch: under OMP_NUM_THREADS=N, the merge kernels run on N
    threads, and so do torch's ops after them (not on every CPU); also in a process started by one
    that had set numba's count from its own, other limit."""
    build = f"""
import json, sys
from pathlib import Path
sys.path.insert(0, "tests")
from merge_core import Engine, Parents
import numba, torch
from merge_configs import configs
zoo = Path({str(pico_zoo)!r})
engine = Engine(Parents.open(zoo / name for name in {MODELS!r}))
before = torch.get_num_threads()
engine.build({{**configs(zoo)["dare_ties"], "dtype": "float32"}}, seed=1)
print(json.dumps([before, torch.get_num_threads(), numba.get_num_threads()]))
"""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    env.pop("NUMBA_NUM_THREADS", None)
    env.update(inherited)
    done = subprocess.run([sys.executable, "-c", build], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(done.stdout) == [1, 1, 1]  # before the merge, after it, and numba's
