import json

import pytest
import torch
from tokenizers import Tokenizer, models

from epdiff.config import ConfigError
from epdiff.models.hunyuan_image3.tiny_tokenizer import TINY_ROLE_TOKENS, build_tiny_tokenizer
from epdiff.models.hunyuan_image3.tokenizer import (
    NAMED_SPECIAL_TOKENS,
    NUM_RATIO_TOKENS,
    HunyuanTokenizer,
    SequenceTemplate,
    build_2d_positions,
)

BASE = 64


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny_model")
    build_tiny_tokenizer(folder, image_base_size=BASE)
    return folder


@pytest.fixture(scope="module")
def tok(model_dir):
    return HunyuanTokenizer.from_pretrained(model_dir)


def test_all_special_tokens_present_with_consecutive_ratio_ids(model_dir):
    raw = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    for token in NAMED_SPECIAL_TOKENS + (f"<img_size_{BASE}>",):
        assert raw.token_to_id(token) is not None, token
    ratio_ids = [raw.token_to_id(f"<img_ratio_{k}>") for k in range(NUM_RATIO_TOKENS)]
    assert ratio_ids == list(range(ratio_ids[0], ratio_ids[0] + 33))
    # Registered as special added tokens, so they survive as single ids inside text.
    added = {t["content"]: t for t in json.loads((model_dir / "tokenizer.json").read_text())["added_tokens"]}
    assert all(added[f"<img_ratio_{k}>"]["special"] for k in range(33))


def test_named_ids_and_ratio_lookup(tok):
    assert len({tok.bos, tok.eos, tok.pad, tok.boi, tok.eoi, tok.img, tok.cfg, tok.timestep}) == 8
    assert tok.img_ratio(5) - tok.img_ratio(0) == 5
    assert tok.ratio_index(tok.img_ratio(32)) == 32
    assert tok.encode("<img_ratio_7>") == [tok.img_ratio(7)]
    with pytest.raises(ValueError, match="33"):
        tok.img_ratio(33)
    with pytest.raises(ConfigError, match=r"tokenizer\.json: no token '<img_size_1024>'"):
        tok.img_size(1024)


def test_encode_common_prompts_without_unk(tok):
    unk = tok.token_id("<unk>")
    for prompt in [
        "a small red circle on the left",
        "A large blue square in the top right corner, on a white background.",
        "Two green triangles below a yellow star",
    ]:
        ids = tok.encode(prompt)
        assert ids and unk not in ids, prompt
    assert tok.encode("Red CIRCLE") == tok.encode("red circle")
    assert tok.encode("left,") == tok.encode("left ,")  # punctuation is its own token
    assert tok.encode("zzyzx") == [unk]


def test_tiny_tokenizer_to_json_path_and_custom_words(tmp_path):
    path = tmp_path / "custom.json"
    build_tiny_tokenizer(path, image_base_size=128, vocab_words=["Dog", "cat", "dog"])
    tok = HunyuanTokenizer.from_file(path)
    assert tok.img_size(128) >= 0
    assert tok.decode(tok.encode("dog cat")) == "dog cat"
    with pytest.raises(ValueError, match="whitespace"):
        build_tiny_tokenizer(tmp_path, 128, vocab_words=["two words"])


def test_missing_tokenizer_names_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        HunyuanTokenizer.from_pretrained(tmp_path)


def test_rejects_non_consecutive_ratio_ids(tmp_path):
    tokens = ["<unk>", *NAMED_SPECIAL_TOKENS] + [f"<img_ratio_{k}>" for k in range(33)]
    tokens[-1], tokens[-2] = tokens[-2], tokens[-1]
    raw = Tokenizer(models.WordLevel({t: i for i, t in enumerate(tokens)}, unk_token="<unk>"))
    with pytest.raises(ValueError, match="consecutive"):
        HunyuanTokenizer(raw, TINY_ROLE_TOKENS)


def test_cond_sequence_layout(tok):
    prompt = tok.encode("a red circle")
    seq = tok.build_sequence(prompt, ratio_index=16, grid_h=2, grid_w=3, image_base_size=BASE)
    expected = (
        [tok.bos, *prompt, tok.boi, tok.img_size(BASE), tok.img_ratio(16), tok.timestep]
        + [tok.img] * 6
        + [tok.eoi]
    )
    assert seq.input_ids.dtype == torch.long
    assert seq.input_ids.tolist() == expected
    assert tok.eos not in expected
    assert seq.timestep_index == 1 + len(prompt) + 3
    assert seq.image_start == seq.timestep_index + 1
    assert (seq.image_len, seq.grid) == (6, (2, 3))
    assert (seq.input_ids[seq.image_slice] == tok.img).all()
    assert seq.input_ids[seq.prompt_slice].tolist() == prompt
    assert len(seq) == tok.sequence_length(len(prompt), 2, 3)


