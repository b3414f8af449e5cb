"""Samples across the run and runs compared (issue 27): the grid of a run's samples, its picture,
and `python -m trainer compare` (settings that differ, losses, the overlaid curves)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from helpers import tiny_config
from trainer import compare, sample_grid
from trainer.sample_grid import (HEADER_HEIGHT, LABEL_WIDTH, PAD, SamplePoint, read_grid,
                                 render_grid, write_grid_image)

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["a photo of a cat", "a cup of coffee on a table", "an astronaut"]


def _run(model_dir, folder: Path, learning_rate: float):
    """A 4-epoch tiny run sampling 3 prompts after every epoch (4 sampling points), with a
    validation loss every epoch on a held-out share of the images."""
    from trainer.control import Control
    from trainer.loop import train
    samples = [{"prompt": p, "seed": 3 + i, "width": 64, "height": 64, "diffusion_steps": 2,
                "cfg_scale": 2.0} for i, p in enumerate(PROMPTS)]
    config = tiny_config(model_dir, folder, epochs=4, learning_rate=learning_rate,
                         samples=samples, sample_after=1, sample_after_unit="EPOCH",
                         validation=True, validation_split=0.4, validate_after=1,
                         validate_after_unit="EPOCH", backup_after_unit="NEVER")
    events = []
    train(config, Control(on_event=events.append))
    return Path(config.workspace_dir), events


@pytest.fixture(scope="module")
def runs(tiny_sd15_dir, tmp_path_factory):
    """Two runs that differ only in their learning rate: (folder, events) each."""
    root = tmp_path_factory.mktemp("runs")
    return [_run(tiny_sd15_dir, root / "a", 1e-2), _run(tiny_sd15_dir, root / "b", 3e-3)]


def test_the_grid_has_each_prompts_image_at_each_sampling_point(runs):
    folder, events = runs[0]
    drawn = [e for e in events if e["type"] == "sample"]
    assert len(drawn) == 12
    grid = read_grid(folder)
    assert [grid.prompts[i] for i in grid.rows] == PROMPTS
    steps = sorted({e["step"] for e in drawn})
    assert grid.steps == steps and len(steps) == 4
    # the epoch each point fell in: the metrics' (1-based), the same as the events' epochs done
    assert [p.epoch for p in grid.points] == [1, 2, 3, 4]
    for event in drawn:
        index = PROMPTS.index(event["prompt"])
        assert grid.cell(index, event["step"]) == Path(event["path"])
    assert len(grid.cells) == 12
    # the cells hold different images: each prompt's own, moving with the training
    pictures = {Image.open(p).tobytes() for p in grid.cells.values()}
    assert len(pictures) == 12


def test_the_grid_picture_has_the_expected_size_and_its_cells(runs, tmp_path):
    folder, _ = runs[0]
    grid = read_grid(folder)
    path = write_grid_image(grid, tmp_path / "grid.png")
    with Image.open(path) as picture:
        assert picture.size == (LABEL_WIDTH + PAD + 4 * (64 + PAD),
                                HEADER_HEIGHT + PAD + 3 * (64 + PAD))
        picture = picture.convert("RGB")
        # the second prompt's third sample sits in row 2, column 3, pixel for pixel
        x = LABEL_WIDTH + PAD + 2 * (64 + PAD)
        y = HEADER_HEIGHT + PAD + 1 * (64 + PAD)
        cell = picture.crop((x, y, x + 64, y + 64))
        assert cell.tobytes() == Image.open(grid.cell(1, grid.steps[2])).convert("RGB").tobytes()
        # the prompts and steps are written on it: dark pixels in the label column and header
        labels = np.asarray(picture.crop((0, HEADER_HEIGHT, LABEL_WIDTH, picture.height))
                            .convert("L"))
        header = np.asarray(picture.crop((LABEL_WIDTH, 0, picture.width, HEADER_HEIGHT))
                            .convert("L"))
        assert labels.min() < 80 and header.min() < 80
    # default place: the run's folder; written whole (no temporary file left)
    assert write_grid_image(grid) == folder / "sample-grid.png"
    assert not [p for p in folder.iterdir() if p.name.endswith(".tmp")]


def test_the_grid_up_to_a_step_and_thinned(runs):
    folder, _ = runs[0]
    grid = read_grid(folder)
    early = read_grid(folder, up_to_step=grid.steps[1])
    assert early.steps == grid.steps[:2] and len(early.cells) == 6
    thin = grid.thinned(3)
    assert thin.steps == [grid.steps[0], grid.steps[2], grid.steps[3]] or \
        thin.steps == [grid.steps[0], grid.steps[1], grid.steps[3]]
    assert render_grid(grid, most_columns=2).width == LABEL_WIDTH + PAD + 2 * (64 + PAD)
    assert not read_grid(folder, may_read=lambda p: False)
    with pytest.raises(ValueError, match="no samples"):
        render_grid(read_grid(folder / "nowhere"))


def test_a_stale_image_with_no_prompt_and_other_files_are_left_out(tmp_path):
    (tmp_path / "samples").mkdir()
    (tmp_path / "config.json").write_text(json.dumps({"samples": [{"prompt": "one"}]}))
    for name in ("step000002-0.png", "step000002-1.png", "inpaint-input-0.png"):
        Image.new("RGB", (32, 48), (200, 0, 0)).save(tmp_path / "samples" / name)
    grid = read_grid(tmp_path)
    assert grid.prompts == {0: "one"} and grid.points == (SamplePoint(2, None),)
    assert render_grid(grid).size == (LABEL_WIDTH + PAD + 32 + PAD, HEADER_HEIGHT + PAD + 48 + PAD)


def cli(*args, cwd=ROOT):
    env = dict(os.environ)
    return subprocess.run([sys.executable, "-m", "trainer", "compare", *args], cwd=cwd,
                          env=env, capture_output=True, text=True, timeout=120)


def test_compare_shows_exactly_the_learning_rate(runs, tmp_path):
    (a, _), (b, _) = runs
    done = cli(str(a), str(b), "--json", "--plot", str(tmp_path / "curves.png"))
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["differences"] == {"learning_rate": [1e-2, 3e-3]}
    assert set(result) == {"differences", "runs"}
    metrics = [[json.loads(line) for line in (f / "metrics.jsonl").read_text().splitlines()]
               for f in (a, b)]
    for run, folder, lines in zip(result["runs"], (a, b), metrics):
        losses = [r for r in lines if "loss" in r]
        validation = [r for r in lines if "validation_loss" in r]
        assert len(validation) == 4
        best = min(validation, key=lambda r: r["validation_loss"])
        assert run == {"folder": str(folder), "label": f"{folder.parent.name}/{folder.name}",
                       "steps": losses[-1]["step"],
                       "final_loss": losses[-1]["loss"],
                       "final_smoothed_loss": losses[-1]["smooth_loss"],
                       "best_validation_loss": best["validation_loss"],
                       "best_validation_step": best["step"]}
    # the two runs really trained differently
    assert result["runs"][0]["final_loss"] != result["runs"][1]["final_loss"]

    text = cli(str(a), str(b))
    assert text.returncode == 0 and "learning_rate" in text.stdout
    assert "0.01" in text.stdout and "0.003" in text.stdout
    assert "best validation loss" in text.stdout


def test_compare_plot_draws_both_runs_curves(runs, tmp_path):
    (a, _), (b, _) = runs
    path = tmp_path / "curves.png"
    assert cli(str(a), str(b), "--plot", str(path)).returncode == 0
    with Image.open(path) as picture:
        assert picture.size == compare.PLOT_SIZE
        pixels = np.asarray(picture.convert("RGB"))

    def count(colour):
        return int((pixels == np.array(colour, dtype=np.uint8)).all(axis=-1).sum())
    # each run's colour, well beyond its legend swatch (< 100 pixels): its curve
    for colour in compare.PALETTE[:2]:
        assert count(colour) > 300, colour
    assert count(compare.PALETTE[2]) == 0


def test_compare_resolves_job_numbers_in_the_workspace(runs, tmp_path):
    (a, _), (b, _) = runs
    workspace = tmp_path / "ws"
    (workspace / "jobs").mkdir(parents=True)
    (workspace / "jobs" / "7").symlink_to(a)
    (workspace / "jobs" / "8").symlink_to(b)
    done = cli("7", "8", "--json", "--workspace", str(workspace))
    assert done.returncode == 0, done.stderr
    assert [r["label"] for r in json.loads(done.stdout)["runs"]] == ["job 7", "job 8"]


@pytest.mark.parametrize("args, named", [
    (["{a}"], "JOB_OR_FOLDER"),                       # one run: nothing to compare
    (["{a}", "{tmp}/missing"], "missing"),            # no such folder
    (["{a}", "{tmp}"], "config.json"),                # a folder, not a run's
    (["{a}", "41", "--workspace", "{tmp}"], "job 41"),  # no such job
    (["{a}", "{a}", "--plot", "{tmp}/curves.jpg"], "--plot"),
])
def test_compare_bad_input_exits_2_with_one_line(runs, tmp_path, args, named):
    a = runs[0][0]
    done = cli(*[x.format(a=a, tmp=tmp_path) for x in args])
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and named in lines[0] and "Traceback" not in done.stderr
    assert not list(tmp_path.glob("*.jpg")) and not list(tmp_path.glob(".*"))


def test_differences_flatten_nested_keys_and_lists():
    a = {"unet": {"train": True, "learning_rate": None}, "samples": [{"prompt": "x"}],
         "workspace_dir": "/a", "seed": 1}
    b = {"unet": {"train": False, "learning_rate": None}, "samples": [{"prompt": "y"}, {}],
         "workspace_dir": "/b", "seed": 1}
    assert compare.differences([a, b]) == {"samples.0.prompt": ["x", "y"],
                                           "samples.1": [None, {}],
                                           "unet.train": [True, False]}
    assert sample_grid.SAMPLE_NAME.fullmatch("step000040-2.png")


# --- Sampling after training: Try it draws from intermediate saves and backups ------------------

def test_try_it_lists_and_draws_from_intermediate_saves_and_backups(tiny_sd15_dir, tmp_path,
                                                                     monkeypatch):
    from safetensors.torch import load_file

    from trainer.backup_lora import find_lora_backups, lora_from_backup
    from trainer.loop import train
    from ui import try_panel
    monkeypatch.setenv("ATELIER_WORKSPACE", str(tmp_path / "ws"))
    config = tiny_config(tiny_sd15_dir, tmp_path / "ws", epochs=2, save_every=1,
                         save_every_unit="EPOCH", backup_after=1, backup_after_unit="EPOCH")
    result = train(config)
    final = Path(result.output_path)
    saves = sorted(final.parent.glob(f"{final.stem}-step*.safetensors"))
    backups = find_lora_backups(tmp_path / "ws")
    assert saves and len(backups) == 2
    labels = dict((value, label) for label, value in try_panel.lora_choices())
    assert {str(final), *map(str, saves), *map(str, backups)} <= set(labels)
    assert labels[str(backups[0])].endswith(f"(backup at step {result.global_step})")

    # the last backup made into a LoRA file: the final output's tensors and format
    made = lora_from_backup(backups[0])
    assert made.parent == backups[0]
    ours, theirs = load_file(made), load_file(final)
    assert ours.keys() == theirs.keys()
    assert all(torch_equal(ours[k], theirs[k]) for k in ours)
    assert lora_from_backup(backups[0]).stat().st_mtime == made.stat().st_mtime  # reused

    args = ["a photo of a cat", "", 1.0, 7, 2, 3.0, 64, 64]
    for chosen in (str(saves[0]), str(backups[-1])):
        out = try_panel.generate(chosen, *args)
        assert "without" in out, out.get("message")
        assert out["with"].size == (64, 64)
    assert f"The backup at step {result.global_step // 2} at strength 1" in out["message"]
    refused = try_panel.generate(str(tmp_path), *args)["message"]
    assert "not a backup of a LoRA run" in refused


def torch_equal(a, b):
    import torch
    return torch.equal(a, b)


# --- The page's grid, Jobs → Open and Compare (handlers called directly) ------------------------

@pytest.fixture()
def two_jobs(runs, tmp_path, monkeypatch):
    """The two runs as finished jobs 1 and 2 of a local server's workspace."""
    import shutil

    from trainer.jobs.store import FINISHED, JobStore
    from ui import state
    monkeypatch.setenv("ATELIER_WORKSPACE", str(tmp_path / "workspace"))
    store = JobStore(tmp_path / "workspace")
    ids = []
    for folder, _ in runs:
        config = json.loads((folder / "config.json").read_text())
        job = store.add("", config)
        shutil.copytree(folder, store.folder(job.id), dirs_exist_ok=True)
        store.update(job.id, status=FINISHED)
        ids.append(job.id)
    monkeypatch.setattr(state.SESSION, "store", store)
    return store, ids


