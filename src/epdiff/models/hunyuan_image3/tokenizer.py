"""HunyuanImage-3.0 tokenizer access and the text-to-image token sequence.

The release ships a ``tokenizer.json`` (``tokenizers`` format) and a ``tokenizer_config.json``.
We only need them to encode the prompt and to look up the special tokens the image template
uses, so a plain ``tokenizers.Tokenizer`` is enough. As in the reference, the begin/end/padding
tokens are whatever the tokenizer config names (``bos_token``, ...), while the image tokens
(``<boi>``, ``<img>``, ``<img_ratio_k>``, ...) have fixed names. (tiny_tokenizer.py writes the small models' tokenizers.)

Sequence for base text-to-image (template "pretrain", no system prompt, no ``<eos>``)::

    <bos> prompt <boi> <img_size_B> <img_ratio_k> <timestep> <img> x (h*w) <eoi>

Template "instruct" (the Instruct models) wraps it in the chat roles, each piece tokenized on its
own as the reference does::

    <bos> [system "\n\n"] "User: " prompt "\n\n" "Assistant: " <answer> <boi> ... <eoi> </answer> "\n\n"

A cfg-distilled model has a <guidance> token after <timestep>, a mean-flow one then <timestep_r>.
The unconditional (CFG) branch is the same sequence with each prompt token replaced by ``<cfg>``
(the system prompt and the roles stay), so both branches have equal length and identical positions.

What the Instruct models write before they draw (their think and recaption passes) sits between
"Assistant: " and <answer>, as the reference's sections: ``<think> text </think> <recaption> text
</recaption>``, each piece tokenized alone, the texts blanked to <cfg> in the unconditional branch.
The text pass itself reads the same user part and ends ``"Assistant: <think>"`` (or
``<recaption>``), the token the model continues from.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Sequence

import torch
from tokenizers import Tokenizer

from ...config import ConfigError

NUM_RATIO_TOKENS = 33  # <img_ratio_0> ... <img_ratio_32>: one per aspect bucket
UNK_TOKEN = "<unk>"

# Every special token the reference looks up by name (besides <img_size_B> and <img_ratio_k>).
NAMED_SPECIAL_TOKENS = (
    "<pad>", "<bos>", "<eos>", "<boi>", "<eoi>", "<img>", "<cfg>", "<timestep>", "<guidance>",
    "<joint_img_sep>", "<think>", "</think>", "<recaption>", "</recaption>", "<answer>", "</answer>",
    "<timestep_r>",
)

# Tokens between the template's text and the first <img>: <boi> <img_size_B> <img_ratio_k>, then
# the step tokens.
_IMAGE_HEADER = 3
# The instruct template's role markers and separator (the reference's conversation "hunyuan-image-3").
INSTRUCT_USER, INSTRUCT_ASSISTANT, INSTRUCT_SEPARATOR = "User: ", "Assistant: ", "\n\n"
SEQUENCE_TEMPLATES = ("pretrain", "instruct")
# The written sections' markers (the reference's decorator sections).
THINK, END_THINK, RECAPTION, END_RECAPTION = "<think>", "</think>", "<recaption>", "</recaption>"
# A text pass's first written token, by the task's first part (the reference's bot_response_prefix).
TEXT_PASS_OPENERS = {"think": THINK, "recaption": RECAPTION}


def cot_sections(cot_text: str, drop_think: bool = False, answer: tuple[str, str] = ("", "")
                 ) -> tuple[tuple[str, bool], ...]:
    """The written text as the reference's template sections, (text, whether the unconditional
    branch blanks it): with a closed <think> or <recaption> block, get_cot_sections' split (each
    block's markers kept, its text blanked, the text around it split the same way; only what lies
    between the first and the second end marker counts as after it; drop_think leaves closed think
    blocks out); without one, the whole text as one section inside the answer markers (the
    instruct template's, `answer`), as the reference writes any other assistant text."""
    if not cot_text:
        return ()
    if not any(opener in cot_text and closer in cot_text for opener, closer in _BLOCKS):
        return ((answer[0] + cot_text + answer[1], True),)
    return _cot_blocks(cot_text, drop_think)


_BLOCKS = ((THINK, END_THINK), (RECAPTION, END_RECAPTION))


def _cot_blocks(text: str, drop_think: bool) -> tuple[tuple[str, bool], ...]:
    if not text:
        return ()
    for opener, closer in _BLOCKS:
        if opener in text and closer in text:
            before, after = text.split(opener)[0], text.split(closer)[1]
            inner = text.split(opener)[1].split(closer)[0]
            block = () if drop_think and opener == THINK else ((opener, False), (inner, True), (closer, False))
            return _cot_blocks(before, drop_think) + block + _cot_blocks(after, drop_think)
    return ((text, True),)


@dataclass(frozen=True)
class SequenceTemplate:
    """How a prompt becomes the sequence before and after its image: generation_config.json's
    sequence_template, the resolved system prompt (stripped; "" for none) and the model's step
    tokens (config.json cfg_distilled, use_meanflow)."""

    kind: str = "pretrain"
    system_prompt: str = ""
    cfg_distilled: bool = False
    use_meanflow: bool = False
    # What the model wrote before the image (its text pass): (text, blanked in the uncond branch)
    # sections between "Assistant: " and <answer> (cot_sections).
    cot: tuple[tuple[str, bool], ...] = ()

    @property
    def step_tokens(self) -> tuple[str, ...]:
        return ("<timestep>",) + ("<guidance>",) * self.cfg_distilled + ("<timestep_r>",) * self.use_meanflow

# transformers' files naming the tokens of the roles below, read in this order (an entry in the
# later file wins).
TOKENIZER_CONFIG_FILES = ("tokenizer_config.json", "special_tokens_map.json")
ROLES = ("bos_token", "eos_token", "pad_token")
REQUIRED_ROLES = ("bos_token",)  # the sequence starts with it; eos and pad are not in it


def img_size_token(image_base_size: int) -> str:
    return f"<img_size_{image_base_size}>"


def img_ratio_token(ratio_index: int) -> str:
    return f"<img_ratio_{ratio_index}>"


def special_tokens(image_base_size: int) -> list[str]:
    """All special tokens of a model with this base size, <img_ratio_k> last and in order."""
    return [
        UNK_TOKEN,
        *NAMED_SPECIAL_TOKENS,
        img_size_token(image_base_size),
        *(img_ratio_token(k) for k in range(NUM_RATIO_TOKENS)),
    ]


def read_role_tokens(folder) -> dict[str, str]:
    """bos/eos/pad token strings from the folder's tokenizer_config.json and
    special_tokens_map.json (an entry is a string or an AddedToken dict with "content")."""
    folder = os.fspath(folder)
    found = {}
    for name in TOKENIZER_CONFIG_FILES:
        path = os.path.join(folder, name)
        if not os.path.isfile(path):
            continue
        try:
            with open(path) as f:
                config = json.load(f)
        except (OSError, json.JSONDecodeError) as e:
            raise ConfigError(f"cannot read {path}: {e}") from None
        for role in ROLES:
            entry = config.get(role) if isinstance(config, dict) else None
            if isinstance(entry, dict):
                entry = entry.get("content")
            if entry is not None and not isinstance(entry, str):
                raise ConfigError(f"{path}: {role} {config[role]!r} is neither a token nor an AddedToken")
            if entry:
                found[role] = entry
    for role in REQUIRED_ROLES:
        if role not in found:
            raise ConfigError(f"{folder}: no {role} named in {' or '.join(TOKENIZER_CONFIG_FILES)} "
                              "(the sequence starts with it)")
    return found


# ---------------------------------------------------------------------------------------------
# Positions and sequences
# ---------------------------------------------------------------------------------------------


def build_2d_positions(seq_len: int, image_start: int, grid_h: int, grid_w: int,
                       spans: Sequence[tuple[int, int, int]] = ()) -> torch.Tensor:
    """(y, x) RoPE position pairs, LongTensor [seq_len, 2], for one image of grid_h x grid_w tokens.

    Text token n gets (n, n). The image grid is centred in its span [L, L + h*w): row i / column j
    get y = L + (w*h - h)/2 + i and x = L + (w*h - w)/2 + j, computed like the reference (a float32
    linspace truncated with .long(), so half-integers round down). Tokens after the image
    continue at L + h*w. spans: more 2-D runs (start, h, w) laid out alike (an edit's input images:
    their VAE runs and the real grid of their ViT runs; a ViT run's padding slots keep 1-D
    positions, their own index, as in the reference).
    """
    if spans:
        positions = torch.arange(seq_len)[:, None].repeat(1, 2)
        place_2d_runs(positions, [*spans, (image_start, grid_h, grid_w)])
        return positions
    image_end = image_start + grid_h * grid_w
    if image_start < 0 or image_end > seq_len:
        raise ValueError(
            f"image of {grid_h}x{grid_w} tokens at {image_start} does not fit in {seq_len} tokens"
        )
    start_y = image_start + (grid_w * grid_h - grid_h) / 2
    start_x = image_start + (grid_w * grid_h - grid_w) / 2
    # linspace(a, a + n, n + 1)[:n] rather than arange so that the float32 rounding matches.
    rows = torch.linspace(start_y, start_y + grid_h, grid_h + 1, dtype=torch.float32)[:grid_h]
    cols = torch.linspace(start_x, start_x + grid_w, grid_w + 1, dtype=torch.float32)[:grid_w]
    grid_y, grid_x = torch.meshgrid(rows, cols, indexing="ij")

    before = torch.arange(0, image_start)
    after = torch.arange(image_end, seq_len)
    # The reference concatenates text and grid in float32 and truncates once; same here.
    y = torch.cat([before, grid_y.reshape(-1), after]).long()
    x = torch.cat([before, grid_x.reshape(-1), after]).long()
    return torch.stack([y, x], dim=1)


def place_2d_runs(positions: torch.Tensor, runs: Sequence[tuple[int, int, int]]) -> None:
    """Writes each run's (start, h, w) 2-D grid positions into 1-D text positions [L, 2], in place."""
    for start, h, w in runs:
        positions[start:start + h * w] = build_2d_positions(start + h * w, start, h, w)[start:]


@dataclass(frozen=True)
class CondImageLayout:
    """An edit's input image in the sequence (the reference's joint image section):
    <boi> <img_size_B> <img_ratio_k> <timestep> <img> x vae h·w <joint_img_sep> <img> x vit_slots <eoi>,
    the ViT run holding every slot of the vision processor (its real vit_grid first, then padding)."""

    ratio_index: int
    vae_grid: tuple[int, int]
    vit_grid: tuple[int, int]
    vit_slots: int

    def __len__(self) -> int:
        return _IMAGE_HEADER + 1 + self.vae_grid[0] * self.vae_grid[1] + 1 + self.vit_slots + 1


@dataclass(frozen=True)
class CondImageSpans:
    """Where an input image's parts sit in a built sequence."""

    timestep: int  # its <timestep> (embedded at t = 0)
    vae: slice  # the VAE run
    vit: slice  # the ViT run (all slots)


def bidirectional_blocks(cond: Sequence[CondImageSpans]) -> list[slice]:
    """The prefix's runs that attend both ways (each input image's VAE run and ViT run, apart)."""
    return [run for image in cond for run in (image.vae, image.vit)]


@dataclass
class ImageSequence:
    """One branch (cond or uncond) of a text-to-image sequence."""

    input_ids: torch.Tensor  # LongTensor [L]
    positions: torch.Tensor  # LongTensor [L, 2], (y, x) for 2D RoPE
    timestep_index: int  # where timestep_emb(t) is written
    image_start: int  # first <img> token
    image_len: int  # grid h * w
    grid: tuple[int, int]  # (h, w) in tokens
    prompt_len: int  # prompt tokens at [prompt_start, prompt_start + prompt_len)
    prompt_start: int = 1
    cond: tuple[CondImageSpans, ...] = ()  # an edit's input images, in order

    @property
    def bidirectional_blocks(self) -> list[slice]:
        return bidirectional_blocks(self.cond)

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def image_slice(self) -> slice:
        return slice(self.image_start, self.image_start + self.image_len)

    @property
    def prompt_slice(self) -> slice:
        return slice(self.prompt_start, self.prompt_start + self.prompt_len)


@dataclass
class TextSequence:
    """A text pass's input (the model continues after its last token)."""

    input_ids: torch.Tensor  # LongTensor [L]
    positions: torch.Tensor  # LongTensor [L, 2]
    cond: tuple[CondImageSpans, ...] = ()

    @property
    def bidirectional_blocks(self) -> list[slice]:
        return bidirectional_blocks(self.cond)

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])


