"""Text-level data: records, prompt templates, dataset loaders, generator, partitioning."""

from lesft.answers import normalize_number
from lesft.data.datasets import (
    SPLITS, clean_gsm8k_solution, default_data_dir, load_examples, load_teacher_cot,
    strip_final_answer,
)
from lesft.data.partition import SCHEMES, partition
from lesft.data.records import (
    ANSWER_CUE, DATASETS, REF_STYLES, DataError, Example, SourceRecord, answer_sentence,
    prompt_for, question_block, reference_prompt,
)
from lesft.data.synthetic import KINDS, generate_synthetic

__all__ = [
    "ANSWER_CUE", "DATASETS", "KINDS", "REF_STYLES", "SCHEMES", "SPLITS",
    "DataError", "Example", "SourceRecord",
    "answer_sentence", "clean_gsm8k_solution", "default_data_dir", "generate_synthetic",
    "load_examples", "load_teacher_cot", "normalize_number", "partition", "prompt_for",
    "question_block", "reference_prompt", "strip_final_answer",
]
