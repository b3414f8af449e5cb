"""Chroma (lodestones' Flux.1-schnell derivative): ChromaTransformer2DModel conditioned on T5's
hidden states alone (OneTrainer's `text_encoder`), trained by flow matching on 2x2-packed
latents, like Flux.1 (flux.py: packing and position ids come from there).

What is Chroma about it:
- T5 reads the caption with its tokenizer's attention mask (real tokens and the end token), at
  `text_encoder_sequence_length` tokens (OneTrainer's key and default, 512).
- The transformer masks the text's padding in its joint text+image attention, except the first
  padding token, which Chroma was trained to see; every image token is visible. This mask is
  always on, as in OneTrainer (the `transformer.attention_mask` switch is Flux's and SD 3's).
  Text positions that every caption of a batch masks are cut off before the transformer (the
  result is the same; 512 tokens cost far more than the ~20 a caption has), as OneTrainer does.
- The time input is σ (timestep / 1000); no guidance or pooled-text input: Chroma's
  "distilled guidance" layer computes every block's modulation from the time alone.
- Samples use diffusers' ChromaPipeline with the mask as a real (boolean) mask: diffusers
  0.42.1 hands it to attention as 0/1 floats, which attention adds to its scores instead of
  masking (diffusers issues #12116, #13619). A DIFFUSERS folder export is the plain pipeline.
"""
from __future__ import annotations

import warnings
from contextlib import contextmanager
from types import SimpleNamespace

import torch
from diffusers import ChromaPipeline, ChromaTransformer2DModel, FlowMatchEulerDiscreteScheduler
from transformers import T5EncoderModel, T5TokenizerFast

from trainer.models.family import compute_dtype_of, tokenize
from trainer.models.flow_family import FlowFamily, FlowSpec
from trainer.models.flux import image_ids, pack, unpack
from trainer.models.transformer_layouts import CHROMA

CHROMA_SPEC = FlowSpec(
    name="Chroma",
    pipeline_class=ChromaPipeline,
    pipeline_names=("ChromaPipeline",),
    transformer_class=ChromaTransformer2DModel,
    text_encoders={"text_encoder": T5EncoderModel},
    tokenizers={"tokenizer": T5TokenizerFast},
    layout=CHROMA,
)

# diffusers 0.42.1 builds Chroma's rotary embedding through an alias it has deprecated itself:
# a FutureWarning on every load that no caller can act on (and the tests turn into an error).
POS_EMBED_WARNING = "`FluxPosEmbed` is deprecated"

# ChromaPipeline refuses a longer `max_sequence_length`.
PIPELINE_MAX_SEQUENCE_LENGTH = 512
# OneTrainer rounds a cut text sequence up to a multiple of this where a mask is needed anyway
# (attention kernels and torch.compile prefer even lengths).
SEQUENCE_ROUNDING = 16


@contextmanager
def quiet_pos_embed_warning():
    """Silence exactly diffusers' `FluxPosEmbed` deprecation while a Chroma model is built."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=POS_EMBED_WARNING, category=FutureWarning)
        yield


def transformer_text_mask(token_ids: torch.Tensor, pad_token_id: int) -> torch.Tensor:
    """[B, L] bool: the text tokens the transformer sees. T5 pads only at the end, so the
    tokenizer's mask is `ids != pad`; Chroma also sees the first padding token (as
    ChromaPipeline builds it: positions up to and including the caption's length)."""
    lengths = (token_ids != pad_token_id).sum(dim=1, keepdim=True)
    positions = torch.arange(token_ids.shape[1], device=token_ids.device)[None]
    return positions <= lengths


