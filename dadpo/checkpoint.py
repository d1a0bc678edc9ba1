"""Run folders, checkpoints and --resume, without pickle.

    RUN/checkpoints/step-000200/
        model/                     HF save_pretrained (safetensors) + tokenizer   (full fine-tuning)
        adapter/                   peft save_pretrained (safetensors) + tokenizer (LoRA)
        optimizer.safetensors      every optimizer state tensor, named "<param index>.<key>"
        optimizer.json             param_groups and any non-tensor state
        scheduler.json             the LR scheduler's state_dict (plain numbers)
        rng-rank00000.safetensors  torch CPU/CUDA RNG states of process 0, numpy's MT19937 keys
        rng-rank00000.json         python's random state, numpy's position
        trainer_state.json         step, the run's settings, last metrics; written LAST

A checkpoint is written under step-NNNNNN.partial and renamed when whole, so a crash leaves no
folder that looks complete. Tensors go to safetensors and everything else to JSON: torch.save
(pickle) is never used, so loading a checkpoint cannot run code.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from dadpo.errors import DadpoError

CHECKPOINTS_DIR = "checkpoints"
MODEL_DIR = "model"
ADAPTER_DIR = "adapter"
STATE_FILE = "trainer_state.json"
FORMAT_VERSION = 1


def checkpoint_dir(out: Path, step: int) -> Path:
    return Path(out) / CHECKPOINTS_DIR / f"step-{step:06d}"


def list_checkpoints(out: Path) -> list[Path]:
    """Complete checkpoints of RUN, oldest first."""
    folder = Path(out) / CHECKPOINTS_DIR
    if not folder.is_dir():
        return []
    found = [p for p in folder.glob("step-*") if p.is_dir() and not p.name.endswith(".partial")
             and (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def read_state(checkpoint: Path) -> dict:
    try:
        return json.loads((checkpoint / STATE_FILE).read_text())
    except (OSError, ValueError) as exc:
        raise DadpoError(f"{checkpoint / STATE_FILE}: unreadable ({exc})")


def find_start(out: Path, resume: bool, overwrite: bool, record: dict,
               differences: Callable[[dict, dict], list[str]]) -> Path | None:
    """The checkpoint to continue from (None: a fresh run); refuses what would mix two runs."""
    out = Path(out)
    found = list_checkpoints(out)
    if not resume:
        if found and not overwrite:
            raise DadpoError(f"--out {out}: holds checkpoints of an earlier run (latest {found[-1].name}); pass "
                             "--resume to continue it, or --overwrite to start over")
        return None
    if not found:
        raise DadpoError(f"--resume: {out} has no checkpoint ({out / CHECKPOINTS_DIR}/step-NNNNNN); it was run "
                         "without --save-every or stopped before the first one, so start it again without --resume")
    latest = found[-1]
    state = read_state(latest)
    changed = differences(state["record"], record)
    if changed:
        raise DadpoError(f"--resume: {latest} comes from a run with other settings ({'; '.join(changed)}); resume "
                         "with the original settings, or use another --out")
    if state["step"] > record["total_steps"]:
        raise DadpoError(f"--resume: {latest} is past the run's {record['total_steps']} steps")
    return latest


def prepare_run_folder(out: Path, start: Path | None) -> None:
    """Main process: make RUN, and make it stop looking finished until this run is."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for name in ("summary.json", "eval.json"):  # summary.json first: it is what marks a run finished
        (out / name).unlink(missing_ok=True)
    stale = [MODEL_DIR, ADAPTER_DIR]
    if start is None:  # a fresh run (find_start refused if complete checkpoints were there without --overwrite)
        stale += [CHECKPOINTS_DIR, "tb"]
        for name in ("metrics.jsonl", "eval.jsonl"):
            (out / name).unlink(missing_ok=True)
    for name in stale:
        shutil.rmtree(out / name, ignore_errors=True)


# ---------------------------------------------------------------- saving


def save_model_folder(model, tokenizer, folder: Path, state_dict: dict | None = None) -> None:
    """HF (or peft adapter) save_pretrained in safetensors, plus the tokenizer."""
    model.save_pretrained(folder, state_dict=state_dict, safe_serialization=True)
    tokenizer.save_pretrained(folder)


def _is_peft(model) -> bool:
    return hasattr(model, "peft_config")


