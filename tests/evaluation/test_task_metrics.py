"""Task metrics (exact match, label-set accuracy, ROUGE-L) and the row evaluator, on tiny real models.

The pure functions are checked on hand-computed values; the batched, padded, KV-cached paths
against slow one-example-at-a-time references written here from the definitions.
"""

import dataclasses
import json
import os
from contextlib import nullcontext

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import datasets
import pytest
import torch
from conftest import TINY_CONFIGS, tiny_model

from crma_lightning.backbone.loading import BackboneConfig, load_backbone
from crma_lightning.core import losses
from crma_lightning.data import IGNORE_INDEX, ContinualDataModule, TaskSpec
from crma_lightning.evaluation import task_metrics as tm
from crma_lightning.evaluation.evaluator import RowEvaluator, answer_budget, label_targets, task_data


@pytest.fixture(autouse=True)
def _private_datasets_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setattr(
        datasets.config, "HF_DATASETS_CACHE", str(tmp_path_factory.getbasetemp() / "hf_cache")
    )


# ----------------------------------------------------------------------------- pure functions


def test_exact_match_normalises_whitespace_and_case():
    got = tm.exact_matches(
        [" World", "sports\n", "Business ", "Science"], ["world", "Sports", "Business", "Sport"]
    )
    assert got.tolist() == [1.0, 1.0, 1.0, 0.0] and got.dtype == torch.float64
    assert tm.normalize_answer("  Ünïcode ÄB \n") == "ünïcode äb"


def test_rouge_l_on_hand_computed_values():
    # LCS("a b c d", "a c d e") = "a c d": P = R = 3/4, F = 3/4; identical answers give 1; disjoint 0.
    assert tm.rouge_l_sum(["a b c d"], ["a c d e"]) == pytest.approx(0.75)
    assert tm.rouge_l_sum(
        ["a b c d", "x y", "same words"], ["a c d e", "p q", "same words"]
    ) == pytest.approx(1.75)
    assert tm.rouge_l_sum([], []) == 0.0


def test_prompt_lengths():
    labels = torch.tensor([[-100, -100, -100, 7, 8], [-100, 5, 6, -100, -100], [1, 2, 3, 4, -100]])
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 1, 1, 1, 0]])
    # Answer after 3 and 1 unscored tokens; the text block (every token scored) routes on 2 tokens.
    assert tm.prompt_lengths(labels, mask, route_tokens=2).tolist() == [3, 1, 2]


def test_sums_add_per_task_and_ratio_is_nan_when_empty():
    sums = tm.Sums(2)
    sums.update(0, examples=torch.tensor([1.0, 1.0, 0.0]), exact=torch.tensor([1.0, 0.0]))
    sums.update(1, loss_sum=2.5, tokens=5)
    sums.update(0, exact=1.0)
    v = sums.compute()
    assert v.dtype == torch.float64 and v.shape == (2, len(tm.QUANTITIES))
    assert v[0, tm.Q["examples"]] == 2 and v[0, tm.Q["exact"]] == 2 and v[1, tm.Q["loss_sum"]] == 2.5
    assert tm.ratio(1.0, 4.0) == 0.25 and tm.ratio(1.0, 0.0) != tm.ratio(1.0, 0.0)


@torch.no_grad()
def _summed_log_prob(model, prompt: list[int], choice: list[int]) -> float:
    """The definition, one unpadded sequence: sum_t log p(choice_t | prompt, choice_<t)."""
    ids = torch.tensor([prompt + choice])
    logp = model(input_ids=ids).logits[0].log_softmax(-1)  # (T, V)
    return sum(float(logp[len(prompt) - 1 + k, tok]) for k, tok in enumerate(choice))


