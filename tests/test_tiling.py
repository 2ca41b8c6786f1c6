"""Tile grids: exact coverage, exact coordinates both ways, tissue filtering, validation."""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest

from wsi_hipe.tiling import (
    PixelTransform,
    Tile,
    TileGrid,
    area_fractions,
    make_grid,
    pixel_transform,
)

CASES = [
    # (width0, height0, slide_mpp, target_mpp, tile_size, halo)
    (1000, 700, 0.5, 0.5, 256, 32),
    (1001, 333, 0.499, 0.5, 128, 16),
    (2220, 2967, 0.499, 1.0, 256, 32),
    (16, 16, 0.499, 2.0, 64, 8),
    (5000, 3001, 0.2527, 0.5, 100, 0),
    (300, 250, 352.77777983377013, 700.0, 32, 8),
]


@pytest.mark.parametrize("case", CASES)
def test_cores_cover_target_image_exactly_once(case):
    w0, h0, smpp, tmpp, tile, halo = case
    grid = make_grid((w0, h0), slide_mpp=smpp, target_mpp=tmpp, tile_size=tile, halo=halo)
    s = tmpp / smpp
    height, width = grid.shape
    # The target image covers the slide, and no more than one target px beyond it.
    assert width * s >= w0 - 1e-6 and (width - 1) * s < w0
    assert height * s >= h0 - 1e-6 and (height - 1) * s < h0
    count = np.zeros(grid.shape, dtype=np.int32)
    for t in grid.tiles:
        rows, cols = grid.target_slices(t)
        count[rows, cols] += 1
        assert (rows.stop - rows.start, cols.stop - cols.start) == t.core
    assert (count == 1).all()
    assert len(grid) == grid.n_rows * grid.n_cols


@pytest.mark.parametrize("case", CASES)
def test_core_boxes_tile_level0_without_gaps_or_overlap(case):
    w0, h0, smpp, tmpp, tile, halo = case
    grid = make_grid((w0, h0), slide_mpp=smpp, target_mpp=tmpp, tile_size=tile, halo=halo)
    by_pos = {(t.row, t.col): t for t in grid.tiles}
    for t in grid.tiles:
        x0, y0, w, h = grid.level0_box(t, halo=False)
        right = by_pos.get((t.row, t.col + 1))
        if right is not None:  # the right neighbour starts exactly where this core ends
            assert grid.level0_box(right, halo=False)[0] == x0 + w
        below = by_pos.get((t.row + 1, t.col))
        if below is not None:
            assert grid.level0_box(below, halo=False)[1] == y0 + h
    last = grid.tiles[-1]
    x0, y0, w, h = grid.level0_box(last, halo=False)
    assert x0 + w >= w0 - 1e-6 and y0 + h >= h0 - 1e-6


@pytest.mark.parametrize(
    "smpp,tmpp", [(0.5, 0.5), (0.499, 0.5), (0.2527, 1.0), (0.3, 0.7), (0.25, 2.0)]
)
def test_coordinate_round_trips_are_exact_and_do_not_drift(smpp, tmpp):
    grid = make_grid((100_000, 80_000), slide_mpp=smpp, target_mpp=tmpp, tile_size=512, halo=0)
    exact_scale = Fraction(tmpp) / Fraction(smpp)
    for v in list(range(0, 5000, 7)) + [123_456, 999_999, 2**20 + 3]:
        X, Y = grid.target_to_level0(v, v + 1)
        assert grid.level0_to_target(X, Y) == (v, v + 1)
        # No drift: the level-0 position is the exact product, up to float rounding.
        assert abs(Fraction(X) - v * exact_scale) <= Fraction(1, 10**6) * max(1, v)
        x, y = grid.level0_to_target(v, v + 3)
        assert grid.target_to_level0(x, y) == (v, v + 3)


def test_read_window_has_halo_and_core_slices_cut_the_core():
    grid = make_grid((1000, 900), slide_mpp=0.25, target_mpp=0.5, tile_size=128, halo=16)
    assert grid.scale == 2.0 and grid.window == 160
    t = grid.tiles[grid.n_cols + 1]  # second row, second column
    x0, y0, w, h = grid.read_window(t)
    assert (x0, y0, w, h) == ((128 - 16) * 2.0, (128 - 16) * 2.0, 160, 160)
    assert grid.read_window(t, halo=False) == (256.0, 256.0, 128, 128)
    assert grid.level0_box(t) == (224.0, 224.0, 320.0, 320.0)
    rows, cols = grid.core_slices(t)
    assert (rows.start, rows.stop, cols.start, cols.stop) == (16, 144, 16, 144)
    corner = grid.tiles[0]
    assert grid.read_window(corner)[:2] == (-32.0, -32.0)  # padded beyond the slide border
    last = grid.tiles[-1]
    assert last.core == (450 - 3 * 128, 500 - 3 * 128)
    assert grid.read_window(last)[2:] == (160, 160)  # window size is fixed even at the border


