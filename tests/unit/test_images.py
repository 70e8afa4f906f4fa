"""Image data: the image field, its checks before any model loads, and the shapes: generator."""

from __future__ import annotations

import io
import json

import pytest

from spine_ttrl.data import DataError, load_examples, resolve_task
from spine_ttrl.shapes import generate_shapes, parse_shapes_spec


def _png(path, size=(8, 8)):
    from PIL import Image

    Image.new("RGB", size, "red").save(path, format="PNG")


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_image_paths_resolve_against_the_data_file(tmp_path):
    (tmp_path / "img").mkdir()
    _png(tmp_path / "img" / "a.png")
    _png(tmp_path / "img" / "b.png")
    data = _jsonl(tmp_path / "q.jsonl", [{"prompt": "one", "image": "img/a.png", "answer": "1"},
                                         {"prompt": "two", "image": ["img/a.png", "img/b.png"]},
                                         {"prompt": "none"}])
    ex = load_examples(str(data))
    assert ex[0].images == (str((tmp_path / "img" / "a.png").resolve()),)
    assert len(ex[1].images) == 2 and ex[2].images == ()


@pytest.mark.parametrize("make, message", [
    (lambda d: None, "no such image file"),
    (lambda d: (d / "x.png").write_text("not an image"), "not a readable image"),
    (lambda d: __import__("PIL.Image").Image.new("RGB", (4, 4)).save(d / "x.png", format="GIF"), "unsupported image format GIF"),
])
def test_bad_images_name_the_row_and_the_file(tmp_path, make, message):
    make(tmp_path)
    data = _jsonl(tmp_path / "q.jsonl", [{"prompt": "fine"}, {"prompt": "bad", "image": "x.png"}])
    with pytest.raises(DataError) as err:
        load_examples(str(data))
    assert f"{data}:2" in str(err.value) and "x.png" in str(err.value) and message in str(err.value)
    assert "\n" not in str(err.value)


def test_too_large_images_are_refused(tmp_path, monkeypatch):
    import spine_ttrl.images as images

    _png(tmp_path / "big.png", size=(20, 20))
    monkeypatch.setattr(images, "MAX_IMAGE_PIXELS", 100)
    data = _jsonl(tmp_path / "q.jsonl", [{"prompt": "p", "image": "big.png"}])
    with pytest.raises(DataError, match=r"q.jsonl:1: field 'image': big.png: image too large \(20 x 20 pixels"):
        load_examples(str(data))


def test_csv_cells_hold_a_path_or_a_json_list(tmp_path):
    _png(tmp_path / "a.png")
    (tmp_path / "q.csv").write_text('prompt,image\nq1,a.png\nq2,"[""a.png"", ""a.png""]"\n')
    ex = load_examples(str(tmp_path / "q.csv"))
    assert len(ex[0].images) == 1 and len(ex[1].images) == 2


def test_shapes_are_deterministic_multiple_choice_with_png_images():
    a, b = load_examples("shapes:9:3"), generate_shapes(9, 3)
    assert a == b and len(a) == 9 and resolve_task(a) == "choice"
    from PIL import Image

    for ex in a:
        assert ex.choices and ex.answer in "ABCDE"[:len(ex.choices)]
        with Image.open(io.BytesIO(ex.images[0])) as im:
            assert im.format == "PNG" and im.size == (224, 224)
    assert generate_shapes(9, 4) != a
    assert parse_shapes_spec("shapes:5") == (5, 0)
    with pytest.raises(DataError, match="expected shapes:<count>"):
        parse_shapes_spec("shapes:1:2:3")


def test_shapes_answers_match_the_scene():
    from spine_ttrl import shapes

    import random
    rng = random.Random(0)
    scene = [("red", "square", 0, 40, 1), ("red", "square", 1, 30, 2), ("blue", "circle", 2, 60, 3)]
    prompt, options, answer = shapes._largest_question(scene, rng)
    assert answer == "blue" and "blue" in options
    prompt, options, answer = shapes._shape_question(scene, rng)
    assert answer == "circle" and "blue" in prompt
