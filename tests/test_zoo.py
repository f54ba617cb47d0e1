"""The pico zoo: trained Mistral models that load, round-trip, merge and score as promised."""

import contextlib
import io
import json
import math
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from search.cli import main
from zoo import build
from zoo.build import MANIFEST, ZooError, build_zoo, open_zoo, read_lock, unpack_zoo, verify, zoo_dir
from zoo.recipe import PICO, RECIPES, recipe_for


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


@pytest.mark.parametrize("variant", ["pico", "tiny"])
def test_published_weights_are_the_current_recipe_and_match_the_lock(variant):
    """A recipe change must be followed by `zoo build --train` and `zoo publish`, or this fails."""
    entry = read_lock()[variant]
    assert entry["folder"] == RECIPES[variant].folder_name
    folder = build.PUBLISHED / variant
    on_disk = {str(p.relative_to(folder)): build._sha256(p) for p in folder.rglob("*") if p.is_file()}
    assert on_disk == entry["files"]
    assert {f.split("/")[0] for f in on_disk} == set(RECIPES[variant].models)


def test_the_zoo_every_test_uses_is_the_published_one(pico_zoo, capsys):
    manifest = verify(pico_zoo)
    assert manifest["files"] == read_lock()["pico"]["files"]
    assert main(["zoo", "verify", "--variant", "pico"]) == 0
    assert "equal the published zoo" in capsys.readouterr().out


def test_a_zoo_that_differs_from_the_published_one_is_named(pico_zoo, tmp_path, monkeypatch, capsys):
    """What a training run on another CPU gives: intact files with other bits."""
    copy = _copy_zoo(pico_zoo, tmp_path, monkeypatch)
    victim = copy / "general" / "model.safetensors"
    victim.write_bytes(victim.read_bytes()[:-1] + b"\x01")
    manifest = json.loads((copy / MANIFEST).read_text())
    manifest["files"]["general/model.safetensors"] = build._sha256(victim)
    (copy / MANIFEST).write_text(json.dumps(manifest))
    assert main(["zoo", "verify", "--variant", "pico"]) == 1
    assert "general/model.safetensors" in capsys.readouterr().err


def test_tampered_published_weights_are_refused_by_name(tmp_path, monkeypatch):
    published = tmp_path / "published"
    shutil.copytree(build.PUBLISHED / "pico", published / "pico")
    victim = published / "pico" / "base" / "model.safetensors"
    victim.write_bytes(victim.read_bytes()[:1000])
    monkeypatch.setattr(build, "PUBLISHED", published)
    monkeypatch.setenv("SOUPSEARCH_CACHE", str(tmp_path / "cache"))
    with pytest.raises(ZooError, match="base/model.safetensors"):
        unpack_zoo(PICO)
    assert not zoo_dir(PICO).exists() and not list((tmp_path / "cache" / "zoo").glob(".pico-*"))


def test_other_seeds_are_other_zoos_and_are_never_published(monkeypatch):
    assert recipe_for("pico").folder_name == PICO.folder_name
    monkeypatch.setenv("SOUPSEARCH_ZOO_SEED", "2")
    assert recipe_for("pico").seed == 2 and recipe_for("pico").folder_name != PICO.folder_name
    assert build.published(recipe_for("pico")) is None
    with pytest.raises(ZooError, match="only the recipe's own seed"):
        build.publish(recipe_for("pico"))


@pytest.fixture(scope="module")
def quiet_training(tmp_path_factory):
    """`soupsearch zoo build --variant pico --train --quiet` into an empty cache: its stdout, its
    stderr and the folder it trained."""
    cache = tmp_path_factory.mktemp("trained")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("SOUPSEARCH_CACHE", str(cache))
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            assert main(["zoo", "build", "--variant", "pico", "--train", "--quiet"]) == 0
        return out.getvalue(), err.getvalue(), zoo_dir(PICO)


