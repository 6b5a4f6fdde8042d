"""Training data: sources, weighted mixtures, packing into fixed-length blocks, and staged curricula.

A *source* names where texts come from:
    "corpus"                     the built-in Shakespeare corpus (`evaluation.corpus`), packed contiguously
    "arithmetic" | "kv_recall" | "code"    a built-in task family (`evaluation.tasks`), one example per text
    "hub:<name>"                 a dataset of the registry in `evaluation.data_sources` (needs the network)
    "file:<path>"                a local json/jsonl/parquet/csv/txt file with a text column
A *curriculum* is a list of stages; each covers a fraction of the optimizer steps with its own sequence length,
mixture weights and task difficulty range. `build_curriculum` materialises it as ONE dataset whose blocks are in
training order (stage after stage, shuffled within a stage) with exactly `steps x global batch` blocks per stage,
so the stock Trainer (with a sequential sampler) switches stages at the configured steps, also under DDP and when
resuming from a checkpoint.
"""

import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from datasets import Dataset
from transformers import PreTrainedTokenizerBase
from transformers.utils import logging

logger = logging.get_logger(__name__)

TASK_SOURCES = ("arithmetic", "kv_recall", "code", "variable_chain")
IGNORE_INDEX = -100


def pack_texts(
    texts: Iterable[str], tokenizer: PreTrainedTokenizerBase, block_size: int, *, drop_last: bool = True
) -> Dataset:
    """Tokenise `texts` (each ends with EOS), concatenate them and cut the stream into `block_size` blocks.

    Returns a `datasets.Dataset` with `input_ids` and `labels` (equal: the model shifts labels internally).
    Blocks cross document boundaries, as in GPT-style pretraining; the EOS token marks each boundary.
    """
    blocks = _contiguous_blocks(texts, tokenizer, block_size, drop_last=drop_last)
    if not blocks:
        raise ValueError(f"The texts give fewer tokens than one block of {block_size}. Fix: pass more text.")
    return Dataset.from_dict({"input_ids": blocks, "labels": [list(b) for b in blocks]})


def _check_packing(tokenizer: PreTrainedTokenizerBase, block_size: int) -> None:
    if block_size < 2:
        raise ValueError(f"block_size={block_size} must be >= 2 to have a next-token target. Fix: use e.g. 256.")
    if tokenizer.eos_token_id is None:
        raise ValueError("The tokenizer has no eos_token. Fix: set tokenizer.eos_token before packing.")


def _contiguous_blocks(
    texts: Iterable[str], tokenizer: PreTrainedTokenizerBase, block_size: int, *, drop_last: bool = True
) -> list[list[int]]:
    _check_packing(tokenizer, block_size)
    stream: list[int] = []
    for text in texts:
        # Whole documents are tokenized on purpose and cut into blocks below: no "longer than max length" warning.
        stream.extend(tokenizer(text, add_special_tokens=True, verbose=False)["input_ids"])
        stream.append(tokenizer.eos_token_id)
    n_blocks = len(stream) // block_size if drop_last else -(-len(stream) // block_size)
    return [stream[i * block_size : (i + 1) * block_size] for i in range(n_blocks)]


