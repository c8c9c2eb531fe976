"""``moco shard``: tiny images written with PIL, shards read back with pyarrow."""

from __future__ import annotations

import io
import json
import os
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipelines import cli
from pipelines.ingest import shard_plan, shard_writer
from pipelines.ingest.schema import MANIFEST_NAME, SHARD_SCHEMA, Manifest
from pipelines.ingest.shards import LOG_NAME, OutputConflictError, build_shards


def image_bytes(width: int, height: int, mode: str = "RGB", format: str = "JPEG", seed: int = 0) -> bytes:
    """Noise, so JPEGs are large enough to truncate mid-scan."""
    rng = np.random.default_rng(seed)
    if mode == "I;16":
        image = Image.fromarray(rng.integers(0, 65535, (height, width), dtype=np.uint16))
    else:
        image = Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8)).convert(mode)
    assert image.mode == mode
    buffer = io.BytesIO()
    image.save(buffer, format=format)
    return buffer.getvalue()


def write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def read_rows(output: Path) -> dict[str, dict]:
    """All rows of all shards, by key."""
    rows = {}
    for shard in sorted(output.glob("*.parquet")):
        for row in pq.read_table(shard).to_pylist():
            assert row["key"] not in rows
            rows[row["key"]] = row
    return rows


def read_manifest(output: Path) -> Manifest:
    return Manifest.from_json((output / MANIFEST_NAME).read_text())


def shard(sources, output, **options):
    options.setdefault("workers", 1)
    options.setdefault("show_progress", False)
    return build_shards([str(source) for source in sources], str(output), **options)


@pytest.fixture
def class_folder(tmp_path: Path) -> Path:
    """Two classes, one with a nested folder; different sizes so width/height are checked."""
    root = tmp_path / "classes"
    write(root / "dog" / "d0.jpg", image_bytes(20, 10, seed=1))
    write(root / "dog" / "puppies" / "p0.png", image_bytes(12, 30, format="PNG", seed=2))
    write(root / "cat" / "c0.jpg", image_bytes(16, 16, seed=3))
    write(root / "cat" / "c1.webp", image_bytes(33, 17, format="WEBP", seed=4))
    write(root / "cat" / "readme.txt", b"not an image")
    return root


def test_round_trip_keeps_original_bytes_labels_and_sizes(class_folder, tmp_path):
    report = shard([class_folder], tmp_path / "out")
    rows = read_rows(tmp_path / "out")
    expected = {
        "cat/c0": ("cat/c0.jpg", 0, 16, 16),
        "cat/c1": ("cat/c1.webp", 0, 33, 17),
        "dog/d0": ("dog/d0.jpg", 1, 20, 10),
        "dog/puppies/p0": ("dog/puppies/p0.png", 1, 12, 30),
    }
    assert set(rows) == set(expected)
    for key, (relative, label, width, height) in expected.items():
        assert rows[key]["image"] == (class_folder / relative).read_bytes()
        assert (rows[key]["label"], rows[key]["width"], rows[key]["height"]) == (label, width, height)
    for path in (tmp_path / "out").glob("*.parquet"):
        assert pq.read_schema(path).equals(SHARD_SCHEMA)
    assert report.num_images == 4 and report.num_skipped == 0 and report.num_ignored == 1


def test_class_folders_give_sorted_class_names(class_folder, tmp_path):
    shard([class_folder], tmp_path / "out")
    manifest = read_manifest(tmp_path / "out")
    assert manifest.class_names == ["cat", "dog"]
    assert manifest.num_images == 4
    assert manifest.sources == [str(class_folder.resolve())]


def test_flat_folder_gives_unlabeled_images(tmp_path):
    for index in range(3):
        write(tmp_path / "flat" / f"{index}.jpg", image_bytes(10, 10, seed=index))
    report = shard([tmp_path / "flat"], tmp_path / "out")
    rows = read_rows(tmp_path / "out")
    assert sorted(rows) == ["0", "1", "2"]
    assert all(row["label"] is None for row in rows.values())
    assert report.num_classes == 0 and read_manifest(tmp_path / "out").class_names == []


