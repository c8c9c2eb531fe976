"""Every input layout is planned and read correctly; wrong schemas fail with a clear message;
planning reads only what it must (the manifest for moco shards, footers in parallel otherwise)."""

import io
import os
import re

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines.ingest.planning import DataSourceError, plan_collection
from pipelines.ingest.sources import ReadProblems, read_unit
from pipelines.ingest.units import ColumnNames
from tests.pipelines.fixtures import (
    jpeg_bytes,
    write_huggingface_parquet,
    write_image_folder,
    write_img2dataset_parquet,
    write_webdataset_tar,
)


def _read_all(collection):
    problems = ReadProblems()
    units = collection.units
    images = [image for unit in range(len(units)) for image in read_unit(units, unit, collection.columns, problems)]
    return images, problems


def test_class_folder_gives_labels_and_indices(tmp_path):
    write_image_folder(tmp_path, {"cat": 3, "dog": 2})
    collection = plan_collection(str(tmp_path))
    assert collection.layout == "folder" and collection.class_names == ("cat", "dog")
    assert len(collection.units) == 5  # one unit per file: a folder is shuffled file by file
    images, _ = _read_all(collection)
    assert sorted(image.label for image in images) == [0, 0, 0, 1, 1]
    assert sorted(image.index for image in images) == [0, 1, 2, 3, 4]
    assert images[0].data == (tmp_path / "cat" / "0000.jpg").read_bytes()
    assert collection.indexed and collection.num_images == 5


def test_flat_folder_is_unlabeled(tmp_path):
    for i in range(3):
        (tmp_path / f"{i}.png").write_bytes(jpeg_bytes(i, fmt="PNG"))
    (tmp_path / "notes.txt").write_text("not an image")
    collection = plan_collection(str(tmp_path))
    images, _ = _read_all(collection)
    assert collection.class_names == () and [image.label for image in images] == [-1, -1, -1]


def test_a_symlink_loop_in_a_folder_is_listed_once(tmp_path):
    write_image_folder(tmp_path, {"cat": 2, "dog": 1})
    (tmp_path / "cat" / "loop").symlink_to(tmp_path)  # cat/loop/cat/loop/... as moco shard meets it
    collection = plan_collection(str(tmp_path))
    assert collection.num_images == 3 and collection.class_names == ("cat", "dog")


def test_a_folder_that_cannot_be_listed_is_skipped_with_a_warning(tmp_path, monkeypatch, capsys):
    write_image_folder(tmp_path, {"cat": 2, "dog": 1})
    scandir = os.scandir

    def denied_for_dog(path):
        if str(path).endswith("dog"):
            raise PermissionError(13, "Permission denied", str(path))
        return scandir(path)

    monkeypatch.setattr(os, "scandir", denied_for_dog)
    collection = plan_collection(str(tmp_path))
    assert collection.num_images == 2
    assert f"skipped 1 folder(s) that cannot be listed, e.g. {tmp_path / 'dog'}: Permission denied" in (
        capsys.readouterr().err
    )


def test_img2dataset_parquet_row_groups_become_units(tmp_path):
    write_img2dataset_parquet(tmp_path / "00000.parquet", 10, rows_per_group=4)
    write_img2dataset_parquet(tmp_path / "00001.parquet", 5, rows_per_group=4, start_seed=10)
    collection = plan_collection(str(tmp_path))
    assert collection.layout == "parquet" and collection.columns == ColumnNames("jpg", None, "key")
    assert collection.units.num_rows.tolist() == [4, 4, 2, 4, 1]
    assert collection.units.row_group.tolist() == [0, 1, 2, 0, 1]
    images, problems = _read_all(collection)
    assert len(images) == 15 and not problems.counts
    assert [image.index for image in images] == list(range(15))
    assert images[11].data == jpeg_bytes(11)


def test_huggingface_parquet_image_struct_and_label(tmp_path):
    write_huggingface_parquet(tmp_path / "train-00000.parquet", 6, rows_per_group=3)
    collection = plan_collection(str(tmp_path / "*.parquet"))
    images, _ = _read_all(collection)
    assert collection.columns.image == "image" and collection.columns.label == "label"
    assert [image.label for image in images] == [0, 1, 2, 0, 1, 2]
    assert images[4].data == jpeg_bytes(4)


