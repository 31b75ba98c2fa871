"""``lesft eval``: accuracy of the base model or a trained adapter on a dataset split."""

from __future__ import annotations

import functools
import inspect
import json
import random
import time
from pathlib import Path
from typing import Callable, Optional

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from lesft.cli.console import console
from lesft.config import Config, ModelConfig
from lesft.data import load_examples
from lesft.data.files import Scorer, load_data_file
from lesft.options import config_command, fail

DEFAULT_BATCH = 16


def _own_batch_size(command: Callable) -> Callable:
    """Give a config command its own ``--batch-size`` (the generation batch).

    The config tree already has ``batch_size`` (samples per client per round, default 1),
    which would otherwise claim the flag; here the flag means rows generated together.
    """
    params = [p for p in inspect.signature(command).parameters.values()
              if p.name not in ("batch_size", "gen_batch_size")]
    own = inspect.Parameter("batch_size", inspect.Parameter.KEYWORD_ONLY, annotation=int,
                            default=typer.Option(DEFAULT_BATCH, "--batch-size",
                                                 help="prompts generated together (greedy results do not depend on it)"))

    takes_setting = "batch_size" in inspect.signature(command).parameters  # the config flag, when offered

    @functools.wraps(command)
    def wrapper(**kwargs):
        gen_batch_size = kwargs.pop("batch_size")
        return command(gen_batch_size=gen_batch_size, **({"batch_size": None} if takes_setting else {}), **kwargs)

    at = next((i for i, p in enumerate(params) if p.name == "config"), len(params))
    wrapper.__signature__ = inspect.Signature(params[:at] + [own] + params[at:])  # type: ignore[attr-defined]
    del wrapper.__wrapped__
    return wrapper


def adapter_base_model(adapter: str) -> str | None:
    """The base model an adapter folder was trained on: lesft's own record of the run's local
    folder (or model name), else PEFT's ``base_model_name_or_path`` when it is a folder here."""
    folder = Path(adapter).expanduser()
    try:
        meta = json.loads((folder / "lesft.json").read_text())
    except (OSError, ValueError):
        meta = {}
    base = meta.get("base_folder")
    if isinstance(base, str) and Path(base).is_dir():
        return base
    if isinstance(meta.get("model"), str):
        return meta["model"]
    try:
        base = json.loads((folder / "adapter_config.json").read_text()).get("base_model_name_or_path")
    except (OSError, ValueError):
        return None
    return base if isinstance(base, str) and Path(base).is_dir() else None


def default_output(adapter: str | None, dataset: str, split: str, runs_dir: str) -> Path:
    """``<run dir>/eval-<dataset>-<split>.jsonl`` beside ``<run dir>/adapter``; other adapter
    folders (``adapter-client1``) prefix their name; no adapter: ``<runs dir>/eval-...``."""
    name = f"eval-{dataset}-{split}.jsonl"
    if adapter is None:
        return Path(runs_dir) / name
    folder = Path(adapter).expanduser().resolve()
    return folder.parent / (name if folder.name == "adapter" else f"eval-{folder.name}-{dataset}-{split}.jsonl")


@_own_batch_size
@config_command(only=("model", "cache_dir", "dtype", "dataset", "data_dir", "data_seed", "device", "threads", "runs_dir",
                      "data", "data_fields", "max_length"))
