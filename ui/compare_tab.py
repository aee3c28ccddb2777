"""Side by side: one prompt, the original and the pruned model's answers next to each other.

One model in memory serves both: inside ``Engine.pruned(session)`` (the Lab holds its lock) the
dense weights are swapped in for the original answer (``Lab.dense``), then the session's masks
come back for the pruned answer. Same decoding settings and seed for both. With int8 or NF4
weights, both answers come from bitsandbytes copies of those two states (``Lab.quantized``).
"""

from __future__ import annotations

from collections.abc import Iterator

import gradio as gr

from evaluation.generate import (
    MAX_NEW_TOKENS,
    MAX_PROMPT_TOKENS,
    DecodingSettings,
    GenerationError,
    prompt_ids,
    stream,
)
from evaluation.quantized import FULL
from evaluation.speed import side_by_side
from prune.jobs import job_size
from prune.state import DENSE
from runtime.quantize import QUANT_KINDS
from ui.common import HEAVY, user_errors
from ui.engine import Engine
from ui.recipes import Defaults, recipe_summary
from ui.sessions import Session

PROMPT_CHARS = 8 * MAX_PROMPT_TOKENS  # the box refuses more; the token limit is checked too
SPEED = dict(prompt=128, new_tokens=16, repeats=3)  # the speed button: a short, fixed measurement
EXAMPLES = [
    "What is the capital of France? Answer in one sentence.",
    "Explain in two sentences why the sky is blue.",
    "Write a haiku about autumn leaves.",
    "List three uses of a paperclip.",
]


def settings_from(max_new_tokens, greedy, temperature, top_p, seed, chat) -> DecodingSettings:
    return DecodingSettings(
        max_new_tokens=int(max_new_tokens),
        greedy=bool(greedy),
        temperature=float(temperature),
        top_p=float(top_p),
        seed=int(seed),
        chat=bool(chat),
    )


def need_pruned(engine: Engine, session: Session) -> None:
    """A message right away when the session has nothing to compare with the original."""
    engine.check_session(session)
    if not session.has_pruned:
        raise gr.Error("Nothing pruned in this session yet: press 'Prune & evaluate' on the Prune tab first.")


def make_generate(engine: Engine):
    @user_errors
    def generate(
        prompt: str,
        max_new_tokens: int,
        greedy: bool,
        temperature: float,
        top_p: float,
        seed: int,
        chat: bool,
        session: Session,
        weights: str = FULL,
    ) -> Iterator[list[str]]:
        settings = settings_from(max_new_tokens, greedy, temperature, top_p, seed, chat)
        if len(prompt or "") > PROMPT_CHARS:
            raise GenerationError(f"the prompt has {len(prompt):,} characters; the limit is {PROMPT_CHARS:,}")
        quantize = () if weights == FULL else (weights,)
        size = job_size(None, "generate", new_tokens=settings.max_new_tokens, quantize=quantize)
        engine.hosting.limits.check(size)
        engine.sessions.touch(session)
        # empty or too many tokens: a message right away, with the session's own tokenizer
        prompt_ids(engine.tokenizer(session), prompt, settings)
        need_pruned(engine, session)

        def work(emit):
            with engine.pruned(session) as pruned:
                lab = engine.lab
                tokenizer = lab.loaded.tokenizer
                if weights == FULL:
                    with lab.dense() as dense:
                        for text in stream(dense, tokenizer, prompt, settings):
                            emit("dense", text)
                else:  # bitsandbytes copies of both states, kept by the lab until the next prune
                    for text in stream(lab.quantized(weights, DENSE)[0], tokenizer, prompt, settings):
                        emit("dense", text)
                    pruned = lab.quantized(weights)[0]
                for text in stream(pruned, tokenizer, prompt, settings):
                    emit("pruned", text)

        note = f"Pruned model: run #{session.runs} of this session ({recipe_summary(session.recipe)})"
        if weights != FULL:
            note += f"; both answers from {weights} copies"
        dense, pruned = "", ""
        for kind, payload in engine.heavy(session, work, size):
            if kind == "dense":
                dense = payload
            elif kind == "pruned":
                pruned = payload
            elif kind == "done":
                note = engine.noted(session, note)
            yield [dense, pruned, note]

    return generate


