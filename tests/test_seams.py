"""The three seams of docs/architecture.md: model families, quantization methods, dispatch backends.
What is generic imports nothing of a family, nothing imports in a circle, a second family and a
second quantization scheme plug in without touching the engine or the layers."""

from __future__ import annotations

import ast
import dataclasses
import json
import os
import re

import pytest
import torch
from torch import nn

import epdiff
from epdiff.cli import build_parser, main
from epdiff.config import ConfigError, ParallelConfig
from epdiff.distributed.parallel_state import Group, ParallelState
from epdiff.engine import EngineConfig, ImageGenerator, SamplingParams
from epdiff.layers.linear import ColumnParallelLinear
from epdiff.loader.slicing import copy_checked
from epdiff.models import registry
from epdiff.moe.backends import DISPATCH_BACKENDS, dispatcher_class
from epdiff.moe.dispatch import Dispatcher, TokenCounts
from epdiff.moe.layer import MoELayer
from epdiff.quantization import QuantizationConfig, UnquantizedExpertsMethod, get_quantization_config
from epdiff.quantization.base import LinearMethod, new_parameter
from moe_cases import SMALL, build_layer, make_tokens, make_weights, reference_moe
from toy_family import ENTRY, expected_latents, write_toy_model

SRC = os.path.dirname(epdiff.__file__)


def modules() -> dict[str, str]:
    """Every module of the package: dotted name -> file."""
    out = {}
    for folder, _, files in os.walk(SRC):
        for file in files:
            if file.endswith(".py"):
                rel = os.path.relpath(os.path.join(folder, file), os.path.dirname(SRC))[:-3].replace(os.sep, ".")
                out[rel[:-len(".__init__")] if rel.endswith(".__init__") else rel] = os.path.join(folder, file)
    return out


def imports(name: str, path: str, known: set[str]) -> set[str]:
    """The package modules a module imports anywhere in its text (at the top or inside a function)."""
    package = name if path.endswith("__init__.py") else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(open(path).read())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] == "epdiff")
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                parent = ".".join(parts[:len(parts) - node.level + 1])
                base = f"{parent}.{base}" if base else parent
            if not base.startswith("epdiff"):
                continue
            for alias in node.names:  # `from pkg import module` imports the module
                found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base)
    return found & known


def import_graph() -> dict[str, set[str]]:
    mods = modules()
    return {name: imports(name, path, set(mods)) - {name} for name, path in mods.items()}


def test_generic_code_imports_nothing_of_a_family():
    family = "epdiff.models.hunyuan_image3"
    generic = [m for m in import_graph() if m.startswith(("epdiff.engine", "epdiff.serve", "epdiff.cli",
                                                          "epdiff.train", "epdiff.moe", "epdiff.layers",
                                                          "epdiff.quantization", "epdiff.sampling", "epdiff.loader",
                                                          "epdiff.distributed", "epdiff.kernels", "epdiff.config",
                                                          "epdiff.models.base", "epdiff.models.registry"))]
    graph = import_graph()
    bad = {m: sorted(d for d in graph[m] if d.startswith(family)) for m in generic}
    assert not {m: d for m, d in bad.items() if d}, bad
    assert "epdiff.models.registry" in graph["epdiff.engine.params"]  # the engine finds families through it


def test_no_import_cycle():
    graph = import_graph()
    index, low, stack, on_stack, cycles = {}, {}, [], set(), []

    def visit(v):  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    assert not cycles, cycles


def test_layers_and_moe_never_ask_which_quantization_is_active():
    pattern = re.compile(r"fp8|float8|Fp8|quant_config is|isinstance\([^)]*Quant")
    for folder in ("layers", "moe"):
        for file in os.listdir(os.path.join(SRC, folder)):
            if file.endswith(".py"):
                text = open(os.path.join(SRC, folder, file)).read()
                assert not pattern.search(text), f"{folder}/{file}: {pattern.search(text)[0]!r}"


# -- the model-family seam ----------------------------------------------------------------------------


def test_an_unknown_architecture_is_refused_naming_the_field_and_the_families(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["FluxForImages"]}))
    with pytest.raises(ConfigError, match=r"config\.json: architectures \['FluxForImages'\] is not a model epdiff "
                                          r"runs; it runs hunyuan_image3 \(HunyuanImage3ForCausalMM\)"):
        EngineConfig(model=str(tmp_path)).resolve()
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline"}))
    with pytest.raises(ConfigError, match=r"model_index\.json: _class_name 'FluxPipeline' is not a model"):
        registry.family_for_folder(str(tmp_path))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ConfigError, match="no config.json or model_index.json"):
        registry.family_for_folder(str(empty))


@pytest.fixture
def toy(monkeypatch, tmp_path):
    """The toy family registered (one entry), and a folder of it."""
    monkeypatch.setattr(registry, "FAMILIES", registry.FAMILIES + (ENTRY,))
    registry.model_info.cache_clear()
    yield write_toy_model(tmp_path / "toy")
    registry.model_info.cache_clear()


