"""What Stable Diffusion WebUI Forge reads of Atelier's embedding files, shown by Forge's own code.

    python tools/forge_check.py --forge GIT_DIR --model TINY_MODEL_DIR --family sd15|sdxl
                                FILE [FILE ...] [--bundled-in LORA] [--json | --markdown]

Each FILE is put alone in an embeddings folder and read as Forge reads its `embeddings/` folder
for a model: Forge's own `EmbeddingDatabase` (backend/text_processing/textual_inversion.py,
taken from the Forge git mirror with `git show` into a temporary folder and imported unchanged)
with `add_embedding_dir` + `load_textual_inversion_embeddings`, once per text encoder as Forge's
`ClassicTextProcessingEngine` builds it (SD 1.5: CLIP-L; SDXL: one database for CLIP-L, one for
CLIP-G, each with its own tokenizer, reading the same folder). Reported per file: registered,
skipped (Forge's shape check) or errored (and Forge's reason), the name it is registered under,
whether a prompt that says that name finds it and one that says the placeholder does not (Forge's
`find_embedding_at_position`, walked over the prompt's tokens as its `tokenize_line` walks them),
the vector count Forge inserts, and whether the vectors Forge inserts per encoder equal the ones
Atelier stored in the file (and, with --bundled-in, the LoRA's `bundle_emb.*` copies) exactly.

A LoRA file is also run through the key matching of Forge's LoRA loader (the `load_lora` of
packages_3rdparty/comfyui_lora_collection/lora.py, which backend/patcher/lora.py picks: the
webui collection has none), given every adapter module of the file as a model key -- the best
case -- to show which keys it can never use.

Expected shape: Forge does not read it from the model; its engines pass constants, the width of
the embedding a model takes: 768 for SD 1.5 (CLIP-L), 2048 for SDXL (CLIP-L 768 + CLIP-G 1280,
the sum `create_embedding_from_data` computes for a clip_l/clip_g file). The tiny test models are
narrower, so the same rule is applied to their widths (`forge_expected_shape`).

Everything above the Forge section is plain torch and is unit-tested without Forge
(tests/test_forge_check.py). How docs/forge_results.md was made is written there.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass, field

import torch

# ---------------------------------------------------------------------------------------------
# Forge's rules, as facts (read from its code at the commit in docs/forge_results.md)
# ---------------------------------------------------------------------------------------------

ENCODERS = {"sd15": ("clip_l",), "sdxl": ("clip_l", "clip_g")}
REAL_WIDTHS = {"clip_l": 768, "clip_g": 1280}  # the widths Forge's constants come from
BUNDLE_PREFIX = "bundle_emb."
SD15_KEY = "emb_params"
# load_lora_for_models gives up on a whole LoRA when more keys than this are left unmatched.
FORGE_UNMATCHED_LIMIT = 12


def forge_expected_shape(family: str, widths: dict[str, int]) -> int:
    """The width Forge's engines require of an embedding: CLIP-L's for SD 1.5, CLIP-L's plus
    CLIP-G's for SDXL (Forge's constants 768 and 2048 for the real models)."""
    return sum(widths[encoder] for encoder in ENCODERS[family])


def vectors_used(vec, encoder: str) -> torch.Tensor:
    """What Forge's text encoder inserts for an embedding: the encoder's entry of an SDXL
    embedding's dict, or the one tensor of any other."""
    return vec[encoder] if isinstance(vec, dict) else vec


def stored_vectors(tensors: dict[str, torch.Tensor], encoder: str) -> torch.Tensor | None:
    """The vectors Atelier stored in a standalone file for one encoder: `clip_l`/`clip_g`
    (SDXL), `emb_params` (SD 1.5's one encoder); None for a file with neither (a LoRA)."""
    if encoder in tensors:
        return tensors[encoder]
    if encoder == "clip_l" and SD15_KEY in tensors:
        return tensors[SD15_KEY]
    return None


def bundled_vectors(tensors: dict[str, torch.Tensor], placeholder: str,
                    encoder: str) -> torch.Tensor | None:
    """A LoRA file's bundled copy of one placeholder's vectors for one encoder."""
    return tensors.get(f"{BUNDLE_PREFIX}{placeholder}.{encoder}")


