"""LoRA on each side of the split, as an explicit surface.

Adapters are injected with ``peft`` into a part (client, server or full model). Their
tensors travel and aggregate under *canonical names* that do not depend on which side
holds them: ``layers.<global layer>.<module path>.lora_A`` / ``.lora_B``. The two sides'
adapters therefore combine into one PEFT adapter for the full model.

Two determinism choices make the multi-process run reproduce the in-process one exactly:
``lora_A`` is initialised from a generator seeded by its canonical name (``lora_B`` is
zero, as in PEFT, so round 0 equals the base model), and LoRA dropout draws each row's
mask from a key of (seed, client, round, row) instead of the global RNG, so the masks do
not depend on which process runs a row or which microbatch it lands in.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import math
import os
import re
import tempfile
import zlib
from pathlib import Path
from typing import Iterable, Iterator, Mapping

import torch
from torch import nn

from lesft.atomic import atomic_path
from lesft.config import LoraSettings

_ADAPTER = "default"
_PARAM = re.compile(r"layers\.(\d+)\.(.+)\.lora_([AB])\." + _ADAPTER + r"\.weight$")
_ROW_KEYS: contextvars.ContextVar[tuple | None] = contextvars.ContextVar("lesft_row_keys", default=None)
_NO_DROPOUT: contextvars.ContextVar[bool] = contextvars.ContextVar("lesft_no_dropout", default=False)
_MASK64 = (1 << 63) - 1


class AdapterError(ValueError):
    """Adapter tensors that do not fit the model (names, shapes, values)."""


def _mix(*parts: int) -> int:
    """A 63-bit hash of integers (splitmix64 steps): stable across processes and runs."""
    h = 0x9E3779B97F4A7C15
    for p in parts:
        h = (h ^ (p & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        h = (h ^ (h >> 31)) * 0x94D049BB133111EB & 0xFFFFFFFFFFFFFFFF
        h ^= h >> 29
    return h & _MASK64


def row_keys(seed: int, worker: int, round_: int, n_rows: int) -> torch.Tensor:
    """Dropout keys ``[n_rows]`` of one worker's rows in one round."""
    return torch.tensor([_mix(seed, worker, round_, j) for j in range(n_rows)], dtype=torch.int64)


@contextlib.contextmanager
def dropout_rows(keys: torch.Tensor | None, lengths: torch.Tensor | None = None) -> Iterator[None]:
    """Forward passes inside draw LoRA dropout masks from these per-row keys ``[B]``;
    with ``lengths [B]`` only a row's real (unpadded) positions are drawn."""
    token = _ROW_KEYS.set(None if keys is None else (keys.tolist(), None if lengths is None else lengths.tolist()))
    try:
        yield
    finally:
        _ROW_KEYS.reset(token)


@contextlib.contextmanager
def no_dropout() -> Iterator[None]:
    """Forward passes inside skip LoRA dropout (the reference path: a deterministic signal)."""
    token = _NO_DROPOUT.set(True)
    try:
        yield
    finally:
        _NO_DROPOUT.reset(token)


