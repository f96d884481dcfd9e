"""The Instruct models' text passes (issue 23, docs/architecture.md 'Writing text'): Tencent's code
on the same tiny checkpoints (tokens, the written text, the chosen size, both image-pass rows and
the final latents: tensors its code produced, scripts/reference_instruct.py --text), the rules
(forced tokens, the ratio choice, the budget), sampling, every layout with EP against one rank,
the engine's flow from the text to the image, and the refusals."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from epdiff.distributed.parallel_state import ParallelState
from epdiff.engine.denoise import RankMetrics, denoise
from epdiff.engine.params import EngineConfig, RequestError, SamplingParams
from epdiff.engine.write import NONFINITE, RowWriter, TextCheck, pick, write
from epdiff.models.base import ImageTask, TextRules, TextSampling, TextTask
from epdiff.models.registry import model_info
from instruct_cases import TEXT_CASES, TEXT_REFERENCE, input_image, make_checkpoint
from layouts import layout
from test_instruct import checkpoint

_one_rank: dict = {}


def text_task(variant: str, prompt: str, seed: int, task: str, choose_size: bool, budget: int = 16,
              sampling: dict | None = None, multiple: int = 1) -> TextTask:
    info = model_info(checkpoint(variant))
    return TextTask(prompt, seed, task, choose_size, TextSampling(budget, **(sampling or {})),
                    info.resolve_system_prompt("dynamic", task), image_token_multiple=multiple)


def write_then_draw(state: ParallelState, variant: str, groups, steps: int = 2):
    """Every group's rows written (on every rank), then this DP group's first row drawn from what it
    wrote: (all groups' token ids, that image's latents)."""
    info = model_info(checkpoint(variant))
    pipe = info.load_pipeline(state, torch.float32, "safetensors", None, False)
    ids = write(pipe, info, [[(task, True) for task in group] for group in groups], state)
    task = groups[state.dp.rank][0]
    cot, size, system = info.finish_text(task, ids[state.dp.rank][0])
    height, width = size or (256, 256)
    image = ImageTask(task.prompt, task.seed, height, width, steps, info.default_guidance_scale,
                      system_prompt=system, cot_text=cot)
    out = denoise(pipe, [image], state, RankMetrics(rank=state.global_rank, layout=state.config.describe()))
    return ids, out[0].latents


@pytest.fixture(scope="module")
def text_reference():
    from safetensors.torch import load_file

    return load_file(TEXT_REFERENCE)


@pytest.mark.parametrize("name", list(TEXT_CASES))
def test_the_text_pass_and_its_image_match_the_reference_code(name, text_reference, tmp_path):
    case, ref = TEXT_CASES[name], {k.split(".", 1)[1]: v for k, v in text_reference.items() if k.startswith(name + ".")}
    info = model_info(make_checkpoint(str(tmp_path), case["variant"], text_bias=case.get("text_bias")))
    state = ParallelState.single()
    pipe = info.load_pipeline(state, torch.float32, "safetensors", None, False)
    images = tuple(input_image(image) for image in case.get("images", ()))
    system = info.system_prompts.resolve(case["system"])
    # The reference's text pass draws an edit's input-image sample from a seed of its own (text_seed).
    task = TextTask(case["prompt"], int(ref["text_seed"]), case["bot_task"], case["size"] == "auto",
                    TextSampling(case["max_new_tokens"]), system, images)
    layouts = [pipe.conditioner.prepare(image).layout for image in images]
    text_input = info.tokenizer.build_text_sequence(task.prompt, task.task, info.template(system),
                                                    info.config.image_base_size, layouts)
    assert text_input.input_ids.tolist() == ref["text_input_ids"].tolist()
    ids = write(pipe, info, [[(task, True)]], state)[0][0]
    assert ids == ref["generated_ids"].tolist()
    cot, size, system = info.finish_text(task, ids)
    assert cot == bytes(ref["cot_text"].tolist()).decode()
    height, width = size or (case["size"], case["size"])
    ratio = info.resolution.ratio_index(height, width)
    assert ratio == int(ref["ratio_index"])
    grid = info.resolution.grid(ratio)
    build = (info.tokenizer.build_sequence, info.tokenizer.build_uncond_sequence)
    rows = [make(case["prompt"], ratio, *grid, info.config.image_base_size, info.context, info.template(system, cot),
                 layouts).input_ids.tolist() for make in build]
    assert rows[0] == ref["image_input_ids"].tolist()
    if "image_input_ids_uncond" in ref:
        assert rows[1] == ref["image_input_ids_uncond"].tolist()
    image = ImageTask(case["prompt"], case["seed"], height, width, case["steps"], case["guidance"],
                      system_prompt=system, images=images, cot_text=cot)
    latents = denoise(pipe, [image], state, RankMetrics(rank=0, layout="1 rank"))[0].latents
    err = float((latents - ref["latents"]).norm() / ref["latents"].norm())
    assert err <= 1e-4, f"{name}: relative error {err:.2e} against Tencent's code"


# Group 0: two prompts of different lengths (right-padded rows), greedy and sampled; group 1 (DP):
# another row. Think then recaption, the size chosen.
ROWS = [[("a red circle", 3, "think_recaption", True, None),
         ("two blue squares on the left of a green triangle", 4, "recaption", False,
          dict(temperature=0.8, top_k=40, top_p=0.9))],
        [("a small yellow star", 5, "think_recaption", True, dict(temperature=0.7, top_k=0, top_p=0.95))]]


def groups_for(variant: str, dp: int, multiple: int = 1):
    """multiple: the layout's SP size (its text passes choose among the sizes it can split)."""
    return [[text_task(variant, *row[:4], sampling=row[4], multiple=multiple) for row in group] for group in ROWS[:dp]]


