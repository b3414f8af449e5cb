"""The page's "Publish to the Hugging Face Hub" panel: an output of the visitor's, a repo id,
private or public, and a token; trainer.publish builds the model card and uploads.

Only the outputs the visitor may read are listed and published (on a shared server: their own
jobs' outputs; an admin's: all), listed when their page loads, never baked into the page.

The token typed here goes to the upload and nowhere else (not the disk, the logs or the
messages: trainer.publish scrubs them). The server's own token (HF_TOKEN, a Space secret, or
its saved login) is used without one typed only where it cannot publish under someone else's
name: a local start (the owner's own), or a shared server behind a login (--auth) for repos
under the namespaces it names (--publish-namespace; on a Space, its owner). Anywhere else a
visitor types their own.
"""
from __future__ import annotations

import gradio as gr

from trainer.errors import AtelierError
from trainer.ownership import Access
from trainer.publish import check_server_namespace, config_path, publish
from ui import paths, state
from ui.files import message_html, readable


def _access(access: Access | None) -> Access:
    return access if access is not None else state.access()


def outputs(access: Access | None = None) -> list[tuple[str, str]]:
    """(label, path) of the outputs the visitor may read (a file or diffusers folder with its
    config beside it, as every run writes), the newest first."""
    access = _access(access)
    root = paths.workspace_root()
    if not root.is_dir():
        return []
    found = []
    for config in root.rglob("*.json"):
        relative = config.relative_to(root).parts
        if any(part.startswith(".") or part == "backup" for part in relative[:-1]):
            continue
        for output in (config.with_suffix(".safetensors"), config.with_suffix("")):
            if output != config and output.exists() and config_path(output) == config and (
                    output.is_file() or (output / "model_index.json").is_file()) and (
                    access.can_read(output) and access.can_read(config)):
                found.append(output)
    found.sort(key=lambda p: p.stat().st_mtime, reverse=True)
    return [(str(p.relative_to(root)), str(p)) for p in found]


def refresh(current: str | None = None, access: Access | None = None) -> dict:
    choices = outputs(access)
    values = [value for _, value in choices]
    return {"output": gr.update(choices=choices,
                                value=current if current in values else
                                (values[0] if values else None))}


def server_token_allowed() -> bool:
    """Whether the server's own token may be used at all (for some repo) without a typed
    one: a local start, or a shared server behind a login."""
    return not state.OPTIONS.shared or state.OPTIONS.login


def check_server_token(repo_id: str) -> None:
    """AtelierError unless the server's own token may publish to `repo_id`."""
    if not server_token_allowed():
        raise AtelierError("Type your Hugging Face token (one with write access, from "
                           "https://huggingface.co/settings/tokens): this shared server has "
                           "no login, so it does not publish with its own.")
    if state.OPTIONS.shared:
        check_server_namespace(repo_id, state.OPTIONS.publish_namespaces)


def publish_output(output: str | None, repo_id: str, private: bool, token: str,
                   progress=None, access: Access | None = None) -> dict:
    def refuse(text: str) -> dict:
        return {"message": message_html(text, ok=False)}

    access = _access(access)
    if not output:
        return refuse("No output chosen: train a model first, then press Refresh.")
    token = (token or "").strip()
    repo_id = (repo_id or "").strip()
    try:
        path = readable(output, "output", access)
        if not token:
            check_server_token(repo_id)
        url = publish(path, repo_id, private=bool(private), token=token or None,
                      on_status=progress or (lambda message: None), may_read=access.can_read)
    except AtelierError as error:
        return refuse(str(error))
    return {"message": message_html(f"Published {path.name} to {url}"
                                    + (" (private)." if private else "."))}


def token_hint() -> str:
    if not server_token_allowed():
        return "hf_… (required here)"
    if not state.OPTIONS.shared:
        return "empty: the server's HF_TOKEN"
    names = state.OPTIONS.publish_namespaces
    if not names:
        return "hf_… (required here)"
    return f"empty: the server's token, for repos under {', '.join(names)} only"


def build_panel():
    """Draw the panel and bind its events. Returns (fn, outputs) for the page's load event:
    the visitor's own outputs, listed when their page opens."""
    first = refresh(None) if not state.OPTIONS.shared else {
        "output": {"choices": [], "value": None}}
    with gr.Accordion("Publish to the Hugging Face Hub", open=False,
                      elem_id="section-publish"):
        with gr.Row(equal_height=True):
            output = gr.Dropdown(label="Output", choices=first["output"]["choices"],
                                 value=first["output"]["value"], scale=4,
                                 elem_id="publish-output",
                                 info="A model one of your runs wrote (with its config beside "
                                      "it), the newest first.")
            refresh_btn = gr.Button("Refresh", elem_id="publish-refresh", scale=0,
                                    min_width=90)
        with gr.Row(equal_height=True):
            repo_id = gr.Textbox(label="Repo id", placeholder="your-name/my-lora", max_lines=1,
                                 elem_id="publish-repo", scale=3)
            private = gr.Checkbox(label="Private", value=True, elem_id="publish-private",
                                  scale=1)
            token = gr.Textbox(label="Token", type="password", max_lines=1,
                               elem_id="publish-token", scale=3, placeholder=token_hint(),
                               info="Used for this upload only; never stored.")
        run = gr.Button("Publish", variant="primary", elem_id="publish-run")
        gr.Markdown("Uploads the model, its config, its samples and a model card (README.md) "
                    "that says how to load it in diffusers, ComfyUI and A1111/Forge.")
        message = gr.HTML(elem_id="publish-message")

    def listed(current, request: gr.Request):
        return refresh(current, state.access(request))["output"]

    refresh_btn.click(listed, output, output, api_name="publish_refresh",
                      show_progress="hidden")

    def run_publish(output_path, repo, is_private, typed, request: gr.Request,
                    progress=gr.Progress()):  # noqa: B008
        def status(text: str) -> None:
            progress(0.5, desc=text)
        return publish_output(output_path, repo, is_private, typed, status,
                              access=state.access(request))["message"]

    # Through the API too, the server's own token follows check_server_token().
    run.click(run_publish, [output, repo_id, private, token], message, api_name="publish",
              concurrency_limit=1)

    def on_load(request: gr.Request):
        return listed(None, request)
    return on_load, [output]
