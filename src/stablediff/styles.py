"""Prompt styles: named prompt and negative-prompt fragments kept in a CSV file, in AUTOMATIC1111's styles.csv format.

The file has a header row naming its columns, `name,prompt,negative_prompt` (A1111's older files have `text` in
place of `prompt`; a missing negative_prompt column means none), and one style a row. Applying styles to a prompt
follows A1111's rule, style by style in the order asked for: a style text holding `{prompt}` has the prompt put in
that place (every occurrence); any other is appended after a comma, empty parts left out.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import NamedTuple

__all__ = ["Style", "read_styles", "merge_prompts", "apply_styles"]

PLACEHOLDER = "{prompt}"


class Style(NamedTuple):
    name: str
    prompt: str
    negative_prompt: str


def read_styles(path: str | Path) -> dict[str, Style]:
    """name -> Style, in the file's order (a later row of the same name wins, as in A1111). ValueError naming the
    file for one that is missing, not UTF-8, or has no `name` and `prompt`/`text` columns."""
    path = Path(path)
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:
            reader = csv.DictReader(f, skipinitialspace=True)
            columns = set(reader.fieldnames or ())
            if "name" not in columns or not columns & {"prompt", "text"}:
                raise ValueError(f"{path}: a styles file starts with the header name,prompt,negative_prompt "
                                 f"(found {', '.join(sorted(columns)) or 'no header'})")
            return {row["name"]: _style(row) for row in reader if row.get("name")}
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise ValueError(f"{path}: cannot read the styles file ({type(e).__name__}: {e})") from None


def _style(row: dict) -> Style:
    prompt = row["prompt"] if "prompt" in row else row["text"]
    return Style(row["name"], prompt or "", row.get("negative_prompt") or "")


def merge_prompts(style_prompt: str, prompt: str) -> str:
    """One style's text applied to a prompt: into its {prompt} placeholder, else appended after ", "."""
    if PLACEHOLDER in style_prompt:
        return style_prompt.replace(PLACEHOLDER, prompt)
    return ", ".join(part for part in (prompt.strip(), style_prompt.strip()) if part)


def apply_styles(prompt: str, negative_prompt: str, styles: list[Style]) -> tuple[str, str]:
    """(prompt, negative prompt) with each style applied in turn, first to last."""
    for style in styles:
        prompt = merge_prompts(style.prompt, prompt)
        negative_prompt = merge_prompts(style.negative_prompt, negative_prompt)
    return prompt, negative_prompt
