"""Every command's settings, declared once: each field's default and its flag help (the command
line builds its flags from these classes, dadpo/cli/options.py). Light to import: no torch, no
polars, so `dadpo --help` and flag errors answer at once.

    CacheTeacherConfig  dadpo cache-teacher     GenerateConfig + Sampling  dadpo generate
    TrainConfig         dadpo train, sweep      SftConfig                  dadpo sft
    VerifyConfig        dadpo verify-cache      (the generic training flags: dadpo.training.config.LoopConfig;
                                                 how engines run: dadpo.engine.EngineOptions)
    EvalConfig          dadpo eval
    ShowTokensConfig    dadpo show-tokens
"""

from __future__ import annotations

from dataclasses import dataclass

from dadpo.engine import EngineOptions
from dadpo.options import REQUIRED, option
from dadpo.tokenization import PROMPT_FORMATS
from dadpo.training.config import LoopConfig

LOGP_NORMS = ("sum", "mean")
# A served model's requests (cache-teacher's --teacher-url/--reference-url, generate's --teacher-url/--student-url)
SERVER_CONCURRENCY, SERVER_TIMEOUT_S, SERVER_RETRIES = 8, 300.0, 5


@dataclass(frozen=True)
class Sampling:
    """How responses are drawn; temperature 0 is greedy decoding."""

    max_new_tokens: int = option(512, "Longest response, in tokens.")
    temperature: float = option(1.0, "Sampling temperature; 0 = greedy.")
    top_p: float = option(1.0, "Nucleus sampling mass.")
    seed: int = option(0, "Sampling seed; the same seed and settings give the same pairs, interrupted or not.")


