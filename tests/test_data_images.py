"""Images decode as transformers' `load_image` does (EXIF, palette, greyscale, CMYK), with
transparency on white and 16-bit scaled; broken images are counted bad rows with file:line."""

from __future__ import annotations

import json
import struct
import zlib

import numpy as np
import pytest
from PIL import Image
from transformers.image_transforms import convert_to_rgb
from transformers.image_utils import load_image

from peftvlm.data.prepare.loading import load_rows
from peftvlm.data.read.images import MAX_IMAGE_PIXELS, image_size, load_rgb
from peftvlm.recipe.load import validate_recipe_dict


def gradient(size=(40, 20)) -> np.ndarray:
    w, h = size
    x, y = np.meshgrid(np.arange(w), np.arange(h))
    return np.stack([x * 255 // w, y * 255 // h, (x + y) % 256], axis=-1).astype(np.uint8)


def exif_rotated_jpeg(path):
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to view
    Image.fromarray(gradient()).save(path, exif=exif, quality=95)


def palette_png(path):
    Image.fromarray(gradient()).convert("P", palette=Image.Palette.ADAPTIVE).save(path)


SAME_AS_LOAD_IMAGE = {
    "exif.jpg": exif_rotated_jpeg,
    "palette.png": palette_png,
    "grey.png": lambda p: Image.fromarray(gradient()[..., 0], "L").save(p),
    "cmyk.jpg": lambda p: Image.fromarray(gradient()).convert("CMYK").save(p),
    "rgb.png": lambda p: Image.fromarray(gradient()).save(p),
}


@pytest.mark.parametrize("name", SAME_AS_LOAD_IMAGE)
def test_pixels_equal_transformers_load_image(name, tmp_path):
    path = tmp_path / name
    SAME_AS_LOAD_IMAGE[name](path)
    ours = np.asarray(load_rgb(str(path)))
    assert np.array_equal(ours, np.asarray(load_image(str(path))))
    # The size the length check reads from the header is the size training sees.
    assert image_size(str(path)) == (ours.shape[1], ours.shape[0])


def test_exif_rotation_is_applied(tmp_path):
    exif_rotated_jpeg(tmp_path / "e.jpg")
    assert load_rgb(str(tmp_path / "e.jpg")).size == (20, 40)


def test_transparency_is_composited_onto_white(tmp_path):
    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[..., 0] = 200          # red everywhere, but only the left half is opaque
    rgba[:, :4, 3] = 255
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    ours = np.asarray(load_rgb(str(tmp_path / "a.png")))
    # What transformers' image processors make of a transparent image (convert_to_rgb)...
    assert np.array_equal(ours, convert_to_rgb(Image.open(tmp_path / "a.png"), return_numpy=True))
    assert (ours[:, 4:] == 255).all() and (ours[:, :4] == [200, 0, 0]).all()
    # ...where load_image itself drops alpha and shows the hidden colour (documented difference).
    assert (np.asarray(load_image(str(tmp_path / "a.png")))[:, 4:] == [200, 0, 0]).all()


def test_16_bit_images_are_scaled_not_clipped(tmp_path):
    values = (np.arange(64).reshape(8, 8) * 1000).astype(np.uint16)
    Image.fromarray(values).save(tmp_path / "d.png")
    assert Image.open(tmp_path / "d.png").mode == "I;16"
    ours = np.asarray(load_rgb(str(tmp_path / "d.png")))
    expected = np.round(values / 65535 * 255).astype(np.uint8)
    assert np.abs(ours[..., 0].astype(int) - expected).max() <= 1
    assert (ours[..., 0] == ours[..., 2]).all() and (ours < 255).mean() > 0.9


def png_header_only(width: int, height: int) -> bytes:
    """A small PNG whose header declares `width` x `height` (a decompression bomb's shape)."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(
            ">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(
        b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b"")


def test_every_bad_image_kind_is_a_counted_row_with_its_line(tmp_path):
    img = tmp_path / "img"
    img.mkdir()
    Image.fromarray(gradient((32, 32))).save(img / "ok.png")
    Image.fromarray(gradient((64, 64))).save(img / "whole.jpg", quality=95)
    data = (img / "whole.jpg").read_bytes()
    (img / "cut.jpg").write_bytes(data[:len(data) // 2])
    png = (img / "ok.png").read_bytes()
    (img / "cut.png").write_bytes(png[:len(png) - 40])
    (img / "bomb.png").write_bytes(png_header_only(20000, 20000))
    (img / "big.png").write_bytes(png_header_only(9000, 8000))  # 72 MP: our limit, not PIL's
    (img / "noise.png").write_bytes(b"not an image at all" * 10)
    names = ["ok.png", "cut.jpg", "cut.png", "bomb.png", "big.png", "noise.png", "ok.png"]
    rows = [{"messages": [{"role": "user", "content": "<image>Q"},
                          {"role": "assistant", "content": "a"}], "images": [f"img/{n}"]}
            for n in names]
    (tmp_path / "t.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    recipe = validate_recipe_dict({"name": "i", "model": {"id": "tiny-llava"},
                                   "method": {"name": "lora"}, "data": {"train": "t.jsonl"}})
    recipe.source_path = tmp_path / "r.yaml"
    loaded = load_rows(recipe)
    assert len(loaded.train) == 2
    bad = loaded.bad_rows["train"]
    assert {r: v["count"] for r, v in bad.items()} == {"corrupt_image": 3, "image_too_large": 2}
    corrupt = bad["corrupt_image"]["first_rows"]
    assert [r.split(" ")[0] for r in corrupt] == ["t.jsonl:2", "t.jsonl:3", "t.jsonl:6"]
    assert "truncated" in corrupt[0] or "broken" in corrupt[0]
    large = bad["image_too_large"]["first_rows"]
    assert [r.split(" ")[0] for r in large] == ["t.jsonl:4", "t.jsonl:5"]
    assert f"over the {MAX_IMAGE_PIXELS:,}-pixel limit" in large[1]
