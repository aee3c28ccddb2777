"""Cancel and the time limit hold in every long loop, whatever progress callback the caller passed.

The job's ``CancelToken`` (its flag and deadline, installed for the job's thread) is checked by
``prune.progress.checkpoint`` inside each loop itself: perplexity windows, task documents, study
points, statistics batches. Each test counts the model calls a job makes after it is told to
stop: the one already running and no other."""

from __future__ import annotations

import dataclasses
import threading
import time

import pytest
import torch
from tiny import VOCAB, tiny_model, word_tokenizer

from evaluation import studies
from evaluation.lab import Lab
from evaluation.perplexity import perplexity
from prune.errors import Cancelled
from prune.progress import CancelToken, cancellable
from prune.recipe import CalibrationSpec

SEQLEN = 16
WINDOWS = 12


@pytest.fixture
def lab(tmp_path) -> Lab:
    """A Lab on a tiny random Llama whose tokenizer reads words ``w0 .. w127``."""
    loaded = dataclasses.replace(tiny_model("llama"), tokenizer=word_tokenizer(), name="tiny")
    return Lab(loaded)


@pytest.fixture
def text_file(tmp_path) -> str:
    """WINDOWS windows of SEQLEN random words (an evaluation and calibration file)."""
    words = torch.randint(0, VOCAB, (WINDOWS * SEQLEN,), generator=torch.Generator().manual_seed(0))
    path = tmp_path / "words.txt"
    path.write_text(" ".join(f"w{i}" for i in words.tolist()))
    return str(path)


class Calls:
    """Counts the whole model's forward calls; at call ``at`` it runs ``then`` (cancel, or move
    the deadline into the past)."""

    def __init__(self, model: torch.nn.Module, at: int, then):
        self.count, self.at, self.then = 0, at, then
        self.handle = model.register_forward_pre_hook(self._seen)

    def _seen(self, *_):
        self.count += 1
        if self.count == self.at:
            self.then()


def lock_is_free(lab: Lab) -> bool:
    """Whether another thread can take the Lab's lock at once (an RLock is re-entrant in ours)."""
    taken = []

    def take() -> None:
        if lab.lock.acquire(timeout=0.5):
            taken.append(True)
            lab.lock.release()

    thread = threading.Thread(target=take)
    thread.start()
    thread.join()
    return taken == [True]


def test_a_study_cancelled_during_its_dense_evaluation_stops_within_one_window(lab, text_file):
    token = CancelToken()
    calls = Calls(lab.loaded.model, at=3, then=lambda: token.cancel("cancelled by you"))
    calibration = CalibrationSpec(source="file", path=text_file, nsamples=2, seqlen=SEQLEN)
    with cancellable(token), pytest.raises(Cancelled, match="cancelled by you"):
        studies.run_study(
            lab, "combined", [0.5], WINDOWS, dataset=text_file, eval_seqlen=SEQLEN, calibration=calibration
        )  # progress: silent, so only the loops' own checks can stop it
    assert calls.count == 3  # the dense evaluation's third window ran, no fourth
    assert lab.calibration_passes == 0 and lab.state.is_dense
    assert lock_is_free(lab)


def test_a_job_past_its_time_limit_stops_within_one_window_with_a_message(lab, text_file):
    token = CancelToken(seconds=600)

    def expire():
        token.deadline = time.monotonic() - 1.0  # as if ten minutes had gone by

    calls = Calls(lab.loaded.model, at=5, then=expire)
    with cancellable(token), pytest.raises(Cancelled, match="ran past its time limit of 600 s"):
        lab.perplexity(text_file, SEQLEN, WINDOWS)
    assert calls.count == 5
    assert lock_is_free(lab)
    with cancellable(CancelToken()):  # the next job runs as before
        assert perplexity(lab.loaded, lab.loaded.tokenizer, text_file, SEQLEN, WINDOWS).windows == WINDOWS


def test_task_documents_stop_at_the_time_limit_within_one_document(lab, data_dir):
    from evaluation.tasks import evaluate_tasks

    token = CancelToken(seconds=600)
    calls = Calls(lab.loaded.model, at=2, then=lambda: setattr(token, "deadline", time.monotonic() - 1.0))
    with cancellable(token), pytest.raises(Cancelled, match="time limit"):
        evaluate_tasks(lab.loaded.model, lab.loaded.tokenizer, ["rte"], limit=20, batch_size=1)
    assert calls.count == 2  # one document a model call (batch 1): the second one, then no third


def test_a_loaded_model_stops_within_one_layer_of_a_cancel(tmp_path):
    """A long window (or one generated token) is no longer the grain: every decoder layer of a model
    the loader made checks the job's token before it runs."""
    from tiny import save_tiny_chat_model

    from runtime.models import load

    lm = load(str(save_tiny_chat_model(tmp_path / "tiny")), device="cpu", dtype="float32")
    layers = lm.roles.layers(lm.model)
    token, ran = CancelToken(), []
    for i, layer in enumerate(layers):
        layer.register_forward_hook(lambda module, args, out, i=i: ran.append(i))
    ids = torch.randint(0, 100, (1, 8))
    lm.model(ids)  # outside a job: every layer runs
    assert ran == list(range(len(layers))) and len(layers) > 1
    ran.clear()
    layers[0].register_forward_hook(lambda *args: token.cancel("stop"))  # cancelled inside layer 0
    with cancellable(token), pytest.raises(Cancelled, match="stop"):
        lm.model(ids)
    assert ran == [0]  # layer 1 checked the token and never ran