@dataclass
class CacheTeacherConfig:
    pairs: str = option(REQUIRED, "Pairs file: .parquet, .jsonl, .json, a datasets.save_to_disk folder, a folder of "
                        "data files or a Hub dataset id (with --pairs-split), in any TRL preference layout: prompt + "
                        "chosen (teacher response) + rejected (student response) [+ id], or whole conversations. "
                        "See data_specs/pairs.v2.md.")
    reference: str = option(REQUIRED, "Reference model (the dSFT student): HF hub id or local folder.")
    out: str = option(REQUIRED, "Cache folder to create or resume.")
    teacher: list = option(help="Teacher model: HF hub id or local folder; NAME=MODEL to cache several teachers "
                           "(repeat the flag). Without --teacher only the reference is cached (plain DPO).",
                           factory=list, metavar="[NAME=]MODEL")
    teacher_url: list = option(help="Score that teacher through a running OpenAI-compatible vLLM server at URL "
                               "([NAME=]URL, repeatable); --teacher still names its tokenizer.", factory=list,
                               metavar="[NAME=]URL")
    reference_url: str | None = option(None, "Score the reference through a running vLLM server at this URL; "
                                       "--reference still names its tokenizer.")
    teacher_api_key_env: list = option(help="The environment variable holding the API key of that teacher's server "
                                       "([NAME=]VAR, repeatable; a server started with --api-key), sent as "
                                       "Authorization: Bearer; the key is never printed or written.", factory=list,
                                       metavar="[NAME=]VAR")
    reference_api_key_env: str | None = option(None, "The environment variable holding the API key of the "
                                               "--reference-url server.", metavar="VAR")
    pairs_split: str | None = option(None, "Split to read from a Hub dataset id or a folder of data files "
                                     "(datasets.load_dataset); for a save_to_disk DatasetDict.", default_text="train")
    prompt_format: str = option("chat", "chat: a string prompt is one user turn, rendered by each model's chat "
                                "template; raw: string prompts are already-formatted text (TRL's meaning).",
                                choices=PROMPT_FORMATS)
    backend: str = option("auto", "auto (vllm when installed, else hf), hf or vllm.")
    dtype: str = option("auto", "auto (the config's dtype), float32, bfloat16 or float16.")
    teacher_revision: list = option(help="Hub revision (branch, tag or commit) of the teacher ([NAME=]REV).",
                                    factory=list, metavar="[NAME=]REV")
    reference_revision: str | None = option(None, "Hub revision of the reference.")
    teacher_template_kwargs: list = option(help="The teacher's chat-template variables as JSON ([NAME=]JSON), e.g. "
                                           "'{\"enable_thinking\": false}' or '{\"reasoning_effort\": \"high\"}'.",
                                           factory=list, metavar="[NAME=]JSON")
    reference_template_kwargs: str | None = option(None, "The reference's chat-template variables as JSON.")
    template_date: str | None = option(None, "Date (YYYY-MM-DD) that templates which write today's date render; "
                                       "pinned in the manifest.", default_text="the cache's, the pairs' generate "
                                       "date, or today")
    max_length: int | None = option(None, "Max prompt+response tokens, checked under every model's tokenizer; a pair "
                                    "over it on any side is dropped whole (never truncated).",
                                    default_text="the models' limit")
    on_overlong: str = option("drop", "drop: skip over-long pairs (ids in CACHE/dropped_ids.txt); error: stop at the "
                              "first one.")
    shard_size: int = option(1000, "Pairs per shard: the unit of progress kept across crashes.")
    num_workers: int = option(1, "Split the work over N independent processes (one per GPU, SLURM array, ...).")
    worker_index: int = option(0, "This process's index in 0..N-1.")
    plan_workers: int = option(0, "Processes that tokenize the plan (forked; 0: one per CPU, at most 8).",
                               default_text="one per CPU, at most 8")
    reuse_from: list = option(help="An earlier cache whose scores are copied instead of computed, for every sequence "
                              "it scored under the same model weights, dtype and engine (repeatable).",
                              factory=list, metavar="OLD_CACHE")
    server_concurrency: int = option(SERVER_CONCURRENCY, "Requests in flight per server (--teacher-url/"
                                     "--reference-url).")
    server_timeout: float = option(SERVER_TIMEOUT_S, "Seconds before a server request (the start-up check's too) is "
                                   "retried.")
    server_retries: int = option(SERVER_RETRIES, "Retries of a failed server request (connection errors, timeouts, "
                                 "5xx), with exponential backoff, before the start-up check or the pass stops; the "
                                 "cache stays resumable.")
    plan_only: bool = option(False, "Tokenize every pending pair for every model (templates, length rule) into "
                             "CACHE/work and stop before any model loads: a dry run that finds bad pairs early; the "
                             "real run reuses the plan.")
    overwrite: bool = option(False, "Delete an existing cache in --out and start over (one worker only: run it "
                             "before launching the others).")
    no_chat_template: bool = option(False, "Plain mode: ignore the models' chat templates.")
    trust_remote_code: bool = option(False, "Allow model code from the model folder/hub to run.")
    engine: EngineOptions = option(help="", factory=EngineOptions)
    progress: bool = option(True, "Progress bars.", cli=False)


