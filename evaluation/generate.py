"""Text generation for the side-by-side comparison: greedy or seeded sampling, chat template
when the model has one, streamed token by token."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from prune.errors import LabError

MAX_PROMPT_TOKENS = 1024
MAX_NEW_TOKENS = 512


class GenerationError(LabError):
    pass


@dataclass
class DecodingSettings:
    max_new_tokens: int = 64
    greedy: bool = True
    temperature: float = 0.7
    top_p: float = 0.9
    seed: int = 0
    chat: bool = True  # use the chat template when the tokenizer has one


def prompt_ids(tokenizer, prompt: str, settings: DecodingSettings) -> torch.Tensor:
    if not prompt or not prompt.strip():
        raise GenerationError("the prompt is empty")
    if settings.chat and getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}],
            add_generation_prompt=True,
            return_tensors="pt",
            return_dict=True,
        )["input_ids"]
    else:
        ids = tokenizer(prompt, return_tensors="pt").input_ids
    if ids.shape[1] > MAX_PROMPT_TOKENS:
        raise GenerationError(f"the prompt has {ids.shape[1]} tokens; the limit is {MAX_PROMPT_TOKENS}")
    return ids


def _generate_kwargs(tokenizer, settings: DecodingSettings) -> dict:
    if not 1 <= settings.max_new_tokens <= MAX_NEW_TOKENS:
        raise GenerationError(f"max_new_tokens must be between 1 and {MAX_NEW_TOKENS}")
    kwargs = dict(max_new_tokens=settings.max_new_tokens, pad_token_id=tokenizer.pad_token_id, use_cache=True)
    if settings.greedy:
        return {**kwargs, "do_sample": False}
    return {**kwargs, "do_sample": True, "temperature": settings.temperature, "top_p": settings.top_p}


def stream(model, tokenizer, prompt: str, settings: DecodingSettings) -> Iterator[str]:
    """Yield the answer as it grows. The seed is set per call, so dense and pruned runs with the
    same settings draw the same random numbers."""
    from transformers import TextIteratorStreamer

    ids = prompt_ids(tokenizer, prompt, settings).to(next(model.parameters()).device)
    kwargs = _generate_kwargs(tokenizer, settings)
    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    errors: list[BaseException] = []

    def run() -> None:
        try:
            torch.manual_seed(settings.seed)
            with torch.no_grad():
                model.generate(ids, attention_mask=torch.ones_like(ids), streamer=streamer, **kwargs)
        except BaseException as err:  # noqa: BLE001 - re-raised in the caller's thread
            errors.append(err)
            streamer.end()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    text = ""
    for piece in streamer:
        text += piece
        yield text
    thread.join()
    if errors:
        raise errors[0]


def generate(model, tokenizer, prompt: str, settings: DecodingSettings | None = None) -> str:
    answer = ""
    for partial in stream(model, tokenizer, prompt, settings or DecodingSettings()):
        answer = partial
    return answer
