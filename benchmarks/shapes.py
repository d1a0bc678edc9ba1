"""Model shapes the benchmarks build as random-init Qwen2 models, and the FLOPs they cost.

The Qwen2.5 shapes hold the hyperparameters of the released config.json files, so GPU runs build
real-size models; the small ones are for CPU runs (head_dim 64 where vLLM's CPU attention runs them).

FLOPs (the MFU convention of every benchmark here, written down in benchmarks/README.md):

    forward FLOPs = 2 * N_nonembed * tokens_computed              (every weight matmul of the layers)
                  + 4 * layers * q_dim * keys_attended            (QK^T and AV, summed over computed tokens)
    training FLOPs = 3 x forward FLOPs                            (backward = 2 x forward)

N_nonembed counts every parameter but the input embedding and the lm_head (the embedding matrix
itself where tied): the lm_head's matmul is not counted, so MFU is conservative (dadpo runs it at
response positions only; counting it would add 2 * hidden * vocab per response token). A token at
position t of a causal sequence attends to t + 1 keys; with prefix sharing a response token
attends to the prompt and its own response only, and the shared prompt is computed (and counted)
once. These are the FLOPs a step needs, not those an implementation spends (recomputation, such
as gradient checkpointing or the lm_head chunks redone in backward, is not counted).
"""

from __future__ import annotations

QWEN25_SHAPES = {
    "qwen2.5-0.5b": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                         num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
    "qwen2.5-1.5b": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                         num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
    "qwen2.5-3b": dict(hidden_size=2048, intermediate_size=11008, num_hidden_layers=36, num_attention_heads=16,
                       num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
    "qwen2.5-7b": dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                       num_key_value_heads=4, vocab_size=152064, tie_word_embeddings=False),
}

CPU_SHAPES = {
    # 5.2M parameters: the student of the CPU training benchmarks
    "tiny": dict(hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=8192, tie_word_embeddings=True),
    # 21.3M: a teacher 4x the student
    "tiny-4x": dict(hidden_size=512, intermediate_size=1536, num_hidden_layers=4, num_attention_heads=8,
                    num_key_value_heads=2, vocab_size=9000, tie_word_embeddings=False),
    # 26.5M, head_dim 64: the CPU scoring benchmark (vLLM's CPU attention needs head_dim 64)
    "cpu-26m": dict(hidden_size=512, intermediate_size=1536, num_hidden_layers=6, num_attention_heads=8,
                    num_key_value_heads=2, vocab_size=16384, tie_word_embeddings=True),
    # 0.2M, head_dim 64: the quick modes (seconds per run)
    "micro": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=1,
                  num_key_value_heads=1, vocab_size=512, tie_word_embeddings=True),
}

SHAPES = {**CPU_SHAPES, **QWEN25_SHAPES}

# Dense bf16 tensor-core peaks, FLOP/s (no sparsity).
GPU_PEAKS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}


def qwen2_config(shape: str, **extra):
    """A transformers Qwen2Config of `shape` (random init is the caller's)."""
    from transformers import Qwen2Config

    settings = dict(max_position_embeddings=32768, rope_theta=1_000_000.0, rms_norm_eps=1e-6, use_cache=False,
                    bos_token_id=0, eos_token_id=1, pad_token_id=0)
    settings.update(extra)
    config = Qwen2Config(**SHAPES[shape], **settings)
    config.architectures = ["Qwen2ForCausalLM"]
    return config


def build_model(shape: str, dtype, device, seed: int):
    """A random-init Qwen2 of `shape`, built in place in its dtype (a 7B model never exists in fp32)."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    with torch.device(device):
        return AutoModelForCausalLM.from_config(qwen2_config(shape), dtype=dtype)


def save_model(shape: str, dtype: str, folder, seed: int, device: str = "cpu"):
    """A random-init Qwen2 folder (config + safetensors), reused when already there. Returns the folder."""
    from pathlib import Path

    import torch

    folder = Path(folder)
    if (folder / "config.json").exists():
        return folder
    from transformers.utils import logging

    logging.disable_progress_bar()  # save_pretrained's per-shard bar
    model = build_model(shape, getattr(torch, dtype), device, seed)
    model.config.dtype = dtype
    tmp = folder.with_name(folder.name + ".tmp")
    model.save_pretrained(tmp, safe_serialization=True)
    tmp.rename(folder)
    return folder


def nonembedding_params(shape: str) -> int:
    """Parameters of every layer but the input embedding and the lm_head (Qwen2: q/k/v biases)."""
    s = SHAPES[shape]
    hidden, layers = s["hidden_size"], s["num_hidden_layers"]
    head_dim = hidden // s["num_attention_heads"]
    q_dim, kv_dim = s["num_attention_heads"] * head_dim, s["num_key_value_heads"] * head_dim
    attention = hidden * q_dim + q_dim + 2 * (hidden * kv_dim + kv_dim) + q_dim * hidden
    mlp = 3 * hidden * s["intermediate_size"]
    return layers * (attention + mlp + 2 * hidden) + hidden


def forward_flops(shape: str, pairs, shared: bool) -> float:
    """FLOPs of one forward pass over `pairs` = [(prompt_len, chosen_len, rejected_len), ...], both
    responses scored; shared: each prompt computed once (prefix sharing), else twice."""
    s = SHAPES[shape]
    hidden, layers = s["hidden_size"], s["num_hidden_layers"]
    q_dim = s["num_attention_heads"] * (hidden // s["num_attention_heads"])
    params = nonembedding_params(shape)
    tokens = keys = 0
    for prompt, chosen, rejected in pairs:
        if shared:
            tokens += prompt + chosen + rejected
            keys += prompt * (prompt + 1) // 2
            keys += sum(n * prompt + n * (n + 1) // 2 for n in (chosen, rejected))
        else:
            tokens += 2 * prompt + chosen + rejected
            keys += sum((prompt + n) * (prompt + n + 1) // 2 for n in (chosen, rejected))
    return 2 * params * tokens + 4 * layers * q_dim * keys


def gpu_peak(override_tflops: float | None = None) -> tuple[str, float | None]:
    """(device name, dense bf16 peak FLOP/s or None when unknown) of CUDA device 0."""
    import torch

    name = torch.cuda.get_device_name(0)
    if override_tflops:
        return name, override_tflops * 1e12
    return name, next((peak for key, peak in GPU_PEAKS.items() if key in name), None)


def total_params(shape: str) -> int:
    """Every parameter, tied embeddings once."""
    s = SHAPES[shape]
    embeddings = s["vocab_size"] * s["hidden_size"] * (1 if s["tie_word_embeddings"] else 2)
    return nonembedding_params(shape) + embeddings
