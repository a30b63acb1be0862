"""A causal LM run one decoder layer at a time, the way GPTQ-style quantizers process a block at a time.

The model's class is built with its parameters on the meta device (buffers real); only the modules
outside the decoder layers (embeddings, final norm, head) are loaded. Each decoder layer is replaced
by a proxy, so the model's own forward (masks, positions, norm, head, `generate` with its cache) still
runs; a proxy either materialises its layer (weights read from the checkpoint, deltas put in as
`inject.apply_deltas` does) for the one call, or records the arguments the model passes it, or hands
back hidden states computed elsewhere. `run` takes the other path: layer by layer over cached hidden
states, each layer materialised once for every batch. Peak memory: the resident modules, one layer,
and the hidden states, all on the runner's device (a decoder layer's weights cross to it in their stored dtype).
"""

from __future__ import annotations

import copy
import itertools
import threading
import weakref
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from accelerate import init_empty_weights
from safetensors import safe_open
from torch import nn
from transformers import AutoModelForCausalLM

from .errors import CheckpointError
from .experts import interface, outputs
from .groups import LAYER_LISTS
from .inject import apply_deltas, off_text_path, runs_split, set_submodule, target_parameter, tied
from .names import Target, TensorTargets
from .parts import TensorDelta
from .screening import head_input
from .tensorfile import SafetensorsWriter, header_reserve

Hidden = list[torch.Tensor]  # hidden states, one tensor per batch


