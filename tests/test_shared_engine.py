"""A shared server's engine keeps each user's work their own and cannot be exhausted by one
visitor (issue 23), driven through the engine's API: a JobQueue in shared mode with users
alice and bob and an admin, a stand-in for the training loop that writes its output where
the real loop would (trainer.finetune's paths, the atomic folder swap), and the dataset
writers (caption edits, masks) with their bounds.

For each class of the issue the engine decides, the attempt is refused (or confined into the
caller's own job folder) and the victim's files are byte-for-byte unchanged; the admin can
still do it; a local (non-shared) queue behaves as before.
"""
from __future__ import annotations

import hashlib
import json
import threading
import time
from pathlib import Path

import pytest
from PIL import Image

from trainer import finetune
from trainer.config import SampleConfig, config_from_dict
from trainer.data.datasets import set_dataset_owner
from trainer.data.imports import ImportLimits, Room, check_room
from trainer.demo import DEMO_DATASET_DIR
from trainer.errors import AtelierError, CaptionError, ConfigError, DatasetError
from trainer.io import MODEL_MARKER, atomic_folder, atomic_write_text
from trainer.jobs.queue import JobQueue
from trainer.limits import ServerLimits
from trainer.loop import TrainResult
from trainer.ownership import Access, Realm, Viewer

ALICE, BOB = Viewer("alice", admin=False), Viewer("bob", admin=False)
ADMIN = Viewer("root", admin=True)


def writing_train(config, control, **kwargs):
    """The loop's writes without the training: the output where trainer.finetune puts it (a
    diffusers folder through the atomic folder swap) and the config JSON beside it."""
    control.emit("started", total_steps=1, steps_per_epoch=1, epochs=1, images=1)
    out = finetune.output_path(config)
    if finetune.writes_folder(config):
        with atomic_folder(out) as staging:
            (staging / "model_index.json").write_text("{}")
    else:
        atomic_write_text(out, f"weights of {config.seed}")
    atomic_write_text(finetune.config_path(out), config.to_json())
    return TrainResult(str(out), 1, 1, False)


def fingerprint(*roots: Path) -> dict[str, str]:
    """Every file under `roots` with the hash of its bytes."""
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest()
            for root in roots for p in sorted(Path(root).rglob("*")) if p.is_file()}


def add_images(folder: Path, count: int, caption: str = "a cat") -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        Image.new("RGB", (16, 16), (i * 40, 0, 0)).save(folder / f"img{i}.png")
        (folder / f"img{i}.txt").write_text(caption + "\n")


class Server:
    def __init__(self, root: Path, limits: ServerLimits | None = None, shared: bool = True):
        self.ws = root / "ws"
        (self.ws / "tiny-sd15").mkdir(parents=True)
        self.realm = Realm(self.ws, shared=shared, confine=shared,
                           public=(DEMO_DATASET_DIR, self.ws / "tiny-sd15"))
        self.hold = threading.Event()   # cleared: jobs wait (running or queued) until set
        self.hold.set()
        self.queue = JobQueue(train_fn=self.train)
        self.queue.admins = frozenset({"root"})
        self.queue.open(self.ws, realm=self.realm, limits=limits or ServerLimits())

    def train(self, config, control, **kwargs):
        while not self.hold.wait(0.02):
            if control.stop_requested:
                return TrainResult("", 0, 0, True)
        return writing_train(config, control)

    def config(self, **extra):
        data = {"base_model_name": str(self.ws / "tiny-sd15"), "resolution": "64",
                "concepts": [{"path": str(DEMO_DATASET_DIR)}], "epochs": 1,
                "backup_after_unit": "NEVER"}
        data.update(extra)
        return config_from_dict(data, warn=lambda m: None)

    def run(self, viewer: Viewer, **extra):
        job, _ = self.queue.submit(self.config(**extra), viewer)
        assert self.queue.wait(30)
        done = self.queue.get(job.id)
        assert done.status == "finished", done.message
        return done

    def access(self, viewer: Viewer) -> Access:
        return Access(self.realm, viewer)


@pytest.fixture
def server(tmp_path):
    server = Server(tmp_path)
    # alice's things: a finished job with its output, and a dataset of her own
    server.alice_job = server.run(ALICE, output_model_destination="")
    server.alice_folder = server.queue.store.folder(server.alice_job.id)
    server.alice_output = server.alice_folder / "output" / "lora.safetensors"
    assert server.alice_output.is_file()
    server.cats = server.ws / "datasets" / "cats"
    add_images(server.cats, 3)
    set_dataset_owner(server.cats, "alice")
    server.cli = server.ws / "datasets" / "cli"       # imported with the CLI: no owner
    add_images(server.cli, 2)
    server.before = fingerprint(server.alice_folder, server.cats)
    return server


