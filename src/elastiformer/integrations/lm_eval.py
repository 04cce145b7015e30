"""lm-evaluation-harness integration: the `elastiformer` model and a local last-word task from held-out books.

Importing this module registers the model name `elastiformer` with lm_eval (a subclass of its `HFLM`), so
`lm_eval.simple_evaluate(model="elastiformer", model_args="pretrained=smollm2-135m,routers=runs/x,budget=0.8")`
works. lm_eval's own command line has no hook for third-party models, so `elastiformer lm-eval ARGS` (or
`python -m elastiformer.integrations.lm_eval ARGS`) is lm_eval's command line with this model registered and the
local task on its include path:

    elastiformer lm-eval --model elastiformer \\
        --model_args pretrained=smollm2-135m,routers=runs/x,budget=0.8 --tasks elastiformer_last_word

Hub tasks cannot download here, so `elastiformer_last_word` is built from the held-out Gutenberg books: a passage
of running text, and the model must give its last word (LAMBADA-style: accuracy = the word is the greedy
continuation; perplexity of the word).
"""

from __future__ import annotations

import json
import random
import re
import sys
from pathlib import Path
from typing import Any, Sequence

from ..cache import atomic_dir, cache_dir
from ..config import BUDGET_KEYS
from ..errors import ConfigError, DataError, ElastiformerError

try:
    from lm_eval.api.registry import register_model
    from lm_eval.models.huggingface import HFLM
except ImportError as err:  # lm-eval is an optional extra
    raise ElastiformerError("lm-eval is not installed: pip install 'elastiformer[eval]' (or pip install lm-eval)") from err

TASK_NAME = "elastiformer_last_word"
TASK_FORMAT = 1  # bump when the passages change, so cached task folders are rebuilt
_WORD = re.compile(r"^[A-Za-z]{3,}$")


def _refuse_unknown_args(kwargs: dict[str, Any]) -> None:
    """HFLM takes **kwargs and ignores what it does not know, so `mlp_token=0.8` would silently run the full model:
    anything that is neither ours nor a named HFLM argument is refused, with the nearest known name."""
    import difflib
    import inspect

    named = {k for k, p in inspect.signature(HFLM.__init__).parameters.items()
             if p.kind is not inspect.Parameter.VAR_KEYWORD} - {"self", "pretrained", "backend", "tokenizer"}
    known = sorted(named | set(BUDGET_KEYS) | {"pretrained", "routers", "budget", "routing"})
    unknown = sorted(k for k in kwargs if k not in named)
    if unknown:
        hints = [f"{k} (did you mean {m[0]}?)" if (m := difflib.get_close_matches(k, known, n=1)) else k
                 for k in unknown]
        raise ConfigError(f"unknown model_args {', '.join(hints)}: elastiformer's are pretrained, routers, budget, "
                          f"routing and {', '.join(BUDGET_KEYS)}; the rest go to lm_eval's HFLM")


@register_model("elastiformer")
class ElastiformerLM(HFLM):
    """lm_eval's Hugging Face causal LM with elastiformer routers attached at a chosen budget.

    model_args: `pretrained` (short name, folder or .gguf, as `elastiformer.load_model` takes; default: the base
    model the routers folder records, else smollm2-135m), `routers` (a folder
    written by `save_pretrained` / `elastiformer train`; omitted: the plain base model, i.e. the teacher), `budget`
    (one fraction for every routed component) and / or per-component budgets (`mlp_tokens=0.8,...`), `routing`
    (learned | random). Everything else goes to `HFLM` (batch_size, max_length, ...).
    """

    def __init__(self, pretrained: Any = None, routers: str | None = None, budget: float | None = None,
                 routing: str = "learned", tokenizer: Any = None, elastic: Any = None, **kwargs):
        from ..artifacts import base_model_source, read_router_config
        from ..model import ElasticModel
        from ..loading.models import load_model, load_tokenizer

        budgets = {k: kwargs.pop(k) for k in BUDGET_KEYS if k in kwargs}
        _refuse_unknown_args(kwargs)
        if elastic is None and pretrained is None:  # the routers' own base model, else the default one
            pretrained = base_model_source(read_router_config(routers), routers) if routers else "smollm2-135m"
        if elastic is None:
            base = load_model(pretrained)
            elastic = ElasticModel.from_pretrained(base, routers) if routers else None
            tokenizer = tokenizer if tokenizer is not None else load_tokenizer(pretrained)
        elif tokenizer is None:
            raise ConfigError("ElastiformerLM(elastic=...) needs the tokenizer too: pass tokenizer=...")
        if elastic is None and (budget is not None or budgets):
            raise ConfigError("a budget needs routers: pass routers=<folder written by elastiformer train>")
        self.elastic = elastic
        if elastic is not None:
            if budget is not None or budgets:
                elastic.set_budget(None if budget is None else float(budget), **{k: float(v) for k, v in budgets.items()})
            if routing not in ("learned", "random"):
                raise ConfigError(f"routing={routing!r}: the lm_eval model routes with 'learned' or 'random'")
            elastic.state.method = routing  # stays for the LM's lifetime (routing_method() is a scoped block)
        for key in ("device", "dtype"):  # an already-loaded model keeps its own; HFLM would only warn
            kwargs.pop(key, None)
        model = elastic.base_model if elastic is not None else base
        super().__init__(pretrained=model, tokenizer=tokenizer, backend="causal", **kwargs)

    @classmethod
    def from_elastic(cls, elastic, tokenizer, **kwargs) -> "ElastiformerLM":
        """Wrap an ElasticModel already in memory; later `elastic.set_budget(...)` calls apply to this LM too."""
        return cls(elastic=elastic, tokenizer=tokenizer, **kwargs)


