"""The Gradio app: widget-to-recipe mapping on tiny models, then the running app end to end.

The end-to-end tests (marked ``model``) start ``python app.py`` on the real SmolLM2-135M and drive it
through ``gradio_client`` like a user would: each ``Client`` is its own browser session.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
import threading
import zipfile
from pathlib import Path

import pytest
import torch
from tiny import random_ids, tiny_model

from prune.recipe import Recipe, RecipeError
from prune.report import planned_counts
from prune.state import PrunedState
from runtime.pruner import Pruner
from ui.jobs import run_job
from ui.recipes import Controls, ModelShape, build_recipe, preset, readout
from ui.sessions import PackedState

ROOT = Path(__file__).resolve().parents[1]
# Small enough for a shared 2-core CPU: 4 x 128 calibration tokens, 2 windows of 128 tokens.
SMALL = dict(nsamples=4, seqlen=128, eval_windows=2, eval_seqlen=128, calibration_file=None, eval_file=None)
ROLE_PARAMS = [9953280, 3317760, 3317760, 9953280, 26542080, 26542080, 26542080]  # SmolLM2 q..down
LAST_RUN: dict[str, dict] = {}  # session -> summary of its last run, for the export tests
PROMPT = "What is the capital of France?"
DECODE = dict(max_new_tokens=20, greedy=True, temperature=0.7, top_p=0.9, seed=0, chat=True)


# ----- widgets -> recipe (tiny models, no app) -----------------------------------------------------
def shape_of(arch: str) -> ModelShape:
    lm = tiny_model(arch)
    return ModelShape(arch, lm.roles.roles, lm.roles.num_layers, lm.roles.layer_param_counts(lm.model))


def test_controls_build_a_valid_recipe_with_fractions_and_layer_range():
    shape = shape_of("llama")
    recipe = build_recipe(Controls(q=30, down=70, layer_first=1, layer_last=2, eval_windows=0), shape)
    assert recipe.sparsity["q"] == pytest.approx(0.3) and recipe.sparsity["down"] == pytest.approx(0.7)
    assert recipe.layers == (1, 3) and recipe.evaluation.max_windows is None
    assert recipe.stats_mode == "cached" and recipe.model == "llama"
    assert Recipe.from_dict(json.loads(recipe.to_json())) == recipe
    full = build_recipe(Controls(layer_first=0, layer_last=2), shape)
    assert full.layers is None


def test_absent_roles_are_left_out_and_readout_counts_match_the_pruner():
    shape = shape_of("phi")  # no gate role
    recipe = build_recipe(Controls(gate=90, q=25, k=50, v=75, o=0, up=50, down=60), shape)
    assert "gate" not in recipe.sparsity
    lm = tiny_model("phi")
    result = Pruner(lm).prune(recipe, ids=random_ids())
    plan = planned_counts(recipe, shape.layer_counts, shape.num_layers)
    attention = sum(result.report.roles[r].pruned for r in ("q", "k", "v", "o"))
    assert plan["attention"] == attention  # widths divide evenly: exact
    assert plan["pruned"] == pytest.approx(result.report.pruned, rel=0.01)  # int(in * s) per row
    assert plan["attention"] + plan["mlp"] == plan["pruned"]
    text = readout(recipe, shape, lm.num_parameters())
    assert f"{100 * plan['pruned'] / plan['linear']:.1f} %" in text


@pytest.mark.parametrize(
    "bad, message",
    [
        (dict(q=150), "between 0 and 100"),
        (dict(nsamples=0), "at least 1"),
        (dict(layer_first=2, layer_last=1), "layer range"),
        (dict(calibration="uploaded file"), "needs a file"),
        (dict(method="pruneall"), "unknown method"),
        (dict(structure="5:4"), "0 < N < M"),
    ],
)
def test_bad_values_become_recipe_errors(bad, message):
    with pytest.raises(RecipeError, match=message):
        build_recipe(Controls(**bad), shape_of("llama"))


def test_presets_and_the_equal_budget_preset():
    shape = shape_of("llama")
    assert set(preset("uniform", 40, shape).values()) == {40}
    attention_only = preset("attention", 40, shape)
    assert attention_only["q"] == 40 and attention_only["down"] == 0
    equal = preset("equal", 40, shape)
    plan = planned_counts(build_recipe(Controls(**equal), shape), shape.layer_counts, shape.num_layers)
    assert plan["attention"] == pytest.approx(plan["mlp"], rel=0.02)  # same number of pruned weights


def test_nm_readout_counts_n_of_m():
    shape = shape_of("llama")
    recipe = build_recipe(Controls(structure="2:4", q=10, k=0, v=0, o=0, gate=0, up=0, down=0), shape)
    plan = planned_counts(recipe, shape.layer_counts, shape.num_layers)
    assert plan["pruned"] == plan["attention"] == shape.num_layers * shape.layer_counts["q"] // 2


def test_packed_state_round_trip_at_one_bit_per_weight():
    masks = {(0, "q"): torch.rand(8, 13) < 0.5, (1, "down"): torch.rand(5, 64) < 0.3}
    recipe = Recipe(model="m", method="sparsegpt")
    packed = PackedState.pack(PrunedState(masks, {(0, "q"): torch.ones(8, 13)}, recipe, ("uid", 1)))
    unpacked = packed.unpack()
    assert all(torch.equal(unpacked.masks[k], masks[k]) for k in masks)
    assert unpacked.values == {} and unpacked.is_compact  # values left out: the Lab solves them again
    assert unpacked.recipe is recipe and unpacked.key == ("uid", 1)
    assert packed.pruned() == sum(int(m.sum()) for m in masks.values())
    assert packed.nbytes() == 8 * 2 + 5 * 8


def test_run_job_streams_events_and_reraises_in_the_caller():
    def work(emit):
        emit("step", 1)
        emit("step", 2)
        return "result"

    assert list(run_job(work)) == [("step", 1), ("step", 2), ("done", "result")]

    def failing(emit):
        emit("step", 1)
        raise RecipeError("bad")

    events = run_job(failing)
    assert next(events) == ("step", 1)
    with pytest.raises(RecipeError, match="bad"):
        next(events)


def test_tabs_import_only_the_shared_ui_modules():
    """Tabs never import each other: what they share lives in ui.common (engine, sessions, recipes, ...)."""
    shared = {
        "ui.common",
        "ui.engine",
        "ui.sessions",
        "ui.registry",
        "ui.recipes",
        "ui.plots",
        "ui.hosting",
        "ui.uploads",
    }
    for path in sorted((ROOT / "ui").glob("*_tab.py")):
        imported = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module == "ui":
                imported |= {f"ui.{alias.name}" for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module:
                imported.add(node.module)
            elif isinstance(node, ast.Import):
                imported |= {alias.name for alias in node.names}
        ui_modules = {m for m in imported if m.startswith("ui.")}
        assert ui_modules <= shared, f"{path.name} imports {sorted(ui_modules - shared)}"


def test_help_lists_the_flags():
    out = subprocess.run([sys.executable, "app.py", "--help"], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0
    for flag in ("--host", "--port", "--share", "--data-dir", "--model", "--device"):
        assert flag in out.stdout


# ----- the running app ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def server():
    from app_server import start

    return start()


def client_for(server, tmp_path_factory):
    from gradio_client import Client

    return Client(server.url, verbose=False, download_files=str(tmp_path_factory.mktemp("downloads")))


ALICE = dict(q=30, k=30, down=70)  # the recipe of alice's session


@pytest.fixture(scope="module")
def alice(server, tmp_path_factory):
    """One browser session that has pruned with ``ALICE`` (its summary in ``LAST_RUN``), whichever
    test asks first: the tests that generate from it or export it do not depend on their order."""
    client = client_for(server, tmp_path_factory)
    LAST_RUN["alice"] = prune(client, **ALICE)
    return client


def press_prune(client, **values) -> tuple:
    """Press 'Prune & evaluate' with small calibration and evaluation settings."""
    return client.predict(api_name="/prune", **{**SMALL, **values})


def prune(client, **values) -> dict:
    """The run's summary (the JSON output of 'Prune & evaluate')."""
    return press_prune(client, **values)[4]


