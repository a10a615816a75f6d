"""MkDocs hook: the pages made at build time from the code, so that they cannot drift from it. Nothing generated is
committed.

- The option reference (docs/options.md, at OPTIONS_MARKER): `TrainingOptions`' fields, whose name, type, default,
  help and group the training command's flags are made from too.
- The module map (docs/architecture.md, at MODULE_MAP_MARKER): every module of the package, layer by layer, with
  the first sentence of its docstring, read from the source without importing it.
"""

import ast
import dataclasses
import html
import re
import types
import typing
from pathlib import Path

OPTIONS_PAGE = "options.md"
OPTIONS_MARKER = "<!-- options reference -->"
MODULE_MAP_PAGE = "architecture.md"
MODULE_MAP_MARKER = "<!-- module map -->"
PACKAGE = Path(__file__).resolve().parent.parent / "deformable_detr"
LAYERS = ["apps", "engine", "metrics", "data", "weights", "model", "utils"]  # high to low, as [tool.importlinter]


def type_name(annotation) -> str:
    """An annotation as people write it: `int | None`, `Literal["step", "cosine"]` as `"step" | "cosine"`,
    `list[int]`, `dict[str, float]`; a string annotation (postponed evaluation) as it is written."""
    if isinstance(annotation, str):
        return annotation
    if annotation is type(None):
        return "None"
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Literal:
        return " | ".join(f'"{a}"' if isinstance(a, str) else repr(a) for a in args)
    if origin is typing.Union or (hasattr(types, "UnionType") and origin is types.UnionType):
        return " | ".join(type_name(a) for a in args)
    if origin is not None:
        name = getattr(origin, "__name__", str(origin).replace("typing.", ""))
        return f"{name}[{', '.join(type_name(a) for a in args)}]" if args else name
    if isinstance(annotation, type):
        return annotation.__name__
    return str(annotation).replace("typing.", "")


def default_text(field: dataclasses.Field) -> str:
    """The field's default as a code span, or "required"."""
    if field.default is not dataclasses.MISSING:
        value = field.default
    elif field.default_factory is not dataclasses.MISSING:
        value = field.default_factory()
    else:
        return "required"
    return code_cell(f'"{value}"' if isinstance(value, str) else repr(value))


def cell(text: str) -> str:
    """Help text as it reads, in a Markdown table cell: outside its `code` spans HTML escaped and with Markdown's
    emphasis characters (`_` in `{split}/_annotations.coco.json`, `*`) and the table's pipes escaped."""
    parts = text.replace("\n", " ").split("`")
    for i in range(0, len(parts), 2):  # the even parts lie outside code spans
        part = html.escape(parts[i], quote=False)
        for character in "\\_*|":
            part = part.replace(character, "\\" + character)
        parts[i] = part
    return "`".join(parts)


def code_cell(text: str) -> str:
    """Text as a code span in a table cell (a code span keeps its pipes and angle brackets as they are)."""
    return "`" + text.replace("\n", " ") + "`"


def options_reference() -> str:
    """One table per option group, in the fields' order: flag, type, default, what it does."""
    from deformable_detr.engine.options import TrainingOptions

    hints = typing.get_type_hints(TrainingOptions, include_extras=True)
    groups: dict[str, list[str]] = {}
    for field in dataclasses.fields(TrainingOptions):
        group = field.metadata.get("group", "other")
        kind = type_name(hints.get(field.name, field.type))
        help_text = cell(field.metadata.get("help", ""))
        row = f"| `--{field.name}` | {code_cell(kind)} | {default_text(field)} | {help_text} |"
        groups.setdefault(group, []).append(row)
    sections = []
    for group, rows in groups.items():
        header = "| option | type | default | what it does |\n|---|---|---|---|"
        sections.append(f"## {group[:1].upper()}{group[1:]}\n\n{header}\n" + "\n".join(rows))
    return "\n\n".join(sections)


def first_sentence(path: Path) -> str:
    """The first sentence of a module's docstring (its first paragraph when that has no full stop)."""
    docstring = ast.get_docstring(ast.parse(path.read_text(encoding="utf-8"))) or ""
    paragraph = " ".join(docstring.split("\n\n")[0].split())
    sentence = re.match(r"(.+?\.)(?:\s|$)", paragraph)
    return (sentence.group(1) if sentence else paragraph).rstrip(":")


def module_table(modules: list[Path]) -> str:
    rows = [f"| `{path.relative_to(PACKAGE.parent).as_posix()}` | {cell(first_sentence(path))} |" for path in modules]
    return "| module | what it holds |\n|---|---|\n" + "\n".join(rows)


def module_map() -> str:
    """The package's top-level modules, then each layer's package (its docstring, then a table of its modules)."""
    packages = [p for p in sorted(PACKAGE.iterdir()) if (p / "__init__.py").is_file()]
    packages.sort(key=lambda p: (LAYERS.index(p.name) if p.name in LAYERS else len(LAYERS), p.name))
    sections = [module_table(sorted(PACKAGE.glob("*.py")))]
    for package in packages:
        modules = sorted(m for m in package.glob("*.py") if m.name != "__init__.py")
        sections.append(
            f"### `deformable_detr/{package.name}/`\n\n{cell(first_sentence(package / '__init__.py'))}\n\n"
            + module_table(modules)
        )
    return "\n\n".join(sections)


GENERATED = {OPTIONS_PAGE: (OPTIONS_MARKER, options_reference), MODULE_MAP_PAGE: (MODULE_MAP_MARKER, module_map)}


def on_page_markdown(markdown: str, page, config, files) -> str:
    if page.file.src_uri not in GENERATED:
        return markdown
    marker, make = GENERATED[page.file.src_uri]
    if marker not in markdown:
        raise ValueError(f"docs/{page.file.src_uri} lost its marker {marker!r}: its generated part has no place")
    return markdown.replace(marker, make())
