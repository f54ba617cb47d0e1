"""Experiment files, search spaces and `soupsearch validate`: errors name the key; configs are mergekit's."""

import pytest
import yaml

from merge_core import Engine, Parents
from merge_core.config import load_config
from search.cli import main
from search.experiment import Experiment, load_experiment
from search.space import expand_warm_start, full_space, to_config
from tests.search_helpers import PICO_SLERP, write_experiment

TV = {
    **PICO_SLERP,
    "models": {
        "base": "zoo:pico/base",
        "add": "zoo:pico/specialist-addition",
        "sub": "zoo:pico/specialist-subtraction",
    },
    "base_model": "base",
    "warm_starts": [],
    "space": {
        "task_arithmetic": {"weight": {"low": -1, "high": 1}, "lambda": {"low": 0.5, "high": 2}},
        "dare_ties": {"density": {"low": 0.2, "high": 1.0}, "weight": 0.5},
        "linear": {},
    },
}


@pytest.mark.parametrize(
    "change, key",
    [
        ({"studdy": {}}, "studdy"),
        ({"study": {"sampler": "bayes"}}, "study.sampler"),
        ({"space": {"slerp": {"t": {"low": 1, "high": 0}}}}, "space.slerp.t"),
        ({"space": {"ties": {"density": {"low": 0.1, "high": 1.5}}}}, "space.ties"),
        ({"evaluation": {"tasks": ["tiny_gsm8k"], "fidelity": [16, 8]}}, "evaluation"),
        ({"base_model": "nobody"}, "base_model"),
        ({"study": {"name": "."}}, "study.name: String should match pattern"),
    ],
)
def test_bad_experiment_exits_2_naming_the_key(tmp_path, capsys, change, key):
    path = write_experiment(tmp_path, **change)
    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err
    assert str(path) in err and key in err


def test_a_bad_value_is_quoted_beside_its_key(tmp_path, capsys):
    path = write_experiment(tmp_path, study={"trials": "many"}, seed=1.5)
    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err
    assert "study.trials: " in err and "(got 'many')" in err
    assert "seed: " in err and "(got 1.5)" in err
    assert "\n" not in err.strip()


def test_a_name_of_dots_alone_is_refused_it_would_name_a_folder(tmp_path, capsys):
    path = write_experiment(tmp_path, {**PICO_SLERP, "name": ".."})
    assert main(["validate", str(path)]) == 2
    assert "name: String should match pattern" in capsys.readouterr().err


def test_warm_start_and_model_errors_name_them(tmp_path, capsys):
    bad_start = write_experiment(tmp_path, warm_starts=[{"slerp/t/attn": [0, 1]}])
    assert main(["validate", str(bad_start)]) == 2
    assert "warm_starts[0].slerp/t/attn/0" in capsys.readouterr().err
    out_of_range = write_experiment(tmp_path, warm_starts=[{"slerp/t/mlp": [0, 2]}])
    assert main(["validate", str(out_of_range)]) == 2
    assert "warm_starts[0].slerp/t/mlp/1" in capsys.readouterr().err
    no_model = write_experiment(tmp_path, models={"general": "zoo:pico/general", "math": "zoo:pico/nope"})
    assert main(["validate", str(no_model)]) == 2
    assert "zoo:pico/nope" in capsys.readouterr().err
    missing_dir = write_experiment(tmp_path, models={"general": "zoo:pico/general", "math": str(tmp_path / "gone")})
    assert main(["validate", str(missing_dir)]) == 2
    assert str(tmp_path / "gone") in capsys.readouterr().err


def test_validate_prints_the_space_for_every_shipped_experiment(capsys):
    for name in ("openmath", "tiny_slerp", "tiny_dare_ties"):
        assert main(["validate", f"experiments/{name}.yaml"]) == 0, name
    out = capsys.readouterr().out
    assert "slerp/t/self_attn/4" in out and "dare_ties/density/multiplication" in out


def test_openmath_warm_start_is_the_seed_gradient():
    experiment = load_experiment("experiments/openmath.yaml")
    params = expand_warm_start(experiment, experiment.warm_starts[0], "warm_starts[0]")
    config = to_config(experiment, params, {a: r for a, r in experiment.models.items()})
    assert config["parameters"]["t"] == [
        {"filter": "self_attn", "value": [0, 0.5, 0.3, 0.7, 1]},
        {"filter": "mlp", "value": [1, 0.5, 0.7, 0.3, 0]},
        {"value": [0.5] * 5},
    ]
    assert config["base_model"] == "EmbeddedLLM/Mistral-7B-Merge-14-v0.1"
    assert load_config(config).merge_method == "slerp"


