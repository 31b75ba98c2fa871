"""A run's adapters merged into the base weights: a plain Hugging Face model."""

from __future__ import annotations

from pathlib import Path

from lesft.models import ModelSource
from lesft.split import FullModel


def merged_model(source: ModelSource, adapter_dir: str | Path):
    """The base causal LM with the PEFT adapter at ``adapter_dir`` merged in (``merge_and_unload``)."""
    from peft import PeftModel

    from lesft.lora import AdapterError

    adapter_dir = Path(adapter_dir)
    if not (adapter_dir / "adapter_config.json").is_file():
        raise AdapterError(f"{adapter_dir} is not a PEFT adapter folder (no adapter_config.json).")
    lm = FullModel(source).lm
    lm.config.use_cache = True
    for p in lm.parameters():  # FullModel freezes; a saved model should load trainable as usual
        p.requires_grad_(True)
    return PeftModel.from_pretrained(lm, str(adapter_dir)).merge_and_unload().eval()