@dataclass
class GenerateConfig:
    prompts: str = option(REQUIRED, "Prompts file: .parquet, .jsonl, .json, a datasets.save_to_disk folder, a folder "
                          "of data files or a Hub dataset id, with `prompt` (a string or a list of {role, content} "
                          "messages) [, id]. Other columns travel through (chosen/rejected, if present, are ignored).")
    teacher: str = option(REQUIRED, "Teacher model: HF hub id or local folder.")
    student: str = option(REQUIRED, "Student model (the one whose responses become `rejected`).")
    out: str = option(REQUIRED, "Pairs file to write (.parquet or .jsonl); OUT.work/ holds the progress.")
    prompts_split: str | None = option(None, "Split of a Hub dataset id or a folder of data files.")
    prompt_format: str = option("chat", "chat: a string prompt is one user turn, rendered by each model's chat "
                                "template; raw: string prompts are already-formatted text.", choices=PROMPT_FORMATS)
    backend: str = option("auto", "auto (vllm when installed, else hf), hf or vllm: the engine of a model that is "
                          "not served (--teacher-url, --student-url).")
    sampling: Sampling = option(help="", factory=Sampling)
    dtype: str = option("auto", "auto (the config's dtype), float32, bfloat16 or float16 (a served model keeps its "
                        "server's).")
    teacher_revision: str | None = option(None, "Hub revision (branch, tag or commit) of the teacher.")
    student_revision: str | None = option(None, "Hub revision of the student.")
    teacher_url: str | None = option(None, "Sample the teacher through a running OpenAI-compatible vLLM server at "
                                     "this URL; --teacher still names its tokenizer and template (prompts are sent "
                                     "as token ids, the sampled ids come back).")
    student_url: str | None = option(None, "Sample the student through a running vLLM server at this URL; "
                                     "--student still names its tokenizer and template.")
    teacher_api_key_env: str | None = option(None, "The environment variable holding the API key of the "
                                             "--teacher-url server (a server started with --api-key); never printed "
                                             "or written.", metavar="VAR")
    student_api_key_env: str | None = option(None, "The environment variable holding the API key of the "
                                             "--student-url server.", metavar="VAR")
    server_concurrency: int = option(SERVER_CONCURRENCY, "Requests in flight per server (--teacher-url/"
                                     "--student-url).")
    server_timeout: float = option(SERVER_TIMEOUT_S, "Seconds before a server request is retried.")
    server_retries: int = option(SERVER_RETRIES, "Retries of a failed server request (connection errors, timeouts, "
                                 "5xx), with exponential backoff, before the pass stops; finished chunks are kept.")
    teacher_template_kwargs: str | None = option(None, "The teacher's chat-template variables as JSON, e.g. "
                                                 "'{\"reasoning_effort\": \"high\"}'.")
    student_template_kwargs: str | None = option(None, "The student's chat-template variables as JSON, e.g. "
                                                 "'{\"enable_thinking\": false}'.")
    template_date: str | None = option(None, "Date (YYYY-MM-DD) that templates which write today's date render; "
                                       "recorded, and used by cache-teacher on these pairs.", default_text="today")
    chunk_size: int = option(512, "Prompts per chunk: the unit of progress kept across crashes.")
    overwrite: bool = option(False, "Replace an existing OUT (and its unfinished work) and start over.")
    no_chat_template: bool = option(False, "Plain mode: ignore the models' chat templates.")
    trust_remote_code: bool = option(False, "Allow model code from the model folder/hub to run.")
    engine: EngineOptions = option(help="", factory=lambda: EngineOptions(batch_size=32))
    progress: bool = option(True, "Progress bars.", cli=False)


@dataclass(kw_only=True)
class TrainConfig(LoopConfig):
    """`dadpo train` flags: the generic ones (dadpo.training.LoopConfig) plus daDPO's own."""

    cache: str = option(REQUIRED, "Cache folder made by dadpo cache-teacher.")
    model: str | None = option(None, "Policy to start from: HF id or folder, with the cache's reference tokenizer.",
                               default_text="the cache's reference")
    beta1: float = option(0.1, "Weight of the log-ratio against the reference (dDPO term).")
    beta2: float = option(0.01, "Weight of the log-ratio against the teacher (0 = plain DPO).")
    teacher_weights: str | None = option(None, "Several teachers: NAME=WEIGHT,... for the teacher term's weighted "
                                         "mean of log-probs.", default_text="equal weights")
    min_teacher_margin: float | None = option(None, "Drop pairs whose teacher margin h_te = log te(chosen) - "
                                              "log te(rejected) is below this (before the eval split).")
    max_teacher_margin: float | None = option(None, "Drop pairs whose teacher margin h_te is above this.")
    logp_norm: str = option("sum", "mean: divide each model's log-prob by its own token count "
                            "(length-normalised variant).", choices=LOGP_NORMS)
    start_check: int = option(16, "Pairs re-scored before step 1 with the policy, against the cached reference "
                              "log-probs: drift (nats) and the step-0 mean implicit reward, in RUN/start_check.json. "
                              "0: off.")


