"""Additional embeddings: new tokens whose vectors are trained, beside a LoRA ("pivotal tuning")
or alone (training_method EMBEDDING, textual inversion). OneTrainer's keys
(`additional_embeddings`, `embedding_learning_rate`, `preserve_embedding_norm`,
`<text encoder>.train_embedding`, `bundle_additional_embeddings`).

Tokens follow diffusers' textual-inversion convention, so that training, samples and a user's
`pipe.load_textual_inversion(file, token=...)` all read a prompt the same way: a placeholder of
n vectors is the added tokens `<p>`, `<p>_1`, ... `<p>_{n-1}` (transformers' `add_tokens`), and
a prompt's `<p>` is expanded to all of them by diffusers' own `maybe_convert_prompt` (the
sampling pipelines call it themselves). On SDXL both tokenizers get the tokens, and each
embedding has vectors for both text encoders.

The vectors are float32 parameters of their own, not rows of the text encoder's token matrix:
`EmbeddingVectors` replaces the encoder's input embedding and reads ids past the vocabulary
from them. So the model's weights stay untouched (frozen, in their own dtype), the optimizer
holds state for the new vectors only, and a backup stores just them.

Files (the layouts Forge, ComfyUI and diffusers read):
- standalone, one per placeholder: SD 1.5 `{"emb_params": (n, 768)}` (a one-tensor file:
  Forge and ComfyUI take its only tensor, diffusers' `load_textual_inversion(path, token=)`
  too); SDXL `{"clip_l": (n, 768), "clip_g": (n, 1280)}` (Forge's and ComfyUI's SDXL keys;
  diffusers loads each with `load_textual_inversion(sd["clip_l"], token=...,
  text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer)` and the same for clip_g).
- bundled in a LoRA: `bundle_emb.<placeholder>.clip_l` (SD 1.5 and SDXL) / `.clip_g` (SDXL),
  OneTrainer's keys (trainer/embedding_files.py says where the keys come from and which other
  spellings are read).
Forge (checked with its own code, tools/forge_check.py, docs/forge_results.md): a standalone
file in its `embeddings/` folder is registered under its file name -- the prompt says
`<output>-<placeholder>`, not the placeholder -- with the vectors exact (SDXL's clip_l and
clip_g each to its encoder). It does not use the bundled copies: its LoRA loader leaves
`bundle_emb.*` unmatched (and, by its code, applies none of a LoRA with more than 12 unmatched
keys), and the LoRA file in `embeddings/` errors. AUTOMATIC1111 was not checked.
ComfyUI (checked with its own code, tools/comfyui_check.py, docs/comfyui_results.md): its LoRA
loader does not read `bundle_emb.*` ("lora key not loaded"). Its embedding reader does, for a
file in `ComfyUI/models/embeddings/` named in the prompt as `embedding:<file name>`: the LoRA
file itself (every bundled placeholder of the file joined into that one embedding) or the
standalone file (one placeholder each) -- the vectors exact, SDXL's clip_l and clip_g each to
its encoder.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers.loaders.textual_inversion import TextualInversionLoaderMixin
from safetensors.torch import load_file

from trainer.config import EmbeddingConfig, TimeUnit, TrainConfig
from trainer.embedding_files import (ENCODER_KEYS, SD15_FILE_KEY, SD15_FILE_KEYS_READ,
                                     bundle_key, embedding_file_paths)
from trainer.errors import ConfigError
from trainer.io import atomic_save_safetensors

# The text encoders of each family with their tokenizer and their key in SDXL files.
ENCODERS = {"text_encoder": ("tokenizer", ENCODER_KEYS["text_encoder"]),
            "text_encoder_2": ("tokenizer_2", ENCODER_KEYS["text_encoder_2"])}
PAD_TEXT = "*"                # OneTrainer pads a short initial text with '*'

_PROMPTS = TextualInversionLoaderMixin()  # its prompt conversion needs no pipeline


def expand_placeholders(prompts: list[str], tokenizer) -> list[str]:
    """Each placeholder of a multi-vector embedding written out as its tokens (`<p>` ->
    `<p> <p>_1 <p>_2`), exactly as diffusers' pipelines do it before tokenising."""
    return _PROMPTS.maybe_convert_prompt(list(prompts), tokenizer)


def token_names(placeholder: str, count: int) -> list[str]:
    return [placeholder] + [f"{placeholder}_{i}" for i in range(1, count)]


