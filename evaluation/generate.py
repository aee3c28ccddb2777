"""Text generation for the side-by-side comparison: greedy or seeded sampling, chat template
when the model has one, streamed token by token.

Sampling never touches the process-wide RNG: ``generate`` has no ``generator`` argument, so
decoding runs in greedy mode with the temperature and top-p warpers plus one last logits
processor that draws the token from the request's own ``torch.Generator`` (seeded per call) and
leaves only that token possible. Two visitors sampling at once each get their seed's answer.
A stopping criterion tied to the job's cancel token ends the generation thread, which is joined.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from prune.errors import Cancelled, LabError
from prune.progress import CancelToken, current_token
from runtime.stream import input_device

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


def _generate_kwargs(tokenizer, settings: DecodingSettings, device: torch.device) -> dict:
    if not 1 <= settings.max_new_tokens <= MAX_NEW_TOKENS:
        raise GenerationError(f"max_new_tokens must be between 1 and {MAX_NEW_TOKENS}")
    kwargs = dict(
        max_new_tokens=settings.max_new_tokens,
        pad_token_id=tokenizer.pad_token_id,
        use_cache=True,
        do_sample=False,  # sampling, when asked, is done by ``_SeededSampler`` with its own generator
    )
    if settings.greedy:
        return kwargs
    from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopPLogitsWarper

    generator = torch.Generator(device=device).manual_seed(int(settings.seed))
    processors = LogitsProcessorList(
        [
            TemperatureLogitsWarper(float(settings.temperature)),
            TopPLogitsWarper(float(settings.top_p)),
            _SeededSampler(generator),
        ]
    )
    return {**kwargs, "logits_processor": processors}


class _SeededSampler:
    """Draw the next token from softmax(scores) with a private generator; keep only that token."""

    def __init__(self, generator: torch.Generator):
        self.generator = generator

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        probs = torch.softmax(scores.float(), dim=-1)
        chosen = torch.multinomial(probs, 1, generator=self.generator)
        out = torch.full_like(scores, float("-inf"))
        return out.scatter_(1, chosen, 0.0)


def _stop_criteria(stop: threading.Event, token: CancelToken | None):
    from transformers import StoppingCriteria, StoppingCriteriaList

    class StopWhenCancelled(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            done = stop.is_set() or (token is not None and token.cancelled)
            return torch.full((input_ids.shape[0],), done, dtype=torch.bool, device=input_ids.device)

    return StoppingCriteriaList([StopWhenCancelled()])


def stream(
    model, tokenizer, prompt: str, settings: DecodingSettings, cancel: CancelToken | None = None
) -> Iterator[str]:
    """Yield the answer as it grows. Seeded per call with a private generator, so dense and pruned
    runs with the same settings draw the same random numbers, whatever else runs. ``cancel`` (by
    default the token of the job running this thread) stops generation at the next token; closing
    the iterator stops it too, and the generation thread is always joined before this returns."""
    from transformers import TextIteratorStreamer

    token = cancel or current_token()
    device = input_device(model)
    ids = prompt_ids(tokenizer, prompt, settings).to(device)
    kwargs = _generate_kwargs(tokenizer, settings, device)
    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True, timeout=0.2)
    stop = threading.Event()
    errors: list[BaseException] = []

    def run() -> None:
        try:
            with torch.no_grad():
                model.generate(
                    ids,
                    attention_mask=torch.ones_like(ids),
                    streamer=streamer,
                    stopping_criteria=_stop_criteria(stop, token),
                    **kwargs,
                )
        except BaseException as err:  # noqa: BLE001 - re-raised in the caller's thread
            errors.append(err)
            streamer.end()

    thread = threading.Thread(target=run, daemon=True, name="lab-generate")
    thread.start()
    text = ""
    try:
        pieces = iter(streamer)
        while True:
            try:
                piece = next(pieces)
            except StopIteration:
                break
            except queue.Empty:  # no token within the timeout: look at the cancel flag again
                if token is not None:
                    token.check()
                if not thread.is_alive() and streamer.text_queue.empty():
                    break
                continue
            text += piece
            yield text
    finally:
        stop.set()  # a closed iterator or a cancel: the criterion ends generate at the next token
        thread.join()
    if errors:
        raise errors[0]
    if token is not None and token.cancelled:
        raise Cancelled(token.reason)


def generate(model, tokenizer, prompt: str, settings: DecodingSettings | None = None) -> str:
    answer = ""
    for partial in stream(model, tokenizer, prompt, settings or DecodingSettings()):
        answer = partial
    return answer