@dataclass(kw_only=True)
class SftConfig(LoopConfig):
    """`dadpo sft` flags: the generic ones (dadpo.training.LoopConfig) plus the data's."""

    pairs: str = option(REQUIRED, "Pairs file (as for cache-teacher); the student learns `chosen`, the teacher's "
                        "response. `rejected` is not used.")
    pairs_split: str | None = option(None, "Split of a Hub dataset id or a folder of data files given as --pairs.")
    model: str | None = option(REQUIRED, "Student to fine-tune: HF hub id or local folder (e.g. the pruned or small "
                               "model).")
    lr: float = option(2e-5, "Peak learning rate (AdamW).")  # a fine-tuning rate, not daDPO's 5e-7
    batch_size: int = option(8, "Examples per process per micro-batch.")
    epochs: int = option(1, "Passes over the training examples.")
    eval_fraction: float = option(0.05, "Examples held out (by id hash) for eval.")
    max_length: int | None = option(None, "Max prompt+response tokens; longer pairs are dropped (or refused).",
                                    default_text="the model's limit")
    on_overlong: str = option("drop", "drop: skip over-long pairs (ids in RUN/dropped_ids.txt); error: stop at the "
                              "first one.", choices=("drop", "error"))
    prompt_format: str = option("chat", "chat: a string prompt is one user turn, rendered by the chat template; raw: "
                                "string prompts are already-formatted text (TRL's meaning).", choices=PROMPT_FORMATS)
    template_kwargs: str | None = option(None, "Chat-template variables as JSON, e.g. '{\"enable_thinking\": false}'.")
    template_date: str | None = option(None, "Date (YYYY-MM-DD) for templates that write today's date.",
                                       default_text="today")
    no_chat_template: bool = option(False, "Plain mode: ignore the student's chat template.")


@dataclass
class VerifyConfig:
    cache: str = option(REQUIRED, "Cache folder (made by dadpo cache-teacher); or give it as the argument.")
    sample: int = option(64, "Pairs to re-score (all when the cache has fewer); 0 checks integrity only.")
    model: str | None = option(None, "Policy for the reference columns: HF hub id or local folder with the "
                               "reference's tokenizer.", default_text="the cache's reference")
    teacher: bool = option(False, "Also re-score every teacher's columns with the cache's teachers.")
    dtype: str = option("float32", "Dtype to re-score in: the one you train in (float32, bfloat16, float16).")
    batch_size: int = option(8, "Sequences per forward pass.")
    device: str | None = option(None, "Device.", default_text="cuda if available, else cpu")
    seed: int = option(0, "Seed of the row sample.")
    trust_remote_code: bool = option(False, "Allow model code from the model folder/hub to run.")


