"""Engine semantics (gradients, filters, precedence), the reused candidate, streaming, bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from merge_configs import configs
from safetensors.torch import load_file, save_file

from merge_core import Engine, MergeInputError, Parents, methods
from merge_core.parents import Parent, TensorHeader
from search.cli import main

MODELS = ["base", "specialist-addition", "specialist-subtraction", "specialist-gsm8k"]


def deep_parents(zoo: Path, layers: int) -> Parents:
    """Headers-only parents with the pico shapes but `layers` layers: enough to plan, not to build."""
    parents = []
    for name in ("base", "specialist-gsm8k"):
        parent = Parent.open(zoo / name)
        parent.config.num_hidden_layers = layers
        layer = {n: h for n, h in parent.headers.items() if n.startswith("model.layers.0.")}
        headers = {n: h for n, h in parent.headers.items() if not n.startswith("model.layers.")}
        for index in range(layers):
            headers.update({n.replace(".0.", f".{index}.", 1): h for n, h in layer.items()})
        parents.append(Parent(parent.key, parent.config, headers))
    return Parents(parents)


def t_values(zoo: Path, t) -> dict[str, float]:
    config = {
        "merge_method": "slerp",
        "base_model": str(zoo / "base"),
        "parameters": {"t": t},
        "models": [{"model": str(zoo / "base")}, {"model": str(zoo / "specialist-gsm8k")}],
    }
    return {job.name: job.shared["t"] for job in Engine(deep_parents(zoo, 40)).plan(config).jobs}


def test_gradient_interpolates_per_layer_with_first_value_for_embeddings(pico_zoo):
    t = t_values(pico_zoo, [0, 0.5, 0.3, 0.7, 1])
    # layer i sits at 4*i/39 on the 4 segments: layer 10 at 1.026 (0.5 -> 0.3), layer 19 at 1.949
    assert t["model.layers.10.self_attn.q_proj.weight"] == pytest.approx(0.5 - 0.2 * (40 / 39 - 1))
    assert t["model.layers.19.mlp.up_proj.weight"] == pytest.approx(0.5 - 0.2 * (76 / 39 - 1))
    assert t["model.layers.39.input_layernorm.weight"] == 1.0
    assert t["model.embed_tokens.weight"] == t["model.norm.weight"] == t["lm_head.weight"] == 0


def test_filters_first_match_wins_and_layernorms_fall_through(pico_zoo):
    t = t_values(
        pico_zoo,
        [
            {"filter": "self_attn", "value": 0.1},
            {"filter": "q_proj", "value": 0.9},
            {"filter": "mlp", "value": [0.2, 0.4]},
            {"value": 0.7},
        ],
    )
    assert t["model.layers.3.self_attn.q_proj.weight"] == pytest.approx(0.1)
    assert t["model.layers.0.mlp.down_proj.weight"] == pytest.approx(0.2)
    assert t["model.layers.39.mlp.gate_proj.weight"] == pytest.approx(0.4)
    assert t["model.layers.5.post_attention_layernorm.weight"] == pytest.approx(0.7)


def test_source_beats_slice_beats_top_level_and_defaults_fill_in(pico_zoo):
    base, gsm, add = (str(pico_zoo / n) for n in ("base", "specialist-gsm8k", "specialist-addition"))
    parents = Parents.open([base, gsm, add])
    config = {
        "merge_method": "ties",
        "base_model": base,
        "parameters": {"weight": 0.25, "density": 0.9, "lambda": 2.0},
        "slices": [
            {
                "parameters": {"density": 0.5},
                "sources": [
                    {"model": base, "layer_range": [0, 2]},
                    {"model": gsm, "layer_range": [0, 2], "parameters": {"density": 0.1, "weight": 1.0}},
                    {"model": add, "layer_range": [0, 2]},
                ],
            }
        ],
    }
    job = next(j for j in Engine(parents).plan(config).jobs if j.name.startswith("model.layers.1."))
    by_model = {Path(m).name: v for m, v in job.per_input["density"].items()}
    assert by_model == {"specialist-gsm8k": 0.1, "specialist-addition": 0.5}
    assert {Path(m).name: v for m, v in job.per_input["weight"].items()} == {
        "specialist-gsm8k": 1.0,
        "specialist-addition": 0.25,
    }
    assert job.shared == {"int8_mask": False, "normalize": True, "rescale": False, "lambda": 2.0}


@pytest.fixture(scope="module")
def parents(pico_zoo):
    return Parents.open([pico_zoo / name for name in MODELS])


def test_candidate_is_reused_in_place_until_the_structure_changes(parents, pico_zoo):
    zoo = configs(pico_zoo)
    engine = Engine(parents)
    engine.build(zoo["linear"])
    model, pointers = engine.candidate.model, {k: t.data_ptr() for k, t in engine.candidate.tensors.items()}
    engine.build(zoo["slerp_gradient"])
    assert engine.candidate.model is model
    assert {k: t.data_ptr() for k, t in engine.candidate.tensors.items()} == pointers
    fresh = Engine(parents)
    fresh.build(zoo["slerp_gradient"])
    assert all(torch.equal(engine.candidate.tensors[k], v) for k, v in fresh.candidate.tensors.items())
    passthrough = {
        "merge_method": "passthrough",
        "slices": [
            {"sources": [{"model": str(pico_zoo / "base"), "layer_range": [0, 2]}]},
            {"sources": [{"model": str(pico_zoo / "specialist-gsm8k"), "layer_range": [0, 1]}]},
        ],
    }
    engine.build(passthrough)
    assert engine.candidate.model.config.num_hidden_layers == 3
    assert len(engine.candidate.model.model.layers) == 3
    gsm = load_file(pico_zoo / "specialist-gsm8k" / "model.safetensors")
    assert torch.equal(
        engine.candidate.tensors["model.layers.2.mlp.up_proj.weight"], gsm["model.layers.0.mlp.up_proj.weight"]
    )


def streaming_need(engine: Engine, config: dict) -> tuple[int, int]:
    """(what streaming `config` needs on the device, what keeping the parents resident needs)."""
    plan = engine.plan(config)
    values, scratch = methods.footprint(plan, engine.parents)
    largest = max(sum(engine.parents[s.model].headers[s.tensor].nbytes for s in job.sources) for job in plan.jobs)
    candidate = engine.candidate.nbytes
    return (candidate + scratch + 4 * largest, engine.parents.nbytes + values + candidate + scratch + 2 * largest)


@pytest.mark.parametrize("method", ["ties", "slerp_gradient", "sce"])
def test_capped_device_budget_streams_and_stays_under_it(method, pico_zoo, parents):
    config = configs(pico_zoo)[method]
    resident = Engine(parents)
    resident.build(config)
    budget, resident_need = streaming_need(resident, config)
    assert budget < resident_need  # the parents cannot stay on the device
    engine = Engine(Parents.open([pico_zoo / name for name in MODELS]), device_budget=budget)
    report = engine.build(config)
    assert report.streamed and report.peak_device_bytes <= budget
    assert all(torch.equal(engine.candidate.tensors[k], v) for k, v in resident.candidate.tensors.items())
    with pytest.raises(MergeInputError, match="device budget"):
        Engine(Parents.open([pico_zoo / n for n in MODELS]), device_budget=budget - 1).build(config)


def test_a_budget_that_only_the_fast_path_scratch_exceeds_streams(pico_zoo, parents):
    """DARE's rescale keeps |tau x mask| of a whole tensor on the device: counted before deciding."""
    config = configs(pico_zoo)["dare_ties"]
    resident = Engine(parents)
    resident.build(config, seed=5)
    _, resident_need = streaming_need(resident, config)
    scratch = methods.footprint(resident.plan(config), parents)[1]
    assert scratch > 0
    for budget, streamed in ((resident_need - 1, True), (resident_need, False)):
        engine = Engine(Parents.open([pico_zoo / name for name in MODELS]), device_budget=budget)
        report = engine.build(config, seed=5)
        assert report.streamed == streamed and report.peak_device_bytes <= budget
        assert all(torch.equal(engine.candidate.tensors[k], v) for k, v in resident.candidate.tensors.items())