def test_order_is_row_major_deterministic_and_indexed():
    kw = dict(slide_mpp=0.5, target_mpp=1.0, tile_size=64, halo=8)
    a = make_grid((1000, 700), **kw)
    b = make_grid((1000, 700), **kw)
    assert a == b
    assert [t.index for t in a.tiles] == list(range(len(a)))
    keys = [(t.row, t.col) for t in a.tiles]
    assert keys == sorted(keys)
    assert all(t.y == t.row * 64 and t.x == t.col * 64 for t in a.tiles)
    assert isinstance(a.tiles[0], Tile) and isinstance(a, TileGrid)


class _Mask:
    def __init__(self, mask, downsample):
        self.mask = mask
        self.downsample = downsample


def test_tissue_filter_keeps_tiles_by_core_fraction():
    # Level-0 1024 x 512 slide, mask at downsample 8: tissue in the left 51 mask px (408 level-0
    # px = 204 target px at 2 level-0 px per target px). Cores start every 64 target px, so
    # columns 0-2 are all tissue and column 3 holds (204 - 192) / 64 = 0.1875.
    mask = np.zeros((64, 128), dtype=bool)
    mask[:, :51] = True

    def grid(min_tissue):
        return make_grid(
            (1024, 512),
            slide_mpp=0.5,
            target_mpp=1.0,
            tile_size=64,
            halo=0,
            tissue=_Mask(mask, 8.0),
            min_tissue=min_tissue,
        )

    loose = grid(0.15)
    fractions = {t.col: t.tissue for t in loose.tiles}
    assert sorted(fractions) == [0, 1, 2, 3]
    assert fractions[2] == pytest.approx(1.0)
    assert fractions[3] == pytest.approx(0.1875)
    assert len(loose) == 4 * loose.n_rows
    assert [t.index for t in loose.tiles] == list(range(len(loose)))
    assert sorted({t.col for t in grid(0.2).tiles}) == [0, 1, 2]
    assert len(grid(0.0)) == loose.n_rows * loose.n_cols  # 0 keeps everything
    empty = make_grid((1024, 512), slide_mpp=0.5, target_mpp=1.0, tissue=_Mask(mask & False, 8.0))
    assert len(empty) == 0


def test_area_fractions_known_answers():
    mask = np.array([[1, 0], [0, 0]], dtype=bool)
    boxes = np.array(
        [
            [0, 0, 10, 10],  # exactly the one tissue px (downsample 10)
            [0, 0, 20, 20],  # a quarter
            [5, 0, 10, 10],  # half of it
            [-10, -10, 20, 20],  # a quarter, half of the box is outside the mask
            [15, 15, 5, 5],  # none
            [0, 0, 0, 5],  # empty box
        ],
        dtype=float,
    )
    got = area_fractions(mask, 10.0, boxes)
    np.testing.assert_allclose(got, [1.0, 0.25, 0.5, 0.25, 0.0, 0.0], atol=1e-12)


def test_area_fractions_match_supersampling():
    rng = np.random.default_rng(3)
    mask = rng.random((13, 17)) > 0.5
    d = 3.0
    boxes = np.column_stack(
        [
            rng.uniform(-5, 50, 40),
            rng.uniform(-5, 40, 40),
            rng.uniform(1, 20, 40),
            rng.uniform(1, 20, 40),
        ]
    )
    got = area_fractions(mask, d, boxes)
    n = 200
    for box, g in zip(boxes, got, strict=True):
        xs = box[0] + (np.arange(n) + 0.5) / n * box[2]
        ys = box[1] + (np.arange(n) + 0.5) / n * box[3]
        cols = np.floor(xs / d).astype(int)
        rows = np.floor(ys / d).astype(int)
        inside_c = (cols >= 0) & (cols < mask.shape[1])
        inside_r = (rows >= 0) & (rows < mask.shape[0])
        sub = np.zeros((n, n))
        sub[np.ix_(inside_r, inside_c)] = mask[np.ix_(rows[inside_r], cols[inside_c])]
        assert g == pytest.approx(sub.mean(), abs=0.02)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(tile_size=0), "tile_size"),
        (dict(halo=-1), "halo"),
        (dict(tile_size=2.5), "tile_size"),
        (dict(slide_mpp=0), "slide_mpp"),
        (dict(target_mpp=float("nan")), "target_mpp"),
        (dict(min_tissue=1.5), "min_tissue"),
        (dict(tissue=object()), "tissue"),
    ],
)
def test_bad_arguments_name_the_value(kwargs, match):
    base = dict(slide_mpp=0.5, target_mpp=0.5)
    base.update(kwargs)
    with pytest.raises(ValueError, match=match):
        make_grid((100, 100), **base)
    with pytest.raises(ValueError, match="level0_size"):
        make_grid((0, 100), slide_mpp=0.5, target_mpp=0.5)


# --- the pixel-centre <-> µm transform ------------------------------------------------------------


