"""The timestep-distribution preview (ui/timestep_preview.py): the engine's histogram of the
timesteps the settings draw, its caption, its refusals, and its place in the page."""
from __future__ import annotations

import json

import pytest

from trainer.config import config_from_dict
from trainer.ownership import Access, Realm, Viewer
from ui import timestep_preview as T


def config(**values):
    return config_from_dict(values, warn=lambda m: None)


def mean_timestep(frame) -> float:
    return float((frame[T.X] * frame[T.COUNT]).sum() / frame[T.COUNT].sum())


def mode_timestep(frame) -> float:
    return float(frame.loc[frame[T.COUNT].idxmax(), T.X])


def test_the_histogram_counts_every_draw_and_follows_the_bias():
    frames = {}
    for bias in (-1.0, 1.0):
        frame, caption = T.histogram_frame(config(timestep_distribution="LOGIT_NORMAL",
                                                  noising_bias=bias))
        assert len(frame) == T.BINS and int(frame[T.COUNT].sum()) == T.SAMPLES
        assert frame[T.Y].sum() == pytest.approx(100.0)
        assert frame[T.X].iloc[0] == 10 and frame[T.X].iloc[-1] == 990  # bin centres on [0, 1000]
        frames[bias] = frame
    # sigmoid(N(±1, 1)): modes near t = 730 and 270
    assert mode_timestep(frames[1.0]) > 600 > 400 > mode_timestep(frames[-1.0])


def test_dynamic_shift_moves_the_draws_toward_noise_at_larger_sizes():
    flux = dict(model_type="FLUX_DEV_1", timestep_distribution="LOGIT_NORMAL",
                dynamic_timestep_shifting=True)
    large, large_caption = T.histogram_frame(config(resolution="1024", **flux))
    small, small_caption = T.histogram_frame(config(resolution="256", **flux))
    assert int(large[T.COUNT].sum()) == int(small[T.COUNT].sum()) == T.SAMPLES
    # Flux.1-dev's scheduler: shift e^1.15 = 3.16 at 4096 tokens, e^0.5 = 1.65 at 256
    assert mean_timestep(large) > mean_timestep(small) + 80
    assert large_caption == ("LOGIT_NORMAL, shift 3.16 (dynamic at 1024×1024, Flux.1-dev's "
                             "scheduler values): most steps at high noise.")
    assert small_caption.startswith("LOGIT_NORMAL, shift 1.65 (dynamic at 256×256, ")
    # off: the timestep shift, whatever the size
    fixed = T.histogram_frame(config(resolution="1024", **{**flux, "timestep_shift": 3.0,
                                                           "dynamic_timestep_shifting": False}))
    assert fixed[1] == "LOGIT_NORMAL, shift 3: most steps at high noise."
    assert T.axis_title("FLUX_DEV_1") == "timestep t (σ = (t+1)/1000)"


def test_a_local_base_model_s_scheduler_config_sets_the_dynamic_shift(tmp_path):
    folder = tmp_path / "my-flux"
    (folder / "scheduler").mkdir(parents=True)
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(
        {"_class_name": "FlowMatchEulerDiscreteScheduler", "base_shift": 0.5, "max_shift": 0.5,
         "base_image_seq_len": 256, "max_image_seq_len": 4096}))
    own = config(model_type="FLUX_DEV_1", base_model_name=str(folder), resolution="1024",
                 dynamic_timestep_shifting=True)
    _, caption = T.histogram_frame(own)
    assert caption.startswith("UNIFORM, shift 1.65 (dynamic at 1024×1024, the base model's "
                              "scheduler config)")
    # On a shared server a folder the visitor may not read is not opened: the defaults.
    shared = Access(Realm(tmp_path / "ws", shared=True, confine=True), Viewer("bob", False))
    _, caption = T.histogram_frame(own, shared)
    assert "shift 3.16" in caption and "Flux.1-dev's scheduler values" in caption


def test_the_sd_families_draw_discrete_timesteps_without_dynamic_shift():
    plain, caption = T.histogram_frame(config())
    assert caption == "UNIFORM, no shift: steps spread evenly over every noise level."
    assert T.axis_title("STABLE_DIFFUSION_15") == "timestep"
    # dynamic shifting does not apply to SD: the switch, even on, changes nothing
    switched = config().model_copy(update={"dynamic_timestep_shifting": True})
    same, same_caption = T.histogram_frame(switched)
    assert same[T.COUNT].tolist() == plain[T.COUNT].tolist() and same_caption == caption
    window, caption = T.histogram_frame(config(min_noising_strength=0.5))
    assert window[window[T.X] < 500][T.COUNT].sum() == 0
    assert caption == "UNIFORM, no shift: most steps at high noise."


