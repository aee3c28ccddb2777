"""The memory plan: budgets as text, model sizes from configs alone, the mode it picks for given
budgets (and its refusals, with the numbers), and how the CLI and the app show it. No weights."""

from __future__ import annotations

import json
import time
from functools import partial

import pytest
import torch
import transformers as tf
from test_cli import assert_user_error, bad_run, cli
from tiny import ARCHS, MOE_ARCHS, VOCAB, _config, random_ids, tiny_model

from prune.recipe import CalibrationSpec, EvalSpec, Recipe
from runtime.apply import DenseWeights
from runtime.memory import (
    Budget,
    ConfigUnavailable,
    DoesNotFit,
    GiB,
    MemoryPlanError,
    Workload,
    available,
    evaluation_windows,
    model_size,
    parse_max_memory,
    plan_for_source,
    plan_memory,
)
from runtime.models import CONVERTED_FILES, OFFLINE_MODELS, config_source
from runtime.stats import dense_pass

LLAMA_7B = dict(hidden_size=4096, num_hidden_layers=32, intermediate_size=11008, vocab_size=32000)
LLAMA_13B = dict(hidden_size=5120, num_hidden_layers=40, intermediate_size=13824, vocab_size=32000)
# Wanda's reference run: 128 x 2048 tokens of C4, sequential; WikiText-2 evaluated in full
BIG = Workload(
    nsamples=128, seqlen=2048, batch_size=8, eval_windows=evaluation_windows(["wikitext2"], None, 2048)
)


def llama(shape: dict, **extra) -> tf.LlamaConfig:
    heads = shape["hidden_size"] // 128
    return tf.LlamaConfig(
        **shape, num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=4096, **extra
    )


@pytest.fixture(scope="module")
def size_7b():
    return model_size(llama(LLAMA_7B), torch.bfloat16)


@pytest.fixture(scope="module")
def size_13b():
    return model_size(llama(LLAMA_13B), torch.bfloat16)


def gpu(device_gib: float, cpu_gib: float = 64, disk_gib: float = 500) -> Budget:
    return Budget("cuda:0", int(device_gib * GiB), int(cpu_gib * GiB), int(disk_gib * GiB))


# ----- budgets as text ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    "text, expected",
    [
        ("cuda:0=20GiB,cpu=64GiB", {"cuda:0": 20 * 2**30, "cpu": 64 * 2**30}),
        ("0=20GB,cpu=32GB", {"cuda:0": 20 * 10**9, "cpu": 32 * 10**9}),
        (" cuda = 1.5GiB , disk=1TB ", {"cuda:0": int(1.5 * 2**30), "disk": 10**12}),
        ("1=512MiB,cpu=100", {"cuda:1": 512 * 2**20, "cpu": 100}),
        ("cpu=10 kib,disk=3KB", {"cpu": 10 * 1024, "disk": 3000}),
        ("cpu=7B", {"cpu": 7}),
        ("", {}),
        (None, {}),
    ],
)
def test_parse_max_memory(text, expected):
    assert parse_max_memory(text) == expected


@pytest.mark.parametrize(
    "text, message",
    [
        ("cpu", "write PLACE=SIZE"),
        ("cpu=lots", "max memory size 'lots'"),
        ("cpu=-1GB", "max memory size '-1GB'"),
        ("cpu=1XB", "max memory size '1XB'"),
        ("gpu=1GB", "unknown place 'gpu'"),
        ("cuda:x=1GB", "unknown place 'cuda:x'"),
        ("cpu=1GB,cpu=2GB", "names cpu twice"),
        ("0=1GB,cuda:0=2GB", "names cuda:0 twice"),
    ],
)
def test_parse_max_memory_refuses_bad_text(text, message):
    with pytest.raises(MemoryPlanError) as err:
        parse_max_memory(text)
    assert message in str(err.value)