@pytest.mark.parametrize("family", ["llama", "gpt2", "opt", "gpt_neox", "gemma2", "phi3"])
def test_choice_log_likelihoods_equal_unpadded_sequences(family):
    model = tiny_model(family)
    prompts = [[5, 6, 7, 8, 9], [10, 11], [12, 13, 14]]
    choices = [[20, 21, 1], [22, 1], [23, 24, 25, 1]]
    got = tm.score_choices(model, prompts, choices, pad_id=0, budget=4, prompt_loss=True)
    want = torch.tensor([[_summed_log_prob(model, p, c) for c in choices] for p in prompts])
    # measured 1.9e-6 (one float32 ulp at ~16); one changed prompt token moves them by 2e-2 or more
    torch.testing.assert_close(got.log_likelihood, want, atol=1e-5, rtol=0)
    torch.testing.assert_close(
        tm.choice_log_likelihoods(model, prompts, choices, pad_id=0), got.log_likelihood
    )
    with torch.no_grad():  # token accuracy of each target, the greedy answer and the prompt's own loss
        for b, p in enumerate(prompts):
            for k, c in enumerate(choices):
                logits = model(input_ids=torch.tensor([p + c])).logits[0, len(p) - 1 : -1]
                assert got.correct[b, k] == (logits.argmax(-1) == torch.tensor(c)).sum()
            assert got.answers[b].tolist() == _greedy(model, p, 4, eos=-1)
            logits = model(input_ids=torch.tensor([p])).logits[0, :-1]
            want_loss = torch.nn.functional.cross_entropy(logits, torch.tensor(p[1:]))
            torch.testing.assert_close(got.prompt_loss[b], want_loss, atol=2e-6, rtol=0)  # measured 4.8e-7


# ----------------------------------------------------------------------------- the row evaluator

LABELS = ["Sports", "Business"]


def _classification_dm(tmp_path) -> ContinualDataModule:
    records = [
        {"sentence": f"story {i} about {'goals' if i % 2 else 'markets'}", "label": LABELS[i % 2]}
        for i in range(30)
    ]
    path = tmp_path / "news.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    qa = tmp_path / "qa.jsonl"
    qa.write_text(
        "".join(json.dumps({"prompt": f"{i}+{i}=", "response": f" {2 * i} ok"}) + "\n" for i in range(30))
    )
    tasks = [
        TaskSpec("news", source=str(path), format="classification", text_field="sentence", labels=LABELS),
        TaskSpec("qa", source=str(qa), format="prompt_response", metric="rougeL"),
        TaskSpec("blocks", source=str(qa), format="text", text_field="prompt"),
    ]
    dm = ContinualDataModule(
        tasks, tokenizer="tiny", max_length=96, train_size=8, holdout_size=6, test_size=5, eval_batch_size=4
    )
    dm.setup()
    return dm


def _model_for(dm):
    config = dict(TINY_CONFIGS["llama"], vocab_size=dm.vocab_size, max_position_embeddings=128)
    model = load_backbone(BackboneConfig(config=config, init_seed=3))
    return model.eval()


@torch.no_grad()
def _greedy(model, prompt: list[int], steps: int, eos: int) -> list[int]:
    """Greedy decoding without a cache, one token at a time, cut at eos."""
    ids = list(prompt)
    for _ in range(steps):
        ids.append(int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax()))
    new = ids[len(prompt) :]
    return new[: new.index(eos)] if eos in new else new


