"""The LabelMe loader (maskrcnn_labelme.labelme) against every case of the LabelMe-files-in-the-wild checklist.

Each test writes tiny synthetic files into tmp_path. A LabelMeWarning that a test does not expect
fails it (see ``pytestmark``), so "loads cleanly" below also means "without warnings".
"""

from __future__ import annotations

import base64
import json
import math
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from labelme_fixtures import HEIGHT, WIDTH, png_base64, shape, square, write_image, write_labelme
from PIL import Image

from maskrcnn_labelme.labelme import (
    LabelMeError,
    LabelMeSample,
    LabelMeWarning,
    load_labelme_file,
    load_labelme_folder,
    report_labelme_folder,
)

pytestmark = pytest.mark.filterwarnings("error::maskrcnn_labelme.labelme.LabelMeWarning")

REPO = Path(__file__).resolve().parents[1]


def load_warned(json_path: Path) -> LabelMeSample:
    """Load a file that must warn; the emitted messages are the ones recorded on the sample."""
    with pytest.warns(LabelMeWarning) as record:
        sample = load_labelme_file(json_path)
    assert [str(w.message) for w in record if w.category is LabelMeWarning] == sample.warnings
    return sample


def only_warning(sample: LabelMeSample) -> str:
    assert len(sample.warnings) == 1, sample.warnings
    return sample.warnings[0]


def box_mask(x0: int, y0: int, x1: int, y1: int, size: tuple[int, int] = (WIDTH, HEIGHT)) -> np.ndarray:
    """The mask of a filled box whose corner pixels (inclusive) are (x0, y0) and (x1, y1)."""
    mask = np.zeros(size[::-1], dtype=bool)
    mask[y0 : y1 + 1, x0 : x1 + 1] = True
    return mask


def shape_error(tmp_path: Path, bad_shape: dict, **fields) -> str:
    """Message of the error raised by a file whose shape 1 is ``bad_shape`` (shape 0 is fine)."""
    json_path = write_labelme(tmp_path, [square("cat", 1, 1, 5, 5), bad_shape], **fields)
    with pytest.raises(LabelMeError) as caught:
        load_labelme_file(json_path)
    message = str(caught.value)
    assert "img.json" in message and "shape 1" in message, message
    assert caught.value.shape_index == 1
    return message


# -- LabelMe versions ----------------------------------------------------------------------


def test_labelme_3_0_file_without_version_size_or_shape_type(tmp_path):
    v3_shape = {
        "label": "cat",
        "line_color": None,
        "fill_color": None,
        "points": [[10, 10], [30, 10], [30, 20], [10, 20]],
    }
    json_path = write_labelme(
        tmp_path,
        [v3_shape],
        flags=[],
        lineColor=[0, 255, 0, 128],
        fillColor=[255, 0, 0, 128],
        drop=["version", "imageHeight", "imageWidth"],
    )
    sample = load_labelme_file(json_path)
    assert (sample.width, sample.height, sample.warnings) == (WIDTH, HEIGHT, [])
    [instance] = sample.instances
    assert (instance.label, instance.group_id) == ("cat", None)
    [parsed] = instance.shapes
    assert (parsed.index, parsed.kind, parsed.points.dtype) == (0, "polygon", np.float64)
    np.testing.assert_array_equal(parsed.points, v3_shape["points"])
    np.testing.assert_array_equal(sample.rasterize()[0], box_mask(10, 10, 30, 20))


def test_shape_type_null_is_a_polygon(tmp_path):
    sample = load_labelme_file(write_labelme(tmp_path, [square("cat", 2, 2, 9, 9, shape_type=None)]))
    assert sample.instances[0].shapes[0].kind == "polygon"


def test_keys_from_newer_versions_are_ignored(tmp_path):
    future = square("cat", 2, 2, 9, 9, locked=True, description="front", kie_linking=[], score=0.9)
    json_path = write_labelme(tmp_path, [future], version="7.9.0", somethingNew={"a": 1})
    assert load_labelme_file(json_path).instances[0].label == "cat"


# -- group_id ------------------------------------------------------------------------------


def test_group_id_zero_merges_shapes_into_one_instance(tmp_path):
    shapes = [square("cat", 2, 2, 9, 9, group_id=0), square("cat", 20, 20, 29, 29, group_id=0)]
    sample = load_labelme_file(write_labelme(tmp_path, shapes))
    [instance] = sample.instances
    assert instance.group_id == 0 and [s.index for s in instance.shapes] == [0, 1]
    np.testing.assert_array_equal(sample.rasterize()[0], box_mask(2, 2, 9, 9) | box_mask(20, 20, 29, 29))


def test_group_id_null_keeps_every_shape_its_own_instance(tmp_path):
    shapes = [square("cat", 2, 2, 9, 9), square("cat", 20, 20, 29, 29)]
    sample = load_labelme_file(write_labelme(tmp_path, shapes))
    assert [(i.label, i.group_id, len(i.shapes)) for i in sample.instances] == [("cat", None, 1)] * 2
    assert sample.rasterize().shape == (2, HEIGHT, WIDTH)


