"""HunyuanImage-3.0 VAE: release names and shapes, padding, DC-AE reshapes, encode/decode, 8-bit output."""

import re

import pytest
import torch
import torch.nn.functional as F

from epdiff.models.hunyuan_image3.vae import (
    RELEASE_VAE_CONFIG,
    AutoencoderKLConv3D,
    DownsampleDCAE,
    UpsampleDCAE,
    to_uint8,
    vae_config_tiny,
    validate_vae_config,
)

# Same level structure as the release (5 levels, 2 ResNets per encoder level, fs 16, ft 4,
# 32 latent channels), only narrower.
RELEASE_LIKE = dict(block_out_channels=[32, 32, 64, 64, 64], layers_per_block=2)


def _model(seed=0, **overrides):
    torch.manual_seed(seed)
    return AutoencoderKLConv3D(vae_config_tiny(**overrides)).eval()


@pytest.fixture(scope="module")
def release_meta():
    with torch.device("meta"):
        return AutoencoderKLConv3D(RELEASE_VAE_CONFIG)


def test_release_config_names_and_shapes(release_meta):
    shapes = {k: tuple(v.shape) for k, v in release_meta.state_dict().items()}
    expected = {
        "encoder.conv_in.weight": (128, 3, 3, 3, 3),
        "encoder.down.0.block.0.norm1.weight": (128,),
        "encoder.down.0.block.1.conv2.weight": (128, 128, 3, 3, 3),
        "encoder.down.0.downsample.conv.weight": (64, 128, 3, 3, 3),      # 256 / (2*2)
        "encoder.down.2.downsample.conv.weight": (128, 512, 3, 3, 3),     # 1024 / (2*2*2)
        "encoder.down.3.downsample.conv.weight": (128, 1024, 3, 3, 3),
        "encoder.mid.block_1.conv1.weight": (1024, 1024, 3, 3, 3),
        "encoder.mid.attn_1.norm.weight": (1024,),
        "encoder.mid.attn_1.q.weight": (1024, 1024, 1, 1, 1),
        "encoder.mid.attn_1.proj_out.bias": (1024,),
        "encoder.norm_out.weight": (1024,),
        "encoder.conv_out.weight": (64, 1024, 3, 3, 3),                    # [mean; logvar]
        "decoder.conv_in.weight": (1024, 32, 3, 3, 3),
        "decoder.mid.block_2.norm2.bias": (1024,),
        "decoder.up.0.block.2.conv1.weight": (1024, 1024, 3, 3, 3),       # layers_per_block + 1
        "decoder.up.0.upsample.conv.weight": (8192, 1024, 3, 3, 3),       # 1024 * 2*2*2
        "decoder.up.1.upsample.conv.weight": (4096, 1024, 3, 3, 3),
        "decoder.up.2.upsample.conv.weight": (1024, 512, 3, 3, 3),        # 256 * 2*2
        "decoder.up.3.upsample.conv.weight": (512, 256, 3, 3, 3),
        "decoder.up.4.block.2.conv2.weight": (128, 128, 3, 3, 3),
        "decoder.norm_out.weight": (128,),
        "decoder.conv_out.weight": (3, 128, 3, 3, 3),
    }
    for key, shape in expected.items():
        assert shapes.get(key) == shape, key
    assert all(k.startswith(("encoder.", "decoder.")) for k in shapes)
    # Resampling only at the first log2(16) = 4 levels; no quant convs; widths change only in
    # the resamplers (match_channel), so no ResNet has a 1x1 shortcut.
    assert not any(k.startswith(("encoder.down.4.downsample", "decoder.up.4.upsample")) for k in shapes)
    assert not any("quant_conv" in k or "nin_shortcut" in k for k in shapes)
    assert {k.split(".block.")[1].split(".")[0] for k in shapes if k.startswith("decoder.up.1.block.")} == {"0", "1", "2"}
    assert {k.split(".block.")[1].split(".")[0] for k in shapes if k.startswith("encoder.down.1.block.")} == {"0", "1"}


def test_names_do_not_depend_on_width(release_meta):
    tiny = _model(**RELEASE_LIKE)
    assert list(tiny.state_dict()) == list(release_meta.state_dict())
    decoder_only = AutoencoderKLConv3D(vae_config_tiny(**RELEASE_LIKE), with_encoder=False)
    assert set(decoder_only.state_dict()) == {k for k in release_meta.state_dict() if k.startswith("decoder.")}


def test_tiny_config_has_release_keys():
    tiny = vae_config_tiny()
    assert set(RELEASE_VAE_CONFIG) <= set(tiny)
    assert validate_vae_config(tiny) == tiny