def layouts_against_one_rank(rank: int, variant: str, configs) -> list[dict]:
    rows = []
    for config in configs:
        state = ParallelState.build(config, "cpu")
        groups = groups_for(variant, config.data_parallel_size, config.sequence_parallel_size)
        ids, latents = write_then_draw(state, variant, groups)
        key = variant, state.dp.rank, config.sequence_parallel_size
        if key not in _one_rank:  # one rank writes this DP group's rows as one batch
            _one_rank[key] = write_then_draw(ParallelState.single(), variant, [groups[state.dp.rank]])
        ref_ids, ref_latents = _one_rank[key]
        err = float((latents - ref_latents).abs().max())
        rows.append(dict(layout=config.describe(), rank=rank, same_tokens=ids[state.dp.rank] == ref_ids[0],
                         err=err, close=err <= 1e-5 * float(ref_latents.abs().max())))
    return rows


@pytest.mark.parametrize("world", [2, 4])
def test_every_layout_with_ep_writes_the_one_rank_tokens_and_draws_its_latents(world8, world):
    variant, configs = {2: ("instruct-distil", [layout(tp=2, ep=True), layout(sp=2, ep=True, backend="alltoall"),
                                                layout(pp=2, ep=True)]),
                        4: ("instruct", [layout(cfg=2, dp=2, ep=True)])}[world]
    rows = [r for per_rank in world8.run(world, layouts_against_one_rank, variant, configs) for r in per_rank]
    assert rows and all(r["same_tokens"] and r["close"] for r in rows), rows


def joining_at(step: int, groups):
    """A writing batch's check that lets groups[g]'s rows join at `step` (a filler where none joins)."""
    def check(done: int) -> TextCheck:
        if done != step:
            return TextCheck()
        filler = next(task for group in groups for task in group)
        return TextCheck(join=[[(task, True) for task in group] or [(filler, False)] for group in groups])
    return check


# Rows that join: the first at step 16 of a 40-token think (still writing then), the second sampled.
JOINING = [("a red circle", 3, "think_recaption", True, None, 40),
           ("two blue squares on the left of a green triangle", 4, "recaption", False,
            dict(temperature=0.8, top_k=40, top_p=0.9), 16)]


def joined_rows(variant: str):
    return [text_task(variant, *row[:4], budget=row[5], sampling=row[4]) for row in JOINING]


