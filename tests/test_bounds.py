"""What one visitor can grow is bounded: the dense-perplexity memo, a session's run history."""

from __future__ import annotations

import dataclasses

import torch
from tiny import VOCAB, tiny_model, word_tokenizer

from evaluation import lab as lab_module
from evaluation.lab import Lab
from ui.sessions import HISTORY_RUNS, Session


def test_dense_perplexity_memo_keeps_the_newest_and_recomputes_an_evicted_one(tmp_path, monkeypatch):
    monkeypatch.setattr(lab_module, "DENSE_MEMO_ENTRIES", 2)
    words = torch.randint(0, VOCAB, (8 * 16,), generator=torch.Generator().manual_seed(0))
    text = tmp_path / "words.txt"
    text.write_text(" ".join(f"w{i}" for i in words.tolist()))
    lab = Lab(dataclasses.replace(tiny_model("llama"), tokenizer=word_tokenizer(), name="tiny"))
    calls = []
    lab.loaded.model.register_forward_pre_hook(lambda *_: calls.append(1))

    def forwards(windows: int) -> int:
        before = len(calls)
        lab.dense_perplexity(str(text), 16, windows)
        return len(calls) - before

    assert [forwards(w) for w in (1, 2, 3)] == [1, 2, 3]  # three keys, each computed
    assert len(lab._dense_ppl) == 2
    assert forwards(3) == 0 and forwards(2) == 0  # the two newest answer from the memo
    assert forwards(1) == 1  # the oldest was evicted: computed again


def test_a_sessions_history_keeps_its_newest_runs():
    session = Session()
    for run in range(HISTORY_RUNS + 50):
        session.history.append({"run": run})
    assert len(session.history) == HISTORY_RUNS
    assert [r["run"] for r in session.history][:1] == [50] and session.history[-1]["run"] == HISTORY_RUNS + 49