@torch.no_grad()
def test_oracle_row_matches_one_example_at_a_time_references(tmp_path):
    dm = _classification_dm(tmp_path)
    model = _model_for(dm)
    tok = dm.hf_tokenizer
    evaluator = RowEvaluator(
        model, lambda task: nullcontext(), tok, pad_id=dm.pad_token_id, generation_batch_size=3
    )
    for split in ("validation", "test"):
        tasks = task_data(dm, split)
        row = evaluator.oracle(tasks)
        assert list(row) == ["news", "qa", "blocks"]
        for task in tasks:
            # Loss and token accuracy: the same sums as the evaluation callback's loop.
            s = [
                losses.token_stats(
                    model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits,
                    b["labels"],
                    b["example_weight"],
                )
                for b in task.batches
            ]
            tokens = sum(float(x.tokens) for x in s)
            assert row[task.name]["loss"] == pytest.approx(
                sum(float(x.loss_sum) for x in s) / tokens, rel=1e-6
            )
            assert row[task.name]["token_accuracy"] == pytest.approx(
                sum(float(x.correct) for x in s) / tokens, rel=1e-6
            )
        examples = [
            (
                ids[m.bool()].tolist(),
                lab[: int(m.sum())].tolist(),
                b["target"][i].item() if "target" in b else None,
            )
            for task in tasks[:2]
            for b in task.batches
            for i, (ids, m, lab) in enumerate(
                zip(b["input_ids"], b["attention_mask"], b["labels"], strict=True)
            )
        ]
        news = [e for e in examples if e[2] is not None]
        qa = [e for e in examples if e[2] is None]
        assert len(news) == dm.split_size("news", split) and len(qa) == dm.split_size("qa", split)
        eos = tok.eos_token_id
        choices = label_targets(dm, "news")
        label_right = exact = 0
        for ids, lab, target in news:
            prompt = ids[: lab.index(next(x for x in lab if x != IGNORE_INDEX))]
            scores = [_summed_log_prob(model, prompt, c) for c in choices]
            label_right += scores.index(max(scores)) == target
            answer = tok.decode(
                _greedy(model, prompt, answer_budget(dm, "news"), eos), skip_special_tokens=True
            )
            exact += answer.strip().casefold() == LABELS[target].casefold()
        assert row["news"]["label_accuracy"] == pytest.approx(label_right / len(news))
        assert row["news"]["exact_match"] == pytest.approx(exact / len(news))
        assert row["news"]["accuracy"] == row["news"]["exact_match"]  # the classification task metric
        rouge = 0.0
        for ids, lab, _ in qa:
            start = next(k for k, x in enumerate(lab) if x != IGNORE_INDEX)
            reference = tok.decode([x for x in ids[start:] if x != eos])
            answer = tok.decode(
                _greedy(model, ids[:start], answer_budget(dm, "qa", split), eos), skip_special_tokens=True
            )
            rouge += tm.rouge_l_sum([answer], [reference])
        assert row["qa"]["rougeL"] == pytest.approx(rouge / len(qa), abs=1e-6)
        assert (
            row["qa"]["accuracy"] == row["qa"]["rougeL"]
            and row["qa"]["label_accuracy"] != row["qa"]["label_accuracy"]
        )
        assert row["blocks"]["accuracy"] == row["blocks"]["token_accuracy"]
        assert row["blocks"]["exact_match"] != row["blocks"]["exact_match"]  # NaN: nothing generated


@pytest.mark.e2e
def test_a_model_that_knows_the_labels_scores_one(tmp_path):
    """Exact match and label accuracy can reach 1: a model trained to the answers gets them all."""
    dm = _classification_dm(tmp_path)
    model = _model_for(dm)
    batches = dm.holdout_batches("news")
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(150):
        for b in batches:
            opt.zero_grad()
            out = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
            losses.token_stats(out, b["labels"]).loss_sum.backward()
            opt.step()
    model.eval()
    evaluator = RowEvaluator(model, lambda task: nullcontext(), dm.hf_tokenizer, pad_id=dm.pad_token_id)
    row = evaluator.oracle(task_data(dm, "validation")[:1])["news"]
    assert row["label_accuracy"] == 1.0 and row["exact_match"] == 1.0 and row["loss"] < 0.05


def test_prompt_labels_and_route():
    ids = torch.arange(10, 25).view(3, 5)
    got = tm.prompt_labels(ids, torch.tensor([3, 1, 2]))
    assert got.tolist() == [
        [10, 11, 12, -100, -100],
        [15, -100, -100, -100, -100],
        [20, 21, -100, -100, -100],
    ]
    # Lowest prompt loss wins; a row with nothing scorable (1-token prompts) goes to the latest task.
    prompt_losses = torch.tensor([[2.0, 1.0, 3.0], [0.5, 0.7, 0.1], [float("nan")] * 3])
    assert tm.route(prompt_losses).tolist() == [1, 2, 2]


def _by_length(prompts: list[list[int]]) -> torch.Tensor:
    """A stand-in for the statistics router (any function of the prompt): candidate = length parity."""
    return torch.tensor([len(p) % 2 for p in prompts])