def test_the_page_grid_follows_a_job_scrolls_and_downloads(two_jobs, runs):
    from trainer.session import JobState
    from ui import sample_grid_panel as panel
    from ui.state import SESSION
    store, (first, _) = two_jobs
    out = panel.grid_update(SESSION.get(first))
    assert out["folder"] == str(store.folder(first))
    gallery = out["gallery"]
    assert gallery["columns"] == 4 and len(gallery["value"]) == 12
    captions = [caption for _, caption in gallery["value"]]
    assert captions[0] == f"{PROMPTS[0]} · step 2 · epoch 1"   # row by row: prompt 1 first
    assert captions[4].startswith(PROMPTS[1]) and captions[-1].endswith("epoch 4")
    grid = read_grid(store.folder(first))
    served = [Path(path).read_bytes() for path, _ in gallery["value"]]
    assert served[5] == grid.cell(1, grid.steps[1]).read_bytes()
    assert out["slider"]["maximum"] == 4 and out["slider"]["value"] == 4
    assert not out["slider"]["interactive"]  # 4 points fit the window: nothing to scroll
    # a followed JobState (the poll's): the folder its samples are in
    folder, events = runs[0]
    state = JobState(samples=[{k: e[k] for k in ("path", "prompt", "step", "epoch")}
                              for e in events if e["type"] == "sample"])
    assert panel.grid_update(state)["folder"] == str(folder)
    assert panel.grid_update(JobState())["gallery"]["value"] == []
    scrolled = panel.scroll(out["folder"], 2)
    assert scrolled["gallery"]["columns"] == 2 and len(scrolled["gallery"]["value"]) == 6
    assert "Columns 1–2 of 4" in scrolled["header"]
    file = panel.download(out["folder"])["file"]["value"]
    with Image.open(file) as picture:
        assert picture.size == (LABEL_WIDTH + PAD + 4 * (64 + PAD),
                                HEADER_HEIGHT + PAD + 3 * (64 + PAD))
    assert "no grid" in panel.download(None)["message"]


