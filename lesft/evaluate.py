"""Evaluation of a base model or a trained adapter: greedy generation, answer scoring,
and a deterministic loss probe.

Generation is a plain greedy loop over the causal LM with a KV cache. Prompts are left
padded and ``position_ids`` come from the attention mask (as in training, see
:func:`lesft.split.position_ids`), so a row's tokens do not depend on the batch it sits
in: batch size 1 and batch size 16 give the same text (up to floating-point summation
order, which only matters at near-ties of the top two logits). Batching is continuous:
a finished row leaves the batch and the next prompts join the running one, so a long
answer does not hold idle slots (on the GSM8K workload of a base model most answers end
within 30 tokens and a few run to the limit).

A row stops at EOS (or any other special token), after ``max_new_tokens``, or
(``stop_at_newline_question``) once the model has started the next example
("\\nQuestion:" and the other restarts that :func:`lesft.answers.truncate_continuation`
cuts at): nothing after that point can change the extracted answer, and a base model
often goes on to invent new questions.
"""

from __future__ import annotations

import inspect
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch

from lesft import lora
from lesft.answers import _RESTART, extract_answer, is_correct, wilson_interval
from lesft.atomic import atomic_write
from lesft.batching import collate, encode_all
from lesft.config import ConfigError, LoraSettings
from lesft.data import DataError, Example
from lesft.loss import head_logprobs, sft_token_loss
from lesft.lora import AdapterError
from lesft.models import ModelSource
from lesft.split import FullModel, position_ids

# --------------------------------------------------------------------------- loading