@pytest.mark.slow
def test_training_from_the_recipe_is_deterministic_on_one_machine(quiet_training, tmp_path, monkeypatch):
    """Two trainings on this machine agree bit for bit (other CPUs may not: hence the published weights)."""
    monkeypatch.setenv("SOUPSEARCH_CACHE", str(tmp_path))
    assert verify(build_zoo(PICO, progress=False))["files"] == verify(quiet_training[2])["files"]


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
    mergekit_yaml = shutil.which("mergekit-yaml", path=os.path.dirname(sys.executable))
    subprocess.run([mergekit_yaml, str(config), str(out)], check=True, capture_output=True)
    merged = AutoModelForCausalLM.from_pretrained(out).state_dict()
    a = load_file(pico_zoo / "specialist-addition" / "model.safetensors")
    b = load_file(pico_zoo / "specialist-subtraction" / "model.safetensors")
    for name in a:
        torch.testing.assert_close(merged[name], (a[name] + b[name]) / 2, rtol=0, atol=1e-6)


def _answer_nll(model, tokenizer, items) -> list[float]:
    """Per item: negative log-likelihood per answer token of the gold answer, given lm-eval's prompt."""
    per_item = []
    for item in items:
        prompt = tokenizer(f"Question: {item['question']}\nAnswer:")["input_ids"]
        answer = tokenizer(f" {item['answer']}")["input_ids"] + [tokenizer.eos_token_id]
        ids = torch.tensor([prompt + answer])
        with torch.no_grad():
            logprobs = model(ids).logits[0, len(prompt) - 1 : -1].log_softmax(-1)
        per_item.append(-logprobs.gather(1, torch.tensor(answer)[:, None]).mean().item())
    return per_item


@pytest.mark.parametrize("task", ["tiny_addition", "tiny_gsm8k"])
def test_specialist_outscores_base_on_its_task(pico_zoo, task):
    """Pico models are trained for seconds, so exact match is near 0 for all of them (the tiny
    zoo's exact-match table is docs/zoo.md); the held-out answer likelihood still separates them."""
    from evals.splits import split_items
    from evals.tasks import load_items

    items = load_items(task)
    test = [items[i] for i in split_items(task, len(items)).test]
    tokenizer = AutoTokenizer.from_pretrained(pico_zoo / "base")
    nll = {
        name: _answer_nll(AutoModelForCausalLM.from_pretrained(pico_zoo / name).eval(), tokenizer, test)
        for name in ("base", f"specialist-{task.removeprefix('tiny_')}")
    }
    base, specialist = nll.values()
    assert sum(specialist) < 0.95 * sum(base)
    # paired: better on over 60% of the 200 items (a sign test's p < 0.002 under no difference)
    assert sum(s < b for s, b in zip(specialist, base)) > 0.6 * len(test)


@pytest.mark.parametrize("replay", [0.15, 0.5])
def test_a_fine_tune_replays_the_other_tasks_at_the_recipe_share(replay):
    from dataclasses import replace

    from zoo.train import mixture

    recipe = replace(PICO, replay=replay)
    shares = recipe.fine_tune_mixture("tiny_gsm8k")
    assert sum(shares.values()) == pytest.approx(1) and shares["tiny_gsm8k"] == pytest.approx(1 - replay)
    streams = {t: iter(lambda t=t: {"task": t}, None) for t in shares}
    drawn = [item for _, item in zip(range(20_000), mixture(streams, shares, 0, lambda item: item["task"]))]
    assert drawn.count("tiny_gsm8k") / len(drawn) == pytest.approx(1 - replay, abs=0.01)


def test_recipes_are_hashed_into_their_folder_names():
    assert RECIPES["pico"].folder_name != RECIPES["tiny"].folder_name
    assert PICO.folder_name.startswith("pico-") and len(PICO.digest) == 12


@pytest.mark.slow
def test_two_processes_on_a_cold_cache_share_one_build(tmp_path):
    code = "from zoo.build import open_zoo; print(open_zoo('pico', progress=False))"
    env = {**os.environ, "SOUPSEARCH_CACHE": str(tmp_path)}
    runs = [
        subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, text=True) for _ in range(2)
    ]
    outputs = [run.communicate(timeout=600)[0].strip() for run in runs]
    assert all(run.returncode == 0 for run in runs)
    assert outputs[0] == outputs[1] == str(tmp_path / "zoo" / PICO.folder_name)
    assert verify(tmp_path / "zoo" / PICO.folder_name)["models"] == PICO.models
    assert not list((tmp_path / "zoo").glob(".pico-*"))  # no staging folder left behind


