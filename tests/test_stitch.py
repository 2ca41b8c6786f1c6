"""Tests of wsi_hipe.stitch: halo cropping, tile placement, stitching and 2x2 downsampling."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from wsi_hipe.stitch import (
    clip_box,
    crop_core,
    downsample_mean,
    downsample_mode,
    downsampled_shape,
    place_tile,
    stitch_tiles,
)


def _read_with_halo(image: np.ndarray, y: int, x: int, core: int, halo: int) -> np.ndarray:
    """What a slide reader returns: core + halo around (y, x), zeros outside the image."""
    out = np.zeros((core + 2 * halo, core + 2 * halo), image.dtype)
    place_tile(out, image, -(y - halo), -(x - halo))
    return out


def _tiled(image: np.ndarray, fn, *, core: int, halo: int) -> np.ndarray:
    tiles = []
    for y in range(0, image.shape[0], core):
        for x in range(0, image.shape[1], core):
            tile = fn(_read_with_halo(image, y, x, core, halo))
            tiles.append((y, x, crop_core(tile, halo)))
    return stitch_tiles(tiles, image.shape)


def test_crop_core_removes_the_halo_and_keeps_leading_axes():
    tile = np.arange(2 * 10 * 12).reshape(2, 10, 12)
    core = crop_core(tile, 2)
    assert core.shape == (2, 6, 8)
    np.testing.assert_array_equal(core, tile[:, 2:8, 2:10])
    np.testing.assert_array_equal(crop_core(tile, (1, 3), core_shape=(4, 5)), tile[:, 1:5, 3:8])


def test_crop_core_works_on_torch_tensors():
    torch = pytest.importorskip("torch")
    tile = torch.arange(64.0).reshape(1, 8, 8)
    assert torch.equal(crop_core(tile, 1), tile[:, 1:7, 1:7])


@pytest.mark.parametrize(
    ("halo", "core_shape"), [(5, None), (-1, None), (2, (7, 4)), (2, (0, 3)), ((1, 2, 3), None)]
)
def test_crop_core_rejects_bad_halo_or_core(halo, core_shape):
    with pytest.raises(ValueError):
        crop_core(np.zeros((10, 10)), halo, core_shape=core_shape)


def test_place_tile_clips_at_every_border():
    canvas = np.zeros((5, 6), int)
    core = np.arange(1, 10).reshape(3, 3)
    assert place_tile(canvas, core, -1, 4) == (slice(0, 2), slice(4, 6))
    np.testing.assert_array_equal(canvas[0:2, 4:6], [[4, 5], [7, 8]])
    assert canvas.sum() == 4 + 5 + 7 + 8
    assert place_tile(canvas, core, 5, 0) is None  # entirely below
    assert clip_box(-3, -3, 3, 3, (5, 6)) is None


def test_tiled_pointwise_function_equals_untiled():
    rng = np.random.default_rng(0)
    image = rng.random((37, 53)).astype(np.float32)  # not multiples of the core: partial tiles

    def fn(a):
        return np.sqrt(a) * np.sin(3 * a)

    np.testing.assert_array_equal(_tiled(image, fn, core=16, halo=4), fn(image))


def test_tiled_neighbourhood_filter_has_no_seams_or_shifts():
    # A 5x5 box filter needs 2 px of context: with a halo >= 2 each core is exact, so any
    # off-by-one in cropping or placement would show up at the core borders.
    rng = np.random.default_rng(1)
    image = rng.random((41, 29))

    def fn(a):
        return ndimage.uniform_filter(a, size=5, mode="constant", cval=0.0)

    np.testing.assert_allclose(_tiled(image, fn, core=8, halo=2), fn(image), atol=1e-12)
    # With too small a halo the seams appear: the test above can fail.
    assert not np.allclose(_tiled(image, fn, core=8, halo=1), fn(image), atol=1e-6)


def test_stitch_tiles_partial_border_tiles_clipped_exactly():
    shape = (10, 7)
    tiles = [(y, x, np.full((4, 4), 1 + y * 10 + x)) for y in range(0, 10, 4) for x in (0, 4)]
    out = stitch_tiles(tiles, shape, fill=-1)
    assert out.shape == shape and out.dtype == tiles[0][2].dtype
    assert (out != -1).all()  # fully covered
    np.testing.assert_array_equal(out[8:, 4:], np.full((2, 3), 1 + 84))  # bottom-right partial
    np.testing.assert_array_equal(out[4:8, 0:4], np.full((4, 4), 41))


def test_stitch_tiles_empty_and_bad_input():
    out = stitch_tiles([], (3, 4), fill=2.5)
    assert out.dtype == np.float32 and (out == 2.5).all()
    with pytest.raises(ValueError, match="2-D"):
        stitch_tiles([(0, 0, np.zeros((1, 2, 2)))], (3, 4))
    with pytest.raises(ValueError, match="shape"):
        stitch_tiles([], (3,))


def test_downsampled_shape_is_ceil_half():
    assert downsampled_shape((5, 8)) == (3, 4)
    assert downsampled_shape((1, 2)) == (1, 1)


def test_downsample_mean_known_answers_and_partial_blocks():
    a = np.array(
        [
            [0, 2, 4, 4, 9],
            [2, 0, 4, 8, 9],
            [1, 1, 3, 5, 7],
        ],
        np.float32,
    )
    expected = np.array([[1, 5, 9], [1, 4, 7]], np.float32)
    out = downsample_mean(a)
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, expected)


def test_downsample_mean_keeps_constants_and_the_mean_of_even_arrays():
    np.testing.assert_array_equal(downsample_mean(np.full((7, 5), 3.25)), np.full((4, 3), 3.25))
    rng = np.random.default_rng(2)
    a = rng.random((8, 12))
    out = downsample_mean(a)
    np.testing.assert_allclose(out, a.reshape(4, 2, 6, 2).mean(axis=(1, 3)), rtol=1e-6)
    np.testing.assert_allclose(out.mean(), a.mean(), rtol=1e-6)


def test_downsample_mode_majority_ties_and_partial_blocks():
    a = np.array(
        [
            [0, 1, 2, 2, 5, 1],
            [1, 0, 2, 0, 5, 1],
            [3, 3, 1, 2, 0, 0],
            [0, 0, 2, 1, 0, 7],
            [4, 0, 0, 0, 6, 0],
        ],
        np.uint8,
    )
    expected = np.array(
        [
            [1, 2, 5],  # 0/1 tie -> 1; 2 majority; 5/1 tie -> 5
            [3, 2, 0],  # 3/0 tie -> 3; 1/2 tie -> 2 (larger); 0 majority
            [4, 0, 6],  # partial (1x2) blocks: 4/0 -> 4; 0 and 0; 6/0 -> 6
        ],
        np.uint8,
    )
    out = downsample_mode(a)
    assert out.dtype == np.uint8
    np.testing.assert_array_equal(out, expected)


def test_downsample_mode_keeps_thin_lines_and_bools():
    a = np.zeros((8, 8), np.uint8)
    a[:, 3] = 1  # a 1-px line: every block it touches is a 2-2 tie
    out = downsample_mode(a)
    np.testing.assert_array_equal(out[:, 1], np.ones(4))
    assert out.sum() == 4
    b = np.zeros((3, 3), bool)
    b[0, 0] = b[2, 2] = True
    np.testing.assert_array_equal(downsample_mode(b), [[False, False], [False, True]])


def test_downsample_rejects_bad_input():
    with pytest.raises(ValueError, match="integer"):
        downsample_mode(np.zeros((2, 2), np.float32))
    with pytest.raises(ValueError, match="2-D"):
        downsample_mean(np.zeros((2, 2, 2)))
    with pytest.raises(ValueError, match="non-empty"):
        downsample_mean(np.zeros((0, 4)))


def _mode_reference(a: np.ndarray) -> np.ndarray:
    """Brute force: per block, the most frequent value, ties to the largest."""
    out = np.empty(downsampled_shape(a.shape), a.dtype)
    for i in range(out.shape[0]):
        for j in range(out.shape[1]):
            values, counts = np.unique(a[2 * i : 2 * i + 2, 2 * j : 2 * j + 2], return_counts=True)
            out[i, j] = values[counts == counts.max()].max()
    return out


def _mean_reference(a: np.ndarray) -> np.ndarray:
    out = np.empty(downsampled_shape(a.shape))
    for i in range(out.shape[0]):
        for j in range(out.shape[1]):
            out[i, j] = a[2 * i : 2 * i + 2, 2 * j : 2 * j + 2].mean()
    return out


@pytest.mark.parametrize("shape", [(1, 1), (1, 6), (7, 1), (9, 12), (10, 13), (11, 11)])
@pytest.mark.parametrize("dtype", [np.uint8, np.int16, np.bool_])
def test_downsample_mode_matches_brute_force(shape, dtype):
    rng = np.random.default_rng(sum(shape))
    a = rng.integers(-2 if dtype == np.int16 else 0, 3, shape).astype(dtype)
    np.testing.assert_array_equal(downsample_mode(a), _mode_reference(a))


@pytest.mark.parametrize("shape", [(1, 1), (1, 6), (7, 1), (9, 12), (11, 11)])
@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.uint16])
def test_downsample_mean_matches_brute_force(shape, dtype):
    rng = np.random.default_rng(sum(shape))
    a = (rng.random(shape) * 100).astype(dtype)
    np.testing.assert_allclose(downsample_mean(a), _mean_reference(a), rtol=1e-6)
