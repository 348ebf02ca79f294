"""Faithful pixels (issue 24, part 3): 16-bit images scaled, not clipped; deep pixels with no agreed
white skipped by name; transparency composited onto the chosen background; EXIF orientation applied
before resizing; every conversion counted in the report and the pool's meta."""
from __future__ import annotations

import io
import struct
import zlib
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from kd3.cli import main
from kd3.data.decode import ALPHA_BACKGROUNDS, FLOAT_RANGE, INT32, try_decode
from kd3.data.ingest import ingest
from kd3.data.labelled import load_labelled
from kd3.data.pool import Pool

RNG = np.random.default_rng(24)


def _save(image: Image.Image, path: Path, **params) -> Path:
    image.save(path, **params)
    return path


def _encode(image: Image.Image, fmt: str = "PNG", **params) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **params)
    return buffer.getvalue()


def _png16_rgb(pixels: np.ndarray) -> bytes:
    """A 16-bit RGB PNG written by hand (Pillow cannot write one): IHDR bit depth 16, colour type 2,
    unfiltered big-endian rows."""
    height, width, _ = pixels.shape
    rows = b"".join(b"\0" + pixels[y].astype(">u2").tobytes() for y in range(height))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 16, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")


def _decoded(data: bytes, size: int, channels: int, **kwargs) -> tuple[np.ndarray, Counter]:
    conversions: Counter = Counter()
    image, reason = try_decode(data, size, channels, conversions=conversions, **kwargs)
    assert reason is None, reason
    return image, conversions


# -- 16-bit and deeper ------------------------------------------------------------------------------

def test_16bit_grey_and_rgb_pngs_ingest_to_the_pixels_of_their_8bit_versions(tmp_path):
    grey16 = RNG.integers(0, 65536, (24, 24), dtype=np.uint16)  # a real 16-bit picture, full range
    rgb16 = RNG.integers(0, 65536, (24, 24, 3), dtype=np.uint16)
    folder = tmp_path / "images"
    folder.mkdir()
    # The 8-bit versions as an image tool writes them: the nearest level, round(v / 257).
    _save(Image.fromarray(grey16), folder / "a_grey16.png")
    _save(Image.fromarray(np.rint(grey16 / 257).astype(np.uint8)), folder / "b_grey8.png")
    (folder / "c_rgb16.png").write_bytes(_png16_rgb(rgb16))
    _save(Image.fromarray(np.rint(rgb16 / 257).astype(np.uint8)), folder / "d_rgb8.png")
    assert Image.open(folder / "a_grey16.png").mode == "I;16" and Image.open(folder / "c_rgb16.png").mode == "RGB"

    grey, _ = ingest(folder, 24, 1, workers=1)
    rgb, report = ingest(folder, 24, 3, workers=1)
    for pool in (grey, rgb):
        images = pool.images.numpy().astype(int)
        assert np.abs(images[0] - images[1]).max() <= 1 and np.abs(images[2] - images[3]).max() <= 1
    # v >> 8 exactly (the high byte), and nothing clipped to white as Pillow's I;16 → L conversion does.
    assert np.array_equal(grey.images[0, 0].numpy(), (grey16 >> 8).astype(np.uint8))
    assert np.array_equal(rgb.images[2].numpy(), (rgb16 >> 8).astype(np.uint8).transpose(2, 0, 1))
    assert (grey.images[0] >= 250).float().mean() < 0.05
    assert report.conversions["16-bit scaled"] == 2 and rgb.meta["counts"]["conversions"]["16-bit scaled"] == 2


def test_a_widened_8bit_image_comes_back_exactly_through_the_resize():
    eight = RNG.integers(0, 256, (30, 40), dtype=np.uint8)
    widened = eight.astype(np.uint16) * 257  # how 8-bit pictures become 16-bit ones
    for channels in (1, 3):
        reference, _ = _decoded(_encode(Image.fromarray(eight)), 16, channels)
        deep, conversions = _decoded(_encode(Image.fromarray(widened)), 16, channels)
        assert np.array_equal(deep, reference)
        assert conversions["16-bit scaled"] == 1 and conversions["resized"] == 1
    colour = RNG.integers(0, 256, (30, 40, 3), dtype=np.uint8)
    reference, _ = _decoded(_encode(Image.fromarray(colour)), 16, 3)
    deep, _ = _decoded(_png16_rgb(colour.astype(np.uint16) * 257), 16, 3)
    assert np.array_equal(deep, reference)