@contextlib.contextmanager
def adapters_disabled(part: nn.Module) -> Iterator[None]:
    """Forward passes of ``part`` inside run without its LoRA (the frozen base model); the
    adapters, their ``requires_grad`` and any gradient stay as they are. A part without LoRA
    is unchanged."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [m for m in part.modules() if isinstance(m, BaseTunerLayer)]
    before = [m._disable_adapters for m in layers]
    for m in layers:
        m._disable_adapters = True  # peft's own switch; enable_adapters() would also touch requires_grad
    try:
        yield
    finally:
        for m, b in zip(layers, before):
            m._disable_adapters = b


class KeyedDropout(nn.Module):
    """Dropout whose mask for row b comes from ``(row_keys[b], salt)``.

    The mask of a row ``[T, H]`` is drawn in row-major order, so its first ``t`` positions
    do not depend on how much padding follows: the same row gives the same mask in any batch.
    Without keys (plain use of the module) it falls back to ordinary dropout.
    """

    def __init__(self, p: float, salt: int) -> None:
        super().__init__()
        self.p, self.salt = float(p), int(salt)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0 or _NO_DROPOUT.get():
            return x
        rows = _ROW_KEYS.get()
        if rows is None or x.dim() < 2 or len(rows[0]) != x.shape[0]:
            return nn.functional.dropout(x, self.p, True)
        keys, lengths = rows
        gen = torch.Generator(device=x.device)
        keep = torch.ones(x.shape, dtype=torch.bool, device=x.device)  # padding: kept, never looked at
        for b, key in enumerate(keys):
            n = x.shape[1] if lengths is None or x.dim() < 3 else min(int(lengths[b]), x.shape[1])
            gen.manual_seed(_mix(key, self.salt))
            keep[b, :n] = torch.rand((n, *x.shape[2:]), generator=gen, device=x.device) >= self.p
        return x * keep.to(x.dtype) / (1.0 - self.p)

    def extra_repr(self) -> str:
        return f"p={self.p}, salt={self.salt}"


def peft_config(settings: LoraSettings, base_model: str = ""):
    from peft import LoraConfig

    return LoraConfig(r=settings.lora_r, lora_alpha=settings.lora_alpha, lora_dropout=settings.lora_dropout,
                      target_modules=list(settings.lora_targets), bias="none", task_type="CAUSAL_LM",
                      base_model_name_or_path=base_model or None)


def settings_dict(settings: LoraSettings) -> dict:
    return {"r": settings.lora_r, "alpha": settings.lora_alpha, "dropout": settings.lora_dropout,
            "targets": sorted(settings.lora_targets)}


def _canonical(part: nn.Module, param_name: str) -> str | None:
    m = _PARAM.search(param_name)
    if not m:
        return None
    return f"layers.{part.global_layer(int(m.group(1)))}.{m.group(2)}.lora_{m.group(3)}"


def add_lora(part: nn.Module, settings: LoraSettings, seed: int = 0) -> nn.Module:
    """Inject LoRA into a split part (``ClientModel``/``ServerModel``/``FullModel``) in place.

    Only modules inside decoder layers are targeted. ``lora_A`` gets a name-seeded
    Kaiming-uniform init, ``lora_B`` stays zero.
    """
    from peft import inject_adapter_in_model

    inner = part.body if hasattr(part, "body") else part.lm
    names = {n.rsplit(".", 1)[-1] for n, _ in inner.named_modules()}
    missing = [t for t in settings.lora_targets if t not in names]
    if missing:
        layer_modules = sorted({n.rsplit(".", 1)[-1] for n, m in inner.named_modules()
                                if isinstance(m, nn.Linear) and ".layers." in f".{n}"})
        raise AdapterError(f"lora_targets {', '.join(missing)} match no module of this model; "
                           f"choose from {', '.join(layer_modules)}.")
    cfg = peft_config(settings)
    cfg.target_modules = [rf".*layers\.\d+\..*\b{re.escape(t)}$" for t in settings.lora_targets]
    cfg.target_modules = "|".join(f"(?:{t})" for t in cfg.target_modules)
    inject_adapter_in_model(cfg, inner, adapter_name=_ADAPTER)
    for name, module in list(part.named_modules()):
        drop = getattr(module, "lora_dropout", None)
        if isinstance(drop, nn.ModuleDict) and _ADAPTER in drop:
            canon = _canonical(part, f"{name}.lora_A.{_ADAPTER}.weight")
            drop[_ADAPTER] = KeyedDropout(settings.lora_dropout, zlib.crc32(str(canon).encode()))
    with torch.no_grad():
        for name, p in adapter_params(part).items():
            if name.endswith("lora_A"):
                g = torch.Generator().manual_seed(_mix(seed, zlib.crc32(name.encode())))
                p.copy_(torch.nn.init.kaiming_uniform_(torch.empty(p.shape), a=math.sqrt(5), generator=g))
            else:
                p.zero_()
    for p in part.parameters():
        p.requires_grad_(False)
    for p in adapter_params(part).values():
        p.requires_grad_(True)
    return part


def adapter_shapes(config, layers: Iterable[int], settings: LoraSettings) -> dict[str, tuple[int, ...]]:
    """Canonical adapter names and shapes of ``layers`` for a model config, without weights
    (one decoder layer built on the meta device): what an aggregator must receive."""
    from transformers import AutoModel

    from lesft.split import _part_config

    with torch.device("meta"):
        body = AutoModel.from_config(_part_config(config, range(0, 1), tie=False))
    out: dict[str, tuple[int, ...]] = {}
    linears = [(n, m) for n, m in body.layers[0].named_modules()
               if isinstance(m, nn.Linear) and n.rsplit(".", 1)[-1] in settings.lora_targets]
    for i in layers:
        for name, m in linears:
            out[f"layers.{i}.{name}.lora_A"] = (settings.lora_r, m.in_features)
            out[f"layers.{i}.{name}.lora_B"] = (m.out_features, settings.lora_r)
    return dict(sorted(out.items(), key=lambda kv: _sort_key(kv[0])))


def adapter_params(part: nn.Module) -> dict[str, nn.Parameter]:
    """Canonical name -> the live LoRA parameter of this part."""
    out = {}
    for name, p in part.named_parameters():
        canon = _canonical(part, name)
        if canon is not None:
            out[canon] = p
    return dict(sorted(out.items(), key=lambda kv: _sort_key(kv[0])))


def _sort_key(name: str) -> tuple:
    layer, rest = name.split(".", 2)[1:]
    return (int(layer), rest)


def get_adapters(part: nn.Module) -> dict[str, torch.Tensor]:
    """A detached fp32 CPU copy of this part's adapters, by canonical name (for the wire)."""
    return {k: p.detach().to("cpu", torch.float32).clone() for k, p in adapter_params(part).items()}