def test_same_group_id_under_two_labels_gives_two_instances(tmp_path):
    shapes = [
        square("cat", 2, 2, 9, 9, group_id=1),
        square("dog", 20, 20, 29, 29, group_id=1),
        square("cat", 40, 2, 49, 9, group_id=1),
    ]
    sample = load_labelme_file(write_labelme(tmp_path, shapes))
    assert [(i.label, [s.index for s in i.shapes]) for i in sample.instances] == [
        ("cat", [0, 2]),
        ("dog", [1]),
    ]


@pytest.mark.parametrize("group_id", ["1", 1.5, True])
def test_non_integer_group_id_is_an_error(tmp_path, group_id):
    assert "group_id" in shape_error(tmp_path, square("cat", 2, 2, 9, 9, group_id=group_id))


# -- polygons ------------------------------------------------------------------------------


@pytest.mark.parametrize("points", [[[5, 5]], [[5, 5], [20, 20]]], ids=["1-point", "2-points"])
def test_polygon_with_fewer_than_3_points_is_skipped_and_the_rest_kept(tmp_path, points):
    sample = load_warned(write_labelme(tmp_path, [shape("cat", points), square("dog", 2, 2, 9, 9)]))
    message = only_warning(sample)
    assert "img.json" in message and "shape 0" in message and "at least 3" in message
    assert [(i.label, i.shapes[0].index) for i in sample.instances] == [("dog", 1)]


def test_collinear_polygon_rasterizes_as_a_thin_line(tmp_path):
    sample = load_labelme_file(write_labelme(tmp_path, [shape("scratch", [[5, 5], [15, 15], [25, 25]])]))
    mask = sample.rasterize()[0]
    assert mask[5, 5] and mask[15, 15] and mask[25, 25]
    assert mask.sum() == 21  # the diagonal pixels 5..25 only


def test_self_intersecting_bowtie_fills_both_halves(tmp_path):
    bowtie = shape("bow", [[10, 10], [30, 30], [30, 10], [10, 30]])
    mask = load_labelme_file(write_labelme(tmp_path, [bowtie])).rasterize()[0]
    assert mask[20, 13] and mask[20, 27]  # left and right lobes (row, column)
    assert not mask[12, 20] and not mask[28, 20]  # the gaps above and below the crossing


def test_polygon_fully_outside_is_left_out_with_a_warning_that_says_so(tmp_path):
    sample = load_warned(write_labelme(tmp_path, [square("cat", 100, 100, 120, 120),
                                                  square("dog", 1, 1, 9, 9)]))
    message = only_warning(sample)
    assert "shape 0" in message and "entirely outside" in message and "left out" in message
    assert [instance.label for instance in sample.instances] == ["dog"]


def test_a_shape_just_touching_the_image_is_kept(tmp_path):
    # x from -10 to 0: Pillow (and LabelMe) fill pixel column 0 for a coordinate in [0, 1)
    sample = load_warned(write_labelme(tmp_path, [square("cat", -10, 5, 0, 9)]))
    assert "clipped" in only_warning(sample) and sample.rasterize()[0].any()


def test_points_partly_outside_warn_and_are_clipped(tmp_path):
    sample = load_warned(write_labelme(tmp_path, [square("cat", -10, -10, 20, 20)]))
    message = only_warning(sample)
    assert "img.json" in message and "shape 0" in message and "64x48" in message
    np.testing.assert_array_equal(sample.rasterize()[0], box_mask(0, 0, 20, 20))


# -- rectangles, circles, oriented rectangles ---------------------------------------------


def test_rectangle_drawn_right_to_left_is_normalised(tmp_path):
    sample = load_labelme_file(
        write_labelme(tmp_path, [shape("card", [[30, 20], [10, 5]], "rectangle")])
    )
    parsed = sample.instances[0].shapes[0]
    assert parsed.kind == "rectangle"
    np.testing.assert_array_equal(parsed.points, [[10, 5], [30, 20]])
    np.testing.assert_array_equal(sample.rasterize()[0], box_mask(10, 5, 30, 20))


@pytest.mark.parametrize("n_points", [1, 3, 4])
def test_rectangle_needs_exactly_two_points(tmp_path, n_points):
    corners = [[10, 5], [30, 5], [30, 20], [10, 20]][:n_points]
    message = shape_error(tmp_path, shape("card", corners, "rectangle"))
    assert "rectangle" in message and "exactly 2" in message and f"has {n_points} points" in message


def test_zero_width_rectangle_is_skipped(tmp_path):
    sample = load_warned(write_labelme(tmp_path, [shape("card", [[10, 5], [10, 20]], "rectangle")]))
    assert "shape 0" in only_warning(sample) and "zero width" in only_warning(sample)
    assert sample.instances == []