def joins_against_one_rank(rank: int, variant: str, configs, edit: bool = False) -> list[dict]:
    """The last DP group's row joins at step 16 a batch whose group 0 holds a long row and a short
    one, which has ended by then and leaves the batch (the other groups' fillers too): every rank's
    tokens against one rank's alone. edit: the long row is an edit's (its input image in its
    prefix), alone in its group as the planner puts it."""
    first, later = joined_rows(variant)
    short = text_task(variant, "a green square", 6, "recaption", False, budget=4)
    if edit:  # (it writes 32 tokens)
        first = dataclasses.replace(text_task(variant, "a small yellow star", 4, "think_recaption", True, budget=40),
                                    images=(input_image("red-square"),))
    out = []
    for config in configs:
        state = ParallelState.build(config, "cpu")
        info = model_info(checkpoint(variant))
        pipe = info.load_pipeline(state, torch.float32, "safetensors", None, False)
        dp = config.data_parallel_size
        joining = [[] for _ in range(dp - 1)] + [[later]]
        starting = [[(first, True)] if edit else [(short, True), (first, True)]] + [[(first, False)]] * (dp - 1)
        ids = write(pipe, info, starting, state, check=joining_at(16, joining))
        if edit:  # the short row's place, for the comparison below
            ids[0].insert(0, [])
        single = ParallelState.single()
        alone = {}
        for task in (short, first, later):
            one = model_info(checkpoint(variant)).load_pipeline(single, torch.float32, "safetensors", None, False)
            alone[task.prompt] = write(one, info, [[(task, True)]], single)[0][0]
        out.append(dict(layout=config.describe(), rank=rank, first=ids[0][1] == alone[first.prompt],
                        short=edit or ids[0][0] == alone[short.prompt] and len(ids[0][0]) < 16,
                        later=ids[-1][-1] == alone[later.prompt], wrote_past_join=len(ids[0][1]) > 16))
    return out


def test_a_row_that_joins_a_pass_under_way_writes_as_it_would_alone():
    rows = joins_against_one_rank(0, "instruct-distil", [layout()])
    assert rows[0]["first"] and rows[0]["short"] and rows[0]["later"] and rows[0]["wrote_past_join"], rows


def test_a_row_joins_a_pass_writing_an_edit_as_it_would_alone():
    rows = joins_against_one_rank(0, "instruct-distil", [layout()], edit=True)
    assert rows[0]["first"] and rows[0]["later"] and rows[0]["wrote_past_join"], rows


def test_rows_join_on_every_layout_as_on_one_rank(world8):
    configs = [layout(dp=2, ep=True), layout(tp=2, ep=True), layout(sp=2, ep=True, backend="alltoall"),
               layout(pp=2, ep=True)]
    rows = [r for per_rank in world8.run(2, joins_against_one_rank, "instruct-distil", configs) for r in per_rank]
    # A pass writing an edit: DP's other group prefills the edit as its filler, and its row joins.
    edits = [layout(dp=2, ep=True), layout(sp=2, ep=True, backend="alltoall")]
    rows += [r for per_rank in world8.run(2, joins_against_one_rank, "instruct-distil", edits, True) for r in per_rank]
    assert rows and all(r["first"] and r["short"] and r["later"] and r["wrote_past_join"] for r in rows), rows


def test_a_row_writes_the_same_alone_as_in_a_padded_batch():
    info = model_info(checkpoint("instruct-distil"))
    pipe = info.load_pipeline(ParallelState.single(), torch.float32, "safetensors", None, False)
    group = groups_for("instruct-distil", 1)[0]
    together = write(pipe, info, [[(task, True) for task in group]], ParallelState.single())[0]
    alone = [write(pipe, info, [[(task, True)]], ParallelState.single())[0][0] for task in group]
    assert together == alone
    assert len(together[1]) == 16  # recaption without a size: the budget, then it ends


