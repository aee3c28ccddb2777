"""Sessions' kept states within a byte budget (issue 19, item 1) and the reaper against admission
(item 6). The book's accounting and eviction order need no model; eviction and rebuild run a real
tiny Llama (SmolLM2's tokenizer, WikiText-2 from the data folder) through the measure handler."""

from __future__ import annotations

import math
import threading
import time

import numpy as np
import pytest
import torch

from prune.recipe import CalibrationSpec, EvalSpec, Recipe, parse_sparsity
from prune.state import PrunedState
from ui.hosting import Hosting
from ui.sessions import PackedState, Session, SessionBook, StaleSession, StateTooLarge

SHAPES = [(5, 13), (7, 20), (3, 8), (9, 1)]  # rows, columns: most not a multiple of 8


def packed(seed: int, shapes=SHAPES) -> PackedState:
    generator = torch.Generator().manual_seed(seed)
    masks = {(i, "q"): torch.rand(shape, generator=generator) < 0.5 for i, shape in enumerate(shapes)}
    return PackedState.pack(PrunedState(masks, {}, None, ("uid", seed)))


def packed_bytes(shapes) -> int:
    """1 bit per weight, each row padded to whole bytes: counted from the shapes alone."""
    return sum(math.ceil(cols / 8) * rows for rows, cols in shapes)


def book(budget_bytes: int | None, ttl_s: float = 3600.0) -> SessionBook:
    mb = None if budget_bytes is None else budget_bytes / 2**20
    return SessionBook(Hosting(state_budget_mb=mb, session_ttl_s=ttl_s))


# ----- the book, no model -------------------------------------------------------------------------
def test_bytes_accounted_are_the_packed_bits():
    state = packed(0)
    assert state.nbytes() == packed_bytes(SHAPES) == 5 * 2 + 7 * 3 + 3 * 1 + 9 * 1
    sessions, accounts = [Session() for _ in range(3)], book(None)
    for i, session in enumerate(sessions):
        accounts.keep(session, packed(i))
    assert accounts.kept_bytes() == 3 * packed_bytes(SHAPES)
    sessions[1].drop_state()  # a model switch drops a state without telling the book
    assert accounts.kept_bytes() == 2 * packed_bytes(SHAPES)
    unpacked = state.unpack().masks  # packing loses nothing
    generator = torch.Generator().manual_seed(0)
    for i, shape in enumerate(SHAPES):
        assert torch.equal(unpacked[(i, "q")], torch.rand(shape, generator=generator) < 0.5)


def test_the_budget_evicts_the_oldest_idle_state_first_never_one_with_a_job():
    size = packed_bytes(SHAPES)
    accounts = book(3 * size)
    a, b, c, d = (Session() for _ in range(4))
    for i, session in enumerate((a, b, c)):
        accounts.touch(session)
        accounts.keep(session, packed(i))
        time.sleep(0.002)
    token = accounts.admit(a)  # a, the oldest, has a job waiting: it keeps its state
    accounts.touch(d)
    accounts.keep(d, packed(3))
    assert a.state is not None and b.state is None and c.state is not None and d.state is not None
    assert b.evicted == packed(1).digest() and b.has_pruned and accounts.evictions == 1
    assert accounts.kept_bytes() == 3 * size
    accounts.release(a, token)  # a's job ended just now: c is the oldest idle one
    e = Session()
    accounts.keep(e, packed(4))
    assert c.state is None and a.state is not None and accounts.kept_bytes() == 3 * size


def test_a_state_with_no_room_left_by_busy_sessions_is_evicted_at_once():
    size = packed_bytes(SHAPES)
    accounts = book(2 * size)
    busy = [Session(), Session()]
    for i, session in enumerate(busy):
        accounts.keep(session, packed(i))
        accounts.admit(session)
    late = Session()
    accounts.keep(late, packed(2))
    assert all(s.state is not None for s in busy) and late.state is None
    assert late.evicted == packed(2).digest() and accounts.kept_bytes() == 2 * size


