"""Scoring backends behind one interface (dadpo.scoring.base.Scorer): hf (dadpo.scoring.hf), vllm (an
offline engine) and server (an OpenAI-compatible vLLM server). Backends never tokenize: they get
token ids made by dadpo.tokenization."""

from __future__ import annotations

from importlib import metadata

from dadpo.errors import DadpoError

BACKENDS = ("auto", "hf", "vllm")


def pick_backend(backend: str) -> str:
    """auto means vllm whenever it imports, else hf."""
    from dadpo.engine import vllm_available

    if backend not in BACKENDS:
        raise DadpoError(f"--backend {backend}: unknown backend; choose one of {', '.join(BACKENDS)}")
    if backend == "auto":
        return "vllm" if vllm_available() else "hf"
    if backend == "vllm" and not vllm_available():
        raise DadpoError("--backend vllm: vLLM is not installed (see the README's install commands)")
    return backend


def backend_version(backend: str) -> str:
    """The engine's version, known without starting it (recorded in manifests)."""
    if backend == "vllm":
        from dadpo.engine import vllm_version

        return vllm_version()
    return f"transformers {metadata.version('transformers')}, torch {metadata.version('torch')}"


def make_scorer(job, side):
    """The scorer a cache pass uses for `side` (dadpo.cache.passes.Side): its server, or the model
    loaded by job.backend."""
    from dadpo.modeling import ResolvedModel
    from dadpo.tokenization import pad_id_of

    if side.url:
        from dadpo.scoring.server import ServerScorer

        return ServerScorer(side.url, **job.server)
    resolved = ResolvedModel(side.name, side.local_path, side.revision)
    if job.backend == "hf":
        from dadpo.scoring.hf import HFScorer

        tokenizer = side.tokenizer(job.trust_remote_code).tokenizer
        return HFScorer(resolved, side.record["dtype"], job.engine, pad_id_of(tokenizer), job.trust_remote_code)
    from dadpo.scoring.vllm import VLLMScorer

    # vLLM must leave room for one generated token
    max_model_len = job.engine.max_model_len or (job.max_length + 1 if job.max_length else None)
    return VLLMScorer(resolved, side.record["dtype"], job.engine, job.trust_remote_code, max_model_len=max_model_len)
