"""Importing a dataset from files, folders and zips: hostile input never writes outside the
dataset folder, nothing half-extracted is left, existing files are never silently replaced,
and the report says what happened to each file."""
import io
import json
import os
import stat
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from PIL import Image

from trainer.data import imports
from trainer.data.datasets import delete_dataset, list_datasets, remove_images
from trainer.data.imports import ImportLimits, Refused, import_dataset
from trainer.data.safe_names import check_dataset_name, safe_component
from trainer.errors import DatasetError

ROOT = Path(__file__).resolve().parents[1]


# --- helpers ---------------------------------------------------------------------------------

def png_bytes(color=(200, 30, 30), size=(16, 16), noise=False) -> bytes:
    image = Image.effect_noise(size, 64).convert("RGB") if noise else Image.new("RGB", size,
                                                                                 color)
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def jpeg_bytes(size=(64, 64)) -> bytes:
    out = io.BytesIO()
    Image.effect_noise(size, 64).convert("RGB").save(out, format="JPEG", quality=90)
    return out.getvalue()


def mask_bytes(size=(16, 16)) -> bytes:
    out = io.BytesIO()
    Image.new("L", size, 255).save(out, format="PNG")
    return out.getvalue()


def tree(root: Path) -> set[str]:
    """Every path under `root` (links not followed), relative, for before/after comparisons."""
    found = set()
    for current, dirs, files in os.walk(root):
        for name in dirs + files:
            found.add(os.path.relpath(os.path.join(current, name), root))
    return found


@pytest.fixture
def ws(tmp_path):
    """A workspace with something already in it, and the folder sources come from."""
    workspace = tmp_path / "ws"
    (workspace / "runs").mkdir(parents=True)
    (workspace / "runs" / "keep.txt").write_text("an earlier run")
    return workspace


def assert_confined(tmp_path: Path, before: set[str], dataset: Path) -> None:
    """Nothing new exists outside the dataset folder, and no staging folder is left."""
    new = tree(tmp_path) - before
    prefix = os.path.relpath(dataset, tmp_path)
    outside = {p for p in new if p != prefix and not p.startswith(prefix + os.sep)
               and p != os.path.dirname(prefix)}  # <ws>/datasets itself may be created
    assert outside == set(), outside
    datasets = dataset.parent
    if datasets.is_dir():
        assert [p.name for p in datasets.iterdir() if p.name.startswith(".")] == []


def codes(report) -> dict[str, str]:
    return {s.file: s.code for s in report.skipped}


# --- hostile archives and folders -------------------------------------------------------------

def test_escaping_and_absolute_zip_entries_are_refused(tmp_path, ws):
    outside = tmp_path / "outside.png"
    archive = tmp_path / "evil.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("good.png", png_bytes())
        zf.writestr("../escaped.png", png_bytes())
        zf.writestr("../../escaped2.png", png_bytes())
        zf.writestr("sub/../../escaped3.png", png_bytes())
        zf.writestr("..\\..\\windows.png", png_bytes())
        zf.writestr(str(outside), png_bytes())          # an absolute path
        zf.writestr("C:\\evil.png", png_bytes())
    before = tree(tmp_path)
    report = import_dataset([archive], "d", ws)
    dataset = ws / "datasets" / "d"
    assert report.added == ["good.png"]
    got = codes(report)
    assert set(got.values()) == {"escapes"} and len(got) == 6
    assert got[f"evil.zip:{outside}"] == "escapes"
    assert not outside.exists()
    assert tree(dataset) == {"good.png"}
    assert_confined(tmp_path, before, dataset)


def test_symlink_and_device_zip_entries_are_refused(tmp_path, ws):
    secret = tmp_path / "secret.txt"
    secret.write_text("do not read")
    archive = tmp_path / "links.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        link = zipfile.ZipInfo("a.png")
        link.external_attr = (stat.S_IFLNK | 0o777) << 16   # what `zip -y` writes for a link
        zf.writestr(link, str(secret))
        folder_link = zipfile.ZipInfo("sub/")
        folder_link.external_attr = (stat.S_IFLNK | 0o777) << 16
        zf.writestr(folder_link, str(tmp_path))
        device = zipfile.ZipInfo("b.png")
        device.external_attr = (stat.S_IFCHR | 0o644) << 16
        zf.writestr(device, b"")
        zf.writestr("sub/c.png", png_bytes())
    before = tree(tmp_path)
    report = import_dataset([archive], "d", ws)
    dataset = ws / "datasets" / "d"
    got = codes(report)
    assert got["links.zip:a.png"] == "symlink"
    assert got["links.zip:sub/"] == "symlink"       # a link named like a folder
    assert got["links.zip:b.png"] == "special"
    # The real file in 'sub/' lands in a plain folder of the dataset, not through a link.
    assert report.added == ["sub/c.png"]
    assert not (dataset / "sub").is_symlink() and (dataset / "sub" / "c.png").is_file()
    assert not (dataset / "a.png").exists()
    assert_confined(tmp_path, before, dataset)