def test_rules_force_the_transitions_choose_a_ratio_and_close_at_the_budget():
    info = model_info(checkpoint("instruct"))
    t = info.tokenizer
    think_end, recaption, recaption_end = t.token_id("</think>"), t.token_id("<recaption>"), t.token_id("</recaption>")
    header = (t.token_id("<answer>"), t.boi, t.img_size(256))
    ratios = tuple(t.ratio_ids(len(info.resolution.buckets)))
    rules = info.text_rules(TextTask("x", 0, "think_recaption", True))
    assert rules.forced == {think_end: (recaption,), recaption_end: header} and rules.stops == frozenset(ratios)
    assert rules.choose_from == {t.img_size(256): ratios} and rules.closing == header and len(ratios) == 37
    word = t.encode("red")[0]
    row = RowWriter(rules, budget=4)
    for token in (word, think_end):
        row.push(token)
    assert row.forced() == recaption  # </think> -> <recaption>
    row.push(recaption)
    row.push(word)  # the budget: the answer and the header close the pass, then a ratio is chosen
    assert row.pending == list(header) and not row.done
    for token in header:
        row.push(token)
    assert row.choices() == ratios
    row.push(ratios[5])
    assert row.done and row.ids[-1] == ratios[5]
    cot, size, _ = info.finish_text(TextTask("x", 0, "think_recaption", True, TextSampling(4)), row.ids)
    assert cot == "<think>" + t.decode([word, think_end, recaption, word]) and size == info.resolution.bucket(5)
    # </think> as the budget's last token: its forced <recaption> goes past the budget, then the
    # pass still closes and chooses a size
    row = RowWriter(rules, budget=2)
    for token in (word, think_end, recaption):
        row.push(token)
    assert row.pending == list(header) and not row.done
    fixed = info.text_rules(TextTask("x", 0, "recaption", False))
    assert fixed == TextRules(frozenset({recaption_end}), {})
    assert info.text_rules(TextTask("x", 0, "think", False)).stops == frozenset({think_end, recaption_end})


def test_a_row_whose_logits_overflow_ends_alone(monkeypatch):
    info = model_info(checkpoint("instruct-distil"))
    state = ParallelState.single()
    pipe = info.load_pipeline(state, torch.float32, "safetensors", None, False)
    decode, calls = pipe.transformer.decode, []

    def overflowing(*args):
        logits = decode(*args)
        calls.append(1)
        if len(calls) == 3:  # row 0's fourth token: NaN logits (the sampled row's)
            logits[0, 5] = float("nan")
        return logits

    monkeypatch.setattr(pipe.transformer, "decode", overflowing)
    group = groups_for("instruct-distil", 1)[0][::-1]  # the sampled row first
    ids = write(pipe, info, [[(task, True) for task in group]], state)[0]
    assert ids[0][-1] == NONFINITE and len(ids[0]) == 4 and len(ids[1]) > 4 and NONFINITE not in ids[1]


def test_drop_think_keeps_the_recaption_and_its_system_prompt(monkeypatch):
    import dataclasses

    info = model_info(checkpoint("instruct"))
    t = info.tokenizer
    monkeypatch.setattr(info, "generation", dataclasses.replace(info.generation, drop_think=True))
    ids = t.encode("red circle") + [t.token_id("</think>"), t.token_id("<recaption>")] + t.encode("a big red circle") \
        + [t.token_id("</recaption>")]
    task = TextTask("x", 0, "think_recaption", False, TextSampling(32), info.system_prompts.resolve("en_think_recaption"))
    cot, size, system = info.finish_text(task, ids)
    assert cot == "<recaption> a big red circle </recaption>" and size is None
    assert system == info.system_prompts.named("en_recaption")  # as the file has it (unstripped), as the reference
    kept = info.template(system, "<think> red circle </think>" + cot).cot  # a think block is left out here too
    assert kept == (("<recaption>", False), (" a big red circle ", True), ("</recaption>", False))


def test_sampling_keeps_the_top_k_and_top_p_tokens_and_is_seeded():
    logits = torch.tensor([0.0, 1.0, 2.0, 3.0, 4.0])
    assert int(pick(logits, TextSampling(temperature=0.0), None)) == 4
    assert int(pick(logits, TextSampling(temperature=1e-300), torch.Generator())) == 4  # (dividing would overflow)
    g = lambda: torch.Generator().manual_seed(7)  # noqa: E731
    draws = {int(pick(logits, TextSampling(temperature=1.0, top_k=2), g())) for _ in range(3)}
    assert len(draws) == 1 and draws <= {3, 4}
    seen = {int(pick(logits, TextSampling(temperature=1.0, top_k=2), torch.Generator().manual_seed(s)))
            for s in range(40)}
    assert seen == {3, 4}
    # top_p 0.7: the likeliest (p = 0.64) and the next (0.24) are kept, the rest (0.12) dropped
    seen = {int(pick(logits, TextSampling(temperature=1.0, top_p=0.7), torch.Generator().manual_seed(s)))
            for s in range(60)}
    assert seen == {3, 4}