# ---- bad input: exit code 2, a message that names the culprit, no output folder ----


def copy_model(zoo: Path, tmp: Path, name: str, edit_config=None, edit_tensors=None) -> Path:
    folder = tmp / name
    shutil.copytree(zoo / "specialist-gsm8k", folder)
    if edit_config:
        config = json.loads((folder / "config.json").read_text())
        edit_config(config)
        (folder / "config.json").write_text(json.dumps(config))
    if edit_tensors:
        tensors = load_file(folder / "model.safetensors")
        edit_tensors(tensors)
        save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


def with_nan(tensors):
    tensors["model.layers.1.mlp.up_proj.weight"][3, 4] = float("nan")


def narrower(tensors):
    tensors["model.layers.0.mlp.up_proj.weight"] = tensors["model.layers.0.mlp.up_proj.weight"][:-1]


def integer_norm(tensors):
    tensors["model.norm.weight"] = tensors["model.norm.weight"].to(torch.int32)


def half(tensors):
    tensors.update({name: tensor.half() for name, tensor in tensors.items()})


def llama(config):
    config.update(architectures=["LlamaForCausalLM"], model_type="llama")


def bigger_vocab(config):
    config["vocab_size"] = 321


def slerp_with(zoo: Path, other: Path | str, **changes) -> dict:
    return {
        "merge_method": "slerp",
        "base_model": str(zoo / "base"),
        "parameters": {"t": 0.5},
        "models": [{"model": str(zoo / "base")}, {"model": str(other)}],
        **changes,
    }