def unchanged(server) -> bool:
    return fingerprint(server.alice_folder, server.cats) == server.before


# -- 2: outputs land in the caller's own job folder ---------------------------------------------

@pytest.mark.parametrize("target", ["lora", "job json", "job folder", "demo model"])
def test_a_users_output_is_confined_to_their_own_job_folder(server, target):
    fine_tune = {"training_method": "FINE_TUNE", "output_model_format": "DIFFUSERS"}
    extra = {"lora": {"output_model_destination": str(server.alice_output)},
             # the JSON beside 'job.safetensors' would be alice's job.json
             "job json": {"output_model_destination": str(server.alice_folder / "job")},
             "job folder": {**fine_tune, "output_model_destination": str(server.alice_folder)},
             "demo model": {**fine_tune,
                            "output_model_destination": str(server.ws / "tiny-sd15")}}[target]
    job = server.run(BOB, **extra)
    bobs = server.queue.store.folder(job.id)
    assert Path(job.output_path).parent == bobs / "output"
    assert Path(job.output_path).exists()
    # the record keeps what was submitted; the file went into bob's own folder
    assert job.config["output_model_destination"] == extra["output_model_destination"]
    assert unchanged(server)
    assert not list((server.ws / "tiny-sd15").iterdir())


def test_an_admin_keeps_the_chosen_output_path_in_the_workspace(server):
    chosen = server.ws / "shared-models" / "house-style.safetensors"
    job = server.run(ADMIN, output_model_destination=str(chosen))
    assert job.output_path == str(chosen) and chosen.is_file()
    # even an admin's output never replaces the server's records or a whole job folder
    fine_tune = {"training_method": "FINE_TUNE", "output_model_format": "DIFFUSERS"}
    for extra in ({"output_model_destination": str(server.alice_folder / "job")},
                  {"output_model_destination": str(server.alice_folder)},
                  {**fine_tune, "output_model_destination": str(server.alice_folder)},
                  {**fine_tune, "output_model_destination": str(server.ws / "jobs.db")},
                  {**fine_tune, "output_model_destination": str(server.cats)}):
        with pytest.raises(ConfigError, match="^output_model_destination: .* would replace"):
            server.queue.submit(server.config(**extra), ADMIN)
    with pytest.raises(ConfigError, match="output_model_destination.*outside"):
        server.queue.submit(server.config(output_model_destination="/tmp/x.safetensors"), ADMIN)
    assert unchanged(server)


def test_the_folder_swap_replaces_only_model_folders_it_wrote(server, tmp_path):
    def swap(folder: Path) -> None:
        with atomic_folder(folder) as staging:
            (staging / "model_index.json").write_text('{"new": true}')

    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "config.json").write_text("{}")  # merely holds config.json: not a model
    legacy_job = tmp_path / "legacy-job"
    legacy_job.mkdir()
    for name in ("model_index.json", "job.json"):
        (legacy_job / name).write_text("{}")
    for folder in (server.alice_folder, server.cats, notes, legacy_job):
        before = fingerprint(folder)
        with pytest.raises(AtelierError, match="not replaced"):
            swap(folder)
        assert fingerprint(folder) == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(("notes.", "legacy-job."))]
    # a model folder it wrote (the marker), and an old diffusers folder, are replaced
    made = tmp_path / "made"
    swap(made)
    assert (made / MODEL_MARKER).is_file()
    swap(made)
    old = tmp_path / "old-model"
    old.mkdir()
    (old / "model_index.json").write_text("{}")
    (old / "unet").mkdir()
    swap(old)
    assert json.loads((old / "model_index.json").read_text()) == {"new": True}
    assert not (old / "unet").exists()
    assert unchanged(server)


# -- 4: datasets (training on them) and 6: embeddings -------------------------------------------

def test_another_users_dataset_is_not_trained_on(server):
    ghost = server.ws / "datasets" / "ghost"  # no such dataset: refused the same way
    messages = []
    for folder in (server.cats, server.cats / "img0.png", ghost):
        with pytest.raises(ConfigError, match=r"^concepts\[0\]\.path: ") as error:
            server.queue.submit(server.config(concepts=[{"path": str(folder)}]), BOB)
        messages.append(str(error.value).replace(str(folder), "P"))
    assert messages[0] == messages[1] == messages[2]
    # readable: the CLI dataset, the demo dataset; the owner and the admin read hers
    server.run(BOB, concepts=[{"path": str(server.cli)}, {"path": str(DEMO_DATASET_DIR)}])
    server.run(ALICE, concepts=[{"path": str(server.cats)}])
    server.run(ADMIN, concepts=[{"path": str(server.cats)}])
    assert unchanged(server)


