"""The lm-evaluation-harness wrapper and the local last-word task, on a tiny model folder (no hub)."""

import json
import random

import pytest

import elastiformer as ef
from elastiformer.loading.models import load_tokenizer
from helpers.cli import WORDS

try:  # a declared dependency (the dev / eval extras): missing, the suite fails here instead of skipping the file
    import lm_eval  # noqa: F401
except ImportError as err:
    raise ImportError("lm-eval is not installed, and these tests need it: pip install -e '.[dev]'") from err
from elastiformer.integrations import lm_eval as integration  # noqa: E402


@pytest.fixture(scope="module")
def setup(workspace):
    rng = random.Random(0)
    texts = [" ".join(rng.choice(WORDS) + ("." if rng.random() < 0.2 else "") for _ in range(400)) for _ in range(2)]
    task = integration.write_last_word_task(workspace / "task", n_docs=12, context_words=10, texts=texts)
    return workspace, load_tokenizer(workspace / "model"), task


def test_last_word_docs_are_passages_of_running_text():
    text = "one two three four five six seven eight nine ten eleven. " * 5
    docs = integration.last_word_docs([text], n_docs=3, context_words=5)
    assert len(docs) == 3
    for d in docs:
        assert d["target"] == "eleven" and len(d["context"].split()) == 5
        assert d["context"] + " " + d["target"] in text
    with pytest.raises(ef.errors.DataError):
        integration.last_word_docs(["too short."], context_words=5)


def test_task_folder_is_complete(setup):
    _, _, task = setup
    lines = (task / "docs.jsonl").read_text().splitlines()
    assert len(lines) == 12 and all("target" in json.loads(l) for l in lines)
    assert f"task: {integration.TASK_NAME}" in (task / f"{integration.TASK_NAME}.yaml").read_text()


def test_simple_evaluate_teacher_equals_full_budget_and_budget_changes_the_model(setup):
    root, tok, task = setup
    base = ef.load_model(root / "model")
    em = ef.get_elastic_model(base, ef.ElasticConfig(attn_heads=0.5, mlp_experts=4, mlp_experts_active=0.5))
    lm = integration.ElastiformerLM.from_elastic(em, tok, batch_size=4)
    with em.disable_routers():
        teacher = integration.evaluate_last_word(lm, task)
    em.set_budget(1.0)
    full = integration.evaluate_last_word(lm, task)
    assert full["perplexity"] == pytest.approx(teacher["perplexity"], rel=1e-4)
    assert full["acc"] == teacher["acc"]
    em.set_budget(0.3)
    low = integration.evaluate_last_word(lm, task)
    assert low["perplexity"] != pytest.approx(teacher["perplexity"], rel=1e-4)
    assert em.last_stats()["elastic_flops"] < em.last_stats()["dense_flops"]


def test_registered_model_loads_routers_from_a_folder(setup, tmp_path):
    root, tok, task = setup
    em = ef.get_elastic_model(ef.load_model(root / "model"), ef.ElasticConfig(attn_heads=0.5))
    em.save_pretrained(tmp_path / "routers")
    from lm_eval.api.registry import get_model

    cls = get_model("elastiformer")
    lm = cls.create_from_arg_string(f"routers={tmp_path / 'routers'},budget=0.5",  # base model: the routers'
                                    {"batch_size": 2})
    assert lm.elastic.get_budget() == {"attn_heads": 0.5}
    loaded = integration.evaluate_last_word(lm, task, limit=4)
    # the same routers at the same budget, wrapped in memory: the same answers
    em.set_budget(0.5)
    in_memory = integration.evaluate_last_word(integration.ElastiformerLM.from_elastic(em, tok, batch_size=2), task,
                                               limit=4)
    assert loaded["acc"] == in_memory["acc"]
    assert loaded["perplexity"] == pytest.approx(in_memory["perplexity"], rel=1e-5)
    with em.disable_routers():  # and not the teacher's: the routers were loaded and act
        teacher = integration.evaluate_last_word(integration.ElastiformerLM.from_elastic(em, tok, batch_size=2), task,
                                                 limit=4)
    assert loaded["perplexity"] != pytest.approx(teacher["perplexity"], rel=1e-4)
    with pytest.raises(ef.errors.ConfigError, match="routers"):
        cls.create_from_arg_string(f"pretrained={root / 'model'},budget=0.5", {})
    with pytest.raises(ef.errors.ConfigError, match=r"mlp_token \(did you mean mlp_tokens\?\)"):  # not ignored
        cls.create_from_arg_string(f"pretrained={root / 'model'},routers={tmp_path / 'routers'},mlp_token=0.8", {})


def test_lm_eval_command_line_runs_the_elastiformer_model(setup, tmp_path):
    import subprocess
    import sys

    root, _, task = setup
    em = ef.get_elastic_model(ef.load_model(root / "model"), ef.ElasticConfig(attn_heads=0.5))
    em.save_pretrained(tmp_path / "routers")
    proc = subprocess.run(
        [sys.executable, "-m", "elastiformer", "lm-eval", "--model", "elastiformer", "--model_args",
         f"pretrained={root / 'model'},routers={tmp_path / 'routers'},budget=0.5", "--tasks", integration.TASK_NAME,
         "--include_path", str(task), "--limit", "4", "--batch_size", "2", "--output_path", str(tmp_path / "out")],
        capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    results = list((tmp_path / "out").rglob("results*.json"))
    assert results, proc.stdout[-1000:]
    data = json.loads(results[0].read_text())
    em.set_budget(0.5)  # the same model in this process gives the same numbers
    expected = integration.evaluate_last_word(
        integration.ElastiformerLM.from_elastic(em, load_tokenizer(root / "model"), batch_size=2), task, limit=4)
    assert data["results"][integration.TASK_NAME]["acc,none"] == expected["acc"]
    assert data["results"][integration.TASK_NAME]["perplexity,none"] == pytest.approx(expected["perplexity"], rel=1e-5)
