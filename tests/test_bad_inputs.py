"""Bad input of every kind, through the command line: exit code 2, one line that names the culprit,
no traceback. The quick groups run each case as its own `python -m search.cli` process; the groups
whose cases load models run their cases through the same entry point in two interpreters
(tests/cli_batch.py), which saves importing torch, lm-eval and MLflow once per case. Every case has
its own working folder; the damaged models and files are made once per module."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from tests.cli_batch import run_batch
from tests.search_helpers import PICO_SLERP

ENV = {
    **os.environ,
    "HF_HUB_OFFLINE": "1",
    "OMP_NUM_THREADS": "1",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "SOUP_TEST_PASSWORD": "hunter2-secret",
}
ENV.pop("SOUP_TEST_UNSET", None)
PASSWORD = ENV["SOUP_TEST_PASSWORD"]
PG = f"postgresql://soup:{PASSWORD}@127.0.0.1:1/soup"


def _model(zoo: Path, root: Path, name: str, tensors=None, remove=(), add=None) -> Path:
    """A copy of the pico word-problem specialist, damaged as named."""
    folder = root / "models" / name
    shutil.copytree(zoo / "specialist-gsm8k", folder)
    if tensors:
        weights = load_file(folder / "model.safetensors")
        tensors(weights)
        save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    for pattern in remove:
        for path in folder.glob(pattern):
            path.unlink()
    for file, content in (add or {}).items():
        (folder / file).write_bytes(content)
    return folder


def _truncate(folder: Path) -> None:
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])


def _garble_header(folder: Path) -> None:
    weights = folder / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[:8] + b"{not json" + data[17:])


def _set(tensor_name: str, value: float):
    def edit(weights):
        weights[tensor_name][0, 0] = value

    return edit


def _narrow(weights):
    weights["model.layers.0.mlp.up_proj.weight"] = weights["model.layers.0.mlp.up_proj.weight"][:-1]


def _drop(weights):
    del weights["model.layers.1.self_attn.k_proj.weight"]


def _bin_only(folder: Path) -> None:
    torch.save(load_file(folder / "model.safetensors"), folder / "pytorch_model.bin")
    (folder / "model.safetensors").unlink()


@pytest.fixture(scope="module")
def fx(pico_zoo, tmp_path_factory) -> dict[str, Path]:
    """Every damaged model, file and experiment the cases name."""
    root = tmp_path_factory.mktemp("bad")
    f: dict[str, Path] = {"root": root, "zoo": pico_zoo}
    f["trunc"] = _model(pico_zoo, root, "truncated")
    _truncate(f["trunc"])
    f["garbled"] = _model(pico_zoo, root, "garbled")
    _garble_header(f["garbled"])
    f["bin"] = _model(pico_zoo, root, "bin-only")
    _bin_only(f["bin"])
    f["nan"] = _model(pico_zoo, root, "nan", tensors=_set("model.layers.1.mlp.up_proj.weight", float("nan")))
    f["inf"] = _model(pico_zoo, root, "inf", tensors=_set("model.layers.0.self_attn.v_proj.weight", float("inf")))
    f["narrow"] = _model(pico_zoo, root, "narrow", tensors=_narrow)
    f["missing"] = _model(pico_zoo, root, "missing-tensor", tensors=_drop)
    f["notok"] = _model(pico_zoo, root, "no-tokenizer", remove=["tokenizer*"])
    f["badcfg"] = _model(pico_zoo, root, "bad-config", add={"config.json": b'{"model_type": '})
    gpt2 = b'{"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "n_embd": 32, "n_layer": 2, "n_head": 2}'
    f["gpt2"] = _model(pico_zoo, root, "gpt2-config", add={"config.json": gpt2})
    f["badtok"] = _model(pico_zoo, root, "bad-tokenizer", add={"tokenizer.json": b"{garbage"})
    f["full"] = root / "full"
    f["full"].mkdir()
    (f["full"] / "keep.txt").write_text("not empty")
    f["file"] = root / "a-file"
    f["file"].write_text("a file, not a folder")

    files = root / "files"
    files.mkdir()
    (files / "binary.yaml").write_bytes(bytes(range(256)) * 4)
    (files / "latin1.yaml").write_bytes("name: caf\xe9\n".encode("latin-1"))
    (files / "garbage.parquet").write_bytes(b"PAR1" + os.urandom(300) + b"PAR1")
    (files / "wrong.jsonl").write_text('{"foo": 1, "bar": "x"}\n{"foo": 2, "bar": "y"}\n')
    (files / "one.jsonl").write_text('{"answer": "1 + 2 = 3.\\n#### 3", "question": "What is 1 + 2?"}\n')
    (files / "mlflow.db").write_bytes(b"this is no sqlite database" * 100)
    f["files"] = files

    def experiment(name: str, text: str | None = None, **changes) -> None:
        path = root / "experiments" / f"{name}.yaml"
        path.parent.mkdir(exist_ok=True)
        path.write_text(text if text is not None else yaml.safe_dump({**PICO_SLERP, **changes}, sort_keys=False))
        f[f"x:{name}"] = path

    general = "zoo:pico/general"
    experiment("ok")
    for name in ("trunc", "garbled", "bin", "nan", "narrow", "missing", "badcfg"):
        experiment(name, models={"general": general, "math": str(f[name])})
    experiment("notok", models={"general": str(f["notok"]), "math": general})
    experiment(
        "two-methods-grid",
        space={"slerp": {}, "linear": {}},
        study={"sampler": "grid"},
        models={"general": general, "math": "zoo:pico/specialist-gsm8k"},
        warm_starts=[],
    )
    experiment("unknown-task", evaluation={"tasks": ["tiny_nonsense"], "fidelity": [8]})
    experiment("unset-var", storage="${SOUP_TEST_UNSET}")
    experiment("postgres", storage="postgresql://soup:${SOUP_TEST_PASSWORD}@127.0.0.1:1/soup")
    experiment("dead-server", tracking_uri="http://127.0.0.1:1")
    experiment("no-db-folder", tracking_uri=f"sqlite:///{root}/no/such/folder/mlflow.db")
    experiment("garbage-db", tracking_uri=f"sqlite:///{files / 'mlflow.db'}")
    experiment("soup", space=None, warm_starts=[], soup={"ingredients": ["general", "math"]})
    experiment("duplicate", text=f["x:ok"].read_text() + "seed: 3\nseed: 4\n")
    experiment("python-tag", text="name: !!python/object/apply:os.system ['true']\n")
    experiment("malformed", text="name: [pico\nmodels: {\n")
    experiment("list", text="- name: pico\n")
    experiment("typo", studdy={"trials": 2})
    experiment("nan-weight", evaluation={**PICO_SLERP["evaluation"], "objective": {"tiny_gsm8k": float("nan")}})
    experiment("negative-weight", evaluation={**PICO_SLERP["evaluation"], "objective": {"tiny_gsm8k": -1}})
    experiment("batch-size-0", evaluation={**PICO_SLERP["evaluation"], "batch_size": 0})
    experiment("fidelity-beyond-split", evaluation={**PICO_SLERP["evaluation"], "fidelity": [300]})
    experiment("negative-seed", seed=-1)
    bad_option = {"task": "tiny_gsm8k", "gen_kwargs": {"temperature": "abc"}}
    experiment("generation-option", evaluation={**PICO_SLERP["evaluation"], "tasks": [bad_option]})
    experiment("quoted-study-name", study={**PICO_SLERP["study"], "name": "o'brien"})
    experiment("huge-grid", study={"sampler": "grid", "grid_points": 1000})
    text_start = {**PICO_SLERP["warm_starts"][0], "slerp/t/rest/0": "abc", "slerp/t/rest/1": 0.5}
    experiment("text-warm-start", warm_starts=[{k: v for k, v in text_start.items() if k != "slerp/t/rest"}])
    for name, content in (
        ("middle", b'{"op_code": 0, "worker_id": "w"}\n{garbage\n{"op_code": 1}\n'),
        ("garbage", b"{garbage\n"),
        ("binary", bytes(range(256))),
    ):
        journal = root / "journals" / f"{name}.log"
        journal.parent.mkdir(exist_ok=True)
        journal.write_bytes(content)
        f[f"journal:{name}"] = journal

    def merge_config(name: str, text: str | bytes) -> None:
        path = root / "merges" / f"{name}.yaml"
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(text if isinstance(text, bytes) else text.encode())
        f[f"m:{name}"] = path

    base, other = pico_zoo / "base", pico_zoo / "general"

    def slerp(second: Path | str = other, extra: str = "") -> str:
        return (
            f"merge_method: slerp\nbase_model: {base}\nparameters: {{t: 0.5}}\n"
            f"models:\n  - model: {base}\n  - model: {second}\n{extra}"
        )

    merge_config("ok", slerp())
    merge_config(
        "zero-weights",
        f"merge_method: linear\nmodels:\n  - {{model: {base}, parameters: {{weight: 0}}}}\n"
        f"  - {{model: {other}, parameters: {{weight: 0}}}}\n",
    )
    merge_config("unknown-top", slerp(extra="normalise: true\n"))
    merge_config("unknown-nested", slerp().replace(f"  - model: {other}\n", f"  - model: {other}\n    wieght: 1\n"))
    merge_config("duplicate", slerp(extra="merge_method: linear\n"))
    merge_config("python-tag", "merge_method: !!python/object/apply:os.system ['true']\n")
    merge_config("malformed", "merge_method: slerp\nmodels: [\n")
    merge_config("latin1", "merge_method: slerp # caf\xe9\n".encode("latin-1"))
    merge_config("empty", "")
    merge_config(
        "string-weight",
        f"merge_method: linear\nmodels:\n  - {{model: {base}, parameters: {{weight: abc}}}}\n"
        f"  - {{model: {other}, parameters: {{weight: 1}}}}\n",
    )
    for name in ("trunc", "garbled", "bin", "nan", "badcfg", "notok"):
        merge_config(name, slerp(f[name]))
    return f


def _cases(fx: dict[str, Path]) -> dict[str, dict[str, tuple[list[str], str]]]:
    """group -> case -> (arguments, the text the one-line message must hold)."""
    x = {key[2:]: str(path) for key, path in fx.items() if key.startswith("x:")}
    m = {key[2:]: str(path) for key, path in fx.items() if key.startswith("m:")}
    zoo, files, root = fx["zoo"], fx["files"], fx["root"]
    model = str(zoo / "base")
    eval_ = ["eval", model, "--tasks", "tiny_addition", "--limit", "2"]
    return {
        "arguments": {
            "run --trials 0": (["run", x["ok"], "--trials", "0"], "--trials"),
            "run --timeout -5": (["run", x["ok"], "--timeout", "-5"], "-5"),
            "run --timeout nan": (["run", x["ok"], "--timeout", "nan"], "nan"),
            "run --device tpu": (["run", x["ok"], "--device", "tpu"], "tpu"),
            "run --seed 2**32": (["run", x["ok"], "--seed", str(2**32)], "--seed"),
            "dashboard --port 70000": (["dashboard", "--port", "70000"], "70000"),
            "eval --limit 0": ([*eval_, "--limit", "0"], "--limit"),
            "merge --device tpu": (["merge", m["ok"], str(root / "out-tpu"), "--device", "tpu"], "tpu"),
            "zoo --variant huge": (["zoo", "build", "--variant", "huge"], "huge"),
        },
        "experiment files": {
            "missing file": (["validate", str(root / "nowhere.yaml")], "nowhere.yaml"),
            "a folder": (["validate", str(files)], f"{files}: a folder, not an experiment file"),
            "binary file": (["validate", str(files / "binary.yaml")], "binary.yaml"),
            "non-UTF-8 file": (["validate", str(files / "latin1.yaml")], "latin1.yaml"),
            "malformed YAML": (["validate", x["malformed"]], "malformed.yaml"),
            "python tag": (["validate", x["python-tag"]], "python/object"),
            "duplicate key": (["validate", x["duplicate"]], "duplicate key 'seed'"),
            "a list": (["validate", x["list"]], "list.yaml"),
            "unknown key": (["validate", x["typo"]], "studdy"),
            "NaN objective weight": (["validate", x["nan-weight"]], "objective weights must be finite"),
            "grid over two methods (validate)": (["validate", x["two-methods-grid"]], "study.sampler"),
            "grid over two methods (run)": (["run", x["two-methods-grid"]], "study.sampler"),
            "negative objective weight": (["validate", x["negative-weight"]], "evaluation.objective"),
            "batch size 0": (["validate", x["batch-size-0"]], "evaluation.batch_size"),
            "negative seed": (["validate", x["negative-seed"]], "seed"),
            "a quote in the study name": (["validate", x["quoted-study-name"]], "study.name"),
            "grid too large to list": (["validate", x["huge-grid"]], f"{x['huge-grid']}: study.grid_points"),
            "a warm start that is no number": (["validate", x["text-warm-start"]], "warm_starts[0].slerp/t/rest/0"),
            "unset variable": (["validate", x["unset-var"]], "SOUP_TEST_UNSET"),
            "worker on a soup": (["worker", x["soup"]], "soup"),
        },
        "models and tasks": {
            "unknown task (validate)": (["validate", x["unknown-task"]], "tiny_nonsense"),
            "unknown task (run)": (["run", x["unknown-task"]], "tiny_nonsense"),
            "truncated (validate --load)": (["validate", x["trunc"], "--load"], "truncated"),
            "garbled header (validate --load)": (["validate", x["garbled"], "--load"], "garbled"),
            "bin only (validate --load)": (["validate", x["bin"], "--load"], "safetensors only"),
            "shapes differ (validate --load)": (["validate", x["narrow"], "--load"], "model.layers.0.mlp.up_proj"),
            "bad config.json (validate --load)": (["validate", x["badcfg"], "--load"], "config.json"),
            "truncated (run)": (["run", x["trunc"]], "truncated"),
            "bin only (run)": (["run", x["bin"]], "safetensors only"),
            "shapes differ (run)": (["run", x["narrow"]], "model.layers.0.mlp.up_proj"),
            "tensor missing (run)": (["run", x["missing"]], "model.layers.1.self_attn.k_proj"),
            "NaN tensor (run)": (["run", x["nan"]], "model.layers.1.mlp.up_proj.weight"),
            "base without tokenizer (run)": (["run", x["notok"]], "tokenizer"),
            "fidelity beyond the split (validate --load)": (
                ["validate", x["fidelity-beyond-split"], "--load"],
                "evaluation.fidelity: the top rung is 300 items, but task 'tiny_gsm8k' has 200 search items",
            ),
            "fidelity beyond the split (run)": (["run", x["fidelity-beyond-split"]], "evaluation.fidelity"),
            "grid too large to list (run)": (["run", x["huge-grid"]], "study.grid_points"),
            "a generation option of the wrong type (run)": (
                ["run", x["generation-option"]],
                "model general (zoo:pico/general) cannot be scored on the search split",
            ),
        },
        "stores": {
            "dead tracking server": (["run", x["dead-server"]], "http://127.0.0.1:1"),
            "tracking folder missing": (["run", x["no-db-folder"]], "no/such/folder"),
            "tracking store not a database": (["run", x["garbage-db"]], "mlflow.db"),
            "postgres storage, password masked": (["run", x["postgres"]], "soup:***@127.0.0.1:1"),
            "postgres on the command line": (["status", x["ok"], "--storage", PG], "soup:***@127.0.0.1:1"),
            "journal damaged mid-file": (["run", x["ok"], "--storage", str(fx["journal:middle"])], "middle.log"),
            "journal of one garbage line": (["run", x["ok"], "--storage", str(fx["journal:garbage"])], "garbage.log"),
            "journal of binary bytes": (["status", x["ok"], "--storage", str(fx["journal:binary"])], "binary.log"),
            "status of no study": (["status", x["ok"]], "journal.log"),
            "worker with no study": (["worker", x["ok"]], "journal.log"),
            "export of no study": (["export", x["ok"], "--out", str(root / "export-none")], "journal.log"),
            "export into a full folder": (["export", x["ok"], "--out", str(fx["full"])], str(fx["full"])),
            "export under a file": (["export", x["ok"], "--out", str(fx["file"] / "out")], "a-file"),
        },
        "merge configs": {
            "config missing": (["merge", str(root / "nowhere.yml"), str(root / "o1")], "nowhere.yml"),
            "config a folder": (["merge", str(files), str(root / "o14")], f"{files}: a folder, not a merge config"),
            "empty config": (["merge", m["empty"], str(root / "o15")], f"{m['empty']}: a merge config must be"),
            "a weight that is no number": (["merge", m["string-weight"], str(root / "o16")], "(got 'abc')"),
            "malformed YAML": (["merge", m["malformed"], str(root / "o2")], "malformed.yaml"),
            "python tag": (["merge", m["python-tag"], str(root / "o3")], "python/object"),
            "non-UTF-8": (["merge", m["latin1"], str(root / "o4")], "latin1.yaml"),
            "unknown top-level key": (["merge", m["unknown-top"], str(root / "o5")], "normalise"),
            "unknown nested key": (["merge", m["unknown-nested"], str(root / "o6")], "wieght"),
            "duplicate key": (["merge", m["duplicate"], str(root / "o7")], "duplicate key 'merge_method'"),
            "output folder not empty": (["merge", m["ok"], str(fx["full"])], str(fx["full"])),
            "output under a file": (["merge", m["ok"], str(fx["file"] / "out")], "a-file"),
            "output a file": (["merge", m["ok"], str(fx["file"])], f"{fx['file']} is a file"),
            "truncated parent": (["merge", m["trunc"], str(root / "o8")], "truncated"),
            "garbled parent": (["merge", m["garbled"], str(root / "o9")], "garbled"),
            "bin-only parent": (["merge", m["bin"], str(root / "o10")], "safetensors only"),
            "bad config.json": (["merge", m["badcfg"], str(root / "o11")], "config.json"),
            "NaN parent": (["merge", m["nan"], str(root / "o12")], "model.layers.1.mlp.up_proj.weight"),
            "weights that sum to 0": (["merge", m["zero-weights"], str(root / "o13")], "NaN or infinite"),
        },
        "eval": {
            "no tasks": (["eval", model, "--tasks", ""], "--tasks"),
            "device tpu": ([*eval_, "--device", "tpu"], "tpu"),
            "gen-kwargs without =": ([*eval_, "--gen-kwargs", "garbage"], "garbage"),
            "data not TASK:SPLIT=FILE": ([*eval_, "--data", "tiny_addition"], "--data"),
            "one split's data twice": (
                [*eval_, "--data", "tiny_addition:test=a.jsonl", "--data", "tiny_addition:test=b.jsonl"],
                "tiny_addition:test is given twice (also as a.jsonl)",
            ),
            "json in a missing folder": ([*eval_, "--json", str(root / "no" / "out.json")], str(root / "no")),
            "json into a folder": ([*eval_, "--json", str(root)], "it is a folder"),
            "model folder missing": (["eval", str(root / "nowhere"), "--tasks", "tiny_addition"], "nowhere"),
            "truncated model": (["eval", str(fx["trunc"]), "--tasks", "tiny_addition"], "truncated"),
            "bin-only model": (["eval", str(fx["bin"]), "--tasks", "tiny_addition"], "safetensors only"),
            "Inf weights": (["eval", str(fx["inf"]), "--tasks", "tiny_addition"], "v_proj"),
            "a tensor missing": (["eval", str(fx["missing"]), "--tasks", "tiny_addition"], "self_attn.k_proj.weight"),
            "a tensor of another shape": (["eval", str(fx["narrow"]), "--tasks", "tiny_addition"], "mlp.up_proj"),
            "config.json of another architecture": (
                ["eval", str(fx["gpt2"]), "--tasks", "tiny_addition"],
                "is not part of GPT2LMHeadModel",
            ),
            "no tokenizer": (["eval", str(fx["notok"]), "--tasks", "tiny_addition"], "no-tokenizer"),
            "a tokenizer.json that does not parse": (
                ["eval", str(fx["badtok"]), "--tasks", "tiny_addition"],
                "bad-tokenizer: its tokenizer does not load (JSONDecodeError",
            ),
            "unknown task": (["eval", model, "--tasks", "tiny_nonsense"], "tiny_nonsense"),
            "corrupt parquet": (
                [*eval_, "--data", f"tiny_addition:test={files / 'garbage.parquet'}"],
                "garbage.parquet",
            ),
            "a JSONL of one item": (
                ["eval", model, "--tasks", "tiny_addition", "--data", f"tiny_addition:test={files / 'one.jsonl'}"],
                "1 items",
            ),
            "more few-shot examples than items": ([*eval_, "--num-fewshot", "100000"], "num_fewshot 100000"),
            "a generation option of the wrong type": ([*eval_, "--gen-kwargs", "temperature=abc"], "'abc'"),
            "JSONL of another schema": (
                [*eval_, "--data", f"tiny_addition:test={files / 'wrong.jsonl'}"],
                "wrong.jsonl",
            ),
        },
    }


# each of their cases imports torch, mergekit or lm-eval, and most open models
SLOW_GROUPS = {"eval", "models and tasks", "stores", "merge configs"}
GROUPS = ["arguments", "experiment files", "models and tasks", "stores", "merge configs", "eval"]


def _run(arguments: list[str], cwd: Path) -> dict:
    """One case as its own process: the exit code, stderr and seconds."""
    cwd.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "search.cli", *arguments],
        cwd=cwd,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=300,
        stdin=subprocess.DEVNULL,
    )
    return {"code": done.returncode, "stderr": done.stderr, "seconds": time.monotonic() - started}


@pytest.mark.parametrize("group", [pytest.param(g, marks=pytest.mark.slow) if g in SLOW_GROUPS else g for g in GROUPS])
def test_bad_input_exits_2_with_one_line_naming_the_culprit(group, fx):
    cases = _cases(fx)[group]
    names = list(cases)
    workdirs = {name: fx["root"] / "cwd" / group.replace(" ", "-") / str(i) for i, name in enumerate(names)}
    if group in SLOW_GROUPS:
        halves = [names[0::2], names[1::2]]
        with ThreadPoolExecutor(max_workers=2) as pool:
            batches = pool.map(lambda half: run_batch([(cases[n][0], workdirs[n]) for n in half], ENV), halves)
            results = {n: r for half, batch in zip(halves, batches) for n, r in zip(half, batch, strict=True)}
    else:
        with ThreadPoolExecutor(max_workers=3) as pool:
            results = dict(zip(names, pool.map(lambda name: _run(cases[name][0], workdirs[name]), names)))
    problems = []
    for name, (_, culprit) in cases.items():
        done = results[name]
        lines = done["stderr"].strip().splitlines()
        last = lines[-1] if lines else ""
        alone = len(lines) == 1 or group != "arguments"  # argparse's usage block stays behind --help
        if (
            done["code"] != 2
            or culprit not in last
            or not alone
            or "Traceback" in done["stderr"]
            or PASSWORD in done["stderr"]
        ):
            problems.append(
                f"{name}: exit {done['code']} after {done['seconds']:.0f} s; wanted {culprit!r} in the last "
                f"line; stderr ends: {done['stderr'][-600:]}"
            )
    assert not problems, "\n\n".join(problems)
    # the refused merges and exports left nothing behind
    assert not list(fx["root"].glob("o*")) and not list(fx["root"].glob(".o*"))
    assert not (fx["root"] / "export-none").exists()
    assert sorted(p.name for p in fx["full"].iterdir()) == ["keep.txt"]
    if "worker with no study" in workdirs:  # nor an MLflow store
        assert not list(workdirs["worker with no study"].iterdir())


def test_a_dead_tracking_server_is_reported_within_10_seconds():
    from search.tracking import Tracker, TrackingError

    started = time.monotonic()
    with pytest.raises(TrackingError, match=r"http://soup:\*\*\*@127\.0\.0\.1:1"):
        Tracker(f"http://soup:{PASSWORD}@127.0.0.1:1", "nothing")
    assert time.monotonic() - started < 10


def test_an_rdb_storage_opens_without_optuna_experimental_warnings(tmp_path):
    """Heartbeats and their retry callback are "experimental" in Optuna, and used on purpose."""
    import warnings

    from search.storage import open_storage

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        open_storage(f"sqlite:///{tmp_path / 'optuna.db'}")
    assert not [w for w in caught if w.category.__name__ == "ExperimentalWarning"]


def test_a_parent_without_tokenizer_merges_as_mergekit_yaml_does(fx, tmp_path):
    """mergekit-yaml writes the merge and warns when the donor has no tokenizer; so does `merge`."""
    out = tmp_path / "merged"
    done = _run(["merge", str(fx["m:notok"]), str(out), "--device", "cpu"], tmp_path / "cwd")
    assert done["code"] == 0, done["stderr"][-2000:]
    assert (out / "model.safetensors").is_file() and (out / "mergekit_config.yml").is_file()
    # the donor is base_model (the zoo's base, with a tokenizer); a tokenizer-less base gets the warning
    config = yaml.safe_load(fx["m:notok"].read_text())
    config["base_model"] = str(fx["notok"])
    bare = tmp_path / "bare.yaml"
    bare.write_text(yaml.safe_dump(config))
    done = _run(["merge", str(bare), str(tmp_path / "bare"), "--device", "cpu"], tmp_path / "cwd")
    assert done["code"] == 0, done["stderr"][-2000:]
    assert "without a tokenizer" in done["stderr"] and "Traceback" not in done["stderr"]
    assert (tmp_path / "bare" / "model.safetensors").is_file()
    assert not list((tmp_path / "bare").glob("tokenizer*"))


def test_an_internal_failure_exits_1_and_points_at_the_full_traceback(monkeypatch, tmp_path, capsys):
    import search.validate
    from search.cli import main

    def broken(*args, **kwargs):
        raise RuntimeError("a bug, not the user's doing")

    monkeypatch.setattr(search.validate, "validate", broken)
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(PICO_SLERP))
    assert main(["validate", str(path)]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and "a bug, not the user's doing" in err
    log = Path(err.split("full traceback in ")[1].split(")")[0])
    assert "Traceback" in log.read_text() and "RuntimeError" in log.read_text()
    log.unlink()


def test_a_failure_while_handling_ctrl_c_is_reported_as_the_interrupt(monkeypatch, tmp_path, capsys):
    """A cleanup write that fails because the Ctrl-C cut a store's transaction short is no bug."""
    import search.validate
    from search.cli import main

    def interrupted_then_cleanup_fails(*args, **kwargs):
        try:
            raise KeyboardInterrupt
        finally:
            raise RuntimeError("database is locked")

    monkeypatch.setattr(search.validate, "validate", interrupted_then_cleanup_fails)
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(PICO_SLERP))
    assert main(["validate", str(path)]) == 1
    assert capsys.readouterr().err == "soupsearch: interrupted\n"


