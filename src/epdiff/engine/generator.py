"""The Python API: an image generator over any parallel layout that loads its model once.

    from epdiff import ImageGenerator
    with ImageGenerator(tensor_parallel_size=2, enable_expert_parallel=True) as generator:
        images = generator.generate("a small red circle on the left", seed=1234)
        images[0].save("out.png")
        more = generator.generate("a large blue square at the top", seed=7)  # same workers, no reload

        # An Instruct model writes first; its text and previews stream while the request runs:
        for event in generator.stream("a cat in a hat", task="think_recaption", partial_images=2):
            ...  # TextDelta(text), PartialImage(image_index, partial_index, pixels), then the RequestOutput

Started as one process it spawns one worker per rank when constructed (keep such scripts under
`if __name__ == "__main__":`, since spawn re-imports them); under torchrun every rank constructs
it, rank 0 gets the images and the other ranks serve rank 0 until it closes.
"""

from __future__ import annotations

import queue
from typing import Iterator

from .engine import Engine, PartialImage, RequestOutput, TextDelta
from .params import EngineConfig, SamplingParams, prompt_requests


class ImageGenerator:
    def __init__(self, model: str | None = None, *, decode: bool = True, show_progress: bool = False, **options):
        """options: any field of EngineConfig and of its ParallelConfig, by name
        (`tensor_parallel_size=2, enable_expert_parallel=True, quantization="fp8"`, ...)."""
        self.engine = Engine(EngineConfig.from_options(model=model, **options), decode=decode,
                             show_progress=show_progress)

    @classmethod
    def from_config(cls, config: EngineConfig, *, decode: bool = True, show_progress: bool = False):
        return cls(**config.as_options(), decode=decode, show_progress=show_progress)

    @property
    def config(self) -> EngineConfig:
        return self.engine.config

    def requests(self, prompts, **kwargs) -> list[SamplingParams]:
        return prompt_requests(self.engine.config, prompts, **kwargs)

    def generate_outputs(self, prompts, **kwargs) -> list[RequestOutput]:
        """One RequestOutput per prompt (images, seeds, latents, times). Empty on ranks other than 0."""
        if not self.engine.is_driver:
            return []
        futures = self.engine.submit_all(self.requests(prompts, **kwargs))
        return [f.result() for f in futures]

    def generate(self, prompts, **kwargs) -> list:
        """PIL images in prompt order (num_images_per_prompt each). Empty on ranks other than 0."""
        return [image.to_pil() for out in self.generate_outputs(prompts, **kwargs) for image in out.images]

    def stream(self, prompt: str, **kwargs) -> Iterator[TextDelta | PartialImage | RequestOutput]:
        """One prompt's request as it runs: the text its model writes before drawing (TextDelta),
        the previews it asks for (partial_images=N: PartialImage), then its RequestOutput. Leaving
        the loop early abandons the request (its slot goes to the next one). Rank 0 only."""
        if not self.engine.is_driver:
            return
        (params,) = self.requests(prompt, **kwargs)
        events: queue.Queue = queue.Queue()
        future = self.engine.submit(params, on_event=events.put)
        future.add_done_callback(lambda _: events.put(None))
        try:
            while (event := events.get()) is not None:
                yield event
            yield future.result()
        finally:
            if not future.done():
                self.engine.abandon(future)

    def routing_stats(self) -> list[dict]:
        """Per pipeline stage: tokens per (layer, expert) since the model was loaded."""
        return self.engine.routing_stats() if self.engine.is_driver else []

    @property
    def rank_metrics(self) -> list[dict]:
        """Per rank: experts, parameter and read bytes, load time, every step's seconds, peak memory."""
        return self.engine.rank_metrics if self.engine.is_driver else []

    def close(self) -> None:
        self.engine.close()

    def __enter__(self) -> "ImageGenerator":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
