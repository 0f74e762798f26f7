"""Record a PyTorch model's layer outputs as activation files (``workload_sdk.activations``).

::

    writer = ActivationWriter(Path("/embassy/activations"), session_id)
    with record_layers(model, ["model.layers.3.mlp", "model.layers.7"], writer):
        model(**inputs)              # each named module's output becomes one .act file

Each forward of a named module writes ``output.detach().to("cpu").float().numpy()`` as
float32: of the first element when the module returns a tuple or list (as attention blocks do),
of the first value when it returns a mapping (a Hugging Face ``ModelOutput``, which a
``transformers`` encoder or whole model returns: its ``last_hidden_state``). The hooks are
removed when the block ends, however it ends.

Torch is never imported: the model and its modules are typed by the few methods used
(``get_submodule``, ``register_forward_hook``, the handle's ``remove``), so the SDK installs
and type-checks without torch, and the tests run on a duck-typed fake.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterator, Mapping
from contextlib import contextmanager
from typing import Any, Protocol

from workload_sdk.activations import ActivationWriteError, ActivationWriter, check_name


class HookHandle(Protocol):
    """``torch.utils.hooks.RemovableHandle``."""

    def remove(self) -> None: ...


class HookableModule(Protocol):
    """A ``torch.nn.Module``, as far as a forward hook needs it."""

    def register_forward_hook(self, hook: Callable[[Any, Any, Any], Any]) -> HookHandle: ...


class Model(Protocol):
    """A ``torch.nn.Module`` whose submodules are found by dotted name."""

    def get_submodule(self, target: str) -> HookableModule: ...


def _to_numpy(output: Any) -> Any:
    # A ModelOutput is an ordered dict of its non-None fields, the hidden states first; it is
    # not a tuple, so without this an encoder's hook would fail on .detach() mid-forward.
    if isinstance(output, Mapping):
        output = tuple(output.values())
    if isinstance(output, tuple | list):
        if not output:
            raise ActivationWriteError("bad-array", "the module returned no tensor to write")
        output = output[0]
    return output.detach().to("cpu").float().numpy()


def _hook_for(name: str, writer: ActivationWriter) -> Callable[[Any, Any, Any], None]:
    def hook(_module: Any, _inputs: Any, output: Any) -> None:
        # Returning None leaves the module's output untouched.
        writer.write(name, _to_numpy(output))

    return hook


@contextmanager
def record_layers(model: Model, names: Collection[str], writer: ActivationWriter) -> Iterator[None]:
    """Write the outputs of ``model``'s submodules ``names`` through ``writer`` while open.

    Every name is checked and resolved before any hook is registered, so a typo (an
    :class:`~workload_sdk.activations.ActivationWriteError` for an invalid name, an
    ``AttributeError`` naming it for a missing module) leaves the model untouched.
    """
    ordered = list(dict.fromkeys(names))
    for name in ordered:
        check_name(name)
    modules = []
    for name in ordered:
        try:
            modules.append((name, model.get_submodule(name)))
        except AttributeError as exc:
            # torch names only the step that failed ("ModuleList has no attribute `6`").
            raise AttributeError(f"the model has no submodule {name!r}: {exc}") from exc
    handles: list[HookHandle] = []
    try:
        for name, module in modules:
            handles.append(module.register_forward_hook(_hook_for(name, writer)))
        yield
    finally:
        for handle in reversed(handles):
            handle.remove()