def test_circle_rasterizes_a_disc_from_centre_and_rim_point(tmp_path):
    sample = load_labelme_file(write_labelme(tmp_path, [shape("coin", [[32, 24], [42, 24]], "circle")]))
    mask = sample.rasterize()[0]
    assert mask[24, 32] and mask[24, 42] and not mask[24, 43] and mask[14, 32] and not mask[13, 32]
    assert abs(mask.sum() - math.pi * 10**2) < 0.15 * math.pi * 10**2


def test_circle_with_radius_zero_is_skipped(tmp_path):
    sample = load_warned(write_labelme(tmp_path, [shape("coin", [[32, 24], [32, 24]], "circle")]))
    assert "shape 0" in only_warning(sample) and "radius 0" in only_warning(sample)
    assert sample.instances == []


def test_circle_needs_two_points(tmp_path):
    assert "exactly 2" in shape_error(tmp_path, shape("coin", [[1, 1], [2, 2], [3, 3]], "circle"))


def test_oriented_rectangle_is_the_polygon_of_its_4_points(tmp_path):
    diamond = shape("card", [[20, 5], [35, 20], [20, 35], [5, 20]], "oriented_rectangle")
    sample = load_labelme_file(write_labelme(tmp_path, [diamond]))
    assert sample.instances[0].shapes[0].kind == "polygon"
    mask = sample.rasterize()[0]
    assert mask[20, 20] and mask[5, 20] and not mask[6, 6]


def test_oriented_rectangle_needs_four_points(tmp_path):
    assert "exactly 4" in shape_error(
        tmp_path, shape("card", [[1, 1], [9, 1], [9, 9]], "oriented_rectangle")
    )


# -- mask shapes (LabelMe 5.4+) ------------------------------------------------------------


def test_mask_shape_is_pasted_at_its_top_left_point(tmp_path):
    patch = np.array([[1, 1, 1, 1, 1], [1, 0, 0, 0, 0], [1, 0, 0, 0, 0], [1, 1, 1, 1, 1]], dtype=bool)
    blob = shape("stain", [[10, 8], [14, 11]], "mask", mask=png_base64(patch))
    sample = load_labelme_file(write_labelme(tmp_path, [blob]))
    parsed = sample.instances[0].shapes[0]
    assert parsed.kind == "mask" and parsed.mask.dtype == bool
    expected = np.zeros((HEIGHT, WIDTH), dtype=bool)
    expected[8:12, 10:15] = patch
    np.testing.assert_array_equal(sample.rasterize()[0], expected)


def test_mask_shape_partly_outside_the_image_is_clipped(tmp_path):
    blob = shape("stain", [[58, 42], [67, 51]], "mask", mask=png_base64(np.ones((10, 10), dtype=bool)))
    sample = load_warned(write_labelme(tmp_path, [blob]))
    assert "shape 0" in only_warning(sample) and "outside" in only_warning(sample)
    np.testing.assert_array_equal(sample.rasterize()[0], box_mask(58, 42, 63, 47))


def test_mask_patch_cropped_at_the_border_as_labelme_writes_it(tmp_path):
    # LabelMe crops the patch at the image border, so it is smaller than the box of its points.
    blob = shape("stain", [[60, 44], [64, 48]], "mask", mask=png_base64(np.ones((4, 4), dtype=bool)))
    sample = load_labelme_file(write_labelme(tmp_path, [blob]))
    np.testing.assert_array_equal(sample.rasterize()[0], box_mask(60, 44, 63, 47))


@pytest.mark.parametrize(
    "mask_data",
    ["!!! not base64 !!!", base64.b64encode(b"not a png").decode(), None],
    ids=["garbage-base64", "not-a-png", "missing"],
)
def test_mask_shape_with_bad_data_is_an_error(tmp_path, mask_data):
    assert '"mask"' in shape_error(tmp_path, shape("stain", [[1, 1], [4, 4]], "mask", mask=mask_data))


# -- shapes without area and unknown shapes ------------------------------------------------


@pytest.mark.parametrize(
    ("shape_type", "points"),
    [
        ("line", [[1, 1], [9, 9]]),
        ("linestrip", [[1, 1], [9, 9], [1, 9]]),
        ("point", [[4, 4]]),
        ("points", [[1, 1], [5, 5]]),
    ],
)
def test_arealess_shapes_are_skipped_with_a_warning(tmp_path, shape_type, points):
    sample = load_warned(
        write_labelme(tmp_path, [square("cat", 2, 2, 9, 9), shape("edge", points, shape_type)])
    )
    message = only_warning(sample)
    assert "img.json" in message and "shape 1" in message and shape_type in message
    assert [i.label for i in sample.instances] == ["cat"]


def test_unknown_shape_type_is_an_error(tmp_path):
    assert "'polyline'" in shape_error(tmp_path, shape("edge", [[1, 1], [9, 9], [1, 9]], "polyline"))


# -- coordinates and required fields -------------------------------------------------------


