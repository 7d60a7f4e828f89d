"""Classification tasks written to disk whose label is readable from one keyword: real files
for the evaluation, accumulation and DDP tests."""

from __future__ import annotations

import json

KEYWORDS = {
    "news": {"Sports": "goals", "Business": "markets"},
    "mood": {"positive": "great", "negative": "awful"},
}


def write_task(root, name: str, keywords: dict[str, dict[str, str]] = KEYWORDS) -> str:
    """``root/name/`` with train.jsonl and task.json: the label is readable from one keyword."""
    folder = root / name
    folder.mkdir()
    labels = list(keywords[name])
    rows = [{"sentence": f"x{i} {keywords[name][labels[i % 2]]}", "label": labels[i % 2]} for i in range(120)]
    (folder / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "task.json").write_text(json.dumps({"instruction": f"The {name}?", "labels": labels}))
    return str(folder)