def test_available_caps_each_place():
    budget = available("cpu", {"cpu": 2**20, "disk": 2**21, "cuda:0": 1})
    assert budget.device == "cpu" and budget.device_free == budget.cpu_free == 2**20
    assert budget.disk_free == 2**21 and budget.capped == ("cpu", "disk")
    free = available("cpu")
    assert free.cpu_free > 2**20 and free.disk_free > 0 and free.capped == ()
    assert list(free.free()) == ["cpu", "disk"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the answer on a machine without a GPU")
def test_available_without_a_gpu_says_so():
    with pytest.raises(MemoryPlanError, match="no CUDA GPU"):
        available("cuda")


# ----- sizes from the config alone ---------------------------------------------------------------
def _bytes(params) -> int:
    return sum(p.numel() * p.element_size() for p in params)


@pytest.mark.parametrize("arch", ARCHS + ["llama_named"])
def test_model_size_is_the_real_models(arch):
    size = model_size(_config(arch), torch.float32)
    loaded = tiny_model(arch)
    model, roles = loaded.model, loaded.roles
    layers = [_bytes(layer.parameters()) for layer in roles.layers(model)]
    assert size.parameters == sum(p.numel() for p in model.parameters())
    assert size.weights_bytes == _bytes(model.parameters())
    assert (size.layers_bytes, size.layer_bytes) == (sum(layers), max(layers))
    assert size.outside_bytes == size.weights_bytes - sum(layers)
    assert size.linear_bytes == DenseWeights(model, roles).nbytes()  # the dense copy, as taken
    assert size.linear_weights == sum(roles.param_counts(model).values())
    assert (size.num_layers, size.vocab_size, size.element) == (roles.num_layers, VOCAB, 4)
    # Wanda's norms: as many fp32 columns per layer as a real calibration pass keeps
    stats = dense_pass(model, roles, random_ids(2, 8), 2, kind="norms")
    for layer in range(roles.num_layers):
        prefix = f"{roles.layers_path}.{layer}."
        columns = sum(t.numel() for name, t in stats.sq_norms.items() if name.startswith(prefix))
        assert size.norm_columns[layer] == columns


@pytest.mark.parametrize("arch", [a for a in ARCHS if a not in MOE_ARCHS])
def test_hessian_widths_are_the_shared_hessians_a_pass_keeps(arch):
    """One Hessian per group of linears reading the same input (q/k/v, gate/up), as stats._watch
    shares them; parallel attention + MLP (Phi, Falcon) share none across the two."""
    size = model_size(_config(arch), torch.float32)
    loaded = tiny_model(arch)
    stats = dense_pass(loaded.model, loaded.roles, random_ids(2, 8), 2, kind="hessian")
    for layer in range(loaded.roles.num_layers):
        prefix = f"{loaded.roles.layers_path}.{layer}."
        distinct = {id(h): h.shape[0] for name, h in stats.hessians.items() if name.startswith(prefix)}
        assert sorted(size.hessian_widths[layer]) == sorted(distinct.values())


@pytest.mark.parametrize("arch", [a for a in ARCHS if a not in MOE_ARCHS])
def test_linears_that_share_a_hessian_read_the_very_same_input(arch):
    """The one rule (prune.roles.HESSIAN_GROUP, applied by RoleMap.hessian_owners) against what a
    forward really passes, seen by hooks of this test: sharers receive the very tensor their owner
    does; a linear that receives its predecessor's very tensor shares its Hessian (what the former
    identity test found); and the collector keeps one Hessian per owner, 2/n sum x x^T of its input."""
    loaded = tiny_model(arch)
    model, roles = loaded.model, loaded.roles
    ids = random_ids(2, 8)
    seen: list[tuple[str, torch.Tensor]] = []  # (module, input) in call order

    values: dict[str, torch.Tensor] = {}  # each input as it was then: a layer may edit it in place later

    def keep(_module, inp, _out, name):
        seen.append((name, inp[0]))
        values[name] = inp[0].detach().clone()

    names = [name for layer in range(roles.num_layers) for name in roles.modules_in_layer(layer)]
    handles = [model.get_submodule(name).register_forward_hook(partial(keep, name=name)) for name in names]
    try:
        model(ids)
    finally:
        for handle in handles:
            handle.remove()
    inputs = dict(seen)
    owners = {}
    for layer in range(roles.num_layers):
        owners.update(roles.hessian_owners(layer))
    assert set(owners) == set(inputs)
    for name, owner in owners.items():
        assert inputs[name] is inputs[owner], (name, owner)
    for (before, x_before), (name, x) in zip(seen[:-1], seen[1:], strict=True):
        if x is x_before:
            assert owners[name] == owners[before], (before, name)
    stats = dense_pass(model, roles, ids, batch_size=2, kind="hessian")
    for name, owner in owners.items():
        assert stats.hessians[name] is stats.hessians[owner]
        # SparseGPT's add_batch: a 2D input (OPT flattens the batch before fc1) counts as one sample
        samples = values[owner].shape[0] if values[owner].dim() == 3 else 1
        x = values[owner].reshape(-1, values[owner].shape[-1]).double()
        expected = 2 / samples * x.T @ x
        torch.testing.assert_close(stats.hessians[owner].double(), expected, rtol=1e-4, atol=1e-5)


def test_tied_embeddings_count_once_and_dtype_sets_the_bytes():
    tied = tf.LlamaConfig(**{**_config("llama").to_dict(), "tie_word_embeddings": True})
    untied = model_size(_config("llama"), torch.float32)
    size = model_size(tied, torch.float32)
    model = tf.AutoModelForCausalLM.from_config(tied, dtype=torch.float32)
    assert size.weights_bytes == _bytes(model.parameters())
    assert untied.weights_bytes - size.weights_bytes == VOCAB * 64 * 4
    half = model_size(_config("llama"), torch.bfloat16)
    real = tf.AutoModelForCausalLM.from_config(_config("llama"), dtype=torch.bfloat16)
    assert half.weights_bytes == _bytes(real.parameters()) == untied.weights_bytes // 2
    assert half.element == 2


def test_llama_7b_and_13b_shapes_size_in_well_under_a_second(size_7b, size_13b):
    assert size_7b.parameters == pytest.approx(6.74e9, rel=1e-3)
    assert size_7b.weights_bytes == pytest.approx(6.74e9 * 2, rel=1e-3)
    assert size_13b.parameters == pytest.approx(13.016e9, rel=1e-3)
    assert (size_7b.hidden_size, size_7b.intermediate_size, size_7b.num_layers) == (4096, 11008, 32)
    assert size_7b.hessian_widths[0] == (4096, 4096, 4096, 11008)  # qkv, o, gate/up, down
    assert size_7b.outside_bytes == 2 * 32000 * 4096 * 2 + 4096 * 2  # embeddings, head, final norm
    for shape in (LLAMA_7B, LLAMA_13B):  # the modeling code is imported: only the sizing is timed
        start = time.perf_counter()
        model_size(llama(shape), torch.bfloat16)
        assert time.perf_counter() - start < 1.0


# ----- the plan ----------------------------------------------------------------------------------
def test_a_7b_model_fits_in_memory_on_a_big_gpu(size_7b):
    plan = plan_memory(size_7b, gpu(80), BIG)
    assert (plan.mode, plan.store, plan.hidden) == ("in-memory", None, None)
    rows = {row.item.split(" (")[0]: row for row in plan.rows}
    assert rows["weights"].bytes == size_7b.weights_bytes and rows["weights"].where == "cuda:0"
    copy = rows["dense copy of the pruned matrices"]
    assert copy.bytes == size_7b.linear_bytes and copy.where == "cuda:0"  # 3x its size is free there
    assert "everything fits" in plan.reason
    assert plan.totals()["cuda:0"] < 0.9 * 80 * GiB


def test_the_dense_copy_goes_to_the_cpu_without_room_for_three_times_it(size_7b):
    plan = plan_memory(size_7b, gpu(40), Workload(nsamples=8, seqlen=512, eval_windows=4, eval_seqlen=512))
    assert plan.mode == "in-memory"
    copy = next(row for row in plan.rows if row.item.startswith("dense copy"))
    assert copy.where == "cpu"


def test_13b_on_24_gib_streams_with_layers_in_cpu_memory(size_13b):
    plan = plan_memory(size_13b, gpu(24), BIG)
    assert (plan.mode, plan.store, plan.hidden) == ("streamed", "cpu", "gpu")
    assert "in memory it needs" in plan.reason and "cuda:0" in plan.reason
    where = {row.item: row.where for row in plan.rows}
    assert where["2 decoder layers at a time"] == "cuda:0"
    assert where["decoder layers, dense (the store is the dense copy)"] == "cpu"
    assert not any(row.item.startswith("dense copy") for row in plan.rows)  # the store is dense
    totals = plan.totals()
    assert totals["cuda:0"] < 0.9 * 24 * GiB and totals["cpu"] >= size_13b.layers_bytes


def test_7b_on_16_gib_with_big_calibration_streams(size_7b):
    small = Workload(nsamples=8, seqlen=512, batch_size=1, eval_windows=4, eval_seqlen=512)
    assert plan_memory(size_7b, gpu(16), small).mode == "in-memory"  # the dense copy on the CPU
    plan = plan_memory(size_7b, gpu(16), BIG)
    assert (plan.mode, plan.store, plan.hidden) == ("streamed", "cpu", "gpu")
    states = next(row for row in plan.rows if row.item.startswith("hidden states"))
    windows = max(BIG.nsamples, BIG.eval_windows)  # 128 calibration samples, 171 evaluation windows
    assert states.bytes == 2 * windows * 2048 * 4096 * 2  # a layer's inputs and outputs, every window
    # a 16 GiB budget on a bigger GPU, through --max-memory, decides the same way
    plan = plan_memory(size_7b, Budget("cuda:0", 16 * GiB, 64 * GiB, 500 * GiB, ("cuda:0",)), BIG)
    assert plan.mode == "streamed" and "(--max-memory)" in plan.text()


def test_streamed_layers_come_from_disk_when_cpu_memory_is_short(size_7b):
    plan = plan_memory(size_7b, gpu(16, cpu_gib=8), BIG)
    assert (plan.mode, plan.store, plan.hidden) == ("streamed", "disk", "gpu")
    layers = next(row for row in plan.rows if row.item.startswith("decoder layers"))
    assert (layers.where, layers.counted) == ("disk", False)
    assert "(already there)" in plan.text()


def test_hidden_states_wait_in_cpu_memory_when_the_gpu_is_small(size_7b):
    plan = plan_memory(size_7b, gpu(6), BIG)
    assert (plan.mode, plan.store, plan.hidden) == ("streamed", "cpu", "cpu")
    states = next(row for row in plan.rows if row.item.startswith("hidden states"))
    assert states.where == "cpu"


def test_a_cpu_streams_from_disk_one_layer_at_a_time():
    size = model_size(llama(LLAMA_7B), torch.float32)
    plan = plan_memory(size, Budget("cpu", 24 * GiB, 24 * GiB, 500 * GiB), BIG)
    assert (plan.mode, plan.store, plan.hidden) == ("streamed", "disk", "cpu")
    assert any(row.item == "1 decoder layer at a time" for row in plan.rows)
    assert set(plan.totals()) == {"cpu", "disk"}
    assert plan_memory(size, Budget("cpu", 128 * GiB, 128 * GiB, 500 * GiB), BIG).mode == "in-memory"


def test_a_gpu_smaller_than_one_layer_is_refused_with_the_numbers(size_7b):
    with pytest.raises(MemoryPlanError) as err:
        plan_memory(size_7b, gpu(0.3), BIG)
    message = str(err.value)
    assert "even streamed" in message and "on cuda:0" in message
    assert "more than 90% of the 0.30 GiB free" in message
    assert "2 decoder layers at a time 0.75 GiB" in message
    assert "fewer calibration samples" in message and "\n" not in message


def test_streaming_off_refuses_what_does_not_fit_with_the_numbers(size_7b):
    with pytest.raises(MemoryPlanError) as err:
        plan_memory(size_7b, gpu(16), BIG, streaming="off")
    message = str(err.value)
    assert "(streaming off)" in message and "needs 18.1 GiB on cuda:0" in message
    assert "weights 12.6 GiB" in message and "16.0 GiB free" in message
    assert "streaming (--streaming auto)" in message
    assert plan_memory(size_7b, gpu(80), BIG, streaming="off").mode == "in-memory"


def test_streaming_on_streams_what_would_fit(size_7b):
    plan = plan_memory(size_7b, gpu(80), BIG, streaming="on")
    assert plan.mode == "streamed" and plan.reason == "streaming asked for"
    with pytest.raises(MemoryPlanError, match="even streamed"):
        plan_memory(size_7b, gpu(1), BIG, streaming="on")
    with pytest.raises(MemoryPlanError, match="streaming 'sometimes'"):
        plan_memory(size_7b, gpu(80), BIG, streaming="sometimes")


def test_sparsegpt_hessians_cached_for_every_layer_or_one_at_a_time(size_7b):
    one = 2 * 4 * (3 * 4096**2 + 11008**2)  # a layer's Hessians and their inverse factors
    sequential = Workload(nsamples=128, seqlen=2048, statistics="hessian")
    cached = Workload(nsamples=128, seqlen=2048, statistics="hessian", stats_mode="cached")

    def hessians(plan):
        return {row.item: row.bytes for row in plan.rows if "Hessians" in row.item}

    plan = plan_memory(size_7b, gpu(80), sequential)
    assert plan.mode == "in-memory"
    assert list(hessians(plan).values()) == [one + 4 * 11008**2]  # + one accumulation's temporary
    assert any(row.item == "weights SparseGPT rewrote" for row in plan.rows)
    plan = plan_memory(size_7b, gpu(80), cached)  # 41 GiB of Hessians: streamed, kept on the CPU
    assert plan.mode == "streamed"
    kept = {row.where: row.bytes for row in plan.rows if "every layer" in row.item}
    assert kept == {"cpu": 32 * one + 4 * 11008**2}


def test_masks_cost_a_bit_per_weight_per_session(size_7b):
    plan = plan_memory(size_7b, gpu(80), Workload(sessions=5))
    masks = next(row for row in plan.rows if row.item.startswith("masks"))
    assert masks.bytes == 5 * -(-size_7b.linear_weights // 8) and masks.where == "cpu"
    assert "(5 sessions)" in masks.item


def test_a_checkpoint_to_download_must_fit_on_disk(size_7b):
    plan = plan_memory(size_7b, gpu(80), BIG, download_bytes=size_7b.weights_bytes)
    assert plan.totals()["disk"] == size_7b.weights_bytes
    with pytest.raises(MemoryPlanError, match="on disk"):
        plan_memory(size_7b, gpu(80, disk_gib=5), BIG, download_bytes=size_7b.weights_bytes)


def test_no_statistics_no_evaluation_no_activations(size_7b):
    plan = plan_memory(size_7b, gpu(80), Workload(nsamples=0, statistics="none"))
    assert [row.item.split(" (")[0].split(",")[0] for row in plan.rows] == [
        "weights",
        "dense copy of the pruned matrices",
        "masks",
    ]


def test_calibration_and_evaluation_windows_are_cut_to_the_context():
    size = model_size(_config("llama"), torch.float32)  # 256 positions
    long = plan_memory(
        size, Budget("cpu", GiB, GiB, GiB), Workload(seqlen=4096, eval_windows=1, eval_seqlen=4096)
    )
    short = plan_memory(
        size, Budget("cpu", GiB, GiB, GiB), Workload(seqlen=256, eval_windows=1, eval_seqlen=256)
    )
    assert long.rows == short.rows


def test_workload_of_a_recipe():
    recipe = Recipe(
        method="sparsegpt",
        stats_mode="cached",
        calibration=CalibrationSpec(nsamples=32, seqlen=512),
        evaluation=EvalSpec(("wikitext2", "c4"), 1024, None),
    )
    work = Workload.for_recipe(recipe, batch_size=4, sessions=2)
    assert (work.nsamples, work.seqlen, work.batch_size, work.sessions) == (32, 512, 4, 2)
    assert (work.statistics, work.stats_mode, work.eval_seqlen) == ("hessian", "cached", 1024)
    assert work.eval_windows == 342  # WikiText-2's ~350k tokens in windows of 1024 (C4: 256)
    magnitude = Workload.for_recipe(Recipe(method="magnitude", evaluation=EvalSpec((), 2048, 8)), 1)
    assert (magnitude.nsamples, magnitude.statistics, magnitude.eval_windows) == (0, "none", 0)
    assert evaluation_windows(["c4"], None, 2048) == 256 and evaluation_windows(["c4"], 8, 2048) == 8
    with pytest.raises(MemoryPlanError, match="workload statistics"):
        Workload(statistics="gradients")


def test_the_plan_reads_as_a_table_and_as_json(size_13b):
    plan = plan_memory(size_13b, gpu(24), BIG)
    lines = plan.text().splitlines()
    assert lines[0].startswith("memory plan: streamed: 2 decoder layers at a time on cuda:0")
    assert lines[1].startswith("  why: in memory it needs")
    assert lines[-1].startswith("  total: cuda:0") and "GiB free" in lines[-1]
    assert len(lines) == len(plan.rows) + 3
    data = json.loads(json.dumps(plan.to_dict()))
    assert (data["mode"], data["store"], data["hidden"], data["device"]) == (
        "streamed",
        "cpu",
        "gpu",
        "cuda:0",
    )
    assert (
        sum(r["bytes"] for r in data["rows"] if r["counted"] and r["where"] == "cuda:0")
        == data["totals"]["cuda:0"]
    )


# ----- from a model's name -----------------------------------------------------------------------
def test_plan_for_a_folder_or_a_config(tmp_path):
    _config("llama").save_pretrained(tmp_path)  # the config alone: no weights
    work = Workload(nsamples=4, seqlen=32, batch_size=1, eval_windows=2, eval_seqlen=64)
    plan = plan_for_source(str(tmp_path), torch.float32, "cpu", work, "cpu=1GiB,disk=1GiB")
    assert plan.mode == "in-memory" and plan.budget.capped == ("cpu", "disk")
    assert plan.budget.cpu_free <= GiB and not any("download" in row.item for row in plan.rows)
    same = plan_for_source(_config("llama"), torch.float32, torch.device("cpu"), work, {"cpu": GiB})
    assert same.rows == plan.rows
    with pytest.raises(MemoryPlanError, match="under --max-memory"):
        plan_for_source(str(tmp_path), torch.float32, "cpu", work, "cpu=1KiB")
    with pytest.raises(ConfigUnavailable):
        plan_for_source(str(tmp_path / "missing"), torch.float32, "cpu", work)


def test_config_source_of_offline_aliases(tmp_path, monkeypatch):
    monkeypatch.setenv("PRUNING_LAB_CACHE", str(tmp_path))
    alias = next(iter(OFFLINE_MODELS))
    folder = tmp_path / "models" / alias
    assert config_source(alias) is None  # not converted yet: no config to read
    _config("llama").save_pretrained(folder)
    assert config_source(alias) is None  # a conversion that did not finish: not a source either
    for name in CONVERTED_FILES:
        (folder / name).touch(exist_ok=True)
    assert config_source(alias) == str(folder)
    assert config_source("org/name") == "org/name"


# ----- front ends --------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "args, message",
    [
        (["--max-memory", "cpu=lots"], "max memory size 'lots'"),
        (["--streaming", "sideways"], "invalid choice: 'sideways'"),
        (["info", "--max-memory", "gpu=1GB"], "unknown place 'gpu'"),
    ],
)
def test_cli_refuses_bad_memory_flags(args, message, tmp_path):
    assert_user_error(bad_run(args, tmp_path), message)


def test_cli_prints_the_plan_before_loading_and_refuses_what_cannot_fit(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # the missing tokenizer fails at once, no hub retries
    folder = tmp_path / "config-only"
    _config("llama").save_pretrained(folder)  # no weights, no tokenizer: loading would fail
    quick = ["--model", str(folder), "--device", "cpu", "--nsamples", "4", "--seqlen", "32", "--eval", "none"]
    refused = cli(*quick, "--max-memory", "cpu=1KiB", "--quiet", check=False)
    assert_user_error(refused, "this run does not fit, even streamed: it needs")
    shown = cli(*quick, check=False)
    lines = [line for line in shown.stderr.splitlines() if line.strip()]
    assert lines[0] == "memory plan: in memory on cpu", shown.stderr[-2000:]
    assert lines[-1].startswith("error: could not load model") and shown.returncode == 2
    plan = lines[: next(i for i, line in enumerate(lines) if line.startswith("  total: ")) + 1]
    assert str(tmp_path) not in "\n".join(plan)  # the plan names no paths


def test_app_shows_the_plan_of_the_picked_model(tmp_path, monkeypatch):
    from ui.engine import Engine
    from ui.hosting import Hosting
    from ui.lab_tab import memory_plan_markdown

    monkeypatch.setenv("PRUNING_LAB_CACHE", str(tmp_path / "cache"))
    folder = tmp_path / "model"
    _config("llama").save_pretrained(folder)
    recipe = Recipe(
        calibration=CalibrationSpec(nsamples=4, seqlen=32), evaluation=EvalSpec(("wikitext2",), 64, 2)
    )
    engine = Engine(device="cpu")
    text = memory_plan_markdown(engine, str(folder), recipe)
    assert text.startswith("**Memory plan:** in memory on cpu") and "<td>weights</td>" in text
    assert "<details>" in text  # what goes where, folded away
    assert str(tmp_path) not in text
    assert memory_plan_markdown(engine, str(tmp_path / "missing"), recipe) == ""  # no config: nothing
    assert memory_plan_markdown(engine, next(iter(OFFLINE_MODELS)), recipe) == ""  # not converted yet
    public = Engine(device="cpu", hosting=Hosting.public_profile(None, "cpu"))
    assert memory_plan_markdown(public, str(folder), recipe) == ""  # not offered: not even a plan


# ----- several GPUs ------------------------------------------------------------------------------
def gpus(count: int, each_gib: float, cpu_gib: float = 64) -> Budget:
    free = int(each_gib * GiB)
    return Budget("cuda:0", free, int(cpu_gib * GiB), 500 * GiB, (), (free,) * count)


def test_a_model_too_big_for_one_gpu_is_spread_over_several(size_13b):
    plan = plan_memory(size_13b, gpus(2, 24), BIG)  # one 24 GiB GPU streams it (above)
    assert (plan.mode, plan.store, plan.hidden) == ("multi-gpu", None, None)
    assert plan.headline() == "in memory, spread over 2 GPUs (cuda:0, cuda:1), computing on cuda:0"
    assert "on cuda:0 alone it needs" in plan.reason and "2 GPUs hold it" in plan.reason
    shares = {row.where: row.bytes for row in plan.rows if row.item.startswith("weights spread")}
    assert shares == {"cuda:0": size_13b.weights_bytes // 2, "cuda:1": size_13b.weights_bytes // 2}
    copy = next(row for row in plan.rows if row.item.startswith("dense copy"))
    assert copy.where == "cpu"  # runtime.apply keeps the copy of weights on several devices there
    totals = plan.totals()
    assert set(totals) == {"cuda:0", "cuda:1", "cpu", "disk"} and totals["cuda:1"] == shares["cuda:1"]
    # accelerate may fill each GPU with weights up to its share plus what the plan leaves free there
    budgets = plan.spread_budgets()
    assert budgets["cuda:1"] == int(0.9 * 24 * GiB)
    assert budgets["cuda:0"] == int(0.9 * 24 * GiB) - (totals["cuda:0"] - shares["cuda:0"])
    assert "  total: cuda:0" in plan.text() and "cuda:1" in plan.text()


def test_spreading_is_in_memory_so_streaming_on_streams_and_off_may_spread(size_13b):
    assert plan_memory(size_13b, gpus(2, 24), BIG, streaming="on").mode == "streamed"
    assert plan_memory(size_13b, gpus(2, 24), BIG, streaming="off").mode == "multi-gpu"
    assert plan_memory(size_13b, gpus(2, 80), BIG).mode == "in-memory"  # one GPU holds it: no spread
    assert plan_memory(size_13b, gpus(2, 8), BIG).mode == "streamed"  # 16 GiB hold no 24 GiB of weights
    with pytest.raises(MemoryPlanError, match="streaming off"):
        plan_memory(size_13b, gpus(2, 8), BIG, streaming="off")
    cpu = Budget("cpu", 32 * GiB, 32 * GiB, 500 * GiB, (), (24 * GiB, 24 * GiB))
    assert plan_memory(size_13b, cpu, BIG).mode == "streamed"  # computing on the CPU: no GPU spread


def test_the_loader_spreads_as_the_plan_says(size_13b):
    from runtime.models import _placement

    plan = plan_memory(size_13b, gpus(3, 24), BIG)
    assert plan.mode == "multi-gpu"
    placement = _placement(plan)
    assert placement["device_map"] == "auto"
    assert placement["max_memory"] == {int(gpu[5:]): room for gpu, room in plan.spread_budgets().items()}
    assert set(placement["max_memory"]) == {0, 1, 2}
    assert _placement(plan_memory(size_13b, gpus(1, 80), BIG)) == {}


# ----- one decision: the CLI preview, the app preview and the loader -----------------------------
class _Stop(Exception):
    """Raised by the spy on the loader's decision: no weight is loaded after it."""


class _Lines:
    """Stands in for the CLI's Bar: keeps the lines ``show_memory_plan`` prints."""

    def __init__(self):
        self.lines: list[str] = []

    def message(self, text: str) -> None:
        self.lines += text.splitlines()


def _fake_gpus(monkeypatch, count: int, each_gib: float, cpu_gib: float = 64) -> None:
    """``count`` CUDA GPUs with ``each_gib`` free each and ``cpu_gib`` of CPU memory available, as
    torch and psutil report them to ``available``."""
    import types

    import psutil

    monkeypatch.setattr(psutil, "virtual_memory", lambda: types.SimpleNamespace(available=int(cpu_gib * GiB)))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (int(each_gib * GiB), 80 * GiB))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))  # auto: bf16


