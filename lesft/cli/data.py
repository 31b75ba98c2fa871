"""``lesft data distill``: teacher chains of thought for ``--teacher-cot`` (paper sec. 4.1).

A local teacher model answers training questions with a step-by-step prompt; only the
chains whose extracted answer is right are kept, until ``--n`` are collected.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from lesft.answers import extract_answer, is_correct, truncate_continuation
from lesft.atomic import atomic_write
from lesft.cli.console import console
from lesft.config import Config
from lesft.data import load_examples
from lesft.options import config_command, fail

COT_CUE = " Let's think step by step."


def distill_chains(teacher, tok, examples, n: int, *, max_new_tokens: int, batch_size: int, chunk: int = 32,
                   on_chunk=None) -> tuple[list[dict], int]:
    """Generate chains for ``examples`` in chunks until ``n`` correct ones are kept.
    Returns (kept records, questions tried)."""
    from lesft.evaluate import generate  # here: it loads torch and transformers

    kept: list[dict] = []
    tried = 0
    for start in range(0, len(examples), chunk):
        part = examples[start:start + chunk]
        outs = generate(teacher, tok, [ex.x + COT_CUE for ex in part], max_new_tokens=max_new_tokens,
                        batch_size=batch_size)
        tried += len(part)
        for ex, out in zip(part, outs):
            cot = truncate_continuation(out).strip()
            pred = extract_answer(cot, ex.dataset)
            if cot and is_correct(pred, ex.answer, ex.dataset):
                kept.append({"dataset": ex.dataset, "uid": ex.uid, "question": ex.x, "cot": cot, "answer": ex.answer})
                if len(kept) >= n:
                    return kept, tried
        if on_chunk:
            on_chunk(len(kept), tried)
    return kept, tried


@config_command(only=("cache_dir", "device", "dataset", "data_dir", "data_seed", "runs_dir"))
def distill(teacher: str = typer.Option(..., "--teacher", help="teacher model: a local HF folder (or smollm2-135m)"),
            n: int = typer.Option(800, "--n", help="correct chains to keep"),
            pool: int = typer.Option(0, "--pool", help="training questions to try at most (0: the whole split)"),
            out: Optional[str] = typer.Option(None, "--out", help="output JSONL (default runs/teacher-<dataset>.jsonl)"),
            max_new_tokens: int = typer.Option(256, "--max-new-tokens", help="generation budget per question"),
            gen_batch_size: int = typer.Option(8, "--gen-batch-size", help="prompts generated together"),
            *, cfg: Config) -> None:
    """Write teacher chains of thought that `--teacher-cot FILE` reads (only correctly answered ones)."""
    from lesft.engine import resolve_device
    from lesft.evaluate import load_for_eval
    from lesft.models import resolve

    if n < 1:
        fail("--n must be >= 1.")
    source = resolve(teacher, cfg.model.cache_dir or None)
    tok = source.load_tokenizer()
    model = load_for_eval(source, None, device=resolve_device(cfg.train.device))
    d = cfg.data
    examples = load_examples(d.dataset, "train", data_dir=d.data_dir or None, n=pool or None, seed=d.data_seed)
    path = Path(out) if out else Path(cfg.run.runs_dir) / f"teacher-{d.dataset}.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)  # fail now, not after the teacher ran
    with console.status(f"{source.label} answering {d.dataset} training questions ...") as status:
        kept, tried = distill_chains(model, tok, examples, n, max_new_tokens=max_new_tokens, batch_size=gen_batch_size,
                                     on_chunk=lambda k, t: status.update(f"kept {k}/{n} correct chains of {t} tried"))
    if not kept:
        fail(f"the teacher answered none of {tried} questions correctly: use a stronger --teacher.")
    atomic_write(path, "".join(json.dumps(r) + "\n" for r in kept))
    console.print(f"kept {len(kept)} correct chains of {tried} questions tried ({100 * len(kept) / tried:.1f}%) -> "
                  f"[bold]{path}[/]; train with --teacher-cot {path}"
                  + ("" if len(kept) >= n else f" (fewer than --n {n}: the pool ran out)"))