def test_hidden_files_are_reported_apart_from_files_without_an_image_extension(tmp_path, capsys):
    write(tmp_path / "flat" / "a.jpg", image_bytes(10, 10, seed=1))
    write(tmp_path / "flat" / ".hidden.jpg", image_bytes(10, 10, seed=2))
    write(tmp_path / "flat" / "._a.jpg", b"a macOS resource fork")
    write(tmp_path / "flat" / "notes.txt", b"not an image")
    report = shard([tmp_path / "flat"], tmp_path / "out", show_progress=True)
    err = capsys.readouterr().err
    assert "ignored 1 files without an image extension (e.g. notes.txt)" in err
    assert "ignored 2 hidden files (e.g. ._a.jpg, .hidden.jpg)" in err
    assert (report.num_images, report.num_ignored, report.num_hidden) == (1, 1, 2)
    assert read_manifest(tmp_path / "out").num_hidden == 2


def test_cli_a_folder_without_images_is_an_error_naming_what_it_holds(tmp_path, capsys):
    write(tmp_path / "flat" / "notes.txt", b"not an image")
    write(tmp_path / "flat" / ".hidden.jpg", image_bytes(10, 10))
    assert cli.main(["shard", str(tmp_path / "flat"), "--output", str(tmp_path / "out"), "--workers", "1"]) == 1
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith(f"moco: error: no images in {(tmp_path / 'flat').resolve()} (ignored 1 files without")
    assert "e.g. notes.txt" in line and "1 hidden files, e.g. .hidden.jpg" in line
    assert not (tmp_path / "out").exists()  # nothing to write, nothing created


def test_text_file_with_integer_labels_class_names_and_none(tmp_path):
    write(tmp_path / "images" / "a.jpg", image_bytes(10, 10, seed=1))
    write(tmp_path / "images" / "b.jpg", image_bytes(10, 10, seed=2))
    absolute = write(tmp_path / "elsewhere" / "c.jpg", image_bytes(10, 10, seed=3))
    list_path = tmp_path / "list.txt"
    list_path.write_text(f"# comment\nimages/a.jpg\t7\n\nimages/b.jpg\tzebra\n{absolute}\n")
    shard([list_path], tmp_path / "out")
    rows = read_rows(tmp_path / "out")
    assert rows["images/a"]["label"] == 7
    assert rows["images/b"]["label"] == 0  # "zebra" is class 0 of ["zebra"]
    assert rows[os.path.splitext(str(absolute))[0]]["label"] is None
    assert rows["images/a"]["image"] == (tmp_path / "images" / "a.jpg").read_bytes()
    assert read_manifest(tmp_path / "out").class_names == ["zebra"]


def test_text_file_missing_image_is_recorded_as_unreadable(tmp_path):
    list_path = tmp_path / "list.txt"
    list_path.write_text("missing.jpg\n")
    report = shard([list_path], tmp_path / "out")
    assert report.skipped_by_reason == {"unreadable": 1}


def make_tar(path: Path, samples: list[tuple[str, dict[str, bytes]]]) -> Path:
    with tarfile.open(path, "w") as archive:
        for key, entries in samples:
            for extension, data in entries.items():
                info = tarfile.TarInfo(f"{key}.{extension}")
                info.size = len(data)
                archive.addfile(info, io.BytesIO(data))
    return path


def test_webdataset_tar_with_cls_labels(tmp_path):
    tar = make_tar(
        tmp_path / "00000.tar",
        [
            ("000000001", {"jpg": image_bytes(12, 10, seed=1), "cls": b"3", "json": b"{}"}),
            ("000000002", {"png": image_bytes(10, 14, format="PNG", seed=2), "txt": b"caption"}),
            ("000000003", {"json": b"{}"}),  # a failed download: no image
        ],
    )
    report = shard([tar], tmp_path / "out")
    rows = read_rows(tmp_path / "out")
    assert sorted(rows) == ["000000001", "000000002"]
    assert rows["000000001"]["label"] == 3 and rows["000000002"]["label"] is None
    assert (rows["000000002"]["width"], rows["000000002"]["height"]) == (10, 14)
    assert rows["000000001"]["image"] == image_bytes(12, 10, seed=1)
    assert report.num_ignored == 1


