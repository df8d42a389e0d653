"""Zero-shot scoring: the templates, lm-eval's tokenisation rules, and equality with lm-eval itself."""
import json
import os

import pytest
import torch

from patchc.models import load_model
from patchc.zeroshot import (TASKS, TaskError, encode_pair, evaluate_zeroshot, load_task, loglikelihoods,
                             parse_item, score)

from conftest import SHARED

ZS = SHARED / "assets" / "data" / "zeroshot"
needs_data = pytest.mark.skipif(not ZS.is_dir(), reason="../shared/assets/data/zeroshot not present")


def test_templates_follow_lm_eval():
    it = parse_item("piqa", {"query": "Question: dresser\n", "choices": ["a b", "c"], "gold": 1})
    assert it.requests == [("Question: dresser\nAnswer:", " a b"), ("Question: dresser\nAnswer:", " c")]
    assert it.gold == 1 and it.norm_text == ["a b", "c"]
    it = parse_item("arc_easy", {"query": "Question: Why?", "choices": ["x"], "gold": 0})
    assert it.requests == [("Question: Why?\nAnswer:", " x")]
    it = parse_item("winogrande", {"context_options": ["A so A", "A so B"], "continuation": "won.", "gold": 1})
    assert it.requests == [("A so A", " won."), ("A so B", " won.")] and it.norm_text == ["A so A", "A so B"]
    it = parse_item("lambada_openai", {"context": "he said", "continuation": "hello"})
    assert it.requests == [("he said", " hello")]


def test_trailing_context_spaces_move_to_the_continuation():
    tok = load_model("tiny:llama").tokenizer
    ctx, cont = encode_pair(tok, "a b  ", "c")
    assert tok.decode(ctx) == "a b" and tok.decode(cont) == "  c"


def test_scores_pick_the_likeliest_choice_and_normalise_by_length():
    items = [parse_item("piqa", {"query": "Q\n", "choices": ["short", "much longer"], "gold": 1})]
    # choice 0 has the higher loglikelihood; per character choice 1 wins
    r = score("piqa", items, [(-6.0, False), (-8.0, False)])
    assert r["acc"] == 0.0 and r["acc_norm"] == 1.0
    items = [parse_item("lambada_openai", {"context": "a", "continuation": "b"})] * 2
    r = score("lambada_openai", items, [(-1.0, True), (-3.0, False)])
    assert r["acc"] == 0.5 and r["ppl"] == pytest.approx(torch.tensor(2.0).exp().item())


def test_loglikelihood_equals_a_direct_forward():
    lm = load_model("tiny:llama")
    model, tok = lm.model.eval(), lm.tokenizer
    reqs = [("The cat", " sat"), ("A much longer context here", " and more"), ("x", " y z")]
    got = loglikelihoods(lambda ids: model(input_ids=ids).logits, tok, reqs, batch_tokens=40, progress=False)
    for (ctx, cont), (ll, greedy) in zip(reqs, got):
        c, t = encode_pair(tok, ctx, cont)
        ids = torch.tensor([c + t])
        lp = torch.log_softmax(model(input_ids=ids).logits[0, len(c) - 1: -1].double(), -1)
        want = lp.gather(-1, torch.tensor(t)[:, None]).sum().item()
        assert ll == pytest.approx(want, abs=1e-4)
        assert greedy == bool((lp.argmax(-1) == torch.tensor(t)).all())


def test_bad_task_files_are_refused(tmp_path):
    with pytest.raises(TaskError, match="not found"):
        load_task("piqa", tmp_path)
    (tmp_path / "piqa.jsonl").write_text('{"query": "Q", "gold": 0}\n')
    with pytest.raises(TaskError, match="lacks a field"):
        load_task("piqa", tmp_path)
    (tmp_path / "arc_easy.jsonl").write_text("not json\n")
    with pytest.raises(TaskError, match="not valid JSON"):
        load_task("arc_easy", tmp_path)
    with pytest.raises(TaskError, match="unknown task"):
        parse_item("hellaswag", {})