def test_duplicate_keys_are_refused_but_yaml_merge_keys_still_override():
    from user_input import UserError, parse_yaml

    assert parse_yaml("base: &b {t: 1, u: 2}\nmine:\n  <<: *b\n  t: 3\n", "x") == {
        "base": {"t": 1, "u": 2},
        "mine": {"t": 3, "u": 2},
    }
    with pytest.raises(UserError, match="x: not valid YAML: found duplicate key 't' \\(line 1, column 11\\)"):
        parse_yaml("a: {t: 1, t: 2}", "x")


@pytest.mark.parametrize(
    ("variable", "value", "arguments"),
    [
        ("SOUPSEARCH_ZOO_SEED", "one", ["zoo", "verify", "--variant", "pico"]),
        ("SOUPSEARCH_HEARTBEAT_SECONDS", "0.5", ["status", "{ok}", "--storage", "sqlite:///{root}/optuna.db"]),
        ("SOUPSEARCH_CACHE", "{ok}", ["validate", "{ok}"]),
    ],
)
def test_a_bad_environment_variable_exits_2_naming_it(variable, value, arguments, fx):
    arguments = [a.format(ok=fx["x:ok"], root=fx["root"]) for a in arguments]
    value = value.format(ok=fx["x:ok"])
    done = subprocess.run(
        [sys.executable, "-m", "search.cli", *arguments],
        cwd=fx["root"],
        env={**ENV, variable: value},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert f"{variable}={value!r}" in done.stderr.strip().splitlines()[-1]
