"""lm-evaluation-harness on our models: ``lm_eval``'s Python API with ``model="hf"`` on an exported directory and a
multiple-choice task defined here from a local JSONL file (nothing fetched), checked against log-likelihoods
computed directly with the model."""

import json
import os

import pytest
import torch

pytest.importorskip("transformers")
lm_eval = pytest.importorskip("lm_eval")

DOCS = [
    {"question": "The capital of France is", "choices": ["Paris", "a banana", "seven"], "label": 0},
    {"question": "Two plus two equals", "choices": ["four", "blue", "the dog"], "label": 0},
    {"question": "The sky on a clear day is", "choices": ["green", "blue", "loud"], "label": 1},
    {"question": "Cats like to drink", "choices": ["milk", "gasoline", "sand"], "label": 0},
    {"question": "Water freezes at zero degrees", "choices": ["Celsius", "Kelvin"], "label": 0},
]


def _task(tmp_path):
    tmp_path.mkdir(parents=True, exist_ok=True)
    data = tmp_path / "toy.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in DOCS))
    (tmp_path / "nl_toy.yaml").write_text(
        "task: nl_toy\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        'doc_to_text: "{{question}}"\n'
        'doc_to_choice: "{{choices}}"\n'
        "doc_to_target: label\n"
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
    )
    return tmp_path


@torch.no_grad()
def _loglikelihood(model, tok, context: str, continuation: str) -> float:
    """log p(continuation | context), tokenised as the harness does (context alone, then the whole string)."""
    ctx = tok.encode(context)
    whole = tok.encode(context + continuation)
    cont = whole[len(ctx):]
    logits = model(torch.tensor([whole[:-1]])).logits[0].float().log_softmax(-1)
    return float(sum(logits[len(ctx) - 1 + i, t] for i, t in enumerate(cont)))


def test_lm_eval_hf_model_on_a_local_task_matches_direct_log_likelihoods(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets"))
    from lm_eval.tasks import TaskManager

    import nested_learning.hf as nh
    from nested_learning.data import get_tokenizer
    from nested_learning.hf.tokenizer import gpt2_tokenizer

    torch.manual_seed(0)
    config = nh.NestedLearningConfig(model="hope", size="tiny", overrides=dict(dim=32, n_layers=1, n_heads=2,
                                                                               chunk_sizes=[2, 4]))
    model = nh.NestedLearningForCausalLM(config).eval()  # HOPE with its CMS levels learning in context
    hf_dir = tmp_path / "hf"
    model.save_pretrained(hf_dir)
    gpt2_tokenizer().save_pretrained(hf_dir)
    tasks = _task(tmp_path / "tasks")

    results = lm_eval.simple_evaluate(
        model="hf", model_args=f"pretrained={hf_dir},trust_remote_code=True,dtype=float32", tasks=["nl_toy"],
        task_manager=TaskManager(include_path=str(tasks)), batch_size=2, device="cpu", log_samples=True,
    )
    acc = results["results"]["nl_toy"]["acc,none"]
    samples = sorted(results["samples"]["nl_toy"], key=lambda s: s["doc_id"])

    tok = get_tokenizer()
    correct = []
    for doc, sample in zip(DOCS, samples):
        direct = [_loglikelihood(model.model, tok, doc["question"], " " + c) for c in doc["choices"]]
        harness = [r[0] for r in sample["filtered_resps"]]
        assert harness == pytest.approx(direct, abs=1e-4)
        correct.append(max(range(len(direct)), key=direct.__getitem__) == doc["label"])
    assert acc == pytest.approx(sum(correct) / len(DOCS))
    assert os.environ["HF_HUB_OFFLINE"] == "1"