def _three_decisions(monkeypatch, folder, recipe: Recipe, max_memory=None, streaming="auto"):
    """(the CLI preview's lines, the app preview's markdown or None, the loader's plan or error)
    for ``recipe`` on the model in ``folder``; the loader is stopped right after it decides."""
    import argparse

    from cli import flags
    from evaluation.lab import Lab
    from runtime import models
    from ui.engine import Engine
    from ui.lab_tab import memory_plan_markdown

    bar = _Lines()
    args = argparse.Namespace(max_memory=parse_max_memory(max_memory), streaming=streaming, batch_size=None)
    try:
        flags.show_memory_plan(args, recipe, bar)
    except MemoryPlanError as err:
        bar.lines = [f"refused: {err}"]
    app = None
    if max_memory is None and streaming == "auto":  # the app has neither setting
        app = memory_plan_markdown(Engine(device=recipe.device), str(folder), recipe)
    decided = []

    def spy(*args, **kwargs):
        decided.append(real(*args, **kwargs))
        raise _Stop

    real = models.load_plan
    monkeypatch.setattr(models, "load_plan", spy)
    try:
        Lab.open(recipe, streaming=streaming, max_memory=max_memory)
    except _Stop:
        pass
    except MemoryPlanError as err:
        decided.append(err)
    finally:
        monkeypatch.setattr(models, "load_plan", real)
    return bar.lines, app, decided[0]


