"""``TaskSpec``: one task of the continual-learning sequence (its name, source, format and metric).

Which sources exist and how they are read is :mod:`crma_lightning.data.sources`; the validation of
a task list is :mod:`crma_lightning.data.tasks`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Metric = Literal["token_accuracy", "exact_match", "label_accuracy", "rougeL"]

OLORA_TEMPLATE = "{instruction}\nOption: {options} \n{text}\nAnswer:"
"""The prompt of the O-LoRA code's classification tasks (``CL_Benchmark``); the target is the label."""

DEFAULT_METRIC: dict[str, Metric] = {
    "text": "token_accuracy",
    "prompt_response": "token_accuracy",
    "classification": "exact_match",
}
"""The task metric of each format unless ``metric`` says otherwise."""


@dataclass
class TaskSpec:
    """One task of the continual-learning sequence."""

    name: str
    """Unique task name; the key of the task's adapter state, metrics (``val/<name>/loss``) and
    checkpoints."""
    source: str = "synthetic"
    """``synthetic``, a local file (.txt .jsonl .json .parquet .csv) or folder of split files,
    ``corpus:<domain>`` (a shipped domain, see ``crma_lightning.corpus.DOMAINS``), a ``datasets`` hub
    name, or what a source of ``data.sources`` or a registered one claims
    (:mod:`crma_lightning.data.sources`)."""
    format: Literal["text", "prompt_response", "classification"] = "text"
    """``text``: records are concatenated with eos and cut into ``max_length`` blocks, every token
    trained. ``prompt_response``: one example per record, loss on the response (+ eos) only.
    ``classification``: one example per record, ``template`` filled from the record, loss on
    ``answer_prefix`` + the label (+ eos) only."""
    text_field: str = "text"
    """Record field holding the text (``format: text``). A .txt file has one field, ``text``."""
    prompt_field: str = "prompt"
    """Record field holding the prompt (``format: prompt_response``)."""
    response_field: str = "response"
    """Record field holding the response (``format: prompt_response``)."""
    hub_config: str | None = None
    """Configuration name of a hub dataset (the second argument of ``datasets.load_dataset``)."""
    hub_split: str = "train"
    """Split of a hub dataset that is the task's training data (and, unless ``splits`` names
    others, its validation and test data, cut from it by ``data.seed``)."""
    splits: dict[str, str] | None = None
    """Validation and test data given apart from the training data: ``{validation: ..., test: ...}``,
    each a file (for a file source) or a split name of the same hub dataset (for a hub source). A
    folder source finds ``validation.*`` and ``test.*`` files itself. A split not given is cut from
    the training data by ``data.seed``."""
    label_field: str = "label"
    """Record field holding the label (``format: classification``): a label string of ``labels``,
    or an index into ``labels`` (e.g. a hub ClassLabel)."""
    labels: list[str] | None = None
    """The label set (``format: classification``), in index order. Default: ``labels`` of the
    task.json beside the data, else the label field's class names (a hub ClassLabel)."""
    instruction: str | None = None
    """The instruction (``format: classification``). Default: the task.json's, else
    'Choose one from the option.'."""
    template: str = OLORA_TEMPLATE
    """Prompt of a classification example (default: the O-LoRA code's). ``{instruction}``,
    ``{options}`` (the labels joined by ', '), ``{text}`` (the text field, cut to fit
    ``data.max_length``; required) and any record field by name."""
    answer_prefix: str = " "
    """Text put before the label in the target (a space: 'Answer: World' is how text reads)."""
    metric: Metric | None = None
    """The task metric, the accuracy matrix's value for this task: ``token_accuracy`` (default for
    text and prompt_response), ``exact_match`` of the greedy answer (default for classification;
    also for prompt_response), ``label_accuracy`` (classification: the label scored highest),
    ``rougeL`` (prompt_response: ROUGE-L F1 of the greedy answer against the response)."""

    @property
    def task_metric(self) -> Metric:
        """``metric``, or the format's default (:data:`DEFAULT_METRIC`)."""
        return self.metric or DEFAULT_METRIC.get(self.format, "token_accuracy")

    @property
    def generates(self) -> bool:
        """Whether evaluating it generates answers (exact match or ROUGE-L are computed)."""
        return self.format == "classification" or self.task_metric in ("exact_match", "rougeL")
