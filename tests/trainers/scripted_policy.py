"""A scripted stand-in for Phase 5's model policy, shared by the curriculum tests."""


class ScriptedPolicy:
    """A 'model' whose i-th sample for a prompt is `answer(prompt, i)`; records the prompts and each call."""

    def __init__(self, answer):
        self.answer = answer
        self.prompts: list[str] = []
        self.calls: list[dict] = []

    def complete(self, prompts, *, temperature, num_samples, seed):
        self.prompts += list(prompts)
        self.calls.append({"temperature": temperature, "num_samples": num_samples, "prompts": len(prompts)})
        return [[self.answer(p, i) for i in range(num_samples)] for p in prompts]
