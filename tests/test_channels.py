"""Channel names, the nuclear-stain choice, planes and raw ranges (wsi_hipe.slide._channels)."""

from __future__ import annotations

import numpy as np
import pytest

from wsi_hipe.errors import SlideFormatError, StainError
from wsi_hipe.slide._channels import (
    ChannelInfo,
    check_model_channels,
    describe_channels,
    nuclear_stain,
    parse_plane,
    raw_max,
    resolve_plane,
    select_channel,
    select_channels,
)
from wsi_hipe.slide._metadata import (
    PLAUSIBLE_MPP,
    check_mpp,
    level_downsample,
    mpp_from_xy,
    to_micrometres,
)


def chans(*names):
    return tuple(ChannelInfo(name=n) for n in names)


@pytest.mark.parametrize(
    ("name", "stain"),
    [
        ("DAPI", "DAPI"),
        ("dapi_2", "DAPI"),
        ("DAPI-1", "DAPI"),
        ("Hoechst 33342", "Hoechst"),
        ("Hoechst33342", "Hoechst"),
        ("DNA_1", "DNA"),
        ("DNA1", "DNA"),
        ("SiR-DNA", "DNA"),
        ("DRAQ5", "DRAQ"),
        ("NucBlue", "nuclear"),
        ("Nuclear stain", "nuclear"),
        ("TO-PRO-3", "TO-PRO"),
        ("191Ir", "iridium"),
        ("Ir193Di", "iridium"),
        ("CD3", None),
        ("cDNA-probe", None),  # "cdna" is not the word "dna"
        ("Nucleolin", None),
        ("SYTOX Green", None),  # a dead-cell stain, not SYTO + digits
        ("PanCK", None),
        ("", None),
        (None, None),
    ],
)
def test_nuclear_stain_by_name(name, stain):
    assert nuclear_stain(name) == stain


def test_select_channel_by_index_name_and_prefix():
    c = chans("DAPI", "CD3", "CD20", "Hoechst-free marker")
    assert select_channel(1, c, path="s")[0] == 1
    assert select_channel("2", c, path="s")[0] == 2
    assert select_channel("cd3", c, path="s")[0] == 1  # exact, case-insensitive
    assert select_channel("CD2", c, path="s")[0] == 2  # unique prefix
    index, how = select_channel("dapi", c, path="s")
    assert index == 0 and "DAPI" in how


def test_select_channel_ambiguous_prefix_lists_the_matches():
    with pytest.raises(StainError, match=r"'CD'.*matches several.*1 'CD3', 2 'CD20'.*--channel"):
        select_channel("CD", chans("DAPI", "CD3", "CD20"), path="s.tiff")


def test_unknown_channel_name_lists_the_names():
    with pytest.raises(StainError, match=r"no channel named 'CD8'.*0 'DAPI', 1 'CD3'.*--channel"):
        select_channel("CD8", chans("DAPI", "CD3"), path="s.tiff")


def test_index_out_of_range():
    with pytest.raises(StainError, match=r"channel 5 is out of range.*2 channel"):
        select_channel(5, chans("DAPI", "CD3"), path="s")


@pytest.mark.parametrize("bad", [True, 1.5, None, "", "  "])
def test_bad_channel_values(bad):
    with pytest.raises(StainError):
        select_channel(bad, chans("DAPI"), path="s")


def test_auto_picks_the_nuclear_stain_by_name():
    index, how = select_channel("auto", chans("CD3", "Hoechst 33342", "CD20"), path="s")
    assert index == 1 and how.startswith("auto: nuclear stain by name")


def test_auto_takes_the_first_of_several_channels_of_one_stain():
    # cyclic immunofluorescence: a DNA channel per cycle
    c = chans("DNA_1", "CD3", "CD45", "DNA_2", "CD8", "DNA_3")
    index, how = select_channel("auto", c, path="s")
    assert index == 0 and "2 more DNA" in how


def test_auto_refuses_different_nuclear_stains():
    with pytest.raises(StainError, match=r"several nuclear stains.*0 'DAPI'.*2 'Hoechst'"):
        select_channel("auto", chans("DAPI", "CD3", "Hoechst"), path="s")


def test_auto_with_one_channel_takes_it_whatever_its_name():
    assert select_channel("auto", chans("CHAN_0"), path="s") == (0, "auto: single channel")
    assert select_channel("auto", (ChannelInfo(),), path="s")[0] == 0
    assert select_channel("mean", (ChannelInfo(),), path="s")[0] == 0
    with pytest.raises(StainError, match="no channel named 'mean'"):
        select_channel("mean", chans("DAPI", "CD3"), path="s")


def test_auto_without_a_nuclear_name_lists_the_channels_and_the_flag():
    with pytest.raises(StainError, match=r"0 'CHAN_0', 1 'CHAN_1'.*--channel NAME or INDEX"):
        select_channel("auto", chans("CHAN_0", "CHAN_1"), path="s")
    unnamed = tuple(ChannelInfo() for _ in range(48))
    with pytest.raises(StainError, match=r"48 channel\(s\) without names \(0-47\)"):
        select_channel("auto", unnamed, path="s")


def test_auto_does_not_take_transmitted_light():
    bright = ChannelInfo(name="Bright", fluor="TL Brightfield", illumination="Transmitted")
    with pytest.raises(StainError, match=r"transmitted light.*--channel 0"):
        select_channel("auto", (bright,), path="s")
    assert select_channel(0, (bright,), path="s")[0] == 0
    # a named nuclear stain that the metadata marks transmitted is not a stain either
    dna = ChannelInfo(name="DNA", illumination="Transmitted")
    with pytest.raises(StainError):
        select_channel("auto", (dna, ChannelInfo(name="CD3")), path="s")


