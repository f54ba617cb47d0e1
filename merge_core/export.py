"""Write a candidate as the HF model folder mergekit-yaml would write for the same config."""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

from mergekit.card import generate_card
from mergekit.config import MergeConfiguration
from mergekit.io.tensor_writer import TensorWriter
from mergekit.merge import _copy_tokenizer
from mergekit.options import MergeOptions

from atomic import atomic_folder, clear_leftovers
from merge_core.config import load_config
from merge_core.engine import BuildReport, Engine
from merge_core.errors import MergeInputError
from merge_core.parents import Parents, finite
from merge_core.planner import MergePlan
from user_input import parse_yaml, read_file

LOG = logging.getLogger(__name__)


def merge_to_folder(config_file: str | Path, out_dir: str | Path, device: str = "cpu", seed: int = 0) -> BuildReport:
    """`mergekit-yaml CONFIG OUT_DIR`, built by the engine; nothing is left behind on failure."""
    path, out = Path(config_file), Path(out_dir)
    text = read_file(path, "merge config file")
    config = load_config(parse_yaml(text, str(path)), path)
    check_out_dir(out)
    parents = Parents.open([str(model) for model in config.referenced_models()], device)
    engine = Engine(parents)
    plan = engine.plan(config)
    report = engine.build(plan, seed=seed)
    for job in plan.jobs:  # mergekit-yaml would write it; a model of NaNs is never what was meant
        if not finite(engine.candidate.tensors[job.name]):
            raise MergeInputError(
                f"{path}: the merge makes tensor {job.name} NaN or infinite (weights that sum to 0 under "
                "normalize divide by 0, for one)"
            )
    with atomic_folder(out) as staging:
        write_folder(engine, plan, config, text, staging, name=out.name)
    return report


def check_out_dir(out: Path) -> None:
    """Refuse, before any work, an output folder that is not empty or cannot be written."""
    if out.exists() and not out.is_dir():
        raise MergeInputError(f"output folder {out} is a file")
    if out.exists() and out.resolve() == Path.cwd().resolve():  # it is replaced whole, at the end
        raise MergeInputError(f"output folder {out} is the working folder; give a new folder's path")
    if out.exists() and any(out.iterdir()):
        raise MergeInputError(f"output folder {out} already exists and is not empty")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryDirectory(dir=out.parent).cleanup()  # what os.access cannot tell: root, read-only mounts
    except OSError as problem:
        raise MergeInputError(f"output folder {out}: cannot write there ({problem.strerror})") from None
    clear_leftovers(out)  # the staging folders of writers of ``out`` that were killed


def write_folder(
    engine: Engine, plan: MergePlan, merge_config: MergeConfiguration, text: str, folder: Path, name: str
) -> None:
    """Safetensors shards, config.json, tokenizer and model card, laid out as mergekit does."""
    options = MergeOptions()
    writer = TensorWriter(str(folder), max_shard_size=options.out_shard_size)
    for job in plan.jobs:
        writer.save_tensor(job.name, engine.candidate.tensors[job.name].detach().to("cpu"))
    writer.finalize()
    plan.out_config.save_pretrained(folder)
    (folder / "README.md").write_text(generate_card(config=merge_config, config_yaml=text, name=name), encoding="utf-8")
    (folder / "mergekit_config.yml").write_text(text, encoding="utf-8")
    # mergekit's own copier, so the same files come from the same donor (base_model or first model);
    # like mergekit-yaml, a donor without tokenizer files still gets its merge written, with a warning
    try:
        _copy_tokenizer(merge_config, str(folder), options=options)
    except Exception as problem:  # noqa: BLE001 -- mergekit-yaml catches every failure here too
        LOG.warning(
            "merge %s is written without a tokenizer: copying the donor's failed (%s: %s)",
            name,
            type(problem).__name__,
            " ".join(str(problem).split()),
        )
