"""Build merge candidates in place in one resident model, trial after trial."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from mergekit.merge_methods import merge_tensors
from transformers import AutoModelForCausalLM, PretrainedConfig

from merge_core import methods
from merge_core.config import ConfigSource, load_config
from merge_core.errors import MergeInputError
from merge_core.methods.common import StudyCache, tensor_seed
from merge_core.parents import Parents
from merge_core.planner import MergePlan, TensorJob, plan_merge


@dataclass(frozen=True)
class BuildReport:
    method: str
    seconds: float
    fast_path: bool
    streamed: bool
    peak_device_bytes: int  # accounted: candidate + resident parents/caches + in-flight tensors
    peak_cuda_bytes: int | None  # torch.cuda.max_memory_allocated during the build, on CUDA


class Candidate:
    """One HF model whose parameters receive each trial's merged tensors in place."""

    def __init__(self, config: PretrainedConfig, plan: MergePlan, device: torch.device) -> None:
        self.config = config
        with torch.device(device):
            self.model = AutoModelForCausalLM.from_config(config, dtype=plan.jobs[0].out_dtype)
        self.model.eval().requires_grad_(False)
        self.tensors = self.model.state_dict(keep_vars=True)
        for job in plan.jobs:
            if job.name not in self.tensors:
                raise MergeInputError(f"tensor {job.name} has no place in a {type(self.model).__name__}")
            target = self.tensors[job.name]
            if target.dtype != job.out_dtype or tuple(target.shape) != job.shape:
                target.data = torch.empty(job.shape, dtype=job.out_dtype, device=device)

    @property
    def nbytes(self) -> int:
        unique = {t.data_ptr(): t.numel() * t.element_size() for t in self.tensors.values()}
        return sum(unique.values())

    def fits(self, config: PretrainedConfig) -> bool:
        return config.to_diff_dict() == self.config.to_diff_dict()


class Engine:
    """Merge configs over a fixed set of parents into one reused candidate.

    The parents stay resident on the device when they, the candidate and the study cache fit in
    `device_budget` bytes (no budget: always); otherwise they stay in host memory and stream.
    """

    def __init__(self, parents: Parents, device_budget: int | None = None, use_fast_paths: bool = True) -> None:
        self.parents = parents
        self.device = parents.device
        self.device_budget = device_budget
        self.use_fast_paths = use_fast_paths
        self.cache = StudyCache(parents)
        self.candidate: Candidate | None = None
        self._accounted = 0
        self._peak = 0

    def plan(self, source: ConfigSource) -> MergePlan:
        """Parse and check a config against the parents; nothing heavy runs here."""
        return plan_merge(load_config(source), self.parents)

    def build(self, source: ConfigSource | MergePlan, seed: int = 0) -> BuildReport:
        """Write the merge that `source` describes into the candidate; `seed` drives DARE/DELLA."""
        plan = source if isinstance(source, MergePlan) else self.plan(source)
        started = time.perf_counter()
        if self.candidate is None or not self.candidate.fits(plan.out_config):
            self.candidate = None  # release the old structure before allocating the new one
            self.candidate = Candidate(plan.out_config, plan, self.device)
        method = methods.get(plan.method)
        fast_path = self.use_fast_paths and method.fast
        self._place_parents(plan, fast_path)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        self._accounted = self._peak = self._resident_bytes(plan, fast_path)
        with torch.no_grad():
            for job, inputs in self._inputs(plan):
                target = self.candidate.tensors[job.name]
                scratch = 2 * sum(t.numel() * t.element_size() for t in inputs)
                self._account(scratch)  # merge temporaries: roughly twice the inputs
                if fast_path:
                    self._fast(method, job, inputs, seed, target)
                else:
                    with _seeded(seed, job.name, self.device, method.seeded):
                        target.copy_(
                            merge_tensors(
                                inputs,
                                plan.method,
                                parameters={**job.shared, **job.per_input},
                                ids=job.models,
                                base_index=job.base,
                                name=job.name,
                                dtype=job.in_dtype,
                                out_dtype=job.out_dtype,
                            )
                        )
                self._account(-scratch)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return BuildReport(
            method=plan.method,
            seconds=time.perf_counter() - started,
            fast_path=fast_path,
            streamed=self.parents.streamed,
            peak_device_bytes=self._peak,
            peak_cuda_bytes=torch.cuda.max_memory_allocated(self.device) if self.device.type == "cuda" else None,
        )

    def _fast(
        self, method: methods.Method, job: TensorJob, inputs: list[torch.Tensor], seed: int, target: torch.Tensor
    ) -> None:
        if job.in_dtype is not None:
            inputs = [tensor.to(job.in_dtype) for tensor in inputs]
        method.fast_path().merge(method, job, inputs, self.cache, seed, target)

    def _resident_bytes(self, plan: MergePlan, fast_path: bool) -> int:
        """The candidate, the fast path's device scratch, and the parents with the study cache when
        they are resident: what this build will hold on the device at most, before its transients."""
        values, scratch = methods.footprint(plan, self.parents) if fast_path else (0, 0)
        resident = self.candidate.nbytes + max(scratch, self.cache.scratch.nbytes)
        if not self.parents.streamed:
            resident += self.parents.nbytes + max(values, self.cache.values_nbytes)
        return resident

    def _place_parents(self, plan: MergePlan, fast_path: bool) -> None:
        """Decide once per study whether the parents live on the device or stream from the host."""
        if any(parent.tensors for parent in self.parents):
            return
        values, scratch = methods.footprint(plan, self.parents) if fast_path else (0, 0)
        largest = max(sum(self.parents[s.model].headers[s.tensor].nbytes for s in job.sources) for job in plan.jobs)
        # the parents and their cache, the candidate, the fast path's scratch and one tensor's
        # merge temporaries (twice its inputs, as build accounts them)
        needed = self.parents.nbytes + values + self.candidate.nbytes + scratch + 2 * largest
        resident = self.device_budget is None or needed <= self.device_budget
        self.parents.load(resident=resident)
        if not resident:
            # the current and the prefetched tensor's inputs, their merge temporaries, the scratch
            streaming_peak = self.candidate.nbytes + scratch + 4 * largest
            if streaming_peak > self.device_budget:
                raise MergeInputError(
                    f"device budget {self.device_budget} bytes is below the {streaming_peak} bytes that streaming needs"
                )

    def _inputs(self, plan: MergePlan) -> Iterator[tuple[TensorJob, list[torch.Tensor]]]:
        """Yield each job with its inputs on the device, the next job's transfer already started."""

        def start(job: TensorJob):
            transfer = self.parents.prefetch(self.parents.stored(s.model, s.tensor) for s in job.sources)
            if self.parents.streamed:
                self._account(transfer.nbytes)
            return transfer

        pending = start(plan.jobs[0]) if plan.jobs else None
        for index, job in enumerate(plan.jobs):
            current = pending
            pending = start(plan.jobs[index + 1]) if index + 1 < len(plan.jobs) else None
            yield job, current.wait()
            if self.parents.streamed:
                self._account(-current.nbytes)

    def _account(self, delta: int) -> None:
        self._accounted += delta
        self._peak = max(self._peak, self._accounted)


@contextmanager
def _seeded(seed: int, name: str, device: torch.device, active: bool) -> Iterator[None]:
    """Seed mergekit's global-RNG draws per tensor, without disturbing the caller's RNG state."""
    if not active:
        yield
        return
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(tensor_seed(seed, name))
        yield
