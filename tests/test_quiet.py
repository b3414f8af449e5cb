"""Library noise is dropped at its source logger; everything else those loggers say, and every
message of ours, still gets through."""
import logging

import pytest

import trainer  # noqa: F401  (installs the filters, as any use of the engine does)
from trainer.quiet import LIBRARY_NOISE, silence_library_noise


class Collect(logging.Handler):
    def __init__(self):
        super().__init__()
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


@pytest.fixture
def heard():
    """Log through a library logger; returns what came out of it."""
    handlers = []

    def say(logger_name: str, message: str) -> list[str]:
        logger = logging.getLogger(logger_name)
        handler = Collect()
        logger.addHandler(handler)
        handlers.append((logger, handler))
        logger.warning(message)
        return handler.messages
    yield say
    for logger, handler in handlers:
        logger.removeHandler(handler)


def test_the_known_noise_is_dropped(heard):
    assert heard("diffusers.models.modeling_utils",
                 "There are modules in AutoencoderKL that should be kept in float32: []. "
                 "Casting directly with `to()` can lead to inconsistent results") == []
    assert heard("transformers.utils.import_utils",
                 "`CLIPImageProcessor` requires torchvision (not installed); falling back to "
                 "`CLIPImageProcessorPil` for backward compatibility.") == []
    assert heard("bitsandbytes.backends.cpu.ops",
                 "Failed to load CPU gemm_4bit_forward from kernels-community: no module") == []


def test_other_messages_of_the_same_loggers_still_show(heard):
    real = "There are modules in UNet2DConditionModel that should be kept in float32: ['x']."
    assert heard("diffusers.models.modeling_utils", real) == [real]
    assert heard("transformers.utils.import_utils", "something else") == ["something else"]
    assert heard("trainer", "a warning of ours: ...masklabel.png") == [
        "a warning of ours: ...masklabel.png"]


def test_installing_twice_adds_no_second_filter():
    silence_library_noise()
    silence_library_noise()
    for name, _ in LIBRARY_NOISE:  # (the libraries add filters of their own, e.g. diffusers)
        ours = [f for f in logging.getLogger(name).filters if hasattr(f, "atelier_noise")]
        assert len(ours) == 1, name


def test_weight_loading_bars_go_but_download_bars_stay():
    from huggingface_hub.utils import are_progress_bars_disabled
    from transformers.utils import logging as transformers_logging

    from trainer.quiet import hide_weight_loading_bars
    hide_weight_loading_bars()
    assert not transformers_logging.is_progress_bar_enabled()
    assert not are_progress_bars_disabled()  # a first download still shows how far it is


def test_download_bars_a_user_switched_off_stay_off():
    from huggingface_hub.utils import (are_progress_bars_disabled, disable_progress_bars,
                                       enable_progress_bars)

    from trainer.quiet import hide_weight_loading_bars
    hide_weight_loading_bars.cache_clear()
    disable_progress_bars()
    try:
        hide_weight_loading_bars()
        assert are_progress_bars_disabled()
    finally:
        enable_progress_bars()
        hide_weight_loading_bars.cache_clear()