def _lm_eval_yamls(folder, limit_dir):
    """Local lm-eval task YAMLs over our jsonl files, with lm-eval's own templates and metrics."""
    common = "dataset_path: json\ntest_split: train\n"
    files = {t: limit_dir / f"{t}.jsonl" for t in TASKS}
    specs = {
        "piqa": 'output_type: multiple_choice\ndoc_to_text: "{{query[:-1] if query.endswith(\'\\n\') else query}}\\nAnswer:"\n'
                "doc_to_target: gold\ndoc_to_choice: choices\n",
        "arc_easy": 'output_type: multiple_choice\ndoc_to_text: "{{query}}\\nAnswer:"\ndoc_to_target: gold\n'
                    "doc_to_choice: choices\n",
        "winogrande": "output_type: multiple_choice\ndoc_to_text: gold\ndoc_to_target: continuation\n"
                      "doc_to_choice: context_options\n",
        "lambada_openai": "output_type: loglikelihood\ndoc_to_text: context\ndoc_to_target: \"{{' ' + continuation}}\"\n",
    }
    metrics = {t: ["acc", "acc_norm"] if t != "lambada_openai" else ["acc", "perplexity"] for t in TASKS}
    for t in TASKS:
        agg = lambda m: "perplexity" if m == "perplexity" else "mean"  # noqa: E731
        ml = "".join(f"  - metric: {m}\n    aggregation: {agg(m)}\n    higher_is_better: {m != 'perplexity'}\n"
                     for m in metrics[t])
        (folder / f"patchc_{t}.yaml").write_text(
            f"task: patchc_{t}\n{common}dataset_kwargs:\n  data_files:\n    train: {files[t]}\n{specs[t]}"
            f"metric_list:\n{ml}")


@needs_data
def test_equals_lm_eval_on_the_same_items(tmp_path, monkeypatch):
    """Our scorer and lm-eval's HFLM, same model, same first 40 items of each task: identical metrics."""
    lm_eval = pytest.importorskip("lm_eval")
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    n = 40
    data = tmp_path / "data"
    data.mkdir()
    for t in TASKS:  # the first n items, so both sides see exactly the same ones
        lines = (ZS / f"{t}.jsonl").read_text(encoding="utf-8").splitlines()[:n]
        (data / f"{t}.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    yamls = tmp_path / "tasks"
    yamls.mkdir()
    _lm_eval_yamls(yamls, data)
    loaded = load_model("tiny:llama", seed=3)
    model, tok = loaded.model.eval(), loaded.tokenizer
    ours = evaluate_zeroshot(lambda ids: model(input_ids=ids).logits, tok, data, progress=False,
                             max_length=model.config.max_position_embeddings)
    lm = HFLM(pretrained=model, tokenizer=tok, batch_size=4, max_length=model.config.max_position_embeddings,
              softmax_dtype="float32")
    res = lm_eval.simple_evaluate(model=lm, tasks=[f"patchc_{t}" for t in TASKS],
                                  task_manager=TaskManager(include_path=str(yamls)), num_fewshot=0,
                                  bootstrap_iters=0, log_samples=False)["results"]
    for t in TASKS:
        theirs = res[f"patchc_{t}"]
        assert ours[t]["n"] == n
        assert ours[t]["acc"] == pytest.approx(theirs["acc,none"], abs=1e-9), (t, ours[t], theirs)
        if t == "lambada_openai":
            assert ours[t]["ppl"] == pytest.approx(theirs["perplexity,none"], rel=1e-4)
        else:
            assert ours[t]["acc_norm"] == pytest.approx(theirs["acc_norm,none"], abs=1e-9), (t, ours[t], theirs)
    assert json.loads(json.dumps(ours)) == ours  # serialisable as reported, nothing lost
    assert os.environ.get("HF_DATASETS_OFFLINE") == "1"