def test_a_state_larger_than_the_whole_budget_is_refused_in_words():
    accounts = book(packed_bytes(SHAPES) - 1)
    with pytest.raises(StateTooLarge, match=r"masks take 0\.0 KB at 1 bit per weight, more than the 0\.0 KB"):
        accounts.keep(Session(), packed(0))
    assert accounts.kept_bytes() == 0
    with pytest.raises(StateTooLarge, match="this server keeps for every visitor's pruned model together"):
        book(2**20).check_size(3 * 2**20)


def test_the_reaper_never_expires_a_session_admitted_while_it_decides():
    """The reaper finds a session idle past its TTL and starts dropping it; the visitor comes back
    at that moment. Before the fix the reaper decided under the lock and dropped outside it, so the
    job admitted meanwhile lost the state it had just made (and its registration); now admission
    waits for the drop, and what the job makes after it stays."""
    dropping = threading.Event()

    class Watched(Session):
        def drop_state(self) -> None:
            dropping.set()
            time.sleep(0.2)  # a slow drop: the visitor's request arrives meanwhile
            super().drop_state()

    accounts, session = book(None, ttl_s=0.0), Watched()
    session.state, session.recipe = packed(0), Recipe()
    accounts.touch(session)
    reaper = threading.Thread(target=accounts.reap)
    reaper.start()
    assert dropping.wait(5)
    token = accounts.admit(session)  # the visitor's next job
    session.state = made = packed(1)  # what that job prunes
    reaper.join()
    assert session.state is made and not token.cancelled
    assert accounts.live() == 1 and accounts.kept_bytes() == made.nbytes()
    accounts.release(session, token)
    assert accounts.reap() == 1 and session.state is None  # idle again: expired whole


# ----- a real model: eviction, rebuild, refusal -----------------------------------------------------
@pytest.fixture(scope="module")
def chat_folder(tmp_path_factory) -> str:
    from tiny import save_tiny_chat_model

    return str(save_tiny_chat_model(tmp_path_factory.mktemp("tiny-chat")))


def recipe_for(folder: str, sparsity: str, **changes) -> Recipe:
    settings = dict(
        calibration=CalibrationSpec(source="c4", nsamples=4, seqlen=64),
        evaluation=EvalSpec(datasets=("wikitext2",), seqlen=64, max_windows=2),
    )
    return Recipe(model=folder, sparsity=parse_sparsity(sparsity), **{**settings, **changes})


def engine_for(folder: str, budget_bytes: int | None):
    from ui.engine import Engine

    mb = None if budget_bytes is None else budget_bytes / 2**20
    engine = Engine(device="cpu", hosting=Hosting(state_budget_mb=mb))
    engine.load(folder)
    return engine


def independent_bytes(masks) -> int:
    return sum(math.ceil(m.shape[1] / 8) * m.shape[0] for m in masks.values())


def measure(engine, session) -> tuple[str, dict]:
    from ui.lab_tab import make_measure_handler

    *_, (text, perplexities) = make_measure_handler(engine)(session)
    return text, perplexities


