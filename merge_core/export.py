"""Write a candidate as the HF model folder mergekit-yaml would write for the same config."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from mergekit.card import generate_card
from mergekit.config import MergeConfiguration
from mergekit.io.tensor_writer import TensorWriter
from mergekit.merge import _copy_tokenizer
from mergekit.options import MergeOptions

from merge_core.config import load_config
from merge_core.engine import BuildReport, Engine
from merge_core.errors import MergeInputError
from merge_core.parents import Parents
from merge_core.planner import MergePlan


def merge_to_folder(config_file: str | Path, out_dir: str | Path, device: str = "cpu",
                    seed: int = 0) -> BuildReport:
    """`mergekit-yaml CONFIG OUT_DIR`, built by the engine; nothing is left behind on failure."""
    text = Path(config_file).read_text() if Path(config_file).is_file() else None
    if text is None:
        raise MergeInputError(f"config file {config_file} does not exist")
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise MergeInputError(f"output folder {out} already exists and is not empty")
    config = load_config(text)
    parents = Parents.open([str(model) for model in config.referenced_models()], device)
    engine = Engine(parents)
    plan = engine.plan(config)
    report = engine.build(plan, seed=seed)
    staging = out.parent / f".{out.name}.partial-{os.getpid()}"
    try:
        write_folder(engine, plan, config, text, staging, name=out.name)
        if out.exists():
            out.rmdir()
        staging.rename(out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return report


def write_folder(engine: Engine, plan: MergePlan, merge_config: MergeConfiguration, text: str,
                 folder: Path, name: str) -> None:
    """Safetensors shards, config.json, tokenizer and model card, laid out as mergekit does."""
    options = MergeOptions()
    writer = TensorWriter(str(folder), max_shard_size=options.out_shard_size)
    for job in plan.jobs:
        writer.save_tensor(job.name, engine.candidate.tensors[job.name].detach().to("cpu"))
    writer.finalize()
    plan.out_config.save_pretrained(folder)
    (folder / "README.md").write_text(generate_card(config=merge_config, config_yaml=text,
                                                    name=name), encoding="utf-8")
    (folder / "mergekit_config.yml").write_text(text, encoding="utf-8")
    # mergekit's own copier, so the same files come from the same donor (base_model or first model)
    _copy_tokenizer(merge_config, str(folder), options=options)