@torch.no_grad()
@pytest.mark.parametrize("router", ["loss", "given"])
def test_routed_row_matches_one_example_at_a_time_routing(router, tmp_path):
    """Without the task id: each example goes to the LoRA that scores its prompt (only) best, or to
    the one a given router picks from its prompt, and takes that LoRA's loss, label choice and
    answer; checked against a per-example reference."""
    from crma_lightning.adapters.config import LoRAConfig
    from crma_lightning.adapters.lora import activate_lora, add_lora, lora_parameters

    dm = _classification_dm(tmp_path)
    model = _model_for(dm)
    gen = torch.Generator().manual_seed(0)
    for adapter in ("news", "qa"):
        add_lora(model, adapter, LoRAConfig(r=4, dropout=0.0, target_modules="all-linear"))
        for p in lora_parameters(model, adapter):
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    model.eval()

    def serve(task):
        activate_lora(model, task)
        return nullcontext()

    tok, eos = dm.hf_tokenizer, dm.hf_tokenizer.eos_token_id
    evaluator = RowEvaluator(model, serve, tok, pad_id=dm.pad_token_id, generation_batch_size=3)
    tasks = task_data(dm, "validation")[:2]
    row = evaluator.routed(tasks, ["news", "qa"], _by_length if router == "given" else None)
    seen = set()
    for task in tasks:
        routed_right = loss_sum = tokens = label_right = exact = 0.0
        n = 0
        for b in task.batches:
            for i in range(len(b["input_ids"])):
                m = b["attention_mask"][i].bool()
                ids, lab = b["input_ids"][i][m].tolist(), b["labels"][i][: int(m.sum())]
                start = next(k for k, x in enumerate(lab.tolist()) if x != IGNORE_INDEX)
                prompt = ids[:start]
                scores = {}
                for c in ("news", "qa"):  # mean loss of the prompt's own next tokens
                    activate_lora(model, c)
                    logp = model(input_ids=torch.tensor([prompt])).logits[0].log_softmax(-1)
                    scores[c] = -sum(float(logp[t - 1, prompt[t]]) for t in range(1, len(prompt))) / (
                        len(prompt) - 1
                    )
                chosen = min(scores, key=scores.get)
                if router == "given":
                    chosen = ["news", "qa"][int(_by_length([prompt])[0])]
                seen.add(chosen)
                routed_right += chosen == task.name
                activate_lora(model, chosen)
                logits = model(input_ids=torch.tensor([ids])).logits
                s = losses.token_stats(logits, lab[None])
                loss_sum, tokens = loss_sum + float(s.loss_sum), tokens + float(s.tokens)
                answer = tok.decode(_greedy(model, prompt, task.budget, eos), skip_special_tokens=True)
                if task.choices is not None:
                    target = int(b["target"][i])
                    best = max(
                        range(len(LABELS)), key=lambda k: _summed_log_prob(model, prompt, task.choices[k])
                    )
                    label_right += best == target
                    exact += answer.strip().casefold() == LABELS[target].casefold()
                n += 1
        got = row[task.name]
        assert got["routing_accuracy"] == pytest.approx(routed_right / n)
        assert got["loss"] == pytest.approx(loss_sum / tokens, rel=1e-5)
        if task.choices is not None:
            assert got["label_accuracy"] == pytest.approx(label_right / n)
            assert got["exact_match"] == pytest.approx(exact / n)
    assert seen == {"news", "qa"}  # both adapters are chosen for some examples


