"""The `dadpo` command: parses flags and calls the library; nothing else lives here.

Installed as dadpo.cli (the folder is cli/ in the repository).
"""

from __future__ import annotations

import os
import sys
import traceback

import click

from dadpo import stop
from dadpo.errors import DadpoError


TRACEBACK_ENV = "DADPO_TRACEBACK"  # set to 1: the full traceback is printed above the one line


class _Group(click.Group):
    """Bad input -> one line on stderr and exit 2, never a traceback. Any other failure (a disk, an
    engine, a library) -> one line and exit 1; DADPO_TRACEBACK=1 prints the traceback as well."""

    def main(self, *args, **kwargs):
        kwargs["standalone_mode"] = False
        try:
            return super().main(*args, **kwargs)
        except click.exceptions.Exit as exc:
            sys.exit(exc.exit_code)
        except click.exceptions.Abort:
            click.echo("error: interrupted", err=True)
            sys.exit(130)
        except click.UsageError as exc:
            where = f"dadpo {exc.ctx.info_name}: " if exc.ctx and exc.ctx.parent else "dadpo: "
            click.echo(f"error: {where}{exc.format_message()}", err=True)
            sys.exit(2)
        except click.ClickException as exc:
            click.echo(f"error: {exc.format_message()}", err=True)
            sys.exit(exc.exit_code)
        except DadpoError as exc:
            _traceback_if_asked(exc)
            click.echo(f"error: {exc}", err=True)
            sys.exit(2)
        except stop.Stopped as exc:
            click.echo(f"dadpo: {exc}", err=True)
            sys.exit(stop.EXIT_STOPPED)
        except KeyboardInterrupt:
            click.echo("error: interrupted; finished shards and checkpoints are kept, re-run to resume", err=True)
            sys.exit(130)
        except Exception as exc:  # noqa: BLE001  (the one place an unexpected failure becomes one line)
            _traceback_if_asked(exc)
            click.echo(f"error: {_one_line(exc)}", err=True)
            sys.exit(1)


def _traceback_if_asked(exc: BaseException) -> None:
    if os.environ.get(TRACEBACK_ENV, "") not in ("", "0"):
        traceback.print_exception(exc)


def _one_line(exc: BaseException) -> str:
    """An unexpected exception as one line: an OS error names its path; anything else its type and
    first line (the full traceback is one environment variable away)."""
    from dadpo.errors import first_line

    if isinstance(exc, OSError) and exc.filename is not None:
        paths = f"{exc.filename} -> {exc.filename2}" if exc.filename2 is not None else f"{exc.filename}"
        return f"{paths}: {exc.strerror or first_line(exc)}"
    return f"{type(exc).__name__}: {first_line(exc)} ({TRACEBACK_ENV}=1 shows where)"


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="dadpo")
def cli():
    """Distil a large teacher LLM into a small student with daDPO.

    \b
    The workflow:
      dadpo generate       teacher and student responses for your prompts -> pairs
      dadpo sft            dSFT of the student on the teacher's responses -> the reference
      dadpo cache-teacher  score every pair once under the teacher and the reference
      dadpo inspect        what the cache holds: tokens, dropped pairs, margin distributions
      dadpo train          daDPO on the student from the cache (only the student is loaded)
      dadpo sweep          a (beta1, beta2) grid from one cache;  dadpo report: curves to PNG
      dadpo verify-cache   drift of the cached numbers against the trainer's forward pass
      dadpo eval           did the student get better? judged win rates against the teacher
      dadpo show-tokens    what a model will score for one pair: prompt, response tokens, end of turn
    Try `dadpo demo` for the whole pipeline on tiny local models.
    """


# A module per subcommand, each a plain click command that the group collects here: no subcommand
# module imports this one (no import circle).
from dadpo.cli import (  # noqa: E402
    cache_teacher, demo, eval, generate, inspect, report, sft, show_tokens, sweep, train, verify,
)

for _command in (cache_teacher.cache_teacher_command, demo.demo_command, eval.eval_command, generate.generate_command,
                 inspect.inspect_command, report.report_command, sft.sft_command, show_tokens.show_tokens_command,
                 sweep.sweep_command, train.train_command, verify.verify_cache_command):
    cli.add_command(_command)


def main() -> None:
    # dadpo draws its own progress bars; transformers' per-load bars and advisories are noise
    # (and would break the one-line-error rule when loading fails).
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    cli.main(prog_name="dadpo")


if __name__ == "__main__":
    main()
