"""Layer-wise onloading (``runtime.offload``): where the decoder layers live between their uses.

- ``none``: the whole model sits on the run's device (the default).
- ``cpu``: the decoder layers stay in host memory; each is moved to the device only while it
  runs a forward, is transformed, or is saved. Everything else (embeddings, final norm, head,
  rotary tables) stays on the device: a forward needs it at both ends.
- ``disk``: as ``cpu``, and a layer off the device holds no memory at all: its parameters are
  meta tensors, read back from a safetensors file when the layer is needed (the dense
  checkpoint at first, the layer's own file once it has been transformed). Embeddings, norm and
  head stay on the device, as under ``cpu``. Peak host memory is then the non-layer weights
  (on a CPU run), one or two layers, and the calibration activations.

Forward hooks bring a layer in for its forward and put it back afterwards, so every forward
the pipeline runs (calibration replay, scoring, evaluation, generation) works unchanged; work
outside a forward (a transform reading the weights, saving) takes ``layer(index)`` explicitly.
The numbers are the same as without offloading: the same tensors meet the same kernels
(bit-identical on the CPU, tested).
"""

from __future__ import annotations

import contextlib
import json
import shutil
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

MODES = ("none", "cpu", "disk")
INDEX = "model.safetensors.index.json"


class WeightFiles:
    """The tensors of a safetensors checkpoint (one file, or shards with an index), read on demand.

    Each read opens the file, copies the tensors asked for out of its mapping and closes it
    again, so nothing of the file stays mapped into the process between reads.
    """

    def __init__(self, folder: Path):
        self.folder = folder
        index = folder / INDEX
        if index.is_file():
            self.where = {name: folder / file for name, file in json.loads(index.read_text())["weight_map"].items()}
        else:
            files = sorted(folder.glob("*.safetensors"))
            if not files:
                raise FileNotFoundError(f"no safetensors weights in '{folder}'")
            self.where = {}
            for file in files:
                with safe_open(str(file), framework="pt") as f:
                    self.where.update({name: file for name in f.keys()})  # noqa: SIM118 (not a dict)

    def read(self, names: list[str], dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """The named tensors, floating ones in ``dtype`` when given, each in memory of its own."""
        by_file: dict[Path, list[str]] = {}
        for name in names:
            if name not in self.where:
                raise KeyError(f"weight '{name}' is not in the checkpoint '{self.folder}'")
            by_file.setdefault(self.where[name], []).append(name)
        out = {}
        for file, wanted in by_file.items():
            with safe_open(str(file), framework="pt") as f:
                for name in wanted:
                    tensor = f.get_tensor(name)  # a view of the file's mapping
                    cast = tensor.to(dtype) if dtype is not None and tensor.is_floating_point() else tensor
                    out[name] = cast.clone() if cast.data_ptr() == tensor.data_ptr() else cast
        return out


def _prefix_of(model: nn.Module, layers: nn.ModuleList) -> str:
    return next(name for name, module in model.named_modules() if module is layers) + "."


def _to_meta(layer: nn.Module) -> None:
    """Drop a layer's weights, keeping its structure (and any non-persistent buffer, which no file holds)."""
    for module in layer.modules():
        for name, param in list(module._parameters.items()):
            if param is not None:
                module._parameters[name] = nn.Parameter(torch.empty_like(param, device="meta"),
                                                        requires_grad=param.requires_grad)
        for name, buffer in list(module._buffers.items()):
            if buffer is not None and name not in module._non_persistent_buffers_set:
                module._buffers[name] = torch.empty_like(buffer, device="meta")


def place_outer(model: nn.Module, layers: nn.ModuleList, device: torch.device) -> None:
    """Move every weight outside the decoder layers to ``device`` (tied tensors stay tied)."""
    inside = {id(t) for t in [*layers.parameters(), *layers.buffers()]}
    moved: dict[int, torch.Tensor] = {}
    for module in model.modules():
        for table in (module._parameters, module._buffers):
            for name, tensor in list(table.items()):
                if tensor is None or id(tensor) in inside or tensor.device == device:
                    continue
                if id(tensor) not in moved:
                    data = tensor.data.to(device)
                    moved[id(tensor)] = (nn.Parameter(data, requires_grad=tensor.requires_grad)
                                         if isinstance(tensor, nn.Parameter) else data)
                table[name] = moved[id(tensor)]


def write_dense(model: nn.Module, layers: nn.ModuleList, folder: Path) -> WeightFiles:
    """A model already in memory (passed to the engine): write its layers' weights, the files
    disk offloading reads back, and drop them from memory."""
    prefix = _prefix_of(model, layers)
    folder.mkdir(parents=True, exist_ok=True)
    state = {name: t.detach().cpu().contiguous() for name, t in model.state_dict().items() if name.startswith(prefix)}
    save_file(state, str(folder / "model.safetensors"))
    del state
    for layer in layers:
        _to_meta(layer)
    return WeightFiles(folder)


class Offloader:
    """Moves decoder layers onto the device while they are used, and off afterwards (see the module doc).

    Layers are counted in and out, so nested uses (a forward inside a transform) keep a layer
    in until the outermost one ends. A layer used with ``changed=True`` is written to its own
    file when it goes out under ``disk``; under ``cpu`` it simply moves back to host memory.
    """

    def __init__(self, model: nn.Module, layers: nn.ModuleList, device: torch.device, mode: str,
                 folder: Path | None = None, source: WeightFiles | None = None):
        if mode not in MODES:
            raise ValueError(f"offload mode must be one of {MODES}, got {mode!r}")
        if mode == "disk" and source is None:
            raise ValueError("disk offloading needs the weight files to read layers from")
        self.model, self.layers, self.device, self.mode = model, layers, device, mode
        self.folder, self.source = folder, source
        self.prefix = _prefix_of(model, layers)
        self.files: dict[int, Path] = {}  # layers written by this run (their transformed weights)
        self.count: Counter[int] = Counter()
        self.changed: set[int] = set()
        self.loads = 0  # layer reads from disk, for the report
        self.bypassed = False
        self.handles: list[torch.utils.hooks.RemovableHandle] = []
        if mode != "none":
            for index, layer in enumerate(layers):
                self.handles.append(layer.register_forward_pre_hook(self._pre_hook(index)))
                self.handles.append(layer.register_forward_hook(self._post_hook(index), always_call=True))

    @property
    def active(self) -> bool:
        return self.mode != "none"

    def _pre_hook(self, index: int):  # type: ignore[no-untyped-def]
        def hook(_module: nn.Module, _args: object) -> None:
            if not self.bypassed:
                self._enter(index)
        return hook

    def _post_hook(self, index: int):  # type: ignore[no-untyped-def]
        def hook(_module: nn.Module, _args: object, _out: object) -> None:
            if not self.bypassed:
                self._exit(index)
        return hook

    @contextlib.contextmanager
    def layer(self, index: int, changed: bool = False) -> Iterator[nn.Module]:
        """Layer ``index`` on the device for the block; ``changed``: its weights are new (write them out)."""
        self._enter(index)
        finished = False
        try:
            yield self.layers[index]
            finished = True
        finally:
            if changed and finished:  # a block that failed leaves nothing worth writing
                self.changed.add(index)
            self._exit(index)

    @contextlib.contextmanager
    def bypass(self) -> Iterator[None]:
        """Forwards that skip the layers' weights (the recorders of ``replay.capture``) load nothing."""
        before, self.bypassed = self.bypassed, True
        try:
            yield
        finally:
            self.bypassed = before

    @contextlib.contextmanager
    def everything(self) -> Iterator[None]:
        """Every layer in at once: a backward pass needs every layer's weights it saved in the forward."""
        with contextlib.ExitStack() as stack:
            for index in range(len(self.layers)):
                stack.enter_context(self.layer(index))
            yield

    def _enter(self, index: int) -> None:
        self.count[index] += 1
        if self.count[index] > 1 or self.mode == "none":
            return
        layer = self.layers[index]
        try:
            if self.mode == "disk":
                self._read(index, layer)
            if self.device.type != "cpu":
                layer.to(self.device)
        except BaseException:
            self.count[index] -= 1
            raise

    def _exit(self, index: int) -> None:
        self.count[index] -= 1
        if self.count[index] > 0 or self.mode == "none":
            return
        layer = self.layers[index]
        if self.mode == "cpu":
            if self.device.type != "cpu":
                layer.to("cpu")
            return
        if index in self.changed:
            self._write(index, layer)
            self.changed.discard(index)
        _to_meta(layer)

    def _read(self, index: int, layer: nn.Module) -> None:
        self.loads += 1
        placeholders = layer.state_dict()
        names = list(placeholders)
        if index in self.files:
            state = WeightFiles(self.files[index]).read(names)
        else:
            full = self.source.read([f"{self.prefix}{index}.{n}" for n in names])  # type: ignore[union-attr]
            state = {n: full[f"{self.prefix}{index}.{n}"] for n in names}
        # each tensor in the dtype the model holds it in (a checkpoint may store another)
        state = {n: t.to(placeholders[n].dtype) for n, t in state.items()}
        layer.load_state_dict(state, strict=True, assign=True)

    def _write(self, index: int, layer: nn.Module) -> None:
        if self.folder is None:
            raise RuntimeError("this offloader only reads (no folder to write a changed layer into)")
        folder = self.folder / "layers" / f"{index:03d}"
        folder.mkdir(parents=True, exist_ok=True)
        tensors = [t for t in layer.state_dict().values() if t.numel()]
        if len({t.data_ptr() for t in tensors}) < len(tensors):  # tied ones would come back untied
            raise NotImplementedError(f"decoder layer {index} ties two of its tensors; disk offloading cannot "
                                      "write it (use runtime.offload: cpu)")
        state = {name: t.detach().cpu().contiguous() for name, t in layer.state_dict().items()}
        tmp = folder / ".layer.tmp"
        save_file(state, str(tmp))
        tmp.replace(folder / "layer.safetensors")
        self.files[index] = folder

    def state_items(self) -> Iterator[tuple[str, torch.Tensor]]:
        """The model's state dict in its usual order, each layer's entries read while that layer is in."""
        current: int | None = None
        stack = contextlib.ExitStack()
        with stack:
            for name, tensor in self.model.state_dict().items():
                index = self._layer_of(name)
                if index != current:
                    stack.close()
                    current = index
                    if index is not None:
                        layer = stack.enter_context(self.layer(index))
                if index is None:
                    yield name, tensor
                else:
                    yield name, layer.state_dict()[name[len(f"{self.prefix}{index}."):]]

    def _layer_of(self, name: str) -> int | None:
        if not name.startswith(self.prefix):
            return None
        return int(name[len(self.prefix):].split(".", 1)[0])

    def save_shards(self, folder: Path, metadata: dict[str, str]) -> int:
        """The model as safetensors shards (the non-layer weights, then one shard per decoder layer)
        with transformers' index file, one layer in memory at a time; returns the bytes written."""
        shards = 1 + len(self.layers)
        weight_map: dict[str, str] = {}
        total = 0

        def write(number: int, state: dict[str, torch.Tensor]) -> None:
            nonlocal total
            file = f"model-{number:05d}-of-{shards:05d}.safetensors"
            save_file(state, str(folder / file), metadata=metadata)
            weight_map.update({name: file for name in state})
            total += (folder / file).stat().st_size

        seen: set[int] = set()
        outer = {}
        for name, tensor in self.model.state_dict().items():
            if self._layer_of(name) is None and tensor.data_ptr() not in seen:  # tied head: written once
                seen.add(tensor.data_ptr())
                outer[name] = tensor.detach().cpu().contiguous()
        write(1, outer)
        for index in range(len(self.layers)):
            with self.layer(index) as layer:
                write(index + 2, {f"{self.prefix}{index}.{n}": t.detach().cpu().contiguous()
                                  for n, t in layer.state_dict().items()})
        (folder / INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map},
                                               indent=2))
        return total

    def reopen(self, saved: Path) -> None:
        """Read the layers from the saved model's shards from now on, and drop the working folder
        (the run's model stays usable after the run)."""
        self.source, self.files = WeightFiles(saved), {}
        self.remove_folder()

    def remove_folder(self) -> None:
        """The working folder: transformed layers, dense layers of a model passed in, spilled activations."""
        if self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)
