"""Export: the session's recipe (JSON and YAML, which ``python -m prune --recipe FILE`` reruns) and
the pruned model itself as a zip of a ``save_pretrained`` (safetensors) folder.

A session's export folder holds at most one model zip (a new export replaces it). The zip lies in
Gradio's upload folder (``ui.sessions.EXPORT_ROOT``), so Gradio serves it without a copy of its own;
it is deleted shortly after its download has been sent in full (``DeleteAfterDownload``, for the
page and for API clients alike), else by Gradio's ``delete_cache`` after the session TTL, or when the
session expires."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import shutil
import zipfile
from collections.abc import Iterator
from pathlib import Path

import gradio as gr

from evaluation.lab import versions
from prune.jobs import job_size
from prune.progress import Event
from ui.common import HEAVY, LIGHT, PROGRESS, user_errors
from ui.engine import Engine
from ui.hosting import LimitExceeded, free_disk_mb
from ui.sessions import EXPORT_ROOT, Session


def _folder(session: Session, what: str) -> Path:
    """A fresh folder per session and kind; the previous export of the same kind is removed."""
    folder = session.folder(what)
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    return folder


def _require_run(session: Session) -> None:
    if session.recipe is None:
        raise gr.Error("Nothing to export yet: press 'Prune & evaluate' on the Prune tab first.")


def cli_markdown(session: Session) -> str:
    recipe = session.recipe
    uploads = [
        p for p in [recipe.calibration.path, *recipe.evaluation.datasets] if p and Path(p).is_absolute()
    ]
    note = ""
    if uploads:
        note = (
            "\n\nThe recipe names uploaded files by their file name "
            f"({', '.join(Path(p).name for p in uploads)}): copy them next to the recipe."
        )
    return (
        f"Reproduce run #{session.runs} from a terminal:\n\n"
        "```bash\npython -m prune --recipe recipe.json            # prune and evaluate as the app did\n"
        "python -m prune --recipe recipe.json --eval none --save pruned/   # just the pruned model\n```"
        + note
    )


def make_handlers(engine: Engine):
    @user_errors
    def export_recipe(session: Session) -> list:
        _require_run(session)
        engine.sessions.touch(session)
        folder = _folder(session, "recipe")
        recipe = shareable_recipe(session.recipe)
        (folder / "recipe.json").write_text(recipe.to_json())
        (folder / "recipe.yaml").write_text(recipe.to_yaml())
        return [
            [str(folder / "recipe.json"), str(folder / "recipe.yaml")],
            recipe.to_json(),
            cli_markdown(session),
        ]

    @user_errors
    def export_model(session: Session, progress=PROGRESS) -> Iterator[list]:
        _require_run(session)
        engine.check_session(session)
        check_free_disk(engine, session)
        folder = _folder(session, "model")
        name = f"{Path(session.recipe.model).name}-pruned-run{session.runs}"
        target = folder / name

        def work(emit):
            def saving(event: Event) -> None:
                emit("progress", (0.6 * event.fraction, event.message))

            with engine.pruned(session):  # any placement: the Lab writes it layer by layer
                engine.lab.save(target, progress=saving)
            shareable_recipe(session.recipe).save(target / "recipe.json")
            summary = {"versions": versions(), **(session.last or {})}
            (target / "pruning_result.json").write_text(json.dumps(summary, indent=2, default=str))
            emit("progress", (0.6, "zipping"))
            archive = folder / f"{name}.zip"
            with zipfile.ZipFile(archive, "w", zipfile.ZIP_STORED) as zf:  # safetensors barely compress
                for path in sorted(target.rglob("*")):
                    zf.write(path, Path(name) / path.relative_to(target))
            shutil.rmtree(target)
            return archive

        yield [None, "Saving the pruned model ..."]
        for kind, payload in engine.heavy(session, work, job_size(session.recipe, "export")):
            if kind == "progress":
                progress(payload[0], desc=payload[1])
        size = payload.stat().st_size / 2**20
        yield [
            str(payload),
            engine.noted(
                session,
                f"**{payload.name}** ({size:.0f} MiB): a save_pretrained folder with "
                "safetensors weights, the tokenizer, recipe.json and pruning_result.json. "
                "The server deletes it shortly after it has been downloaded: download it once.",
            ),
        ]

    return export_recipe, export_model


def build(engine: Engine, session: gr.State) -> None:
    export_recipe, export_model = make_handlers(engine)
    gr.Markdown("Everything here is for **your last run** in this browser tab.")
    with gr.Row(equal_height=False):
        with gr.Column():
            gr.Markdown("### Recipe")
            recipe_btn = gr.Button("Export recipe (JSON + YAML)", variant="primary")
            recipe_files = gr.File(label="Recipe files", file_count="multiple", interactive=False)
            cli_md = gr.Markdown()
            recipe_code = gr.Code(language="json", label="recipe.json", interactive=False)
        with gr.Column():
            gr.Markdown("### Pruned model")
            model_btn = gr.Button("Build pruned model (.zip)", variant="primary")
            model_file = gr.File(label="Pruned model", interactive=False)
            model_md = gr.Markdown("The zip holds the full model: about 4 bytes per parameter in float32.")
    recipe_btn.click(
        export_recipe, [session], [recipe_files, recipe_code, cli_md], api_name="export_recipe", **LIGHT
    )
    model_btn.click(export_model, [session], [model_file, model_md], api_name="export_model", **HEAVY)


# ----- hosting: no server paths, bounded disk (issue 9) ---------------------------------------------
def shareable_recipe(recipe):
    """The recipe with uploaded files named by their file name, not their path on this server."""

    def name(path: str | None) -> str | None:
        return Path(path).name if path and Path(path).is_absolute() else path

    calibration = dataclasses.replace(recipe.calibration, path=name(recipe.calibration.path))
    evaluation = dataclasses.replace(
        recipe.evaluation, datasets=tuple(name(d) for d in recipe.evaluation.datasets)
    )
    return dataclasses.replace(recipe, calibration=calibration, evaluation=evaluation)


def check_free_disk(engine: Engine, session: Session) -> None:
    """An export writes the weights, then a zip of them (Gradio serves the zip where it lies): ask
    for room for two copies plus the host's margin before writing anything."""
    weights_mb = engine.info(session)["memory"]["weights_bytes"] / 2**20
    need = 2 * weights_mb + engine.hosting.export_free_mb
    free = free_disk_mb(session.folder("model").parent)
    if free < need:
        raise LimitExceeded(
            f"not enough free disk on the server for an export right now ({free:,.0f} MB free, "
            f"{need:,.0f} MB needed); try again later"
        )