def batches(input_ids: torch.Tensor, attention_mask: torch.Tensor, size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Consecutive batches of `size` rows, each without the leading columns that are padding in all its rows
    (left padding to the longest prompt of the whole set): every runner of a calibration set batches it so."""
    for s in range(0, input_ids.shape[0], size):
        ids, mask = input_ids[s : s + size], attention_mask[s : s + size]
        first = int(mask.any(0).int().argmax())  # the first column holding a token
        yield ids[:, first:], mask[:, first:]


def output_name(model: nn.Module) -> str | None:
    """The name of `model`'s output embeddings module (None without one)."""
    head = model.get_output_embeddings()
    return next((n for n, m in model.named_modules() if m is head), None) if head is not None else None


class Layerwise:
    """`hf_config`'s model in `dtype` on `device` with weights `weights(name)` (a checkpoint tensor by name, any
    float dtype) for checkpoint tensors `names`, those of decoder layers read by `layer_weights` (default:
    `weights`) every time a layer is materialised; decoder layer ``i`` gets ``layer_deltas(i)`` (an
    attribute: none by default) put in (`execution`, swappable) whenever it is. Resident deltas go in with
    `set_resident`. Token ids and masks may be anywhere; hidden states, logits and head inputs are on `device`."""

    def __init__(self, hf_config, dtype: torch.dtype, names: list[str], weights: Callable[[str], torch.Tensor],
                 layer_weights: Callable[[str], torch.Tensor] | None = None, execution: str = "merged", batch_size: int = 8,
                 device: torch.device | str = "cpu"):
        with init_empty_weights(include_buffers=False):
            model = AutoModelForCausalLM.from_config(hf_config, dtype=dtype)
        model.eval()
        self.device = torch.device(device)
        for module in model.modules():  # the buffers are real (rotary frequencies): the parameters come in `_load`
            module._buffers.update({n: b.to(self.device) for n, b in module._buffers.items() if b is not None})
        self.targets = TensorTargets(model)
        self.dtype, self.execution, self.batch_size = dtype, execution, batch_size
        self.weights, self.layer_weights = weights, layer_weights or weights
        self.layer_deltas: Callable[[int], dict[str, TensorDelta]] = lambda i: {}
        self.prefix, layers = _decoder_layers(model)
        self.meta_layers = list(layers)
        aliases: dict[int, list[str]] = {}
        for pname, param in model.named_parameters(remove_duplicate=False):
            aliases.setdefault(id(param), []).append(pname)
        self.aliases = {p: names_ for names_ in aliases.values() for p in names_}
        self.by_layer: dict[int | None, list[str]] = {}
        self.target_of: dict[str, Target] = {}
        self.expert_inputs: dict[str, tuple[str, int]] = {}  # an expert matrix's: ("in" or "down", its expert); `split_modules`
        for name in names:
            try:
                self.target_of[name] = target_parameter(name, names, model, self.targets)
            except CheckpointError:
                continue  # a saved buffer: transformers computes it
            self.by_layer.setdefault(self.index_of(self.target_of[name].parameter), []).append(name)
        set_submodule(model, self.prefix, nn.ModuleList(_Proxy(self, i) for i in range(len(layers))))
        self.model = model
        self._load(model, None)
        self._hooked_head: nn.Module | None = None
        self._contiguous_head_input()
        self.mode, self._calls, self._inject, self._arity = "stream", None, None, None

    # -- structure -----------------------------------------------------------------------------
    def index_of(self, name: str) -> int | None:
        """The decoder layer a parameter or module name lies in (None: resident)."""
        head = self.prefix + "."
        if not name.startswith(head):
            return None
        return int(name[len(head) :].split(".", 1)[0])

    def split_modules(self, names: list[str], transposed: frozenset[str] = frozenset()) -> tuple[dict[str, str], dict[str, str]]:
        """Of checkpoint tensors `names`, those the guard anneals (none `off_text_path`): each one's module (a
        `DecomposedModule`, swappable; or a mixture's experts module, whose matrix of one expert the delta is: merged into
        a layer's fresh weights, its inputs `expert_inputs`), and the module whose inputs weigh it (a tied head's, for the
        embedding it shares). `transposed`: the names whose canonical matrix is the stored one's transpose."""
        modules = dict(self.model.named_modules())
        for i, layer in enumerate(self.meta_layers):
            modules.update({f"{self.prefix}.{i}.{n}".rstrip("."): m for n, m in layer.named_modules()})
        module_names, unseen = {}, off_text_path(self.model)
        for name in names:
            target = self.target_of[name]
            owner, _, attr = target.parameter.rpartition(".")
            if owner in unseen:
                continue
            if runs_split(target, modules[owner]):
                module_names[name] = owner
            elif (experts := interface(modules[owner])) is not None and (out := outputs(experts, attr, target, name in transposed)) is not None:
                module_names[name] = owner
                self.expert_inputs[name] = ("down" if attr == "down_proj" else "in", out.expert)
        gram_names = dict(module_names)
        if (head_name := output_name(self.model)) is not None and tied(self.model):
            gram_names.update({n: head_name for n, m in module_names.items() if modules[m] is self.model.get_input_embeddings()})
        return module_names, gram_names

    def set_resident(self, deltas: dict[str, TensorDelta]) -> None:
        """Put the deltas of resident tensors into the model (changed matrices swappable)."""
        apply_deltas(self.model, deltas, self.execution, swappable=True, targets=self.targets)
        self._contiguous_head_input()  # a changed head is a new module

    def _contiguous_head_input(self) -> None:
        """Hand the head a contiguous input. The model slices its final hidden states to the kept positions
        (``logits_to_keep``); on that strided input `F.linear` goes through a batched matmul that copies the
        head's weight once per prompt in bfloat16 (0.5B: +1.16 GiB and 2.6 s against 0.025 GiB and 0.07 s for
        8 x 33 positions; float32 results bit for bit the same). Every runner of the guard, the reference's
        included, computes its logits this way."""
        head = self.model.get_output_embeddings()
        if head is not None and head is not self._hooked_head:
            head.register_forward_pre_hook(_contiguous_input)
            self._hooked_head = head

    # -- materialising -------------------------------------------------------------------------
    def _load(self, root: nn.Module, index: int | None) -> None:
        """Read the weights of layer `index` (None: the resident tensors) into `root`, in `dtype`."""
        skip = f"{self.prefix}.{index}." if index is not None else ""
        for name in self.by_layer.get(index, []):
            target = self.target_of[name]
            tensor = (self.weights if index is None else self.layer_weights)(name).to(self.device).to(self.dtype)  # cast on the device
            pname = target.parameter[len(skip) :]
            owner_name, _, attr = pname.rpartition(".")
            owner = root.get_submodule(owner_name)
            param = getattr(owner, attr)
            if target.strides is not None:  # entries of a fused parameter
                if param.device.type == "meta":
                    param = nn.Parameter(torch.zeros(param.shape, dtype=self.dtype, device=self.device), requires_grad=False)
                    owner._parameters[attr] = param
                target.view(param.data).copy_(tensor)
                continue
            param = nn.Parameter(tensor.reshape(param.shape), requires_grad=False)
            for alias in self.aliases.get(target.parameter, [target.parameter]):
                o_name, _, a = alias[len(skip) :].rpartition(".") if alias.startswith(skip) else ("", "", "")
                if a:
                    root.get_submodule(o_name)._parameters[a] = param
        if index is None:
            root.tie_weights()  # a tied head shares the embedding just read
        missing = [n for n, p in root.named_parameters() if p.device.type == "meta"]
        if missing:
            raise CheckpointError(f"no checkpoint tensor holds {missing[0]!r}: the layer-by-layer runner cannot build it")

    def layer(self, index: int, deltas: dict[str, TensorDelta] | None = None) -> nn.Module:
        """Decoder layer `index` with its weights read and `deltas` (default ``layer_deltas(index)``) put in."""
        layer = copy.deepcopy(self.meta_layers[index], {id(self.model.config): self.model.config})
        self._load(layer, index)
        deltas = self.layer_deltas(index) if deltas is None else deltas
        if deltas:
            name = f"{self.prefix}.{index}"
            proxy = self.model.get_submodule(name)
            set_submodule(self.model, name, layer)
            try:
                # a layer lives for one use: merged, its deltas go into its fresh weights in place (split modules would
                # build run-time parts that never run); split, it runs as it will be served
                apply_deltas(self.model, deltas, self.execution, swappable=self.execution != "merged", targets=self.targets)
                layer = self.model.get_submodule(name)
            finally:
                set_submodule(self.model, name, proxy)
        return layer

    # -- running -------------------------------------------------------------------------------
    def capture(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[Hidden, list]:
        """The hidden states entering layer 0 and the arguments the model passes each layer, per batch (`batches`)."""
        hidden, calls = [], []
        self.mode = "capture"
        try:
            for ids, mask in batches(input_ids, attention_mask, self.batch_size):
                self._calls = {}
                self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device), logits_to_keep=1, use_cache=False)
                hidden.append(self._calls[0][0][0])
                calls.append({i: (args[1:], kwargs) for i, (args, kwargs) in self._calls.items()})
        finally:
            self.mode, self._calls = "stream", None
        return hidden, calls

    def run(self, hidden: Hidden, calls: list, start: int) -> Iterator[tuple[int, Hidden]]:
        """Run `hidden` (the inputs of layer `start`, per batch; `calls`: from `capture`) through layers
        start..N-1, each materialised once; yield (i, the inputs of layer i) for i = start+1..N (N: the
        final hidden states)."""
        for i in range(start, len(self.meta_layers)):
            layer = self.layer(i)
            hidden = [_out(layer(h, *calls[b][i][0], **calls[b][i][1])) for b, h in enumerate(hidden)]
            del layer
            yield i + 1, hidden

    def head(self, hidden: Hidden, input_ids: torch.Tensor, attention_mask: torch.Tensor, logits_to_keep: int = 0,
             inputs: bool = False) -> Iterator[torch.Tensor]:
        """The model's logits (`inputs`: its head's inputs, the final norm's outputs), batch by batch, from final
        hidden states (the model's norm and head)."""
        self.mode = "inject"
        try:
            for h, (ids, mask) in zip(hidden, batches(input_ids, attention_mask, self.batch_size)):
                self._inject = h
                kwargs = {"input_ids": ids.to(self.device), "attention_mask": mask.to(self.device), "logits_to_keep": logits_to_keep, "use_cache": False}
                yield head_input(self.model, **kwargs) if inputs else self.model(**kwargs).logits
        finally:
            self.mode, self._inject = "stream", None

    def _as_output(self, hidden: torch.Tensor):
        return (hidden, *(None,) * (self._arity - 1)) if self._arity else hidden

    def in_step(self, jobs: list[Callable[[], object]]) -> list:
        """Run `jobs` (each a forward or `generate` on this model, all making the same layer calls) in lock
        step, one thread each and one at a time, so that each decoder layer is materialised once for every
        call it serves: a generation of n batches reads each layer once per new token, not n times.
        A job that fails or stops short fails them all."""
        step = _Lockstep(self, len(jobs))
        results: list = [None] * len(jobs)
        errors: list[BaseException] = []

        def work(k: int) -> None:
            with step.lock:
                try:
                    results[k] = jobs[k]()
                except BaseException as err:  # noqa: BLE001 - handed to the caller below
                    errors.append(err)
                step.finish()

        self.mode, self._step = "lockstep", step
        try:
            threads = [threading.Thread(target=work, args=(k,), daemon=True) for k in range(len(jobs))]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
        finally:
            self.mode, self._step = "stream", None
            step.close()
        if errors:
            raise errors[0]
        return results

    def _call(self, index: int, args: tuple, kwargs: dict):
        if self.mode == "lockstep":
            return self._step.call(index, args, kwargs)
        if self.mode == "capture":
            self._calls[index] = (args, kwargs)
            if self._arity is None:  # what a layer returns (a tensor, or a tuple, as Falcon's): proxies answer alike
                out = self.layer(index)(*args, **kwargs)
                self._arity = len(out) if isinstance(out, tuple) else 0
            return self._as_output(args[0])
        if self.mode == "inject":
            return self._as_output(self._inject if index == len(self.meta_layers) - 1 else args[0])
        layer = self.layer(index)
        return layer(*args, **kwargs)


