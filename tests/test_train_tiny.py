"""The training path end to end at a few steps: it writes a release-format checkpoint that loads
on any layout, and `epdiff score` draws and checks the held-out prompts with it. (Whether the
shipped model draws the right pictures is a property of the trained weights, not tested here.)"""

import pytest

from epdiff.cli import main
from epdiff.models.hunyuan_image3.config import HunyuanImage3Config
from epdiff.train.train_tiny import train_tiny


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("trained"))
    return train_tiny(out, vae_steps=1, transformer_steps=2, vae_batch=2, batch=2, device="cpu", log=lambda _: None,
                      pool_size=8)


def test_checkpoint_is_in_the_release_format(trained):
    config = HunyuanImage3Config.from_pretrained(trained)
    assert config.num_experts == 8 and config.latent_channels == 16
    assert config.vae["scaling_factor"] > 0  # measured after VAE training, as the release stores it


def test_score_runs_on_two_ranks_with_ep(trained, capsys):
    assert main(["score", "--model", trained, "--num-prompts", "2", "--num-inference-steps", "2",
                 "-tp", "2", "--enable-expert-parallel"]) == 0
    out = capsys.readouterr().out
    assert "2 images:" in out and "of shape/colour/position attributes right" in out
    assert "routing, stage 0:" in out
