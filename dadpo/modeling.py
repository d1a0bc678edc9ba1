"""Finding and loading models: HF hub ids or local folders, tokenizers, dtypes, weights digests.

Every backend loads from the local folder this module resolves, so HF and vLLM read the same
files, and the manifest can record exactly which weights produced the cached numbers.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

from dadpo.errors import DadpoError, first_line

DTYPES = ("auto", "float32", "bfloat16", "float16")
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")


@dataclass(frozen=True)
class ResolvedModel:
    """A model id or path, pinned to a local folder and a revision."""

    name: str  # what the user passed (hub id or path)
    local_path: str  # folder holding config, weights, tokenizer
    revision: str | None  # hub commit hash, when it came from the hub
    from_hub: bool = False

    @property
    def record_name(self) -> str:
        """How the manifest names it: the hub id, or the absolute folder (valid from any cwd)."""
        return self.name if self.from_hub else self.local_path


def resolve_model(name: str, revision: str | None = None, flag: str = "--model") -> ResolvedModel:
    """Map a local folder or an HF hub id to a local folder (downloading it when allowed)."""
    path = Path(name).expanduser()
    if path.exists():
        if not path.is_dir():
            raise DadpoError(f"{flag} {name}: is a file, expected a model folder or a hub id")
        if not (path / "config.json").is_file():
            raise DadpoError(f"{flag} {name}: folder has no config.json, so it is not an HF model")
        return ResolvedModel(name=name, local_path=str(path.resolve()), revision=revision)
    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise DadpoError(f"{flag} {name}: no such folder")
    try:
        from huggingface_hub import snapshot_download

        local = snapshot_download(
            name,
            revision=revision,
            allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.py", "*.tiktoken"],
        )
    except Exception as exc:  # hub errors are many types; the user needs one line
        raise DadpoError(f"{flag} {name}: no such folder, and not loadable from the HF hub ({first_line(exc)})") from None
    # snapshot folders are named by the commit hash: that is the revision we record
    return ResolvedModel(name=name, local_path=local, revision=Path(local).name, from_hub=True)


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "spiece.model")


def refuse_remote_code(model: ResolvedModel, trust_remote_code: bool, flag: str) -> None:
    """Custom model code (config.json auto_map, for a model type transformers does not know)
    runs only with --trust-remote-code. Say so in one line before transformers is asked."""
    if trust_remote_code:
        return
    try:
        config = json.loads((Path(model.local_path) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise DadpoError(f"{flag} {model.name}: unreadable config.json ({first_line(exc)})") from None
    if not isinstance(config, dict):
        raise DadpoError(f"{flag} {model.name}: config.json is not a JSON object")
    if config.get("auto_map"):
        from transformers import CONFIG_MAPPING

        if config.get("model_type") not in CONFIG_MAPPING:
            raise DadpoError(
                f"{flag} {model.name}: the model ships its own code (auto_map in config.json, model type "
                f"{config.get('model_type')!r}); dadpo runs it only if you pass --trust-remote-code"
            )


@contextlib.contextmanager
def _quiet_transformers():
    # Loading prints a "Loading weights" bar per model: noise in logs, and it would break the
    # one-line error rule when a later step fails. Warnings and errors still show.
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def check_model_folder(model: ResolvedModel, trust_remote_code: bool, flag: str) -> None:
    """The cheap checks, before anything heavy is imported: a tokenizer is there, and custom
    code is not about to run without --trust-remote-code."""
    folder = Path(model.local_path)
    if not any((folder / name).is_file() for name in _TOKENIZER_FILES):
        raise DadpoError(f"{flag} {model.name}: no tokenizer in {folder} (expected tokenizer.json or "
                         "tokenizer_config.json next to config.json)")
    refuse_remote_code(model, trust_remote_code, flag)


def load_tokenizer(model: ResolvedModel, trust_remote_code: bool = False, flag: str = "--model"):
    check_model_folder(model, trust_remote_code, flag)
    from transformers import AutoTokenizer

    try:
        with _quiet_transformers():
            tokenizer = AutoTokenizer.from_pretrained(model.local_path, trust_remote_code=trust_remote_code)
    except Exception as exc:
        if "trust_remote_code" in str(exc) or "custom code" in str(exc):
            raise DadpoError(f"{flag} {model.name}: its tokenizer needs custom code from the model folder; "
                             "dadpo runs it only if you pass --trust-remote-code") from None
        raise DadpoError(f"{flag} {model.name}: cannot load its tokenizer ({first_line(exc)})") from None
    if not getattr(tokenizer, "is_fast", False):
        raise DadpoError(f"{flag} {model.name}: dadpo needs a fast (Rust) tokenizer, found a slow one")
    return tokenizer


def generation_eos(model: ResolvedModel) -> tuple[int, ...]:
    """The eos ids of the model's generation_config.json (where generation stops), if it has one."""
    try:
        config = json.loads((Path(model.local_path) / "generation_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return ()
    value = config.get("eos_token_id") if isinstance(config, dict) else None
    values = value if isinstance(value, list) else [] if value is None else [value]
    return tuple(int(v) for v in values if isinstance(v, int))


def model_tokenizer(model: ResolvedModel, flag: str, *, no_chat_template: bool = False,
                    template_kwargs: dict | None = None, template_date: str | None = None,
                    trust_remote_code: bool = False):
    """The model's side of the tokenization rule (dadpo.tokenization.ModelTokenizer)."""
    from dadpo.tokenization import ModelTokenizer

    return ModelTokenizer(load_tokenizer(model, trust_remote_code, flag), f"{flag} {model.name}",
                          chat=not no_chat_template, template_kwargs=dict(template_kwargs or {}),
                          template_date=template_date, generation_eos=generation_eos(model))


def check_dtype(name: str, flag: str = "--dtype") -> None:
    """Validate a dtype name without importing torch (flag errors should come fast)."""
    if name not in DTYPES:
        raise DadpoError(f"{flag} {name}: unknown dtype; choose one of {', '.join(DTYPES)}")


_DEVICE_KINDS = ("cpu", "cuda", "mps", "xpu")


def check_device(name: str | None, flag: str = "--device") -> None:
    """Refuse, up front and in one line, a device torch does not know (`gpu`) or this machine lacks
    (`cuda` without CUDA, `cuda:3` on a two-GPU node). None: the default, cuda if available else cpu."""
    if name is None:
        return
    kind, colon, index = name.partition(":")
    if kind not in _DEVICE_KINDS or (colon and not index.isdigit()):
        raise DadpoError(f"{flag} {name}: unknown device; use cpu, cuda, cuda:N (N the GPU number), mps or xpu")
    if kind == "cpu":
        if index:
            raise DadpoError(f"{flag} {name}: unknown device; use cpu")
        return
    import torch

    backend = getattr(torch, kind, None) if kind != "mps" else getattr(torch.backends, "mps", None)
    available = bool(backend and backend.is_available())
    if not available:
        raise DadpoError(f"{flag} {name}: this machine has no {kind.upper() if kind != 'mps' else 'MPS'} device "
                         "torch can use; use --device cpu (or leave --device out)")
    count = backend.device_count() if hasattr(backend, "device_count") else 1
    if index and int(index) >= count:
        raise DadpoError(f"{flag} {name}: this machine has {count} {kind} device(s), numbered 0..{count - 1}")


def torch_dtype(name: str, flag: str = "--dtype"):
    import torch

    check_dtype(name, flag)
    return "auto" if name == "auto" else getattr(torch, name)


def load_causal_lm(model: ResolvedModel, dtype: str, trust_remote_code: bool = False, flag: str = "--model"):
    """An HF causal LM in eval mode, with dropout off (log-probs must be deterministic)."""
    from transformers import AutoModelForCausalLM

    refuse_remote_code(model, trust_remote_code, flag)
    try:
        with _quiet_transformers():
            lm = AutoModelForCausalLM.from_pretrained(
                model.local_path, dtype=torch_dtype(dtype), trust_remote_code=trust_remote_code
            )
    except DadpoError:
        raise
    except Exception as exc:
        raise DadpoError(f"{flag} {model.name}: cannot load the model ({first_line(exc)})") from None
    return lm.eval()


def config_dtype(model_path: str) -> str:
    """The dtype a checkpoint's config names (float32 if it names none)."""
    config = json.loads((Path(model_path) / "config.json").read_text())
    named = config.get("dtype") or config.get("torch_dtype") or "float32"
    return str(named).replace("torch.", "")


def resolved_dtype(model: ResolvedModel, dtype: str) -> str:
    """The dtype actually used: 'auto' means the config's own dtype."""
    return dtype if dtype != "auto" else config_dtype(model.local_path)


def max_positions(model: ResolvedModel) -> int | None:
    config = json.loads((Path(model.local_path) / "config.json").read_text())
    text_config = config.get("text_config", config)
    return text_config.get("max_position_embeddings")


def weights_digest(model: ResolvedModel) -> str:
    """sha256 over the weight files' names and contents.

    Hub snapshots store each large file as a symlink to a blob named by its own sha256, so
    those cost nothing; other files are hashed once and remembered by (path, size, mtime).
    """
    folder = Path(model.local_path)
    files = sorted(p for p in folder.iterdir() if p.name.endswith(_WEIGHT_SUFFIXES))
    if not files:
        raise DadpoError(f"model {model.name}: no weight files in {folder}")
    outer = hashlib.sha256()
    for file in files:
        outer.update(file.name.encode() + b"\0" + _file_sha256(file).encode() + b"\n")
    return outer.hexdigest()


def _file_sha256(file: Path) -> str:
    target = file.resolve()
    if file.is_symlink() and len(target.name) == 64 and all(c in "0123456789abcdef" for c in target.name):
        return target.name
    stat = target.stat()
    memo_path = Path(os.environ.get("DADPO_CACHE_HOME", Path.home() / ".cache" / "dadpo")) / "digests.json"
    key = f"{target}:{stat.st_size}:{stat.st_mtime_ns}"
    try:
        memo = json.loads(memo_path.read_text())
    except (OSError, ValueError):
        memo = {}
    if key in memo:
        return memo[key]
    from dadpo.atomic import sha256_file, write_json_atomic

    memo[key] = sha256_file(target)
    try:
        write_json_atomic(memo_path, memo)
    except DadpoError:
        pass  # the memo only saves time
    return memo[key]


# ---------------------------------------------------------------- the policy a recipe trains


def load_policy(cfg, model: ResolvedModel, checkpoint: Path | None = None):
    """The causal LM to train (cfg: a LoopConfig), from `model`, or from a checkpoint's weights when
    resuming: dtype, attention implementation, gradient checkpointing, LoRA (peft)."""
    from transformers import AutoModelForCausalLM

    from dadpo.training.run_folder import ADAPTER_DIR, MODEL_DIR

    source = model.local_path
    if checkpoint is not None and not cfg.lora_r:
        source = str(checkpoint / MODEL_DIR)
    kwargs = {"dtype": torch_dtype(cfg.dtype), "trust_remote_code": cfg.trust_remote_code}
    if cfg.attn_implementation:
        kwargs["attn_implementation"] = cfg.attn_implementation
    try:
        with _quiet_transformers():
            lm = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    except Exception as exc:  # transformers raises many types; the user needs one line
        raise DadpoError(f"--model {model.name}: cannot load the model from {source} ({first_line(exc)})") from None
    lm.config.use_cache = False
    if cfg.gradient_checkpointing:
        if not getattr(lm, "supports_gradient_checkpointing", False):
            raise DadpoError(f"--gradient-checkpointing: {model.name} ({type(lm).__name__}) does not support it")
        # non-reentrant: works with frozen inputs (LoRA) and with DDP without extra flags
        lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if not cfg.lora_r:
        return lm
    from peft import LoraConfig, PeftModel, get_peft_model

    if checkpoint is not None:
        return PeftModel.from_pretrained(lm, str(checkpoint / ADAPTER_DIR), is_trainable=True)
    targets = cfg.lora_targets if cfg.lora_targets == "all-linear" else \
        [t.strip() for t in cfg.lora_targets.split(",") if t.strip()]
    config = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha or 2 * cfg.lora_r, lora_dropout=cfg.lora_dropout,
                        target_modules=targets, task_type="CAUSAL_LM")
    try:
        return get_peft_model(lm, config)
    except ValueError as exc:
        raise DadpoError(f"--lora-targets {cfg.lora_targets}: {first_line(exc)}") from None
