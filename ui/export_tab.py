"""Export: the session's recipe (JSON and YAML, which ``python -m prune --recipe FILE`` reruns) and
the pruned model itself as a zip of a ``save_pretrained`` (safetensors) folder.

A session's export folder holds at most one model zip (a new export replaces it). The zip lies in
Gradio's upload folder (``ui.sessions.EXPORT_ROOT``), so Gradio serves it without a copy of its own;
it is deleted shortly after its download has been sent in full (``DeleteAfterDownload``, for the
page and for API clients alike), else by Gradio's ``delete_cache`` after the session TTL, or when the
session expires."""

from __future__ import annotations

import asyncio
import os
import shutil
import zipfile
from collections.abc import Iterator
from pathlib import Path

import gradio as gr

from evaluation.share import shareable_recipe
from prune.jobs import job_size
from prune.progress import Event, Progress
from runtime.hub import HubError, on_a_space
from ui.common import HEAVY, LIGHT, PROGRESS, user_errors
from ui.engine import Engine
from ui.hosting import DISK
from ui.sessions import EXPORT_ROOT, Session


def _folder(session: Session, what: str) -> Path:
    """A fresh folder per session and kind; the previous export of the same kind is removed."""
    folder = session.folder(what)
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    return folder


def _require_run(session: Session) -> None:
    if session.recipe is None or session.output is None:
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
        recipe = shareable_recipe(session.recipe, engine.hosting.display(session.recipe.model))
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
        folder = _folder(session, "model")
        name = f"{Path(session.recipe.model).name}-pruned-run{session.runs}"
        target = folder / name

        def work(emit):
            def saving(event: Event) -> None:
                emit("progress", (0.6 * event.fraction, event.message))

            write_export(engine, session, target, saving)
            emit("progress", (0.6, "zipping"))
            archive = folder / f"{name}.zip"
            with zipfile.ZipFile(archive, "w", zipfile.ZIP_STORED) as zf:  # safetensors barely compress
                for path in sorted(target.rglob("*")):
                    zf.write(path, Path(name) / path.relative_to(target))
            shutil.rmtree(target)
            return archive

        yield [None, "Saving the pruned model ..."]
        with DISK.reserve(folder, 2 * export_mb(engine, session), engine.hosting.export_free_mb):
            for kind, payload in engine.heavy(session, work, job_size(session.recipe, "export")):
                if kind == "progress":
                    progress(payload[0], desc=payload[1])
        size = payload.stat().st_size / 2**20
        yield [
            str(payload),
            engine.noted(
                session,
                f"**{payload.name}** ({size:.0f} MiB): a save_pretrained folder with "
                "safetensors weights, the tokenizer, recipe.json, pruning_result.json and the model card "
                "(README.md). The server deletes it shortly after it has been downloaded: download it once.",
            ),
        ]

    @user_errors
    def push_model(
        repo: str,
        private: bool,
        session: Session,
        oauth_token: gr.OAuthToken | None,
        progress=PROGRESS,
    ) -> Iterator[str]:
        """Push this session's pruned model to the hub with the visitor's own login (the CLI's
        ``--push-to-hub`` through the same ``Lab.push``)."""
        token = visitor_token(engine, oauth_token)
        repo = check_repo_id(repo)
        _require_run(session)
        engine.check_session(session)
        folder = _folder(session, "push")

        def work(emit):
            def saving(event: Event) -> None:
                emit("progress", (0.9 * event.fraction, event.message))

            with engine.pruned(session):
                lab = engine.lab
                return lab.push(
                    repo,
                    lab.state,
                    session.output,
                    token=token,
                    private=bool(private),
                    folder=folder / Path(session.recipe.model).name,
                    shown=engine.hosting.display(lab.loaded.name),
                    progress=saving,
                )

        yield f"Saving the pruned model, then pushing it to **{repo}** ..."
        try:
            with DISK.reserve(folder, export_mb(engine, session), engine.hosting.export_free_mb):
                for kind, payload in engine.heavy(session, work, job_size(session.recipe, "export")):
                    if kind == "progress":
                        progress(payload[0], desc=payload[1])
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        yield f"Pushed run #{session.runs} with its recipe, result and model card to [{repo}]({payload})."

    return export_recipe, export_model, push_model