def eval_command(
    adapter: Optional[str] = typer.Option(None, "--adapter", help="PEFT adapter folder of a run (default: the base model)"),
    split: str = typer.Option("test", "--split", help="dataset split (commonsenseqa test = the labelled dev file)"),
    limit: Optional[int] = typer.Option(None, "--limit", help="evaluate a random sample of n questions (seed: --data-seed) "
                                                                 "\\[default: the whole split: hours on CPU for gsm8k]"),
    max_new_tokens: int = typer.Option(256, "--max-new-tokens", help="longest continuation"),
    out: Optional[str] = typer.Option(None, "--out", help="per-question JSONL (default: beside the adapter)"),
    first_line: bool = typer.Option(False, "--first-line", help="stop each answer at its first newline "
                                                               "(lesft's training targets are one line)"),
    answer_regex: Optional[str] = typer.Option(None, "--answer-regex", help="with --data: score the regex's first "
                                               "group (or whole match) in the output against the completion's"),
    extract: Optional[str] = typer.Option(None, "--extract", help="with --data: score with a built-in extractor, "
                                          "gsm8k (numbers) or choice (letters A-E)"),
    gen_batch_size: int = DEFAULT_BATCH,
    *, cfg: Config) -> None:
    """Greedy-decode a dataset split, or your own file (--data test.jsonl), and report accuracy
    with its 95% Wilson interval."""
    from lesft.engine import dtype_of, resolve_device, set_threads
    from lesft.evaluate import evaluate, load_for_eval, write_records, write_summary
    from lesft.models import source_for

    if limit is not None and limit < 1:
        fail(f"--limit {limit} is not valid: evaluate at least 1 question.")
    if max_new_tokens < 1:
        fail(f"--max-new-tokens {max_new_tokens} is not valid: it must be >= 1.")
    if gen_batch_size < 1:
        fail(f"--batch-size {gen_batch_size} is not valid: it must be >= 1.")
    set_threads(cfg)
    if adapter and (Path(adapter) / "adapter").is_dir() and not (Path(adapter) / "adapter_config.json").is_file():
        fail(f"{adapter} is a run folder: pass --adapter {Path(adapter) / 'adapter'}.")
    if adapter and cfg.model.model == ModelConfig().model:  # --model not given: the adapter's own base
        base = adapter_base_model(adapter)
        if base and base != cfg.model.model:
            cfg = cfg.replace(model=base)
            console.print(f"model from the adapter's metadata: {base} (pass --model to choose another)",
                          highlight=False)
    device = resolve_device(cfg.train.device)
    source = source_for(cfg)
    scorer, name = None, cfg.data.dataset
    if cfg.data.data:
        examples, scorer = own_eval_examples(cfg, source.load_tokenizer(), limit, answer_regex, extract)
        name, split = Path(cfg.data.data).stem, "own"
        console.print(f"scoring {cfg.data.data} by {scorer.mode} match", highlight=False)
    elif answer_regex or extract:
        fail("--answer-regex and --extract score your own file: pass it with --data test.jsonl.")
    else:
        examples = load_examples(cfg.data.dataset, split, n=limit, seed=cfg.data.data_seed,
                                 data_dir=cfg.data.data_dir or None)
    path = Path(out) if out else default_output(adapter, name, split, cfg.run.runs_dir)
    if path.suffix != ".jsonl":
        fail(f"--out {path} should end in .jsonl (the summary goes beside it as .json).")
    path.parent.mkdir(parents=True, exist_ok=True)  # an unwritable --out fails now, not after the evaluation
    start = time.perf_counter()
    model = load_for_eval(source, adapter, device=device, dtype=dtype_of(cfg.model.dtype))
    tokenizer = source.load_tokenizer()
    load_s = time.perf_counter() - start

    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TextColumn("correct {task.fields[correct]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                  console=console) as progress:
        task = progress.add_task(f"eval {name}/{split}", total=len(examples), correct=0)
        result = evaluate(model, tokenizer, examples, max_new_tokens=max_new_tokens, batch_size=gen_batch_size,
                          first_line=first_line, scorer=scorer,
                          progress=lambda done, total, correct: progress.update(task, completed=done,
                                                                                 correct=correct))
    if scorer is not None:
        result.dataset = f"{cfg.data.data} ({scorer.mode} match)"
    write_records(result, path)
    summary = dict(result.summary(), split=split, model=source.spec, random_weights=source.random_weights,
                   adapter=str(adapter) if adapter else None, limit=limit, data_seed=cfg.data.data_seed,
                   max_new_tokens=max_new_tokens, batch_size=gen_batch_size, first_line=first_line, device=str(device),
                   dtype=cfg.model.dtype, load_seconds=load_s, records=str(path), config=cfg.to_dict())
    summary_path = write_summary(summary, path.with_suffix(".json"))
    _print_result(result, summary, source.label)
    console.print(f"records: {path}\nsummary: {summary_path}", highlight=False)


def own_eval_examples(cfg: Config, tokenizer, limit: int | None, answer_regex: str | None = None,
                      extract: str | None = None):
    """The examples of the held-out file ``--data`` (a seeded sample of ``limit``) and their scorer."""
    scorer = Scorer(answer_regex, extract)
    examples = load_data_file(cfg.data.data, tokenizer, fields=cfg.data.data_fields).examples
    if limit is not None and limit < len(examples):
        keep = sorted(random.Random(cfg.data.data_seed).sample(range(len(examples)), limit))
        examples = [examples[i] for i in keep]
    return examples, scorer


def _print_result(result, summary: dict, model_label: str) -> None:
    table = Table("", "", title="lesft eval", show_header=False)
    table.add_row("dataset", f"{result.dataset} / {summary['split']}")
    table.add_row("model", model_label)
    table.add_row("adapter", summary["adapter"] or "none (base model)")
    table.add_row("correct", f"{result.correct} of {result.n}")
    table.add_row("accuracy", f"[bold]{100 * result.accuracy:.1f}%[/]  (95% CI {100 * result.ci_low:.1f}-"
                              f"{100 * result.ci_high:.1f}%, Wilson)")
    table.add_row("generation", f"{result.new_tokens} tokens in {result.seconds:.1f} s "
                                f"({result.tokens_per_s:.1f} tokens/s, batch {summary['batch_size']}, "
                                f"{summary['device']})")
    console.print(table)
    if summary["random_weights"]:
        console.print("[yellow]random weights: this accuracy measures only the mechanics.[/]")