@pytest.mark.parametrize(
    "points",
    [
        [[1, 1], [9, 1], ["9", "9"]],
        [[1, 1], [9, 1], [float("nan"), 9]],
        [[1, 1], [9, 1], [float("inf"), 9]],
        [[1, 1], [9, 1], [9, 9, 0]],
        [[1, 1], [9, 1], [9]],
        [[1, 1], [9, 1], [True, 9]],
        [[1, 1], [9, 1], None],
        "1,1 9,1 9,9",
        None,
    ],
    ids=[
        "strings",
        "nan",
        "inf",
        "3-values",
        "1-value",
        "bool",
        "null-point",
        "string-points",
        "null-points",
    ],
)
def test_bad_coordinates_are_errors(tmp_path, points):
    message = shape_error(tmp_path, shape("cat", points))
    assert "point" in message


@pytest.mark.parametrize(
    "bad_shape",
    [
        {"label": "cat", "shape_type": "polygon"},
        {"points": [[1, 1], [9, 1], [9, 9]], "shape_type": "polygon"},
        {"label": 7, "points": [[1, 1], [9, 1], [9, 9]]},
        "cat",
    ],
    ids=["no-points", "no-label", "label-not-string", "not-an-object"],
)
def test_missing_or_malformed_fields_are_errors(tmp_path, bad_shape):
    shape_error(tmp_path, bad_shape)


def test_labels_lose_surrounding_spaces_with_a_warning_and_keep_their_case(tmp_path):
    shapes = [square("cat ", 1, 1, 5, 5), square("Cat", 10, 1, 15, 5), square("cat", 20, 1, 25, 5)]
    sample = load_warned(write_labelme(tmp_path, shapes))
    assert [i.label for i in sample.instances] == ["cat", "Cat", "cat"]
    assert "shape 0" in only_warning(sample) and "'cat '" in only_warning(sample)


def test_labels_differing_only_in_case_are_reported_for_the_folder(tmp_path):
    write_labelme(tmp_path, [square("Cat", 1, 1, 5, 5)], name="a")
    write_labelme(tmp_path, [square("cat", 1, 1, 5, 5)], name="b")
    with pytest.warns(LabelMeWarning, match="differ only in case") as record:
        load_labelme_folder(tmp_path)
    assert "'Cat' in 1 file(s), e.g. a.json" in str(record[0].message)
    report = report_labelme_folder(tmp_path)
    assert len(report.samples) == 2 and any("differ only in case" in w for w in report.warnings)


def test_empty_shapes_list_gives_a_sample_without_instances(tmp_path):
    sample = load_labelme_file(write_labelme(tmp_path, []))
    assert sample.instances == [] and sample.rasterize().shape == (0, HEIGHT, WIDTH)


# -- the JSON file itself ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (b'{"shapes": [', "not valid JSON"),
        (b"[1, 2]", "top level is a list"),
        (b'{"imagePath": "img.png"}', '"shapes"'),
        (b'{"imagePath": "img.png", "shapes": {}}', '"shapes" must be a list'),
        (b'{"shapes": [], "note": "\xff\xff"}', "neither UTF-8 nor GBK"),
    ],
    ids=["truncated", "not-an-object", "no-shapes", "shapes-not-a-list", "not-utf8-or-gbk"],
)
def test_broken_json_files_are_errors_naming_the_file(tmp_path, content, expected):
    write_image(tmp_path / "img.png")
    (tmp_path / "img.json").write_bytes(content)
    with pytest.raises(LabelMeError, match=expected) as caught:
        load_labelme_file(tmp_path / "img.json")
    assert "img.json" in str(caught.value)


def test_gbk_file_from_old_labelme_is_read_with_a_warning(tmp_path):
    write_image(tmp_path / "img.png")
    document = {"shapes": [square("学生证", 2, 2, 9, 9)], "imagePath": "img.png", "imageData": None}
    (tmp_path / "img.json").write_bytes(json.dumps(document, ensure_ascii=False).encode("gbk"))
    sample = load_warned(tmp_path / "img.json")
    assert sample.instances[0].label == "学生证" and "GBK" in only_warning(sample)


def test_utf8_with_byte_order_mark_is_read(tmp_path):
    write_image(tmp_path / "img.png")
    document = {"shapes": [square("学生证", 2, 2, 9, 9)], "imagePath": "img.png", "imageData": None}
    (tmp_path / "img.json").write_bytes(json.dumps(document, ensure_ascii=False).encode("utf-8-sig"))
    assert load_labelme_file(tmp_path / "img.json").instances[0].label == "学生证"


# -- finding and reading the image ---------------------------------------------------------


def test_relative_image_path_with_windows_backslashes(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "labels").mkdir()
    write_image(tmp_path / "images" / "a.png")
    json_path = write_labelme(
        tmp_path / "labels", [], name="a", image=False, imagePath="..\\images\\a.png"
    )
    sample = load_labelme_file(json_path)
    assert sample.image_path.resolve() == (tmp_path / "images" / "a.png").resolve()
    assert sample.stem == "a" and sample.image_bytes is None