DOWNLOAD_GRACE_S = 3.0


class DeleteAfterDownload:
    """ASGI middleware (``launch(app_kwargs={"middleware": [...]})``): a model zip from
    ``EXPORT_ROOT`` is deleted ``DOWNLOAD_GRACE_S`` after one GET of it has been answered in full
    (status 200, last body chunk sent), unless a new export has replaced it by then. The grace lets
    a client fetch it again at once: ``gradio_client`` fetches a generator's last file output twice.
    A partial or ranged download, a HEAD or a dropped connection keeps it."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        path = exported_model(scope)
        if path is None:
            await self.app(scope, receive, send)
            return
        status = 0

        async def watch(message: dict) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)
            done = message["type"] == "http.response.pathsend" or (
                message["type"] == "http.response.body" and not message.get("more_body", False)
            )
            if done and status == 200 and path.exists():
                downloaded = _signature(path)
                asyncio.get_running_loop().call_later(DOWNLOAD_GRACE_S, _drop, path, downloaded)

        await self.app(scope, receive, watch)


def _signature(path: Path) -> tuple[int, int, int]:
    stat = path.stat()
    return stat.st_ino, stat.st_mtime_ns, stat.st_size


def _drop(path: Path, downloaded: tuple[int, int, int]) -> None:
    """Delete the downloaded zip, not a newer export written to the same name since."""
    try:
        if _signature(path) == downloaded:
            path.unlink()
    except FileNotFoundError:
        pass


def exported_model(scope: dict) -> Path | None:
    """The model zip a request downloads (``GET .../file=<path>``), if it is one of ours."""
    if scope["type"] != "http" or scope["method"] != "GET" or "/file=" not in scope["path"]:
        return None
    path = Path(scope["path"].split("/file=", 1)[1]).resolve()
    inside = path.is_relative_to(EXPORT_ROOT.resolve())
    return path if inside and path.suffix == ".zip" and path.parent.name == "model" else None