@dataclass
class EvalConfig:
    """`dadpo eval`: each model's responses against a baseline's, judged in both orders."""

    prompts: str = option(REQUIRED, "Held-out prompts: .jsonl, .json or .parquet with `prompt` (a string = one user "
                          "turn, or a list of {role, content} messages) [, id] [, answer] [, category].")
    baseline: str = option(REQUIRED, "What every model is compared with, NAME=X: X a model (hub id or folder; its "
                           "responses are generated) or a responses file (.jsonl/.parquet with id, response).",
                           metavar="NAME=X")
    out: str = option(REQUIRED, "Eval folder to create or continue (responses, judgments, summary).")
    model: list = option(help="A model to evaluate, [NAME=]X: a model, a responses file, or a `dadpo sweep` folder "
                         "(one model per finished point, named after it). Repeatable.", factory=list,
                         metavar="[NAME=]X")
    judge_url: str | None = option(None, "An OpenAI-compatible server (/v1/chat/completions) that judges: vLLM, "
                                   "SGLang, a hosted API.")
    judge_model: str | None = option(None, "The model name the --judge-url server serves.")
    judge_api_key_env: str | None = option(None, "Environment variable holding the --judge-url API key (never "
                                           "written or printed).", metavar="VAR")
    judge: str | None = option(None, "A local judge instead: a causal LM (hub id or folder, run in-process), a "
                               "reward model (a ...ForSequenceClassification: P(win) = sigma(r_c - r_b)), or "
                               "'answer' (final-answer match with the prompts' `answer` column).",
                               metavar="PATH|answer")
    judge_template: str | None = option(None, "Jinja judge prompt with question, answer_a, answer_b, asking for a "
                                        "final [[A]], [[B]] or [[C]] (tie).", default_text="judge_prompt.v1.jinja")
    judge_retries: int = option(3, "Re-asks (at temperature 0.7) of a judge reply without a verdict, and tries of "
                                "a failed request; after them the prompt is a parse failure (never a loss).")
    judge_concurrency: int = option(16, "Requests in flight to --judge-url.")
    judge_timeout: float = option(300.0, "Seconds before a --judge-url request is retried.")
    judge_max_new_tokens: int = option(1024, "Longest judge reply, in tokens.")
    bootstrap: int = option(1000, "Bootstrap resamples of the prompts for the 95% interval.")
    seed: int = option(0, "Seed of the bootstrap, of sampled responses and of the judge's re-asks.")
    lm_eval_tasks: str | None = option(None, "lm-evaluation-harness tasks run on every model and the baseline, "
                                       "comma-separated (e.g. gsm8k,arc_easy); needs dadpo[eval].")
    lm_eval_limit: int | None = option(None, "Examples per lm-eval task.", default_text="all")
    lm_eval_fewshot: int | None = option(None, "Few-shot examples per lm-eval task.", default_text="the task's")
    lm_eval_include: str | None = option(None, "Folder of lm-eval task YAML files (local tasks).")
    backend: str = option("auto", "Generation backend: auto (vllm when installed, else hf), hf or vllm.")
    dtype: str = option("auto", "auto (the config's dtype), float32, bfloat16 or float16.")
    max_new_tokens: int = option(512, "Longest generated response, in tokens.")
    temperature: float = option(0.0, "Sampling temperature of generated responses; 0 = greedy.")
    template_date: str | None = option(None, "Date (YYYY-MM-DD) that templates which write today's date render.",
                                       default_text="the eval's, or today")
    template_kwargs: list = option(help="Chat-template variables as JSON, [NAME=]JSON (no NAME: every model), e.g. "
                                   "'dadpo={\"enable_thinking\": false}'.", factory=list, metavar="[NAME=]JSON")
    overwrite: bool = option(False, "Start over: delete this eval's responses, judgments and summary in --out.")
    trust_remote_code: bool = option(False, "Allow model code from the model folder/hub to run.")
    # how the models (and a local judge, and lm-eval) run: generate's engine flags
    engine: EngineOptions = option(help="", factory=lambda: EngineOptions(batch_size=8))
    progress: bool = option(True, "Progress lines.", cli=False)


COLOR_MODES = ("auto", "always", "never")


@dataclass
class ShowTokensConfig:
    model: str = option(REQUIRED, "Model whose tokenization to show: HF hub id or local folder (only its tokenizer "
                        "is read).")
    pairs: str = option(REQUIRED, "Pairs file (as for cache-teacher).")
    row: int | None = option(None, "The pair at this 0-based row of the pairs file.", default_text="the first pair")
    pair_id: str | None = option(None, "The pair with this id (instead of --row).", flag="id")
    pairs_split: str | None = option(None, "Split of a Hub dataset id or a folder of data files given as --pairs.")
    revision: str | None = option(None, "Hub revision (branch, tag or commit) of the model.")
    prompt_format: str = option("chat", "chat: a string prompt is one user turn, rendered by the chat template; raw: "
                                "string prompts are already-formatted text (TRL's meaning).", choices=PROMPT_FORMATS)
    template_kwargs: str | None = option(None, "Chat-template variables as JSON, e.g. '{\"enable_thinking\": false}'.")
    template_date: str | None = option(None, "Date (YYYY-MM-DD) for templates that write today's date.",
                                       default_text="today")
    no_chat_template: bool = option(False, "Plain mode: ignore the model's chat template.")
    trust_remote_code: bool = option(False, "Allow tokenizer code from the model folder/hub to run.")
    color: str = option("auto", "auto: colours in a terminal, plain text in a pipe or file; always; never.",
                        choices=COLOR_MODES)
