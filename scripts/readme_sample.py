"""Draw the README's sample (docs/sample.png) with the built-in model on 2 CPU ranks with EP, and
refuse to write it unless the strict checker reads every image as exactly its prompt.

    python scripts/readme_sample.py [OUT.png]
"""

import sys

from PIL import Image

from epdiff import ImageGenerator
from epdiff.train import checker

PROMPTS = (
    "a large red circle on the left",
    "a small blue square at the top",
    # two held-out prompts: scenes the model never saw in training
    "a large purple triangle at the top and a large green square at the bottom",
    "a small green square on the left and a small purple circle on the right",
)
SCALE, GAP = 2, 16  # shown at twice the model's 128 x 128, 16 px apart

if __name__ == "__main__":  # spawned workers re-import this file
    out = sys.argv[1] if len(sys.argv) > 1 else "docs/sample.png"
    with ImageGenerator(tensor_parallel_size=2, enable_expert_parallel=True) as generator:
        images = generator.generate(list(PROMPTS), seed=0)
    wrong = [(p, r["detected"]) for p, r in ((p, checker.score(p, im)) for p, im in zip(PROMPTS, images))
             if not r["exact"]]
    if wrong:
        raise SystemExit(f"not written: {len(wrong)} image(s) wrong: {wrong}")
    side = images[0].width * SCALE
    sheet = Image.new("RGB", (len(images) * side + (len(images) - 1) * GAP, side), "white")
    for i, image in enumerate(images):
        sheet.paste(image.resize((side, side), Image.Resampling.LANCZOS), (i * (side + GAP), 0))
    sheet.save(out)
    print(f"wrote {out}: {len(images)} images, each exactly right")