@pytest.mark.parametrize(
    "shape, gpu_count, gib_each, max_memory, expected",
    [
        ("7b", 1, 80, None, "in memory on cuda:0"),
        ("7b", 1, 16, None, "streamed: 2 decoder layers at a time on cuda:0, the others in CPU memory"),
        ("13b", 1, 24, None, "streamed: 2 decoder layers at a time on cuda:0, the others in CPU memory"),
        ("13b", 2, 24, None, "in memory, spread over 2 GPUs (cuda:0, cuda:1), computing on cuda:0"),
        ("13b", 4, 16, None, "in memory, spread over 4 GPUs (cuda:0, cuda:1, cuda:2, cuda:3), computing"),
        ("13b", 2, 80, "cuda:0=20GiB", "in memory, spread over 2 GPUs (cuda:0, cuda:1), computing on cuda:0"),
        ("13b", 2, 80, "0=20GiB,1=10GiB", "streamed: 2 decoder layers at a time on cuda:0"),
        ("7b", 2, 0.3, None, "refused: this run does not fit, even streamed"),
    ],
)
def test_the_previews_and_the_loader_pick_the_same_placement(
    shape, gpu_count, gib_each, max_memory, expected, tmp_path, monkeypatch
):
    """A table of (model size, budget, GPU count): the CLI's preview, the app's preview and the
    loader's own decision (Lab.open, stopped before any weight loads) say the same."""
    folder = tmp_path / shape
    llama(LLAMA_7B if shape == "7b" else LLAMA_13B).save_pretrained(folder)  # the config alone
    _fake_gpus(monkeypatch, gpu_count, gib_each)
    recipe = Recipe(
        model=str(folder),
        device="cuda:0",
        calibration=CalibrationSpec(nsamples=128, seqlen=2048),
        evaluation=EvalSpec(("wikitext2",), 2048, None),
    )
    cli_lines, app, loader = _three_decisions(monkeypatch, folder, recipe, max_memory)
    if isinstance(loader, MemoryPlanError):
        said = f"refused: {loader}"
        assert cli_lines == [said]
        said_on_page = (
            f"{folder} does not fit in this server's memory: it {loader.shortfall}. "
            "Choose a smaller model, or fewer calibration samples and evaluation windows."
        ).replace(" GiB", "\u00a0GiB")  # sizes do not wrap on the page
        assert app is None or app == f"**Memory plan:** {said_on_page}"
    else:
        said = loader.headline()
        assert cli_lines[0] == f"memory plan: {said}"
        assert app is None or app.startswith(f"**Memory plan:** {said}  \n")
        assert loader.device == "cuda:0" and loader.budget.capped == tuple(parse_max_memory(max_memory))
    assert said.startswith(expected)