class _Lockstep:
    """The rendezvous of `Layerwise.in_step`: every job holds `lock` while it runs; at a layer call it lets
    go and waits for the others; the last to arrive materialises the layer for all."""

    def __init__(self, owner: Layerwise, parties: int):
        self.owner, self.lock = owner, threading.Condition()
        self.barrier = threading.Barrier(parties, action=self._materialise)
        self.index: int | None = None
        self.layer: nn.Module | None = None
        self.failure: BaseException | None = None  # what broke the rendezvous, raised in every job
        self.passed = parties  # jobs holding the lock again after the latest rendezvous

    def finish(self) -> None:
        """A job is done (holding the lock): once every job is back from the latest rendezvous (one just released
        may not have seen it yet: breaking the barrier then failed it, 2 runs in 5), break it, so that a job
        making a further layer call fails instead of waiting forever."""
        self.lock.wait_for(lambda: self.passed >= self.barrier.parties)
        self.barrier.abort()

    def close(self) -> None:
        """Let go of the owner and the last layer materialised: the barrier's action holds this (a reference cycle,
        which would keep both until the garbage collector runs)."""
        self.owner, self.layer = None, None

    def _materialise(self) -> None:
        self.passed = 0
        self.layer = None
        try:
            self.layer = self.owner.layer(self.index)
        except BaseException as err:
            self.failure = err
            raise

    def call(self, index: int, args: tuple, kwargs: dict):
        if self.index is not None and self.index != index and self.barrier.n_waiting:
            raise RuntimeError("jobs run in lock step called different layers")
        self.index = index
        self.lock.release()
        try:
            self.barrier.wait()
        except threading.BrokenBarrierError:
            if self.failure is not None:
                raise self.failure from None
            raise RuntimeError("jobs run in lock step made different numbers of layer calls") from None
        finally:
            self.lock.acquire()
            self.passed += 1
            self.lock.notify_all()
        return self.layer(*args, **kwargs)


