"""ZeroGPU (issue 9): heavy jobs in ``spaces.GPU`` workers, tested on the CPU without ``spaces``.

``Worker`` below does with a generator function what ``spaces`` 0.51.3 does on ZeroGPU hardware
(``spaces/zero/wrappers.py``): the worker is a process forked from this one, the call's arguments
reach it by pickle and every yielded value comes back by pickle; the same worker serves later calls
(while the scheduler calls it idle) or a fresh one is forked. The app's own model is never touched.
"""

from __future__ import annotations

import multiprocessing
import pickle

import pytest
import torch

from prune.errors import RecipeError
from prune.jobs import JobSize, job_size
from prune.recipe import CalibrationSpec, EvalSpec, Recipe, parse_sparsity
from ui.hosting import LimitExceeded, Limits, gpu_seconds, zero_gpu


class Worker:
    """A ZeroGPU worker as ``spaces`` runs one: forked once, then reused call after call."""

    def __init__(self, function):
        context = multiprocessing.get_context("fork")
        self.conn, child = context.Pipe()
        self.process = context.Process(target=self._serve, args=(function, child), daemon=True)
        self.process.start()

    @staticmethod
    def _serve(function, conn) -> None:
        torch.set_num_threads(1)  # the parent's intra-op pool does not survive a fork
        while True:
            try:
                args = conn.recv()
            except EOFError:
                return
            try:
                for value in function(*args):
                    conn.send(("value", value))
                conn.send(("end", None))
            except Exception as err:  # noqa: BLE001 - as spaces reports a worker error
                conn.send(("error", f"{type(err).__name__}: {err}"))

    def __call__(self, *args):
        self.conn.send(args)
        ended = False
        try:
            while True:
                kind, value = self.conn.recv()
                ended = kind in ("end", "error")
                if kind == "end":
                    return
                if kind == "error":
                    raise RuntimeError(value)
                yield value
        finally:
            while not ended:  # closed early: as in spaces, the call ends when the worker's does
                ended = self.conn.recv()[0] in ("end", "error")

    def stop(self) -> None:
        self.conn.close()
        self.process.join(10)


# ----- GPU time (no model) ---------------------------------------------------------------------------
def _run_size(nsamples: int, seqlen: int, windows: int, eval_seqlen: int) -> JobSize:
    """The size of a prune-and-evaluate run (dense and pruned perplexity on WikiText-2)."""
    recipe = Recipe(
        calibration=CalibrationSpec(source="c4", nsamples=nsamples, seqlen=seqlen),
        evaluation=EvalSpec(("wikitext2",), eval_seqlen, windows),
    )
    return job_size(recipe, "run")


def test_gpu_time_comes_from_the_job_and_is_capped():
    limits = Limits.for_device("cuda")
    small = gpu_seconds(_run_size(4, 128, 2, 128), limits, 135_000_000)
    assert 20 <= small < 40  # mostly a fresh worker's start, doubled for safety
    bigger = gpu_seconds(_run_size(32, 512, 16, 512), limits, 135_000_000)
    assert bigger > small
    evaluation = JobSize("run", eval_windows=100, eval_seqlen=1000, evaluations=1)
    slow = gpu_seconds(evaluation, limits, 135_000_000, tokens_per_s=5_000)
    assert slow > gpu_seconds(evaluation, limits, 135_000_000)  # measured beats guessed
    assert gpu_seconds(job_size(None, "generate", new_tokens=256), limits, 135_000_000) > small
    assert gpu_seconds(None, limits, 0) == 120  # an unknown size asks for the most
    assert gpu_seconds(None, limits.replace(job_seconds=60), 0) == 60  # the host's job limit too
    with pytest.raises(LimitExceeded, match="at most 120 s"):
        gpu_seconds(_run_size(128, 2048, 32, 4096), limits, 7_000_000_000)
    assert gpu_seconds(job_size(None, "export"), limits, 7_000_000_000, cap=300) > 60  # writing 14 GB


def test_zero_gpu_needs_the_platform_flag_and_the_package(monkeypatch):
    import ui.hosting as hosting

    monkeypatch.setattr(hosting, "_has_spaces", lambda: True)
    for value, expected in [("true", True), ("1", True), ("false", False), ("0", False), ("", False)]:
        monkeypatch.setenv("SPACES_ZERO_GPU", value)
        assert zero_gpu() is expected, value
    monkeypatch.setenv("SPACES_ZERO_GPU", "true")
    monkeypatch.setattr(hosting, "_has_spaces", lambda: False)
    assert not zero_gpu()  # a GPU Space with the flag but no package: nothing to run GPU calls with


def test_a_closure_travels_by_its_code_and_the_engine_by_reference():
    from ui import zerogpu
    from ui.engine import Engine

    engine = Engine(device="cpu")
    scale = torch.arange(3.0)

    def work(emit):
        emit("seen", engine is zerogpu._engine(id(engine)))
        return scale * 2

    again = pickle.loads(zerogpu.ship(engine, work))
    events = []
    assert torch.equal(again(lambda kind, payload: events.append(payload)), scale * 2)
    assert events == [True] and again is not work
    assert pickle.loads(zerogpu.ship(engine, engine)) is engine


