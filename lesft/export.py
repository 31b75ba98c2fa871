"""A run's adapters as files others load: per-side safetensors, one PEFT adapter for the
whole model (``adapter/``), and that adapter merged into the base weights (a plain
Hugging Face model)."""

from __future__ import annotations

from pathlib import Path

import torch

from lesft import lora
from lesft.config import Config
from lesft.methods import Method
from lesft.models import ModelSource
from lesft.runs import GLOBAL_CLIENT_FILE, SERVER_FILE, client_file
from lesft.split import FullModel, split_point


def adapter_meta(cfg: Config, source: ModelSource, method: Method) -> dict:
    k = split_point(source.n_layers, cfg.model.split_ratio) if method.split else 0
    return {"method": method.name, "model": source.spec, "random_weights": source.random_weights,
            "split_ratio": cfg.model.split_ratio, "k": k, "n_layers": source.n_layers,
            "base_folder": base_model_path(source)}


def base_model_path(source: ModelSource) -> str:
    """What a PEFT adapter names as its base: the absolute local folder the run loaded (for
    the embedded model, the dequantised cache folder of ``lesft prepare``), which
    ``AutoPeftModelForCausalLM.from_pretrained(adapter)`` loads offline; a random-weight
    preset has no folder and keeps its ``arch:`` name."""
    return str(Path(source.folder).resolve()) if source.folder is not None else source.spec


def combine_run(run_dir: Path, cfg: Config, source: ModelSource, method: Method) -> list[Path]:
    """Write the combined PEFT adapter(s) of a run from the per-side files in ``run_dir``.

    ``adapter/`` = server adapters + the global client adapters (aggregated methods) or
    client 0's (``sl``); with per-client adapters, ``adapter-client<i>/`` for every client.
    Both sides' files must be in ``run_dir`` (copy them there when the parties ran apart).
    """
    run_dir = Path(run_dir)
    server = lora.load_adapters(run_dir / SERVER_FILE) if (run_dir / SERVER_FILE).is_file() else {}
    clients: dict[int, dict[str, torch.Tensor]] = {}
    if (run_dir / GLOBAL_CLIENT_FILE).is_file():
        clients[-1] = lora.load_adapters(run_dir / GLOBAL_CLIENT_FILE)
    else:
        for i in range(cfg.data.clients):
            if (run_dir / client_file(i)).is_file():
                clients[i] = lora.load_adapters(run_dir / client_file(i))
    if method.split and not server:
        raise lora.AdapterError(f"{run_dir / SERVER_FILE} is missing: the server has not finished this run.")
    if method.client_trains and not clients:
        raise lora.AdapterError(f"no client adapters in {run_dir}: the clients or aggregator have not finished.")
    meta = adapter_meta(cfg, source, method)
    ids = sorted(clients)
    written = []
    first = clients[ids[0]] if ids else {}
    written.append(lora.save_peft_adapter({**first, **server}, cfg.lora, run_dir / "adapter",
                                          base_model=base_model_path(source),
                                          extra=meta, n_layers=source.n_layers))
    if len(ids) > 1:
        for cid in ids:
            written.append(lora.save_peft_adapter({**clients[cid], **server}, cfg.lora, run_dir / f"adapter-client{cid}",
                                                  base_model=base_model_path(source), extra=meta,
                                                  n_layers=source.n_layers))
    return written


def final_outputs(run_dir: Path, cfg: Config, source: ModelSource, method: Method,
                  server: dict[str, torch.Tensor] | None, clients: dict[int, dict[str, torch.Tensor]]) -> list[Path]:
    """Write per-side adapters (``clients`` key -1 = the global client adapters) and combine them."""
    meta = adapter_meta(cfg, source, method)
    if server is not None:
        lora.save_adapters(server, run_dir / SERVER_FILE, meta)
    for cid, adapters in clients.items():
        lora.save_adapters(adapters, run_dir / (GLOBAL_CLIENT_FILE if cid < 0 else client_file(cid)), meta)
    return combine_run(run_dir, cfg, source, method)


def merged_model(source: ModelSource, adapter_dir: str | Path):
    """The base causal LM with the PEFT adapter at ``adapter_dir`` merged in (``merge_and_unload``)."""
    from peft import PeftModel  # imported here: only merging needs it

    adapter_dir = Path(adapter_dir)
    if not (adapter_dir / "adapter_config.json").is_file():
        raise lora.AdapterError(f"{adapter_dir} is not a PEFT adapter folder (no adapter_config.json).")
    lm = FullModel(source).lm
    lm.config.use_cache = True
    for p in lm.parameters():  # FullModel freezes; a saved model should load trainable as usual
        p.requires_grad_(True)
    return PeftModel.from_pretrained(lm, str(adapter_dir)).merge_and_unload().eval()