def cut_padding(hidden: torch.Tensor, mask: torch.Tensor):
    """(hidden, mask) without the text positions that every sample masks, and the mask
    None where nothing is left to mask."""
    lengths = mask.sum(dim=1).tolist()  # the one host read: the cut is a shape
    keep = max(lengths)
    if min(lengths) == keep:
        return hidden[:, :keep], None
    keep = min(-(-keep // SEQUENCE_ROUNDING) * SEQUENCE_ROUNDING, mask.shape[1])
    return hidden[:, :keep], mask[:, :keep]


class CheckpointedBlockMask:
    """diffusers 0.42.1's ChromaTransformer2DModel calls its single blocks without the
    attention mask when gradient checkpointing is on (the double blocks get it), so padding
    would leak into half of the model exactly in the runs that checkpoint. A pre-hook on each
    single block hands it the mask of the batch being predicted when the call left it out
    (the checkpointed call and its recomputation in the backward pass)."""

    def __init__(self, transformer: ChromaTransformer2DModel):
        self.mask: torch.Tensor | None = None
        for block in transformer.single_transformer_blocks:
            block.register_forward_pre_hook(self._fill, with_kwargs=True)

    def _fill(self, _block, args, kwargs):
        # The plain call passes everything by keyword, attention_mask included (maybe None);
        # the checkpointed one passes (hidden_states, temb, image_rotary_emb) only.
        if "attention_mask" in kwargs or len(args) > 3:
            return None
        return args, {**kwargs, "attention_mask": self.mask}


class MaskedChromaPipeline(ChromaPipeline):
    """ChromaPipeline whose prompt mask stays boolean, so the transformer masks the padding
    as it was trained to (diffusers 0.42.1 turns it into floats that attention adds to its
    scores). Called with `prompt_embeds` and a boolean `prompt_attention_mask`, the plain
    ChromaPipeline draws the same image."""

    def _get_t5_prompt_embeds(self, *args, **kwargs):
        embeds, mask = super()._get_t5_prompt_embeds(*args, **kwargs)
        return embeds, mask.bool()


class ChromaFamily(FlowFamily):
    SPEC = CHROMA_SPEC
    # Caption dropout zeroes T5's states and keeps the mask, as OneTrainer does.
    DROPOUT_KEYS = {"text_encoder": ("encoder_hidden_states",)}
    # OneTrainer's BaseChromaSetup presets ("transformer_block" matches both kinds of block).
    LAYER_PRESETS = {"attn-mlp": ["attn", "ff.net", "proj_mlp"], "attn-only": ["attn"],
                     "blocks": ["transformer_block"], "full": []}
    LAYER_NAME_EXAMPLE = "transformer_blocks.0.attn.to_q, single_transformer_blocks.0.proj_mlp"

    @classmethod
    def card(cls, model_type):
        from trainer.model_card import FLOW_CARD, FamilyCard
        return FamilyCard(("chroma",), "ChromaPipeline", "ChromaTransformer2DModel",
                          comfy_text_encoders="a *Load CLIP* node (type chroma: t5xxl)",
                          **FLOW_CARD)

    @classmethod
    def load(cls, config):
        with quiet_pos_embed_warning():
            parts = cls.load_components(config)
        family = cls(
            components=SimpleNamespace(**parts), vae=parts["vae"],
            noise_scheduler=parts["noise_scheduler"],
            parts={"text_encoder": parts["text_encoder"], "transformer": parts["transformer"]},
            kohya_prefixes={"transformer": "lora_unet_"},
            # kohya's sd-scripts: ss_base_model_version "chroma", modelspec "chroma/lora"
            base_model_version="chroma", lora_architecture="chroma/lora",
            config=config, text_cache_keys=("encoder_hidden_states", "text_attention_mask"),
            objective=cls.objective_for(parts["noise_scheduler"], config))
        family.checkpointed_block_mask = CheckpointedBlockMask(parts["transformer"])
        return family

    def encode_text(self, captions, batch, *, clip_skip, device, grad):
        """T5's last hidden states (read with the tokenizer's mask, as ChromaPipeline does) and
        the transformer's text mask. Clip skip does not apply to T5."""
        tokenizer = self.components.tokenizer
        ids = tokenize(tokenizer, captions, device,
                       max_length=self.sequence_length("text_encoder"))
        with torch.set_grad_enabled(grad.get("text_encoder", False)):
            hidden = self.module("text_encoder")(
                ids, attention_mask=(ids != tokenizer.pad_token_id).long())[0]
        return {"encoder_hidden_states": hidden,
                "text_attention_mask": transformer_text_mask(ids, tokenizer.pad_token_id)}

    def predict(self, noisy, timesteps, conditioning):
        transformer = self.module("transformer")
        dtype = compute_dtype_of(self.parts["transformer"])
        b, _, h, w = noisy.shape
        text, text_mask = cut_padding(conditioning["encoder_hidden_states"].to(dtype),
                                      conditioning["text_attention_mask"].to(noisy.device))
        latents = pack(noisy).to(dtype)
        mask = None
        if text_mask is not None:  # the joint sequence: text first, every image token seen
            image_mask = torch.ones(b, latents.shape[1], dtype=torch.bool, device=noisy.device)
            mask = torch.cat([text_mask, image_mask], dim=1)
        self.checkpointed_block_mask.mask = mask
        out = transformer(
            hidden_states=latents, encoder_hidden_states=text,
            timestep=(timesteps / 1000).to(dtype),
            img_ids=image_ids(h // 2, w // 2, noisy.device, dtype),
            txt_ids=torch.zeros(text.shape[1], 3, device=noisy.device, dtype=dtype),
            attention_mask=mask, return_dict=False)[0]
        return unpack(out, h, w)

    def _pipeline(self, cls):
        pipe = cls(
            scheduler=FlowMatchEulerDiscreteScheduler.from_config(self.noise_scheduler.config),
            vae=self.vae, text_encoder=self.parts["text_encoder"],
            tokenizer=self.components.tokenizer, transformer=self.parts["transformer"])
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def pipeline(self):
        return self._pipeline(MaskedChromaPipeline)

    def export_pipeline(self):
        return self._pipeline(ChromaPipeline)  # model_index.json names the plain pipeline

    def sample_inputs(self):
        return {"max_sequence_length": min(self.sequence_length("text_encoder"),
                                           PIPELINE_MAX_SEQUENCE_LENGTH)}