# ----- jobs in a forked worker (a tiny random-weight model) --------------------------------------------
@pytest.fixture(scope="module")
def lab_on_zerogpu(tmp_path_factory):
    from tiny import save_tiny_chat_model

    from ui import zerogpu
    from ui.engine import Engine

    folder = save_tiny_chat_model(tmp_path_factory.mktemp("tiny") / "tiny-chat")
    engine = Engine(device="cpu")
    engine.load(str(folder))
    dense = {n: p.detach().clone() for n, p in engine.lab.loaded.model.named_parameters()}
    worker = Worker(zerogpu.worker)
    engine.gpu = worker
    yield engine, dense
    worker.stop()


def run(engine, session, work, size=None):
    events = list(engine.heavy(session, work, size))
    assert events[-1][0] == "done"
    return events


def prune_work(engine, session, sparsity: float):
    recipe = Recipe(
        model=engine.lab.loaded.name,
        method="magnitude",
        device="cpu",
        sparsity=parse_sparsity(f"all={sparsity}"),
        evaluation=EvalSpec(datasets=()),
    )
    return lambda emit: engine.run(session, recipe, lambda event: emit("progress", event))


def zeros_in_worker(engine, session):
    def work(emit):
        with engine.pruned(session) as model:
            return sum(int((p == 0).sum()) for n, p in model.named_parameters() if n.endswith("proj.weight"))

    return work


@pytest.mark.model
def test_a_session_prunes_in_the_worker_and_keeps_its_masks_here(lab_on_zerogpu):
    from ui.sessions import Session

    engine, dense = lab_on_zerogpu
    alice, bob = Session(), Session()
    result = run(engine, alice, prune_work(engine, alice, 0.5), JobSize("prune"))[-1][1]
    assert result.prune.report.pruned > 0 and alice.runs == 1 and alice.state is not None  # came back
    assert all(mask.device.type == "cpu" for mask in result.prune.masks.values())
    run(engine, bob, prune_work(engine, bob, 0.25))
    for name, param in engine.lab.loaded.model.named_parameters():  # the app's model stayed dense
        assert torch.equal(param, dense[name]), name

    pruned = alice.state.pruned()
    # the worker holds bob's state now: alice's masks are applied again for her job
    assert run(engine, alice, zeros_in_worker(engine, alice))[-1][1] == pruned
    assert run(engine, bob, zeros_in_worker(engine, bob))[-1][1] == bob.state.pruned() < pruned
    # a fresh worker starts from the app's state (dense): the masks sent along are applied
    from ui import zerogpu

    reused, engine.gpu = engine.gpu, Worker(zerogpu.worker)
    try:
        assert run(engine, alice, zeros_in_worker(engine, alice))[-1][1] == pruned
    finally:
        engine.gpu.stop()
        engine.gpu = reused


def weights_in_worker(engine, session, recipe=None):
    """The session's pruned weights as a worker has them (after pruning ``recipe`` first, if given)."""

    def work(emit):
        if recipe is not None:
            engine.run(session, recipe, lambda event: emit("progress", event))
        with engine.pruned(session) as model:
            return {n: p.detach().clone() for n, p in model.named_parameters() if n.endswith("proj.weight")}

    return work


@pytest.mark.model
def test_a_sparsegpt_state_reaches_any_worker_whole(lab_on_zerogpu):
    """The session sends its state compact (masks, recipe); a worker that holds another state, or a
    fresh one, puts back the very weights SparseGPT rewrote, not the dense ones with masks."""
    from ui import zerogpu
    from ui.sessions import Session

    engine, dense = lab_on_zerogpu
    alice, bob = Session(), Session()
    recipe = Recipe(
        model=engine.lab.loaded.name,
        method="sparsegpt",
        device="cpu",
        sparsity=parse_sparsity("all=0.5"),
        calibration=CalibrationSpec(source="generated", nsamples=4, seqlen=32),
        evaluation=EvalSpec(datasets=()),
    )
    first = run(engine, alice, weights_in_worker(engine, alice, recipe))[-1][1]
    name = next(iter(first))
    assert alice.state.pruned() > 0
    assert not torch.equal(first[name], dense[name].masked_fill(first[name] == 0, 0))  # values changed
    run(engine, bob, prune_work(engine, bob, 0.25))
    again = run(engine, alice, weights_in_worker(engine, alice))[-1][1]
    assert all(torch.equal(again[n], first[n]) for n in first)
    reused, engine.gpu = engine.gpu, Worker(zerogpu.worker)  # a fresh worker: dense, nothing cached
    try:
        fresh = run(engine, alice, weights_in_worker(engine, alice))[-1][1]
    finally:
        engine.gpu.stop()
        engine.gpu = reused
    assert all(torch.equal(fresh[n], first[n]) for n in first)


@pytest.mark.model
def test_errors_in_the_worker_reach_the_visitor_as_they_are(lab_on_zerogpu):
    from ui.sessions import Session

    engine, _ = lab_on_zerogpu
    session = Session()

    def bad(emit):
        raise RecipeError("that recipe is wrong")

    with pytest.raises(RecipeError, match="that recipe is wrong"):
        list(engine.heavy(session, bad))
    with pytest.raises(LimitExceeded, match="GPU time"):  # too large: refused before it is queued
        list(engine.heavy(session, bad, JobSize("run", eval_windows=10**6, eval_seqlen=10**6, evaluations=1)))
    assert not engine.sessions._running.get(session.uid)