def test_symlinks_and_pipes_in_a_source_folder_are_not_followed(tmp_path, ws):
    secret_dir = tmp_path / "private"
    secret_dir.mkdir()
    (secret_dir / "photo.png").write_bytes(png_bytes())
    source = tmp_path / "photos"
    source.mkdir()
    (source / "real.png").write_bytes(png_bytes())
    (source / "link.png").symlink_to(secret_dir / "photo.png")
    (source / "linked-folder").symlink_to(secret_dir, target_is_directory=True)
    os.mkfifo(source / "pipe.png")   # opening it would block the import forever
    before = tree(tmp_path)
    report = import_dataset([source], "d", ws)
    dataset = ws / "datasets" / "d"
    assert report.added == ["real.png"]
    assert codes(report) == {"photos/link.png": "symlink", "photos/linked-folder": "symlink",
                             "photos/pipe.png": "special"}
    assert tree(dataset) == {"real.png"}
    assert_confined(tmp_path, before, dataset)


@pytest.fixture(scope="module")
def bomb_zip(tmp_path_factory) -> Path:
    """A zip holding one 1 GiB entry of zeros (about 4.6 MB on disk), written streaming."""
    path = tmp_path_factory.mktemp("bomb") / "bomb.zip"
    zeros = bytes(1 << 20)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as zf:
        zf.writestr("fine.png", png_bytes())
        with zf.open("huge.png", "w", force_zip64=True) as entry:
            for _ in range(1024):
                entry.write(zeros)
    return path


def test_a_zip_bomb_is_refused_without_being_written(tmp_path, ws, bomb_zip, monkeypatch):
    written = []
    real_copy = imports._copy_counted

    def counting_copy(source, target, limit):
        n = real_copy(source, target, limit)
        written.append(n)
        return n

    monkeypatch.setattr(imports, "_copy_counted", counting_copy)
    before = tree(tmp_path)
    report = import_dataset([bomb_zip], "d", ws)
    dataset = ws / "datasets" / "d"
    assert codes(report) == {"bomb.zip:huge.png": "ratio"}
    assert "compression ratio" in report.skipped[0].reason
    assert report.added == ["fine.png"]
    # Refused from the declared sizes, before extraction: only the small image was written.
    assert written == [len(png_bytes())]
    assert_confined(tmp_path, before, dataset)
    assert sum(f.stat().st_size for f in dataset.rglob("*") if f.is_file()) < 10_000


def test_an_entry_that_lies_about_its_size_is_refused(tmp_path, ws):
    """The central directory says 1000 bytes; the data inflates to 8 MB."""
    archive = tmp_path / "liar.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("liar.png", bytes(8 << 20))
    data = bytearray(archive.read_bytes())
    central = data.rfind(b"PK\x01\x02")
    data[central + 24:central + 28] = (1000).to_bytes(4, "little")   # uncompressed size
    archive.write_bytes(bytes(data))
    assert zipfile.ZipFile(archive).getinfo("liar.png").file_size == 1000
    before = tree(tmp_path)
    report = import_dataset([archive], "d", ws)
    assert codes(report) == {"liar.zip:liar.png": "unreadable"}
    assert report.added == []
    assert not (ws / "datasets" / "d").exists()
    assert_confined(tmp_path, before, ws / "datasets" / "d")


def test_bytes_are_counted_while_writing_whatever_was_declared(tmp_path):
    """The copy itself stops at the declared size: a reader that does not cap what it
    inflates (zipfile happens to) still cannot write more than the limit."""
    target = io.BytesIO()
    with pytest.raises(Refused) as refused:
        imports._copy_counted(io.BytesIO(bytes(3 << 20)), target, limit=1 << 20)
    assert refused.value.code == "too_big"
    assert len(target.getvalue()) <= 1 << 20
    assert imports._copy_counted(io.BytesIO(b"12345"), io.BytesIO(), limit=5) == 5


