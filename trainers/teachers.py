"""Teachers that write Phase 3's reasoning examples: a task example plus thoughts in `<think> ... </think>` spans.

    teacher = get_teacher("procedural")                                  # offline, exact (arithmetic family)
    teacher = get_teacher("model", name_or_path="path/to/causal-lm")     # any local transformers causal LM folder
    teacher = get_teacher("model", name_or_path=smollm2_dir, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
    teacher = get_teacher("openai", base_url="http://localhost:8000/v1", model="my-model")  # OpenAI-compatible API
    examples = write_reasoning_examples(teacher, get_task_family("arithmetic").generate("train", 64))

One interface (`Teacher.annotate`): every teacher returns, per task example, a `ReasoningExample` whose
`completion` is the example's reference target with thoughts inserted, or None when it could not write a usable
one. The procedural teacher puts one thought before each worked step (`<compute> 40 - 12 = 28`) and one before the
final answer (`<conclude> 28`), from the example's structured `meta["steps"]`. Language-model teachers (a local folder
or an HTTP endpoint) write a free-text rationale; it becomes one thought before the target, kept only when the
rationale reaches the right answer (STaR's filter), unless `keep_incorrect=True`.
"""

import ast
import os
import re
import textwrap
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field

from transformers.utils import logging

from evaluation.tasks import get_task_family
from evaluation.tasks.base import Example, TaskFamily
from modeling_forge.tokenization import STRATEGY_TOKENS, THOUGHT_END, THOUGHT_START, THOUGHT_TOKENS

logger = logging.get_logger(__name__)

INSTRUCTION = (
    "Solve the problem step by step, one calculation per line, then give the final answer on a last line as "
    "'#### <number>'.\n\n{question}"
)
NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


@dataclass
class ReasoningExample:
    """A task example with thoughts: the model sees `prompt` and is trained to continue with `completion`."""

    prompt: str
    completion: str
    answer: str
    teacher: str
    family: str
    meta: dict = field(default_factory=dict)

    @property
    def thoughts(self) -> list[str]:
        """The thought spans' contents, in order."""
        pattern = re.escape(THOUGHT_START) + r"(.*?)" + re.escape(THOUGHT_END)
        return re.findall(pattern, self.completion, flags=re.S)


def thought(text: str, strategy: str | None = None) -> str:
    """One thought span, `<think><strategy> text</think>`, with thought markers removed from `text`."""
    for token in THOUGHT_TOKENS:
        text = text.replace(token, " ")
    text = " ".join(text.split())
    if strategy is not None and strategy not in STRATEGY_TOKENS:
        raise ValueError(f"Unknown strategy token {strategy!r}. Fix: use one of {STRATEGY_TOKENS}.")
    return f"{THOUGHT_START}{strategy or ''} {text}{THOUGHT_END}"


class Teacher(ABC):
    """Writes thoughts for task examples; see the module docstring."""

    name: str = ""

    @abstractmethod
    def annotate(self, examples: Sequence[Example]) -> list[ReasoningExample | None]:
        """One `ReasoningExample` (or None when no usable thoughts were written) per task example, in order."""

    def describe(self) -> dict:
        """What identifies this teacher in lineage files and cards."""
        return {"teacher": self.name}

    def hints(
        self,
        examples: Sequence[Example],
        results: Sequence,
        completions: Sequence[str],
        family: TaskFamily | None = None,
    ) -> list[str]:
        """One hint per failed attempt (Phase 5): the task family's procedural hint from the sandbox result (the
        failing input, what came back, what was expected, the step). Language-model teachers rewrite it. `family`
        is the (configured) family instance whose sandbox settings re-run a failing call; default: the registered."""
        hints = []
        for example, result, completion in zip(examples, results, completions, strict=True):
            family = family or get_task_family(example.family)
            if not hasattr(family, "hint"):
                raise ValueError(f"Task family {example.family!r} has no procedural hint. Fix: use the code family.")
            hints.append(family.hint(example, result, completion) if result is not None else _no_body_hint(example))
        return hints

    # Whether `solutions` returns bodies already verified by the task's tests (else the curriculum verifies them).
    solutions_verified: bool = False

    def solutions(self, examples: Sequence[Example]) -> list[str | None]:
        """The teacher's solution body per example (Phase 5's hint ladder shows part of it), None where it has
        none. This base teacher has none: the ladder then stops at prose hints."""
        return [None] * len(examples)