def check_adapters(tensors: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor | tuple]) -> None:
    """Raise :class:`AdapterError` unless names and shapes match exactly and values are finite."""
    want = {k: tuple(v.shape) if isinstance(v, torch.Tensor) else tuple(v) for k, v in expected.items()}
    missing = sorted(set(want) - set(tensors), key=_sort_key)
    extra = sorted(set(tensors) - set(want))
    if missing:
        raise AdapterError(f"adapter tensor {missing[0]} is missing ({len(missing)} missing): "
                           "the adapters come from a different model, split point or LoRA config.")
    if extra:
        raise AdapterError(f"unexpected adapter tensor {extra[0]}: the adapters come from a different model, "
                           "split point or LoRA config.")
    for k, shape in want.items():
        t = tensors[k]
        if tuple(t.shape) != shape:
            raise AdapterError(f"adapter tensor {k} has shape {tuple(t.shape)}, this model needs {shape}: "
                               "the LoRA rank or the model differs.")
        if not torch.isfinite(t).all():
            raise AdapterError(f"adapter tensor {k} holds NaN or Inf: refusing to load it.")


def set_adapters(part: nn.Module, tensors: Mapping[str, torch.Tensor]) -> None:
    """Copy adapters (canonical names) into this part; all-or-nothing (checked first)."""
    params = adapter_params(part)
    check_adapters(tensors, params)
    with torch.no_grad():
        for k, p in params.items():
            p.copy_(tensors[k].to(p.device, p.dtype))


def _atomic_dir(out: Path) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))


def _replace_dir(tmp: Path, out: Path) -> None:
    """Swap a finished temp folder into place, never leaving a half-written adapter at ``out``."""
    import shutil

    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(out)


def save_peft_adapter(adapters: Mapping[str, torch.Tensor], settings: LoraSettings, out: str | Path,
                      base_model: str = "", extra: dict | None = None, n_layers: int | None = None) -> Path:
    """Write canonical adapters (both sides together) as one PEFT adapter for the full model.

    ``PeftModel.from_pretrained(full_causal_lm, out)`` loads it. Written atomically.
    """
    from safetensors.torch import save_file

    out = Path(out)
    tensors = {}
    for name, t in adapters.items():
        if not torch.isfinite(t).all():
            raise AdapterError(f"adapter tensor {name} holds NaN or Inf: not saving {out}.")
        layer_path, ab = name.rsplit(".", 1)
        tensors[f"base_model.model.model.{layer_path}.{ab}.weight"] = t.detach().to("cpu", torch.float32).contiguous()
    config = peft_config(settings, base_model)
    if n_layers is not None:
        # e.g. splitfrozen trains only the server's layers: say so, or PEFT would add fresh adapters
        layers = sorted({int(name.split(".")[1]) for name in adapters})
        if layers != list(range(n_layers)):
            config.layers_to_transform = layers
    tmp = _atomic_dir(out)
    try:
        save_file(tensors, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
        config.save_pretrained(str(tmp))
        if extra:
            (tmp / "lesft.json").write_text(json.dumps(extra, indent=2, default=str) + "\n")
        _replace_dir(tmp, out)
    except BaseException:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def load_peft_adapter(folder: str | Path) -> dict[str, torch.Tensor]:
    """Read a PEFT adapter written by :func:`save_peft_adapter` back to canonical names."""
    from safetensors.torch import load_file

    path = Path(folder) / "adapter_model.safetensors"
    if not path.is_file():
        raise AdapterError(f"{path} not found: pass the folder of a PEFT adapter (adapter_model.safetensors).")
    out = {}
    for key, t in _read(path, load_file).items():
        m = re.search(r"(layers\.\d+\..+)\.(lora_[AB])(?:\.[^.]+)?\.weight$", key)
        if not m:
            raise AdapterError(f"{path}: tensor {key} is not a LoRA weight of a decoder layer.")
        out[f"{m.group(1)}.{m.group(2)}"] = t
    return out


def save_adapters(adapters: Mapping[str, torch.Tensor], path: str | Path, metadata: dict | None = None) -> Path:
    """Atomically write plain canonical adapter tensors (one side) as safetensors."""
    from safetensors.torch import save_file

    path = Path(path)
    with atomic_path(path) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in adapters.items()}, str(tmp),
                  metadata={k: str(v) for k, v in (metadata or {}).items()})
    return path


def load_adapters(path: str | Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise AdapterError(f"adapter file not found: {path}.")
    return _read(path, load_file)


def _read(path: Path, load_file) -> dict[str, torch.Tensor]:
    """A safetensors file, or one line saying it is damaged (a truncated copy, another format)."""
    try:
        return load_file(str(path))
    except OSError:
        raise
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error type for any bad header
        raise AdapterError(f"{path} is not a readable safetensors file ({str(e).splitlines()[0]}): "
                           "copy it again from the run that wrote it.") from None
