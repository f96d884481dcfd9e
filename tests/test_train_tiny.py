"""The training path end to end at a few steps: it writes a release-format checkpoint that loads
on any layout, and `epdiff score` draws and checks the held-out prompts with it. (Whether the
shipped model draws the right pictures is a property of the trained weights, not tested here.)"""

import json
import os
import random

import pytest
from safetensors import safe_open

from epdiff.cli import main
from epdiff.models.hunyuan_image3.config import HunyuanImage3Config
from epdiff.train import shapes
from epdiff.models.hunyuan_image3.train_tiny import ImagePool, train_tiny

QUICK = dict(vae_steps=1, transformer_steps=2, vae_batch=2, batch=2, device="cpu", pool_size=8)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    return train_tiny(str(tmp_path_factory.mktemp("trained")), log=lambda _: None, **QUICK)


def vae_tensors(model_dir):
    with open(os.path.join(model_dir, "model.safetensors.index.json")) as f:
        files = {name: file for name, file in json.load(f)["weight_map"].items() if name.startswith("vae.")}
    out = {}
    for name, file in files.items():
        with safe_open(os.path.join(model_dir, file), "pt") as f:
            out[name] = f.get_tensor(name)
    return out


def test_checkpoint_is_in_the_release_format(trained):
    config = HunyuanImage3Config.from_pretrained(trained)
    assert config.num_experts == 8 and config.latent_channels == 16
    assert config.vae["scaling_factor"] > 0  # measured after VAE training, as the release stores it
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert os.path.isfile(os.path.join(trained, name)), name


def test_vae_from_keeps_the_vae_and_trains_a_new_transformer_size(trained, tmp_path):
    logs = []
    out = train_tiny(str(tmp_path / "wider"), vae_from=trained, log=logs.append,
                     model_size=dict(hidden_size=64, num_attention_heads=4, moe_intermediate_size=32), **QUICK)
    assert HunyuanImage3Config.from_pretrained(out).hidden_size == 64
    kept, original = vae_tensors(out), vae_tensors(trained)
    assert kept.keys() == original.keys() and all(kept[k].equal(original[k]) for k in kept)
    assert "0 VAE steps" in logs[-1]
    with pytest.raises(ValueError, match="not both"):
        train_tiny(str(tmp_path / "both"), init_from=trained, vae_from=trained, log=logs.append, **QUICK)


def test_deadline_stops_the_transformer(trained, tmp_path):
    # A deadline already past: the schedule is at its end after the first step.
    logs = []
    train_tiny(str(tmp_path / "late"), vae_from=trained, max_minutes=0.01, log=logs.append,
               **{**QUICK, "transformer_steps": 50})
    assert " 1 transformer steps" in logs[-1], logs[-1]


def test_one_object_share_sets_the_pool_mix():
    train, _ = shapes.split_scenes()
    ones = [sum(len(s.objects) == 1 for s in ImagePool(train, 400, random.Random(0), "cpu", share).scenes)
            for share in (0.0, 0.3, 1.0)]
    assert ones[0] == 0 and 80 <= ones[1] <= 160 and ones[2] == 400
    with pytest.raises(ValueError, match="one_object_share=1.5"):
        ImagePool(train, 4, random.Random(0), "cpu", 1.5)


def test_score_runs_on_two_ranks_with_ep(trained, capsys, tmp_path):
    report = tmp_path / "score.json"
    assert main(["score", "--model", trained, "--num-prompts", "2", "--num-inference-steps", "2",
                 "--seed", "0", "5", "--json", str(report), "-tp", "2", "--enable-expert-parallel"]) == 0
    out = capsys.readouterr().out
    assert "2 steps, guidance 4, seeds 0 5: 4 images:" in out and "of attributes right" in out
    assert "  seed 0: 2 images:" in out and "  seed 5: 2 images:" in out
    assert "extra objects" in out and "routing, stage 0:" in out
    (summary,) = json.loads(report.read_text())
    assert summary["images"] == 4 and summary["total"] == 4 * 8 and len(summary["scores"]) == 4


def test_the_pool_captions_some_one_object_images_partially():
    import random

    train, _ = shapes.split_scenes()
    pool = ImagePool(train, 400, random.Random(0), "cpu", one_object_share=0.5, partial_caption_share=1.0)
    for scene, text in zip(pool.scenes, pool.captions):
        parsed = shapes.parse_caption(text)
        if len(scene.objects) == 2:
            assert text == shapes.caption(scene)
        else:  # every one-object caption leaves out its size, its position or both
            assert parsed.objects[0].size is None or parsed.objects[0].position is None
            assert (parsed.objects[0].shape, parsed.objects[0].colour) == (scene.objects[0].shape,
                                                                           scene.objects[0].colour)
    plain = ImagePool(train, 50, random.Random(0), "cpu", one_object_share=0.5)
    assert plain.captions == [shapes.caption(s) for s in plain.scenes]
