"""Push to the hub: the folder that would be uploaded loads with plain ``from_pretrained`` and its
model card parses with huggingface_hub, eval results included. Only the network calls are
replaced (no hub is reachable here): they record what they were asked to upload."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from huggingface_hub import HfApi, ModelCard
from safetensors.torch import load_file

from cli import main

pytestmark = pytest.mark.model


@pytest.fixture
def uploads(monkeypatch) -> list[dict]:
    calls: list[dict] = []
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # what the CLI's hub check would set here
    monkeypatch.setattr(
        HfApi,
        "create_repo",
        lambda self, repo_id, **kw: (
            calls.append({"repo": repo_id, **kw}) or f"https://huggingface.co/{repo_id}"
        ),
    )
    monkeypatch.setattr(HfApi, "upload_folder", lambda self, **kw: calls.append(kw))
    return calls


def test_push_writes_a_folder_that_loads_and_a_card_with_the_measured_results(
    smollm2, data_dir, tmp_path, uploads, capsys
):
    from transformers import AutoModelForCausalLM

    folder = tmp_path / "pruned"
    argv = ["--sparsity", "all=0.5", "--nsamples", "2", "--seqlen", "64", "--eval", "wikitext2"]
    argv += ["--max-windows", "1", "--eval-seqlen", "64", "--tasks", "rte", "--limit", "4", "--no-dense"]
    argv += ["--data-dir", str(data_dir), "--save", str(folder), "--push-to-hub", "ada/smollm2-wanda-50"]
    assert main(argv) == 0
    result = json.loads(capsys.readouterr().out)
    assert uploads[0]["repo"] == "ada/smollm2-wanda-50" and uploads[0]["exist_ok"] is True
    assert uploads[1]["repo_id"] == "ada/smollm2-wanda-50" and uploads[1]["folder_path"] == str(
        folder.resolve()
    )

    files = {p.name for p in folder.iterdir()}
    assert {
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "recipe.json",
        "pruning_result.json",
        "README.md",
    } <= files
    model = AutoModelForCausalLM.from_pretrained(folder)
    q = model.model.layers[0].self_attn.q_proj.weight
    assert int((q == 0).sum(dim=1).min()) == q.shape[1] // 2  # every row half zeros, as stored
    weights = load_file(str(folder / "model.safetensors"))
    assert torch.equal(weights["model.layers.0.self_attn.q_proj.weight"] == 0, q == 0)

    card = ModelCard.load(folder / "README.md")
    assert card.data.base_model == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert {"pruned", "wanda", "unstructured"} <= set(card.data.tags)
    found = {(r.dataset_type, r.metric_type): r.metric_value for r in card.data.eval_results}
    ppl = result["perplexity"]["wikitext2"]["pruned"]["perplexity"]
    assert found[("Salesforce/wikitext", "perplexity")] == pytest.approx(ppl, abs=1e-4)
    rte = result["tasks"]["pruned"]["tasks"]["rte"]["acc"]
    assert found[("nyu-mll/glue", "acc")] == pytest.approx(rte, abs=1e-4)
    assert "| q | 50.00% | 50.00% |" in card.text
    assert json.loads((folder / "recipe.json").read_text())["method"] == "wanda"


def test_a_refused_push_is_one_line_and_the_result_is_already_printed(
    smollm2, data_dir, tmp_path, monkeypatch, capsys
):
    import httpx
    from huggingface_hub.errors import HfHubHTTPError

    def refuse(self, repo_id, **kw):  # what the hub answers a missing or wrong token
        request = httpx.Request("POST", "https://huggingface.co/api/repos/create")
        raise HfHubHTTPError("401 Client Error: Unauthorized", response=httpx.Response(401, request=request))

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(HfApi, "create_repo", refuse)
    argv = ["--sparsity", "all=0.5", "--method", "magnitude", "--eval", "none", "--no-dense"]
    argv += ["--data-dir", str(data_dir), "--push-to-hub", "ada/x"]
    assert main(argv) == 2
    out, err = capsys.readouterr()
    assert json.loads(out)["recipe"]["method"] == "magnitude"
    assert err.strip().splitlines()[-1].startswith("error: could not push to ada/x: 401 Client Error")


# ----- the app's Push button: the visitor's own login, the same Lab.push --------------------------
SENTINEL = "SENTINEL_beef"


@pytest.fixture
def app_push(tmp_path, data_dir):
    """A public engine on a tiny model in a sentinel-named folder, one session that has pruned and
    measured, and the Export tab's push handler."""
    from tiny import save_tiny_chat_model

    from prune.progress import silent
    from prune.recipe import CalibrationSpec, EvalSpec, Recipe
    from runtime.paths import set_data_dir
    from ui import export_tab
    from ui.engine import Engine
    from ui.hosting import Hosting
    from ui.sessions import Session

    set_data_dir(data_dir)
    folder = save_tiny_chat_model(tmp_path / SENTINEL / "tiny-chat")
    engine = Engine(device="cpu", hosting=Hosting.public_profile([str(folder)], "cpu"))
    engine.load(str(folder))
    session = Session()
    engine.sessions.touch(session)
    recipe = Recipe(
        model=str(folder),
        sparsity={"q": 0.5, "down": 0.5},
        calibration=CalibrationSpec(source="c4", nsamples=2, seqlen=32),
        evaluation=EvalSpec(("wikitext2",), 32, 2),
    )
    engine.run(session, recipe, silent)
    return engine, session, folder, export_tab.make_handlers(engine)[2]