def test_embedding_files_are_confined_before_they_are_looked_at(server, tmp_path):
    secret = tmp_path / "secret.safetensors"
    secret.write_bytes(b"not read")
    planted = server.alice_folder / "emb.safetensors"
    planted.write_bytes(b"alice's")
    server.before = fingerprint(server.alice_folder, server.cats)

    def refusal(path: Path) -> str:
        embedding = {"placeholder": "<x>", "model_name": str(path)}
        with pytest.raises(ConfigError) as error:
            server.queue.submit(server.config(additional_embeddings=[embedding]), BOB)
        return str(error.value).replace(str(path), "P")

    outside = [refusal(secret), refusal(tmp_path / "missing.safetensors")]
    assert outside[0] == outside[1]
    assert outside[0].startswith("additional_embeddings[0].model_name: 'P' is outside")
    inside = [refusal(planted), refusal(server.alice_folder / "missing.safetensors")]
    assert inside[0] == inside[1] and "cannot be read by you" in inside[0]
    # the reader itself, given the caller's access, refuses before it opens anything
    from trainer.embeddings import read_vectors
    for path in (secret, tmp_path / "missing.safetensors"):
        with pytest.raises(ConfigError, match="is outside"):
            read_vectors(str(path), "text_encoder", False, "model_name", server.access(BOB))
    assert unchanged(server)


def test_a_job_is_checked_again_when_it_starts(server):
    # As a job queued before its dataset changed hands (or a record written by hand): the
    # paths are checked again for its owner when it starts, not only at submit.
    plant_backup(server.alice_folder, 7)
    server.before = fingerprint(server.alice_folder, server.cats)
    for extra in ({"concepts": [{"path": str(server.cats)}]},
                  {"continue_last_backup": True, "workspace_dir": str(server.alice_folder)}):
        job = server.queue.store.add("bob", server.config(**extra).model_dump(mode="json"))
        server.queue.open(server.ws, realm=server.realm)
        assert server.queue.wait(30)
        failed = server.queue.get(job.id)
        assert failed.status == "failed" and failed.error.startswith(
            ("concepts[0].path: ", "workspace_dir: ")), failed.error
        assert not (server.queue.store.folder(job.id) / "backup").exists()
    assert unchanged(server)


# -- 5: continuing another user's backup ---------------------------------------------------------

def plant_backup(folder: Path, step: int) -> Path:
    backup = folder / "backup" / f"step-{step}"
    backup.mkdir(parents=True)
    (backup / "progress.json").write_text(json.dumps({"step": step, "written_at": 1.0}))
    return backup


def test_a_backup_is_continued_only_from_the_callers_own_folders(server):
    plant_backup(server.alice_folder, 7)
    server.before = fingerprint(server.alice_folder, server.cats)
    for folder in (server.alice_folder, server.ws / "run", server.ws):
        with pytest.raises(ConfigError, match="^workspace_dir: "):
            server.queue.submit(server.config(continue_last_backup=True,
                                              workspace_dir=str(folder)), BOB)
    # bob continues his own run; the admin may continue alice's
    first = server.run(BOB)
    plant_backup(server.queue.store.folder(first.id), 3)
    again = server.run(BOB, continue_last_backup=True,
                       workspace_dir=str(server.queue.store.folder(first.id)))
    assert [p.name for p in (server.queue.store.folder(again.id) / "backup").iterdir()] == [
        "step-3"]
    by_admin = server.run(ADMIN, continue_last_backup=True,
                          workspace_dir=str(server.alice_folder))
    assert (server.queue.store.folder(by_admin.id) / "backup" / "step-7").is_dir()
    assert unchanged(server)


# -- 7: limits --------------------------------------------------------------------------------------

def test_limits_refuse_naming_the_limit_and_its_option(tmp_path):
    server = Server(tmp_path, ServerLimits(max_steps_per_job=100, max_jobs_per_user=2))
    server.hold.clear()  # jobs stay running and queued while the test submits
    add_images(server.ws / "datasets" / "cli", 4)
    many = {"concepts": [{"path": str(server.ws / "datasets" / "cli")}], "epochs": 30}
    with pytest.raises(ConfigError, match=r"120 optimizer steps.*100, --max-steps-per-job"):
        server.queue.submit(server.config(**many), BOB)
    server.queue.submit(server.config(**many, batch_size=2), BOB)   # 60 steps
    server.queue.submit(server.config(), BOB)
    with pytest.raises(ConfigError, match=r"2 job\(s\).*\(2, --max-jobs-per-user\)"):
        server.queue.submit(server.config(), BOB)
    server.queue.submit(server.config(), ALICE)                      # hers are counted apart
    server.queue.submit(server.config(**many), ADMIN)                # admins are not limited
    server.hold.set()
    assert server.queue.wait(30)
    server.queue.submit(server.config(), BOB)                        # his ended: room again
    assert server.queue.wait(30)