class ProceduralTeacher(Teacher):
    """Offline teacher for task families with structured worked steps (`meta["steps"]`, e.g. arithmetic)."""

    name = "procedural"

    def annotate(self, examples: Sequence[Example]) -> list[ReasoningExample | None]:
        results = []
        for example in examples:
            steps = example.meta.get("steps")
            if not steps:
                raise ValueError(
                    f"ProceduralTeacher needs structured steps in meta['steps'], which family {example.family!r} "
                    "does not provide. Fix: use the arithmetic family, or a model/HTTP teacher."
                )
            lines = [thought(f"{step['expression']} = {step['result']}", "<compute>") + step["text"] for step in steps]
            lines.append(thought(example.answer, "<conclude>") + f"#### {example.answer}")
            completion = "\n" + "\n".join(lines)
            results.append(ReasoningExample(example.prompt, completion, example.answer, self.name, example.family, {}))
        return results

    solutions_verified = True  # the reference bodies are what the tests were computed from

    def solutions(self, examples: Sequence[Example]) -> list[str | None]:
        """The task's reference body (code family: `meta["solution"]` is prompt + this body); None for others."""
        return [e.target if e.meta.get("solution") == e.prompt + e.target else None for e in examples]


class _RationaleTeacher(Teacher):
    """Shared part of language-model teachers: prompt, rationale, answer check, one thought before the target."""

    def __init__(self, *, keep_incorrect: bool = False, max_thought_chars: int = 400) -> None:
        self.keep_incorrect = keep_incorrect
        self.max_thought_chars = max_thought_chars

    @abstractmethod
    def rationales(self, questions: Sequence[str]) -> list[str]:
        """The teacher's raw reasoning text for each question."""

    def annotate(self, examples: Sequence[Example]) -> list[ReasoningExample | None]:
        questions = [example.prompt.removesuffix("Answer:").strip() for example in examples]
        texts = self.rationales([INSTRUCTION.format(question=q) for q in questions])
        results: list[ReasoningExample | None] = []
        for example, text in zip(examples, texts, strict=True):
            predicted = extract_final_number(example, text)
            correct = predicted is not None and predicted == example.answer
            if not (correct or self.keep_incorrect) or not text.strip():
                results.append(None)
                continue
            rationale = text.split("####", 1)[0].strip()[: self.max_thought_chars]
            completion = thought(rationale, "<decompose>") + example.target
            results.append(
                ReasoningExample(
                    example.prompt,
                    completion,
                    example.answer,
                    self.name,
                    example.family,
                    {"teacher_answer": predicted, "teacher_correct": correct},
                )
            )
        return results

    def hints(
        self,
        examples: Sequence[Example],
        results: Sequence,
        completions: Sequence[str],
        family: TaskFamily | None = None,
    ) -> list[str]:
        """The procedural hint's facts, rewritten by the language model as a hint (the facts alone when it writes
        nothing)."""
        facts = super().hints(examples, results, completions, family)
        pairs = zip(examples, facts, strict=True)
        texts = self.rationales([HINT_INSTRUCTION.format(prompt=e.prompt, facts=f) for e, f in pairs])
        return [" ".join(t.split())[: self.max_thought_chars] or f for t, f in zip(texts, facts, strict=True)]

    def solutions(self, examples: Sequence[Example]) -> list[str | None]:
        """The language model's own solution: asked to complete the function, its code is parsed and the body
        kept (None where it wrote no parsable function; the curriculum verifies the rest in the sandbox)."""
        texts = self.rationales([SOLUTION_INSTRUCTION.format(prompt=e.prompt) for e in examples])
        return [function_body(text, e.meta.get("entry_point")) for e, text in zip(examples, texts, strict=True)]