class HunyuanTokenizer:
    """Prompt encoding and special-token ids of a HunyuanImage-3.0 ``tokenizer.json``."""

    def __init__(self, tokenizer: Tokenizer, role_tokens: dict[str, str], source: str = "the tokenizer"):
        """role_tokens: {"bos_token": ..., "eos_token": ..., "pad_token": ...} as the tokenizer's
        config names them (see read_role_tokens); eos and pad may be absent (then None)."""
        self.tokenizer, self.source = tokenizer, source
        for role in REQUIRED_ROLES:
            if not role_tokens.get(role):
                raise ConfigError(f"{source}: no {role} given")
        self.role_tokens = dict(role_tokens)
        self.bos = self.token_id(role_tokens["bos_token"])
        self.eos = self.token_id(role_tokens["eos_token"]) if role_tokens.get("eos_token") else None
        self.pad = self.token_id(role_tokens["pad_token"]) if role_tokens.get("pad_token") else None
        self.boi = self.token_id("<boi>")
        self.eoi = self.token_id("<eoi>")
        self.img = self.token_id("<img>")
        self.cfg = self.token_id("<cfg>")
        self.timestep = self.token_id("<timestep>")
        # The ratio index is "id - id of <img_ratio_0>" in the reference, so the ids must be
        # consecutive; check once here rather than trusting an arbitrary tokenizer.json.
        first = self.token_id(img_ratio_token(0))
        ratio_ids = [self.token_id(img_ratio_token(k)) for k in range(NUM_RATIO_TOKENS)]
        if ratio_ids != list(range(first, first + NUM_RATIO_TOKENS)):
            raise ConfigError(f"{source}: <img_ratio_0..{NUM_RATIO_TOKENS - 1}> ids are not consecutive: {ratio_ids}")
        self.img_ratio_ids = ratio_ids

    @classmethod
    def from_file(cls, path) -> "HunyuanTokenizer":
        """A tokenizer.json; the roles come from the tokenizer config beside it."""
        path = os.fspath(path)
        try:
            tokenizer = Tokenizer.from_file(path)
        except Exception as e:  # tokenizers raises plain Exceptions for unreadable files
            raise ConfigError(f"cannot read {path}: {e}") from None
        return cls(tokenizer, read_role_tokens(os.path.dirname(path) or "."), source=path)

    @classmethod
    def from_pretrained(cls, model_dir) -> "HunyuanTokenizer":
        path = os.path.join(os.fspath(model_dir), "tokenizer.json")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no tokenizer.json in model folder {os.fspath(model_dir)!r}")
        return cls.from_file(path)

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    def token_id(self, token: str) -> int:
        token_id = self.tokenizer.token_to_id(token)
        if token_id is None:
            raise ConfigError(f"{self.source}: no token {token!r} (the text-to-image sequence needs it)")
        return token_id

    def img_size(self, image_base_size: int) -> int:
        """Id of <img_size_{image_base_size}>."""
        return self.token_id(img_size_token(image_base_size))

    def img_ratio(self, ratio_index: int) -> int:
        """Id of <img_ratio_{ratio_index}> (beyond the 33, the Instruct tokenizers' extra buckets')."""
        if ratio_index >= NUM_RATIO_TOKENS:
            return self.token_id(img_ratio_token(ratio_index))
        if not 0 <= ratio_index < NUM_RATIO_TOKENS:
            raise ValueError(f"ratio index must be in [0, {NUM_RATIO_TOKENS - 1}], got {ratio_index}")
        return self.img_ratio_ids[ratio_index]

    def ratio_ids(self, buckets: int) -> list[int]:
        """The ids of <img_ratio_0> .. <img_ratio_{buckets - 1}>, bucket by bucket (the Instruct
        tokenizers' extra buckets after the 33)."""
        return [self.img_ratio(k) for k in range(buckets)]

    def ratio_index(self, token_id: int) -> int:
        """Inverse of img_ratio: the bucket index a <img_ratio_k> id stands for."""
        index = token_id - self.img_ratio_ids[0]
        if not 0 <= index < NUM_RATIO_TOKENS:
            raise ValueError(f"token id {token_id} is not an <img_ratio_k> token")
        return index

    def encode(self, text: str) -> list[int]:
        """Prompt ids without any special tokens added (like the reference's add_special_tokens=False)."""
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=False)

    def template_pieces(self, template: SequenceTemplate, uncond: bool = False
                        ) -> tuple[list[int], list[int], list[int]]:
        """The template's token ids before the prompt (after <bos>), between the prompt and <boi>
        (the written sections included; uncond: their texts blanked to <cfg>), and after <eoi>."""
        before, user_end = self._user_pieces(template)
        written = []
        for text, blank in template.cot:
            ids = self.encode(text)
            written += [self.cfg] * len(ids) if blank and uncond else ids
        if template.kind != "instruct":
            return before, user_end + written, []
        between = user_end + self.encode(INSTRUCT_ASSISTANT) + written + [self.token_id("<answer>")]
        after = [self.token_id("</answer>")] + self.encode(INSTRUCT_SEPARATOR)
        return before, between, after

    def _user_pieces(self, template: SequenceTemplate) -> tuple[list[int], list[int]]:
        """The ids before the user's prompt (after <bos>: the system prompt, the user role) and
        right after it."""
        if template.kind not in SEQUENCE_TEMPLATES:
            raise ValueError(f"unknown sequence template {template.kind!r}; choose one of {SEQUENCE_TEMPLATES}")
        instruct = template.kind == "instruct"
        before = self.encode(template.system_prompt) if template.system_prompt else []
        if not instruct:
            return before, []
        if template.system_prompt:
            before += self.encode(INSTRUCT_SEPARATOR)
        return before + self.encode(INSTRUCT_USER), self.encode(INSTRUCT_SEPARATOR)

    def sequence_length(self, prompt_len: int, grid_h: int, grid_w: int,
                        template: SequenceTemplate = SequenceTemplate(),
                        cond: Sequence[CondImageLayout] = ()) -> int:
        """<bos>, the template's pieces, input images, the prompt, the image header and step tokens,
        h*w <img>, <eoi>."""
        before, between, after = self.template_pieces(template)
        return (1 + len(before) + sum(len(c) for c in cond) + prompt_len + len(between) + _IMAGE_HEADER
                + len(template.step_tokens) + grid_h * grid_w + 1 + len(after))

    def build_sequence(
        self,
        prompt_ids: Sequence[int] | torch.Tensor | str,
        ratio_index: int,
        grid_h: int,
        grid_w: int,
        image_base_size: int,
        max_length: int | None = None,
        template: SequenceTemplate = SequenceTemplate(),
        cond: Sequence[CondImageLayout] = (),
    ) -> ImageSequence:
        """The conditional branch (pretrain: <bos> prompt <boi> <img_size_B> <img_ratio_k> <timestep> <img>*hw <eoi>).
        cond: an edit's input images, placed after the user role, before the prompt."""
        prompt = self._checked_prompt(prompt_ids)
        return self._build(prompt, ratio_index, grid_h, grid_w, image_base_size, max_length, template, cond)

    def build_uncond_sequence(
        self,
        prompt_ids: Sequence[int] | torch.Tensor | str,
        ratio_index: int,
        grid_h: int,
        grid_w: int,
        image_base_size: int,
        max_length: int | None = None,
        template: SequenceTemplate = SequenceTemplate(),
        cond: Sequence[CondImageLayout] = (),
    ) -> ImageSequence:
        """The CFG branch: the conditional sequence with every prompt token replaced by <cfg> (input
        images stay)."""
        prompt = self._checked_prompt(prompt_ids)
        return self._build([self.cfg] * len(prompt), ratio_index, grid_h, grid_w, image_base_size, max_length,
                           template, cond, uncond=True)

    def _checked_prompt(self, prompt_ids) -> list[int]:
        if isinstance(prompt_ids, str):  # convenience: a prompt given as text
            prompt_ids = self.encode(prompt_ids)
        prompt = prompt_ids.tolist() if isinstance(prompt_ids, torch.Tensor) else list(prompt_ids)
        if len(prompt) == 0:
            raise ValueError("the prompt is empty (0 tokens); text-to-image needs a non-empty prompt")
        return [int(t) for t in prompt]

    def _image_header(self, image_base_size: int, ratio_index: int) -> list[int]:
        """<boi> <img_size_B> <img_ratio_k>: the _IMAGE_HEADER tokens before an image's <timestep>."""
        return [self.boi, self.img_size(image_base_size), self.img_ratio(ratio_index)]

    def build_text_sequence(self, prompt_ids: Sequence[int] | str, task: str, template: SequenceTemplate,
                            image_base_size: int, cond: Sequence[CondImageLayout] = ()) -> "TextSequence":
        """A text pass's input: the user part as the image sequence has it, then the assistant role
        and the opener of the task's first part (think, think_recaption: <think>; recaption:
        <recaption>), encoded together as the reference encodes its bot_response_prefix."""
        task = task.split("_")[0]
        if task not in TEXT_PASS_OPENERS:
            raise ValueError(f"unknown text pass {task!r}; choose one of {', '.join(TEXT_PASS_OPENERS)}")
        prompt = self._checked_prompt(prompt_ids)
        ids, spans, runs, prompt_start = self._user_part(prompt, template, image_base_size, cond)
        _, user_end = self._user_pieces(template)
        role = INSTRUCT_ASSISTANT if template.kind == "instruct" else ""
        ids += user_end + self.encode(role + TEXT_PASS_OPENERS[task])
        positions = torch.arange(len(ids))[:, None].repeat(1, 2)
        place_2d_runs(positions, runs)
        return TextSequence(torch.tensor(ids, dtype=torch.long), positions, tuple(spans))

    def _user_part(self, prompt, template, image_base_size, cond):
        """<bos>, the template before the prompt, the input images, the prompt: (ids, the images'
        spans, their 2-D runs, where the prompt starts)."""
        before, _ = self._user_pieces(template)
        ids, spans, runs = [self.bos, *before], [], []
        for image in cond:
            ids += [*self._image_header(image_base_size, image.ratio_index), self.timestep]
            vae = slice(len(ids), len(ids) + image.vae_grid[0] * image.vae_grid[1])
            ids += [self.img] * (vae.stop - vae.start) + [self.token_id("<joint_img_sep>")]
            vit = slice(len(ids), len(ids) + image.vit_slots)
            ids += [self.img] * image.vit_slots + [self.eoi]
            spans.append(CondImageSpans(vae.start - 1, vae, vit))
            runs += [(vae.start, *image.vae_grid), (vit.start, *image.vit_grid)]
        prompt_start = len(ids)
        return ids + list(prompt), spans, runs, prompt_start

    def _build(self, prompt, ratio_index, grid_h, grid_w, image_base_size, max_length,
               template: SequenceTemplate, cond: Sequence[CondImageLayout] = (), uncond: bool = False
               ) -> ImageSequence:
        if grid_h < 1 or grid_w < 1:
            raise ValueError(f"image grid must be at least 1x1 tokens, got {grid_h}x{grid_w}")
        length = self.sequence_length(len(prompt), grid_h, grid_w, template, cond)
        if max_length is not None and length > max_length:
            raise ValueError(
                f"sequence length {length} (prompt {len(prompt)} tokens + image {grid_h}x{grid_w} = "
                f"{grid_h * grid_w} tokens + {length - len(prompt) - grid_h * grid_w} template and special tokens) "
                f"exceeds max_length {max_length}"
            )
        _, between, after = self.template_pieces(template, uncond)
        ids, spans, runs, prompt_start = self._user_part(prompt, template, image_base_size, cond)
        ids += [*between, *self._image_header(image_base_size, ratio_index)]
        timestep_index = len(ids)
        ids += [self.token_id(token) for token in template.step_tokens]
        image_start = len(ids)
        ids += [self.img] * (grid_h * grid_w) + [self.eoi] + after
        assert len(ids) == length
        return ImageSequence(
            input_ids=torch.tensor(ids, dtype=torch.long),
            positions=build_2d_positions(length, image_start, grid_h, grid_w, runs),
            timestep_index=timestep_index,
            image_start=image_start,
            image_len=grid_h * grid_w,
            grid=(grid_h, grid_w),
            prompt_len=len(prompt),
            prompt_start=prompt_start,
            cond=tuple(spans),
        )
