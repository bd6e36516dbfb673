"""The one rule per image mode (hf_tissue_vit.imaging): what each PIL mode becomes in 8-bit RGB."""

import numpy as np
import pytest
from PIL import Image

from hf_tissue_vit.imaging import decode_bytes, decode_dataset_image, to_rgb8, to_uint8


def _pixel(image: Image.Image) -> list[int]:
    return to_uint8(image)[0, 0].tolist()


def test_rgb_is_returned_unchanged():
    image = Image.fromarray(np.full((5, 7, 3), 200, dtype=np.uint8))
    assert to_rgb8(image) is image
    assert to_uint8(image).shape == (5, 7, 3) and to_uint8(image).dtype == np.uint8


@pytest.mark.parametrize(
    ("image", "expected"),
    [
        (Image.new("RGBA", (3, 2), (10, 20, 30, 0)), [255, 255, 255]),  # transparent: white glass
        (Image.new("RGBA", (3, 2), (10, 20, 30, 255)), [10, 20, 30]),
        (Image.new("RGBA", (3, 2), (0, 0, 0, 128)), [127, 127, 127]),  # half over white
        (Image.new("LA", (3, 2), (40, 0)), [255, 255, 255]),
        (Image.new("L", (3, 2), 99), [99, 99, 99]),
        (Image.new("I;16", (3, 2), 65535), [255, 255, 255]),
        (Image.new("I;16", (3, 2), 1000), [3, 3, 3]),
        (Image.new("I", (3, 2), 1000), [3, 3, 3]),  # read as 16-bit data, like I;16
        (Image.new("I", (3, 2), 200), [0, 0, 0]),
        (Image.new("I", (3, 2), 10**6), [255, 255, 255]),  # clipped to 16 bits
        (Image.new("F", (3, 2), 0.5), [128, 128, 128]),  # float grey in [0, 1]
        (Image.new("F", (3, 2), 1.5), [255, 255, 255]),  # overshoot of [0, 1] data: clipped
        (Image.new("CMYK", (3, 2), (0, 0, 0, 0)), [255, 255, 255]),
    ],
    ids=lambda v: getattr(v, "mode", None) or str(v),
)
def test_one_rule_per_mode(image, expected):
    assert _pixel(image) == expected


def test_palette_with_transparency_goes_on_white():
    image = Image.new("P", (3, 2), 1)
    image.putpalette([0, 0, 0, 10, 20, 30] + [0] * 762)
    image.info["transparency"] = 1
    assert _pixel(image) == [255, 255, 255]
    del image.info["transparency"]
    assert _pixel(image) == [10, 20, 30]


def test_rule_depends_on_mode_not_on_the_image():
    """Two crops of one 16-bit image keep one scaling, whatever their own maximum."""
    values = np.array([[1000, 60000]], dtype=np.int32)
    whole = to_uint8(Image.fromarray(values, "I"))
    dark = to_uint8(Image.fromarray(values[:, :1].copy(), "I"))
    assert whole[0, 0].tolist() == dark[0, 0].tolist() == [3, 3, 3]


def test_decoders_agree(tmp_path):
    image = Image.new("RGBA", (4, 4), (10, 20, 30, 0))
    path = tmp_path / "a.png"
    image.save(path)
    data = path.read_bytes()
    assert decode_bytes(data).tolist() == decode_dataset_image({"bytes": data, "path": None}).tolist()
    assert decode_dataset_image({"bytes": None, "path": str(path)}).tolist() == decode_bytes(data).tolist()
    with pytest.raises(ValueError, match="empty"):
        decode_dataset_image({"bytes": None, "path": None})
    with pytest.raises(ValueError, match="PIL"):
        to_uint8(np.zeros((5, 5, 3)))