def test_a_second_family_runs_through_the_engine_unchanged(toy):
    """The engine's loop (CFG combine, sampler, non-finite tracking, decode) around another family's
    model call, against that loop written out by hand."""
    with ImageGenerator(toy, max_batch_size=2) as generator:
        outs = generator.generate_outputs(["a red dot", "two blue squares"], seed=4, num_images_per_prompt=2)
        no_guidance = generator.generate_outputs("a red dot", guidance_scale=1.0, num_inference_steps=2, seed=9)[0]
        stats = generator.routing_stats()
    for out, prompt in zip(outs, ["a red dot", "two blue squares"]):
        assert (out.params.num_inference_steps, out.params.guidance_scale, out.params.height) == (3, 2.0, 32)
        for image in out.images:
            torch.testing.assert_close(image.latents, expected_latents(prompt, image.seed, 3, 2.0), rtol=1e-5,
                                       atol=1e-6)
            assert image.pixels.shape == (32, 32, 3)
    torch.testing.assert_close(no_guidance.images[0].latents, expected_latents("a red dot", 9, 2, 1.0))
    assert stats[0]["layers"] == [0] and sum(stats[0]["tokens_per_expert"][0]) > 0
    with pytest.raises(epdiff.engine.RequestError, match="size 30x32 is not a multiple of 8"):
        SamplingParams("x", height=30, width=32).resolve(EngineConfig(model=toy))
    with pytest.raises(ConfigError, match="the toy model runs no TP or SP"):
        EngineConfig(model=toy, parallel=ParallelConfig(tensor_parallel_size=2)).resolve()


def test_the_server_describes_the_family(toy):
    from fastapi.testclient import TestClient

    from epdiff.serve.app import create_app
    from epdiff.serve.service import EngineService

    service = EngineService(EngineConfig(model=toy).resolve(), max_waiting=4)
    with TestClient(create_app(service)) as client:
        model = client.get("/v1/models").json()["data"][0]
    assert (model["id"], model["family"], model["image_sizes"]) == ("toy", "toy", ["32x32"])


# -- the quantization seam ------------------------------------------------------------------------------


class Float16LinearMethod(LinearMethod):
    """A scheme the house does not have: linear weights stored in float16."""

    def create_weights(self, layer, out_features, in_features, dtype, device):
        layer.weight = new_parameter((out_features, in_features), torch.float16, device, requires_grad=False)

    def load_weight(self, layer, value, name):
        copy_checked(layer.weight, value.to(torch.float16), name)

    def apply(self, layer, x, bias=None):
        return nn.functional.linear(x, layer.weight.to(x.dtype), bias)


@dataclasses.dataclass(frozen=True)
class Float16Config(QuantizationConfig):
    name = "float16-weights"

    def linear_method(self, row_parallel):
        return Float16LinearMethod()

    def experts_method(self):
        return UnquantizedExpertsMethod()

    def checkpoint_config(self):
        return {"quant_method": self.name}

    @classmethod
    def from_checkpoint_config(cls, qc, where):
        return cls()

    def quantize_stored_weight(self, w):
        return {"": w.to(torch.float16)}


@torch.inference_mode()
def test_a_new_quantization_scheme_needs_no_change_to_the_layers():
    w, common = make_weights(4, "random", True, 1)
    x = make_tokens(4, [9], "random", common)
    single = ParallelState.single()
    plain = build_layer(single, w, shared=True)
    half = MoELayer(SMALL.hidden, SMALL.experts, SMALL.top_k, SMALL.inter, single,
                    shared_intermediate_size=SMALL.shared_inter, expert_kernel="loop", quant_config=Float16Config())
    half.load_state_dict(plain.state_dict())  # the same names: the float16 weights take a cast copy
    for name in ("up_gate_proj", "down_proj"):  # and through the method
        getattr(half.shared_expert, name).set_weight(w[f"shared_expert.{name}"])
    assert half.shared_expert.up_gate_proj.weight.dtype == torch.float16
    torch.testing.assert_close(half(x), plain(x), rtol=2e-3, atol=2e-3)
    linear = ColumnParallelLinear(8, 6, single.tp, quant_config=Float16Config())
    assert isinstance(linear.quant_method, Float16LinearMethod) and linear.weight.dtype == torch.float16


# -- the dispatch seam ----------------------------------------------------------------------------------


def test_every_registered_backend_is_a_dispatcher_and_the_layout_knows_them():
    for name in DISPATCH_BACKENDS:
        cls = dispatcher_class(name)
        assert issubclass(cls, Dispatcher) and cls.__abstractmethods__ == frozenset()
        assert ParallelConfig(all2all_backend=name).all2all_backend == name
    with pytest.raises(ConfigError, match=f"unknown all2all_backend 'deepep'; choose one of "
                                          f"{', '.join(DISPATCH_BACKENDS)}"):
        ParallelConfig(all2all_backend="deepep")