def test_truncated_tar_keeps_the_samples_before_the_damage(tmp_path):
    samples = [(f"{index:04d}", {"jpg": image_bytes(32, 32, seed=index)}) for index in range(4)]
    tar = make_tar(tmp_path / "full.tar", samples)
    data = tar.read_bytes()
    # Cut inside the third image's data: samples 0 and 1 survive.
    with tarfile.open(tar) as archive:
        third = archive.getmembers()[2]
    cut = tmp_path / "cut.tar"
    cut.write_bytes(data[: third.offset_data + third.size // 2])
    report = shard([cut], tmp_path / "out")
    assert sorted(read_rows(tmp_path / "out")) == ["0000", "0001"]
    assert report.skipped_by_reason == {"truncated": 1}
    assert read_manifest(tmp_path / "out").skipped[0].source == str(cut.resolve())


def test_bad_images_are_skipped_with_their_reasons(tmp_path, monkeypatch):
    folder = tmp_path / "bad"
    good = image_bytes(40, 40, seed=1)
    write(folder / "good.jpg", good)
    write(folder / "truncated.jpg", image_bytes(64, 64, seed=2)[:800])
    write(folder / "text.jpg", b"this is not a JPEG")
    write(folder / "empty.png", b"")
    write(folder / "tiny.png", image_bytes(1, 1, format="PNG"))
    locked = write(folder / "locked.jpg", good)
    read_bytes = Path.read_bytes

    def deny_locked(path: Path) -> bytes:
        if path == locked:
            raise PermissionError(13, "Permission denied", str(path))
        return read_bytes(path)

    monkeypatch.setattr(Path, "read_bytes", deny_locked)  # root ignores chmod, so simulate it
    report = shard([folder], tmp_path / "out")
    reasons = {Path(skip.source).name: skip.reason for skip in read_manifest(tmp_path / "out").skipped}
    assert reasons == {
        "truncated.jpg": "truncated",
        "text.jpg": "not_an_image",
        "empty.png": "empty",
        "tiny.png": "too_small",
        "locked.jpg": "unreadable",
    }
    assert report.num_images == 1 and report.num_skipped == 5
    assert report.skipped_by_reason == {"empty": 1, "not_an_image": 1, "too_small": 1, "truncated": 1, "unreadable": 1}


def test_images_over_max_pixels_are_skipped_as_too_large(tmp_path):
    write(tmp_path / "flat" / "small.png", image_bytes(10, 10, format="PNG"))
    write(tmp_path / "flat" / "bomb.png", image_bytes(40, 40, format="PNG"))
    report = shard([tmp_path / "flat"], tmp_path / "out", max_pixels=1000)
    assert sorted(read_rows(tmp_path / "out")) == ["small"]
    assert report.skipped_by_reason == {"too_large": 1}


def test_convertible_modes_keep_original_bytes_and_are_counted(tmp_path):
    folder = tmp_path / "modes"
    originals = {
        "cmyk.jpg": image_bytes(16, 16, mode="CMYK"),
        "rgba.png": image_bytes(16, 16, mode="RGBA", format="PNG"),
        "palette.png": image_bytes(16, 16, mode="P", format="PNG"),
        "gray_alpha.png": image_bytes(16, 16, mode="LA", format="PNG"),
        "deep.png": image_bytes(16, 16, mode="I;16", format="PNG"),
        "rgb.jpg": image_bytes(16, 16),
    }
    for name, data in originals.items():
        write(folder / name, data)
    report = shard([folder], tmp_path / "out")
    rows = read_rows(tmp_path / "out")
    for name, data in originals.items():
        assert rows[os.path.splitext(name)[0]]["image"] == data
    assert report.num_converted == 5 and report.num_skipped == 0
    assert set(report.converted_by_mode) == {"CMYK", "RGBA", "P", "LA", "I;16"}


def test_max_side_stores_a_downscaled_jpeg_only_for_large_images(tmp_path):
    folder = tmp_path / "sizes"
    small = write(folder / "small.png", image_bytes(20, 10, format="PNG"))
    write(folder / "wide.png", image_bytes(100, 50, mode="RGBA", format="PNG"))
    write(folder / "tall.jpg", image_bytes(30, 90))
    shard([folder], tmp_path / "out", max_side=40, jpeg_quality=80)
    rows = read_rows(tmp_path / "out")
    assert rows["small"]["image"] == small.read_bytes()
    for key, size in {"wide": (40, 20), "tall": (13, 40)}.items():
        stored = Image.open(io.BytesIO(rows[key]["image"]))
        assert stored.format == "JPEG" and stored.size == size
        assert (rows[key]["width"], rows[key]["height"]) == size
    assert read_manifest(tmp_path / "out").max_side == 40


def test_downscaled_jpeg_keeps_the_exif_orientation(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees when displayed
    buffer = io.BytesIO()
    Image.open(io.BytesIO(image_bytes(60, 30))).save(buffer, format="JPEG", exif=exif.tobytes())
    write(tmp_path / "flat" / "rotated.jpg", buffer.getvalue())
    shard([tmp_path / "flat"], tmp_path / "out", max_side=20)
    stored = Image.open(io.BytesIO(read_rows(tmp_path / "out")["rotated"]["image"]))
    assert stored.size == (20, 10) and stored.getexif().get(0x0112) == 6


def test_shard_and_row_group_sizes_are_respected(tmp_path):
    for index in range(11):
        write(tmp_path / "flat" / f"{index:02d}.jpg", image_bytes(10, 10, seed=index))
    report = shard([tmp_path / "flat"], tmp_path / "out", images_per_shard=5, row_group_size=2)
    files = sorted((tmp_path / "out").glob("*.parquet"))
    assert [path.name for path in files] == ["shard-00000.parquet", "shard-00001.parquet", "shard-00002.parquet"]
    sizes = [[group.num_rows for group in _row_groups(path)] for path in files]
    assert sizes == [[2, 2, 1], [2, 2, 1], [1]]
    manifest = read_manifest(tmp_path / "out")
    assert [entry["num_images"] for entry in manifest.shards] == [5, 5, 1]
    assert [entry["num_row_groups"] for entry in manifest.shards] == [3, 3, 1]
    assert report.num_shards == 3


def _row_groups(path: Path):
    metadata = pq.ParquetFile(path).metadata
    return [metadata.row_group(index) for index in range(metadata.num_row_groups)]


def test_shuffle_mixes_classes_across_shards_and_no_shuffle_keeps_order(tmp_path):
    for class_name in ("a", "b"):
        for index in range(4):
            write(tmp_path / "classes" / class_name / f"{index}.jpg", image_bytes(10, 10, seed=index))
    shard([tmp_path / "classes"], tmp_path / "sorted", images_per_shard=4, shuffle_seed=None)
    first = pq.read_table(tmp_path / "sorted" / "shard-00000.parquet")
    assert first.column("key").to_pylist() == ["a/0", "a/1", "a/2", "a/3"]
    shard([tmp_path / "classes"], tmp_path / "shuffled", images_per_shard=4, shuffle_seed=0)
    labels = pq.read_table(tmp_path / "shuffled" / "shard-00000.parquet").column("label").to_pylist()
    assert set(labels) == {0, 1}


def test_duplicate_keys_are_made_unique(tmp_path):
    write(tmp_path / "flat" / "a.jpg", image_bytes(10, 10, seed=1))
    write(tmp_path / "flat" / "a.png", image_bytes(10, 10, format="PNG", seed=2))
    shard([tmp_path / "flat", tmp_path / "flat"], tmp_path / "out")
    assert sorted(read_rows(tmp_path / "out")) == ["a", "a~1", "a~2", "a~3"]


def flat_folder(tmp_path: Path, count: int) -> Path:
    for index in range(count):
        write(tmp_path / "flat" / f"{index:02d}.jpg", image_bytes(10, 10, seed=index))
    return tmp_path / "flat"


def test_rerun_rebuilds_only_the_missing_shard(tmp_path):
    source, output = flat_folder(tmp_path, 9), tmp_path / "out"
    shard([source], output, images_per_shard=3)
    names = ["shard-00000.parquet", "shard-00001.parquet", "shard-00002.parquet"]
    before = {name: (output / name).stat().st_mtime_ns for name in names}
    expected = (output / "shard-00001.parquet").read_bytes()
    (output / "shard-00001.parquet").unlink()
    (output / "shard-00002.parquet.tmp").write_bytes(b"half-written by a killed run")

    report = shard([source], output, images_per_shard=3)
    assert (report.shards_built, report.shards_reused) == (1, 2)
    assert not (output / "shard-00002.parquet.tmp").exists()
    assert (output / "shard-00001.parquet").read_bytes() == expected
    for name in ("shard-00000.parquet", "shard-00002.parquet"):
        assert (output / name).stat().st_mtime_ns == before[name]
    assert read_manifest(output).num_images == 9

    manifest_mtime = (output / MANIFEST_NAME).stat().st_mtime_ns
    assert shard([source], output, images_per_shard=3).shards_built == 0
    assert (output / MANIFEST_NAME).stat().st_mtime_ns == manifest_mtime  # nothing written twice


def test_killed_run_resumes_from_its_log(tmp_path, monkeypatch):
    source, output = flat_folder(tmp_path, 9), tmp_path / "out"
    write(source / "bad.jpg", b"junk")  # its skip record must survive the kill
    build_file_shard = shard_writer._build_file_shard

    def killed_at_second_shard(task, *args):
        if task.name == "shard-00001.parquet":
            raise KeyboardInterrupt
        return build_file_shard(task, *args)

    monkeypatch.setattr(shard_writer, "_build_file_shard", killed_at_second_shard)
    with pytest.raises(KeyboardInterrupt):
        shard([source], output, images_per_shard=4)
    assert (output / LOG_NAME).exists() and not (output / MANIFEST_NAME).exists()
    assert sorted(path.name for path in output.iterdir()) == [LOG_NAME, "shard-00000.parquet"]
    first_mtime = (output / "shard-00000.parquet").stat().st_mtime_ns

    monkeypatch.setattr(shard_writer, "_build_file_shard", build_file_shard)
    report = shard([source], output, images_per_shard=4)
    assert (report.shards_built, report.shards_reused) == (2, 1)
    assert (output / "shard-00000.parquet").stat().st_mtime_ns == first_mtime
    assert not (output / LOG_NAME).exists()
    assert report.num_images == 9 and report.skipped_by_reason == {"not_an_image": 1}


def test_rerun_rebuilds_a_missing_tar_shard_in_one_pass(tmp_path):
    tar = make_tar(tmp_path / "00000.tar", [(f"{i:03d}", {"jpg": image_bytes(10, 10, seed=i)}) for i in range(7)])
    output = tmp_path / "out"
    shard([tar], output, images_per_shard=3)
    expected = read_rows(output)
    first_mtime = (output / "shard-00000.parquet").stat().st_mtime_ns
    (output / "shard-00001.parquet").unlink()
    report = shard([tar], output, images_per_shard=3)
    assert (report.shards_built, report.shards_reused) == (1, 2)
    assert (output / "shard-00000.parquet").stat().st_mtime_ns == first_mtime
    assert read_rows(output) == expected


def test_tar_shorter_than_planned_records_the_lost_samples(tmp_path):
    tar = make_tar(tmp_path / "00000.tar", [("a", {"jpg": image_bytes(10, 10)})])
    task = shard_plan.TarTask(str(tar), (shard_plan.TarShard("shard-00000.parquet", ("a", "b")),))
    [result] = shard_writer._build_tar_shards(
        task, frozenset(["shard-00000.parquet"]), tmp_path, shard_plan.ShardOptions(), lambda: None
    )
    assert result.num_images == 1
    assert [(skip.source, skip.reason) for skip in result.skipped] == [(f"{tar}::b", "truncated")]


def test_output_inside_a_source_folder_is_not_listed(tmp_path):
    source = flat_folder(tmp_path, 2)
    shard([source], source / "shards")
    report = shard([source], source / "shards")
    assert (report.shards_built, report.num_classes, report.num_images) == (0, 0, 2)


def test_refuses_an_output_built_from_other_inputs(tmp_path):
    source, output = flat_folder(tmp_path, 3), tmp_path / "out"
    shard([source], output)
    contents = {path.name: path.read_bytes() for path in output.iterdir()}
    write(source / "new.jpg", image_bytes(10, 10, seed=99))
    with pytest.raises(OutputConflictError, match="contents changed"):
        shard([source], output)
    with pytest.raises(OutputConflictError, match="images_per_shard"):
        shard([source], output, images_per_shard=2)
    assert {path.name: path.read_bytes() for path in output.iterdir()} == contents


def test_a_corrupt_manifest_is_refused_by_a_rerun_and_rebuilt_once_deleted(tmp_path):
    """What the planner's error about a corrupt manifest advises (pipelines/ingest/schema.py)."""
    source, output = flat_folder(tmp_path, 3), tmp_path / "out"
    shard([source], output)
    (output / MANIFEST_NAME).write_text("{bad")
    with pytest.raises(OutputConflictError, match=f"{output / MANIFEST_NAME} is not a manifest written by"):
        shard([source], output)
    assert (output / MANIFEST_NAME).read_text() == "{bad"
    shutil.rmtree(output)
    assert shard([source], output).num_images == 3


def test_refuses_an_output_holding_foreign_parquet(tmp_path):
    source, output = flat_folder(tmp_path, 2), tmp_path / "out"
    write(output / "mine.parquet", b"a user's file")
    with pytest.raises(OutputConflictError, match="mine.parquet"):
        shard([source], output)
    assert (output / "mine.parquet").read_bytes() == b"a user's file"


def test_same_shards_for_one_and_two_workers(tmp_path, class_folder):
    tars = [
        make_tar(
            tmp_path / f"{index:05d}.tar", [(f"{index}{i:03d}", {"jpg": image_bytes(10, 10, seed=i)}) for i in range(n)]
        )
        for index, n in enumerate([5, 3])
    ]  # two tars: they are also listed in parallel
    sources = [class_folder, *tars]
    shard(sources, tmp_path / "one", images_per_shard=2, row_group_size=1, workers=1)
    shard(sources, tmp_path / "two", images_per_shard=2, row_group_size=1, workers=2)
    one = sorted(path.name for path in (tmp_path / "one").iterdir())
    assert one == sorted(path.name for path in (tmp_path / "two").iterdir())
    assert len(one) == 8  # 2 folder shards, 3 + 2 tar shards, the manifest
    for name in one:
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes(), name


def test_cli_prints_json_counts(tmp_path, class_folder, capsys):
    code = cli.main(["shard", str(class_folder), "--output", str(tmp_path / "out"), "--workers", "1", "--json"])
    captured = capsys.readouterr()
    assert code == 0
    result = json.loads(captured.out.strip().splitlines()[-1])
    assert (result["num_images"], result["num_shards"], result["num_skipped"]) == (4, 1, 0)
    assert result["manifest"] == str((tmp_path / "out" / MANIFEST_NAME).resolve())
    assert "moco shard" in captured.err


def test_cli_nonexistent_source_is_one_line_without_traceback(tmp_path, capsys):
    code = cli.main(["shard", str(tmp_path / "missing"), "--output", str(tmp_path / "out")])
    captured = capsys.readouterr()
    assert code != 0
    assert captured.err.strip().splitlines() == [f"moco: error: source not found: {tmp_path / 'missing'}"]
    assert not (tmp_path / "out").exists()


def test_cli_rejects_a_binary_file_source(tmp_path, capsys):
    image = write(tmp_path / "photo.jpg", image_bytes(10, 10))
    assert cli.main(["shard", str(image), "--output", str(tmp_path / "out")]) != 0
    assert "not a folder, a WebDataset .tar or a text file" in capsys.readouterr().err
