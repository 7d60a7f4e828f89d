"""Prompt/response task files of the text-classification continual-learning benchmark for train.py.

Reads the offline copy of O-LoRA's Standard CL Benchmark tasks (``../shared/cl_benchmark``: per task
``train.jsonl`` records ``{"sentence", "label"}`` and ``task.json`` with the instruction and the
label list) and writes ``<out>/<task>.jsonl`` records ``{"prompt", "response"}`` in O-LoRA's prompt
format, ``<instruction>\\nOption: <labels joined by ", "> \\n<sentence>\\nAnswer:``, with the label as
the response. It prints the ``--data.tasks`` value for ``train.py fit`` (``format: prompt_response``;
the DataModule takes the holdout and training examples from these records).

    python benchmarks/cl_benchmark_tasks.py --src ../shared/cl_benchmark --out runs/cl_data \
        agnews amazon dbpedia
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from harness import REPO  # noqa: F401  (puts the repository on sys.path)

from crma_lightning.core.atomic import atomic_write_text


def prompt_of(instruction: str, labels: list[str], sentence: str) -> str:
    return f"{instruction}\nOption: {', '.join(labels)} \n{sentence.strip()}\nAnswer:"


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("tasks", nargs="+", help="task folders of --src, in training order")
    ap.add_argument("--src", default="../shared/cl_benchmark", help="the benchmark's folder")
    ap.add_argument("--out", required=True, help="folder for the <task>.jsonl files")
    ap.add_argument("--split", default="train", help="which file of each task: train, validation or test")
    args = ap.parse_args(sys.argv[1:] if argv is None else argv)
    src, out = Path(args.src), Path(args.out)
    specs = []
    for task in args.tasks:
        meta = json.loads((src / task / "task.json").read_text(encoding="utf-8"))
        lines = (src / task / f"{args.split}.jsonl").read_text(encoding="utf-8").splitlines()
        rows = []
        for line in lines:
            if line.strip():
                r = json.loads(line)
                rows.append(
                    {
                        "prompt": prompt_of(meta["instruction"], meta["labels"], r["sentence"]),
                        "response": " " + r["label"],
                    }
                )
        path = out / f"{task}.jsonl"
        atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
        specs.append({"name": task, "source": str(path), "format": "prompt_response"})
        print(f"{path}: {len(rows)} records", file=sys.stderr)
    print(json.dumps(specs))
    return specs


if __name__ == "__main__":
    main()
