"""Push to the hub: the folder that would be uploaded loads with plain ``from_pretrained`` and its
model card parses with huggingface_hub, eval results included. Only the network calls are
replaced (no hub is reachable here): they record what they were asked to upload."""

from __future__ import annotations

import json

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