def test_select_channels_in_order_and_refuses_duplicates():
    c = chans("DAPI", "CD3", "CD20")
    assert select_channels(["CD20", "auto", 1], c, path="s")[0] == (2, 0, 1)
    with pytest.raises(StainError, match="twice"):
        select_channels(["DAPI", 0], c, path="s")
    with pytest.raises(StainError, match="non-empty list"):
        select_channels([], c, path="s")
    with pytest.raises(StainError, match="non-empty list"):
        select_channels("DAPI", c, path="s")


def test_check_model_channels():
    check_model_channels(None, chans("anything"), path="s")
    check_model_channels(["Hoechst"], chans("DAPI"), path="s")  # nuclear stains interchange
    check_model_channels(["Hoechst", "CD3"], chans("DNA_1", "cd3"), path="s")
    check_model_channels(["Hoechst"], (ChannelInfo(),), path="s")  # unnamed: warned, accepted
    with pytest.raises(StainError, match=r"trained on 2 channel.*1 channel"):
        check_model_channels(["Hoechst", "CD3"], chans("DAPI"), path="s")
    with pytest.raises(StainError, match=r"input 1: trained on 'CD3', slide gives 'CD20'"):
        check_model_channels(["Hoechst", "CD3"], chans("DAPI", "CD20"), path="s")


def test_describe_channels():
    assert describe_channels(chans("A", None)) == "0 'A', 1 (no name)"
    assert describe_channels(()) == "no channels"


@pytest.mark.parametrize(
    ("value", "parsed"),
    [
        (None, {}),
        (3, {"": 3}),
        ("3", {"": 3}),
        ("z=3", {"z": 3}),
        ("Z=3, t=1", {"z": 3, "t": 1}),
        ({"Z": 2}, {"z": 2}),
    ],
)
def test_parse_plane(value, parsed):
    assert parse_plane(value) == parsed


@pytest.mark.parametrize("bad", ["z=-1", "z=a", "3=z", 1.5, True, [1]])
def test_parse_plane_rejects(bad):
    with pytest.raises(ValueError, match="plane"):
        parse_plane(bad)


def test_resolve_plane():
    assert resolve_plane({}, {"z": 1, "t": 1}, path="s") == {"z": 0, "t": 0}
    assert resolve_plane({"": 2}, {"z": 5, "t": 1}, path="s") == {"z": 2, "t": 0}
    assert resolve_plane({"z": 4}, {"z": 5}, path="s") == {"z": 4}
    with pytest.raises(SlideFormatError, match=r"Z-stack \(5 z-planes\).*--plane z=2.*slide.plane"):
        resolve_plane({}, {"z": 5}, path="s")
    with pytest.raises(SlideFormatError, match=r"more than 2-D.*--plane z=2,t=1"):
        resolve_plane({}, {"z": 5, "t": 3}, path="s")
    with pytest.raises(ValueError, match="out of range"):
        resolve_plane({"z": 5}, {"z": 5}, path="s")
    with pytest.raises(ValueError, match="no 't' axis"):
        resolve_plane({"t": 0}, {"z": 5}, path="s")
    with pytest.raises(ValueError, match="ambiguous"):
        resolve_plane({"": 0}, {"z": 5, "t": 3}, path="s")


def test_raw_max():
    assert raw_max(np.uint8) == 255
    assert raw_max(np.uint16) == 65535
    assert raw_max(np.uint16, 12) == 4095
    assert raw_max(np.uint16, 16) == 65535
    assert raw_max(np.uint8, 12) == 255  # more bits than the type holds: the type wins
    assert raw_max(np.int16) == 32767
    assert raw_max(np.float32) == 1.0


def test_units_and_plausibility():
    assert to_micrometres(325, "nm") == pytest.approx(0.325)
    assert to_micrometres(0.5, "µm") == 0.5
    assert to_micrometres(0.5, "micrometer") == 0.5
    assert to_micrometres(0.5, None) == 0.5  # OME's default unit
    assert to_micrometres(1, "pixel") is None
    ok = check_mpp(0.5, "test", "s")
    assert ok.mpp == 0.5 and ok.note is None
    bad = check_mpp(10000.0, "OME PhysicalSizeX/Y", "s")
    assert bad.mpp is None and "10000" in bad.note and "implausible" in bad.note
    assert check_mpp(PLAUSIBLE_MPP[0] / 2, "t", "s").mpp is None
    assert mpp_from_xy(0.5, 0.52, "t", "s").mpp == pytest.approx(0.51)
    assert mpp_from_xy(None, 0.5, "t", "s").mpp == 0.5
    assert mpp_from_xy(None, None, "t", "s").mpp is None


@pytest.mark.parametrize(
    ("size0", "size", "expected"),
    [
        ((100, 100), (50, 50), 2.0),
        ((100, 100), (12, 12), 8.0),  # 100 -> 50 -> 25 -> 12: made with 8, ratio 8.33
        ((101, 75), (51, 38), 2.0),  # ceil halving
        ((300, 250), (37, 31), 8.0),
        ((1000, 1000), (300, 300), 1000 / 300),  # not an integer factor: the ratio
    ],
)
def test_level_downsample(size0, size, expected):
    assert level_downsample(size0, size) == pytest.approx(expected)