def pack_examples(
    texts: Iterable[str | tuple[str, str]],
    tokenizer: PreTrainedTokenizerBase,
    block_size: int,
    *,
    prompt_loss: bool = True,
) -> list[tuple[list[int], list[int]]]:
    """Pack whole examples into blocks without splitting any: fill a block greedily, pad the rest (labels -100).

    Task examples must stay whole (a key-value recall example cut in two teaches nothing). An example longer than
    a block is dropped with a count in the log. Returns (input_ids, labels) pairs. A `(prompt, target)` pair is
    tokenized as the prompt alone followed by the target's tokens, so training sees the token boundary generation
    sees (a code prompt ends with a lone newline token, which BPE merges with the body's indentation in prompt +
    target: trained on the merged form, a model answers the lone newline with EOS). `prompt_loss=False` labels only
    a pair's target and EOS (the prompt's labels are -100, as TRL's `completion_only_loss`): the loss then goes to the
    answers, not to the random keys and filler of a prompt.
    """
    _check_packing(tokenizer, block_size)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    blocks: list[tuple[list[int], list[int]]] = []
    ids: list[int] = []
    labels: list[int] = []
    dropped = 0

    def flush() -> None:
        if ids:
            padding = block_size - len(ids)
            blocks.append((ids + [pad_id] * padding, labels + [IGNORE_INDEX] * padding))

    for text in texts:
        if isinstance(text, tuple):
            prompt, target = text
            ids_prompt = tokenizer(prompt, add_special_tokens=True)["input_ids"]
            example = ids_prompt + tokenizer(target, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
            n_unlabelled = 0 if prompt_loss else len(ids_prompt)
        else:
            example = tokenizer(text, add_special_tokens=True)["input_ids"] + [tokenizer.eos_token_id]
            n_unlabelled = 0
        if len(example) > block_size:
            dropped += 1
            continue
        if len(ids) + len(example) > block_size:
            flush()
            ids, labels = [], []
        ids = ids + example
        labels = labels + [IGNORE_INDEX] * n_unlabelled + example[n_unlabelled:]
    flush()
    if dropped:
        logger.info("pack_examples: %d examples longer than %d tokens were dropped", dropped, block_size)
    return blocks


@dataclass(frozen=True)
class CurriculumStage:
    """One stage of a curriculum: it ends at `end` (fraction of all steps) and has its own data recipe."""

    name: str
    end: float
    seq_len: int
    mixture: dict[str, float]
    difficulty: tuple[int, int] = (1, 3)
    prompt_loss: bool = True  # False: task examples train on their answers only (see `pack_examples`)

    @classmethod
    def from_dict(cls, values: dict) -> "CurriculumStage":
        unknown = set(values) - {"name", "end", "seq_len", "mixture", "difficulty", "prompt_loss"}
        if unknown:
            raise ValueError(f"Curriculum stage has unknown keys {sorted(unknown)}. Fix: use name, end, seq_len, "
                             "mixture, difficulty, prompt_loss.")  # fmt: skip
        for key in ("name", "end", "seq_len", "mixture"):
            if key not in values:
                raise ValueError(f"Curriculum stage {values.get('name', '?')!r} is missing {key!r}.")
        prompt_loss = values.get("prompt_loss", True)
        if not isinstance(prompt_loss, bool):
            raise ValueError(f"Curriculum stage {values['name']!r} has prompt_loss={prompt_loss!r}. Fix: use true "
                             "(train on task prompts too) or false (on the answers only).")  # fmt: skip
        difficulty = tuple(values.get("difficulty", (1, 3)))
        return cls(str(values["name"]), float(values["end"]), int(values["seq_len"]), dict(values["mixture"]),
                   (int(difficulty[0]), int(difficulty[-1])), prompt_loss)  # fmt: skip


def validate_curriculum(stages: Sequence[CurriculumStage]) -> None:
    """Raise a ValueError naming the first problem: ends increasing to 1.0, positive weights, known sources."""
    if not stages:
        raise ValueError("The curriculum has no stages. Fix: give at least one stage ending at 1.0.")
    previous = 0.0
    for stage in stages:
        if not previous < stage.end <= 1.0:
            raise ValueError(f"Stage {stage.name!r} ends at {stage.end}; ends must increase within (0, 1].")
        previous = stage.end
        if stage.seq_len < 8:
            raise ValueError(f"Stage {stage.name!r} has seq_len={stage.seq_len}. Fix: use at least 8 tokens.")
        if not stage.mixture or any(w < 0 for w in stage.mixture.values()) or sum(stage.mixture.values()) <= 0:
            raise ValueError(f"Stage {stage.name!r} needs non-negative mixture weights with a positive sum.")
        for source in stage.mixture:
            if not (source == "corpus" or source in TASK_SOURCES or source.startswith(("hub:", "file:"))):
                raise ValueError(f"Stage {stage.name!r} names unknown source {source!r}. Fix: use 'corpus', one of "
                                 f"{TASK_SOURCES}, 'hub:<registry name>' or 'file:<path>'.")  # fmt: skip
        low, high = stage.difficulty
        if not 1 <= low <= high <= 10:
            raise ValueError(
                f"Stage {stage.name!r} difficulty {stage.difficulty} must satisfy 1 <= low <= high <= 10."
            )
    if abs(stages[-1].end - 1.0) > 1e-9:
        raise ValueError(f"The last stage ends at {stages[-1].end}. Fix: the last stage must end at 1.0.")


def default_curriculum(seq_lens: Sequence[int] = (128, 256, 512)) -> list[CurriculumStage]:
    """SPEC's three stages, short/simple to long/reasoning, over the built-in sources.

    Task difficulties are chosen so examples fit the stage's blocks (with a 1k BPE: arithmetic ~100 tokens at
    level 1, ~220 at 5; key-value recall ~80 at 1, ~400 at 5).
    """
    short, medium, long = seq_lens
    return [
        CurriculumStage(
            "short", 0.3, short, {"corpus": 0.5, "arithmetic": 0.2, "code": 0.15, "kv_recall": 0.15}, (1, 2)
        ),  # fmt: skip
        CurriculumStage(
            "medium", 0.7, medium, {"corpus": 0.4, "arithmetic": 0.25, "code": 0.15, "kv_recall": 0.2}, (2, 4)
        ),  # fmt: skip
        CurriculumStage(
            "long", 1.0, long, {"corpus": 0.3, "arithmetic": 0.3, "code": 0.15, "kv_recall": 0.25}, (4, 6)
        ),  # fmt: skip
    ]


@dataclass
class CurriculumData:
    """The ordered training dataset and, per stage, the steps it covers and what it contains."""

    dataset: Dataset
    schedule: list[dict] = field(default_factory=list)

    def stage_at(self, step: int) -> dict:
        """The schedule entry of the stage that optimizer step `step` (0-based) trains on."""
        for entry in self.schedule:
            if entry["start_step"] <= step < entry["end_step"]:
                return entry
        return self.schedule[-1]


def source_blocks(
    source: str,
    tokenizer: PreTrainedTokenizerBase,
    *,
    block_size: int,
    n_blocks: int,
    split: str,
    seed: int,
    difficulty: tuple[int, int],
    prompt_loss: bool = True,
) -> list[tuple[list[int], list[int]]]:
    """`n_blocks` blocks of `block_size` tokens from one source (repeating the source's data if it runs out);
    `prompt_loss=False` labels only the answers of a task source's examples (text sources are always labelled)."""
    if n_blocks <= 0:
        return []
    rng = random.Random(f"{source}:{split}:{seed}:{block_size}")
    if source in TASK_SOURCES:
        blocks = _task_blocks(source, tokenizer, block_size, n_blocks, split, seed, difficulty, prompt_loss)
    else:
        texts = _source_texts(source, split)
        raw = _contiguous_blocks(texts, tokenizer, block_size)
        blocks = [(b, list(b)) for b in raw]
    if not blocks:
        hint = (
            f"its examples at difficulty {difficulty[0]}-{difficulty[1]} are all longer than {block_size} tokens. "
            "Fix: raise the stage's seq_len or lower its difficulty"
            if source in TASK_SOURCES
            else "it has too little text. Fix: lower seq_len or add text"
        )
        raise ValueError(f"Source {source!r} gave no block of {block_size} tokens for split {split!r}: {hint}.")
    out = []
    while len(out) < n_blocks:  # whole passes over the source in shuffled order, as many as needed
        order = list(range(len(blocks)))
        rng.shuffle(order)
        out.extend(blocks[i] for i in order[: n_blocks - len(out)])
    return out


def _source_texts(source: str, split: str) -> list[str]:
    if source == "corpus":
        from evaluation.corpus import corpus_texts

        return corpus_texts(split)
    from evaluation.data_sources import load_data_source

    if source.startswith("hub:"):
        dataset = load_data_source(source[4:], split=split)
    else:
        dataset = load_data_source("file", split=split, data_files=source[5:])
    return [row["text"] for row in dataset]


def _task_blocks(
    family_name: str,
    tokenizer: PreTrainedTokenizerBase,
    block_size: int,
    n_blocks: int,
    split: str,
    seed: int,
    difficulty: tuple[int, int],
    prompt_loss: bool = True,
) -> list[tuple[list[int], list[int]]]:
    from evaluation.tasks import get_task_family

    family = get_task_family(family_name)
    texts: list[tuple[str, str]] = []
    levels = list(range(difficulty[0], difficulty[1] + 1))
    per_level = max(8, n_blocks // len(levels) + 1)
    for level in levels:
        examples, wanted = [], per_level
        while not examples and wanted >= 1:
            try:
                examples = family.generate(split, wanted, seed=seed, difficulty=level)
            except ValueError as error:  # a small level's problem space: take what exists (halving), and say so
                logger.info("%s difficulty %d: %s Taking %d.", family_name, level, error, wanted // 2)
                wanted //= 2
        texts.extend((example.prompt, example.target) for example in examples)  # tokenized as at generation
    random.Random(seed).shuffle(texts)
    return pack_examples(texts, tokenizer, block_size, prompt_loss=prompt_loss)


def mix_weights(mixture: dict[str, float], scale: dict[str, float] | None = None) -> dict[str, float]:
    """Normalised mixture weights after multiplying by a specialisation's per-source `scale` (default 1)."""
    scale = scale or {}
    weighted = {source: weight * float(scale.get(source, 1.0)) for source, weight in mixture.items()}
    total = sum(weighted.values())
    if total <= 0:
        raise ValueError(f"Mixture {mixture} scaled by {scale} has no positive weight.")
    return {source: weight / total for source, weight in weighted.items() if weight > 0}


def _allocate(total: int, weights: dict[str, float]) -> dict[str, int]:
    """Integer block counts per source summing to `total` (largest remainders)."""
    raw = {source: total * weight for source, weight in weights.items()}
    counts = {source: int(value) for source, value in raw.items()}
    for source in sorted(raw, key=lambda s: raw[s] - counts[s], reverse=True)[: total - sum(counts.values())]:
        counts[source] += 1
    return counts


def build_curriculum(
    stages: Sequence[CurriculumStage],
    tokenizer: PreTrainedTokenizerBase,
    *,
    max_steps: int,
    global_batch_size: int,
    seed: int = 0,
    split: str = "train",
    mixture_scale: dict[str, float] | None = None,
) -> CurriculumData:
    """Materialise a curriculum as one ordered dataset (see the module docstring).

    Stage `k` covers optimizer steps `[round(end_{k-1} * max_steps), round(end_k * max_steps))` and contributes
    exactly that many steps times `global_batch_size` blocks of its `seq_len`, drawn from its sources in
    proportion to its mixture (times `mixture_scale`, a specialisation's emphasis).
    """
    validate_curriculum(stages)
    input_ids, labels, stage_ids, sources = [], [], [], []
    schedule = []
    start = 0
    for index, stage in enumerate(stages):
        end = round(stage.end * max_steps) if index < len(stages) - 1 else max_steps
        n_blocks = (end - start) * global_batch_size
        weights = mix_weights(stage.mixture, mixture_scale)
        counts = _allocate(n_blocks, weights)
        stage_blocks = []
        for source, count in counts.items():
            blocks = source_blocks(
                source,
                tokenizer,
                block_size=stage.seq_len,
                n_blocks=count,
                split=split,
                seed=seed + 7919 * index,
                difficulty=stage.difficulty,
                prompt_loss=stage.prompt_loss,
            )
            stage_blocks.extend((ids, labs, source) for ids, labs in blocks)
        random.Random(seed + index).shuffle(stage_blocks)
        for ids, labs, source in stage_blocks:
            input_ids.append(ids)
            labels.append(labs)
            stage_ids.append(index)
            sources.append(source)
        schedule.append({"stage": index, "name": stage.name, "start_step": start, "end_step": end,
                         "seq_len": stage.seq_len, "mixture": weights, "blocks": counts,
                         "difficulty": list(stage.difficulty), "prompt_loss": stage.prompt_loss})  # fmt: skip
        start = end
    dataset = Dataset.from_dict({"input_ids": input_ids, "labels": labels, "stage": stage_ids, "source": sources})
    return CurriculumData(dataset=dataset, schedule=schedule)


__all__ = [
    "CurriculumData",
    "CurriculumStage",
    "build_curriculum",
    "default_curriculum",
    "mix_weights",
    "pack_examples",
    "pack_texts",
    "source_blocks",
    "validate_curriculum",
]