@torch.no_grad()
def test_length_sorted_batches_score_as_the_stored_order_with_less_padding(tmp_path):
    """holdout_batches orders a held-out set by length (longest first) before batching: the sums
    are the same up to float rounding, the per-example counts exactly, and less padding is run."""
    dm = _classification_dm(tmp_path)
    model = _model_for(dm)
    evaluator = RowEvaluator(model, lambda task: nullcontext(), dm.hf_tokenizer, pad_id=dm.pad_token_id)

    def padding(tasks):
        return sum(int((b["attention_mask"] == 0).sum()) for t in tasks for b in t.batches)

    for split in ("validation", "test"):
        by_length = task_data(dm, split, batch_size=3)
        stored = [
            dataclasses.replace(
                t, batches=dm.holdout_batches(t.name, batch_size=3, split=split, by_length=False)
            )
            for t in by_length
        ]
        assert padding(by_length) <= padding(stored)  # (the lengths here differ little; see tests/data)
        sorted_row, stored_row = evaluator.oracle(by_length), evaluator.oracle(stored)
        for task, got in sorted_row.items():
            want = stored_row[task]
            for metric in ("token_accuracy", "exact_match", "label_accuracy"):  # counts: exact
                assert got[metric] == want[metric] or (
                    got[metric] != got[metric] and want[metric] != want[metric]
                )
            for metric in ("loss", "rougeL"):
                assert got[metric] == pytest.approx(want[metric], abs=1e-6, nan_ok=True), (task, metric)
        # Stopping generation once every answer of a batch has ended changes no number.
        early = RowEvaluator(
            model, lambda task: nullcontext(), dm.hf_tokenizer, pad_id=dm.pad_token_id, early_stop=True
        ).oracle(by_length)
        assert json.dumps(early) == json.dumps(sorted_row)


@torch.no_grad()
def test_generation_stops_once_every_answer_has_ended_with_the_same_answers():
    """``stop_at``: the steps after every row's eos are not run, and the answers cut at their
    first eos are those of the full budget."""
    model = tiny_model("llama")
    prompts = [[10, 11], [12, 13, 14]]
    choices = [[20, 21, 1], [22, 1]]
    full = tm.score_choices(model, prompts, choices, pad_id=0, budget=6)
    # As "eos", a token every row generates before the last step, so that generation can stop early.
    common = set(full.answers[0, :-1].tolist()).intersection(*(r[:-1].tolist() for r in full.answers[1:]))
    assert common, full.answers
    eos = min(common)
    calls = []
    hook = model.register_forward_pre_hook(lambda m, a, k: calls.append(1), with_kwargs=True)
    try:
        stopped = tm.score_choices(model, prompts, choices, pad_id=0, budget=6, stop_at=eos)
        calls_stopped = len(calls)
        calls.clear()
        again = tm.score_choices(model, prompts, choices, pad_id=0, budget=6)
    finally:
        hook.remove()

    def cut(row):
        row = row.tolist()
        return row[: row.index(eos)] if eos in row else row

    assert [cut(r) for r in stopped.answers] == [cut(r) for r in again.answers]
    assert stopped.answers.shape == again.answers.shape
    assert torch.equal(stopped.log_likelihood, again.log_likelihood)
    assert calls_stopped < len(calls)  # every row ended before the budget: fewer forward passes


@torch.no_grad()
def test_routed_batches_sent_whole_to_their_own_task_take_the_oracles_forward(tmp_path):
    """With a batch cache shared by one row's oracle and routed passes, a batch the router sends
    whole to its own task's adapter is not run again; the routed row is the same bit for bit."""
    dm = _classification_dm(tmp_path)
    model = _model_for(dm)
    tasks = task_data(dm, "validation")
    names = [t.name for t in tasks]

    def route(prompts):  # everything to "news": news's batches go whole to their own adapter
        return torch.zeros(len(prompts), dtype=torch.long)

    def evaluator(cache):
        return RowEvaluator(
            model, lambda task: nullcontext(), dm.hf_tokenizer, pad_id=dm.pad_token_id, batch_cache=cache
        )

    calls = []
    hook = model.register_forward_pre_hook(lambda m, a, k: calls.append(1), with_kwargs=True)
    try:
        cache: dict = {}
        shared = evaluator(cache)
        shared.oracle(tasks)
        assert sorted(cache) == [("news", j) for j in range(len(tasks[0].batches))]
        calls.clear()
        with_cache = shared.routed(tasks, names, route)
        calls_with = len(calls)
        calls.clear()
        without = evaluator(None).routed(tasks, names, route)
    finally:
        hook.remove()
    assert json.dumps(with_cache) == json.dumps(without)
    assert calls_with < len(calls)  # news's prompts, labels and answers were not run again
