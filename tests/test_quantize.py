"""bitsandbytes int8 / NF4 copies: pruned zeros stay exactly zero, outputs stay close, embeddings are
shared, the original is left bitwise as it was, and a streamed model is copied layer by layer.

The weights a copy computes with are read back here with bitsandbytes' own functions (int8: codes x
row scale / 127), independently of ``runtime.quantize``'s zero check, and compared with the masks.
"""

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import bitsandbytes as bnb
import pytest
import torch
from tiny import random_ids, save_tiny_chat_model, tiny_model

from evaluation.lab import Lab
from evaluation.quantized import markdown, quantization_table
from prune.recipe import CalibrationSpec, EvalSpec, Recipe, parse_sparsity
from prune.state import DENSE
from runtime.models import load
from runtime.quantize import QuantizationError, quantize_linear, quantized_copy

MODULES = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.o_proj"}
MODULES.update({"gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj"})


def computed_weight(module: torch.nn.Module) -> torch.Tensor:
    """The (out, in) weights a bitsandbytes linear multiplies with."""
    if isinstance(module, bnb.nn.Linear4bit):
        return bnb.functional.dequantize_4bit(module.weight.data, module.weight.quant_state)
    return module.weight.data.float() * module.weight.SCB[:, None] / 127


def digest(model: torch.nn.Module) -> str:
    sha = hashlib.sha1()
    for name, tensor in model.state_dict().items():
        sha.update(name.encode() + tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return sha.hexdigest()


@pytest.fixture(scope="module")
def pruned_tiny():
    lab = Lab(tiny_model("llama"))
    lab.prune(Recipe(model="llama", sparsity=parse_sparsity("all=0.5"), method="wanda"), ids=random_ids())
    return lab


@pytest.mark.parametrize("kind, bound", [("int8", 0.02), ("nf4", 0.25)])
def test_a_pruned_tiny_llama_keeps_every_zero_and_close_outputs(pruned_tiny, kind, bound):
    lab = pruned_tiny
    model = lab.loaded.model
    before = digest(model)
    copy, report = lab.quantized(kind)

    assert digest(model) == before  # the original is untouched, bitwise
    masks = lab.masks
    assert len(masks) == 3 * 7
    for (layer, role), mask in masks.items():
        weight = computed_weight(copy.model.layers[layer].get_submodule(MODULES[role]))
        assert torch.count_nonzero(weight[mask]) == 0, (layer, role)  # every pruned weight stays 0
        assert torch.count_nonzero(weight[~mask]) > 0.95 * (~mask).sum()
    for role in MODULES:  # random weights have no zeros of their own: the zeros are the masks'
        pruned = sum(int(m.sum()) for (_, r), m in masks.items() if r == role)
        assert report.roles[role].zeros == pruned and report.roles[role].moved == 0, role
    assert report.zeros == sum(int(m.sum()) for m in masks.values())

    ids = random_ids(2, 32, seed=1)
    with torch.no_grad():
        reference, out = model(ids).logits, copy(ids).logits
    assert (out - reference).norm() / reference.norm() < bound

    # shared, not copied: embeddings and head; copied: the layers, as bitsandbytes linears + norms
    assert copy.model.embed_tokens.weight is model.model.embed_tokens.weight
    assert copy.lm_head.weight is model.lm_head.weight
    layer = copy.model.layers[0]
    assert type(layer.mlp.down_proj).__module__.startswith("bitsandbytes")
    assert layer.input_layernorm.weight is not model.model.layers[0].input_layernorm.weight
    assert torch.equal(layer.input_layernorm.weight, model.model.layers[0].input_layernorm.weight)
    weights = report.full_layer_bytes // 4  # fp32
    rows = sum(m.shape[0] for m in masks.values())
    if kind == "int8":  # one byte a weight and an fp32 scale a row
        assert report.layer_bytes == weights + 4 * rows
    else:  # half a byte a weight, plus block scales and each matrix's code books
        assert weights / 2 < report.layer_bytes < weights


def test_a_quantized_copy_starts_from_the_state_passed_not_the_one_held():
    lab = Lab(tiny_model("llama"))
    sparsegpt = Recipe(model="llama", sparsity=parse_sparsity("all=0.5"), method="sparsegpt")
    alice = lab.prune(sparsegpt, ids=random_ids()).state
    alice_q = lab.loaded.model.model.layers[0].self_attn.q_proj.weight.detach().clone()  # rewritten
    bob = lab.prune(Recipe(model="llama", sparsity=parse_sparsity("all=0.25"), method="magnitude"), key="bob")

    copy, report = lab.quantized("int8", alice)
    mask = alice.masks[(0, "q")]
    weight = computed_weight(copy.model.layers[0].self_attn.q_proj)
    assert torch.count_nonzero(weight[mask]) == 0 and report.zeros >= alice.pruned()
    assert (weight - alice_q).abs().max() < 0.02 * alice_q.abs().max()  # alice's values, not bob's
    assert lab.state is bob.state  # the lab's own state came back after the copy
    assert lab.quantized("int8")[0] is not copy  # bob's copy is another one


def test_the_lab_keeps_one_dense_and_one_pruned_copy_until_the_next_prune(pruned_tiny):
    lab = pruned_tiny
    pruned, _ = lab.quantized("nf4")
    dense, dense_report = lab.quantized("nf4", DENSE)
    assert lab.quantized("nf4")[0] is pruned and lab.quantized("nf4", DENSE)[0] is dense  # cached
    assert dense_report.zeros == 0 and lab.masks  # built on the dense weights; the masks came back
    masks = lab.masks
    lab.prune(Recipe(model="llama", sparsity=parse_sparsity("all=0.5"), method="wanda"), ids=random_ids())
    assert lab.quantized("nf4")[0] is not pruned  # a new prune frees the pruned copy
    assert lab.quantized("nf4", DENSE)[0] is dense
    lab.drop_quantized()
    assert lab.quantized("nf4", DENSE)[0] is not dense
    assert torch.equal(lab.masks[(0, "q")], masks[(0, "q")])


@pytest.mark.parametrize("arch", ["gpt2", "phi3", "falcon_new", "qwen2_moe"])
def test_fused_transposed_viewed_and_expert_roles(arch):
    """GPT-2's transposed Conv1D with q, k, v in row blocks, Phi-3's fused rows, Falcon's grouped
    per-head views, Qwen2-MoE's fused experts (left in full precision, and said so)."""
    lab = Lab(tiny_model(arch))
    lab.prune(Recipe(model=arch, sparsity=parse_sparsity("all=0.5"), method="magnitude"))
    copy, report = lab.quantized("nf4")
    for role in report.roles:
        pruned = sum(int(m.sum()) for (_, r), m in lab.masks.items() if r == role)
        assert report.roles[role].zeros == pruned and report.roles[role].moved == 0, role
    assert report.kept == (("mlp.experts",) if arch == "qwen2_moe" else ())
    ids = random_ids(1, 16)
    with torch.no_grad():
        reference, out = lab.loaded.model(ids).logits, copy(ids).logits
    assert (out - reference).norm() / reference.norm() < 0.25


@pytest.fixture(scope="module")
def chat_folder(tmp_path_factory) -> str:
    """A random 2-layer Llama with SmolLM2's tokenizer: the CLI and the app load it in a second."""
    return str(save_tiny_chat_model(tmp_path_factory.mktemp("tiny-chat")))


def test_a_streamed_model_is_copied_layer_by_layer_without_its_hooks(chat_folder):
    recipe = Recipe(model=chat_folder, sparsity=parse_sparsity("all=0.5"), method="magnitude")
    plain, streamed = Lab(load(chat_folder)), Lab(load(chat_folder, streaming="cpu"))
    ids = torch.randint(0, 1000, (1, 24))
    outputs = []
    for lab in (plain, streamed):
        lab.prune(recipe)
        copy, report = lab.quantized("nf4")
        assert report.moved == 0 and report.zeros >= sum(int(m.sum()) for m in lab.masks.values())
        with torch.no_grad():
            outputs.append(copy(ids).logits)
    model = streamed.loaded.model
    copied = streamed.quantized("nf4")[0]
    assert all(p.is_meta for p in model.model.layers.parameters())  # the original streams on
    assert not any(p.is_meta for p in copied.parameters())  # the copy is real everywhere
    for module in copied.model.layers.modules():
        assert not module._forward_hooks and not module._forward_pre_hooks and "forward" not in vars(module)
    assert torch.equal(outputs[0], outputs[1])  # the same copy as from the model in memory


def test_side_by_side_generation_on_quantized_copies(chat_folder):
    from evaluation.generate import DecodingSettings, generate
    from ui.compare_tab import make_generate
    from ui.engine import Engine
    from ui.sessions import Session

    engine, session = Engine(device="cpu"), Session()
    engine.load(chat_folder)
    model = engine.lab.loaded.model
    torch.manual_seed(0)  # an untied random head: the tied random model only repeats its last token
    model.lm_head.weight = torch.nn.Parameter(torch.randn_like(model.lm_head.weight), requires_grad=False)
    recipe = Recipe(
        model=chat_folder,
        sparsity=parse_sparsity("all=0.5"),
        method="magnitude",
        evaluation=EvalSpec(datasets=()),
    )
    engine.run(session, recipe, lambda event: None)
    handler = make_generate(engine)
    *_, (dense, pruned, note) = handler("Hello there", 8, True, 0.7, 0.9, 0, True, session, "nf4")
    *_, (full_dense, full_pruned, _) = handler("Hello there", 8, True, 0.7, 0.9, 0, True, session)

    assert "nf4 copies" in note and dense != pruned
    lab, settings = engine.lab, DecodingSettings(max_new_tokens=8)
    tokenizer = lab.loaded.tokenizer
    assert dense == generate(lab.quantized("nf4", DENSE)[0], tokenizer, "Hello there", settings)
    assert pruned == generate(lab.quantized("nf4")[0], tokenizer, "Hello there", settings)
    with lab.dense() as dense_model:
        assert full_dense == generate(dense_model, tokenizer, "Hello there", settings)
    assert full_pruned == generate(model, tokenizer, "Hello there", settings)
    assert dense != full_dense  # NF4 changes this random model's greedy answer


def test_unknown_kind_missing_bitsandbytes_and_no_kernels_are_clear_errors(pruned_tiny, monkeypatch):
    lm = pruned_tiny.loaded
    with pytest.raises(QuantizationError, match="unknown quantization 'int4'; choose one of int8, nf4"):
        quantized_copy(lm, "int4")
    with pytest.raises(QuantizationError, match="unknown quantization 'fp8'"):
        pruned_tiny.quantized("fp8")
    with pytest.raises(QuantizationError, match="cannot run nf4 on meta"):
        quantized_copy(lm, "nf4", torch.device("meta"))
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # as if it were not installed
    with pytest.raises(QuantizationError, match=r"pip install bitsandbytes==0\.50\.2"):
        quantize_linear(torch.ones(4, 4), None, "int8", torch.device("cpu"))


@pytest.mark.model
def test_nf4_and_int8_copies_of_wanda_pruned_smollm2(smollm2_lab):
    lab = smollm2_lab
    calibration = CalibrationSpec(source="c4", nsamples=4, seqlen=128, seed=0)
    recipe = Recipe(sparsity=parse_sparsity("all=0.5"), stats_mode="cached", calibration=calibration)
    model = lab.loaded.model
    try:
        result = lab.prune(recipe)
        before = digest(model)
        rows = quantization_table(lab, recipe, ("int8", "nf4"), ("wikitext2",), windows=1, seqlen=256)
        assert digest(model) == before
    finally:
        lab.restore()
    table = {(r["model"], r["weights"]): r for r in rows}
    assert list(table) == [(m, w) for m in ("dense", "pruned") for w in ("full precision", "int8", "nf4")]
    pruned = result.report.to_dict()["roles"]
    for kind in ("int8", "nf4"):
        row = table[("pruned", kind)]
        for role, check in row["roles"].items():  # every pruned weight is still exactly 0
            assert check["moved"] == 0 and check["zeros"] >= pruned[role]["pruned"], (kind, role)
        assert row["zeros"] - table[("dense", kind)]["zeros"] <= result.report.pruned <= row["zeros"]

    # weight memory: every parameter as stored; pruning in dense storage saves nothing
    assert table[("dense", "full precision")]["bytes"] == table[("pruned", "full precision")]["bytes"]
    assert table[("dense", "full precision")]["bytes"] == 538_060_032  # 134.5M fp32 parameters
    assert table[("pruned", "int8")]["bytes"] == 220_177_152  # embeddings stay fp32 (113 MiB)
    assert 168_000_000 < table[("pruned", "nf4")]["bytes"] < 169_000_000

    ppl = {key: row["perplexity"]["wikitext2"] for key, row in table.items()}
    for model_state in ("dense", "pruned"):
        full = ppl[(model_state, "full precision")]
        assert abs(ppl[(model_state, "int8")] / full - 1) < 0.03, ppl
        assert full < ppl[(model_state, "nf4")] < 1.6 * full, ppl
    assert ppl[("pruned", "nf4")] > ppl[("dense", "nf4")]
    assert "| pruned | nf4 |" in markdown(rows)


def test_the_command_line_refuses_an_unknown_kind_before_loading():
    out = subprocess.run(
        [sys.executable, "-m", "prune", "--quantize", "int8,int3"], capture_output=True, text=True
    )
    assert out.returncode == 2
    assert "unknown quantization 'int3'; choose one of int8, nf4" in out.stderr
    assert "Loading" not in out.stderr


def test_the_command_line_adds_quantized_rows(chat_folder, tmp_path):
    text = tmp_path / "text.txt"  # a short file: WikiText-2 takes seconds to tokenize
    text.write_text((Path(__file__).parents[1] / "README.md").read_text()[:6000])
    args = ["--model", chat_folder, "--method", "magnitude", "--eval", str(text), "--eval-seqlen", "128"]
    out = subprocess.run(
        [sys.executable, "-m", "prune", *args, "--max-windows", "2", "--quantize", "int8,nf4"],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout)
    rows = result["quantized"]
    assert [(r["model"], r["weights"]) for r in rows] == [
        (m, w) for m in ("dense", "pruned") for w in ("full precision", "int8", "nf4")
    ]
    pruned = result["prune"]["report"]["pruned"]
    assert all(r["zeros_moved"] == 0 and r["zeros"] >= pruned for r in rows[4:])
    ppl = result["perplexity"][str(text)]  # the full-precision rows reuse the run's numbers
    assert rows[0]["perplexity"]["text.txt"] == ppl["dense"]["perplexity"]
    assert rows[3]["perplexity"]["text.txt"] == ppl["pruned"]["perplexity"]
    assert "| pruned | nf4 |" in out.stderr and "zeros kept" in out.stderr