# ---------------------------------------------------------------------------------------------- the local task
def last_word_docs(texts: Sequence[str], n_docs: int = 200, context_words: int = 60, seed: int = 0) -> list[dict]:
    """Passages of `context_words` words of running text from `texts`, each followed by one word to predict.

    The target is a plain alphabetic word of 3+ letters that ends a sentence or clause (LAMBADA's targets are
    content words at a natural stop), so the context decides it more than punctuation does.
    """
    rng = random.Random(seed)
    candidates = []
    for t, text in enumerate(texts):
        words = text.split()
        for i in range(context_words, len(words)):
            w = words[i]
            core = w.rstrip(".,;:!?\"'")
            if core != w and w[len(core):][:1] in ".!?;," and _WORD.match(core):
                candidates.append((t, i, core))
    if not candidates:
        raise DataError(f"no passage of {context_words}+ words ending in a word was found: pass longer texts")
    rng.shuffle(candidates)
    docs = []
    for t, i, core in candidates[:n_docs]:
        words = texts[t].split()
        docs.append({"context": " ".join(words[i - context_words:i]), "target": core})
    return docs


def write_last_word_task(folder: str | Path | None = None, *, n_docs: int = 200, context_words: int = 60,
                         seed: int = 0, texts: Sequence[str] | None = None) -> Path:
    """Write the task (YAML + JSONL of held-out passages) to `folder` (default: in the cache) and return the folder.

    Pass the folder to lm_eval as `--include_path` / `TaskManager(include_path=...)`.
    """
    default = folder is None
    folder = Path(folder) if folder is not None else cache_dir() / "lm_eval_tasks" / f"last_word_v{TASK_FORMAT}_{n_docs}_{context_words}_{seed}"
    if default and (folder / f"{TASK_NAME}.yaml").is_file():
        return folder
    if texts is None:
        from ..data.text import load_texts

        texts = load_texts(None, split="heldout")
    docs = last_word_docs(texts, n_docs=n_docs, context_words=context_words, seed=seed)
    with atomic_dir(folder) as tmp:
        data = tmp / "docs.jsonl"
        data.write_text("".join(json.dumps(d) + "\n" for d in docs))
        yaml = "\n".join([
            f"task: {TASK_NAME}",
            "dataset_path: json",
            "dataset_kwargs:",
            "  data_files:",
            f"    test: {json.dumps(str((folder / 'docs.jsonl').resolve()))}",
            "output_type: loglikelihood",
            "test_split: test",
            'doc_to_text: "{{context}}"',
            "doc_to_target: \"{{' ' + target}}\"",
            "metric_list:",
            "  - metric: perplexity",
            "    aggregation: perplexity",
            "    higher_is_better: false",
            "  - metric: acc",
            "    aggregation: mean",
            "    higher_is_better: true",
            "metadata:",
            f"  version: {TASK_FORMAT}.0",
            f"  description: last word of {len(docs)} passages of held-out Gutenberg books (elastiformer)",
            "",
        ])
        (tmp / f"{TASK_NAME}.yaml").write_text(yaml)
    return folder


def evaluate_last_word(lm: HFLM, task_folder: str | Path, limit: int | None = None) -> dict[str, float]:
    """Accuracy and perplexity of `lm` on the local task (lm_eval.simple_evaluate, same task for every model)."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    out = lm_eval.simple_evaluate(model=lm, tasks=[TASK_NAME], task_manager=TaskManager(include_path=str(task_folder)),
                                  limit=limit, log_samples=False, verbosity="ERROR")
    r = out["results"][TASK_NAME]
    return {"acc": float(r["acc,none"]), "acc_stderr": float(r.get("acc_stderr,none", float("nan"))),
            "perplexity": float(r["perplexity,none"])}


def main(argv: list[str] | None = None) -> None:
    """lm_eval's command line with the `elastiformer` model registered and the local task on the include path."""
    from lm_eval.__main__ import cli_evaluate

    args = list(sys.argv[1:] if argv is None else argv)
    if "--include_path" not in args and any(TASK_NAME in a for a in args):
        args += ["--include_path", str(write_last_word_task())]
    sys.argv = ["lm_eval", *args]
    cli_evaluate()


if __name__ == "__main__":
    main()