def test_pixel_transform_puts_pixel_centres_on_their_level0_pixels():
    # A grid of downsample d: pixel j averages level-0 pixels j*d .. j*d + d - 1, whose mean
    # centre (level-0 pixel centres at i * mpp) is (j*d + (d - 1)/2) * mpp.
    mpp = 0.25
    for d in (1, 2, 4, 8):
        t = pixel_transform(mpp, d)
        for j in (0, 3, 17):
            centre = np.mean([i * mpp for i in range(j * d, j * d + d)])
            assert t.to_world(j, j) == pytest.approx((centre, centre))
            assert t.to_pixel(centre, centre) == pytest.approx((j, j))
    assert pixel_transform(0.5, 1).translation == (0.0, 0.0)
    assert pixel_transform(0.5).translation == (0.0, 0.0)
    assert pixel_transform(0.5, 4).scale == (2.0, 2.0)
    assert pixel_transform(0.5, 4).translation == (0.75, 0.75)


@pytest.mark.parametrize("slide_mpp", [0.2527, 0.499, 0.5, 1.0])
@pytest.mark.parametrize("target_mpp", [0.5, 0.75, 2.0])
def test_pixel_transform_follows_the_ngff_translation_rule(slide_mpp, target_mpp):
    # Output level k (target_mpp · 2^k µm/px over a slide_mpp slide): NGFF scale mpp·2^k and
    # translation (mpp·2^k − slide_mpp)/2, whether given as a downsample or as µm/px.
    for k in range(5):
        step = target_mpp * 2**k
        rule = (step - slide_mpp) / 2
        by_mpp = pixel_transform(slide_mpp, mpp=step)
        assert by_mpp.scale == (step, step)  # exactly the configured µm/px
        assert by_mpp.translation == pytest.approx((rule, rule), rel=1e-12, abs=1e-12)
        by_downsample = pixel_transform(slide_mpp, step / slide_mpp)
        assert by_downsample.scale == pytest.approx(by_mpp.scale, rel=1e-12)
        assert by_downsample.translation == pytest.approx(by_mpp.translation, rel=1e-12, abs=1e-12)
        assert by_mpp.ngff() == ([step, step], [by_mpp.translation[0]] * 2)


@pytest.mark.parametrize("origin", [(0.0, 0.0), (37.0, 21.0), (-12.5, 1000.25)])
@pytest.mark.parametrize("downsample", [1.0, 2.0, 2.5])
def test_pixel_transform_round_trips_and_origin(origin, downsample):
    m = 0.5
    t = pixel_transform(m, downsample, origin=origin)
    # Pixel (0, 0) spans level-0 edges [origin, origin + downsample): its centre in µm.
    expected = tuple((o + (downsample - 1) / 2) * m for o in origin)
    assert t.to_world(0, 0) == pytest.approx(expected)
    # The origin only shifts the grid by origin · slide_mpp.
    base = pixel_transform(m, downsample)
    for y, x in [(0, 0), (3, 7), (-2.5, 11.25)]:
        wy, wx = t.to_world(y, x)
        by, bx = base.to_world(y, x)
        assert (wy - by, wx - bx) == pytest.approx((origin[0] * m, origin[1] * m))
        assert t.to_pixel(wy, wx) == pytest.approx((y, x), abs=1e-9)
        assert t.to_edge(wy, wx) == pytest.approx((y + 0.5, x + 0.5), abs=1e-9)
    # World -> pixel -> world.
    for y_um, x_um in [(0.0, 0.0), (12.3, -4.56), (1e4, 2e4)]:
        assert t.to_world(*t.to_pixel(y_um, x_um)) == pytest.approx((y_um, x_um))
    # Level-0 edge coordinate e is world (e - 1/2) · slide_mpp, whatever the grid.
    edge = pixel_transform(m)
    assert edge.to_edge(*t.to_world(-0.5, -0.5)) == pytest.approx(origin)


def test_pixel_transform_agrees_with_the_tile_grid():
    # A read window of a TileGrid placed in µm: its pixel (0, 0) is the target pixel at the
    # window's corner, so both descriptions give the same world point for every pixel.
    grid = make_grid((1000, 700), slide_mpp=0.2527, target_mpp=0.5, tile_size=128, halo=16)
    whole = pixel_transform(grid.slide_mpp, grid.scale)
    for tile in grid.tiles[::5]:
        x0, y0, _, _ = grid.read_window(tile)
        window = pixel_transform(grid.slide_mpp, grid.scale, origin=(y0, x0))
        for r, c in [(0, 0), (16, 16), (159, 3)]:
            target = (tile.y - grid.halo + r, tile.x - grid.halo + c)
            assert window.to_world(r, c) == pytest.approx(whole.to_world(*target), abs=1e-9)


@pytest.mark.parametrize("mpp, downsample", [(0, 1), (-1, 2), (float("nan"), 1), (0.5, 0)])
def test_pixel_transform_rejects_bad_values(mpp, downsample):
    with pytest.raises(ValueError, match="must be"):
        pixel_transform(mpp, downsample)


def test_pixel_transform_rejects_ambiguous_or_bad_arguments():
    with pytest.raises(ValueError, match="not both"):
        pixel_transform(0.5, 2.0, mpp=1.0)
    with pytest.raises(ValueError, match="mpp"):
        pixel_transform(0.5, mpp=0.0)
    with pytest.raises(ValueError, match="origin"):
        pixel_transform(0.5, 1.0, origin=(1.0,))
    assert isinstance(pixel_transform(0.5), PixelTransform)