def first_model_sets(config: dict, **parameters) -> dict:
    config["models"][0]["parameters"].update(parameters)
    return config


BAD = {
    "unknown method": (lambda z, t: slerp_with(z, z / "general", merge_method="slurp"), "slurp"),
    "missing parent": (lambda z, t: slerp_with(z, t / "nowhere"), "nowhere"),
    "architecture": (lambda z, t: slerp_with(z, copy_model(z, t, "llama", edit_config=llama)), "Llama"),
    "shape": (
        lambda z, t: slerp_with(z, copy_model(z, t, "narrow", edit_tensors=narrower)),
        "model.layers.0.mlp.up_proj.weight",
    ),
    "vocab": (lambda z, t: slerp_with(z, copy_model(z, t, "vocab", edit_config=bigger_vocab)), "321"),
    "parameter type": (lambda z, t: slerp_with(z, z / "general", parameters={"t": "half"}), "parameter t"),
    "negative DARE density": (lambda z, t: first_model_sets(configs(z)["dare_ties"], density=-0.1), "density -0.1"),
    "della epsilon": (lambda z, t: first_model_sets(configs(z)["della"], epsilon=0.5), "epsilon 0.5"),
    "layer_range": (
        lambda z, t: {
            "merge_method": "passthrough",
            "slices": [{"sources": [{"model": str(z / "base"), "layer_range": [0, 5]}]}],
        },
        "[0, 5]",
    ),
    "a parent under two names": (
        lambda z, t: {
            "merge_method": "linear",
            "models": [{"model": m, "parameters": {"weight": 1}} for m in (str(z / "general"), f"{z / 'general'}/")],
        },
        "general/ is listed twice (also as",
    ),
    "the base under another name": (
        lambda z, t: {
            "merge_method": "task_arithmetic",
            "base_model": str(z / "base"),
            "models": [{"model": m, "parameters": {"weight": 1}} for m in (f"{z / 'base'}/.", str(z / "general"))],
        },
        "is base_model",
    ),
    "an integer tensor": (
        lambda z, t: slerp_with(z, copy_model(z, t, "int", edit_tensors=integer_norm)),
        "tensor model.norm.weight: not floating-point",
    ),
    "parents of two dtypes and no dtype": (
        lambda z, t: slerp_with(z, copy_model(z, t, "half", edit_tensors=half)),
        "in different dtypes",
    ),
    "a slice without sources": (
        lambda z, t: {"merge_method": "passthrough", "slices": [{"sources": []}]},
        "slices[0].sources: no models",
    ),
    "nan": (
        lambda z, t: slerp_with(z, copy_model(z, t, "nan", edit_tensors=with_nan)),
        "model.layers.1.mlp.up_proj.weight",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_exits_2_naming_the_culprit_and_leaves_no_folder(case, pico_zoo, tmp_path, capsys):
    make, culprit = BAD[case]
    config_file = tmp_path / "bad.yaml"
    config_file.write_text(yaml.safe_dump(make(pico_zoo, tmp_path)))
    out = tmp_path / "out"
    assert main(["merge", str(config_file), str(out), "--device", "cpu"]) == 2
    assert culprit in capsys.readouterr().err
    assert not out.exists() and not list(tmp_path.glob(".out.partial-*"))


@pytest.mark.parametrize("case", sorted(set(BAD) - {"nan", "missing parent", "unknown method"}))
def test_bad_config_is_caught_before_any_tensor_is_loaded(case, pico_zoo, tmp_path):
    config = BAD[case][0](pico_zoo, tmp_path)
    parents = Parents.open(
        {str(m["model"]) for m in config.get("models", [])}
        | {str(s["model"]) for sl in config.get("slices", []) for s in sl["sources"]}
        | {config.get("base_model", str(pico_zoo / "base"))}
    )
    with pytest.raises(MergeInputError):
        Engine(parents).plan(config)
    assert not any(parent.tensors for parent in parents)


def test_header_sizes_match_the_loaded_tensors(pico_zoo):
    parent = Parent.open(pico_zoo / "base")
    parent.load(torch.device("cpu"), pin=False)
    assert all(
        isinstance(h, TensorHeader) and tuple(parent.tensors[n].shape) == h.shape for n, h in parent.headers.items()
    )


def sharded(zoo: Path, tmp: Path, stray: dict[str, Path]) -> Path:
    """specialist-gsm8k in two shards with an index, plus stray files holding another model's weights."""
    folder = copy_model(zoo, tmp, "sharded")
    tensors = load_file(folder / "model.safetensors")
    (folder / "model.safetensors").unlink()
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for shard, part in shards.items():
        save_file({n: tensors[n] for n in part}, folder / shard, metadata={"format": "pt"})
    index = {"metadata": {}, "weight_map": {n: shard for shard, part in shards.items() for n in part}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    for name, source in stray.items():
        shutil.copy(source / "model.safetensors", folder / name)
    return folder


def test_weights_are_read_as_mergekit_finds_them_and_stray_files_are_ignored(pico_zoo, tmp_path):
    """The index's shards when there is one, else model.safetensors: a stale model.safetensors or a
    model_ema.safetensors beside them holds another model and must not be merged."""
    wanted = Parent.open(pico_zoo / "specialist-gsm8k")
    wanted.load(torch.device("cpu"), pin=False)
    stale = {"model.safetensors": pico_zoo / "base", "model_ema.safetensors": pico_zoo / "general"}
    parent = Parent.open(sharded(pico_zoo, tmp_path, stale))
    parent.load(torch.device("cpu"), pin=False)
    assert parent.tensors.keys() == wanted.tensors.keys()
    assert all(torch.equal(parent.tensors[n], wanted.tensors[n]) for n in wanted.tensors)
    ema = copy_model(pico_zoo, tmp_path, "ema")
    shutil.copy(pico_zoo / "general" / "model.safetensors", ema / "model_ema.safetensors")
    single = Parent.open(ema)
    single.load(torch.device("cpu"), pin=False)
    assert all(torch.equal(single.tensors[n], wanted.tensors[n]) for n in wanted.tensors)


def test_a_shard_missing_from_its_index_or_a_tensor_in_two_unindexed_files_is_refused(pico_zoo, tmp_path):
    folder = sharded(pico_zoo, tmp_path, {})
    (folder / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(MergeInputError, match="model-00002-of-00002.safetensors"):
        Parent.open(folder)
    twice = copy_model(pico_zoo, tmp_path, "twice")
    (twice / "model.safetensors").rename(twice / "a.safetensors")
    shutil.copy(twice / "a.safetensors", twice / "b.safetensors")
    with pytest.raises(MergeInputError, match="both a.safetensors and b.safetensors"):
        Parent.open(twice)


def test_the_working_folder_as_output_is_refused_before_any_work(pico_zoo, tmp_path, monkeypatch, capsys):
    config_file = tmp_path / "merge.yaml"
    config_file.write_text(yaml.safe_dump(slerp_with(pico_zoo, pico_zoo / "general")))
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    for out in (".", "", str(work)):
        assert main(["merge", str(config_file), out, "--device", "cpu"]) == 2
        assert "is the working folder" in capsys.readouterr().err
    assert not any(work.iterdir()) and sorted(p.name for p in tmp_path.iterdir()) == ["merge.yaml", "work"]