def test_a_zip_with_too_many_entries_is_refused_before_it_is_parsed(tmp_path, ws):
    archive = tmp_path / "many.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for i in range(25):
            zf.writestr(f"{i}.txt", "x")
    assert imports.declared_zip_entries(archive) == 25
    report = import_dataset([archive], "d", ws, limits=ImportLimits(max_files=10))
    assert codes(report) == {"many.zip": "too_many"} and report.added == []


# --- content checks ---------------------------------------------------------------------------

def test_fake_truncated_and_unreadable_files_are_refused_with_reasons(tmp_path, ws):
    source = tmp_path / "photos"
    source.mkdir()
    (source / "good.jpg").write_bytes(jpeg_bytes())
    (source / "fake.png").write_text("this is text, renamed")
    (source / "empty.png").write_bytes(b"")
    jpeg = jpeg_bytes((128, 128))
    (source / "cut.jpg").write_bytes(jpeg[:len(jpeg) // 2])
    png = png_bytes(size=(128, 128), noise=True)
    (source / "cut.png").write_bytes(png[:len(png) // 2])
    (source / "notes.pdf").write_bytes(b"%PDF-1.4")
    (source / "good.txt").write_text("a photo", encoding="utf-8")
    (source / "fake.txt").write_bytes("caf\xe9".encode("latin-1"))   # not UTF-8
    (source / "mask-masklabel.jpg").write_bytes(jpeg_bytes())
    before = tree(tmp_path)
    report = import_dataset([source], "d", ws)
    assert sorted(report.added) == ["good.jpg", "good.txt"]
    got = codes(report)
    assert got["photos/fake.png"] == "not_image"
    assert got["photos/empty.png"] == "not_image"
    assert got["photos/cut.jpg"] == "truncated"
    assert got["photos/cut.png"] in ("truncated", "unreadable")
    assert got["photos/notes.pdf"] == "not_image"
    assert got["photos/fake.txt"] == "not_utf8"
    assert got["photos/mask-masklabel.jpg"] == "not_image"
    reasons = {s.file: s.reason for s in report.skipped}
    assert "UTF-8" in reasons["photos/fake.txt"] and "truncated" in reasons["photos/cut.jpg"]
    assert_confined(tmp_path, before, ws / "datasets" / "d")


def test_captions_and_masks_travel_with_their_images(tmp_path, ws):
    archive = tmp_path / "set.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("cat.png", png_bytes())
        zf.writestr("cat.txt", "a cat")
        zf.writestr("cat-masklabel.png", mask_bytes())
        zf.writestr("fake.png", "not an image")
        zf.writestr("fake.txt", "its caption")           # goes with the refused image
        zf.writestr("fake-masklabel.png", mask_bytes())
        zf.writestr("readme.txt", "no image of this name")
    report = import_dataset([archive], "d", ws)
    assert sorted(report.added) == ["cat-masklabel.png", "cat.png", "cat.txt"]
    got = codes(report)
    assert got == {"set.zip:fake.png": "not_image", "set.zip:fake.txt": "orphan",
                   "set.zip:fake-masklabel.png": "orphan", "set.zip:readme.txt": "orphan"}
    # A caption for an image the dataset already has is welcome later.
    caption = tmp_path / "cat2.txt"
    (tmp_path / "more").mkdir()
    caption = tmp_path / "more" / "cat.txt"
    caption.write_text("a better caption")
    report = import_dataset([caption], "d", ws, replace=True)
    assert report.added == ["cat.txt"] and report.replaced == ["cat.txt"]


def test_subfolders_are_kept_from_zips_and_folders(tmp_path, ws):
    archive = tmp_path / "nested.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("cats/", b"")
        zf.writestr("cats/a.png", png_bytes())
        zf.writestr("cats/a.txt", "a cat")
        zf.writestr("dogs/small/b.png", png_bytes())
        zf.writestr("__MACOSX/cats/._a.png", b"\x00\x05\x16\x07")
        zf.writestr(".DS_Store", b"\x00")
    folder = tmp_path / "more"
    (folder / "birds").mkdir(parents=True)
    (folder / "birds" / "c.png").write_bytes(png_bytes())
    (folder / "top.png").write_bytes(png_bytes())
    (folder / ".git").mkdir()
    (folder / ".git" / "inside.png").write_bytes(png_bytes())
    report = import_dataset([archive, folder], "d", ws)
    assert sorted(report.added) == ["birds/c.png", "cats/a.png", "cats/a.txt",
                                    "dogs/small/b.png", "top.png"]
    assert codes(report) == {"nested.zip:__MACOSX/cats/._a.png": "hidden",
                             "nested.zip:.DS_Store": "hidden", "more/.git": "hidden"}
    dataset = ws / "datasets" / "d"
    assert (dataset / "dogs" / "small" / "b.png").is_file()
    assert not (dataset / "__MACOSX").exists() and not (dataset / ".DS_Store").exists()


# --- names ------------------------------------------------------------------------------------

def test_unicode_names_stay_readable_and_are_made_safe(tmp_path, ws):
    archive = tmp_path / "names.zip"
    long_stem = "ß" * 200   # 400 bytes of UTF-8
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("cafe\u0301.png", png_bytes())           # NFD, as macOS writes it
        zf.writestr("猫の写真/たま.png", png_bytes())
        zf.writestr("bell\x07\x1b.png", png_bytes())
        zf.writestr("gnp\u202e.exe.png", png_bytes())          # a right-to-left override
        zf.writestr("CON.png", png_bytes())
        zf.writestr("what?.png", png_bytes())
        zf.writestr(f"{long_stem}.png", png_bytes())
        zf.writestr(f"{long_stem}.txt", "a long name")
        zf.writestr(f"{long_stem}-masklabel.png", mask_bytes())
    report = import_dataset([archive], "d", ws)
    assert report.skipped == []
    added = set(report.added)
    assert "caf\u00e9.png" in added                            # NFC
    assert "猫の写真/たま.png" in added
    assert "bell__.png" in added
    assert "gnp_.exe.png" in added
    assert "_CON.png" in added and "what_.png" in added
    long_names = sorted(a for a in added if a.startswith("ß"))
    assert len(long_names) == 3
    stems = {Path(n).stem.removesuffix("-masklabel") for n in long_names}
    assert len(stems) == 1 and all(len(n.encode()) <= 150 for n in long_names)
    summary = list_datasets(ws)[0]
    assert (summary.images, summary.captions, summary.masks) == (7, 1, 1)


def test_safe_component_and_dataset_names():
    assert safe_component("  ..hidden.png ") == "hidden.png"
    assert safe_component("a/b\\c.png") == "a_b_c.png"
    assert safe_component("trailing. . ") == "trailing"
    assert safe_component("nul.txt") == "_nul.txt"
    # A stem just under the limit is cut the same beside every suffix: the pairs stay pairs.
    stem = "a" * 140
    cut = {safe_component(stem + tail).removesuffix(tail[-4:]).removesuffix("-masklabel")
           for tail in (".png", ".txt", "-masklabel.png")}
    assert len(cut) == 1
    assert check_dataset_name(" My cats 🐈 ") == "My cats 🐈"
    for bad in ("", "  ", "../x", "a/b", "..", ".hidden", "CON", "tab\tname", "x" * 300):
        with pytest.raises(DatasetError):
            check_dataset_name(bad)


# --- duplicates, limits -----------------------------------------------------------------------

def test_existing_files_are_skipped_unless_replace_is_asked(tmp_path, ws):
    source = tmp_path / "photos"
    source.mkdir()
    (source / "a.png").write_bytes(png_bytes((255, 0, 0)))
    (source / "a.txt").write_text("first")
    first = import_dataset([source], "d", ws)
    assert sorted(first.added) == ["a.png", "a.txt"] and first.complete
    dataset = ws / "datasets" / "d"

    (source / "a.png").write_bytes(png_bytes((0, 0, 255)))
    (source / "a.txt").write_text("second")
    (source / "b.png").write_bytes(png_bytes())
    again = import_dataset([source], "d", ws)
    assert again.added == ["b.png"]
    assert codes(again) == {"photos/a.png": "exists", "photos/a.txt": "exists"}
    assert (dataset / "a.txt").read_text() == "first"
    with Image.open(dataset / "a.png") as image:
        assert image.getpixel((0, 0)) == (255, 0, 0)

    replaced = import_dataset([source / "a.png", source / "a.txt"], "d", ws, replace=True)
    assert sorted(replaced.replaced) == ["a.png", "a.txt"] and replaced.complete
    assert (dataset / "a.txt").read_text() == "second"
    with Image.open(dataset / "a.png") as image:
        assert image.getpixel((0, 0)) == (0, 0, 255)

    archive = tmp_path / "twice.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("c.png", png_bytes())
        zf.writestr("c?.png", png_bytes())   # made safe, it is 'c_.png': distinct
        zf.writestr("./c.png", png_bytes())  # the same name again in one upload
    report = import_dataset([archive], "d", ws)
    assert sorted(report.added) == ["c.png", "c_.png"]
    assert codes(report) == {"twice.zip:./c.png": "duplicate"}


def test_quota_dataset_and_upload_limits(tmp_path, ws):
    image = png_bytes(noise=True, size=(32, 32))
    source = tmp_path / "photos"
    source.mkdir()
    for i in range(6):
        (source / f"{i}.png").write_bytes(image)
    used = sum(f.stat().st_size for f in ws.rglob("*") if f.is_file())
    # Room in the workspace for three more images.
    limits = ImportLimits(quota_bytes=used + 3 * len(image) + 10)
    before = tree(tmp_path)
    report = import_dataset([source], "d", ws, limits=limits)
    assert sorted(report.added) == ["0.png", "1.png", "2.png"]
    assert set(codes(report).values()) == {"quota"}
    assert "quota exceeded" in report.skipped[0].reason
    assert_confined(tmp_path, before, ws / "datasets" / "d")

    report = import_dataset([source], "e", ws, limits=ImportLimits(
        max_dataset_bytes=2 * len(image)))
    assert len(report.added) == 2 and set(codes(report).values()) == {"quota"}
    report = import_dataset([source], "f", ws, limits=ImportLimits(
        max_upload_bytes=len(image)))
    assert len(report.added) == 1 and set(codes(report).values()) == {"too_big"}
    report = import_dataset([source], "g", ws, limits=ImportLimits(
        max_file_bytes=len(image) - 1))
    assert report.added == [] and not (ws / "datasets" / "g").exists()


def test_files_per_upload_limit(tmp_path, ws):
    source = tmp_path / "photos"
    source.mkdir()
    for i in range(5):
        (source / f"{i}.png").write_bytes(png_bytes())
    report = import_dataset([source], "d", ws, limits=ImportLimits(max_files=3))
    assert sorted(report.added) == ["0.png", "1.png", "2.png"]
    assert codes(report) == {"photos (2 more file(s))": "too_many"}


# --- all or nothing ---------------------------------------------------------------------------

def test_a_failure_mid_import_leaves_no_half_dataset(tmp_path, ws, monkeypatch):
    source = tmp_path / "photos"
    source.mkdir()
    for i in range(3):
        (source / f"{i}.png").write_bytes(png_bytes())
    seen = []

    def crash_on_third(path):
        seen.append(path)
        if len(seen) == 3:
            raise RuntimeError("disk gone")

    monkeypatch.setattr(imports, "check_image", crash_on_third)
    before = tree(tmp_path)
    with pytest.raises(RuntimeError):
        import_dataset([source], "d", ws)
    assert not (ws / "datasets" / "d").exists()
    assert tree(tmp_path) - before <= {os.path.relpath(ws / "datasets", tmp_path)}
    assert list((ws / "datasets").iterdir()) == []


def test_bad_arguments_write_nothing(tmp_path, ws):
    with pytest.raises(DatasetError, match="does not exist"):
        import_dataset([tmp_path / "missing.zip"], "d", ws)
    with pytest.raises(DatasetError, match="path separator"):
        import_dataset([tmp_path], "../up", ws)
    assert not (ws / "datasets").exists()


# --- listing, removing, deleting --------------------------------------------------------------

def test_list_remove_and_delete_datasets(tmp_path, ws):
    source = tmp_path / "photos"
    (source / "sub").mkdir(parents=True)
    for stem in ("a", "b"):
        (source / f"{stem}.png").write_bytes(png_bytes())
        (source / f"{stem}.txt").write_text(stem)
    (source / "a-masklabel.png").write_bytes(mask_bytes())
    (source / "sub" / "c.jpg").write_bytes(jpeg_bytes())
    import_dataset([source], "cats", ws)
    import_dataset([source / "b.png"], "dogs", ws)
    summaries = {s.name: s for s in list_datasets(ws)}
    assert set(summaries) == {"cats", "dogs"}
    cats = summaries["cats"]
    assert (cats.images, cats.captions, cats.masks) == (3, 2, 1)
    assert (summaries["dogs"].images, summaries["dogs"].captions) == (1, 0)

    removed = remove_images(ws, "cats", ["a.png", "sub/c.jpg"])
    assert sorted(removed) == ["a-masklabel.png", "a.png", "a.txt", "sub/c.jpg"]
    assert tree(ws / "datasets" / "cats") == {"b.png", "b.txt", "sub"}
    for bad in (["../dogs/b.png"], ["b.txt"], [str(ws / "datasets" / "dogs" / "b.png")]):
        with pytest.raises(DatasetError):
            remove_images(ws, "cats", bad)
    assert (ws / "datasets" / "dogs" / "b.png").is_file()

    delete_dataset(ws, "cats")
    assert [s.name for s in list_datasets(ws)] == ["dogs"]
    assert sorted(p.name for p in (ws / "datasets").iterdir()) == ["dogs"]
    assert (ws / "runs" / "keep.txt").is_file()
    with pytest.raises(DatasetError):
        delete_dataset(ws, "cats")


def test_delete_never_follows_a_link_out_of_the_dataset(tmp_path, ws):
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "keep.png").write_bytes(png_bytes())
    import_dataset([precious / "keep.png"], "d", ws)
    (ws / "datasets" / "d" / "elsewhere").symlink_to(precious, target_is_directory=True)
    with pytest.raises(DatasetError):
        remove_images(ws, "d", ["elsewhere/keep.png"])
    delete_dataset(ws, "d")
    assert (precious / "keep.png").is_file()


# --- the command line -------------------------------------------------------------------------

def cli(*args):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False"}
    return subprocess.run([sys.executable, "-m", "trainer", "dataset", *args], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=120)


def test_cli_exit_status_and_json_report(tmp_path, ws):
    source = tmp_path / "photos"
    source.mkdir()
    (source / "a.png").write_bytes(png_bytes())
    (source / "a.txt").write_text("a cat")
    report_file = tmp_path / "report.json"

    done = cli("import", str(source), "--name", "cats", "--workspace", str(ws),
               "--json", str(report_file))
    assert done.returncode == 0, done.stderr
    data = json.loads(report_file.read_text())
    assert data["dataset"] == str(ws / "datasets" / "cats")
    assert sorted(data["added"]) == ["a.png", "a.txt"] and data["skipped"] == []

    (source / "fake.png").write_text("not an image")
    done = cli("import", str(source), "--name", "cats", "--workspace", str(ws),
               "--json", str(report_file))
    assert done.returncode == 1, done.stderr
    data = json.loads(report_file.read_text())
    assert data["added"] == []
    skipped = {s["file"]: s["reason"] for s in data["skipped"]}
    assert set(skipped) == {"photos/a.png", "photos/a.txt", "photos/fake.png"}
    assert "already exists" in skipped["photos/a.png"]
    assert "not an image" in skipped["photos/fake.png"]
    assert "fake.png" in done.stdout
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []

    done = cli("import", str(source / "a.png"), "--name", "cats", "--workspace", str(ws),
               "--replace")
    assert done.returncode == 0, done.stderr

    listed = cli("list", "--workspace", str(ws))
    assert listed.returncode == 0 and "cats: 1 images, 1 captions, 0 masks" in listed.stdout


def test_cli_bad_arguments_exit_2(tmp_path, ws):
    missing = cli("import", str(tmp_path / "nope.zip"), "--name", "d", "--workspace", str(ws))
    assert missing.returncode == 2
    assert "nope.zip" in missing.stderr and "Traceback" not in missing.stderr
    bad_name = cli("import", str(tmp_path), "--name", "../d", "--workspace", str(ws))
    assert bad_name.returncode == 2 and "Traceback" not in bad_name.stderr
    no_name = cli("import", str(tmp_path), "--workspace", str(ws))
    assert no_name.returncode == 2 and "--name" in no_name.stderr
    assert not (ws / "datasets").exists()
