"""Step caching (issue 24, docs/architecture.md 'Step caching'): the reference's schedule, a Taylor
series that is exact where it should be, no change with the cache off, the same steps skipped on
every rank of every layout with EP, and the one-rank result there."""

import math

import pytest
import torch

from epdiff.engine import ImageGenerator
from epdiff.sampling.step_cache import StepCacheConfig, TaylorSeries
from epdiff.train.checker import score
from layouts import layout
from nucleus_cases import cached_layouts_against_one_rank

TAYLOR = StepCacheConfig("taylor", order=2)


def test_the_reference_schedule_full_steps_at_the_start_every_interval_and_at_the_end():
    full = [i for i, run in enumerate(TAYLOR.full_steps(50)) if run]
    # the first three, then after every 4 skipped steps, and the last
    assert full == [0, 1, 2, 7, 12, 17, 22, 27, 32, 37, 42, 47, 49]
    assert all(StepCacheConfig("taylor", interval=1).full_steps(50))
    assert all(StepCacheConfig().full_steps(50))  # none
    assert sum(StepCacheConfig("taylor", interval=3, first_full=1, last_full=0).full_steps(10)) == 4  # 0, 3, 6, 9


def reference_taylorseer(points, order, step):
    """The reference's chain (cache_utils.TaylorCacheContainer), written out: derivative k the
    difference of derivative k - 1 between consecutive full steps over their distance, summed as
    a Taylor series around the last full step."""
    derivatives, last = [], None
    for x, y in points:
        new = [y]
        for k in range(min(order, len(derivatives))):
            new.append((new[k] - derivatives[k]) / (x - last))
        derivatives, last = new, x
    return sum(d * (step - last) ** k / math.factorial(k) for k, d in enumerate(derivatives))


def test_the_extrapolation_is_exact_for_polynomials_of_its_order_where_the_references_is_not():
    def value(i):  # a parabola in the step index, one per element
        return torch.tensor([1.0, -2.0], dtype=torch.float64) + 0.5 * i - 0.03 * i * i

    series = TaylorSeries(order=2, first_full=3)
    full = TAYLOR.full_steps(30)
    points, checked = [], 0
    for i in range(30):
        if full[i]:
            series.record(i, value(i))
            if i >= 2:
                points.append((i, value(i)))
        elif len(series.differences) == 3:  # three points on the chain: exact from then on
            torch.testing.assert_close(series.predict(i), value(i), rtol=0, atol=1e-12)
            # the reference's series misses by 2.5·f''·d at distance d (interval 5): 0.06·2.5·d here
            miss = reference_taylorseer(points, 2, i) - value(i)
            torch.testing.assert_close(miss, torch.full((2,), 0.15 * (i - points[-1][0]), dtype=torch.float64))
            checked += 1
    assert checked >= 8
    # the chain starts at the last of the first steps (2): steps 0 and 1 leave nothing behind
    series = TaylorSeries(order=2, first_full=3)
    series.record(0, value(0))
    series.record(1, value(1))
    assert series.differences == [] and series.last_step == 1
    series.record(2, value(2))
    series.record(7, value(7))
    torch.testing.assert_close(series.predict(9), value(2) + (value(7) - value(2)) / 5 * 7)  # the chord


@pytest.mark.parametrize("cache, message", [
    (StepCacheConfig("teacache"), "cache 'teacache' is not one epdiff has"),
    (StepCacheConfig("taylor", interval=0), "cache interval must be a positive integer, got 0"),
    (StepCacheConfig("taylor", order=9), "cache order must be an integer in [0, 4], got 9"),
    ("deepcache", "cache 'deepcache' is not one epdiff has"),
    (StepCacheConfig("fbcache", threshold=-0.1), "cache threshold must be a positive number, got -0.1"),
])
def test_bad_cache_settings_are_refused_naming_the_value(cache, message):
    from epdiff.engine import EngineConfig, RequestError, SamplingParams

    with pytest.raises(RequestError) as e:
        SamplingParams("a red circle", cache=cache).resolve(EngineConfig().resolve())
    assert message in str(e.value) and e.value.field == "cache"


