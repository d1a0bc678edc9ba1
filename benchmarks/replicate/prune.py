"""Structured pruning of the teacher into a smaller student of the same family.

LLM-Pruner-style width pruning at micro scale. In every layer, the attention heads and the MLP
neurons with the smallest weight norms are removed:
  * heads: round(ratio * heads) of them, scored by the squared norm of everything the head reads
    and writes (its q, k, v rows and o columns);
  * MLP neurons: as many as it takes to bring the removed share of the non-embedding weights to
    `ratio`, scored by the product of their gate, up and down weight norms.
The student keeps the teacher's tokenizer, chat template, embeddings and depth; it is a new HF
model folder with fewer heads per layer and a narrower MLP. The models are Llama-architecture
MistralForCausalLM (sliding window off): transformers' LlamaConfig refuses a head count that does
not divide the hidden size, MistralConfig takes the head size as given.
"""

from __future__ import annotations

import shutil
from pathlib import Path


def non_embedding_parameters(model) -> int:
    return sum(p.numel() for name, p in model.named_parameters() if "embed" not in name and "lm_head" not in name)


def prune(teacher_dir: Path, out_dir: Path, ratio: float) -> dict:
    """Write the pruned student to out_dir; return what was kept and the share of weights removed."""
    import torch
    from transformers import AutoModelForCausalLM

    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float32)
    config = teacher.config
    heads, head_dim, hidden = config.num_attention_heads, config.head_dim, config.hidden_size
    if config.num_key_value_heads != heads:
        raise ValueError("prune() handles multi-head attention only (num_key_value_heads == num_attention_heads)")
    keep_heads = heads - round(ratio * heads)
    teacher_params = non_embedding_parameters(teacher)
    removed_by_heads = config.num_hidden_layers * (heads - keep_heads) * head_dim * hidden * 4  # q, k, v rows; o columns
    per_neuron = config.num_hidden_layers * hidden * 3  # gate row, up row, down column
    keep_neurons = config.intermediate_size - round((ratio * teacher_params - removed_by_heads) / per_neuron)
    if keep_heads < 1 or not 0 < keep_neurons <= config.intermediate_size:
        raise ValueError(f"cannot remove {ratio:.0%} of the weights from this model by heads and MLP neurons")

    state = dict(teacher.state_dict())
    for index, layer in enumerate(teacher.model.layers):
        attention, mlp, prefix = layer.self_attn, layer.mlp, f"model.layers.{index}"
        per_head = lambda weight: weight.view(heads, head_dim, -1).pow(2).sum(dim=(1, 2))  # noqa: E731
        score = (per_head(attention.q_proj.weight) + per_head(attention.k_proj.weight)
                 + per_head(attention.v_proj.weight) + attention.o_proj.weight.view(-1, heads, head_dim).pow(2).sum(dim=(0, 2)))
        kept = score.topk(keep_heads).indices.sort().values
        rows = (kept[:, None] * head_dim + torch.arange(head_dim)).reshape(-1)
        for projection in ("q_proj", "k_proj", "v_proj"):
            state[f"{prefix}.self_attn.{projection}.weight"] = getattr(attention, projection).weight[rows].clone()
        state[f"{prefix}.self_attn.o_proj.weight"] = attention.o_proj.weight[:, rows].clone()
        score = mlp.gate_proj.weight.norm(dim=1) * mlp.up_proj.weight.norm(dim=1) * mlp.down_proj.weight.norm(dim=0)
        neurons = score.topk(keep_neurons).indices.sort().values
        state[f"{prefix}.mlp.gate_proj.weight"] = mlp.gate_proj.weight[neurons].clone()
        state[f"{prefix}.mlp.up_proj.weight"] = mlp.up_proj.weight[neurons].clone()
        state[f"{prefix}.mlp.down_proj.weight"] = mlp.down_proj.weight[:, neurons].clone()

    student_config = config.__class__(**{**config.to_dict(), "num_attention_heads": keep_heads,
                                         "num_key_value_heads": keep_heads, "head_dim": head_dim,
                                         "intermediate_size": keep_neurons})
    student = AutoModelForCausalLM.from_config(student_config, dtype=torch.float32)
    missing, unexpected = student.load_state_dict(state, strict=False)
    if unexpected or missing:
        raise RuntimeError(f"pruned weights do not fit the student: missing {missing}, unexpected {unexpected}")
    student.generation_config = teacher.generation_config
    out_dir = Path(out_dir)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    student.save_pretrained(out_dir, safe_serialization=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"):
        if (Path(teacher_dir) / name).exists():
            shutil.copy(Path(teacher_dir) / name, out_dir / name)
    params = non_embedding_parameters(student)
    return {"heads": keep_heads, "teacher_heads": heads, "intermediate_size": keep_neurons,
            "teacher_intermediate_size": config.intermediate_size, "params": params, "teacher_params": teacher_params,
            "removed": 1 - params / teacher_params}
