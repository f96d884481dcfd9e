import pytest

from epdiff.models.hunyuan_image3.resolution import ResolutionGroup, snap


def test_base_1024_buckets():
    group = ResolutionGroup(1024)
    assert len(group) == 33
    assert group[0] == (512, 2048)  # (height, width)
    assert group[16] == (1024, 1024)
    assert group[32] == (2048, 512)
    assert group[20] == (1280, 768)
    assert group.grid(20) == (80, 48)
    # Walking one side 64 px at a time; the other side stays at its limit once reached.
    assert group[8] == (512, 1536) and group[9] == (576, 1472)
    ratios = [h / w for h, w in group.buckets]
    assert ratios == sorted(ratios)
    for i in range(33):
        assert group[i] == group[32 - i][::-1]
        h, w = group[i]
        assert 3072 <= (h // 16) * (w // 16) <= 4096


@pytest.mark.parametrize("base", [64, 128, 256, 512])
def test_small_base_buckets_are_multiples_of_the_vae_factor(base):
    group = ResolutionGroup(base)
    assert len(group) == 33
    assert group[16] == (base, base)
    assert all(h % 16 == 0 and w % 16 == 0 and h > 0 and w > 0 for h, w in group.buckets)
    ratios = [h / w for h, w in group.buckets]
    assert ratios == sorted(ratios)  # rounding down keeps the index order


def test_rounding_is_down_to_the_factor():
    group = ResolutionGroup(128)
    assert group.exact_buckets[17] == (136, 120)
    assert group[17] == (128, 112)
    assert ResolutionGroup(256).buckets == ResolutionGroup(256).exact_buckets


@pytest.mark.parametrize(
    "request_hw, expected",
    [
        ((1024, 1024), (16, 1024, 1024)),
        ((100, 100), (16, 1024, 1024)),  # only the ratio matters
        ((720, 1280), (12, 768, 1280)),  # 0.5625: 0.6 is nearer than 0.5238
        ((1280, 720), (20, 1280, 768)),
        ((3, 4), (14, 896, 1152)),
        ((512, 2048), (0, 512, 2048)),
        ((2048, 512), (32, 2048, 512)),
    ],
)
def test_snap_base_1024(request_hw, expected):
    assert snap(*request_hw, base_size=1024) == expected


def test_snap_small_base():
    assert snap(64, 64, base_size=64) == (16, 64, 64)
    assert snap(100, 400, base_size=64) == (0, 32, 128)
    assert snap(400, 100, base_size=64) == (32, 128, 32)


@pytest.mark.parametrize("height, width", [(0, 512), (512, -16), (2100, 500), (500, 2100)])
def test_out_of_range_requests_name_the_size(height, width):
    with pytest.raises(ValueError, match=f"{height}x{width}") as info:
        snap(height, width, base_size=1024)
    if height > 0 and width > 0:
        assert "1:4" in str(info.value) and "4:1" in str(info.value)


def test_invalid_base_sizes():
    with pytest.raises(ValueError, match="100"):
        ResolutionGroup(100)
    with pytest.raises(ValueError, match="too small"):
        ResolutionGroup(16)
    with pytest.raises(ValueError, match=r"\[0, 32\]"):
        ResolutionGroup(1024).bucket(33)