class EmbeddingVectors(torch.nn.Module):
    """A text encoder's token embedding, extended by trained vectors: ids below `first_id` read
    the original matrix (frozen, in its own dtype), ids from `first_id` on read the vectors in
    order (embedding after embedding, token after token)."""

    def __init__(self, base: torch.nn.Embedding, first_id: int):
        super().__init__()
        self.base = base
        self.first_id = first_id
        self.vectors = torch.nn.ParameterList()

    @property
    def weight(self) -> torch.Tensor:
        """The original matrix (code that asks for the input embedding's width reads it)."""
        return self.base.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        new = ids >= self.first_id
        out = self.base(ids.masked_fill(new, 0))
        extra = torch.cat(list(self.vectors))
        index = (ids - self.first_id).clamp(0, extra.shape[0] - 1)
        # torch.where, not an `if new.any()`: no read back to the host on every step
        return torch.where(new[..., None], F.embedding(index, extra).to(out.dtype), out)


@dataclass
class Embedding:
    """One configured embedding: its settings and, per text encoder, its vectors."""
    config: EmbeddingConfig
    index: int
    vectors: dict[str, torch.nn.Parameter] = field(default_factory=dict)  # part -> (n, width)

    @property
    def placeholder(self) -> str:
        return self.config.placeholder

    def key(self, name: str) -> str:
        return f"additional_embeddings[{self.index}].{name}"


