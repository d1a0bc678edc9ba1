"""Checkpoints and --resume, without pickle.

    RUN/checkpoints/step-000200/
        model/                     HF save_pretrained (safetensors) + tokenizer   (full fine-tuning)
        adapter/                   peft save_pretrained (safetensors) + tokenizer (LoRA)
        optimizer.safetensors      every optimizer state tensor, named "<parameter name>::<key>" (full, unsharded)
        optimizer.json             param_groups and any non-tensor state
        scheduler.json             the LR scheduler's state_dict (plain numbers)
        rng-rank00000.safetensors  torch CPU/CUDA RNG states of process 0, numpy's MT19937 keys
        rng-rank00000.json         python's random state, numpy's position
        trainer_state.json         step, the run's settings, last metrics; written LAST

A checkpoint is filled under step-NNNNNN.partial and renamed when whole, so a crash or a full disk
leaves no folder that looks complete. Tensors go to safetensors and everything else to JSON:
torch.save (pickle) is never used, so loading a checkpoint cannot run code. --resume takes the
newest checkpoint whose files are all readable; a damaged one (truncated safetensors, a missing
optimizer file) is named, and the previous one is used instead.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from dadpo.atomic import out_of_space, write_error, write_json_atomic
from dadpo.errors import DadpoError, one_line
from dadpo.training.run_folder import ADAPTER_DIR, CHECKPOINTS_DIR, MODEL_DIR

STATE_FILE = "trainer_state.json"
FORMAT_VERSION = 2  # 2: optimizer state keyed by parameter name, so any process layout resumes any other


def checkpoint_dir(out: Path, step: int) -> Path:
    return Path(out) / CHECKPOINTS_DIR / f"step-{step:06d}"


def list_checkpoints(out: Path) -> list[Path]:
    """Checkpoints of RUN that were completed (renamed from .partial), oldest first."""
    folder = Path(out) / CHECKPOINTS_DIR
    if not folder.is_dir():
        return []
    found = [p for p in folder.glob("step-*") if p.is_dir() and not p.name.endswith(".partial")
             and (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def read_state(checkpoint: Path) -> dict:
    try:
        state = json.loads((checkpoint / STATE_FILE).read_text())
    except (OSError, ValueError) as exc:
        raise DadpoError(f"{checkpoint / STATE_FILE}: unreadable ({exc})") from None
    if not isinstance(state, dict) or not isinstance(state.get("step"), int):
        raise DadpoError(f"{checkpoint / STATE_FILE}: not a dadpo trainer state")
    if state.get("format") != FORMAT_VERSION:
        raise DadpoError(f"{checkpoint}: checkpoint format {state.get('format')}, this dadpo resumes format "
                         f"{FORMAT_VERSION}; start the run again without --resume")
    return state


def damage(checkpoint: Path) -> str | None:
    """The first file of `checkpoint` that is missing or unreadable, as 'FILE: problem'; None if whole."""
    try:
        read_state(checkpoint)
    except DadpoError as exc:
        return str(exc)
    weights = [checkpoint / MODEL_DIR, checkpoint / ADAPTER_DIR]
    tensor_files = [f for folder in weights if folder.is_dir() for f in sorted(folder.glob("*.safetensors"))]
    if not tensor_files:
        return f"{checkpoint}: no weights (model/*.safetensors or adapter/*.safetensors)"
    for name in ("optimizer.json", "scheduler.json"):
        try:
            json.loads((checkpoint / name).read_text())
        except (OSError, ValueError) as exc:
            return f"{checkpoint / name}: {'missing' if isinstance(exc, FileNotFoundError) else 'unreadable'}"
    for file in tensor_files + [checkpoint / "optimizer.safetensors", *sorted(checkpoint.glob("rng-rank*.safetensors"))]:
        try:
            with safe_open(str(file), "pt") as handle:
                list(handle.keys())
        except Exception as exc:  # missing, truncated or not safetensors
            detail = "missing" if not file.exists() else one_line(exc)
            return f"{file}: {detail}"
    return None


def find_start(out: Path, resume: bool, overwrite: bool, record: dict,
               differences: Callable[[dict, dict], list[str]], say: Callable[[str], None] = print) -> Path | None:
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
    problems = []
    for candidate in reversed(found):
        problem = damage(candidate)
        if problem is None:
            break
        problems.append(problem)
    else:
        raise DadpoError(f"--resume: every checkpoint in {out / CHECKPOINTS_DIR} is damaged ({problems[0]}); "
                         "start again without --resume (and --overwrite)")
    if problems:
        say(f"warning: --resume: {'; '.join(problems)}; resuming from the previous checkpoint, {candidate.name}")
    state = read_state(candidate)
    changed = differences(state["record"], record)
    if changed:
        raise DadpoError(f"--resume: {candidate} comes from a run with other settings ({'; '.join(changed)}); resume "
                         "with the original settings, or use another --out")
    if state["step"] > record["total_steps"]:
        raise DadpoError(f"--resume: {candidate} is past the run's {record['total_steps']} steps")
    return candidate


# ---------------------------------------------------------------- saving


def save_model_folder(model, tokenizer, folder: Path, state_dict: dict | None = None) -> None:
    """HF (or peft adapter) save_pretrained in safetensors, plus the tokenizer."""
    model.save_pretrained(folder, state_dict=state_dict, safe_serialization=True)
    tokenizer.save_pretrained(folder)


def is_peft(model) -> bool:
    return hasattr(model, "peft_config")


def save_checkpoint(accelerator, inner_model, model_state: dict | None, optimizer_state: dict, scheduler,
                    tokenizer, out: Path, step: int, state: dict, keep: int | None) -> Path:
    """Write RUN/checkpoints/step-NNNNNN. Every process calls this (each saves its RNG state);
    `model_state` (None: the model's own) and `optimizer_state` are full, gathered state dicts
    that only the main process needs."""
    final = checkpoint_dir(out, step)
    partial = final.with_name(final.name + ".partial")
    try:
        if accelerator.is_main_process:
            shutil.rmtree(partial, ignore_errors=True)
            partial.mkdir(parents=True)
        accelerator.wait_for_everyone()
        _save_rng(partial, accelerator.process_index)
        if accelerator.is_main_process:
            save_model_folder(inner_model, tokenizer, partial / (ADAPTER_DIR if is_peft(inner_model) else MODEL_DIR),
                              model_state)
            _save_optimizer(optimizer_state, partial)
            (partial / "scheduler.json").write_text(json.dumps(scheduler.state_dict()))
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            write_json_atomic(partial / STATE_FILE, {"format": FORMAT_VERSION, "step": step,
                                                     "num_processes": accelerator.num_processes, **state})
            shutil.rmtree(final, ignore_errors=True)
            partial.rename(final)
            if keep:
                for old in list_checkpoints(out)[:-keep]:
                    shutil.rmtree(old, ignore_errors=True)
    except Exception as exc:  # a full disk: the partial folder never becomes a checkpoint
        written = sum(p.stat().st_size for p in partial.rglob("*") if p.is_file()) if partial.exists() else 0
        shutil.rmtree(partial, ignore_errors=True)
        if isinstance(exc, OSError) or out_of_space(exc):
            raise write_error(final, exc, written or None) from None
        raise
    accelerator.wait_for_everyone()
    return final


def _save_optimizer(state: dict, folder: Path) -> None:
    tensors, scalars = {}, {}
    for index, values in state["state"].items():
        for key, value in values.items():
            if torch.is_tensor(value):
                tensors[f"{index}::{key}"] = value.detach().to("cpu").contiguous()
            else:
                scalars[f"{index}::{key}"] = value
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


def load_optimizer_state(checkpoint: Path) -> dict:
    """The optimizer state_dict a checkpoint holds (full, unsharded; tensors on the CPU)."""
    tensors = load_file(str(checkpoint / "optimizer.safetensors"))
    meta = json.loads((checkpoint / "optimizer.json").read_text())
    state: dict[str, dict] = {}
    for name, value in list(tensors.items()) + list(meta["scalars"].items()):
        parameter, key = name.rsplit("::", 1)
        state.setdefault(parameter, {})[key] = value
    groups = meta["param_groups"]
    for group in groups:
        if isinstance(group.get("betas"), list):
            group["betas"] = tuple(group["betas"])
    return {"state": state, "param_groups": groups}


def load_scheduler_and_rng(checkpoint: Path, scheduler, rank: int) -> int:
    """Restore the scheduler and this process's RNG; return the step to continue from."""
    scheduler.load_state_dict(json.loads((checkpoint / "scheduler.json").read_text()))
    file = checkpoint / f"rng-rank{rank:05d}.safetensors"
    if file.exists():  # resumed with more processes than saved: the extra ones keep fresh seeds
        tensors = load_file(str(file))
        torch.set_rng_state(tensors["torch_cpu"])
        if "torch_cuda" in tensors and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(list(tensors["torch_cuda"]))
        meta = json.loads((checkpoint / f"rng-rank{rank:05d}.json").read_text())
        version, internal, gauss = meta["python"]
        random.setstate((version, tuple(internal), gauss))
        kind, position, has_gauss, cached_gaussian = meta["numpy"]
        np.random.set_state((kind, tensors["numpy_keys"].numpy().astype(np.uint32), position, has_gauss,
                             cached_gaussian))
    return int(read_state(checkpoint)["step"])


def merge_adapter(base_path: str, adapter: Path, dtype: str, trust_remote_code: bool = False):
    """Base model + LoRA adapter -> a plain HF model (loaded on the CPU, off the training device)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from dadpo.modeling import torch_dtype

    base = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch_dtype(dtype), trust_remote_code=trust_remote_code)
    return PeftModel.from_pretrained(base, str(adapter)).merge_and_unload()
