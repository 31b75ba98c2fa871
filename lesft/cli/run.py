"""Commands on a finished run folder: ``summary``, ``combine``, ``export``."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from lesft.cli.console import console
from lesft.config import Config
from lesft.data import load_examples
from lesft.methods import get_method
from lesft.options import fail, guarded
from lesft.report import EvalProgress, print_run_summary


def _run_config(run: Path) -> Config:
    if not run.is_dir():
        fail(f"run folder not found: {run}. Pass --run runs/<run-id>.")
    return Config.load(run / "config.json")


def _loss_line(cfg: Config) -> str:
    """The loss the run trained with, and why (the run's ``note``), on one line."""
    method = get_method(cfg.train.method)
    name = getattr(cfg.loss, "loss", "lesft") if cfg.train.method == "lesft" else "nll"
    if cfg.train.method == "lesft" and name == "lesft" and cfg.loss.lesft_nll_mix:
        name = f"lesft + {cfg.loss.lesft_nll_mix:g} x NLL"
    what = f"{name} ({method.label})"
    return f"{what}: {cfg.run.note}" if cfg.run.note else what


@guarded
def summary(run: Path = typer.Option(..., "--run", help="run folder (runs/<run-id>)"),
            eval_n: int = typer.Option(50, "--eval-n", help="held-out questions for accuracy before/after (0: skip)"),
            max_new_tokens: int = typer.Option(80, "--max-new-tokens", help="generation budget per question"),
            eval_data: Optional[Path] = typer.Option(None, "--eval-data", help="your own held-out file (JSONL/JSON/"
                                                     "CSV) for accuracy before/after, exact match of the final answer"),
            batch_size: int = typer.Option(16, "--batch-size", help="questions generated together"),
            ) -> None:
    """Summarise a finished run: rounds, loss curve, bytes per role, wall time, accuracy before/after."""
    from lesft.evaluate import evaluate, load_for_eval, probe_loss  # here: these load torch and transformers
    from lesft.models import source_for

    cfg = _run_config(run)
    extra: list[tuple[str, str]] = [("loss", _loss_line(cfg))]
    if eval_n > 0:
        if not (run / "adapter").is_dir():
            fail(f"{run}/adapter is missing: the run did not finish (see {run}/logs or the workers' output).")
        source = source_for(cfg)
        tok = source.load_tokenizer()
        split, name, scorer = "test", cfg.data.dataset, None
        if eval_data is not None:  # the user's own file (lesft eval --data scores the same way)
            from lesft.cli.eval import own_eval_examples

            examples, scorer = own_eval_examples(cfg.replace(data=str(eval_data)), tok, eval_n)
            split, name = "exact final answer", eval_data.name
        else:
            examples = load_examples(cfg.data.dataset, split, data_dir=cfg.data.data_dir or None, n=eval_n,
                                     seed=cfg.data.data_seed)
        results, losses = {}, {}
        for label, adapter in (("before", None), ("after", run / "adapter")):
            with EvalProgress(console, f"accuracy {label} fine-tuning ({name})") as shown:
                model = load_for_eval(source, adapter)
                losses[label] = probe_loss(model, tok, examples, max_length=cfg.data.max_length)
                results[label] = evaluate(model, tok, examples, max_new_tokens=max_new_tokens, first_line=True,
                                          scorer=scorer, batch_size=batch_size, progress=shown.update)
        extra.append((f"held-out target NLL (before -> after)", f"{losses['before']:.4f} -> {losses['after']:.4f}"))
        for label, res in results.items():
            extra.append((f"accuracy {label} ({res.n} held-out {name} {split}, first line)",
                          f"{100 * res.accuracy:.1f}%  [95% CI {100 * res.ci_low:.1f}–{100 * res.ci_high:.1f}]"))
        for label, res in results.items():
            formatted = sum("the answer is" in r["output"].lower() for r in res.records)
            extra.append((f"answers in the trained format {label}", f"{formatted}/{res.n}"))
    print_run_summary(run, console, extra, heldout=losses if eval_n > 0 else None)


@guarded
def combine(run: Path = typer.Option(..., "--run", help="run folder holding both sides' adapter files")) -> None:
    """Combine per-side adapters into one PEFT adapter (when the parties ran on different machines)."""
    from lesft.export import combine_run
    from lesft.models import source_for

    cfg = _run_config(run)
    source = source_for(cfg)
    for path in combine_run(run, cfg, source, get_method(cfg.train.method)):
        console.print(f"wrote {path}")


@guarded
def export(run: Path = typer.Option(..., "--run", help="finished run folder"),
           merge: Path = typer.Option(..., "--merge", help="output folder of the merged Hugging Face model"),
           adapter: str = typer.Option("adapter", "--adapter", help="adapter folder inside the run (e.g. adapter-client2)")) -> None:
    """Write a full Hugging Face model folder with the run's adapters merged (merge_and_unload)."""
    from lesft.export import merged_model
    from lesft.models import source_for

    cfg = _run_config(run)
    if not (run / adapter).is_dir():
        fail(f"{run / adapter} not found: the run has not finished, or pick --adapter adapter-client<i>.")
    if merge.exists() and (not merge.is_dir() or any(merge.iterdir())):
        fail(f"{merge} exists and is not an empty folder: choose a new folder.")
    merge.mkdir(parents=True, exist_ok=True)  # an unwritable --merge fails now, not after merging
    source = source_for(cfg)
    model = merged_model(source, run / adapter)
    model.save_pretrained(merge)
    source.load_tokenizer().save_pretrained(merge)
    console.print(f"merged model written to [bold]{merge}[/] "
                  f"({'random weights' if source.random_weights else source.spec} + {run / adapter}); "
                  "load it with AutoModelForCausalLM.from_pretrained")