def test_absurd_numbers_are_refused_not_spun_on(server):
    started = time.monotonic()
    with pytest.raises(ConfigError, match="epochs: Input should be less than or equal to"):
        server.config(epochs=10 ** 30)
    with pytest.raises(ConfigError, match="epochs: .*a number too long to show"):
        server.config(epochs=10 ** 5000)
    for job_id in (10 ** 30, -1, 0, "abc", "9" * 30, 10 ** 5000):
        for act in (server.queue.get, server.queue.cancel, server.queue.delete):
            with pytest.raises(AtelierError, match="^There is no job "):
                act(job_id, BOB)
    assert server.queue.store.get(10 ** 30) is None
    # a concept path of 100,000 components is refused at once, not resolved part by part
    with pytest.raises(ConfigError, match=r"concepts\[0\]\.path"):
        server.queue.submit(server.config(concepts=[{"path": "a/" * 100_000}]), BOB)
    assert time.monotonic() - started < 10


def test_caption_edits_are_bounded_and_refused_whole(server):
    from trainer.captions.edit import add_trigger, find_replace
    mine = server.ws / "datasets" / "bobs"
    add_images(mine, 3, "a cat, a dog")
    set_dataset_owner(mine, "bob")
    before = fingerprint(mine)
    with pytest.raises(CaptionError, match=r"img0\.txt: .*\(30 characters, --max-caption-chars\)"):
        find_replace(mine, "a", "aaaaaaaa", max_chars=30)
    with pytest.raises(DatasetError, match=r"'bobs' would pass its size limit .*--max-dataset-gb"):
        add_trigger(mine, "ohwx", limits=ImportLimits(max_dataset_bytes=200),
                    workspace=server.ws)
    with pytest.raises(DatasetError, match=r"workspace would pass its quota .*--quota-gb"):
        add_trigger(mine, "ohwx", limits=ImportLimits(quota_bytes=1000), workspace=server.ws)
    assert fingerprint(mine) == before          # refused whole: not one caption written
    # another user's dataset, and the CLI dataset, cannot be edited by bob
    for folder in (server.cats, server.cli):
        with pytest.raises(ConfigError, match="^folder: .*cannot be written"):
            add_trigger(folder, "ohwx", access=server.access(BOB))
    summary = add_trigger(mine, "ohwx", max_chars=30, access=server.access(BOB),
                          limits=ImportLimits(), workspace=server.ws)
    assert len(summary.changed) == 3
    assert (mine / "img0.txt").read_text() == "ohwx, a cat, a dog\n"
    assert len(add_trigger(server.cats, "ohwx", access=server.access(ADMIN)).changed) == 3
    assert (server.cats / "img0.txt").read_text() == "ohwx, a cat\n"


def test_mask_writes_count_against_the_quotas_and_the_owner(server):
    from trainer.masks.store import write_mask
    image = server.cats / "img0.png"
    mask = Image.new("L", (16, 16), 255)
    with pytest.raises(ConfigError, match="^mask: .*cannot be written"):
        write_mask(image, mask, access=server.access(BOB))
    with pytest.raises(DatasetError, match=r"img0-masklabel\.png: .*--max-dataset-gb"):
        write_mask(image, mask, access=server.access(ALICE),
                   limits=ImportLimits(max_dataset_bytes=10), workspace=server.ws)
    assert unchanged(server)
    written = write_mask(image, mask, access=server.access(ALICE), limits=ImportLimits(),
                         workspace=server.ws)
    assert written.is_file()
    # a folder run measures once and charges each mask
    room = Room.measure(server.cats, ImportLimits(max_dataset_bytes=10 ** 6), server.ws)
    before = room.dataset_bytes
    write_mask(server.cats / "img1.png", mask, room=room)
    assert room.dataset_bytes == before + (server.cats / "img1-masklabel.png").stat().st_size
    check_room(server.cats, 0, ImportLimits(max_dataset_bytes=1))  # nothing added: no refusal


