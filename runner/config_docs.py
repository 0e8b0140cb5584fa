"""The README's config reference, generated from conf/ and the schemas so it cannot drift:
`python -m runner.config_docs` prints it, `--write` updates README.md; a test checks they agree."""
from __future__ import annotations

import dataclasses
from pathlib import Path

from runner import config as schemas

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"
GROUP_SCHEMAS = {"model": schemas.ModelConfig, "attention": schemas.AttentionConfig,
                 "block_table": schemas.BlockTableConfig, "parallel": schemas.ParallelConfig,
                 "graph": schemas.GraphConfig}
TASK_SCHEMAS = {"generate": schemas.GenerateTaskConfig, "bench": schemas.BenchTaskConfig,
                "verify": schemas.VerifyTaskConfig}
BEGIN, END = "<!-- config-reference:begin -->", "<!-- config-reference:end -->"


def _first_comment(path: Path) -> str:
    for line in path.read_text().splitlines():
        if line.startswith("#"):
            return line.lstrip("# ").strip()
    return ""


def _field_comments(schema) -> dict[str, str]:
    """`name: type = default  # comment` lines of the schema's source."""
    import inspect
    comments = {}
    for line in inspect.getsource(schema).splitlines():
        code, _, comment = line.partition("  # ")
        name = code.strip().split(":")[0]
        if comment and name.isidentifier():
            comments[name] = comment.strip().replace(" | ", " / ")
    return comments


def _fields(schema) -> list[str]:
    comments = _field_comments(schema)
    rows = []
    for f in dataclasses.fields(schema):
        if f.name.startswith("_") or f.name in ("name",):
            continue
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
        rows.append(f"| `{f.name}` | `{default}` | {comments.get(f.name, '')} |")
    return rows


def reference() -> str:
    lines = []
    for group in ("model", "attention", "block_table", "parallel", "graph", "task"):
        options = sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))
        lines.append(f"### `{group}`\n")
        for option in options:
            comment = _first_comment(CONF_DIR / group / f"{option}.yaml")
            lines.append(f"- `{group}={option}`: {comment}")
        lines.append("")
        if group == "task":
            for name, schema in TASK_SCHEMAS.items():
                lines += [f"`task={name}` fields:\n", "| field | default | meaning |",
                          "|---|---|---|", *_fields(schema), ""]
        elif GROUP_SCHEMAS[group] not in (schemas.AttentionConfig,):
            lines += ["| field | default | meaning |", "|---|---|---|",
                      *_fields(GROUP_SCHEMAS[group]), ""]
    lines += ["### top level (`conf/config.yaml`)\n", "| field | default | meaning |",
              "|---|---|---|", *[r.replace("`", "`scheduler.", 1) for r in
                                 _fields(schemas.SchedulerConfig)],
              *[r for r in _fields(schemas.RunConfig) if not r.startswith(
                  tuple(f"| `{g}`" for g in (*GROUP_SCHEMAS, "task", "scheduler")))], ""]
    return "\n".join(lines)


def readme_section(readme: str) -> str:
    """The text between the README's reference markers."""
    return readme.split(BEGIN, 1)[1].split(END, 1)[0].strip("\n")


def write_readme(path: Path = CONF_DIR.parent / "README.md") -> None:
    text = path.read_text()
    head, rest = text.split(BEGIN, 1)
    path.write_text(f"{head}{BEGIN}\n{reference()}\n{END}{rest.split(END, 1)[1]}")


if __name__ == "__main__":
    import sys
    write_readme() if "--write" in sys.argv else print(reference())
