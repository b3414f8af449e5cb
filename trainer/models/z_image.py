"""Z-Image (Z_IMAGE: Z-Image, Z-Image-Turbo and its De-Turbo derivatives): diffusers'
ZImageTransformer2DModel conditioned on a Qwen3 language model's hidden states, trained by flow
matching on the latents of Flux.1's VAE.

What is Z-Image about it (as diffusers' ZImagePipeline and OneTrainer's Z-Image model do it):
- A caption is written as a chat turn with Qwen's chat template (a user message, the assistant's
  turn opened, thinking on), tokenised to 512 tokens, and read by the text encoder with its
  padding masked; the conditioning is the hidden states of the layer before the last, of the
  caption's own tokens only: the transformer takes a list of captions of their own lengths.
  The text cache keeps the padded states and the mask; `predict` cuts each caption out.
- The transformer takes a list of latents [C, 1, h, w] (a frame axis of one), patches them
  2x2 itself, reads the time as 1 − t/1000 (1 at the clean end) and predicts the negated
  velocity, x₀ − ε: `predict` turns it back into the ε − x₀ that the objective targets.
- The scheduler's shift is constant (3); `dynamic_timestep_shifting` applies the resolution-
  dependent shift with FlowMatchEulerDiscreteScheduler's default constants, as OneTrainer does.
- The text encoder is never trained (OneTrainer trains the transformer only).
- A dropped caption (caption dropout) is the empty one, whose chat turn is what ZImagePipeline
  feeds as its unconditional input (OneTrainer has no caption dropout for Z-Image).
"""
from __future__ import annotations

from types import SimpleNamespace

import torch
from diffusers import FlowMatchEulerDiscreteScheduler, ZImagePipeline, ZImageTransformer2DModel
from transformers import Qwen2Tokenizer, Qwen3Model

from trainer.models.family import compute_dtype_of, tokenize
from trainer.models.flow_family import EmptyCaptionDropout, FlowFamily, FlowSpec

# ZImagePipeline's (and OneTrainer's) prompt length in tokens, chat template included.
SEQUENCE_LENGTH = 512
# The hidden states the pipeline reads: those of the layer before the last.
HIDDEN_LAYER = -2


def chat_prompt(tokenizer, caption: str) -> str:
    """The caption as ZImagePipeline hands it to the tokenizer: one user turn, the assistant's
    turn opened, thinking on (Qwen3's template then writes no empty thought block)."""
    return tokenizer.apply_chat_template([{"role": "user", "content": caption}], tokenize=False,
                                         add_generation_prompt=True, enable_thinking=True)


def caption_states(conditioning: dict, dtype: torch.dtype) -> list[torch.Tensor]:
    """Each caption's states without its padding: the list the transformer takes."""
    states = conditioning["encoder_hidden_states"].to(dtype)
    mask = conditioning["text_attention_mask"].to(states.device, torch.bool)
    return [row[keep] for row, keep in zip(states, mask)]


# --- the original (single-file) layout -------------------------------------------------------

# diffusers' names -> the original checkpoint's (Tongyi's release, what ComfyUI loads and
# diffusers' single-file converter reads): q/k/v are one fused `qkv`, the norms and output
# projection are renamed, the patch embedder and final layer lose their ModuleDict key.
_ORIGINAL_RENAMES = (("all_final_layer.2-1.", "final_layer."),
                     ("all_x_embedder.2-1.", "x_embedder."),
                     (".attention.norm_q.", ".attention.q_norm."),
                     (".attention.norm_k.", ".attention.k_norm."),
                     (".attention.to_out.0.", ".attention.out."))


def to_original(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The transformer's weights in the original layout (diffusers' own single-file converter,
    `from_single_file`, reads them back)."""
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        if ".attention.to_k." in key or ".attention.to_v." in key:
            continue  # fused with to_q below
        if ".attention.to_q." in key:
            parts = [state[key.replace(".to_q.", f".to_{p}.")] for p in "qkv"]
            out[key.replace(".to_q.", ".qkv.")] = torch.cat(parts, dim=0)
            continue
        for old, new in _ORIGINAL_RENAMES:
            key = key.replace(old, new)
        out[key] = tensor
    return out


def single_file_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A transformer file's tensors as diffusers' single-file converter reads them: the
    original layout, or diffusers' names as OneTrainer's ORIGINAL_TRANSFORMER writes them (put
    into the original layout first: the converter would rename `all_final_layer.` a second
    time)."""
    return to_original(state) if any(k.startswith("all_x_embedder.") for k in state) else state


