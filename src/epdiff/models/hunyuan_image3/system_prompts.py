"""The Instruct models' system prompts, by the names generation_config.json's `use_system_prompt`
and a request's `system_prompt` give them.

The prompts' text ships with the checkpoint (the reference's remote code, `system_prompt.py` in
the model folder); epdiff reads its string constants with `ast` (never executing it) and resolves
the names as the reference's `get_system_prompt` does for the image task:

    None / "None"                       no system prompt
    en_vanilla, en_recaption,
    en_think_recaption                  t2i_system_prompts[name][0]
    en_unified                          unified_system_prompt_en
    dynamic                             by the task: think -> en_think_recaption, recaption ->
                                        en_recaption, image -> en_vanilla without its surrounding
                                        newlines; think_recaption -> en_think_recaption (the
                                        reference's gives none there: its lookup takes the task
                                        unsplit and falls through to the custom text)
    custom                              the request's own text

then strips the result, as the reference does before building the sequence.
"""

from __future__ import annotations

import ast
import os

from ...config import ConfigError

SYSTEM_PROMPT_FILE = "system_prompt.py"
T2I_PROMPTS, UNIFIED_PROMPT = "t2i_system_prompts", "unified_system_prompt_en"
T2I_NAMES = ("en_vanilla", "en_recaption", "en_think_recaption")
NAMES = ("None", *T2I_NAMES, "en_unified", "dynamic", "custom")
DYNAMIC = {"think": "en_think_recaption", "think_recaption": "en_think_recaption", "recaption": "en_recaption"}


def _literal(node, known: dict):
    """A literal (strings, numbers, lists, tuples, dicts) whose parts may name earlier constants."""
    if isinstance(node, ast.Name):
        if node.id not in known:
            raise ValueError(node.id)
        return known[node.id]
    if isinstance(node, (ast.List, ast.Tuple)):
        return [_literal(e, known) for e in node.elts]
    if isinstance(node, ast.Dict):
        return {_literal(k, known): _literal(v, known) for k, v in zip(node.keys, node.values)}
    return ast.literal_eval(node)


def read_system_prompts(model_dir: str) -> dict:
    """The folder's system_prompt.py constants ({} when there is none)."""
    path = os.path.join(model_dir, SYSTEM_PROMPT_FILE)
    if not os.path.isfile(path):
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read(), filename=path)
    except (OSError, SyntaxError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read {path}: {e}") from None
    known = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            try:
                known[node.targets[0].id] = _literal(node.value, known)
            except (ValueError, TypeError, SyntaxError):
                pass  # not a constant (a function call, ...): not a prompt
    return known


class SystemPrompts:
    """A folder's named prompts and the default name (generation_config.json use_system_prompt)."""

    def __init__(self, model_dir: str, default: str | None):
        self.model_dir, self.constants = model_dir, read_system_prompts(model_dir)
        self.default = "None" if default is None else default
        try:
            self.resolve(self.default)
        except ValueError as e:
            raise ConfigError(f"generation_config.json: use_system_prompt {self.default!r}: {e}") from None

    def resolve(self, name: str | None, custom: str | None = None, task: str = "image") -> str:
        """The system prompt's text for a name (None: the default) and a task; ValueError names the
        problem."""
        name = self.default if name is None else name
        if name not in NAMES:
            raise ValueError(f"unknown system prompt {name!r}; choose one of {', '.join(NAMES)}")
        if name == "None":
            return ""
        if name == "custom":
            if not isinstance(custom, str) or not custom.strip():
                raise ValueError("system prompt 'custom' needs its text")
            return custom.strip()
        key = DYNAMIC.get(task, "en_vanilla") if name == "dynamic" else name
        text = self._named(key)
        return (text.strip("\n") if name == "dynamic" else text).strip()

    def for_request(self, value: str | None, task: str = "image") -> str:
        """A request's system_prompt: None (the model's default), a name, or any other text (its own)."""
        if value is None or value in NAMES:
            return self.resolve(value, task=task)
        if not value.strip():
            return ""
        return self.resolve("custom", value)

    def named(self, name: str) -> str:
        """A named prompt as the file has it (unstripped: the reference's drop_think swaps in
        en_recaption so)."""
        return self._named(name)

    def _named(self, name: str) -> str:
        where = os.path.join(self.model_dir, SYSTEM_PROMPT_FILE)
        if not self.constants:
            raise ValueError(f"the named prompts ship with the checkpoint, and {where} is missing")
        try:
            text = self.constants[UNIFIED_PROMPT] if name == "en_unified" else self.constants[T2I_PROMPTS][name][0]
        except (KeyError, IndexError, TypeError):
            raise ValueError(f"{where} does not define {name!r}") from None
        if not isinstance(text, str):
            raise ValueError(f"{where}: {name!r} is not text")
        return text