def test_windows_absolute_image_path_falls_back_to_the_image_beside_the_json(tmp_path):
    json_path = write_labelme(tmp_path, [], imagePath="C:\\Users\\someone\\Desktop\\img.png")
    assert load_labelme_file(json_path).image_path == tmp_path / "img.png"


def test_absolute_image_path_falls_back_to_its_file_name_beside_the_json(tmp_path):
    write_image(tmp_path / "photo_0001.png")
    json_path = write_labelme(tmp_path, [], name="a", image=False, imagePath="D:\\shoot\\photo_0001.png")
    assert load_labelme_file(json_path).image_path == tmp_path / "photo_0001.png"


def test_image_with_the_json_stem_and_an_uppercase_suffix_is_found(tmp_path):
    write_image(tmp_path / "img.JPG")
    json_path = write_labelme(tmp_path, [], image=False, imagePath="moved/elsewhere.jpg")
    assert load_labelme_file(json_path).image_path == tmp_path / "img.JPG"


def test_missing_image_is_an_error_naming_the_json_and_the_path_tried(tmp_path):
    json_path = write_labelme(tmp_path, [], image=False, imagePath="..\\images\\gone.png")
    with pytest.raises(LabelMeError) as caught:
        load_labelme_file(json_path)
    message = str(caught.value)
    assert str(json_path) in message and str(tmp_path / "../images/gone.png") in message


def test_missing_image_behind_a_windows_absolute_path_names_where_it_looked(tmp_path):
    json_path = write_labelme(tmp_path, [], image=False, imagePath="C:\\Users\\someone\\gone.jpg")
    with pytest.raises(LabelMeError) as caught:
        load_labelme_file(json_path)
    message = str(caught.value)
    assert str(json_path) in message and r'"C:\Users\someone\gone.jpg"' in message
    assert str(tmp_path / "gone.jpg") in message and "C:/Users" not in message


def test_embedded_image_data_wins_over_a_bogus_image_path(tmp_path):
    pixels = np.zeros((16, 32, 3), dtype=np.uint8)
    pixels[:, :8] = (255, 0, 0)
    json_path = write_labelme(
        tmp_path,
        [],
        image=False,
        size=(32, 16),
        imagePath="C:\\nowhere\\x.jpg",
        imageData=png_base64(pixels),
    )
    sample = load_labelme_file(json_path)
    assert sample.image_path is None and sample.image_bytes.startswith(b"\x89PNG")
    assert (sample.width, sample.height) == (32, 16)
    np.testing.assert_array_equal(np.asarray(sample.load_image()), pixels)


def test_embedded_image_data_wrapped_over_several_lines(tmp_path):
    raw = base64.b64decode(png_base64(np.full((16, 32), 200, dtype=np.uint8)))
    wrapped = base64.encodebytes(raw).decode()  # 76-character lines, as some old versions wrote
    assert "\n" in wrapped.strip()
    json_path = write_labelme(tmp_path, [], image=False, size=(32, 16), imageData=wrapped)
    assert load_labelme_file(json_path).load_image().getpixel((0, 0)) == (200, 200, 200)


@pytest.mark.parametrize(
    "image_data",
    ["%%% garbage %%%", base64.b64encode(b"hello, not an image").decode()],
    ids=["bad-base64", "not-an-image"],
)
def test_bad_embedded_image_data_is_an_error_naming_the_file(tmp_path, image_data):
    json_path = write_labelme(tmp_path, [], image=False, imageData=image_data)
    with pytest.raises(LabelMeError, match="imageData") as caught:
        load_labelme_file(json_path)
    assert "img.json" in str(caught.value)


def test_unreadable_image_file_is_an_error_naming_image_and_json(tmp_path):
    json_path = write_labelme(tmp_path, [], image=False)
    (tmp_path / "img.png").write_bytes(b"this is not a PNG")
    with pytest.raises(LabelMeError) as caught:
        load_labelme_file(json_path)
    assert "img.json" in str(caught.value) and str(tmp_path / "img.png") in str(caught.value)


def test_image_removed_after_loading_fails_with_a_labelme_error(tmp_path):
    sample = load_labelme_file(write_labelme(tmp_path, []))
    (tmp_path / "img.png").unlink()
    with pytest.raises(LabelMeError, match="img.json"):
        sample.load_image()


def test_wrong_image_height_in_json_warns_with_both_sizes(tmp_path):
    sample = load_warned(write_labelme(tmp_path, [], imageHeight=50))
    message = only_warning(sample)
    assert (
        "img.json" in message and "64x50" in message and "64x48" in message and "swapped" not in message
    )
    assert (sample.width, sample.height) == (WIDTH, HEIGHT)  # the real size, not the JSON's


def test_swapped_image_size_in_json_points_to_exif_orientation(tmp_path):
    sample = load_warned(write_labelme(tmp_path, [], imageWidth=HEIGHT, imageHeight=WIDTH))
    assert "swapped" in only_warning(sample) and "EXIF orientation" in only_warning(sample)