@pytest.mark.slow
def test_answer_accuracy_is_greedy_decodings_exact_match():
    """The base's probe scores an item solved exactly when greedy generation writes its whole answer
    (on the tiny zoo: the pico models solve too few problems to tell)."""
    from evals.tasks import load_items
    from evals.tasks.synthetic import format_prompt
    from zoo.train import answer_accuracy

    folder = open_zoo("tiny", progress=False)
    model = AutoModelForCausalLM.from_pretrained(folder / "base").eval()
    tokenizer = AutoTokenizer.from_pretrained(folder / "base")
    items = load_items("tiny_addition")[:60]
    solved = []
    for item in items:
        prompt = tokenizer(format_prompt(item), return_tensors="pt")["input_ids"]
        answer = tokenizer(f"{format_prompt(item)} {item['answer']}")["input_ids"][prompt.shape[1] :]
        out = model.generate(prompt, max_new_tokens=len(answer), do_sample=False, pad_token_id=tokenizer.eos_token_id)
        solved.append(out[0, prompt.shape[1] :].tolist() == answer)
    assert 0 < sum(solved) < len(solved)  # a probe that can tell models apart
    assert answer_accuracy(model, tokenizer, items) == sum(solved) / len(solved)


def test_a_target_schedule_trains_until_the_probe_is_met_then_decays(pico_zoo):
    """Warmup-stable-decay: a constant rate until the probe reaches the target (checked every
    PROBE_EVERY steps), then ``decay`` steps of cosine decay to zero."""
    from dataclasses import replace

    from zoo.recipe import Schedule
    from zoo.train import PROBE_EVERY, train

    model = AutoModelForCausalLM.from_pretrained(pico_zoo / "base")
    tokenizer = AutoTokenizer.from_pretrained(pico_zoo / "base")
    documents = iter(lambda: "Question: What is 1 + 1?\nAnswer: 1 + 1 = 2.\n#### 2", None)
    probes, rates = [], []

    def probe(_model) -> float:
        probes.append(len(rates))
        return 0.5 * (len(probes) >= 2)  # met at the second probe

    class Recorder(torch.optim.AdamW):
        def step(self, closure=None):
            rates.append(self.param_groups[0]["lr"])
            return super().step(closure)

    schedule = Schedule(steps=1000, lr=1e-3, batch_size=2, warmup=4, target=0.4, decay=10)
    original = torch.optim.AdamW
    torch.optim.AdamW = Recorder
    try:
        train(model, documents, tokenizer, schedule, probe=probe)
    finally:
        torch.optim.AdamW = original
    assert probes == [PROBE_EVERY, 2 * PROBE_EVERY]
    assert len(rates) == 2 * PROBE_EVERY + schedule.decay
    assert rates[:4] == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3])
    assert rates[4 : 2 * PROBE_EVERY] == pytest.approx([1e-3] * (2 * PROBE_EVERY - 4))
    assert rates[2 * PROBE_EVERY :] == pytest.approx([5e-4 * (1 + math.cos(math.pi * k / 10)) for k in range(10)])
    # without a target: cosine from the warmup's end over ``steps``, no probe
    rates.clear()
    torch.optim.AdamW = Recorder
    try:
        train(model, documents, tokenizer, replace(schedule, target=None, steps=12), probe=None)
    finally:
        torch.optim.AdamW = original
    assert rates[4:] == pytest.approx([5e-4 * (1 + math.cos(math.pi * k / 8)) for k in range(8)])