class _Proxy(nn.Module):
    """Stands in for decoder layer `index`: the owner decides what a call does (`Layerwise._call`). The owner
    holds the model that holds this, so it is held weakly: a dropped runner is freed at once, with its resident
    weights (a reference cycle waited for the garbage collector: the fine-tune's runner, done after calibration,
    kept its vocabulary-sized embedding through the whole anneal)."""

    def __init__(self, owner: Layerwise, index: int):
        super().__init__()
        object.__setattr__(self, "_owner", weakref.ref(owner))
        self.index = index

    @property
    def owner(self) -> Layerwise:
        return self._owner()

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.owner.meta_layers[self.index], name)  # attention_type and the like

    def forward(self, *args, **kwargs):
        return self.owner._call(self.index, args, kwargs)


def _contiguous_input(module: nn.Module, args: tuple) -> tuple:
    return (args[0].contiguous(), *args[1:])


def _out(output):
    return output[0] if isinstance(output, tuple) else output


def _decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The name and ModuleList of the decoder layers: the ModuleList of the text config's ``num_hidden_layers`` blocks,
    looked for in the model's decoder first (a multimodal model's vision encoder has a layer list of its own)."""
    n = getattr(model.config.get_text_config(), "num_hidden_layers", None)
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    owner = next((name for name, module in model.named_modules() if module is decoder), "")
    for name, module in sorted(model.named_modules(), key=lambda item: not item[0].startswith(owner)):
        if isinstance(module, nn.ModuleList) and len(module) == n and name.rsplit(".", 1)[-1] in LAYER_LISTS:
            return name, module
    raise CheckpointError(f"{type(model).__name__}: no decoder layer list found; annealing runs layer by layer and needs one")


class DeltaStore:
    """Deltas kept on disk, a safetensors file per `put`, read back (whole or by tensor name) on demand."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self._files: dict[str, tuple[Path, dict[str, tuple[tuple[int, ...], bool]]]] = {}
        self._count = itertools.count()

    def __contains__(self, key: str) -> bool:
        return key in self._files

    def put(self, key: str, deltas: dict[str, TensorDelta]) -> None:
        path = self._write({k: v for d in deltas.values() for k, v in d.state().items()})
        self._files[key] = (path, {n: (tuple(d.shape), d.transposed) for n, d in deltas.items()})

    def names(self, key: str) -> list[str]:
        return list(self._files[key][1])

    def put_tensors(self, key: str, tensors: dict[str, torch.Tensor]) -> None:
        """Plain tensors under `key` (read back whole by `get_tensors`)."""
        self._files[key] = (self._write(tensors), {})

    def _write(self, tensors: dict[str, torch.Tensor]) -> Path:
        """A new file of `tensors`, each written from its own memory (`save_file` copies every tensor to bytes first:
        a vocabulary-sized head's factors twice over)."""
        path = self.directory / f"{next(self._count):05d}.safetensors"
        with SafetensorsWriter(path, header_reserve(list(tensors))) as writer:
            for name, tensor in tensors.items():
                writer.add(name, tensor)
        return path

    def get_tensors(self, key: str) -> dict[str, torch.Tensor]:
        with safe_open(self._files[key][0], framework="pt") as handle:
            return {k: handle.get_tensor(k) for k in handle.keys()}

    def get(self, key: str, names: list[str] | None = None) -> dict[str, TensorDelta]:
        path, meta = self._files[key]
        names = list(meta) if names is None else names
        with safe_open(path, framework="pt") as handle:
            stored = _Stored(handle)  # each delta reads the tensors it asks for: not every key scanned for every name
            return {n: TensorDelta.from_state(n, meta[n][0], meta[n][1], stored) for n in names}


class _Stored:
    """An open safetensors file's tensors by key, read when asked for (`get`: None for a key it lacks)."""

    def __init__(self, handle):
        self.handle, self.keys = handle, set(handle.keys())

    def get(self, key: str) -> torch.Tensor | None:
        return self.handle.get_tensor(key) if key in self.keys else None