def exif_rotated_jpeg(folder: Path) -> Path:
    """A 32x16 JPEG stored sideways with EXIF orientation 6, annotated upright (16x32).

    Stored, its white block is the top-left 16x8 pixels. Orientation 6 means "rotate 90 degrees
    clockwise to display", which moves that block to the top-right 8x16 of the upright image:
    x 8..15, y 0..15. The rectangle is drawn there, as LabelMe shows the image.
    """
    pixels = np.zeros((16, 32), dtype=np.uint8)
    pixels[:8, :16] = 255
    write_image(folder / "img.jpg", pixels=pixels, exif_orientation=6)
    card = shape("card", [[8, 0], [15, 15]], "rectangle")
    return write_labelme(folder, [card], image=False, size=(16, 32), imagePath="img.jpg")


def test_exif_orientation_6_masks_land_on_the_rotated_pixels(tmp_path):
    sample = load_labelme_file(exif_rotated_jpeg(tmp_path))
    assert (sample.width, sample.height) == (16, 32)
    image = sample.load_image()
    assert image.size == (16, 32)
    np.testing.assert_array_equal(sample.rasterize()[0], np.asarray(image.convert("L")) > 128)


def test_exif_orientation_with_max_side_keeps_masks_on_the_pixels(tmp_path):
    sample = load_labelme_file(exif_rotated_jpeg(tmp_path))
    image = sample.load_image(max_side=16)
    assert image.size == (8, 16)
    np.testing.assert_array_equal(sample.rasterize(*image.size)[0], np.asarray(image.convert("L")) > 128)


@pytest.mark.parametrize(
    ("suffix", "mode", "value", "expected"),
    [
        (".png", "L", 100, (100, 100, 100)),
        (".png", "P", 3, None),
        (".png", "RGBA", (10, 20, 30, 0), (10, 20, 30)),
        (".png", "LA", (100, 255), (100, 100, 100)),
        (".png", "1", 1, (255, 255, 255)),
        (".png", "I;16", 40000, (156, 156, 156)),  # 40000 / 256, not clipped to 255
        (".tif", "I", 40000, (156, 156, 156)),
        (".bmp", "RGB", (1, 2, 3), (1, 2, 3)),
    ],
)
def test_image_modes_are_converted_to_8_bit_rgb(tmp_path, suffix, mode, value, expected):
    Image.new(mode, (WIDTH, HEIGHT), value).save(tmp_path / f"img{suffix}")
    assert Image.open(tmp_path / f"img{suffix}").mode == mode  # the file really is in that mode
    image = load_labelme_file(
        write_labelme(tmp_path, [], image=False, imagePath=f"img{suffix}")
    ).load_image()
    assert (image.mode, image.size) == ("RGB", (WIDTH, HEIGHT))
    if expected is not None:
        assert image.getpixel((0, 0)) == expected


def test_load_image_max_side_shrinks_the_longest_side_only_when_larger(tmp_path):
    write_image(tmp_path / "img.jpg", (200, 100))
    sample = load_labelme_file(
        write_labelme(tmp_path, [], image=False, size=(200, 100), imagePath="img.jpg")
    )
    assert sample.load_image(50).size == (50, 25)
    assert sample.load_image(500).size == sample.load_image().size == (200, 100)
    with pytest.raises(ValueError, match="max_side"):
        sample.load_image(0)


def test_rasterize_at_a_smaller_size_scales_the_shapes(tmp_path):
    shapes = [
        shape("card", [[10, 10], [30, 20]], "rectangle"),
        shape("stain", [[40, 8], [43, 11]], "mask", mask=png_base64(np.ones((4, 4), dtype=bool))),
    ]
    masks = load_labelme_file(write_labelme(tmp_path, shapes)).rasterize(32, 24)
    assert masks.shape == (2, 24, 32) and masks.dtype == bool
    np.testing.assert_array_equal(masks[0], box_mask(5, 5, 15, 10, size=(32, 24)))
    np.testing.assert_array_equal(masks[1], box_mask(20, 4, 21, 5, size=(32, 24)))


MIXED_SHAPES = [
    square("card", 5.3, 4.6, 30.2, 20.7),
    shape("card", [[8, 30], [20, 40]], "rectangle"),
    shape("coin", [[45, 20], [52, 20]], "circle"),
    shape("stain", [[40, 36], [43, 39]], "mask", mask=png_base64(np.eye(4, dtype=bool))),
]


@pytest.mark.parametrize("region", [(0, 0, WIDTH, HEIGHT), (7, 3, 50, 41), (30, 10, 64, 48)])
def test_rasterize_a_region_at_its_own_size_is_a_crop_of_the_full_masks(tmp_path, region):
    """Drawing the masks of a crop directly gives exactly the crop of the full masks."""
    sample = load_labelme_file(write_labelme(tmp_path, MIXED_SHAPES))
    left, top, right, bottom = region
    cropped = sample.rasterize(right - left, bottom - top, region=region)
    np.testing.assert_array_equal(cropped, sample.rasterize()[:, top:bottom, left:right])