def compare(used: torch.Tensor | None, stored: torch.Tensor | None) -> dict:
    """Forge's vectors against Atelier's: exact only when the shapes match and every value is
    equal once both are float32 (Forge converts every embedding to float32 on reading)."""
    if used is None or stored is None:
        return {"exact": False, "reason": "no vectors" if used is None else "nothing stored"}
    if tuple(used.shape) != tuple(stored.shape):
        return {"exact": False, "reason": f"shape {tuple(used.shape)} vs {tuple(stored.shape)}"}
    difference = (used.float() - stored.float()).abs().max().item() if used.numel() else 0.0
    return {"exact": bool(torch.equal(used.float(), stored.float())),
            "max_abs_difference": difference}


def embeddings_in_prompt(database, token_ids: list[int]) -> list[str]:
    """The names of the embeddings Forge finds in a prompt's tokens, walking them as its
    tokenize_line does: at each position the longest registered name that starts there."""
    found, position = [], 0
    while position < len(token_ids):
        embedding, length = database.find_embedding_at_position(token_ids, position)
        if embedding is None:
            position += 1
            continue
        found.append(embedding.name)
        position += length
    return found


def unmatched_lora_keys(remaining: dict) -> dict:
    """What Forge's load_lora_for_models does with the keys its matching left: over
    FORGE_UNMATCHED_LIMIT it applies none of the LoRA; otherwise it logs them and applies the
    rest."""
    keys = sorted(remaining)
    return {"unmatched": keys, "bundle_keys_unmatched": [k for k in keys
                                                         if k.startswith(BUNDLE_PREFIX)],
            "lora_applied": len(keys) <= FORGE_UNMATCHED_LIMIT}


@dataclass
class FileReport:
    file: str
    kind: str                          # standalone / LoRA with bundled embeddings
    status: str = ""                   # registered / skipped / errored (per encoder, joined)
    reason: str = ""
    name: str = ""                     # what the prompt must say
    prompt_finds_name: bool = False
    prompt_finds_placeholder: bool = False
    placeholder: str = ""
    vectors: int | None = None
    exact: dict = field(default_factory=dict)          # encoder -> compare() against the file
    exact_bundle: dict = field(default_factory=dict)   # encoder -> compare() against the LoRA
    lora_loader: dict = field(default_factory=dict)    # unmatched_lora_keys() of a LoRA file

    def vectors_cell(self) -> str:
        if not self.exact:
            return "–"
        cells = []
        for encoder, result in self.exact.items():
            text = "exact" if result["exact"] else f"differs ({result.get('reason') or 'values'})"
            bundle = self.exact_bundle.get(encoder)
            if bundle is not None:
                text += ", = LoRA's bundle_emb" if bundle["exact"] else ", ≠ LoRA's bundle_emb"
            cells.append(f"{encoder}: {text}")
        return "; ".join(cells)