class AdditionalEmbeddings:
    """The run's embeddings, added to the tokenizers and text encoders of a loaded family."""

    def __init__(self, family, config: TrainConfig, device: torch.device):
        self.config = config
        self.sdxl = config.model_type.is_sdxl
        self.parts = [p for p in ENCODERS if p in family.parts]
        self.embeddings = [Embedding(c, i) for i, c in enumerate(config.additional_embeddings)]
        self.median_norms: dict[str, torch.Tensor] = {}
        self.frozen: set[int] = set()
        for part in self.parts:
            self._add_to(family, part, device)

    # -- setup --------------------------------------------------------------------------------

    def _add_to(self, family, part: str, device: torch.device) -> None:
        tokenizer = getattr(family.components, ENCODERS[part][0])
        encoder = family.parts[part]
        base = encoder.get_input_embeddings()
        self._check_placeholders(tokenizer, part)
        names = [n for e in self.embeddings for n in token_names(e.placeholder,
                                                                 e.config.token_count)]
        tokenizer.add_tokens(names)
        ids = tokenizer.convert_tokens_to_ids(names)
        if ids != list(range(ids[0], ids[0] + len(ids))):
            raise ConfigError(f"additional_embeddings: the {part}'s tokenizer did not give the "
                              f"new tokens consecutive ids ({ids}).")
        # The tokenizer now reads the captions differently: forget their cached token ids.
        from trainer.models.family import forget_tokenized
        forget_tokenized(tokenizer)
        matrix = base.weight.detach().float()
        self.median_norms[part] = matrix.norm(dim=1).median().to(device)
        wrapper = EmbeddingVectors(base, ids[0])
        train_part = getattr(self.config, part).train_embedding
        for embedding in self.embeddings:
            start = self._starting_vectors(embedding, part, tokenizer, matrix)
            vector = torch.nn.Parameter(start.to(device, torch.float32).clone(),
                                        requires_grad=embedding.config.train and train_part)
            embedding.vectors[part] = vector
            wrapper.vectors.append(vector)
        encoder.set_input_embeddings(wrapper)

    def _check_placeholders(self, tokenizer, part: str) -> None:
        """A placeholder must be a new word: one the tokenizer already reads as a single token
        (`cat`, `sks`) would take over that word in every caption."""
        known = tokenizer.get_vocab()
        for embedding in self.embeddings:
            placeholder = embedding.placeholder
            if (placeholder in known or len(tokenizer.tokenize(placeholder)) == 1
                    or placeholder in tokenizer.added_tokens_encoder):
                raise ConfigError(f"{embedding.key('placeholder')}: '{placeholder}' is already "
                                  f"a word in the {part}'s vocabulary; choose a new word such "
                                  "as <mychar>.")

    def _starting_vectors(self, embedding: Embedding, part: str, tokenizer,
                          matrix: torch.Tensor) -> torch.Tensor:
        count = embedding.config.token_count
        if embedding.config.model_name:
            vectors = read_vectors(embedding.config.model_name, part, self.sdxl,
                                   embedding.key("model_name"))
            if vectors.shape != (count, matrix.shape[1]):
                raise ConfigError(f"{embedding.key('model_name')}: the file's {part} vectors are "
                                  f"{tuple(vectors.shape)}, this embedding needs ({count}, "
                                  f"{matrix.shape[1]}); set token_count to {vectors.shape[0]}.")
            return vectors.float()
        # OneTrainer's start: the initial text's token embeddings, cut or padded with '*'
        ids = tokenizer(embedding.config.initial_embedding_text,
                        add_special_tokens=False).input_ids[:count]
        pad = tokenizer(PAD_TEXT, add_special_tokens=False).input_ids[0]
        ids = ids + [pad] * (count - len(ids))
        return matrix[torch.tensor(ids)]

    # -- training -----------------------------------------------------------------------------

    def trained(self) -> list[torch.nn.Parameter]:
        return [v for e in self.embeddings for v in e.vectors.values() if v.requires_grad]

    def named_trained(self) -> dict[str, torch.nn.Parameter]:
        """Backup names of the trained vectors."""
        return {f"embeddings/{e.index}/{part}": v for e in self.embeddings
                for part, v in e.vectors.items() if v.requires_grad}

    def encoders_with_trained_vectors(self) -> list[str]:
        return [p for p in self.parts if any(e.vectors[p].requires_grad for e in self.embeddings)]

    def freeze_finished(self, epoch: int, step: int) -> None:
        """'stop training after' per embedding, counted like the model parts'."""
        for embedding in self.embeddings:
            if embedding.index not in self.frozen and stop_reached(embedding.config, epoch, step):
                self.frozen.add(embedding.index)
                for vector in embedding.vectors.values():
                    vector.requires_grad_(False)

    @torch.no_grad()
    def preserve_norms(self) -> None:
        """OneTrainer's preserve_embedding_norm: every trained vector rescaled to the median
        norm of its text encoder's vocabulary, after each optimizer step."""
        for embedding in self.embeddings:
            if embedding.index in self.frozen or not embedding.config.train:
                continue
            for part, vector in embedding.vectors.items():
                if vector.requires_grad:
                    norms = vector.norm(dim=1, keepdim=True).clamp_min(1e-12)
                    vector.mul_(self.median_norms[part] / norms)

    # -- files --------------------------------------------------------------------------------

    def file_tensors(self, embedding: Embedding, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """The standalone file's tensors of one embedding."""
        if not self.sdxl:
            return {SD15_FILE_KEY: _cpu(embedding.vectors["text_encoder"], dtype)}
        return {ENCODERS[p][1]: _cpu(v, dtype) for p, v in embedding.vectors.items()}

    def bundle_tensors(self, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """Every embedding as the `bundle_emb.*` keys a LoRA file carries."""
        out = {}
        for embedding in self.embeddings:
            for part, vector in embedding.vectors.items():
                out[bundle_key(embedding.placeholder, part)] = _cpu(vector, dtype)
        return out

    def file_paths(self, output: Path) -> list[Path]:
        """Where each embedding's own file goes (trainer/embedding_files.py's rule)."""
        return [path for _, path in embedding_file_paths(self.config, Path(output))]

    def save_files(self, output: Path, dtype: torch.dtype, metadata: dict[str, str]) -> list[Path]:
        """One standalone file per embedding (atomically), beside `output`."""
        architecture = ("stable-diffusion-xl-v1-base" if self.sdxl
                        else "stable-diffusion-v1") + "/textual-inversion"
        paths = self.file_paths(Path(output))
        for embedding, path in zip(self.embeddings, paths):
            header = {**metadata, "modelspec.architecture": architecture,
                      "modelspec.title": embedding.placeholder,
                      "atelier_placeholder": embedding.placeholder,
                      "atelier_token_count": str(embedding.config.token_count)}
            atomic_save_safetensors(self.file_tensors(embedding, dtype), path, header)
        return paths


def _cpu(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return tensor.detach().to("cpu", dtype).contiguous()


def stop_reached(settings, epoch: int, step: int) -> bool:
    unit, after = settings.stop_training_after_unit, settings.stop_training_after
    if after is None or unit == TimeUnit.NEVER:
        return False
    return (epoch if unit == TimeUnit.EPOCH else step) >= after


def read_vectors(path: str, part: str, sdxl: bool, key: str, access=None) -> torch.Tensor:
    """An embedding file's vectors for `part`, from any of the layouts written above (and
    the flattened `string_to_param.*` of WebUI `.pt` embeddings, a one-tensor diffusers file).

    Confinement comes before existence: with `access` (trainer/ownership.py; the job queue
    checks every config at submit the same way) a path the caller may not read is refused
    with the same sentence whether it exists or not, and only then is the file looked at."""
    if access is not None:
        from trainer.security import check_path
        check_path(access, key, path, purpose="embeddings are read from the workspace")
    if not str(path).endswith(".safetensors"):
        raise ConfigError(f"{key}: '{path}' is not a .safetensors file (pickled embeddings "
                          "are not loaded).")
    if not Path(path).is_file():
        raise ConfigError(f"{key}: '{path}' is not a file.")
    tensors = load_file(str(path))
    if sdxl:
        name = ENCODERS[part][1]
        if name not in tensors:
            raise ConfigError(f"{key}: '{path}' has no '{name}' vectors (an SDXL embedding has "
                              "clip_l and clip_g).")
        return tensors[name]
    for name in SD15_FILE_KEYS_READ:
        if name in tensors:
            return tensors[name]
    if len(tensors) == 1:
        return next(iter(tensors.values()))
    raise ConfigError(f"{key}: '{path}' is not an SD 1.5 embedding (no emb_params, "
                      "emp_params or string_to_param.*).")