def test_the_engine_writes_then_draws_and_streams_the_text():
    """(Previews and their order after the text: tests/test_serve_stream.py, through the same engine.)"""
    from epdiff.engine import ImageGenerator
    from epdiff.engine.engine import RequestOutput, TextDelta

    folder = checkpoint("instruct-distil")
    with ImageGenerator(folder, decode=False) as generator:
        events = list(generator.stream("a red circle", task="think_recaption", max_new_tokens=6, seed=3,
                                       num_inference_steps=2, num_images_per_prompt=2))
        given = generator.generate_outputs("a red circle", cot_text="<recaption>a red circle</recaption>",
                                           num_inference_steps=2, task="think_recaption")[0]
    text = "".join(e.text for e in events if isinstance(e, TextDelta))
    out = events[-1]
    assert isinstance(out, RequestOutput) and all(isinstance(e, TextDelta) for e in events[:-1])
    assert len(out.images) == 2 and out.text_seconds > 0
    assert text.startswith(out.cot_text) and out.cot_text.startswith("<think>") and out.params.height is not None
    assert out.images[0].metadata["cot_text"] == out.cot_text and out.images[0].metadata["task"] == "think_recaption"
    assert given.cot_text == "<recaption>a red circle</recaption>" and given.text_seconds == 0.0  # no text pass


def test_a_request_arriving_while_the_engine_writes_joins_the_pass_and_streams():
    from epdiff.engine.engine import Engine, TextDelta
    from epdiff.engine.worker import JoinText, RunText

    folder = checkpoint("instruct-distil")
    # Greedy, this prompt writes 68 tokens: checks at steps 16, 32, 48 and 64 for the later one to join.
    first = SamplingParams("a small yellow star", task="think_recaption", max_new_tokens=160, seed=3, temperature=0,
                           system_prompt="dynamic", num_inference_steps=1)
    later = SamplingParams("a red circle", task="recaption", max_new_tokens=8, seed=5, num_inference_steps=1)
    with Engine(EngineConfig(folder), decode=False) as engine:
        sent, deltas, futures = [], [], []
        command = engine._workers.channel.command
        engine._workers.channel.command = lambda c: sent.append(c) or command(c)

        def on_first(event):  # on the driver thread, as the first request's text streams
            if not futures:
                futures.append(engine.submit(later, on_event=lambda e: deltas.append(e.text)
                                             if isinstance(e, TextDelta) else None))
        a = engine.submit(first, on_event=on_first)
        joined_a = a.result(120)
        joined_b = futures[0].result(120)
        passes = [c for c in sent if isinstance(c, RunText)]
        alone_b = engine.submit(later).result(120)
    assert [c for c in sent if isinstance(c, JoinText)], "the later request was never sent to join"
    assert len(passes) == 1, "it did not join the writing batch"
    assert 0 < joined_b.text_seconds < joined_a.text_seconds  # its own time: from its join on
    assert joined_b.cot_text == alone_b.cot_text and "".join(deltas).startswith(joined_b.cot_text)
    assert joined_a.written_tokens > 16


def test_a_request_sent_to_join_a_pass_that_ends_first_runs_after_it():
    from epdiff.engine.engine import Engine
    from epdiff.engine.worker import JoinText

    folder = checkpoint("instruct-distil")
    # 8 tokens: the pass ends before its first check (step 16), so the join is never taken.
    first = SamplingParams("a small yellow star", task="recaption", max_new_tokens=8, seed=3, temperature=0,
                           num_inference_steps=1)
    later = SamplingParams("a red circle", task="recaption", max_new_tokens=8, seed=5, num_inference_steps=1)
    with Engine(EngineConfig(folder), decode=False) as engine:
        sent, futures = [], []
        command = engine._workers.channel.command
        engine._workers.channel.command = lambda c: sent.append(c) or command(c)
        a = engine.submit(first, on_event=lambda e: futures or futures.append(engine.submit(later)))
        a.result(120)
        queued_again = futures[0].result(120)
        alone = engine.submit(later).result(120)
    assert [c for c in sent if isinstance(c, JoinText)]
    assert queued_again.cot_text == alone.cot_text and queued_again.text_seconds > 0