def make_speed(engine: Engine):
    @user_errors
    def speed(session: Session) -> Iterator[str]:
        """Prefill and decode tokens/s, dense and this session's pruned model, in one job."""
        size = job_size(None, "speed", new_tokens=SPEED["new_tokens"], repeats=SPEED["repeats"])
        engine.hosting.limits.check(size)
        engine.sessions.touch(session)
        need_pruned(engine, session)

        def work(emit):
            with engine.pruned(session):  # the session's complete state, under the lab's lock
                lab = engine.lab
                emit("speed", side_by_side(lab, lab.state, **SPEED))

        yield "Measuring dense and pruned, alternating..."
        for kind, payload in engine.heavy(session, work, size):
            if kind == "speed":
                yield engine.noted(session, "\n".join(f"- {line}" for line in payload.lines()))

    return speed


def build(engine: Engine, defaults: Defaults, session: gr.State) -> None:
    generate = make_generate(engine)
    speed = make_speed(engine)
    gr.Markdown(
        "Both answers come from the **same model in memory**: the dense weights are swapped in for "
        "the original answer and your masks for the pruned one. Same prompt, decoding settings and seed."
    )
    prompt = gr.Textbox(
        label="Prompt", lines=3, max_length=PROMPT_CHARS, value=EXAMPLES[0], placeholder="Ask something"
    )
    gr.Examples(EXAMPLES, prompt, label="Example prompts")
    with gr.Accordion("Decoding settings", open=False):
        with gr.Row():
            max_new_tokens = gr.Slider(
                1, MAX_NEW_TOKENS, value=defaults.max_new_tokens, step=1, label="New tokens"
            )
            greedy = gr.Checkbox(True, label="Greedy (off: sampling)")
            chat = gr.Checkbox(True, label="Use the chat template when the model has one")
        with gr.Row():
            temperature = gr.Slider(0.05, 2.0, value=0.7, step=0.05, label="Temperature (sampling)")
            top_p = gr.Slider(0.05, 1.0, value=0.9, step=0.05, label="Top-p (sampling)")
            seed = gr.Number(0, precision=0, label="Seed")
    weights = gr.Dropdown(
        [FULL, *QUANT_KINDS],
        value=FULL,
        label="Weights",
        info="int8 / nf4: bitsandbytes copies of the original and the pruned model (needs bitsandbytes)",
    )
    button = gr.Button("Generate both", variant="primary", size="lg")
    note = gr.Markdown()
    with gr.Row(equal_height=True):
        dense = gr.Textbox(label="Original (dense)", lines=10, interactive=False, buttons=["copy"])
        pruned = gr.Textbox(label="Pruned (your last run)", lines=10, interactive=False, buttons=["copy"])
    inputs = [prompt, max_new_tokens, greedy, temperature, top_p, seed, chat, session, weights]
    event = dict(fn=generate, inputs=inputs, outputs=[dense, pruned, note], **HEAVY)
    button.click(**event, api_name="generate")
    prompt.submit(**event, api_name=False)
    with gr.Accordion("Speed: dense vs pruned", open=False):
        gr.Markdown(
            f"Prefill ({SPEED['prompt']} tokens) and greedy decode ({SPEED['new_tokens']} tokens) "
            f"tokens/s, median of {SPEED['repeats']} alternating rounds, warm-up excluded. Serving "
            "engines no longer run sparse weights: unstructured and N:M models stay dense with zeros, "
            "so only structured pruning (channels, depth) runs faster."
        )
        speed_button = gr.Button("Measure speed")
        speed_readout = gr.Markdown()
    speed_button.click(fn=speed, inputs=[session], outputs=[speed_readout], **HEAVY, api_name="speed")