def build(engine: Engine, session: gr.State) -> None:
    export_recipe, export_model, push_model = make_handlers(engine)
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
            gr.Markdown("### Push to the Hugging Face Hub")
            if oauth_ready():
                gr.LoginButton()
            gr.Markdown(login_note(engine))
            repo = gr.Textbox(label="Repository (user/name)", placeholder="your-name/smollm2-wanda-50")
            private = gr.Checkbox(label="Private repository", value=True)
            push_btn = gr.Button("Push to the hub", variant="primary")
            push_md = gr.Markdown()
    recipe_btn.click(
        export_recipe, [session], [recipe_files, recipe_code, cli_md], api_name="export_recipe", **LIGHT
    )
    model_btn.click(export_model, [session], [model_file, model_md], api_name="export_model", **HEAVY)
    push_btn.click(push_model, [repo, private, session], [push_md], api_name="push_to_hub", **HEAVY)


# ----- the hub: the visitor's own login -------------------------------------------------------------
LOG_IN_FIRST = "log in with Hugging Face first (the Sign in button above), then push again"


def oauth_ready() -> bool:
    """Whether "Sign in with Hugging Face" works here: a Space with ``hf_oauth: true`` (which gives
    it ``OAUTH_CLIENT_ID``) and Gradio's OAuth extra installed. Elsewhere Gradio's login button would
    need the host's own login and the hub at start, so it is left out."""
    if not (on_a_space() and os.environ.get("OAUTH_CLIENT_ID")):
        return False
    try:
        import authlib  # noqa: F401
        import itsdangerous  # noqa: F401
    except ImportError:
        return False
    return True


def login_note(engine: Engine) -> str:
    if oauth_ready():
        return "Sign in, name a repository and push: the model goes to your account, with your login."
    if engine.hosting.public:
        return "Pushing needs **Sign in with Hugging Face**, which this server does not offer."
    return "Pushes with this machine's Hugging Face login (`hf auth login`), as the CLI's `--push-to-hub`."


def visitor_token(engine: Engine, oauth_token: gr.OAuthToken | None) -> str | None:
    """The token a push uses: the visitor's own login; on a local lab without one, the host's usual
    login (None). A public server never uses the host's token."""
    if oauth_token is not None and oauth_token.token:
        return oauth_token.token
    if engine.hosting.public or oauth_ready():
        raise HubError(LOG_IN_FIRST)
    return None


def check_repo_id(repo: str) -> str:
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    repo = (repo or "").strip()
    try:
        validate_repo_id(repo)
    except HFValidationError:
        raise HubError(f"{repo!r} is not a hub repository name: write it as user/name") from None
    return repo


# ----- hosting: no server paths, bounded disk (issues 9, 19) -----------------------------------------
EXPORT_EXTRA_MB = 16.0  # tokenizer, configs, recipe, result and card beside the weights


def export_mb(engine: Engine, session: Session) -> float:
    """What one written copy of the session's model takes on disk: its weights as saved (the model's
    own dtype) plus the small files."""
    return engine.info(session)["memory"]["weights_bytes"] / 2**20 + EXPORT_EXTRA_MB


def write_export(engine: Engine, session: Session, target: Path, progress: Progress) -> Path:
    """The session's pruned model as ``Lab.export`` writes it (the hub push's folder), named as a
    visitor sees it."""
    with engine.pruned(session):  # any placement: the Lab writes it layer by layer
        lab = engine.lab
        shown = engine.hosting.display(lab.loaded.name)
        return lab.export(target, lab.state, session.output, progress, shown)


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