def adapter_settings(folder: str | Path) -> tuple[LoraSettings, list[int] | None]:
    """The LoRA settings a PEFT adapter folder was trained with, and its ``layers_to_transform``."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise AdapterError(f"adapter folder not found: {folder}. Pass --adapter the adapter/ folder "
                           "of a finished run (runs/<run id>/adapter).")
    path = folder / "adapter_config.json"
    if not path.is_file():
        raise AdapterError(f"{path} not found: pass --adapter a PEFT adapter folder "
                           "(adapter_config.json + adapter_model.safetensors).")
    try:
        cfg = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise AdapterError(f"{path} is not valid JSON ({e}): re-export the adapter.") from None
    for flag in ("use_dora", "use_rslora", "lora_bias"):
        if cfg.get(flag):
            raise AdapterError(f"{path}: {flag}=true is not supported; lesft adapters are plain LoRA.")
    for pattern in ("rank_pattern", "alpha_pattern"):
        if cfg.get(pattern):
            raise AdapterError(f"{path}: a per-module {pattern} is not supported; lesft adapters use one rank.")
    targets = cfg.get("target_modules")
    if isinstance(targets, str):
        targets = [targets] if targets.isidentifier() else None
    if not targets or not all(isinstance(t, str) and t.isidentifier() for t in targets):
        raise AdapterError(f"{path}: target_modules {cfg.get('target_modules')!r} is not a list of module "
                           "names (e.g. [\"gate_proj\", \"up_proj\"]).")
    try:
        settings = LoraSettings(lora_r=int(cfg["r"]), lora_alpha=float(cfg["lora_alpha"]),
                                lora_dropout=float(cfg.get("lora_dropout") or 0.0), lora_targets=tuple(targets))
    except (KeyError, TypeError, ValueError, ConfigError) as e:
        raise AdapterError(f"{path}: unusable LoRA settings ({e}).") from None
    layers = cfg.get("layers_to_transform")
    if isinstance(layers, int):
        layers = [layers]
    return settings, (sorted(int(i) for i in layers) if layers else None)


def load_for_eval(source: ModelSource, adapter: str | Path | None, device: str | torch.device = "cpu",
                  dtype: torch.dtype = torch.float32) -> FullModel:
    """The whole model in eval mode, with the adapter of a PEFT folder applied (or none).

    LoRA is injected with the adapter's own settings (rank, alpha, target modules).
    Layers outside its ``layers_to_transform`` get LoRA with ``B = 0``, which is exactly
    the base layer.
    """
    model = FullModel(source, dtype)
    if adapter is not None:
        settings, layers = adapter_settings(adapter)
        tensors = lora.load_peft_adapter(Path(adapter).expanduser())
        lora.add_lora(model, settings)
        if layers is not None:
            own = set(layers)
            live = lora.adapter_params(model)
            # B is zero after add_lora, so these leave their layers unchanged
            tensors = {**{k: p.detach().clone() for k, p in live.items() if int(k.split(".")[1]) not in own},
                       **tensors}
        lora.set_adapters(model, tensors)
    model.to(device).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


# --------------------------------------------------------------------------- generation


def _restarted(text: str) -> bool:
    """Whether the cut of :func:`~lesft.answers.truncate_continuation` is settled.

    One character must follow the match: a pattern ending in ``\\b`` ("\\n\\nQuestion")
    could still fail if the next character continues the word.
    """
    m = _RESTART.search(text)
    return m is not None and m.end() < len(text)


def _end_ids(tokenizer, extra: Sequence[int] = ()) -> set[int]:
    """Tokens that end a row: EOS and every other special token of the tokenizer.

    Decoding skips special tokens, so a row that went on after "<|endoftext|>" or
    "<|im_start|>" would glue a new text onto its answer without the marker that
    :func:`~lesft.answers.truncate_continuation` cuts at.
    """
    ids = {tokenizer.eos_token_id, *tokenizer.all_special_ids, *extra}
    return {int(i) for i in ids if i is not None}


@dataclass
class _Running:
    """The rows being decoded: prompt index per row, their KV cache, ``mask [b, T]``, the
    position of the next token ``[b, 1]`` and the logits that choose it ``[b, V]``."""

    index: list[int]
    cache: object
    mask: torch.Tensor
    next_pos: torch.Tensor
    logits: torch.Tensor


def _cache_arg(lm) -> str:
    # transformers 5.x renamed ``past_key_values`` to ``cache``
    return "cache" if "cache" in inspect.signature(type(lm).forward).parameters else "past_key_values"


def _kv(cache) -> list[tuple[torch.Tensor, torch.Tensor]] | None:
    """Per-layer ``(keys, values)`` ``[b, heads, T, dim]`` of a plain full-attention cache,
    or None where rows cannot be moved between caches (sliding-window layers, other layouts)."""
    from transformers.cache_utils import DynamicLayer

    layers = getattr(cache, "layers", None)
    if not layers or any(type(layer) is not DynamicLayer or not layer.is_initialized for layer in layers):
        return None
    return [(layer.keys, layer.values) for layer in layers]


def _prefill(lm, prompts: Sequence[Sequence[int]], index: list[int], pad_id: int) -> _Running:
    """Run left-padded prompts through the model; the logits of their first new token."""
    from transformers import DynamicCache

    dev = next(lm.parameters()).device
    width = max(len(r) for r in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for b, r in enumerate(prompts):
        ids[b, width - len(r):] = torch.tensor(list(r), dtype=torch.long)
        mask[b, width - len(r):] = 1
    ids, mask = ids.to(dev), mask.to(dev)
    pos = position_ids(mask)
    cache = DynamicCache(config=lm.config)
    out = lm(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, logits_to_keep=1,
             **{_cache_arg(lm): cache})
    return _Running(index, cache, mask, pos[:, -1:] + 1, out.logits[:, -1])


def _select(run: _Running, keep: list[int]) -> _Running:
    """Only the rows ``keep``, without the left columns none of them uses any more."""
    from transformers import DynamicCache

    sel = torch.tensor(keep, device=run.mask.device)
    mask = run.mask[sel]
    kv = _kv(run.cache)
    if kv is None:
        run.cache.batch_select_indices(sel)
        cache, start = run.cache, 0
    else:
        start = int(mask.any(dim=0).int().argmax())
        cache = DynamicCache(ddp_cache_data=[(k[sel, :, start:], v[sel, :, start:]) for k, v in kv])
    return _Running([run.index[j] for j in keep], cache, mask[:, start:], run.next_pos[sel], run.logits[sel])


def _concat(a: _Running, b: _Running) -> _Running:
    """Both sets of rows in one batch: the narrower cache is left padded (masked out)."""
    from transformers import DynamicCache

    width = max(a.mask.shape[1], b.mask.shape[1])

    def left(t: torch.Tensor, dim: int) -> torch.Tensor:
        pad = [0, 0] * (t.dim() - 1 - dim) + [width - t.shape[dim], 0]  # F.pad counts from the last dim
        return torch.nn.functional.pad(t, pad)

    kv = [(torch.cat([left(ka, 2), left(kb, 2)]), torch.cat([left(va, 2), left(vb, 2)]))
          for (ka, va), (kb, vb) in zip(_kv(a.cache), _kv(b.cache))]
    return _Running(a.index + b.index, DynamicCache(ddp_cache_data=kv), torch.cat([left(a.mask, 1), left(b.mask, 1)]),
                    torch.cat([a.next_pos, b.next_pos]), torch.cat([a.logits, b.logits]))


@torch.no_grad()
def _greedy(lm, prompts: Sequence[Sequence[int]], order: list[int], batch_size: int, max_new_tokens: int,
            eos: set[int], pad_id: int, stop: Callable[[list[int]], bool] | None,
            on_done: Callable[[int, list[int]], None]) -> list[list[int]]:
    """Greedy continuations (token ids, EOS excluded) with continuous batching.

    Prompts enter in ``order``; when a quarter of the ``batch_size`` slots are free, the
    next prompts are prefilled and join the running batch, so one long answer does not
    hold finished slots idle. Where the cache layout does not allow moving rows, a new
    group starts only when the batch is empty.
    """
    queue = list(reversed(order))
    generated: list[list[int]] = [[] for _ in prompts]
    run: _Running | None = None
    refill_at = max(1, batch_size // 4)
    while queue or run is not None:
        free = batch_size - (len(run.index) if run is not None else 0)
        if queue and (run is None or (free >= refill_at and _kv(run.cache) is not None)):
            group = [queue.pop() for _ in range(min(free, len(queue)))]
            new = _prefill(lm, [prompts[i] for i in group], group, pad_id)
            run = new if run is None else _concat(run, new)
        tokens = run.logits.argmax(dim=-1)
        keep = []
        for j, t in enumerate(tokens.tolist()):
            row = generated[run.index[j]]
            if t not in eos:
                row.append(t)
            if t in eos or len(row) >= max_new_tokens or (stop is not None and stop(row)):
                on_done(run.index[j], row)
            else:
                keep.append(j)
        if not keep:
            run = None
            continue
        if len(keep) < len(run.index):
            tokens = tokens[torch.tensor(keep, device=tokens.device)]
            run = _select(run, keep)
        run.mask = torch.cat([run.mask, run.mask.new_ones((len(keep), 1))], dim=1)
        out = lm(input_ids=tokens[:, None], attention_mask=run.mask, position_ids=run.next_pos, use_cache=True,
                 **{_cache_arg(lm): run.cache})
        run.logits, run.next_pos = out.logits[:, -1], run.next_pos + 1
    return generated


def generate(model: FullModel, tokenizer, prompts: list[str], max_new_tokens: int = 256, batch_size: int = 16,
             stop_at_newline_question: bool = True, stats: dict | None = None,
             on_output: Callable[[int, str], None] | None = None, end_ids: Sequence[int] = ()) -> list[str]:
    """Greedy continuations of ``prompts`` (decoded, special tokens skipped, raw text).

    Up to ``batch_size`` prompts decode together, longest prompts first; the outputs come
    back in the order of ``prompts``. Prompts longer than the model's positions allow
    (with room for ``max_new_tokens``) lose their left end. ``on_output(i, text)`` is
    called as each prompt finishes; ``stats``, when given, gets ``new_tokens`` (per
    prompt) and ``seconds``. A row ends at EOS or any special token (or ``end_ids``).
    """
    if max_new_tokens < 1 or batch_size < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens} and batch_size={batch_size} must both be >= 1")
    start = time.perf_counter()
    encoded = [list(tokenizer(p).input_ids) for p in prompts]
    max_pos = getattr(model.lm.config, "max_position_embeddings", None)
    if max_pos:
        room = max(1, int(max_pos) - max_new_tokens)
        encoded = [e[-room:] for e in encoded]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    def stop(row: list[int]) -> bool:
        return _restarted(tokenizer.decode(row, skip_special_tokens=True))

    def done(i: int, row: list[int]) -> None:
        if on_output is not None:
            on_output(i, tokenizer.decode(row, skip_special_tokens=True))

    order = sorted(range(len(prompts)), key=lambda i: -len(encoded[i]))
    was_training = model.training
    model.eval()
    try:
        ids = _greedy(model.lm, encoded, order, batch_size, max_new_tokens, _end_ids(tokenizer, end_ids), pad_id,
                      stop if stop_at_newline_question else None, done) if prompts else []
    finally:
        model.train(was_training)
    if stats is not None:
        stats["new_tokens"] = [len(r) for r in ids]
        stats["seconds"] = time.perf_counter() - start
    return [tokenizer.decode(r, skip_special_tokens=True) for r in ids]


# --------------------------------------------------------------------------- scoring


@dataclass
class EvalResult:
    """Accuracy on one dataset with its 95% Wilson interval, and one record per question."""

    dataset: str
    n: int
    correct: int
    accuracy: float
    ci_low: float
    ci_high: float
    records: list[dict] = field(default_factory=list)
    new_tokens: int = 0
    seconds: float = 0.0

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.seconds if self.seconds > 0 else 0.0

    def summary(self) -> dict:
        """Everything but the records (for the JSON summary)."""
        out = {k: v for k, v in asdict(self).items() if k != "records"}
        out["tokens_per_s"] = self.tokens_per_s
        return out


def newline_ids(tokenizer) -> list[int]:
    """Ids of every token whose text holds a newline (to stop at the end of a line)."""
    return [i for i in range(len(tokenizer)) if "\n" in tokenizer.decode([i])]


def evaluate(model: FullModel, tokenizer, examples: list[Example], max_new_tokens: int = 256, batch_size: int = 16,
             progress: Callable[[int, int, int], None] | None = None, first_line: bool = False,
             scorer: Callable[[str, Example], tuple[str | None, bool]] | None = None) -> EvalResult:
    """Greedy answers to ``examples`` (one dataset), scored with :mod:`lesft.answers`.

    ``progress(done, total, correct_so_far)`` is called as answers finish. Records keep
    the order of ``examples``. ``first_line`` stops each answer at its first newline (the
    training targets are one line), which makes evaluation much faster. ``scorer(output,
    example) -> (prediction, correct)`` replaces the dataset's extractor (a user's own file,
    :class:`lesft.data.files.Scorer`).
    """
    if not examples:
        raise DataError("no examples to evaluate: check --limit and the dataset split.")
    datasets = {ex.dataset for ex in examples}
    if len(datasets) > 1:
        raise DataError(f"evaluate one dataset at a time (got {', '.join(sorted(datasets))}).")
    dataset = examples[0].dataset
    if scorer is None:
        def scorer(text: str, ex: Example) -> tuple[str | None, bool]:
            pred = extract_answer(text, dataset)
            return pred, is_correct(pred, ex.answer, dataset)
    start = time.perf_counter()
    tally = {"done": 0, "correct": 0}

    def on_output(i: int, text: str) -> None:
        tally["done"] += 1
        tally["correct"] += scorer(text, examples[i])[1]
        if progress is not None:
            progress(tally["done"], len(examples), tally["correct"])

    stats: dict = {}
    outputs = generate(model, tokenizer, [ex.x for ex in examples], max_new_tokens=max_new_tokens,
                       batch_size=batch_size, stats=stats, on_output=on_output,
                       end_ids=newline_ids(tokenizer) if first_line else ())
    counts = stats.get("new_tokens") or [0] * len(examples)
    records = []
    for ex, text, n_tok in zip(examples, outputs, counts):
        pred, ok = scorer(text, ex)
        records.append(dict(uid=ex.uid, kind=ex.kind, prompt=ex.x, output=text, extracted=pred, gold=ex.answer,
                            correct=ok, new_tokens=n_tok))
    n, correct = len(records), sum(r["correct"] for r in records)
    if progress is not None:
        progress(n, n, correct)
    lo, hi = wilson_interval(correct, n)
    return EvalResult(dataset=dataset, n=n, correct=correct, accuracy=correct / n, ci_low=lo, ci_high=hi,
                      records=records, new_tokens=sum(counts), seconds=time.perf_counter() - start)


def write_records(result: EvalResult, path: str | Path) -> Path:
    """One JSON object per question (JSONL), written atomically."""
    lines = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in result.records)
    return atomic_write(path, lines)


def write_summary(summary: dict, path: str | Path) -> Path:
    return atomic_write(path, json.dumps(summary, indent=2, default=str) + "\n")


# --------------------------------------------------------------------------- loss probe


@torch.no_grad()
def probe_loss(model: FullModel, tokenizer, examples: Sequence[Example], max_length: int = 256,
               batch_size: int = 4) -> float:
    """Mean over examples of the per-row target NLL of ``y`` given ``x`` (eq. 17, weights 1).

    No dropout and no gradient, so the number is deterministic: a "did training lower the
    loss on this data" probe. Sequences are truncated as in training (``max_length``).
    """
    items = encode_all(tokenizer, examples, max_length)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    dev = next(model.parameters()).device
    total, rows = 0.0, 0
    was_training = model.training
    model.eval()
    try:
        with lora.no_dropout():
            for s in range(0, len(items), batch_size):
                batch = collate(items[s:s + batch_size], pad_id)
                base = batch.base
                hidden = model.hidden(base.input_ids.to(dev), base.attention_mask.to(dev))
                lp, mask, _ = head_logprobs(model.head, hidden, base.y_start.to(dev), batch.y_len.to(dev),
                                            batch.targets.to(dev))
                tl = sft_token_loss(lp, mask)
                total += float(tl.total)
                rows += int(tl.valid.sum())
    finally:
        model.train(was_training)
    if rows == 0:
        raise DataError("probe_loss got no example with target tokens.")
    return total / rows
