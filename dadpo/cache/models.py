"""The models a cache is made with: each teacher and the reference as the passes need them
(dadpo.cache.passes.Side: where it is, how it tokenizes, what the manifest records), from the
command's flags: several named teachers, served ones (probed at start), template variables, the
pinned date, and the length limit they all allow.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

from dadpo.cache.layout import REFERENCE, teacher_prefix
from dadpo.cache.passes import Side
from dadpo.config import CacheTeacherConfig
from dadpo.errors import DadpoError
from dadpo.modeling import check_model_folder, max_positions, resolve_model, resolved_dtype, weights_digest
from dadpo.scoring import backend_version, pick_backend
from dadpo.scoring.client import redact_url, served_key
from dadpo.scoring.server import probe_server
from dadpo.tokenization import parse_template_kwargs, today

_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_-]{0,31}$")


@dataclass
class Sides:
    reference: Side
    teachers: dict[str, Side]
    backend: str
    max_length: int | None

    def in_pass_order(self) -> list[Side]:
        return [*self.teachers.values(), self.reference]

    def tokenizers(self, trust_remote_code: bool) -> dict:
        return {side.prefix: side.tokenizer(trust_remote_code) for side in self.in_pass_order()}


def named(values: list[str] | str | None, flag: str) -> dict[str, str]:
    """[NAME=]VALUE items (a single string too) -> {name: value}; "" names the one unnamed item."""
    found: dict[str, str] = {}
    items = [values] if isinstance(values, str) else list(values or [])
    shown = [redact_url(item) for item in items] if flag.endswith("-url") else items  # no credentials in messages
    for item, seen in zip(items, shown):
        name, sep, value = item.partition("=")
        if not (sep and _NAME.match(name) and not os.path.exists(item)):
            name, value = "", item
        if name in found:
            raise DadpoError(f"{flag} {seen}: {'the teacher ' + repr(name) if name else 'an unnamed value'} is given "
                             "twice; name each one NAME=...")
        found[name] = value
    if "" in found and len(found) > 1:
        raise DadpoError(f"{flag}: with several teachers, name each one (NAME=...): {', '.join(shown)}")
    return found


def describe_models(cfg: CacheTeacherConfig, existing: dict | None) -> Sides:
    teachers = named(cfg.teacher, "--teacher")
    urls = named(cfg.teacher_url, "--teacher-url")
    key_vars = named(cfg.teacher_api_key_env, "--teacher-api-key-env")
    revisions = named(cfg.teacher_revision, "--teacher-revision")
    kwargs = {name: parse_template_kwargs(text, "--teacher-template-kwargs")
              for name, text in named(cfg.teacher_template_kwargs, "--teacher-template-kwargs").items()}
    for flag, given in (("--teacher-url", urls), ("--teacher-api-key-env", key_vars),
                        ("--teacher-revision", revisions), ("--teacher-template-kwargs", kwargs)):
        unknown = [name or "(unnamed)" for name in given if name not in teachers]
        if unknown:
            raise DadpoError(f"{flag}: no --teacher named {', '.join(unknown)} (teachers: "
                             f"{', '.join(n or '(unnamed)' for n in teachers) or 'none'})")
    keys = {f"teacher:{name}" if name else "teacher": served_key(var, "--teacher-api-key-env", name, urls.get(name))
            for name, var in key_vars.items()}
    if cfg.reference_api_key_env is not None:
        keys["reference"] = served_key(cfg.reference_api_key_env, "--reference-api-key-env", "", cfg.reference_url)
    served = [urls.get(name) for name in teachers] + [cfg.reference_url]
    backend = pick_backend(cfg.backend) if not all(served) else "server"
    date = cfg.template_date or (existing or {}).get("template_date") or _generate_date(cfg.pairs) or today()
    entries = [("reference", REFERENCE, "--reference", cfg.reference, cfg.reference_revision, cfg.reference_url,
                parse_template_kwargs(cfg.reference_template_kwargs, "--reference-template-kwargs"))]
    entries += [(f"teacher:{name}" if name else "teacher", teacher_prefix(name),
                 f"--teacher {name}" if name else "--teacher", model, revisions.get(name), urls.get(name),
                 kwargs.get(name, {})) for name, model in teachers.items()]
    resolved = {}  # the cheap checks first, so a typo is refused in a second
    for role, prefix, flag, model, revision, url, _ in entries:
        resolved[role] = resolve_model(model, revision, flag)
        check_model_folder(resolved[role], cfg.trust_remote_code, flag)
    sides = {}
    for role, prefix, flag, model, revision, url, template_kwargs in entries:
        key, key_source = keys.get(role, (None, _key_flag(flag)))
        sides[role] = Side(role, prefix, flag, model, resolved[role].local_path, resolved[role].revision,
                           not cfg.no_chat_template, template_kwargs, date, {}, url, key, key_source)
    tokenizers = {role: side.tokenizer(cfg.trust_remote_code) for role, side in sides.items()}
    servers = {role: probe_server(side.url, tokenizer=tokenizers[role].tokenizer, max_length=cfg.max_length,
                                  where=_url_flag(side), tokenizer_name=f"{side.flag}'s tokenizer",
                                  timeout_s=cfg.server_timeout, retries=cfg.server_retries, api_key=side.api_key,
                                  key_source=side.key_source)
               for role, side in sides.items() if side.url}
    max_length = _length_limit(cfg.max_length, resolved, backend, servers)
    for role, side in sides.items():
        side.template_date = tokenizers[role].template_date  # None unless the template writes a date
        side.record = {"model": resolved[role].record_name, "revision": resolved[role].revision,
                       **tokenizers[role].record(), **_engine_record(cfg, resolved[role], backend, servers.get(role))}
    return Sides(sides.pop("reference"), {name: sides[f"teacher:{name}" if name else "teacher"] for name in teachers},
                 backend, max_length)


def _engine_record(cfg, resolved, backend: str, server: dict | None) -> dict:
    if server:
        return {"weights_digest": None, "dtype": "server", "backend": "server",
                "backend_version": server.get("server_version"), "fp32_head": False, "server": server}
    return {"weights_digest": weights_digest(resolved), "dtype": resolved_dtype(resolved, cfg.dtype), "backend": backend,
            "backend_version": backend_version(backend), "fp32_head": cfg.engine.fp32_head, "server": None}


def server_settings(cfg: CacheTeacherConfig, side: Side, max_length) -> dict:
    if not side.url:
        return {}
    server = side.record["server"]
    return {"served_model": server["served_model"], "tokenizer_vocab_size": server["vocab_size"],
            "max_length": max_length, "concurrency": cfg.server_concurrency, "timeout_s": cfg.server_timeout,
            "retries": cfg.server_retries, "where": _url_flag(side), "api_key": side.api_key,
            "key_source": side.key_source}


def _key_flag(flag: str) -> str:
    """--teacher NAME -> "--teacher-api-key-env NAME=VAR": how to give the key a server asks for."""
    base, _, name = flag.partition(" ")
    return f"{base}-api-key-env {name + '=' if name else ''}VAR"


def _url_flag(side: Side) -> str:
    """--teacher-url [NAME] or --reference-url: how messages about a served model name it."""
    flag, _, name = side.flag.partition(" ")
    return f"{flag}-url {name}".strip()


def _generate_date(pairs_path: str) -> str | None:
    """The template date a `dadpo generate` output was sampled with: its prompts were rendered then."""
    from dadpo.generate import read_generation_settings

    try:
        settings = read_generation_settings(pairs_path) or {}
    except (OSError, ValueError):
        return None
    return settings.get("template_date")


def _length_limit(max_length: int | None, models: dict, backend: str, servers: dict) -> int | None:
    """--max-length, or the models' own limit; vLLM (engine or server) scores at most max_model_len - 1 tokens."""
    room = 1 if backend == "vllm" else 0
    limits = {role: max_positions(model) for role, model in models.items() if role not in servers}
    limits = {role: n - room for role, n in limits.items() if n}
    limits.update({role: server["max_model_len"] - 1 for role, server in servers.items()})
    if max_length is None:
        return min(limits.values()) if limits else None
    for role, limit in limits.items():
        if max_length > limit:
            raise DadpoError(f"--max-length {max_length}: the {role} {models[role].name} takes at most {limit} "
                             f"tokens{' with the vllm backend' if room else ''} (max_position_embeddings)")
    return max_length
