"""The README's config reference, generated from conf/ and the schemas so it cannot drift:
`python -m runner.config_docs` prints it; a test checks the README holds the same text."""
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
            lines.append(f"- `{group}={option}`: {_first_comment(CONF_DIR / group / f'{option}.yaml')}")
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


if __name__ == "__main__":
    print(reference())
