"""Placement through Accelerate: substructures on CPU and disk, auto maps, spreading, parallel split."""

import threading

import pytest
import torch
from accelerate import infer_auto_device_map

from hf_decompose import ConfigError, DecomposedConfig, DecomposedModel, decompose, print_device_map
from hf_decompose.parts import DensePart, run_split, set_parallel
from hf_decompose.parts.ops import THREAD_MIN_MACS
from hf_decompose.placement import _hidden_parts, infer_device_map, place, spread, substructures

from .synthetic import save_pair

GEN = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)


pytestmark = pytest.mark.usefixtures("single_thread")  # tiny models gain nothing from threads


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    return save_pair(tmp_path_factory.mktemp("pair"), "llama", scale=2e-2)


def _ids():
    return torch.randint(1, 128, (2, 7), generator=torch.Generator().manual_seed(3))


def _model(pair, mode="criterion"):
    return decompose(pair[1], pair[0], DecomposedConfig(mode=mode, q=0.2), progress=False).set_execution("split")


def test_substructures_on_cpu_and_disk_generate_identically(pair, tmp_path):
    model = _model(pair)
    ids = _ids()
    expected = model.generate(input_ids=ids, **GEN)
    names = sorted(substructures(model))
    kinds = {p.kind for p in substructures(model).values()}
    assert len(names) >= 4 and len(kinds) >= 2, (names, kinds)
    on_disk = names[::2]
    device_map = {"": "cpu", **dict.fromkeys(on_disk, "disk")}
    place(model, device_map, offload_folder=tmp_path / "offload")
    parts = substructures(model)
    assert all(next(parts[n].buffers()).device.type == "meta" for n in on_disk)  # really offloaded
    assert all(next(parts[n].buffers()).device.type == "cpu" for n in names[1::2])
    assert set(on_disk) <= set(model.hf_device_map)
    assert torch.equal(model.generate(input_ids=ids, **GEN), expected)
    table = print_device_map(model)
    assert all(n in table for n in names) and "disk" in table


def test_auto_with_small_max_memory_offloads_and_generates_identically(pair, tmp_path, capsys):
    model = _model(pair, "lossless")
    ids = _ids()
    expected = model.generate(input_ids=ids, **GEN)
    reference = model.set_execution("merged").generate(input_ids=ids, **GEN)
    model.set_execution("split")
    device_map = place(model, "auto", max_memory={"cpu": 60_000}, offload_folder=tmp_path / "offload")
    assert set(device_map.values()) == {"cpu", "disk"}
    assert any(".ops." in n for n in device_map), "substructures are placed by name"
    assert torch.equal(model.generate(input_ids=ids, **GEN), expected)
    assert torch.equal(expected, reference)
    print_device_map(model)
    out = capsys.readouterr().out
    assert "model.layers.1.mlp.down_proj.ops.dense" in out and "disk" in out
    with pytest.raises(ConfigError, match="placed on several devices"):
        model.set_execution("merged")


def test_from_pretrained_with_device_map(pair, tmp_path):
    model = _model(pair)
    ids = _ids()
    expected = model.generate(input_ids=ids, **GEN)
    model.save_pretrained(tmp_path / "artifact")
    loaded = DecomposedModel.from_pretrained(
        tmp_path / "artifact", execution="split", device_map="sequential", max_memory={"cpu": 70_000}, offload_folder=tmp_path / "off"
    )
    assert "disk" in loaded.hf_device_map.values()
    assert torch.equal(loaded.generate(input_ids=ids, **GEN), expected)


def test_resident_module_inside_offloaded_one_is_rejected(pair, tmp_path):
    model = _model(pair)
    name = sorted(substructures(model))[0]
    with pytest.raises(ConfigError, match="offloaded"):
        place(model, {"": "disk", name: "cpu"}, offload_folder=tmp_path)


def test_spread_balances_substructures_over_devices_and_keeps_base_map(pair):
    model = _model(pair, "lossless")
    sizes = {"": 0, "model": 0, "lm_head": 1000, "model.layers.0": 1000, "model.layers.1": 1000}
    base_map = {"model.embed_tokens": 0, "model.layers.0": 0, "model.layers.1": 1, "model.norm": 1, "model.rotary_emb": 1, "lm_head": 1}
    parts = spread(model, base_map, sizes, {0: 10**9, 1: 10**9, "cpu": 10**9})
    assert set(parts) == set(substructures(model))
    assert set(parts.values()) == {0, 1}
    nbytes = {n: sum(b.numel() * b.element_size() for b in p.buffers()) for n, p in substructures(model).items()}
    load = {d: sum(nbytes[n] for n, dd in parts.items() if dd == d) for d in (0, 1)}
    assert max(load.values()) < 2 * min(load.values())
    tight = spread(model, base_map, sizes, {0: 2000, 1: 2000, "cpu": 10**9})  # no GPU room: CPU offload
    assert set(tight.values()) == {"cpu"}
    offloaded = spread(model, {**base_map, "model.layers.1": "disk"}, sizes, {0: 10**9, 1: 10**9, "cpu": 10**9})
    assert not any(n.startswith("model.layers.1.") for n in offloaded)  # they stay with their offloaded layer


def test_string_map_keeps_base_layers_where_accelerate_puts_them(pair):
    model = _model(pair, "lossless")
    budget = {0: 60_000, 1: 60_000, 2: 200_000, "cpu": 10**9}  # pretend GPUs: nothing runs on them here
    device_map = infer_device_map(model, "sequential", budget)
    with _hidden_parts(model):
        base_only = infer_auto_device_map(model, max_memory=budget, no_split_module_classes=model._no_split_modules)
    assert {n: d for n, d in device_map.items() if ".ops." not in n} == base_only
    part_devices = {device_map[n] for n in substructures(model)}
    assert part_devices <= {0, 1, 2} and len(part_devices) >= 2
    assert len(set(base_only.values())) >= 2


def test_parallel_modes_give_identical_outputs(pair):
    model = _model(pair, "lossless")
    module = model.model.layers[0].mlp.up_proj
    x = torch.randn(3, 5, module.base.in_features)
    threads: list[str] = []
    module.ops.parts()[0].register_forward_hook(lambda *_: threads.append(threading.current_thread().name))
    outputs = [run_split(module.base, module.ops.parts(), x, parallel=mode) for mode in ("off", "threads", "auto")]
    assert all(torch.equal(outputs[0], o) for o in outputs[1:])
    assert threads[1].startswith("hf_decompose") and threads[0] == threading.current_thread().name
    set_parallel(model, "threads")
    assert module.parallel == "threads"
    with pytest.raises(ValueError):
        set_parallel(model, "fast")


def test_auto_keeps_an_embeddings_lookup_on_the_calling_thread():
    """A lookup gathers a row per id: "auto" never hands it to the thread pool, however large the matrix (a thread's own
    OpenMP team then spins beside the next kernels)."""
    base = torch.nn.Embedding(4096, 4096)
    part = DensePart(torch.randn(4096, 4096) * 1e-3).runtime(base.weight, lambda: None, lookup=True)
    assert part.cost() >= THREAD_MIN_MACS
    threads: list[str] = []
    part.register_forward_hook(lambda *_: threads.append(threading.current_thread().name))
    ids = torch.tensor([[3, 7]])
    out = run_split(base, [part], ids, lookup=True, parallel="auto")
    torch.testing.assert_close(out, base(ids) + part.weight[ids])
    assert threads == [threading.current_thread().name]
