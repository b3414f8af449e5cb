"""Every key OneTrainer writes that Atelier has no field for, and what it means for a run of the
families Atelier trains (read from OneTrainer's config classes, __version 6 to 11;
tests/fixtures/onetrainer holds files its code wrote).

trainer/onetrainer.py uses these tables: a key whose value cannot change what Atelier trains
is set aside and counted by kind in one line; a key that would change the run unless it holds
its neutral value is refused with its value when it does not (or noted, where the difference
is Atelier's documented choice). Keys Atelier reads under another name are translated there,
not listed here.
"""
from __future__ import annotations

# Kinds of set-aside keys, as the one-line summary names them.
KINDS = {
    "family": "for other model families",
    "app": "OneTrainer's app, logging and machine settings",
    "cloud": "cloud training",
    "multi_gpu": "OneTrainer's multi-GPU (Atelier: accelerate launch)",
    "speed": "memory and speed only",
    "optimizers": "of optimizers not chosen",
    "adapters": "of adapter types not chosen",
    "method": "of training methods not chosen",
    "parts": "of model parts this model does not use",
    "sampling": "sample rendering",
    "output": "output naming and metadata",
    "concepts": "concept details with no effect here",
    "neutral": "at OneTrainer's default, which is what Atelier does",
}

# Top-level keys whose value does not change what a run of Atelier's families trains (the
# parts, sequence lengths and quantization filter of the families: trainer/onetrainer.py).
SET_ASIDE: dict[str, str] = {
    **dict.fromkeys((
        "prior", "unconditional_transformer", "text_encoder_4", "effnet_encoder", "decoder",
        "decoder_text_encoder", "decoder_vqgan", "frames", "vb_loss_strength"), "family"),
    **dict.fromkeys((
        "debug_mode", "debug_dir", "cache_dir", "huggingface_cache_dir", "offline_mode",
        "tensorboard", "tensorboard_expose", "tensorboard_always_on", "tensorboard_port",
        "train_device", "temp_device", "clear_cache_before_training", "dataloader_threads",
        "samples_to_tensorboard", "secrets"), "app"),
    "cloud": "cloud",
    **dict.fromkeys((
        "multi_gpu", "device_indexes", "gradient_reduce_precision", "fused_gradient_reduce",
        "async_gradient_reduce", "async_gradient_reduce_buffer"), "multi_gpu"),
    **dict.fromkeys((
        "async_offloading", "enable_async_offloading", "enable_activation_offloading",
        "attention_mechanism", "enable_autocast_cache", "fallback_train_dtype"), "speed"),
    **dict.fromkeys((
        "oft_block_size", "oft_block_share", "oft_scaled", "lokr_decompose_both",
        "lokr_use_tucker", "lokr_weight_decompose", "lokr_dora_on_output", "lokr_full_matrix",
        "lokr_vec_trick", "lora_decompose_norm_epsilon", "lora_decompose_output_axis"),
        "adapters"),
    **dict.fromkeys(("sample_image_format", "sample_video_format", "sample_audio_format",
                     "non_ema_sampling"), "sampling"),
    **dict.fromkeys(("include_train_config", "prevent_overwrites", "save_filename_prefix"),
                    "output"),
}

# Top-level keys that change the run unless they hold their neutral value (OneTrainer's
# default), with what Atelier lacks. A value other than the neutral one is refused.
NEUTRAL: dict[str, tuple[object, str]] = {
    "learning_rate_scaler": ("NONE", "Atelier does not scale the learning rate by the batch "
                                     "size or accumulation"),
    "loss_scaler": ("NONE", "Atelier does not scale the loss by the batch size or "
                            "accumulation"),
    "force_v_prediction": (False, "Atelier trains the model's own prediction type"),
    "force_epsilon_prediction": (False, "Atelier trains the model's own prediction type"),
    "rescale_noise_scheduler_to_zero_terminal_snr": (
        False, "Atelier keeps the model's noise schedule"),
    "generalized_offset_noise": (False, "Atelier's offset noise is the plain kind "
                                        "(offset_noise_weight)"),
    "perturbation_noise_weight": (0.0, "Atelier has no perturbation (input) noise"),
    "log_cosh_strength": (0.0, "Atelier's losses are MSE, MAE and Huber"),
    "custom_conditioning_image": (False, "Atelier builds the inpainting input from the image "
                                         "and its mask, never from a -condlabel file"),
    "force_circular_padding": (False, "Atelier keeps the model's padding"),
    "lora_weight_dtype": ("FLOAT_32", "Atelier keeps adapter weights in float32"),
    "embedding_weight_dtype": ("FLOAT_32", "Atelier keeps embedding vectors in float32"),
    "only_cache": (False, "Atelier caches while it trains; a run that only fills the cache "
                          "is not offered"),
}