def test_the_app_pushes_with_the_visitors_login_only_and_the_folder_loads(app_push, tmp_path, monkeypatch):
    import gradio as gr
    from transformers import AutoModelForCausalLM

    engine, session, source, push = app_push
    monkeypatch.setenv("HF_TOKEN", "hf_the_hosts_token")
    calls: list[dict] = []

    def create_repo(self, repo_id, **kw):
        calls.append({"call": "create_repo", "token": self.token, "repo": repo_id, **kw})
        return f"https://huggingface.co/{repo_id}"

    def upload_folder(self, *, repo_id, folder_path, **kw):  # keep what would have gone up
        calls.append({"call": "upload_folder", "token": self.token, "repo": repo_id})
        shutil.copytree(folder_path, tmp_path / "uploaded")

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)

    with pytest.raises(gr.Error, match="log in with Hugging Face first"):
        list(push("ada/tiny-pruned", True, session, None))  # public: never the host's token
    assert calls == []
    login = gr.OAuthToken(token="hf_the_visitors_token", scope="openid write-repos", expires_at=2**31)
    messages = list(push("ada/tiny-pruned", False, session, login))
    assert "Pushed run #1" in messages[-1] and "https://huggingface.co/ada/tiny-pruned" in messages[-1]
    assert [(c["call"], c["token"], c["repo"]) for c in calls] == [
        ("create_repo", "hf_the_visitors_token", "ada/tiny-pruned"),
        ("upload_folder", "hf_the_visitors_token", "ada/tiny-pruned"),
    ]
    assert calls[0]["private"] is False

    uploaded = tmp_path / "uploaded"
    for path in uploaded.rglob("*"):
        assert SENTINEL.encode() not in path.read_bytes(), path.name  # no server folder goes up
    pruned = AutoModelForCausalLM.from_pretrained(uploaded)
    dense = AutoModelForCausalLM.from_pretrained(source)
    for name in ("self_attn.q_proj", "mlp.down_proj"):
        w = pruned.get_submodule(f"model.layers.0.{name}").weight
        original = dense.get_submodule(f"model.layers.0.{name}").weight
        assert int((w == 0).sum(dim=1).min()) == int((w == 0).sum(dim=1).max()) == w.shape[1] // 2
        assert torch.equal(w[w != 0], original[w != 0])  # kept weights untouched
    k = pruned.model.layers[0].self_attn.k_proj.weight
    assert torch.equal(k, dense.model.layers[0].self_attn.k_proj.weight)  # k was not asked for

    card = ModelCard.load(uploaded / "README.md")
    assert card.data.base_model is None  # a local folder has no hub origin
    assert {"pruned", "wanda", "unstructured"} <= set(card.data.tags)
    (ppl,) = [r.metric_value for r in card.data.eval_results if r.metric_type == "perplexity"]
    assert ppl == pytest.approx(session.output["perplexity"]["wikitext2"]["pruned"]["perplexity"], abs=1e-4)
    recipe = json.loads((uploaded / "recipe.json").read_text())
    assert recipe["model"] == "tiny-chat" and recipe["sparsity"] == {"q": 0.5, "down": 0.5}
    result = json.loads((uploaded / "pruning_result.json").read_text())
    assert result["prune"]["report"]["roles"]["q"]["sparsity"] == pytest.approx(0.5)
    assert not session.folder("push").exists()  # the written folder does not stay on the server