def test_float_pixels_in_0_1_are_scaled_and_32bit_or_out_of_range_pixels_are_skipped_by_name(tmp_path):
    values = RNG.random((12, 12)).astype(np.float32)
    image, conversions = _decoded(_encode(Image.fromarray(values), "TIFF"), 12, 1)
    assert np.array_equal(image[0], np.rint(values * 255).astype(np.uint8)) and conversions["float scaled"] == 1
    assert try_decode(_encode(Image.fromarray(values * 3), "TIFF"), 12, 1) == (None, FLOAT_RANGE)
    assert try_decode(_encode(Image.fromarray((values * 1e6).astype(np.int32)), "TIFF"), 12, 1) == (None, INT32)

    folder = tmp_path / "images"
    folder.mkdir()
    _save(Image.fromarray((values * 1e6).astype(np.int32)), folder / "a.tif")
    _save(Image.fromarray(values * 3), folder / "b.tif")
    _save(Image.fromarray(values), folder / "c.tif")
    pool, report = ingest(folder, 12, 1, workers=1)
    assert len(pool) == 1 and report.reasons == {INT32: 1, FLOAT_RANGE: 1}
    assert report.conversions == {"float scaled": 1}  # only images that loaded are counted


# -- transparency ---------------------------------------------------------------------------------------

def _glyph() -> np.ndarray:
    """A dark glyph (grey 40) on a fully transparent background whose stored colour is noise, and one
    half-transparent pixel (200, alpha 128)."""
    rgba = np.zeros((16, 16, 4), dtype=np.uint8)
    rgba[..., :3] = RNG.integers(0, 256, (16, 16, 3))
    rgba[4:12, 4:12] = (40, 40, 40, 255)
    rgba[0, 0] = (200, 200, 200, 128)
    return rgba


@pytest.mark.parametrize("alpha", list(ALPHA_BACKGROUNDS))
def test_transparency_is_composited_onto_the_chosen_background(alpha):
    rgba = _glyph()
    background = ALPHA_BACKGROUNDS[alpha][0]
    image, conversions = _decoded(_encode(Image.fromarray(rgba)), 16, 1, alpha=alpha)
    expected = np.full((16, 16), background, dtype=np.uint8)
    expected[4:12, 4:12] = 40
    expected[0, 0] = round((200 * 128 + background * 127) / 255)
    assert np.abs(image[0].astype(int) - expected).max() <= 1
    assert np.array_equal(image[0][1:], expected[1:])  # every opaque or fully transparent pixel exactly
    assert conversions == Counter({"alpha composited": 1, "RGB to grey": 1})


def test_default_alpha_is_white_as_before():
    rgba = Image.fromarray(_glyph())
    before = Image.alpha_composite(Image.new("RGBA", rgba.size, "white"), rgba).convert("RGB")  # what kd3 always did
    image, _ = _decoded(_encode(rgba), 16, 3)
    assert np.array_equal(image, np.asarray(before).transpose(2, 0, 1))