def test_uncond_replaces_exactly_the_prompt_with_cfg(tok):
    prompt = tok.encode("a small red circle on the left")
    cond = tok.build_sequence(prompt, 3, 4, 4, BASE)
    uncond = tok.build_uncond_sequence(prompt, 3, 4, 4, BASE)
    assert len(cond) == len(uncond)
    differs = cond.input_ids != uncond.input_ids
    assert differs.nonzero().flatten().tolist() == list(range(1, 1 + len(prompt)))
    assert (uncond.input_ids[uncond.prompt_slice] == tok.cfg).all()
    assert torch.equal(cond.positions, uncond.positions)
    assert (cond.timestep_index, cond.image_start) == (uncond.timestep_index, uncond.image_start)


def test_positions_of_4x4_image_after_prefix(tok):
    # <bos> + 3 prompt tokens + <boi> <img_size> <img_ratio> <timestep> -> the image starts at 8.
    seq = tok.build_sequence([tok.token_id("red")] * 3, 16, 4, 4, BASE)
    assert seq.image_start == 8
    # Centred in [8, 24): offset (16 - 4) / 2 = 6 on both axes.
    expected = [[n, n] for n in range(8)]
    expected += [[14 + i, 14 + j] for i in range(4) for j in range(4)]
    expected += [[24, 24]]  # <eoi> resumes at L + h*w
    assert seq.positions.dtype == torch.long
    assert seq.positions.tolist() == expected


def test_positions_truncate_half_integers_like_reference():
    # h=3, w=2 at L=5: y starts at 5 + (6 - 3) / 2 = 6.5 -> 6, 7, 8; x at 5 + (6 - 2) / 2 = 7.
    pos = build_2d_positions(seq_len=12, image_start=5, grid_h=3, grid_w=2)
    assert pos[5:11].tolist() == [[6, 7], [6, 8], [7, 7], [7, 8], [8, 7], [8, 8]]
    assert pos[11].tolist() == [11, 11]


def test_positions_of_a_1024_image():
    start = 10
    pos = build_2d_positions(start + 4096 + 1, start, 64, 64)
    assert pos[start].tolist() == [start + 2016, start + 2016]
    assert pos[start + 4095].tolist() == [start + 2079, start + 2079]
    assert pos[-1].tolist() == [start + 4096, start + 4096]


def test_empty_prompt_is_rejected(tok):
    with pytest.raises(ValueError, match="empty"):
        tok.build_sequence([], 16, 4, 4, BASE)
    with pytest.raises(ValueError, match="empty"):
        tok.build_uncond_sequence(tok.encode("   "), 16, 4, 4, BASE)


def test_max_length_error_names_both_lengths(tok):
    prompt = tok.encode("a red circle")  # 3 tokens -> 1 + 3 + 4 + 16 + 1 = 25
    assert len(tok.build_sequence(prompt, 16, 4, 4, BASE, max_length=25)) == 25
    with pytest.raises(ValueError, match=r"sequence length 25 .* max_length 24"):
        tok.build_sequence(prompt, 16, 4, 4, BASE, max_length=24)
    with pytest.raises(ValueError, match=r"max_length 24"):
        tok.build_uncond_sequence(prompt, 16, 4, 4, BASE, max_length=24)


def test_instruct_template_of_a_distilled_mean_flow_model(tok):
    """The reference's pieces, each tokenized alone: [system "\\n\\n"] "User: " prompt "\\n\\n" "Assistant: "
    <answer> <boi> <img_size> <img_ratio> <timestep> <guidance> <timestep_r> <img>* <eoi> </answer> "\\n\\n"."""
    prompt = tok.encode("a red circle")
    template = SequenceTemplate("instruct", "draw shapes", cfg_distilled=True, use_meanflow=True)
    seq = tok.build_sequence(prompt, 16, 2, 3, BASE, template=template)
    sep, enc = tok.encode("\n\n"), tok.encode
    head = [tok.bos, *enc("draw shapes"), *sep, *enc("User: ")]
    expected = (head + prompt + sep + enc("Assistant: ") + [tok.token_id("<answer>"), tok.boi, tok.img_size(BASE),
                tok.img_ratio(16), tok.timestep, tok.token_id("<guidance>"), tok.token_id("<timestep_r>")]
                + [tok.img] * 6 + [tok.eoi, tok.token_id("</answer>")] + sep)
    assert seq.input_ids.tolist() == expected
    assert seq.input_ids[seq.prompt_slice].tolist() == prompt and seq.prompt_start == len(head)
    assert seq.image_start == seq.timestep_index + 3 and len(seq) == tok.sequence_length(len(prompt), 2, 3, template)
    uncond = tok.build_uncond_sequence(prompt, 16, 2, 3, BASE, template=template)
    differs = (seq.input_ids != uncond.input_ids).nonzero().flatten().tolist()
    assert differs == list(range(seq.prompt_start, seq.prompt_start + len(prompt)))  # the system prompt stays
    no_system = tok.build_sequence(prompt, 16, 2, 3, BASE, template=SequenceTemplate("instruct"))
    assert no_system.input_ids.tolist()[:1 + len(enc("User: "))] == [tok.bos, *enc("User: ")]