def generate(client, prompt: str = PROMPT) -> tuple[str, str]:
    dense, pruned, _ = client.predict(prompt=prompt, **DECODE, api_name="/generate")
    return dense, pruned


def app_error(call) -> str:
    from gradio_client.exceptions import AppError

    with pytest.raises(AppError) as caught:
        call()
    return str(caught.value)


@pytest.mark.model
def test_prune_50_percent_wanda_then_reprune_from_cached_statistics(server, tmp_path_factory):
    client = client_for(server, tmp_path_factory)  # its own calibration seed: computed here, not found
    job = client.submit(api_name="/prune", **SMALL, seed=7)
    first = job.result(timeout=900)[4]
    tables = [out[1]["data"] for out in job.outputs() if isinstance(out[1], dict) and out[1].get("data")]
    assert any("(window 1/2)" in str(t) for t in tables)  # perplexity streamed window by window
    assert first["stats_source"] == "cached: computed" and first["calibration_passes"] == 1
    report = first["report"]
    assert report["linear_sparsity"] == pytest.approx(0.5, abs=1e-3)
    assert report["roles"]["down"]["params"] == 26542080
    ppl = first["perplexity"]["wikitext2"]
    assert 1 < ppl["dense"] < ppl["pruned"]

    outputs = press_prune(client, **ALICE, seed=7)
    second = outputs[4]
    assert second["calibration_passes"] == 0 and second["stats_source"] == "cached: memory"
    assert (
        second["lab_calibration_passes"] == first["lab_calibration_passes"]
    )  # the app's counter stood still
    roles = second["report"]["roles"]
    assert roles["q"]["sparsity"] == pytest.approx(0.3, abs=2e-3)
    assert roles["down"]["sparsity"] == pytest.approx(0.7, abs=2e-3)
    assert second["perplexity"]["wikitext2"]["dense"] == ppl["dense"]
    history = outputs[5]["data"]
    assert [row[0] for row in history] == [1, 2] and history[1][5] == "no"  # run 2: no calibration pass