# Settings of the run that Atelier does not do, but which leave the trained weights as they
# are: said in a note when set, never refused.
NOT_DONE: dict[str, tuple[object, str]] = {
    "sample_skip_first": (0, "samples are drawn from the first interval on"),
    "save_skip_first": (0, "intermediate saves start at the first interval"),
}

# Keys of a model part with no effect on the run: OneTrainer reads them only for other families
# or parts (model_name, include: refused where they would matter, trainer/onetrainer.py), or
# for memory and speed only.
PART_SET_ASIDE = {"__version": "parts", "model_name": "parts", "include": "parts",
                  "attention_mask": "family", "guidance_scale": "family",
                  "activation_offloading": "speed"}  # a text encoder's (the denoiser's is kept)
# The transformer's switches that Atelier reads where the family does (Flux.1's guidance input,
# its and SD 3's T5 attention mask: trainer/models/registry.py).
TRANSFORMER_SWITCHES = ("guidance_scale", "attention_mask")
# ... and of the parts that are never trained here: the VAE (OneTrainer trains it only with
# FINE_TUNE_VAE, which is refused) keeps only its weight type and model file.
VAE_KEPT = ("weight_dtype", "model_name")

# A concept's keys (ConceptConfig) with no effect here, and those that change the run unless
# neutral ("image." and "text." are its sub-sections).
CONCEPT_SET_ASIDE = ("__version", "name", "seed", "concept_stats", "image_variations",
                     "text_variations")
CONCEPT_NEUTRAL = {
    "image.enable_fixed_flip": False, "image.enable_random_rotate": False,
    "image.enable_fixed_rotate": False, "image.enable_random_brightness": False,
    "image.enable_fixed_brightness": False, "image.enable_random_contrast": False,
    "image.enable_fixed_contrast": False, "image.enable_random_saturation": False,
    "image.enable_fixed_saturation": False, "image.enable_random_hue": False,
    "image.enable_fixed_hue": False, "image.enable_random_mask_rotate_crop": False,
    "text.enable_tag_shuffling": False, "text.tag_dropout_enable": False,
    "text.caps_randomize_enable": False,
}
# What a concept's augmentation switches would need (for the refusal's message).
CONCEPT_NEUTRAL_REASON = "Atelier's augmentations are random flip and crop jitter"

# A sample's keys (SampleConfig) Atelier draws with; the rest only change how OneTrainer
# renders it (its scheduler, layer skip, video length, inpainting sample images).
SAMPLE_KEYS = ("prompt", "negative_prompt", "seed", "width", "height", "diffusion_steps",
               "cfg_scale")

# The parameters of each optimizer Atelier has, as OneTrainer names them, that Atelier does
# not read, with their neutral value (OneTrainer's default for that optimizer); None: the value
# never changes the weights (an implementation switch).
OPTIMIZER_EXTRA: dict[str, dict[str, object]] = {
    "ADAMW": {"amsgrad": False, "maximize": False, "foreach": None, "capturable": None,
              "differentiable": None, "fused": None},
    "ADAMW_8BIT": {"amsgrad": False, "optim_bits": None, "percentile_clipping": 100,
                   "block_wise": None, "is_paged": None},
    "PRODIGY": {"fsdp_in_use": None, "slice_p": None},
    "ADAFACTOR": {},
    "LION": {"use_triton": None},
    "SGD": {"dampening": 0, "maximize": False, "foreach": None, "differentiable": None},
}