def test_a_specialist_with_a_target_trains_on_its_own_probe_with_its_own_replay(tmp_path, monkeypatch):
    """``specialist_target`` and ``specialist_replay`` change that task's specialist only: it trains
    until it solves the target share of its own task's probe problems, on its own mixture; the
    other specialists and the soup ingredients keep the recipe's replay."""
    import itertools
    from dataclasses import replace

    from evals.tasks.synthetic import eval_items, training_stream
    from zoo.recipe import SPECIALIST_DECAY, TASKS, WORD_PROBLEMS, Schedule

    quick = Schedule(steps=2, lr=1e-3, batch_size=4, warmup=1)
    recipe = replace(
        PICO,
        base=quick,
        specialist=quick,
        specialist_scale=(),
        ingredients=(quick,),
        specialist_target=((WORD_PROBLEMS, 0.7),),
        specialist_replay=((WORD_PROBLEMS, 0.2),),
    )
    held_out = {item["question"] for task in TASKS for item in eval_items(task)}
    # the probe problems as zoo/build.py draws them: a stream of their own (seed 0 x 1000 + 999)
    word_problems = list(itertools.islice(training_stream(WORD_PROBLEMS, 999, held_out), recipe.probe_items))
    shares, fits = [], []
    real_mixture, real_train = build.mixture, build.train

    def recording_mixture(streams, weights, seed, render):
        shares.append(weights)
        return real_mixture(streams, weights, seed, render)

    def recording_train(model, documents, tokenizer, schedule, on_step, probe=None):
        fits.append((schedule, probe(model) if probe else None))
        return real_train(model, documents, tokenizer, replace(schedule, target=None, decay=0), on_step, probe)

    monkeypatch.setattr(build, "mixture", recording_mixture)
    monkeypatch.setattr(build, "train", recording_train)
    monkeypatch.setattr(build, "answer_accuracy", lambda model, tokenizer, items: float(items == word_problems))
    monkeypatch.setenv("SOUPSEARCH_CACHE", str(tmp_path))
    build_zoo(recipe, progress=False)
    # the tokenizer's corpus, the base, one specialist per task in TASKS' order, the ingredient
    assert len(shares) == 2 + len(TASKS) + 1 and len(fits) == 1 + len(TASKS) + 1
    assert fits[0][1] == 1 / len(TASKS)  # the base's probe: the mean over every task's problems
    for task, mixture_shares, (schedule, probed) in zip(TASKS, shares[2:], fits[1:]):
        assert mixture_shares == recipe.specialist_mixture(task) and max(mixture_shares, key=mixture_shares.get) == task
        if task == WORD_PROBLEMS:
            assert mixture_shares[task] == pytest.approx(0.8)
            assert (schedule.target, schedule.decay) == (0.7, SPECIALIST_DECAY)
            assert probed == 1.0  # its own task's probe problems
        else:
            assert mixture_shares[task] == 0.5 and schedule == quick
    assert shares[-1][WORD_PROBLEMS] == 0.5 and fits[-1] == (quick, None)  # the ingredient


def test_a_build_off_a_terminal_shows_one_plain_line_per_model(tmp_path, monkeypatch, capsys):
    """In a log or CI (stderr not a terminal) a build shows no bar: one line per model, in the
    recipe's order, with what it took; stdout stays empty."""
    from dataclasses import replace

    from search import output
    from zoo.recipe import Schedule

    quick = Schedule(steps=2, lr=1e-3, batch_size=4, warmup=1)
    recipe = replace(PICO, base=quick, specialist=quick, specialist_scale=(), ingredients=(quick, quick))
    monkeypatch.setattr(output, "_level", output.NORMAL)
    monkeypatch.setenv("SOUPSEARCH_CACHE", str(tmp_path))
    build_zoo(recipe, progress=True)
    out, err = capsys.readouterr()
    assert out == "" and "\r" not in err
    lines, n = err.splitlines(), len(recipe.models)
    assert [line.split(": ")[0] for line in lines] == [f"zoo pico {i}/{n}" for i in range(1, n + 1)]
    assert [line.split(": ")[1].split()[0] for line in lines] == recipe.models
    for name, line in zip(recipe.models, lines):
        assert re.search(r"merged \(DARE-TIES" if name == "general" else r"trained \(2 steps, \d+ s\)$", line), line


@pytest.mark.slow
def test_a_quiet_zoo_build_prints_the_folder_alone(quiet_training):
    out, err, folder = quiet_training
    assert out == f"zoo pico: {folder}\n" and err == ""
