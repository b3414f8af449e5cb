"""The page's "Publish to the Hugging Face Hub" panel: an output of the workspace, a repo id,
private or public, and a token; trainer.publish builds the model card and uploads.

The token typed here goes to the upload and nowhere else (not the disk, the logs or the
messages: trainer.publish scrubs them). The server's own token (HF_TOKEN, a Space secret, or
its saved login) is used only where every visitor is trusted with it: a local start, or a
shared server behind a login (--auth). On an open shared server a visitor types their own:
otherwise anyone could publish under the owner's account.
"""
from __future__ import annotations

from pathlib import Path

import gradio as gr

from trainer.errors import AtelierError
from trainer.publish import config_path, publish
from ui import paths, state
from ui.files import check_allowed, message_html


def outputs() -> list[tuple[str, str]]:
    """(label, path) of the workspace's outputs (a file or diffusers folder with its config
    beside it, as every run writes), the newest first."""
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
                    output.is_file() or (output / "model_index.json").is_file()):
                found.append(output)
    found.sort(key=lambda p: p.stat().st_mtime, reverse=True)
    return [(str(p.relative_to(root)), str(p)) for p in found]


def refresh(current: str | None = None) -> dict:
    choices = outputs()
    values = [value for _, value in choices]
    return {"output": gr.update(choices=choices,
                                value=current if current in values else
                                (values[0] if values else None))}


def server_token_allowed() -> bool:
    return not state.OPTIONS.shared or state.OPTIONS.login


def publish_output(output: str | None, repo_id: str, private: bool, token: str,
                   progress=None) -> dict:
    def refuse(text: str) -> dict:
        return {"message": message_html(text, ok=False)}

    if not output:
        return refuse("No output chosen: train a model first, then press Refresh.")
    token = (token or "").strip()
    if not token and not server_token_allowed():
        return refuse("Type your Hugging Face token (one with write access, from "
                      "https://huggingface.co/settings/tokens): this shared server has no "
                      "login, so it does not publish with its own.")
    try:
        path = check_allowed(Path(output))
        url = publish(path, (repo_id or "").strip(), private=bool(private), token=token or None,
                      on_status=progress or (lambda message: None))
    except AtelierError as error:
        return refuse(str(error))
    return {"message": message_html(f"Published {path.name} to {url}"
                                    + (" (private)." if private else "."))}


def build_panel() -> None:
    first = refresh(None)
    with gr.Accordion("Publish to the Hugging Face Hub", open=False,
                      elem_id="section-publish"):
        with gr.Row(equal_height=True):
            output = gr.Dropdown(label="Output", choices=first["output"]["choices"],
                                 value=first["output"]["value"], scale=4,
                                 elem_id="publish-output",
                                 info="A model a run wrote (with its config beside it), the "
                                      "newest first.")
            refresh_btn = gr.Button("Refresh", elem_id="publish-refresh", scale=0,
                                    min_width=90)
        with gr.Row(equal_height=True):
            repo_id = gr.Textbox(label="Repo id", placeholder="your-name/my-lora", max_lines=1,
                                 elem_id="publish-repo", scale=3)
            private = gr.Checkbox(label="Private", value=True, elem_id="publish-private",
                                  scale=1)
            token = gr.Textbox(label="Token", type="password", max_lines=1,
                               elem_id="publish-token", scale=3,
                               placeholder="hf_…" if not server_token_allowed() else
                               "empty: the server's HF_TOKEN",
                               info="Used for this upload only; never stored.")
        run = gr.Button("Publish", variant="primary", elem_id="publish-run")
        gr.Markdown("Uploads the model, its config, its samples and a model card (README.md) "
                    "that says how to load it in diffusers, ComfyUI and A1111/Forge.")
        message = gr.HTML(elem_id="publish-message")

    refresh_btn.click(lambda current: refresh(current)["output"], output, output,
                      api_name="publish_refresh", show_progress="hidden")

    def run_publish(output_path, repo, is_private, typed, progress=gr.Progress()):  # noqa: B008
        def status(text: str) -> None:
            progress(0.5, desc=text)
        return publish_output(output_path, repo, is_private, typed, status)["message"]

    # Through the API too, the server's own token follows server_token_allowed().
    run.click(run_publish, [output, repo_id, private, token], message, api_name="publish",
              concurrency_limit=1)
