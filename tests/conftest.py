"""Test setup: offline everywhere, shared tiny models built once per session."""
import os

# Nothing is downloaded at test time (DESIGN.md: offline env).
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("DIFFUSERS_OFFLINE", "1")
# Tiny models: one thread per process is faster than two fighting over OpenMP spin-waits,
# and the CLI/DDP tests run several processes at once on a 2-core machine.
os.environ.setdefault("OMP_NUM_THREADS", "1")


import pytest  # noqa: E402  (after the environment is set, before anything imports the hub)


@pytest.fixture(scope="session")
def tiny_sd15_dir(tmp_path_factory):
    """The tiny SD 1.5 model as a diffusers folder, built once per test session (~1 s)."""
    from trainer.models.tiny import build_tiny_sd15

    return build_tiny_sd15(tmp_path_factory.mktemp("models") / "tiny-sd15")


@pytest.fixture(scope="session")
def tiny_sdxl_dir(tmp_path_factory):
    """The tiny SDXL model as a diffusers folder, built once per test session (~2 s)."""
    from trainer.models.tiny import build_tiny_sdxl

    return build_tiny_sdxl(tmp_path_factory.mktemp("models") / "tiny-sdxl")


@pytest.fixture(scope="session")
def tiny_sd15_inpaint_dir(tmp_path_factory):
    """The tiny SD 1.5 inpainting model (9-channel UNet) as a diffusers folder."""
    from trainer.models.tiny import build_tiny_sd15_inpaint

    return build_tiny_sd15_inpaint(tmp_path_factory.mktemp("models") / "tiny-sd15-inpaint")


@pytest.fixture(scope="session")
def tiny_sdxl_inpaint_dir(tmp_path_factory):
    """The tiny SDXL inpainting model (9-channel UNet) as a diffusers folder."""
    from trainer.models.tiny import build_tiny_sdxl_inpaint

    return build_tiny_sdxl_inpaint(tmp_path_factory.mktemp("models") / "tiny-sdxl-inpaint")


# The tiny flow-matching models (trainer/models/tiny_flow.py): built once per process by
# tiny_flow_model, shared by every test that asks; read them, never write into them.
@pytest.fixture(scope="session")
def tiny_flux_dir():
    """The tiny Flux.1-dev (guidance embedding) as a diffusers folder."""
    from trainer.models.tiny_flow import tiny_flow_model

    return tiny_flow_model("flux")


@pytest.fixture(scope="session")
def tiny_flux_schnell_dir():
    """The tiny Flux.1-schnell (no guidance embedding) as a diffusers folder."""
    from trainer.models.tiny_flow import tiny_flow_model

    return tiny_flow_model("flux-schnell")


@pytest.fixture(scope="session")
def tiny_chroma_dir():
    """The tiny Chroma as a diffusers folder."""
    from trainer.models.tiny_flow import tiny_flow_model

    return tiny_flow_model("chroma")


@pytest.fixture(scope="session")
def tiny_sd3_dir():
    """The tiny SD 3 as a diffusers folder."""
    from trainer.models.tiny_flow import tiny_flow_model

    return tiny_flow_model("sd3")


@pytest.fixture(scope="session")
def tiny_qwen_image_dir():
    """The tiny Qwen-Image (Qwen2.5-VL text encoder, its tokenizer built in code, its own
    VAE) as a diffusers folder."""
    from trainer.models.tiny_qwen_image import tiny_qwen_image_model

    return tiny_qwen_image_model()


@pytest.fixture(scope="session")
def tiny_flux2_dir():
    """The tiny Flux.2 klein (Qwen3 text encoder, its tokenizer built in code, Flux.2's VAE)
    as a diffusers folder."""
    from trainer.models.tiny_flux2 import tiny_flux2_model

    return tiny_flux2_model()


@pytest.fixture(scope="session")
def tiny_z_image_dir():
    """The tiny Z-Image (Qwen3 text encoder, its tokenizer built in code) as a diffusers
    folder."""
    from trainer.models.tiny_z_image import tiny_z_image_model

    return tiny_z_image_model()


@pytest.fixture(scope="session")
def tiny_sd35_dir():
    """The tiny SD 3.5 (qk norm, a dual-attention block) as a diffusers folder."""
    from trainer.models.tiny_flow import tiny_flow_model

    return tiny_flow_model("sd35")
