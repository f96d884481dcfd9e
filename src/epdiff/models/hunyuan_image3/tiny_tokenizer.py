"""The small models' tokenizer: a word-level ``tokenizer.json`` over a few hundred common words
(those of the shapes captions among them) holding every special token HunyuanImage-3.0 uses, and
its ``tokenizer_config.json`` naming the bos/eos/pad tokens."""

from __future__ import annotations

import json
import os

from tokenizers import AddedToken, Tokenizer, models, normalizers, pre_tokenizers

from .tokenizer import NUM_RATIO_TOKENS, TOKENIZER_CONFIG_FILES, UNK_TOKEN, special_tokens

# The tokens of the roles (written to tokenizer_config.json).
TINY_ROLE_TOKENS = {"bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>"}

# Words a tiny demo model ("a small red circle on the left of a blue square") is likely to see.
_DEFAULT_WORDS = """
a an the this that these those some any each every all both no not and or but with without of
to in on at by for from into onto over under above below behind beside between near next
inside outside around across along against through up down off out here there is are was were
be been being has have had it its they them their which who what where while very
more most less least much many few several only also just quite rather too so as than like
left right top bottom middle center centre centered upper lower side sides corner corners edge
edges front back far close half quarter
horizontal vertical diagonal diagonally horizontally vertically row rows column columns
small large big tiny huge medium little giant tall short wide narrow thin thick long round
flat sharp smooth rough soft hard heavy light dark bright pale deep vivid faded glossy matte
red green blue yellow orange purple pink brown black white gray grey cyan magenta teal navy
gold golden silver beige maroon violet indigo turquoise lime olive cream tan crimson scarlet
emerald amber ivory coral lavender colour color colours colors colored coloured colorful
circle circles square squares triangle triangles rectangle rectangles star stars heart hearts
diamond diamonds oval ovals ellipse line lines dot dots cross crosses ring rings hexagon
pentagon octagon cube cubes sphere spheres cone cylinder pyramid arrow arrows stripe stripes
striped grid checkerboard checkered spiral wave waves curve curved shape shapes disk disc box
boxes ball balls block blocks bar bars border outline outlined filled solid hollow empty
pattern patterns gradient dotted dashed
one two three four five six seven eight nine ten first second third single pair double
image picture photo photograph painting drawing sketch illustration render cartoon poster
icon logo diagram scene view portrait landscape background foreground sky ground floor wall
water sea ocean lake river beach sand grass field forest tree trees flower flowers leaf
leaves plant garden mountain mountains hill hills rock stone cloud clouds sun moon night day
morning evening sunset sunrise rain snow fire light shadow reflection city street road
house building window door roof bridge tower car bus train boat ship plane bicycle
cat cats dog dogs bird birds fish horse cow sheep rabbit bear lion tiger elephant monkey
person people man woman boy girl child face hand eye eyes hair smile
table chair bed lamp cup mug bottle glass plate bowl book books clock phone computer screen
apple apples banana orange fruit bread cake food
made simple minimal minimalist abstract realistic detailed plain clean neat style
high low quality resolution sharp blurry colourful pastel neon monochrome
sitting standing lying flying floating walking running holding looking shining glowing
falling hanging placed drawn painted covered surrounded arranged stacked scattered
facing touching overlapping centered inside
, . ! ? ; : ' " - ( ) /
0 1 2 3 4 5 6 7 8 9
"""


def default_vocabulary() -> list[str]:
    """The default word list (lower case, de-duplicated, in a stable order)."""
    return list(dict.fromkeys(_DEFAULT_WORDS.split()))


def build_tiny_tokenizer(path_or_dir, image_base_size: int, vocab_words: list[str] | None = None,
                         extra_ratio_tokens: int = 0) -> None:
    """Write a small word-level ``tokenizer.json`` holding every special token the reference uses.

    ``path_or_dir`` is a folder (``tokenizer.json`` is written inside) or a ``.json`` file path.
    Words are lower-cased (the tokenizer lower-cases its input too); unknown words map to <unk>.
    extra_ratio_tokens: <img_ratio_33> on, the Instruct models' extra buckets (after the words).
    """
    extra = [f"<img_ratio_{NUM_RATIO_TOKENS + k}>" for k in range(extra_ratio_tokens)]
    specials = special_tokens(image_base_size)
    words = default_vocabulary() if vocab_words is None else [w.lower() for w in vocab_words]
    for word in words:
        if not word or any(ch.isspace() for ch in word):
            raise ValueError(f"vocabulary word {word!r} is empty or contains whitespace")
    words = [w for w in dict.fromkeys(words) if w not in specials]

    # Specials first, at fixed ids, so the 33 ratio tokens get consecutive ids by construction.
    vocab = {token: i for i, token in enumerate(specials + words + extra)}
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK_TOKEN))
    tokenizer.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    # Whitespace split, then punctuation and digits as separate tokens, so "left," -> "left" ",".
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.WhitespaceSplit(),
        pre_tokenizers.Punctuation(behavior="isolated"),
        pre_tokenizers.Digits(individual_digits=True),
    ])
    # Registered as added special tokens so they match whole before normalisation and
    # pre-tokenisation (otherwise "<img_ratio_3>" would be split at its punctuation).
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials + extra])

    path = os.fspath(path_or_dir)
    if not path.endswith(".json"):
        os.makedirs(path, exist_ok=True)
        path = os.path.join(path, "tokenizer.json")
    tokenizer.save(path)
    write_tokenizer_config(os.path.dirname(path) or ".")


def write_tokenizer_config(folder) -> None:
    """The tiny tokenizers' tokenizer_config.json: which token plays which role."""
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "unk_token": UNK_TOKEN, **TINY_ROLE_TOKENS}
    with open(os.path.join(os.fspath(folder), TOKENIZER_CONFIG_FILES[0]), "w") as f:
        json.dump(config, f, indent=2)