def test_jobs_open_lists_the_grid_picture(two_jobs):
    from ui import jobs_panel
    from ui.state import viewer
    _, (first, _) = two_jobs
    opened = jobs_panel.open_job(viewer(), first)
    assert len(opened["gallery"]) == 12  # the samples newest first, as before
    assert any(Path(f).name == f"sample-grid-{first}.png" for f in opened["files"])


def test_compare_panel_plots_tables_and_grids_two_jobs(two_jobs):
    from ui import compare_panel
    from ui.state import viewer
    _, ids = two_jobs
    out = compare_panel.compare(viewer(), ids)
    assert out["table"].count("data-key=") == 1 and "data-key='learning_rate'" in out["table"]
    frame = out["plot"]["value"]
    assert set(frame["series"]) == {f"job {i} {s}" for i in ids for s in ("loss", "validation")}
    for n in (0, 1):
        assert out[f"grid{n}"]["visible"] and len(out[f"grid{n}"]["value"]) == 12
    assert not out["grid2"]["visible"]
    assert out["plot"]["visible"] and not out["plot_epoch"]["visible"]
    by_epoch = compare_panel.compare(viewer(), ids, "epoch")["plot_epoch"]
    assert by_epoch["visible"] and by_epoch["value"]["epoch"].max() == 4.0
    assert sorted(set(by_epoch["value"]["epoch"]))[:2] == [0.5, 1.0]  # 2 steps an epoch
    assert "two or more" in compare_panel.compare(viewer(), ids[:1])["message"]
    assert "no job 99" in compare_panel.compare(viewer(), [ids[0], 99])["message"]