HINT_INSTRUCTION = (
    "A student's attempt at this function failed.\n\n{prompt}\nWhat the test run reported: {facts}\n\n"
    "Write one short hint (one or two sentences) that helps the student fix it without giving the full code."
)

SOLUTION_INSTRUCTION = (
    "Complete this Python function. Reply with the whole function in one ```python code block and nothing else.\n\n"
    "{prompt}"
)
_FENCE = re.compile(r"```(?:python|py)?\s*\n(.*?)```", re.S)


def function_body(text: str, entry_point: str | None = None) -> str | None:
    """The body of function `entry_point` (else the first function) in a model's reply, docstring dropped and
    indented by four spaces, or None when the reply holds no parsable function. Written here: no kept library
    extracts a function body from free text."""
    fenced = _FENCE.findall(text or "")
    for code in fenced or [text or ""]:
        try:
            tree = ast.parse(textwrap.dedent(code))
        except SyntaxError:
            continue
        functions = [n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)]
        chosen = next((f for f in functions if f.name == entry_point), functions[0] if functions else None)
        if chosen is None:
            continue
        body = list(chosen.body)
        if body and isinstance(body[0], ast.Expr) and isinstance(getattr(body[0], "value", None), ast.Constant) \
                and isinstance(body[0].value.value, str):  # fmt: skip
            body = body[1:]
        if body:
            return textwrap.indent("\n".join(ast.unparse(node) for node in body), "    ") + "\n"
    return None


def _no_body_hint(example: Example) -> str:
    """The hint for an attempt that wrote no function body at all."""
    return f"Write the function body, indented under the docstring. Hint: {example.meta.get('step', '')}".rstrip()


def extract_final_number(example: Example, text: str) -> str | None:
    """The teacher's final answer: the family's own extraction (`#### N`), else the last number in the text."""
    family = get_task_family(example.family)
    answer = family.extract_answer(text)
    if answer is None:
        numbers = NUMBER.findall(text)
        if numbers:
            from evaluation.tasks.arithmetic import normalize_number

            answer = normalize_number(numbers[-1])
    return answer


class ModelTeacher(_RationaleTeacher):
    """A local transformers causal LM folder (or a GGUF file in it) writing rationales with greedy decoding."""

    name = "model"

    def __init__(
        self,
        name_or_path: str,
        *,
        gguf_file: str | None = None,
        max_new_tokens: int = 160,
        batch_size: int = 4,
        device: str | None = None,
        keep_incorrect: bool = False,
        max_thought_chars: int = 400,
    ) -> None:
        super().__init__(keep_incorrect=keep_incorrect, max_thought_chars=max_thought_chars)
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.name_or_path, self.gguf_file = str(name_or_path), gguf_file
        kwargs = {"gguf_file": gguf_file} if gguf_file else {}
        self.tokenizer = AutoTokenizer.from_pretrained(name_or_path, **kwargs)
        self.model = AutoModelForCausalLM.from_pretrained(name_or_path, **kwargs).eval()
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.model.to(self.device)
        self.max_new_tokens = max_new_tokens
        self.batch_size = batch_size
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token

    def describe(self) -> dict:
        return {"teacher": self.name, "name_or_path": self.name_or_path, "gguf_file": self.gguf_file}

    def _encode(self, text: str) -> list[int]:
        if self.tokenizer.chat_template:
            messages = [{"role": "user", "content": text}]
            encoded = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=True)
            return list(encoded["input_ids"])
        return list(self.tokenizer(text + "\n")["input_ids"])

    def rationales(self, questions: Sequence[str]) -> list[str]:
        import torch

        outputs = []
        for begin in range(0, len(questions), self.batch_size):
            encoded = [self._encode(q) for q in questions[begin : begin + self.batch_size]]
            batch = self.tokenizer.pad({"input_ids": encoded}, padding=True, padding_side="left", return_tensors="pt")
            with torch.no_grad():
                generated = self.model.generate(
                    **batch.to(self.device),
                    max_new_tokens=self.max_new_tokens,
                    do_sample=False,
                    pad_token_id=self.tokenizer.pad_token_id,
                )
            new = generated[:, batch["input_ids"].shape[1] :]
            outputs.extend(self.tokenizer.batch_decode(new, skip_special_tokens=True))
        return outputs


