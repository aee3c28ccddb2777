"""Visitors' text files: an upload box that never fetches a URL in public mode, and the cleanup
of what a session's uploads leave behind when it expires.

Gradio fetches a ``FileData`` whose ``path`` is an http(s) URL itself, before any handler runs
(gradio 6: ``Blocks.preprocess_data`` -> ``processing_utils.async_move_files_to_cache`` ->
``Block.async_move_resource_to_block_cache`` -> ``async_ssrf_protected_download``), outside
``max_file_size``; its SSRF guard keeps it off private addresses only, and lets ``*.hf.co``
through any proxy the environment names. A ``url`` field alone is not fetched for an input (only
the proxy of a ``gr.load``-ed app reads it). ``text_upload`` refuses a URL path before the fetch.
"""

from __future__ import annotations

import types
from collections.abc import Iterable
from pathlib import Path

import gradio as gr
from gradio.utils import get_upload_folder
from gradio_client.utils import is_http_url_like

from evaluation.perplexity import forget

URL_REFUSED = "This server does not fetch files from a URL: upload the file itself."
TEXT_FILES = [".txt", ".md", ".jsonl", ".json", ".csv", ".parquet", ".gz"]


async def _refuse_urls(box: gr.File, url_or_file_path: str | Path | None) -> str | None:
    """``box.async_move_resource_to_block_cache`` that refuses a URL before Gradio fetches it."""
    if is_http_url_like(str(url_or_file_path)):
        raise gr.Error(URL_REFUSED)
    return await type(box).async_move_resource_to_block_cache(box, url_or_file_path)


def text_upload(public: bool, **options) -> gr.File:
    """A box for a text file (a path for the handler); public: uploads only, never a URL. Set on
    the instance (a bound method, so Gradio's per-session copies keep it): a subclass of
    ``gr.File`` would make Gradio write a ``.pyi`` stub next to this module at import."""
    box = gr.File(type="filepath", file_types=TEXT_FILES, **options)
    if public:
        box.async_move_resource_to_block_cache = types.MethodType(_refuse_urls, box)
    return box


def discard(paths: Iterable[str], spare: Path) -> None:
    """Delete uploaded files and what is memoized of them: only files in Gradio's upload folder
    (and the folder Gradio made for each), never one below ``spare`` (the sessions' exports)."""
    root = Path(get_upload_folder()).resolve()
    spare = spare.resolve()
    for path in paths:
        forget(path)
        file = Path(path).resolve()
        if root not in file.parents or spare == file or spare in file.parents:
            continue
        file.unlink(missing_ok=True)
        if file.parent != root:
            try:
                file.parent.rmdir()  # Gradio's folder for this upload, once empty
            except OSError:
                pass