def test_requests_arriving_within_one_check_never_write_past_max_batch_size():
    """Two arrive before the worker's first check (step 16): the driver counts the first sent to
    join until the worker takes it, so the second waits; once a row has ended nothing joins."""
    from epdiff.engine.engine import Engine
    from epdiff.engine.worker import JoinText, TextTokens

    folder = checkpoint("instruct-distil")
    first = SamplingParams("a small yellow star", task="think_recaption", max_new_tokens=160, seed=3, temperature=0,
                           system_prompt="dynamic", num_inference_steps=1)
    later = [SamplingParams(prompt, task="recaption", max_new_tokens=8, seed=5, num_inference_steps=1)
             for prompt in ("a red circle", "a blue square")]
    with Engine(EngineConfig(folder, max_batch_size=2), decode=False) as engine:
        sent, writing, futures = [], [], []
        command, send = engine._workers.channel.command, engine._workers.channel.send
        engine._workers.channel.command = lambda c: sent.append(c) or command(c)
        engine._workers.channel.send = lambda e: (isinstance(e, TextTokens) and writing.append(e.writing)) or send(e)

        def on_first(event):  # the first request's 1st and 3rd text events
            if len(writing) in (1, 3) and len(futures) < 2:
                futures.append(engine.submit(later[len(futures)]))
        engine.submit(first, on_event=on_first).result(120)
        outs = [f.result(120) for f in futures]
        alone = [engine.submit(p).result(120) for p in later]
    joins = [[i.request_id for g in c.groups for i in g] for c in sent if isinstance(c, JoinText)]
    assert len(joins) == 1 and len(joins[0]) == 1, joins
    assert max(w[0] for w in writing) == 2
    assert [o.cot_text for o in outs] == [a.cot_text for a in alone]


def test_bad_text_requests_are_refused_naming_the_field():
    config = EngineConfig(checkpoint("instruct-distil")).resolve()
    cases = [(dict(task="poem"), "task", "unknown task 'poem' for this model; it does: image, think, recaption"),
             (dict(task="recaption", max_new_tokens=0), "max_new_tokens", "max_new_tokens must be a positive integer"),
             (dict(task="recaption", temperature=-1), "temperature", r"temperature must be a number in \[0, 2\]"),
             (dict(task="recaption", top_k=-3), "top_k", "top_k must be a non-negative integer"),
             (dict(task="recaption", top_p=0.0), "top_p", r"top_p must be a number in \(0, 1\]"),
             (dict(partial_images=4), "partial_images", "partial_images must be an integer from 0 to 3, got 4"),
             (dict(task="recaption", max_new_tokens=10**6), "prompt", "ask for fewer new tokens")]
    for fields, field, message in cases:
        with pytest.raises(RequestError, match=message) as e:
            SamplingParams("a red circle", **fields).resolve(config)
        assert e.value.field == field
    base = EngineConfig(checkpoint("base")).resolve()
    with pytest.raises(RequestError, match="unknown task 'think' for this model; it does: image$"):
        SamplingParams("a red circle", task="think").resolve(base)
    with pytest.raises(RequestError, match=r"temperature must be a number in \[0, 2\] \(0: greedy\), got 'hot'"):
        SamplingParams("a red circle", temperature="hot").resolve(base)  # checked with no text pass too
    with pytest.raises(RequestError, match="this model writes none"):
        SamplingParams("a red circle", cot_text="<think>x</think>").resolve(base)
    chosen = SamplingParams("a red circle", task="recaption").resolve(config)
    assert chosen.height is None and chosen.writes_first and chosen.max_new_tokens == 2048
    sized = SamplingParams("a red circle", task="recaption", height=256, width=256).resolve(config)
    assert (sized.height, sized.width) == (256, 256) and not sized.text_task().choose_size