def test_bad_values_say_no_preview_in_one_sentence():
    for bad, sentence in (
            ({"timestep_shift": 0.0}, "timestep_shift must be a positive number, not 0.0."),
            ({"timestep_shift": -2.0}, "timestep_shift must be a positive number, not -2.0."),
            ({"resolution": "abc"}, "resolution item 'abc': 'abc' is not a whole number.")):
        # a config that skipped validation (the page validates first: see the page test)
        frame, caption = T.histogram_frame(config().model_copy(update=bad))
        assert frame.empty and caption == f"No preview: {sentence}"
    frame, caption = T.histogram_frame(config(timestep_distribution="LOGIT_NORMAL",
                                              noising_weight=-2))
    assert frame.empty and caption.startswith("No preview: noising_weight must be above -1")


def test_the_page_draws_the_preview_and_redraws_it_when_a_field_changes():
    from ui.page import build_page

    demo = build_page()
    redraw = next(fn for fn in demo.fns.values() if fn.api_name == "timestep_preview")
    plot, caption = redraw.outputs
    assert (plot.elem_id, caption.elem_id) == ("timestep-curve", "timestep-curve-caption")
    assert caption.value.startswith("UNIFORM")  # drawn at build, from the demo settings
    by_id = {block._id: block for block in demo.blocks.values()}
    fields = {getattr(by_id[i], "elem_id", None) for i, event in redraw.targets
              if event == "change"}
    wanted = {"field-" + key.replace(".", "-").replace("_", "-") for key in T.KEYS}
    assert wanted <= fields and wanted <= {i.elem_id for i in redraw.inputs}
    inputs = {i.elem_id: i for i in redraw.inputs}

    def redraw_with(**values):
        data = {component: component.value for component in redraw.inputs}
        for key, value in values.items():
            data[inputs["field-" + key.replace("_", "-")]] = value
        return redraw.fn(data, None)

    frame, text = redraw_with(model_type="FLUX_DEV_1", timestep_distribution="LOGIT_NORMAL",
                              dynamic_timestep_shifting=True, resolution="1024")
    assert text.startswith("LOGIT_NORMAL, shift 3.16 (dynamic at 1024×1024")
    assert int(frame[T.COUNT].sum()) == T.SAMPLES
    # then the axis: σ named for the flow families (a second update: see ui/page.py)
    axis = next(fn for fn in demo.fns.values() if fn.api_name == "timestep_axis")
    assert axis.outputs == [plot] and axis.inputs[0].elem_id == "field-model-type"
    assert axis.fn("FLUX_DEV_1")["x_title"] == "timestep t (σ = (t+1)/1000)"
    assert axis.fn("STABLE_DIFFUSION_XL_10_BASE")["x_title"] == "timestep"
    frame, text = redraw_with(timestep_shift=0)
    assert frame.empty and text.startswith("No preview: ") and "timestep_shift" in text
    frame, text = redraw_with(resolution="12x")
    assert frame.empty and text.startswith("No preview: ") and "resolution" in text


def test_a_family_that_ignores_dynamic_shifting_is_drawn_and_said_so(monkeypatch):
    """(OneTrainer shifts dynamically for Flux.1 only; a family whose class does not read the
    switch draws with timestep_shift, and the caption says the switch is ignored.)"""
    monkeypatch.setattr(T, "dynamic_applies", lambda model_type: False)
    values = dict(model_type="FLUX_DEV_1", timestep_distribution="LOGIT_NORMAL",
                  timestep_shift=2.0, resolution="1024")
    ignored, caption = T.histogram_frame(config(dynamic_timestep_shifting=True, **values))
    off, _ = T.histogram_frame(config(**values))
    assert ignored[T.COUNT].tolist() == off[T.COUNT].tolist()
    assert caption == ("LOGIT_NORMAL, shift 2 (Flux.1 ignores dynamic timestep shifting): "
                       "most steps at mid and high noise.")


def test_a_hub_id_shows_its_familys_own_scheduler_values():
    """Qwen-Image's scheduler shifts less than Flux.1's (max_shift 0.9, exponential): a hub id
    the page does not read shows Qwen-Image's values, not Flux.1-dev's."""
    qwen = config(model_type="QWEN", base_model_name="Qwen/Qwen-Image", resolution="1024",
                  dynamic_timestep_shifting=True)
    _, caption = T.histogram_frame(qwen)
    assert caption.startswith("UNIFORM, shift 2 (dynamic at 1024×1024, Qwen-Image's scheduler "
                              "values)")