def test_token_counts_are_exchanged_once_per_layout():
    counts = TokenCounts(Group("token", [0], 0, None))
    assert counts.get(5, "cpu") == [5] and counts.get(5, "cpu") == [5]
    with pytest.raises(ValueError, match="7 tokens in this forward but 5 in the one before it"):
        counts.get(7, "cpu")
    counts.reset()
    assert counts.get(7, "cpu") == [7]


@torch.inference_mode()
def test_the_router_may_score_inputs_of_its_own():
    """A model may route on something else than the hidden states (Nucleus-Image routes on
    [timestep embedding, unmodulated state]): the experts still compute on the hidden states."""
    w, common = make_weights(5, "random", False, 1)
    x = make_tokens(5, [11], "random", common)
    single = ParallelState.single()
    plain = build_layer(single, w, shared=False)
    routed = MoELayer(SMALL.hidden, SMALL.experts, SMALL.top_k, SMALL.inter, single, expert_kernel="loop",
                      router_input_size=2 * SMALL.hidden)
    routed.experts.load_state_dict(plain.experts.state_dict())
    extra = torch.randn(SMALL.experts, SMALL.hidden)
    copy_checked(routed.gate.weight, torch.cat([extra, plain.gate.weight], dim=1))
    # Zeros in the first half: the router's scores are the plain router's, so is the output.
    torch.testing.assert_close(routed(x, router_input=torch.cat([torch.zeros_like(x), x], -1)), plain(x))
    other = routed(x, router_input=torch.cat([x, x], -1))
    assert not torch.allclose(other, plain(x))


@pytest.mark.parametrize("quantization", [None, "fp8"])
@torch.inference_mode()
def test_experts_stored_as_separate_up_and_gate_load_like_the_fused_weight(quantization):
    w, common = make_weights(6, "random", False, 1)
    x = make_tokens(6, [13], "random", common)
    single = ParallelState.single()
    quant = get_quantization_config(quantization)
    fused = MoELayer(SMALL.hidden, SMALL.experts, SMALL.top_k, SMALL.inter, single, expert_kernel="loop",
                     quant_config=quant)
    apart = MoELayer(SMALL.hidden, SMALL.experts, SMALL.top_k, SMALL.inter, single, expert_kernel="loop",
                     quant_config=quant)
    for layer in (fused, apart):
        copy_checked(layer.gate.weight, w["gate.weight"])
    for e in range(SMALL.experts):
        up, gate = w[f"experts.{e}.up_gate_proj"].chunk(2)
        fused.load_expert_weight(e, "up_gate_proj", w[f"experts.{e}.up_gate_proj"])
        apart.load_expert_weight(e, "gate_proj", gate)  # either half first
        apart.load_expert_weight(e, "up_proj", up)
        for layer in (fused, apart):
            layer.load_expert_weight(e, "down_proj", w[f"experts.{e}.down_proj"])
    assert all(torch.equal(a, b) for a, b in zip(fused.state_dict().values(), apart.state_dict().values()))
    assert not apart._pending_halves
    if quantization is None:
        torch.testing.assert_close(apart(x).double(), reference_moe(x, w, shared=False)[0], rtol=1e-4, atol=1e-5)


# -- one home for each option -----------------------------------------------------------------------------


def test_flags_and_python_options_come_from_the_config_dataclasses():
    parser = build_parser()
    generate = parser._subparsers._group_actions[0].choices["generate"]
    flags = {a.dest: a for a in generate._actions}
    for cls in (ParallelConfig, EngineConfig):
        for f in dataclasses.fields(cls):
            if f.name != "parallel":
                assert flags[f.name].default == f.default, f.name
                assert flags[f.name].choices == f.metadata.get("choices"), f.name
    config = EngineConfig.from_options(model="m", tensor_parallel_size=2, quantization="fp8")
    assert config.parallel.tensor_parallel_size == 2 and config.quantization == "fp8"
    assert EngineConfig.from_options(**config.as_options()) == config
    with pytest.raises(TypeError, match="unexpected keyword argument 'tensor_paralel_size'; the options are "):
        ImageGenerator(tensor_paralel_size=2)


def test_make_tiny_is_the_familys_tool(tmp_path, capsys):
    out = str(tmp_path / "tiny")
    assert main(["make-tiny", out, "--hidden-size", "64", "--num-hidden-layers", "1", "--num-attention-heads", "4",
                 "--num-key-value-heads", "2", "--num-experts", "4", "--moe-intermediate-size", "32",
                 "--image-base-size", "128", "--patch-embed-hidden-dim", "32", "--config-only"]) == 0
    assert "wrote a tiny HunyuanImage-3.0 checkpoint" in capsys.readouterr().out
    info = registry.family_for_folder(out).read(out)
    assert (info.config.hidden_size, info.config.num_hidden_layers, info.config.num_experts) == (64, 1, 4)
    with pytest.raises(SystemExit):
        main(["make-tiny", out, "--family", "flux"])