def test_a_load_that_does_not_fit_reaches_a_visitor_as_one_message(tmp_path, monkeypatch):
    """The loader's refusal names CLI flags and says "does not fit" twice over; a visitor gets one
    sentence: the model by its shown name, what is missing, what they can change, no path."""
    from ui.common import to_message
    from ui.engine import Engine
    from ui.hosting import Hosting

    folder = tmp_path / "big-llama"
    llama(LLAMA_7B).save_pretrained(folder)  # the config alone
    _fake_gpus(monkeypatch, 2, 0.3)
    engine = Engine(device="cuda:0", hosting=Hosting.public_profile([str(folder)], "cuda"))
    with pytest.raises(DoesNotFit) as caught:
        engine.load(str(folder))
    message = str(caught.value)
    assert message == (
        f"big-llama does not fit in this server's memory: it {caught.value.shortfall}. "
        "Choose a smaller model, or fewer calibration samples and evaluation windows."
    )
    assert caught.value.shortfall.startswith("needs ") and " GiB on " in caught.value.shortfall
    assert str(tmp_path) not in message and "--" not in message and "\n" not in message
    assert to_message(caught.value).message == message  # what the page shows, as it is
    assert engine.lab is None  # nothing was loaded


def _tiny_folder(folder):
    """A tiny random Llama with a word-level tokenizer: a model folder that loads in a second."""
    from tokenizers import Tokenizer, models

    config = _config("llama")
    tf.AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(folder)
    words = Tokenizer(models.WordLevel({f"w{i}": i for i in range(VOCAB)}, unk_token="w0"))
    tf.PreTrainedTokenizerFast(tokenizer_object=words, eos_token="w1").save_pretrained(folder)
    return folder