def table(rows: list[tuple[str, FileReport]]) -> str:
    """The markdown table of docs/forge_results.md: one row per (label, report)."""
    lines = ["| File | Forge | Registered as (prompt says) | Name in prompt found / "
             "placeholder found | Vectors | Vectors equal Atelier's |",
             "| --- | --- | --- | --- | --- | --- |"]
    for label, r in rows:
        status = r.status + (f": {r.reason}" if r.reason else "")
        if r.lora_loader:
            loader = r.lora_loader
            status += (f"; as a LoRA (models/Lora) its {len(loader['bundle_keys_unmatched'])} "
                       f"bundle_emb keys are left unmatched")
        name = f"`{r.name}`" if r.status.startswith("registered") else "–"
        finds = (f"{'yes' if r.prompt_finds_name else 'no'} / "
                 f"{'yes' if r.prompt_finds_placeholder else 'no'}"
                 if r.status.startswith("registered") else "–")
        vectors = str(r.vectors) if r.vectors is not None else "–"
        lines.append(f"| {label} | {status} | {name} | {finds} | {vectors} | "
                     f"{r.vectors_cell()} |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Forge's own code, taken from its git mirror
# ---------------------------------------------------------------------------------------------

TEXTUAL_INVERSION = "backend/text_processing/textual_inversion.py"
LORA_MATCHING = ("packages_3rdparty/comfyui_lora_collection/lora.py",
                 "packages_3rdparty/comfyui_lora_collection/utils.py")


def forge_commit(git_dir: str) -> str:
    return subprocess.run(["git", "--git-dir", git_dir, "rev-parse", "HEAD"], check=True,
                          capture_output=True, text=True).stdout.strip()


def extract(git_dir: str, paths, dest: str) -> None:
    """Forge's files as they are at HEAD, written under `dest` (never into this repository)."""
    for path in paths:
        text = subprocess.run(["git", "--git-dir", git_dir, "show", f"HEAD:{path}"], check=True,
                              capture_output=True).stdout
        target = os.path.join(dest, path)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        with open(target, "wb") as f:
            f.write(text)


def import_forge(git_dir: str, dest: str):
    """Forge's textual_inversion module and its LoRA key matching, imported from `dest`."""
    import importlib
    extract(git_dir, (TEXTUAL_INVERSION, *LORA_MATCHING), dest)
    sys.path.insert(0, dest)
    try:
        textual_inversion = importlib.import_module("backend.text_processing.textual_inversion")
        lora = importlib.import_module("packages_3rdparty.comfyui_lora_collection.lora")
    finally:
        sys.path.remove(dest)
    return textual_inversion, lora


def load_model_parts(model_dir: str, family: str):
    """The tokenizers and text-encoder widths of a (tiny) diffusers model folder."""
    from transformers import CLIPTokenizer
    folders = {"clip_l": ("tokenizer", "text_encoder"), "clip_g": ("tokenizer_2", "text_encoder_2")}
    tokenizers, widths = {}, {}
    for encoder in ENCODERS[family]:
        tokenizer_dir, encoder_dir = folders[encoder]
        tokenizers[encoder] = CLIPTokenizer.from_pretrained(os.path.join(model_dir, tokenizer_dir))
        with open(os.path.join(model_dir, encoder_dir, "config.json"), encoding="utf-8") as f:
            widths[encoder] = json.load(f)["hidden_size"]
    return tokenizers, widths


def placeholder_of(tensors: dict, metadata: dict) -> str:
    """The placeholder a user trained: Atelier's header, or a LoRA's first bundled one."""
    if metadata.get("atelier_placeholder"):
        return metadata["atelier_placeholder"]
    for key in tensors:
        if key.startswith(BUNDLE_PREFIX):
            return key[len(BUNDLE_PREFIX):].rpartition(".")[0]
    return ""


def check_file(forge_ti, forge_lora, family: str, tokenizers: dict, widths: dict, path: str,
               bundled_in: str | None = None) -> FileReport:
    from safetensors import safe_open
    with safe_open(path, "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        metadata = f.metadata() or {}
    is_lora = any(k.startswith(BUNDLE_PREFIX) for k in tensors)
    report = FileReport(file=path, kind="LoRA with bundled embeddings" if is_lora
                        else "standalone", placeholder=placeholder_of(tensors, metadata))
    bundle = {}
    if bundled_in:
        from safetensors.torch import load_file
        bundle = load_file(bundled_in)
    expected_shape = forge_expected_shape(family, widths)
    statuses = []
    with tempfile.TemporaryDirectory() as folder:
        shutil.copy(path, folder)  # the file alone in an embeddings folder, as a user puts it
        filename = os.path.basename(path)
        name = os.path.splitext(filename)[0]
        for encoder in ENCODERS[family]:
            tokenizer = tokenizers[encoder]
            database = forge_ti.EmbeddingDatabase(tokenizer, expected_shape)
            database.add_embedding_dir(folder)
            printed = io.StringIO()
            with contextlib.redirect_stdout(printed):
                database.load_textual_inversion_embeddings()
            if name in database.word_embeddings:
                embedding = database.word_embeddings[name]
                statuses.append("registered")
                report.name = name
                report.vectors = int(embedding.vectors)
                ids = lambda text: tokenizer([text], truncation=False,
                                             add_special_tokens=False)["input_ids"][0]
                report.prompt_finds_name = name in embeddings_in_prompt(
                    database, ids(f"a photo of {name}"))
                report.prompt_finds_placeholder = bool(report.placeholder) and bool(
                    embeddings_in_prompt(database, ids(f"a photo of {report.placeholder}")))
                used = vectors_used(embedding.vec, encoder)
                report.exact[encoder] = compare(used, stored_vectors(tensors, encoder))
                if bundle:
                    report.exact_bundle[encoder] = compare(
                        used, bundled_vectors(bundle, report.placeholder, encoder))
            elif name in database.skipped_embeddings:
                skipped = database.skipped_embeddings[name]
                statuses.append("skipped")
                report.reason = (f"width {skipped.shape}, the model's engine expects "
                                 f"{expected_shape}")
            else:
                statuses.append("errored")
                report.reason = forge_reason(forge_ti, tensors, name, filename, printed.getvalue())
    report.status = statuses[0] if len(set(statuses)) == 1 else ", ".join(statuses)
    if family == "sdxl" and len(set(statuses)) == 1:
        report.status += " (both encoders' databases)"
    if is_lora:
        _, remaining = forge_lora.load_lora(tensors, best_case_key_map(tensors))
        report.lora_loader = unmatched_lora_keys(remaining)
    return report


def forge_reason(forge_ti, tensors: dict, name: str, filename: str, printed: str) -> str:
    """Why Forge's folder loader dropped a file: it prints only `Error loading embedding`; the
    reason is the exception of its own create_embedding_from_data on the same data."""
    try:
        forge_ti.create_embedding_from_data(tensors, name, filename=filename)
    except Exception as error:  # Forge raises bare Exception / AssertionError
        return f"{printed.strip()!r}: {type(error).__name__}: {error}"
    return printed.strip() or "not registered"


def best_case_key_map(tensors: dict) -> dict:
    """Every adapter module prefix of a LoRA file as if the model had it (Forge's key map maps
    a file prefix to a model weight): the most Forge's matching could ever take from the file."""
    prefixes = set()
    for key in tensors:
        if key.startswith(BUNDLE_PREFIX):
            continue
        for suffix in (".lora_down.weight", ".lora_up.weight", ".alpha", ".dora_scale"):
            if key.endswith(suffix):
                prefixes.add(key[:-len(suffix)])
    return {prefix: f"{prefix}.weight" for prefix in prefixes}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--forge", required=True, help="Forge's bare git mirror (git dir)")
    parser.add_argument("--model", required=True, help="the diffusers model folder trained on "
                        "(its tokenizers and text-encoder widths)")
    parser.add_argument("--family", required=True, choices=sorted(ENCODERS))
    parser.add_argument("--bundled-in", help="a LoRA whose bundle_emb copies the standalone "
                        "files should equal")
    parser.add_argument("files", nargs="+", help="Atelier's embedding or LoRA files")
    output = parser.add_mutually_exclusive_group()
    output.add_argument("--json", action="store_true")
    output.add_argument("--markdown", action="store_true", help="the results table's rows")
    args = parser.parse_args(argv)
    tokenizers, widths = load_model_parts(args.model, args.family)
    with tempfile.TemporaryDirectory() as dest:
        forge_ti, forge_lora = import_forge(args.forge, dest)
        reports = [check_file(forge_ti, forge_lora, args.family, tokenizers, widths, path,
                              None if path == args.bundled_in else args.bundled_in)
                   for path in args.files]
    commit = forge_commit(args.forge)
    if args.json:
        print(json.dumps({"forge_commit": commit, "family": args.family,
                          "expected_shape": forge_expected_shape(args.family, widths),
                          "files": [asdict(r) for r in reports]}, indent=1))
    elif args.markdown:
        print(table([(f"{args.family} `{os.path.basename(r.file)}`", r) for r in reports]))
    else:
        print(f"Forge {commit}, {args.family}, expected shape "
              f"{forge_expected_shape(args.family, widths)}")
        for r in reports:
            print(json.dumps(asdict(r), default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
