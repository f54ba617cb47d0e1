"""The pico zoo: trained Mistral models that load, round-trip, merge and score as promised."""

import json
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from search.cli import main
from search.zoo.build import MANIFEST, ZooError, build_zoo, open_zoo, verify, zoo_dir
from search.zoo.recipe import PICO, RECIPES


def test_zoo_holds_every_model_of_the_recipe(pico_zoo):
    manifest = verify(pico_zoo)
    assert manifest["models"] == PICO.models
    assert len([m for m in PICO.models if m.startswith("ingredient")]) >= 8
    for name in PICO.models:
        config = json.loads((pico_zoo / name / "config.json").read_text())
        assert config["architectures"] == ["MistralForCausalLM"]
        assert config["num_hidden_layers"] == PICO.shape.num_hidden_layers


def test_models_differ_from_each_other(pico_zoo):
    base = load_file(pico_zoo / "base" / "model.safetensors")
    for name in PICO.models[1:]:
        other = load_file(pico_zoo / name / "model.safetensors")
        assert any(not torch.equal(base[k], other[k]) for k in base), f"{name} equals the base"


def test_every_model_round_trips_through_save_and_load(pico_zoo, tmp_path):
    prompt = "Question: What is 12 + 7?\nAnswer:"
    for name in PICO.models:
        model = AutoModelForCausalLM.from_pretrained(pico_zoo / name).eval()
        tokenizer = AutoTokenizer.from_pretrained(pico_zoo / name)
        stored = load_file(pico_zoo / name / "model.safetensors")
        state = model.state_dict()
        assert all(torch.equal(state[k], v) for k, v in stored.items())
        assert tokenizer.decode(tokenizer(prompt)["input_ids"]) == prompt
        model.save_pretrained(tmp_path / name)
        tokenizer.save_pretrained(tmp_path / name)
        again = AutoModelForCausalLM.from_pretrained(tmp_path / name).eval()
        ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            assert torch.equal(model(ids).logits, again(ids).logits)


def test_zoo_build_is_deterministic(pico_zoo, tmp_path, monkeypatch):
    monkeypatch.setenv("SOUPSEARCH_CACHE", str(tmp_path))
    rebuilt = build_zoo(PICO, progress=False)
    assert rebuilt != pico_zoo
    assert verify(rebuilt)["files"] == verify(pico_zoo)["files"]


def _copy_zoo(pico_zoo, tmp_path, monkeypatch):
    monkeypatch.setenv("SOUPSEARCH_CACHE", str(tmp_path))
    copy = zoo_dir(PICO)
    shutil.copytree(pico_zoo, copy)
    return copy


def test_truncated_weights_are_detected_and_named(pico_zoo, tmp_path, monkeypatch):
    copy = _copy_zoo(pico_zoo, tmp_path, monkeypatch)
    victim = copy / "specialist-addition" / "model.safetensors"
    victim.write_bytes(victim.read_bytes()[:1000])
    with pytest.raises(ZooError, match="specialist-addition/model.safetensors"):
        open_zoo("pico", build=False)
    assert main(["zoo", "verify", "--variant", "pico"]) == 2


def test_interrupted_build_without_manifest_is_never_used(pico_zoo, tmp_path, monkeypatch):
    copy = _copy_zoo(pico_zoo, tmp_path, monkeypatch)
    (copy / MANIFEST).unlink()
    with pytest.raises(ZooError, match="no manifest.json"):
        open_zoo("pico", build=False)


def test_mergekit_yaml_accepts_zoo_models(pico_zoo, tmp_path):
    config = tmp_path / "linear.yaml"
    config.write_text(
        "merge_method: linear\ndtype: float32\nmodels:\n"
        f"  - model: {pico_zoo / 'specialist-addition'}\n    parameters: {{weight: 0.5}}\n"
        f"  - model: {pico_zoo / 'specialist-subtraction'}\n    parameters: {{weight: 0.5}}\n"
    )
    out = tmp_path / "merged"
    mergekit_yaml = shutil.which("mergekit-yaml", path=str(__import__("pathlib").Path(sys.executable).parent))
    subprocess.run([mergekit_yaml, str(config), str(out)], check=True, capture_output=True)
    merged = AutoModelForCausalLM.from_pretrained(out).state_dict()
    a = load_file(pico_zoo / "specialist-addition" / "model.safetensors")
    b = load_file(pico_zoo / "specialist-subtraction" / "model.safetensors")
    for name in a:
        torch.testing.assert_close(merged[name], (a[name] + b[name]) / 2, rtol=0, atol=1e-6)


def test_specialist_outscores_base_on_its_task(pico_zoo):
    from evals.harness import Evaluator, load_model

    model, tokenizer = load_model(pico_zoo / "base")
    evaluator = Evaluator(model, tokenizer, ["tiny_addition"])
    base = evaluator.score("test")["tiny_addition"]
    model.load_state_dict(load_file(pico_zoo / "specialist-addition" / "model.safetensors"))
    specialist = evaluator.score("test")["tiny_addition"]
    assert len(base.per_item) == len(specialist.per_item) == 200
    assert specialist.mean > base.mean + 0.05


def test_recipes_are_hashed_into_their_folder_names():
    assert RECIPES["pico"].folder_name != RECIPES["tiny"].folder_name
    assert PICO.folder_name.startswith("pico-") and len(PICO.digest) == 12