def test_conv_time_padding_is_symmetric_zero():
    """Pins the temporal padding of the 3x3x3 convs: symmetric zeros, not causal/replicate. With
    one frame only the middle temporal tap of the kernel contributes; with two frames each frame
    sees the other through the outer taps."""
    model = _model()
    conv = model.encoder.down[0].block[0].conv1
    w, b = conv.weight, conv.bias
    torch.manual_seed(1)
    x = torch.randn(2, conv.in_channels, 2, 6, 5)
    with torch.no_grad():
        one = conv(x[:, :, :1])
        two = conv(x)
        expect_one = F.conv2d(x[:, :, 0], w[:, :, 1], b, padding=1)
        expect_first = F.conv2d(x[:, :, 0], w[:, :, 1], b, padding=1) + F.conv2d(x[:, :, 1], w[:, :, 2], None, padding=1)
        expect_second = F.conv2d(x[:, :, 0], w[:, :, 0], b, padding=1) + F.conv2d(x[:, :, 1], w[:, :, 1], None, padding=1)
    torch.testing.assert_close(one[:, :, 0], expect_one, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(two[:, :, 0], expect_first, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(two[:, :, 1], expect_second, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("temporal", [False, True])
def test_dcae_resamplers_pack_channels_in_release_order(temporal):
    """With the conv zeroed, each resampler is its shortcut alone; check it element by element
    against the release's channel order: packed channel ((dt * 2 + dy) * 2 + dx) * C + c."""
    r = 2 if temporal else 1
    torch.manual_seed(2)

    down = DownsampleDCAE(4, 8 * r, temporal)         # group size 4*r*4 / (8*r) = 2
    torch.nn.init.zeros_(down.conv.weight), torch.nn.init.zeros_(down.conv.bias)
    x = torch.randn(1, 4, 2 * r, 4, 6)
    with torch.no_grad():
        y = down(x)
    assert y.shape == (1, 8 * r, 2, 2, 3)
    packed = torch.empty(1, 16 * r, 2, 2, 3)
    for dt in range(r):
        for dy in range(2):
            for dx in range(2):
                for c in range(4):
                    packed[:, ((dt * 2 + dy) * 2 + dx) * 4 + c] = x[:, c, dt::r, dy::2, dx::2]
    torch.testing.assert_close(y, packed.reshape(1, 8 * r, 2, 2, 2, 3).mean(dim=2))

    up = UpsampleDCAE(8, 4, temporal)                 # repeats 4*r*4 / 8 = 2*r
    torch.nn.init.zeros_(up.conv.weight), torch.nn.init.zeros_(up.conv.bias)
    z = torch.randn(1, 8, 2, 2, 3)
    with torch.no_grad():
        y = up(z)
    assert y.shape == (1, 4, 2 * r, 4, 6)
    repeated = z.repeat_interleave(2 * r, dim=1)
    for dt in range(r):
        for dy in range(2):
            for dx in range(2):
                for c in range(4):
                    torch.testing.assert_close(y[:, c, dt::r, dy::2, dx::2], repeated[:, ((dt * 2 + dy) * 2 + dx) * 4 + c])


def test_latent_end_shortcuts_average_and_repeat_consecutive_channels():
    """Encoder output = conv_out(...) + mean over consecutive channel groups of the mid output;
    decoder input = conv_in(z) + each latent channel repeated. Zero the convs to see the shortcuts."""
    model = _model(latent_channels=8)
    for conv in (model.encoder.conv_out, model.decoder.conv_in):
        torch.nn.init.zeros_(conv.weight), torch.nn.init.zeros_(conv.bias)
    seen = {}
    model.encoder.mid.register_forward_hook(lambda m, args, out: seen.update(encoder_mid=out))
    model.decoder.mid.register_forward_pre_hook(lambda m, args: seen.update(decoder_mid=args[0]))
    torch.manual_seed(8)
    with torch.no_grad():
        moments = model.encoder(torch.randn(1, 3, 4, 32, 32))
        z = torch.randn(1, 8, 1, 2, 2)
        model.decoder(z)
    h = seen["encoder_mid"]                               # 64 channels -> 16 moments: groups of 4
    torch.testing.assert_close(moments, h.reshape(1, 16, 4, 1, 2, 2).mean(dim=2))
    torch.testing.assert_close(seen["decoder_mid"], z.repeat_interleave(8, dim=1))  # 8 -> 64


@pytest.mark.parametrize("overrides, size", [
    (RELEASE_LIKE, (32, 48)),
    (dict(latent_channels=4, ffactor_spatial=8, block_out_channels=[32, 32, 64, 64]), (32, 16)),
    (dict(latent_channels=16, ffactor_spatial=8, ffactor_temporal=2, block_out_channels=[32, 64, 64, 64]), (16, 24)),
])
def test_encode_decode_shapes(overrides, size):
    model = _model(**overrides)
    fs, c = model.ffactor_spatial, model.latent_channels
    torch.manual_seed(3)
    images = torch.rand(2, 3, *size) * 2 - 1
    with torch.no_grad():
        latents = model.encode(images, sample_posterior=False)
        decoded = model.decode_latents(latents)
        frames = model.decode(latents[:, :, None])
    assert latents.shape == (2, c, size[0] // fs, size[1] // fs)
    assert decoded.shape == images.shape
    assert frames.shape == (2, 3, model.ffactor_temporal, *size)
    assert torch.isfinite(decoded).all()


def test_encode_repeats_frames_scales_and_samples():
    model = _model(shift_factor=0.25)
    torch.manual_seed(4)
    images = torch.rand(1, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        moments = model.encoder(images[:, :, None].repeat(1, 1, model.ffactor_temporal, 1, 1))
        assert moments.shape == (1, 64, 1, 2, 2)
        mean, logvar = moments[:, :32, 0], moments[:, 32:, 0].clamp(-30, 20)
        expected_mean = (mean - 0.25) * model.scaling_factor
        torch.testing.assert_close(model.encode(images, sample_posterior=False), expected_mean)

        noise = torch.randn(mean.shape, generator=torch.Generator().manual_seed(7))
        sampled = model.encode(images, generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(sampled, (mean + torch.exp(0.5 * logvar) * noise - 0.25) * model.scaling_factor)
    assert not torch.allclose(sampled, expected_mean)


@pytest.mark.parametrize("shift", [None, 0.25])
def test_decode_latents_unscales_and_keeps_last_frame(shift):
    model = _model(shift_factor=shift)
    torch.manual_seed(5)
    latents = torch.randn(2, 32, 2, 3)
    with torch.no_grad():
        frames = model.decoder((latents / RELEASE_VAE_CONFIG["scaling_factor"] + (shift or 0.0))[:, :, None])
        images = model.decode_latents(latents)
        # Sampler latents arrive in bf16; decoding runs in the module's dtype.
        assert model.decode_latents(latents.bfloat16()).dtype == torch.float32
    assert frames.shape[2] == model.ffactor_temporal
    torch.testing.assert_close(images, frames[:, :, -1])
    # The frames really differ (non-causal convs), so keeping the *last* one matters.
    assert not torch.allclose(frames[:, :, 0], frames[:, :, -1])


def test_to_uint8_matches_diffusers_rounding():
    x = torch.tensor([-2.0, -1.0, 0.0, 1.0, 3.0, 1 / 255, -1 / 255]).view(1, 1, 1, 7).expand(1, 3, 1, 7)
    out = to_uint8(x)
    assert out.dtype == torch.uint8 and out.shape == (1, 1, 7, 3)
    # 0 -> 127.5 rounds half to even (128), like numpy; out-of-range values clamp.
    assert out[0, 0, :, 0].tolist() == [0, 0, 128, 255, 255, 128, 127]

    np = pytest.importorskip("numpy")  # not a project dependency; only the cross-check needs it
    torch.manual_seed(6)
    images = torch.randn(2, 3, 5, 7)
    unit = np.clip(images.numpy() / 2 + 0.5, 0, 1).transpose(0, 2, 3, 1)
    reference = (unit * 255).round().astype("uint8")  # diffusers numpy_to_pil
    assert np.array_equal(to_uint8(images).numpy(), reference)


@pytest.mark.parametrize("overrides, message", [
    (dict(block_out_channels=[16, 32, 32, 64, 64]), "multiple of 32"),
    (dict(block_out_channels=[32, 32, 64, 64]), "needs at least 5"),
    (dict(latent_channels=48), "2 * latent_channels"),
    (dict(ffactor_spatial=12), "ffactor_spatial must be a power of two"),
    (dict(ffactor_temporal=3), "ffactor_temporal must be a power of two"),
    (dict(ffactor_spatial=2, ffactor_temporal=4, block_out_channels=[64, 64]), "must not exceed"),
    (dict(block_out_channels=[32, 96, 64, 64, 64]), "encoder level 0"),
    (dict(block_out_channels=[32, 512, 512, 512, 512]), "encoder level 0"),
    (dict(block_out_channels=[32, 32, 32, 32, 32, 512]), "decoder level 0"),
    (dict(layers_per_block=0), "layers_per_block"),
    (dict(latent_channels=True), "latent_channels"),
    (dict(scaling_factor=-1.0), "scaling_factor"),
    (dict(upsample_match_channel="yes"), "upsample_match_channel"),
])
def test_invalid_config_raises(overrides, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        vae_config_tiny(**overrides)


def test_missing_key_and_bad_input_raise():
    config = dict(RELEASE_VAE_CONFIG)
    del config["ffactor_temporal"]
    with pytest.raises(ValueError, match="missing ffactor_temporal"):
        AutoencoderKLConv3D(config)
    model = _model()
    with pytest.raises(ValueError, match="not a multiple of ffactor_spatial"):
        model.encode(torch.zeros(1, 3, 24, 32))
    with pytest.raises(ValueError, match="latents"):
        model.decode_latents(torch.zeros(1, 16, 2, 2))