@pytest.mark.model
def test_side_by_side_gives_two_different_answers(alice):
    dense, pruned = generate(alice)
    assert dense.strip() and pruned.strip()
    assert dense != pruned
    assert "Paris" in dense


@pytest.mark.model
def test_speed_of_dense_and_pruned_side_by_side_says_unstructured_stays_dense(alice):
    readout = alice.predict(api_name="/speed")
    lines = readout.splitlines()
    assert any(line.startswith("- prefill 128 tokens: dense ") and "tok/s" in line for line in lines), readout
    assert any(line.startswith("- decode 16 tokens: dense ") for line in lines), readout
    # Wanda 50% unstructured: same parameter count, and the page says why no speedup is expected
    assert "parameters: dense 134,515,008, pruned 134,515,008 (1.00x)" in readout
    assert "the pruned matrices stay dense" in readout


@pytest.mark.model
def test_exported_recipe_reproduces_the_run_through_the_cli(alice, server, tmp_path):
    files, recipe_json, _ = alice.predict(api_name="/export_recipe")
    exported = {Path(f).suffix: Path(f) for f in files}
    assert json.loads(exported[".json"].read_text()) == json.loads(recipe_json)
    assert "q: 0.3" in exported[".yaml"].read_text()
    out = subprocess.run(
        [sys.executable, "-m", "prune", "--recipe", str(exported[".json"]), "--eval", "none", "--quiet"],
        cwd=ROOT,
        env=server.env,
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    cli = json.loads(out.stdout)["prune"]
    assert cli["calibration_passes"] == 0  # the app's statistics, found on disk
    app_last = LAST_RUN["alice"]
    assert cli["report"]["pruned"] == app_last["report"]["pruned"]
    assert cli["report"]["roles"] == app_last["report"]["roles"]
    assert cli["report"]["per_layer"] == app_last["report"]["per_layer"]


@pytest.mark.model
def test_exported_model_zip_holds_the_pruned_weights(alice, tmp_path):
    from safetensors.torch import load_file

    path, _ = alice.predict(api_name="/export_model")
    with zipfile.ZipFile(path) as archive:
        files = {Path(n).name for n in archive.namelist()}
        assert {"config.json", "model.safetensors", "tokenizer.json", "recipe.json"} <= files
        name = next(n for n in archive.namelist() if n.endswith("model.safetensors"))
        archive.extract(name, tmp_path)
        summary = json.loads(
            archive.read(next(n for n in archive.namelist() if n.endswith("pruning_result.json")))
        )
    weights = load_file(str(tmp_path / name))
    q0 = weights["model.layers.0.self_attn.q_proj.weight"]
    down0 = weights["model.layers.0.mlp.down_proj.weight"]
    assert (q0 == 0).float().mean().item() == pytest.approx(0.3, abs=2e-3)
    assert (down0 == 0).float().mean().item() == pytest.approx(0.7, abs=2e-3)
    pruned = sum(int((w == 0).sum()) for k, w in weights.items() if k.endswith("proj.weight"))
    assert pruned >= summary["prune"]["report"]["pruned"]  # the masks' zeros (and any exact zeros)


@pytest.mark.model
def test_two_concurrent_sessions_keep_their_own_pruning(server, alice, tmp_path_factory):
    before = generate(alice)
    bob, carol = client_for(server, tmp_path_factory), client_for(server, tmp_path_factory)
    results: dict[str, dict] = {}

    def run(name, client, values):
        results[name] = prune(client, **values)

    threads = [
        threading.Thread(
            target=run, args=("bob", bob, dict(q=20, k=20, v=20, o=20, gate=20, up=20, down=20))
        ),
        threading.Thread(
            target=run, args=("carol", carol, dict(q=0, k=0, v=0, o=0, gate=60, up=60, down=60))
        ),
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    assert results["bob"]["report"]["linear_sparsity"] == pytest.approx(0.2, abs=2e-3)
    assert results["carol"]["report"]["roles"]["q"]["pruned"] == 0
    assert results["carol"]["report"]["roles"]["up"]["sparsity"] == pytest.approx(0.6, abs=2e-3)
    bob_ppl = results["bob"]["perplexity"]["wikitext2"]["pruned"]
    carol_ppl = results["carol"]["perplexity"]["wikitext2"]["pruned"]
    assert bob_ppl < carol_ppl
    # after both, alice's answers come from alice's masks again
    assert generate(alice) == before
    assert generate(bob)[1] != before[1]


@pytest.mark.model
def test_a_sparsegpt_session_measures_the_same_after_a_wanda_session(server, tmp_path_factory):
    """Session A keeps its SparseGPT state (masks kept, values solved again) while B prunes."""
    a, b = client_for(server, tmp_path_factory), client_for(server, tmp_path_factory)
    first = prune(a, method="sparsegpt")["perplexity"]["wikitext2"]["pruned"]
    wanda = prune(b, method="wanda")["perplexity"]["wikitext2"]["pruned"]
    assert wanda != first
    _, measured = a.predict(api_name="/measure")
    assert measured["wikitext2"] == first


@pytest.mark.model
def test_downstream_tasks_study_and_allocate(alice):
    estimate = alice.predict(["rte"], 2, True, api_name="/tasks_estimate")
    assert "Estimated time" in estimate
    table, _, status, raw = alice.predict(["rte"], 2, True, api_name="/tasks")
    assert [row[:2] for row in table["data"]] == [["rte", "acc"], ["mean", "acc"]]
    assert raw["limit"] == 2 and raw["pruned"]["tasks"]["rte"]["n"] == 2
    assert 0 <= raw["rows"][0]["pruned"] <= 1 and raw["rows"][0]["dense"] is not None

    calibration = {k: SMALL[k] for k in ("nsamples", "seqlen", "calibration_file")}
    job = alice.submit("single", "50", [], 1, 64, "wikitext2", [], 0, calibration="c4", seed=0, **calibration,
                       api_name="/study")  # fmt: skip
    final = job.result(timeout=600)
    partial = [out for out in job.outputs() if out[2] and isinstance(out[2], dict) and out[2].get("data")]
    assert len({len(out[2]["data"]) for out in partial}) >= 3  # the table filled in point by point
    points = {row[0]: row for row in final[2]["data"]}
    assert set(points) == {"q", "k", "v", "o", "gate", "up", "down"}
    assert all(row[3] > row[4] for row in points.values())  # each role at 50 % is worse than dense
    assert "0 calibration pass" in final[3] and final[4].endswith(".zip")

    *values, text = alice.predict(30, False, api_name="/allocate")
    budget = sum(v * n for v, n in zip(values, ROLE_PARAMS, strict=True)) / sum(ROLE_PARAMS)
    assert budget == pytest.approx(30, abs=0.2) and "Allocation for 30 %" in text


@pytest.mark.model
def test_errors_come_back_as_messages_and_the_app_keeps_serving(server, alice, tmp_path_factory):
    assert "prompt is empty" in app_error(lambda: generate(alice, "   "))
    assert "limit is 1024" in app_error(lambda: generate(alice, "word " * 1500))  # tokens
    assert "characters" in app_error(lambda: generate(alice, "x" * 50_000))  # refused before tokenizing
    assert "could not load model" in app_error(
        lambda: alice.predict("no-such/model", "", api_name="/load_model")
    )
    assert "greater than maximum" in app_error(lambda: prune(alice, q=150))
    assert "less than minimum" in app_error(lambda: prune(alice, nsamples=0))
    assert "not in the list of choices" in app_error(lambda: prune(alice, method="prune-everything"))
    newcomer = client_for(server, tmp_path_factory)
    assert "press 'Prune & evaluate'" in app_error(lambda: generate(newcomer))
    # still serving: the readout answers and alice's pruned model still generates
    text = alice.predict(api_name="/readout", **{k: v for k, v in SMALL.items() if "file" in k})
    assert "Will prune" in text
    dense, pruned = generate(alice)
    assert dense and pruned
    assert server.alive()