def test_rasterize_a_region_is_a_crop_of_the_full_masks_for_any_polygon(tmp_path):
    """Tilted edges that cross the region's left or top side included (Pillow truncates
    negative coordinates towards zero, which would shift them)."""
    rng = np.random.default_rng(0)
    polygons = [shape("card", (rng.uniform(0, 1, (5, 2)) * [WIDTH, HEIGHT]).round(1).tolist())
                for _ in range(6)]
    sample = load_labelme_file(write_labelme(tmp_path, polygons))
    full = sample.rasterize()
    for _ in range(40):
        left, top = int(rng.integers(0, WIDTH - 8)), int(rng.integers(0, HEIGHT - 8))
        right, bottom = int(rng.integers(left + 4, WIDTH + 1)), int(rng.integers(top + 4, HEIGHT + 1))
        region = sample.rasterize(right - left, bottom - top, region=(left, top, right, bottom))
        np.testing.assert_array_equal(region, full[:, top:bottom, left:right])


def test_rasterize_a_region_scaled_agrees_with_resizing_the_crop(tmp_path):
    sample = load_labelme_file(write_labelme(tmp_path, [square("card", 6, 5, 41, 30)]))
    masks = sample.rasterize(68, 50, region=(4, 3, 38, 28))  # 2x the 34 x 25 crop
    expected = np.kron(sample.rasterize()[:, 3:28, 4:38], np.ones((2, 2), dtype=bool))
    assert (masks != expected).mean() < 0.01  # the same shape, up to the outline's pixels
    with pytest.raises(ValueError, match="region"):
        sample.rasterize(10, 10, region=(5, 5, 5, 9))


def test_instance_boxes_cover_each_instance(tmp_path):
    sample = load_labelme_file(write_labelme(tmp_path, MIXED_SHAPES))
    boxes = sample.instance_boxes()
    assert boxes.shape == (len(sample.instances), 4)
    for box, mask in zip(boxes, sample.rasterize()):
        rows, columns = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
        assert box[0] <= columns[0] + 1 and columns[-1] <= box[2] and box[1] <= rows[0] + 1
        assert rows[-1] <= box[3] and (box[2:] - box[:2] <= np.array([columns[-1] - columns[0],
                                                                      rows[-1] - rows[0]]) + 2).all()


def test_load_pixels_gives_load_images_pixels_upright(tmp_path):
    """OpenCV decodes intact JPEGs, Pillow the rest; the pixels are the same either way."""
    sample = load_labelme_file(exif_rotated_jpeg(tmp_path))
    pixels = sample.load_pixels()
    assert pixels.shape == (3, 32, 16) and pixels.dtype == torch.uint8
    expected = np.asarray(sample.load_image()).transpose(2, 0, 1)
    assert np.abs(pixels.numpy().astype(int) - expected).max() <= 1
    (tmp_path / "png").mkdir()
    png = load_labelme_file(write_labelme(tmp_path / "png", [square("card", 1, 1, 9, 9)]))
    assert np.array_equal(png.load_pixels().numpy(), np.asarray(png.load_image()).transpose(2, 0, 1))


def test_load_pixels_falls_back_to_pillow_if_the_decoder_ignored_the_orientation(tmp_path, monkeypatch):
    from maskrcnn_labelme import pixels

    sample = load_labelme_file(exif_rotated_jpeg(tmp_path))
    stored_sideways = np.zeros((16, 32, 3), dtype=np.uint8)  # what an EXIF-blind decoder returns
    monkeypatch.setattr(pixels, "decode_complete_jpeg", lambda data: stored_sideways)
    pixels = sample.load_pixels()
    assert pixels.shape == (3, 32, 16) and pixels.numpy().max() > 200  # Pillow's upright pixels


def test_load_pixels_of_a_large_jpeg_is_decoded_scaled_down_but_not_below_max_side(tmp_path):
    write_image(tmp_path / "img.jpg", (400, 300))
    sample = load_labelme_file(write_labelme(tmp_path, [], image=False, size=(400, 300), imagePath="img.jpg"))
    assert tuple(sample.load_pixels(100).shape) == (3, 75, 100)  # libjpeg's 1/4 scale
    assert tuple(sample.load_pixels(120).shape) == (3, 150, 200)  # 1/4 would be too small
    assert tuple(sample.load_pixels(300).shape) == (3, 300, 400)


