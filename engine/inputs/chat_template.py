"""The output's chat template, as a recipe's `chat_template` key or --chat-template asks: 'auto' (the
template most inputs carry, ties to the first in base-then-experts order, as mergekit picks it), the
template of one input named as the recipe or command names it, or a literal Jinja template. It goes
into the output's tokenizer files. Knows nothing of tensors.
"""
import json
from collections import Counter
from pathlib import Path

from ...common.errors import BadParameter

CONFIG, JINJA = "tokenizer_config.json", "chat_template.jinja"


def template_of(folder: Path) -> str | None:
    """A model folder's chat template: chat_template.jinja, else tokenizer_config.json's (its 'default'
    where it holds several); None without one (or unreadable)."""
    folder = Path(folder)
    try:
        if (folder / JINJA).is_file():
            return (folder / JINJA).read_text(encoding="utf-8").strip() or None
        found = json.loads((folder / CONFIG).read_text(encoding="utf-8")).get("chat_template")
    except (OSError, ValueError, AttributeError):
        return None
    if isinstance(found, list):        # [{name, template}, ...]
        found = next((t.get("template") for t in found if isinstance(t, dict) and t.get("name") == "default"), None)
    return found.strip() if isinstance(found, str) and found.strip() else None


def choose(value: str, inputs: list[tuple[str, Path]]) -> tuple[str | None, str]:
    """(the template, where it came from) for `value` over the inputs [(reference, folder), ...]; None
    for 'auto' when no input has one (the reference model's stays as copied)."""
    if value == "auto":
        found = [(ref, t) for ref, folder in inputs if (t := template_of(folder))]
        if not found:
            return None, "auto: no input has a chat template"
        chosen = Counter(t for _, t in found).most_common(1)[0][0]
        return chosen, f"auto: the template of {next(ref for ref, t in found if t == chosen)}"
    for ref, folder in inputs:
        if value == ref:
            template = template_of(folder)
            if template is None:
                raise BadParameter(f"chat_template {value!r}: that model has no chat template ({folder})")
            return template, f"the template of {ref}"
    if len(value) < 20 or "{" not in value:
        raise BadParameter(f"chat_template {value!r} is not 'auto', a model of the merge, nor a Jinja template "
                           f"(mbmerge has no built-in templates)")
    return value, "a template given literally"


def write(folder: Path, template: str) -> None:
    """Set the template in the output's tokenizer files (both, where the reference model has both)."""
    folder = Path(folder)
    config = json.loads((folder / CONFIG).read_text(encoding="utf-8"))
    config["chat_template"] = template
    (folder / CONFIG).write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    if (folder / JINJA).is_file():
        (folder / JINJA).write_text(template, encoding="utf-8")