@pytest.mark.parametrize("stats_mode", ["cached", "sequential"])
def test_an_evicted_session_is_rebuilt_to_the_same_masks_and_perplexity(data_dir, chat_folder, stats_mode):
    one = engine_for(chat_folder, None)
    a = Session()
    one.run(a, recipe_for(chat_folder, "all=0.5", stats_mode=stats_mode), lambda event: None)
    size = independent_bytes(one.lab.state.masks)
    assert a.state.nbytes() == size == one.sessions.kept_bytes()

    engine = engine_for(chat_folder, size + size // 2)  # room for one state, not two
    a, b = Session(), Session()
    engine.run(a, recipe_for(chat_folder, "all=0.5", stats_mode=stats_mode), lambda event: None)
    saved = {key: mask.clone() for key, mask in a.state.unpack().masks.items()}
    before_text, before = measure(engine, a)
    assert "evicted" not in before_text

    engine.run(b, recipe_for(chat_folder, "mlp=0.6", stats_mode=stats_mode), lambda event: None)
    assert a.state is None and a.evicted and b.state is not None  # a was idle the longest
    assert engine.sessions.kept_bytes() <= engine.sessions.budget

    text, after = measure(engine, a)
    assert text.startswith("your pruned model was evicted to make room for other visitors; rebuilt from ")
    assert "your recipe in " in text and " s. Run #1 measured again" in text
    assert after == before  # the same weights: the same perplexity, to the last digit
    masks = a.state.unpack().masks
    assert masks.keys() == saved.keys() and all(torch.equal(masks[k], saved[k]) for k in saved)
    assert b.state is None and b.evicted  # a's rebuilt state took the room back
    again, _ = measure(engine, a)
    assert "evicted" not in again  # said once


def test_a_state_that_cannot_be_rebuilt_tells_the_visitor_to_prune_again(data_dir, chat_folder, tmp_path):
    text = (data_dir / "wikitext-2-raw-v1" / "test.jsonl").read_text()[:200_000]
    upload = tmp_path / "calibration.txt"
    upload.write_text(text)
    calibration = CalibrationSpec(source="file", path=str(upload), nsamples=4, seqlen=64)
    engine = engine_for(chat_folder, 12_000)
    a, b = Session(), Session()
    engine.run(a, recipe_for(chat_folder, "all=0.5", calibration=calibration), lambda event: None)
    engine.run(b, recipe_for(chat_folder, "all=0.4"), lambda event: None)
    assert a.state is None and a.evicted
    upload.unlink()
    engine.lab.pruner._ids.clear()  # its calibration ids left the bounded cache as well
    with pytest.raises(Exception, match="evicted to make room for other visitors and cannot be rebuilt here"):
        measure(engine, a)
    b_masks = b.state.unpack().masks
    with engine.pruned(b):  # the model is still whole for everyone else
        assert all(torch.equal(engine.lab.masks[k].cpu(), m) for k, m in b_masks.items())

    c = Session()
    engine.run(c, recipe_for(chat_folder, "all=0.5"), lambda event: None)
    assert b.state is None
    b.evicted = "0" * 64  # masks that the recipe no longer gives here
    with pytest.raises(StaleSession, match="pruning again from your recipe gave other masks here"):
        with engine.pruned(b):
            pass


def test_a_state_larger_than_the_budget_is_refused_before_pruning(chat_folder):
    engine = engine_for(chat_folder, 4096)
    session = Session()
    recipe = recipe_for(chat_folder, "all=0.5", method="magnitude")
    with pytest.raises(StateTooLarge, match=r"masks take 9\.0 KB at 1 bit per weight, more than the 4\.0 KB"):
        engine.run(session, recipe, lambda event: None)
    assert engine.lab.state.is_dense and session.state is None and session.runs == 0
    small = recipe_for(chat_folder, "k=0.5", method="magnitude")  # k alone: 2 x 32 rows x 8 bytes
    engine.run(session, small, lambda event: None)
    assert session.state.nbytes() == independent_bytes(engine.lab.state.masks) == 2 * 32 * 8
    assert np.all([bits.shape[1] == 8 for bits, _ in session.state.bits.values()])


def test_a_public_host_derives_its_budget_from_the_memory_plan(chat_folder):
    from runtime.memory import STATE_CAP, available, state_budget
    from ui.engine import Engine

    engine = Engine(device="cpu", hosting=Hosting.public_profile([chat_folder], "cpu"))
    engine.load(chat_folder)
    free = available("cpu").cpu_free
    assert 0 < engine.sessions.budget <= STATE_CAP
    assert abs(engine.sessions.budget - state_budget(available("cpu"))) < 0.05 * free
    assert engine_for(chat_folder, None).sessions.budget is None  # local: no budget