def save_checkpoint(accelerator, policy, optimizer, scheduler, tokenizer, out: Path, step: int, state: dict,
                    keep: int | None) -> Path:
    """Write RUN/checkpoints/step-NNNNNN (all processes call this; see the module docstring)."""
    final = checkpoint_dir(out, step)
    partial = final.with_name(final.name + ".partial")
    if accelerator.is_main_process:
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
    accelerator.wait_for_everyone()
    _save_rng(partial, accelerator.process_index)
    if accelerator.is_main_process:
        inner = accelerator.unwrap_model(policy).model
        save_model_folder(inner, tokenizer, partial / (ADAPTER_DIR if _is_peft(inner) else MODEL_DIR))
        _save_optimizer(optimizer, partial)
        (partial / "scheduler.json").write_text(json.dumps(scheduler.state_dict()))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (partial / STATE_FILE).write_text(json.dumps({"format": FORMAT_VERSION, "step": step,
                                                      "num_processes": accelerator.num_processes, **state}, indent=2))
        shutil.rmtree(final, ignore_errors=True)
        partial.rename(final)
        if keep:
            for old in list_checkpoints(out)[:-keep]:
                shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def save_final(accelerator, policy, tokenizer, out: Path, cfg, base_model) -> Path:
    """RUN/model (full fine-tuning) or RUN/adapter [+ RUN/model merged]; returns the folder to use."""
    from accelerate.utils import DistributedType

    out = Path(out)
    state_dict = None
    if accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED):
        # gathered to the main process; keys are those of ResponseLogprobs, i.e. "model." + the LM's
        full = accelerator.get_state_dict(policy)
        state_dict = {key.removeprefix("model."): value for key, value in full.items()} if full else None
    result = out / MODEL_DIR
    if accelerator.is_main_process:
        inner = accelerator.unwrap_model(policy).model
        if _is_peft(inner):
            save_model_folder(inner, tokenizer, out / ADAPTER_DIR, state_dict)
            if cfg.merge_lora:
                merged = merge_adapter(base_model.local_path, out / ADAPTER_DIR, cfg.dtype, cfg.trust_remote_code)
                save_model_folder(merged, tokenizer, out / MODEL_DIR)
            else:
                result = out / ADAPTER_DIR
        else:
            save_model_folder(inner, tokenizer, out / MODEL_DIR, state_dict)
    elif cfg.lora_r and not cfg.merge_lora:
        result = out / ADAPTER_DIR
    accelerator.wait_for_everyone()
    return result


def merge_adapter(base_path: str, adapter: Path, dtype: str, trust_remote_code: bool = False):
    """Base model + LoRA adapter -> a plain HF model (loaded on the CPU, off the training device)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from dadpo.modeling import torch_dtype

    base = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch_dtype(dtype), trust_remote_code=trust_remote_code)
    return PeftModel.from_pretrained(base, str(adapter)).merge_and_unload()


def _save_optimizer(optimizer, folder: Path) -> None:
    state = optimizer.state_dict()
    tensors, scalars = {}, {}
    for index, values in state["state"].items():
        for key, value in values.items():
            if torch.is_tensor(value):
                tensors[f"{index}.{key}"] = value.detach().to("cpu").contiguous()
            else:
                scalars[f"{index}.{key}"] = value
    save_file(tensors, str(folder / "optimizer.safetensors"))
    (folder / "optimizer.json").write_text(json.dumps({"param_groups": state["param_groups"], "scalars": scalars}))


def _save_rng(folder: Path, rank: int) -> None:
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        tensors["torch_cuda"] = torch.stack(torch.cuda.get_rng_state_all())
    kind, keys, position, has_gauss, cached_gaussian = np.random.get_state(legacy=True)
    tensors["numpy_keys"] = torch.from_numpy(keys.astype(np.int64))
    save_file(tensors, str(folder / f"rng-rank{rank:05d}.safetensors"))
    (folder / f"rng-rank{rank:05d}.json").write_text(json.dumps({
        "python": random.getstate(), "numpy": [kind, int(position), int(has_gauss), float(cached_gaussian)]}))


# ---------------------------------------------------------------- loading


def load_training_state(checkpoint: Path, optimizer, scheduler, rank: int) -> int:
    """Restore optimizer, scheduler and this process's RNG; return the step to continue from.
    (The weights were loaded with the model: dadpo.training.load_policy_model.)"""
    tensors = load_file(str(checkpoint / "optimizer.safetensors"))
    meta = json.loads((checkpoint / "optimizer.json").read_text())
    state: dict[int, dict] = {}
    for name, value in list(tensors.items()) + list(meta["scalars"].items()):
        index, key = name.split(".", 1)
        state.setdefault(int(index), {})[key] = value
    groups = meta["param_groups"]
    for group in groups:
        if isinstance(group.get("betas"), list):
            group["betas"] = tuple(group["betas"])
    optimizer.load_state_dict({"state": state, "param_groups": groups})
    scheduler.load_state_dict(json.loads((checkpoint / "scheduler.json").read_text()))
    _load_rng(checkpoint, rank)
    return int(read_state(checkpoint)["step"])


def _load_rng(checkpoint: Path, rank: int) -> None:
    file = checkpoint / f"rng-rank{rank:05d}.safetensors"
    if not file.exists():  # resumed with more processes than saved: the extra ones keep fresh seeds
        return
    tensors = load_file(str(file))
    torch.set_rng_state(tensors["torch_cpu"])
    if "torch_cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(list(tensors["torch_cuda"]))
    meta = json.loads((checkpoint / f"rng-rank{rank:05d}.json").read_text())
    version, internal, gauss = meta["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, position, has_gauss, cached_gaussian = meta["numpy"]
    np.random.set_state((kind, tensors["numpy_keys"].numpy().astype(np.uint32), position, has_gauss, cached_gaussian))