def test_cache_off_and_taylor_every_step_are_bit_identical_and_taylor_skips_most_steps():
    kw = dict(num_inference_steps=20, seed=3)
    prompts = ["a small red circle on the left", "a large blue square at the top and a small green triangle at the bottom"]
    with ImageGenerator() as generator:
        plain = generator.generate_outputs(prompts, **kw)
        every_step = generator.generate_outputs(prompts, cache=StepCacheConfig("taylor", interval=1), **kw)
        cached = generator.generate_outputs(prompts, cache="taylor", **kw)
    for a, b, c in zip(plain, every_step, cached):
        assert torch.equal(a.images[0].latents, b.images[0].latents)
        assert a.images[0].metadata["full_steps"] == "20" and c.images[0].metadata["full_steps"] == "7"
        assert c.images[0].metadata["cache"] == "taylor (interval 5, order 1)"
        assert not torch.equal(a.images[0].latents, c.images[0].latents)
        # 7 of 20 model calls: the image moves a little (measured 24-26 dB) and still shows the prompt
        diff = (a.images[0].pixels.astype(float) - c.images[0].pixels.astype(float)) ** 2
        psnr = 10 * math.log10(255 ** 2 / max(diff.mean(), 1e-12))
        assert psnr > 20, psnr
        assert score(a.params.prompt, a.images[0].to_pil())["exact"]
        assert score(a.params.prompt, c.images[0].to_pil())["exact"]


def test_fbcache_skips_steps_whose_first_block_barely_changed_and_never_below_its_threshold():
    kw = dict(num_inference_steps=20, seed=3)
    prompts = ["a small red circle on the left", "a large blue square at the top and a small green triangle at the bottom"]
    with ImageGenerator() as generator:
        plain = generator.generate_outputs(prompts, **kw)
        never = generator.generate_outputs(prompts, cache=StepCacheConfig("fbcache", threshold=1e-12), **kw)
        cached = generator.generate_outputs(prompts, cache="fbcache", **kw)
    for a, b, c in zip(plain, never, cached):
        assert torch.equal(a.images[0].latents, b.images[0].latents) and b.images[0].full_steps == 20
        assert 4 <= c.images[0].full_steps < 20, c.images[0].full_steps  # 3 first, 1 last at least
        assert c.images[0].metadata["cache"] == "fbcache (threshold 0.08, interval 5)"
        assert score(a.params.prompt, c.images[0].to_pil())["exact"]


@pytest.fixture(scope="module")
def nucleus(tmp_path_factory):
    from epdiff.models.nucleus_image.make_tiny import make_tiny

    return make_tiny(str(tmp_path_factory.mktemp("nucleus")), hidden_size=128, num_attention_heads=8,
                     num_key_value_heads=4, num_experts=8, seed=2)


@pytest.mark.parametrize("world", [2])
def test_every_rank_skips_the_same_steps_and_layouts_with_ep_give_the_one_rank_result(world8, nucleus, world):
    configs = {2: [layout(cfg=2, ep=True), layout(sp=2, ep=True, backend="alltoall"), layout(pp=2, ep=True)]}[world]
    cache = StepCacheConfig("taylor", interval=3, first_full=2)
    rows = [r for per_rank in world8.run(world, cached_layouts_against_one_rank, nucleus, configs, cache, 9)
            for r in per_rank]
    assert len(rows) == world * len(configs)
    expected = [i for i, run in enumerate(cache.full_steps(9)) if run]
    assert expected == [0, 1, 4, 7, 8]
    assert all(r["called"] == expected for r in rows), [(r["layout"], r["rank"], r["called"]) for r in rows]
    assert all(r["close"] for r in rows), rows


@pytest.mark.parametrize("world", [2, 4])
def test_fbcache_decides_alike_on_every_rank_and_gives_the_one_rank_result(world8, nucleus, world):
    configs = {2: [layout(cfg=2, ep=True), layout(pp=2, ep=True)],
               4: [layout(tp=2, dp=2, ep=True), layout(sp=2, pp=2, ep=True, backend="alltoall")]}[world]
    cache = StepCacheConfig("fbcache", threshold=0.25, first_full=2, interval=3)
    rows = [r for per_rank in world8.run(world, cached_layouts_against_one_rank, nucleus, configs, cache, 9)
            for r in per_rank]
    assert len(rows) == world * len(configs)
    full = {r["full_steps"] for r in rows}
    assert len(full) == 1 and 4 <= full.pop() < 9, [(r["layout"], r["rank"], r["full_steps"]) for r in rows]
    assert all(r["close"] for r in rows), rows