def test_every_kind_of_transparency_palette_cmyk_and_channel_change_is_handled_and_counted(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    glyph = _glyph()
    _save(Image.fromarray(glyph), folder / "a_rgba.png")
    _save(Image.fromarray(glyph).convert("LA"), folder / "b_la.png")
    palette = Image.fromarray(np.where(glyph[..., 3:] == 255, 1, 0)[..., 0].astype(np.uint8), "P")
    palette.putpalette([0, 0, 0, 40, 40, 40] + [0] * 762)
    _save(palette, folder / "c_palette_transparent.png", transparency=0)
    _save(palette, folder / "d_palette_opaque.png")
    cmyk = Image.fromarray(RNG.integers(0, 256, (16, 16, 4), dtype=np.uint8), "CMYK")
    _save(cmyk, folder / "e_cmyk.tif")
    _save(Image.fromarray(RNG.integers(0, 256, (16, 16), dtype=np.uint8)), folder / "f_grey.png")
    _save(Image.fromarray(RNG.integers(0, 256, (20, 16, 3), dtype=np.uint8)), folder / "g_rgb_tall.png")

    pool, report = ingest(folder, 16, 3, out=tmp_path / "pool", workers=1, alpha="black")
    images = pool.images.numpy()
    assert len(pool) == 7 and report.skipped == 0
    for index in range(3):  # RGBA, LA and the palette's transparent colour: the glyph on black
        assert np.array_equal(images[index][:, 1:], np.pad(np.full((3, 8, 8), 40), ((0, 0), (3, 4), (4, 4)))), index
    assert np.array_equal(images[3][:, 4:12, 4:12], np.full((3, 8, 8), 40))  # opaque palette: its own colours
    assert np.array_equal(images[4], np.asarray(cmyk.convert("RGB")).transpose(2, 0, 1))  # Pillow's ICC-less formula
    assert report.conversions == {"palette converted": 2, "alpha composited": 3, "CMYK converted": 1, "grey to RGB": 2,
                                  "resized": 1}
    assert Pool.load(tmp_path / "pool").meta["counts"]["conversions"] == report.conversions
    assert pool.meta["alpha"] == "black"
    assert "converted: 2 palette converted, 3 alpha composited (on black), 1 CMYK converted, 2 grey to RGB, 1 resized" \
        in str(report)


def test_kd3_data_ingest_alpha_black_keeps_a_dark_image_dark_and_prints_the_conversions(tmp_path, capsys):
    folder = tmp_path / "images"
    folder.mkdir()
    _save(Image.fromarray(_glyph()), folder / "glyph.png")
    argv = ["data", "ingest", str(folder), "--size", "16", "--channels", "1", "--workers", "1"]
    for alpha, background in (("black", 0), (None, 255)):
        out = tmp_path / f"pool-{alpha}"
        capsys.readouterr()
        assert main([*argv, "--out", str(out), *(["--alpha", alpha] if alpha else [])]) == 0
        printed = capsys.readouterr().out
        image = Pool.load(out).images[0][0].numpy()
        assert image[8, 8] == 40 and image[15, 15] == background
        assert f"converted: 1 alpha composited (on {alpha or 'white'}), 1 RGB to grey" in printed


def test_the_cli_offers_every_alpha_background_and_an_unknown_one_is_refused(tmp_path, capsys):
    folder = tmp_path / "images"
    folder.mkdir()
    _save(Image.fromarray(_glyph()), folder / "glyph.png")
    argv = ["data", "ingest", str(folder), "--size", "16", "--channels", "1", "--workers", "1"]
    for alpha, (background, *_) in ALPHA_BACKGROUNDS.items():
        assert main([*argv, "--out", str(tmp_path / alpha), "--alpha", alpha]) == 0
        assert Pool.load(tmp_path / alpha).images[0][0, 15, 15] == background
    with pytest.raises(SystemExit) as refused:
        main([*argv, "--out", str(tmp_path / "pink"), "--alpha", "pink"])
    assert refused.value.code == 2 and "invalid choice: 'pink'" in capsys.readouterr().err
    with pytest.raises(ValueError, match="alpha 'pink' is not a background .*: give one of white, black, grey"):
        ingest(folder, 8, 1, alpha="pink")


def test_load_labelled_takes_the_alpha_policy(tmp_path):
    (tmp_path / "glyphs" / "dark").mkdir(parents=True)
    _save(Image.fromarray(_glyph()), tmp_path / "glyphs" / "dark" / "one.png")
    black = load_labelled(str(tmp_path / "glyphs"), image_size=16, channels=1, alpha="black")
    white = load_labelled(str(tmp_path / "glyphs"), image_size=16, channels=1)
    assert black.images[0, 0, 15, 15] == 0 and white.images[0, 0, 15, 15] == 255
    assert black.images[0, 0, 8, 8] == white.images[0, 0, 8, 8] == 40


# -- orientation ----------------------------------------------------------------------------------------

def test_exif_orientation_6_is_applied_before_the_resize():
    # 32 wide, 16 tall: left half black, right half white. Orientation 6 means "rotate 90° clockwise to
    # display": the picture is 16 wide and 32 tall with the black half on top; the centre crop of its
    # 16×16 cover-resize shows black above white. Unrotated it would be black left of white.
    pixels = np.zeros((16, 32), dtype=np.uint8)
    pixels[:, 16:] = 255
    exif = Image.Exif()
    exif[0x0112] = 6
    data = _encode(Image.fromarray(pixels), "JPEG", quality=95, exif=exif)
    image, conversions = _decoded(data, 16, 1)
    top, bottom = image[0, :6].mean(), image[0, 10:].mean()
    assert top < 30 and bottom > 225 and abs(image[0, :, :8].mean() - image[0, :, 8:].mean()) < 10
    assert conversions == Counter({"EXIF rotated": 1, "resized": 1})
    plain, conversions = _decoded(_encode(Image.fromarray(pixels), "JPEG", quality=95), 16, 1)
    assert plain[0, :, :6].mean() < 30 and plain[0, :, 10:].mean() > 225 and "EXIF rotated" not in conversions