def test_try_it_is_bounded_and_reads_only_the_callers_files(server):
    from trainer.try_lora import LoraFile, TryModel, check_try_request
    with pytest.raises(ConfigError, match=r"width 2,048 .* 1,536 \(--try-max-size\)"):
        check_try_request(SampleConfig(width=2048), max_size=1536, max_steps=60)
    with pytest.raises(ConfigError, match=r"steps 150 .* 60 \(--try-max-steps\)"):
        check_try_request(SampleConfig(diffusion_steps=150), max_size=1536, max_steps=60)
    check_try_request(SampleConfig(width=1536, height=1536, diffusion_steps=60),
                      max_size=1536, max_steps=60)
    alices = LoraFile(server.alice_output, str(server.ws / "tiny-sd15"),
                      "STABLE_DIFFUSION_15", "", 64)
    with pytest.raises(ConfigError, match="^lora: .*cannot be read"):
        TryModel().images(alices, SampleConfig(), 1.0, access=server.access(BOB))
    with pytest.raises(ConfigError, match="--try-max-size"):
        TryModel().images(alices, SampleConfig(width=4096), 1.0, max_size=1536,
                          access=server.access(ALICE))
    assert unchanged(server)


# -- a local server is unchanged ------------------------------------------------------------------

def test_a_local_queue_writes_where_it_is_told_and_reads_anything(tmp_path):
    server = Server(tmp_path, shared=False)
    elsewhere = tmp_path / "elsewhere"
    add_images(elsewhere / "data", 2)
    chosen = elsewhere / "out" / "mine.safetensors"
    job = server.run(Viewer(), output_model_destination=str(chosen),
                     concepts=[{"path": str(elsewhere / "data")}], epochs=10 ** 6)
    assert job.output_path == str(chosen) and chosen.is_file()
    plant_backup(elsewhere / "run", 5)
    again = server.run(Viewer(), continue_last_backup=True, workspace_dir=str(elsewhere / "run"))
    assert (server.queue.store.folder(again.id) / "backup" / "step-5").is_dir()


def test_folder_runs_stop_at_the_quota_and_keep_what_they_did_not_write(tmp_path):
    """Automatic masks and captions over a folder charge each file to the quota: the run
    writes what fits, then stops with the quota named; later images keep their files."""
    from trainer.captions.generate import CaptionSettings, caption_folder
    from trainer.captions.tiny import build_tiny_blip
    from trainer.masks.generate import MaskSettings, generate_masks

    folder = tmp_path / "ws" / "datasets" / "cats"
    add_images(folder, 4)
    size = sum(p.stat().st_size for p in folder.iterdir())
    settings = MaskSettings(method="color", color="#000000", mode="replace")
    # room for one mask (16x16 PNGs of a few dozen bytes each), not for two
    one_mask = 200
    room = Room.measure(folder, ImportLimits(max_dataset_bytes=size + one_mask), tmp_path / "ws")
    summary = generate_masks(folder, settings, room=room)
    assert summary.stopped and "--max-dataset-gb" in summary.failed[0][1]
    written = sorted(folder.glob("*-masklabel.png"))
    assert [p.name for p in written] == [n.replace(".png", "-masklabel.png")
                                         for n in summary.written] and 1 <= len(written) < 4
    assert sum(p.stat().st_size for p in folder.iterdir()) <= size + one_mask
    room = Room.measure(folder, ImportLimits(), tmp_path / "ws")
    assert len(generate_masks(folder, settings, room=room).written) == 4  # room enough

    model = tmp_path / "captioner"
    build_tiny_blip(str(model))
    room = Room.measure(folder, ImportLimits(max_dataset_bytes=1), tmp_path / "ws")
    texts = {p.name: p.read_bytes() for p in folder.glob("*.txt")}
    summary = caption_folder(folder, CaptionSettings(model=str(model), mode="replace",
                                                     prefix="x" * 50), room=room)
    assert summary.stopped and not summary.captioned and "--max-dataset-gb" in summary.failed[0][1]
    assert {p.name: p.read_bytes() for p in folder.glob("*.txt")} == texts


def test_an_imported_dataset_has_its_owner_from_the_start(tmp_path):
    from trainer.data.datasets import dataset_owner
    from trainer.data.imports import import_dataset
    source = tmp_path / "src"
    add_images(source, 2)
    report = import_dataset([source], "mine", tmp_path / "ws", owner="alice")
    assert report.added and dataset_owner(report.dataset) == "alice"
    assert Access(Realm(tmp_path / "ws", shared=True, confine=True),
                  Viewer("bob", admin=False)).can_read(report.dataset) is False
    # adding to an existing dataset never changes its owner
    import_dataset([source], "mine", tmp_path / "ws", owner="bob", replace=True)
    assert dataset_owner(report.dataset) == "alice"