def test_webdataset_tars_with_cls_labels(tmp_path):
    write_webdataset_tar(tmp_path / "00000.tar", 5)
    write_webdataset_tar(tmp_path / "00001.tar", 3, start_seed=5, with_labels=False)
    collection = plan_collection(str(tmp_path))
    assert collection.layout == "webdataset" and len(collection.units) == 2 and not collection.indexed
    images, _ = _read_all(collection)
    assert [image.label for image in images] == [0, 1, 2, 3, 0, -1, -1, -1]
    assert images[6].key == "000000006" and images[6].data == jpeg_bytes(6)


def test_truncated_tar_keeps_complete_samples_and_counts_the_break(tmp_path):
    write_webdataset_tar(tmp_path / "full.tar", 6)
    data = (tmp_path / "full.tar").read_bytes()
    (tmp_path / "full.tar").unlink()
    (tmp_path / "cut.tar").write_bytes(data[: len(data) // 2])
    images, problems = _read_all(plan_collection(str(tmp_path / "cut.tar")))
    assert 0 < len(images) < 6
    assert problems.counts == {"broken_tar": 1} and "cut.tar" in problems.first_error


def test_explicit_column_names(tmp_path):
    table = pa.table({"photo": [jpeg_bytes(1), jpeg_bytes(2)], "klass": [7, 8]})
    pq.write_table(table, tmp_path / "custom.parquet")
    collection = plan_collection(str(tmp_path / "custom.parquet"), columns=ColumnNames(image="photo", label="klass"))
    images, _ = _read_all(collection)
    assert [image.label for image in images] == [7, 8]


def test_wrong_schema_names_the_file_and_the_column(tmp_path):
    pq.write_table(pa.table({"caption": ["a", "b"]}), tmp_path / "bad.parquet")
    with pytest.raises(
        DataSourceError, match=r"bad\.parquet: no image column among image, jpg.*columns: caption"
    ) as raised:
        plan_collection(str(tmp_path / "bad.parquet"))
    # Advice that works for every command: only moco pretrain has --image-column.
    assert "name it with --image-column (moco pretrain) or --set data.image_column=NAME (--probe-set" in str(
        raised.value
    )
    pq.write_table(pa.table({"image": ["text", "not bytes"]}), tmp_path / "strings.parquet")
    with pytest.raises(DataSourceError, match=r"strings\.parquet: image column 'image' has type string"):
        plan_collection(str(tmp_path / "strings.parquet"))
    with pytest.raises(DataSourceError, match=r"no label column 'lbl'"):
        plan_collection(str(tmp_path / "strings.parquet"), columns=ColumnNames(label="lbl"))


def test_one_of_many_files_with_a_different_schema_is_named(tmp_path):
    write_img2dataset_parquet(tmp_path / "a.parquet", 2, rows_per_group=2)
    pq.write_table(pa.table({"key": ["x"], "png": [jpeg_bytes(0)]}), tmp_path / "b.parquet")
    with pytest.raises(DataSourceError, match=r"b\.parquet: no image column 'jpg'"):
        plan_collection(str(tmp_path))


def test_missing_path_and_empty_folder_are_clear_errors(tmp_path):
    with pytest.raises(DataSourceError, match="does not exist"):
        plan_collection(str(tmp_path / "nowhere"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataSourceError, match="no images found"):
        plan_collection(str(tmp_path / "empty"))
    (tmp_path / "not_parquet.parquet").write_bytes(b"garbage")
    with pytest.raises(DataSourceError, match="not a readable Parquet file"):
        plan_collection(str(tmp_path / "not_parquet.parquet"))


def test_null_and_empty_image_cells_are_counted(tmp_path):
    table = pa.table({"image": pa.array([jpeg_bytes(0), None, b""], type=pa.binary())})
    pq.write_table(table, tmp_path / "holes.parquet")
    images, problems = _read_all(plan_collection(str(tmp_path / "holes.parquet")))
    assert len(images) == 1 and problems.counts == {"empty": 2}


def test_file_uri_scheme(tmp_path):
    write_img2dataset_parquet(tmp_path / "x.parquet", 3, rows_per_group=3)
    collection = plan_collection(f"file://{tmp_path}/x.parquet")
    images, _ = _read_all(collection)
    assert len(images) == 3 and io.BytesIO(images[0].data).read(2) == b"\xff\xd8"


def test_moco_shard_directory_round_trips_through_the_reader(tmp_path):
    from pipelines.ingest.shards import build_shards

    keys = write_image_folder(tmp_path / "images", {"ant": 5, "bee": 4})
    (tmp_path / "images" / "bee" / "broken.jpg").write_bytes(b"garbage")
    report = build_shards(
        [str(tmp_path / "images")],
        tmp_path / "shards",
        images_per_shard=4,
        row_group_size=2,
        workers=1,
        show_progress=False,
    )
    assert report.num_images == 9 and report.num_skipped == 1
    collection = plan_collection(str(tmp_path / "shards"))
    assert collection.layout == "moco" and collection.class_names == ("ant", "bee")
    assert collection.num_images == 9 and collection.indexed
    images, problems = _read_all(collection)
    assert sorted(image.key for image in images) == sorted(keys) and not problems.counts
    by_key = {image.key: image for image in images}
    assert by_key["bee/0002"].data == (tmp_path / "images" / "bee" / "0002.jpg").read_bytes()
    assert by_key["bee/0002"].label == 1 and by_key["ant/0000"].label == 0
    assert sorted(image.index for image in images) == list(range(9))


def test_a_collection_where_nothing_decodes_is_one_clear_error(tmp_path):
    from pipelines.ingest.sources import check_decodable

    table = pa.table({"key": ["a", "b", "c"], "thumbnail": [b"not", b"an", b"image"], "jpg": [jpeg_bytes(0)] * 3})
    pq.write_table(table, tmp_path / "part-0.parquet")
    wrong = plan_collection(str(tmp_path / "part-0.parquet"), columns=ColumnNames(image="thumbnail"))
    with pytest.raises(DataSourceError, match=r"part-0\.parquet, column 'thumbnail': none of the first 3 images"):
        check_decodable(wrong)
    check_decodable(plan_collection(str(tmp_path / "part-0.parquet")))  # the jpg column is fine


def test_moco_shards_are_planned_from_the_manifest_without_opening_a_shard(tmp_path, monkeypatch):
    import pipelines.ingest.planning as planning
    from pipelines.ingest.shards import build_shards

    write_image_folder(tmp_path / "images", {"ant": 7, "bee": 6})
    build_shards(
        [str(tmp_path / "images")],
        tmp_path / "shards",
        images_per_shard=5,
        row_group_size=2,
        workers=1,
        show_progress=False,
    )
    opened = []
    monkeypatch.setattr(planning, "_read_footer", lambda uri: opened.append(uri))
    collection = plan_collection(str(tmp_path / "shards"))
    assert not opened
    # 13 images in shards of 5, 5, 3, row groups of 2: (2, 2, 1), (2, 2, 1), (2, 1)
    assert collection.units.num_rows.tolist() == [2, 2, 1, 2, 2, 1, 2, 1]
    assert collection.units.row_group.tolist() == [0, 1, 2, 0, 1, 2, 0, 1]
    assert collection.units.path_index.tolist() == [0, 0, 0, 1, 1, 1, 2, 2]
    assert collection.units.first_index.tolist() == [0, 2, 4, 5, 7, 9, 10, 12]
    assert collection.num_images == 13


def test_the_unit_table_is_arrays_not_an_object_per_unit(tmp_path):
    for shard in range(3):
        write_img2dataset_parquet(tmp_path / f"{shard}.parquet", 40, rows_per_group=4, start_seed=40 * shard)
    units = plan_collection(str(tmp_path)).units
    assert len(units) == 30 and len(units.paths) == 3
    for column in (units.path_index, units.row_group, units.num_rows, units.first_index):
        assert isinstance(column, np.ndarray) and column.dtype.kind == "i"
    assert units.nbytes < 30 * 32 + 3 * 200


def test_foreign_parquet_footers_are_read_in_chunks_by_the_fan_out(tmp_path, monkeypatch):
    import pipelines.ingest.planning as planning

    monkeypatch.setattr(planning, "FOOTERS_PER_TASK", 2)
    for shard in range(5):
        write_img2dataset_parquet(tmp_path / f"{shard}.parquet", 3, rows_per_group=2, start_seed=3 * shard)
    chunks_seen = []

    def fan_out(function, chunks):
        chunks_seen.extend(len(chunk) for chunk in chunks)
        return [function(chunk) for chunk in chunks]

    collection = plan_collection(str(tmp_path), fan_out=fan_out)
    assert chunks_seen == [2, 2, 1]
    assert collection.num_images == 15 and collection.units.num_rows.tolist() == [2, 1] * 5


def test_foreign_parquet_footers_fan_out_over_ray_tasks(ray_cluster, tmp_path, monkeypatch):
    import pipelines.ingest.planning as planning

    monkeypatch.setattr(planning, "FOOTERS_ON_DRIVER", 2)
    monkeypatch.setattr(planning, "FOOTERS_PER_TASK", 2)
    ray_fan_outs = []
    real_fan_out = planning._ray_fan_out
    monkeypatch.setattr(
        planning,
        "_ray_fan_out",
        lambda function, chunks: ray_fan_outs.append(len(chunks)) or real_fan_out(function, chunks),
    )
    for shard in range(5):
        write_img2dataset_parquet(tmp_path / f"{shard}.parquet", 3, rows_per_group=3, start_seed=3 * shard)
    pq.write_table(pa.table({"key": ["x"], "png": [jpeg_bytes(0)]}), tmp_path / "9_odd.parquet")
    with pytest.raises(DataSourceError, match=r"9_odd\.parquet: no image column 'jpg'"):
        plan_collection(str(tmp_path))
    (tmp_path / "9_odd.parquet").unlink()
    assert plan_collection(str(tmp_path)).num_images == 15
    assert ray_fan_outs == [3, 3]  # 6 files, then 5, in chunks of 2: Ray tasks, not the driver


@pytest.mark.parametrize(
    "text,problem",
    [
        ("{bad", r"is not valid JSON \(Expecting property name"),
        ("[1]", r"is not a manifest written by 'moco shard' \(expected a JSON object, got list\)"),
        ('{"num_images": 3}', r"\(no 'shards' field\)"),
        ('{"shards": [{"path": "s.parquet", "num_images": 3}]}', r"\(shards\[0\] has no int 'num_row_groups'\)"),
        ('{"shards": [], "options": {"row_group_size": "64"}}', r"\('options' is not an object with an int"),
    ],
)
def test_a_corrupt_manifest_is_one_line_naming_it(tmp_path, text, problem):
    (tmp_path / "shards").mkdir()
    (tmp_path / "shards" / "_manifest.json").write_text(text)
    with pytest.raises(DataSourceError) as raised:
        plan_collection(str(tmp_path / "shards"))
    message = str(raised.value)
    assert message.startswith(f"{tmp_path / 'shards' / '_manifest.json'} ") and "\n" not in message
    assert re.search(problem, message)
    assert message.endswith(
        f"rerun 'moco shard' on the sources with a new --output, or after deleting {tmp_path / 'shards'}"
    )


def test_a_manifest_without_row_group_options_falls_back_to_the_footers(tmp_path, monkeypatch):
    import json

    import pipelines.ingest.planning as planning
    from pipelines.ingest.shards import build_shards

    write_image_folder(tmp_path / "images", {"ant": 7, "bee": 6})
    build_shards(
        [str(tmp_path / "images")],
        tmp_path / "shards",
        images_per_shard=5,
        row_group_size=2,
        workers=1,
        show_progress=False,
    )
    expected = plan_collection(str(tmp_path / "shards")).units
    manifest_path = tmp_path / "shards" / "_manifest.json"
    manifest = json.loads(manifest_path.read_text())
    del manifest["options"]  # as written before options were recorded
    manifest_path.write_text(json.dumps(manifest))
    opened = []
    real_footer = planning._read_footer
    monkeypatch.setattr(planning, "_read_footer", lambda uri: opened.append(uri) or real_footer(uri))
    units = plan_collection(str(tmp_path / "shards")).units
    assert len(opened) == 3
    for column in ("num_rows", "row_group", "path_index", "first_index"):
        assert getattr(units, column).tolist() == getattr(expected, column).tolist()