Z_IMAGE_SPEC = FlowSpec(
    name="Z-Image",
    pipeline_class=ZImagePipeline,
    pipeline_names=("ZImagePipeline",),
    transformer_class=ZImageTransformer2DModel,
    text_encoders={"text_encoder": Qwen3Model},
    tokenizers={"tokenizer": Qwen2Tokenizer},
    layout="z_image",
    single_file_state=single_file_state,
)


class ZImageFamily(EmptyCaptionDropout, FlowFamily):
    SPEC = Z_IMAGE_SPEC
    # OneTrainer's BaseZImageSetup presets: attention / feed-forward of the main blocks (not
    # the refiners), every block, or every layer. Regular expressions, as OneTrainer's are.
    LAYER_PRESETS = {"full": [], "blocks": ["layers"],
                     "attn-mlp": ["^(?=.*attention)(?!.*refiner).*",
                                  "^(?=.*feed_forward)(?!.*refiner).*"],
                     "attn-only": ["^(?=.*attention)(?!.*refiner).*"]}
    REGEX_PRESETS = frozenset({"attn-mlp", "attn-only"})
    LAYER_NAME_EXAMPLE = "layers.0.attention.to_q, layers.0.feed_forward.w1"

    @classmethod
    def card(cls, model_type):
        from trainer.model_card import FLOW_CARD, FamilyCard
        return FamilyCard(("z-image",), "ZImagePipeline", "ZImageTransformer2DModel",
                          comfy_text_encoders="a *Load CLIP* node (type lumina2: qwen_3_4b)",
                          **FLOW_CARD)

    @classmethod
    def load(cls, config):
        parts = cls.load_components(config)
        return cls(
            components=SimpleNamespace(**parts), vae=parts["vae"],
            noise_scheduler=parts["noise_scheduler"],
            parts={"text_encoder": parts["text_encoder"], "transformer": parts["transformer"]},
            kohya_prefixes={"transformer": "lora_unet_"},
            # modelspec.architecture as OneTrainer writes it (resources/sd_model_spec/
            # z_image*.json); kohya's sd-scripts has no Z-Image id: "z_image" is Atelier's
            base_model_version="z_image", lora_architecture="Z-Image/lora",
            config=config, text_cache_keys=("encoder_hidden_states", "text_attention_mask"),
            objective=cls.objective_for(parts["noise_scheduler"], config))

    @property
    def implementation(self) -> str:
        return "https://github.com/Tongyi-MAI/Z-Image"

    def text_cache_identity(self) -> list:
        return super().text_cache_identity() + [SEQUENCE_LENGTH, HIDDEN_LAYER]

    def encode_text(self, captions, batch, *, clip_skip, device, grad):
        """Qwen3's states of the layer before the last, read with the padding masked, and the
        mask of the caption's tokens (clip skip is a CLIP setting and does not apply)."""
        tokenizer = self.components.tokenizer
        prompts = [chat_prompt(tokenizer, c) for c in captions]
        ids = tokenize(tokenizer, prompts, device, max_length=SEQUENCE_LENGTH)
        # <|endoftext|> pads, and the chat template never writes it: ids != pad is the
        # tokenizer's attention mask, on whichever side it pads.
        mask = ids != tokenizer.pad_token_id
        with torch.set_grad_enabled(grad.get("text_encoder", False)):
            out = self.module("text_encoder")(input_ids=ids, attention_mask=mask,
                                              output_hidden_states=True)
        return {"encoder_hidden_states": out.hidden_states[HIDDEN_LAYER],
                "text_attention_mask": mask}

    def predict(self, noisy, timesteps, conditioning):
        transformer = self.module("transformer")
        dtype = compute_dtype_of(self.parts["transformer"])
        latents = list(noisy.to(dtype).unsqueeze(2).unbind(0))  # [C, 1 frame, h, w] each
        time = (1000 - timesteps.float()) / 1000  # 1 = clean, as the pipeline feeds it
        out = transformer(latents, time, caption_states(conditioning, dtype),
                          return_dict=False)[0]
        return -torch.stack(out).squeeze(2).to(noisy.dtype)

    def pipeline(self):
        pipe = ZImagePipeline(
            scheduler=FlowMatchEulerDiscreteScheduler.from_config(self.noise_scheduler.config),
            vae=self.vae, text_encoder=self.parts["text_encoder"],
            tokenizer=self.components.tokenizer, transformer=self.parts["transformer"])
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def sample_inputs(self):
        return {"max_sequence_length": SEQUENCE_LENGTH}

    def original_state_dict(self):
        """The original layout (ComfyUI's diffusion model file): z_image.to_original."""
        return to_original(self.parts["transformer"].state_dict())