def test_load_pixels_reports_a_truncated_jpeg(tmp_path):
    write_image(tmp_path / "img.jpg", (64, 48))
    sample = load_labelme_file(write_labelme(tmp_path, [], image=False, imagePath="img.jpg"))
    data = (tmp_path / "img.jpg").read_bytes()
    (tmp_path / "img.jpg").write_bytes(data[: len(data) // 2])
    with pytest.raises(LabelMeError, match="img.jpg"):
        sample.load_pixels()


def test_samples_and_errors_survive_pickling(tmp_path):
    sample = load_labelme_file(write_labelme(tmp_path, [square("cat", 2, 2, 9, 9)]))
    np.testing.assert_array_equal(pickle.loads(pickle.dumps(sample)).rasterize(), sample.rasterize())
    error = pickle.loads(
        pickle.dumps(LabelMeError("a.json, shape 2: bad", json_path=Path("a.json"), shape_index=2))
    )
    assert (str(error), error.json_path, error.shape_index) == (
        "a.json, shape 2: bad",
        Path("a.json"),
        2,
    )


# -- folders -------------------------------------------------------------------------------


def broken_folder(folder: Path) -> Path:
    """One good file (with a skipped line shape) and three broken ones."""
    write_labelme(
        folder, [square("cat", 2, 2, 9, 9), shape("edge", [[1, 1], [5, 5]], "line")], name="good"
    )
    (folder / "invalid.json").write_text("{not json", encoding="utf-8")
    write_labelme(folder, [], name="no_image", image=False)
    write_labelme(
        folder,
        [square("cat", 2, 2, 9, 9), square("cat", 3, 3, 9, 9), shape("x", [[1, 1]], "blob")],
        name="bad_shape",
    )
    (folder / "notes.txt").write_text("not a LabelMe file", encoding="utf-8")
    return folder


def test_report_collects_every_problem_of_a_folder_in_one_pass(tmp_path):
    report = report_labelme_folder(broken_folder(tmp_path))  # emits no warnings (pytestmark)
    assert [s.stem for s in report.samples] == ["good"]
    assert sorted(e.json_path.name for e in report.errors) == [
        "bad_shape.json",
        "invalid.json",
        "no_image.json",
    ]
    assert {e.json_path.name: e.shape_index for e in report.errors}["bad_shape.json"] == 2
    assert len(report.warnings) == 1 and "good.json, shape 1" in report.warnings[0]


def test_load_folder_raises_one_error_listing_every_bad_file(tmp_path):
    with pytest.warns(LabelMeWarning, match="good.json"):  # the skipped line shape
        with pytest.raises(LabelMeError) as caught:
            load_labelme_folder(broken_folder(tmp_path))
    message = str(caught.value)
    assert message.startswith("3 of 4 LabelMe files")
    assert all(name in message for name in ("invalid.json", "no_image.json", "bad_shape.json, shape 2"))


def test_load_folder_can_skip_bad_files_with_a_warning_each(tmp_path):
    with pytest.warns(LabelMeWarning) as record:
        samples = load_labelme_folder(broken_folder(tmp_path), on_error="skip")
    assert [s.stem for s in samples] == ["good"]
    skipped = [str(w.message) for w in record if "file skipped" in str(w.message)]
    assert len(skipped) == 3 and any("invalid.json" in m for m in skipped)


def test_load_folder_reads_json_files_in_sorted_order(tmp_path):
    for name in ("b", "a", "c"):
        write_labelme(tmp_path, [], name=name)
    (tmp_path / "c.json").rename(tmp_path / "c.JSON")
    assert [s.stem for s in load_labelme_folder(tmp_path)] == ["a", "b", "c"]


def test_missing_folder_or_folder_without_json_is_an_error_naming_it(tmp_path):
    with pytest.raises(LabelMeError, match="does not exist") as caught:
        load_labelme_folder(tmp_path / "nope")
    assert str(tmp_path / "nope") in str(caught.value)
    write_image(tmp_path / "img.png")
    with pytest.raises(LabelMeError, match="no .json files") as caught:
        report_labelme_folder(tmp_path)
    assert str(tmp_path) in str(caught.value)


def test_load_folder_rejects_an_unknown_on_error_value(tmp_path):
    with pytest.raises(ValueError, match="on_error"):
        load_labelme_folder(tmp_path, on_error="ignore")


def test_the_sample_shipped_with_the_repository_loads_cleanly():
    folder = REPO / "data" / "student-id-sample"
    if not folder.is_dir():
        pytest.skip("data/student-id-sample is not present")
    samples = load_labelme_folder(folder)
    assert samples and all(s.instances and s.warnings == [] for s in samples)
    sample = samples[0]
    image = sample.load_image(max_side=128)
    assert max(image.size) == 128 and sample.rasterize(*image.size).any()


def test_an_opencv_without_rgb_decoding_gives_the_same_pixels(tmp_path, monkeypatch):
    """OpenCV before 4.11 has no IMREAD_COLOR_RGB: the BGR decode and conversion must agree."""
    import cv2

    from maskrcnn_labelme import pixels

    data = (REPO / "data" / "student-id-sample" / "10001.jpg").read_bytes()
    direct = pixels.decode_complete_jpeg(data)
    monkeypatch.delattr(cv2, "IMREAD_COLOR_RGB", raising=False)
    assert np.array_equal(pixels.decode_complete_jpeg(data), direct)