def test_the_previews_and_a_real_load_on_the_cpu_pick_the_same_placement(tmp_path):
    """No GPU: the real loader on a tiny model, in memory and (under a --max-memory budget that only
    a streamed run fits) streamed from disk, says what the previews said."""
    import argparse

    from cli import flags
    from evaluation.lab import Lab
    from ui.engine import Engine
    from ui.lab_tab import memory_plan_markdown

    folder = _tiny_folder(tmp_path / "tiny")
    recipe = Recipe(
        model=str(folder),
        device="cpu",
        calibration=CalibrationSpec(nsamples=4, seqlen=32),
        evaluation=EvalSpec(("wikitext2",), 64, 2),
    )
    bar = _Lines()
    flags.show_memory_plan(argparse.Namespace(max_memory=None, streaming="auto"), recipe, bar)
    app = memory_plan_markdown(Engine(device="cpu"), str(folder), recipe)
    loaded = Lab.open(recipe).loaded
    assert loaded.plan.headline() == "in memory on cpu" and loaded.stream is None
    assert bar.lines[0] == f"memory plan: {loaded.plan.headline()}"
    assert app.startswith(f"**Memory plan:** {loaded.plan.headline()}  \n")
    # a CPU budget between what streaming needs and what holding it in memory needs
    work, size, roomy = Workload.for_recipe(recipe, 1), model_size(_config("llama"), torch.float32), 2**40
    wide = Budget("cpu", roomy, roomy, roomy)
    whole = plan_memory(size, wide, work, streaming="off").totals()["cpu"]
    streamed = plan_memory(size, wide, work, streaming="on").totals()["cpu"]
    assert streamed < whole
    cap = f"cpu={int((streamed + whole) / 2 / 0.9)}B"
    bar = _Lines()
    capped = argparse.Namespace(max_memory=parse_max_memory(cap), streaming="auto")
    flags.show_memory_plan(capped, recipe, bar)
    loaded = Lab.open(recipe, max_memory=cap).loaded
    assert loaded.plan.mode == "streamed" and loaded.stream is not None and loaded.stream.store_kind == "disk"
    assert bar.lines[0] == f"memory plan: {loaded.plan.headline()}"