class OpenAICompatibleTeacher(_RationaleTeacher):
    """An OpenAI-compatible chat-completions endpoint (`POST {base_url}/chat/completions`), e.g. vLLM or llama.cpp's
    server; the API key, if any, is read from the environment variable named by `api_key_env`."""

    name = "openai"

    def __init__(
        self,
        base_url: str,
        model: str,
        *,
        api_key_env: str | None = "OPENAI_API_KEY",
        max_tokens: int = 256,
        temperature: float = 0.0,
        timeout: float = 60.0,
        keep_incorrect: bool = False,
        max_thought_chars: int = 400,
    ) -> None:
        super().__init__(keep_incorrect=keep_incorrect, max_thought_chars=max_thought_chars)
        if not base_url:
            raise ValueError("OpenAICompatibleTeacher needs a base_url. Fix: e.g. http://localhost:8000/v1.")
        self.base_url = base_url.rstrip("/")
        self.model = model
        self.api_key_env = api_key_env
        self.max_tokens, self.temperature, self.timeout = max_tokens, temperature, timeout

    def describe(self) -> dict:
        return {"teacher": self.name, "base_url": self.base_url, "model": self.model}

    def rationales(self, questions: Sequence[str]) -> list[str]:
        import httpx

        headers = {}
        key = os.environ.get(self.api_key_env) if self.api_key_env else None
        if key:
            headers["Authorization"] = f"Bearer {key}"
        outputs = []
        with httpx.Client(timeout=self.timeout, headers=headers) as client:
            for question in questions:
                response = client.post(
                    f"{self.base_url}/chat/completions",
                    json={
                        "model": self.model,
                        "messages": [{"role": "user", "content": question}],
                        "max_tokens": self.max_tokens,
                        "temperature": self.temperature,
                    },
                )
                response.raise_for_status()
                outputs.append(response.json()["choices"][0]["message"]["content"] or "")
        return outputs


TEACHERS: dict[str, type[Teacher]] = {
    "procedural": ProceduralTeacher,
    "model": ModelTeacher,
    "openai": OpenAICompatibleTeacher,
}


def get_teacher(kind: str, **kwargs) -> Teacher:
    """Build a teacher by kind (`procedural`, `model`, `openai`) with its constructor's keyword arguments."""
    if kind not in TEACHERS:
        raise ValueError(f"Unknown teacher {kind!r}. Fix: use one of {sorted(TEACHERS)}.")
    return TEACHERS[kind](**kwargs)


def write_reasoning_examples(teacher: Teacher, examples: Sequence[Example]) -> list[ReasoningExample]:
    """The teacher's usable reasoning examples (the unusable ones dropped and counted in the log)."""
    annotated = teacher.annotate(examples)
    kept = [example for example in annotated if example is not None]
    if len(kept) < len(annotated):
        logger.warning(
            "Teacher %r wrote usable thoughts for %d of %d examples (the rest reached a wrong answer).",
            teacher.name,
            len(kept),
            len(annotated),
        )
    return kept


__all__ = [
    "HINT_INSTRUCTION",
    "INSTRUCTION",
    "ModelTeacher",
    "OpenAICompatibleTeacher",
    "ProceduralTeacher",
    "SOLUTION_INSTRUCTION",
    "ReasoningExample",
    "TEACHERS",
    "Teacher",
    "extract_final_number",
    "function_body",
    "get_teacher",
    "thought",
    "write_reasoning_examples",
]