def test_gradient_t_reaches_each_tensor_as_mergekit_interpolates(pico_zoo):
    experiment = Experiment.model_validate({**PICO_SLERP, "space": {"slerp": {"anchors": 3}}})
    refs = {"general": str(pico_zoo / "general"), "math": str(pico_zoo / "specialist-gsm8k")}
    params = {
        f"slerp/t/{f}/{i}": v
        for f, values in {"self_attn": [0.1, 0.5, 0.9], "mlp": [0.2, 0.6, 0.8], "rest": [0.3, 0.4, 0.7]}.items()
        for i, v in enumerate(values)
    }
    plan = Engine(Parents.open(refs.values())).plan(to_config(experiment, params, refs))
    t = {job.name: job.shared["t"] for job in plan.jobs}
    # pico has 2 layers: t = idx/(n-1) is 0 then 1, so layer 0 takes the first anchor, layer 1 the last
    assert t["model.layers.0.self_attn.q_proj.weight"] == pytest.approx(0.1)
    assert t["model.layers.1.self_attn.o_proj.weight"] == pytest.approx(0.9)
    assert t["model.layers.1.mlp.down_proj.weight"] == pytest.approx(0.8)
    assert t["model.layers.1.input_layernorm.weight"] == pytest.approx(0.7)
    assert t["model.embed_tokens.weight"] == pytest.approx(0.3)  # planned at t = 0


def test_method_choice_gives_conditional_valid_configs(pico_zoo):
    experiment = Experiment.model_validate(TV)
    space = full_space(experiment)
    assert space["method"].choices == ("linear", "task_arithmetic", "dare_ties")
    assert "dare_ties/weight/add" not in space  # fixed at 0.5, not searched
    refs = {alias: str(pico_zoo / ref.split("/")[1]) for alias, ref in TV["models"].items()}
    engine = Engine(Parents.open(refs.values()))
    negated = to_config(
        experiment,
        {
            "method": "task_arithmetic",
            "task_arithmetic/weight/add": 1.0,
            "task_arithmetic/weight/sub": -0.5,
            "task_arithmetic/lambda": 1.5,
        },
        refs,
    )
    assert negated["parameters"] == {"lambda": 1.5}
    assert [m["parameters"]["weight"] for m in negated["models"]] == [1.0, -0.5]
    dare = to_config(
        experiment, {"method": "dare_ties", "dare_ties/density/add": 0.3, "dare_ties/density/sub": 0.9}, refs
    )
    assert [m["parameters"] for m in dare["models"]] == [
        {"weight": 0.5, "density": 0.3},
        {"weight": 0.5, "density": 0.9},
    ]
    linear = to_config(
        experiment,
        {"method": "linear", "linear/weight/base": 0.2, "linear/weight/add": 0.3, "linear/weight/sub": 0.5},
        refs,
    )
    assert linear["parameters"] == {"normalize": True} and len(linear["models"]) == 3
    for config in (negated, dare, linear):
        engine.plan(yaml.safe_load(yaml.safe_dump(config)))  # round-trips through YAML and plans


def test_validate_load_plans_against_weights_and_rejects_unmergeable_parents(pico_zoo, tmp_path, capsys):
    import json

    from transformers import AutoConfig, AutoModelForCausalLM

    ok = write_experiment(tmp_path)
    assert main(["validate", str(ok), "--load"]) == 0
    assert "planned against the parents' weights" in capsys.readouterr().out
    config = AutoConfig.from_pretrained(pico_zoo / "general")
    config.intermediate_size *= 2  # same architecture, other MLP shapes: no merge is possible
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "wider")
    assert json.loads((tmp_path / "wider" / "config.json").read_text())["intermediate_size"] == config.intermediate_size
    wider = write_experiment(
        tmp_path, name="wider.yaml", models={"general": "zoo:pico/general", "math": str(tmp_path / "wider")}
    )
    assert main(["validate", str(wider)]) == 0  # shapes are only known once the weights are opened
    assert main(["validate", str(wider), "--load"]) == 2
    assert "mlp" in capsys.readouterr().err


def test_per_layer_group_density_is_a_gradient_mergekit_interpolates(pico_zoo):
    experiment = Experiment.model_validate(
        {**TV, "space": {"ties": {"density": {"low": 0.1, "high": 1.0}, "weight": 1.0, "anchors": 2}}}
    )
    assert [n for n in full_space(experiment)] == [
        "ties/density/add/0",
        "ties/density/add/1",
        "ties/density/sub/0",
        "ties/density/sub/1",
    ]
    refs = {alias: str(pico_zoo / ref.split("/")[1]) for alias, ref in TV["models"].items()}
    params = {
        "ties/density/add/0": 0.2,
        "ties/density/add/1": 0.6,
        "ties/density/sub/0": 0.3,
        "ties/density/sub/1": 0.9,
    }
    config = to_config(experiment, params, refs)
    assert config["models"][0]["parameters"] == {"weight": 1.0, "density": [0.2, 0.6]}
    plan = Engine(Parents.open(refs.values())).plan(config)
    density = {job.name: job.per_input["density"] for job in plan.jobs}
    # pico's 2 layers sit at t = 0 and t = 1: layer 0 takes the first anchor, layer 1 the last
    assert density["model.layers.0.mlp.up_proj.weight"][refs["add"]] == pytest.approx(0.2)
    assert density["model.layers.1.mlp.up_proj.weight"][refs["sub"]] == pytest.approx(0.9)
