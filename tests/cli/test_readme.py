"""The README works when copied: every Python block runs as written, in order, on tiny stand-ins for the bundled
models (the README states the real models' run times), and every `elastiformer ...` command line names commands
and options that exist."""

import re
import shutil
from pathlib import Path

import pytest
import torch
import typer
from transformers import BertConfig, BertModel, ViTConfig, ViTForImageClassification

import elastiformer as ef
import elastiformer.data as ef_data_package
import elastiformer.data.text as ef_data
import elastiformer.data.images as ef_images
import elastiformer.evaluation.lm as ef_evaluate
import elastiformer.flextron as ef_flextron
import elastiformer.flextron.latency as ef_latency
import elastiformer.flextron.routing.build as ef_route
import elastiformer.integrations.lm_eval as ef_lm_eval
import elastiformer.loading as ef_loading
import elastiformer.loading.models as ef_models
import elastiformer.training.routers as ef_trainer
from elastiformer import cli
from helpers.encoders import word_level_bert_tokenizer
from helpers.loading import write_tiny_gguf

README = (Path(__file__).parents[2] / "README.md").read_text()
PYTHON_BLOCKS = re.findall(r"```python\n(.*?)```", README, re.S)
BASH_BLOCKS = re.findall(r"```bash\n(.*?)```", README, re.S)


def _bert_folder(root: Path) -> Path:
    tok = word_level_bert_tokenizer(
        "the a cat dog sat ran on under mat house and then came back home big small red tree river".split())
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                         intermediate_size=48, max_position_embeddings=160)).save_pretrained(root / "bert")
    tok.save_pretrained(root / "bert")
    return root / "bert"


def _vit_folder(root: Path) -> Path:
    torch.manual_seed(0)
    ViTForImageClassification(ViTConfig(image_size=28, patch_size=7, num_channels=1, hidden_size=32,
                                        num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                                        num_labels=10)).save_pretrained(root / "vit")
    return root / "vit"


def _qwen3_folder(root: Path) -> Path:
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(0)
    Qwen3ForCausalLM(Qwen3Config(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                 num_key_value_heads=2, head_dim=8, intermediate_size=48)).save_pretrained(root / "qwen3")
    return root / "qwen3"


def _capped(fn, **caps):
    """`fn` with some keyword arguments lowered to tiny values (steps, sample counts): the call stays as written."""
    def call(*args, **kwargs):
        for key, cap in caps.items():
            kwargs[key] = min(kwargs.get(key, cap), cap) if kwargs.get(key) is not None else cap
        return fn(*args, **kwargs)
    return call


def at_readme_scale(measure, smallest_ms: float = 15.0):
    """`measure_latency_table` with every time scaled (the ratios as measured) so the smallest sub-network is predicted
    at `smallest_ms`: the README's `latency_ms=20.0` is meant for SmolLM2 on a small CPU, and the tiny stand-in model
    on a busy machine can take any time."""
    def scaled(value, k):
        if isinstance(value, dict):
            return {name: scaled(v, k) for name, v in value.items()}
        return [scaled(v, k) for v in value] if isinstance(value, list) else value * k

    def call(*args, **kwargs):
        table = measure(*args, **kwargs)
        smallest = table["overhead_ms"] + sum(row[-1] for row in table["mlp_ms"] + table["attn_ms"])
        k = smallest_ms / smallest
        for part in (table, table.get("calibration", {})):
            for key in [key for key in part if key.endswith("_ms")]:
                part[key] = scaled(part[key], k)
        return table
    return call


@pytest.fixture
def stand_ins(workspace, tmp_path, monkeypatch):
    """Bundled names resolve to tiny random models; long loops get tiny step counts; outputs go to a temp folder."""
    qwen3 = _qwen3_folder(tmp_path)
    folders = {"smollm2-135m": workspace / "model", "minilm-l6": _bert_folder(tmp_path),
               "vit-fashion-mnist": _vit_folder(tmp_path),
               # "Use your own model": a folder, a GGUF file and a hub id
               "path/to/folder": qwen3, "Qwen/Qwen3-0.6B": qwen3,
               "path/to/model.Q8_0.gguf": write_tiny_gguf(tmp_path / "tiny.gguf", arch="qwen3", qk_norm=True,
                                                          head_dim=128)}  # (transformers reads no head_dim from it)
    load_model, load_tokenizer = ef_models.load_model, ef_models.load_tokenizer

    def tiny_model(name, *args, **kwargs):
        return load_model(str(folders.get(str(name), name)), *args, **kwargs)

    def tiny_tokenizer(name, *args, **kwargs):
        return load_tokenizer(str(folders.get(str(name), name)), *args, **kwargs)

    def fake_fashion_mnist(split="train", classes=None, limit=None, **_):
        g = torch.Generator().manual_seed(0)
        labels = torch.randint(0, 10, (64,), generator=g)
        if classes is not None:
            labels = torch.tensor(classes)[labels % len(classes)]
        return ef_images.ImageSet(torch.randint(0, 256, (64, 28, 28), generator=g, dtype=torch.uint8), labels)

    monkeypatch.setattr(ef, "load_model", tiny_model)
    monkeypatch.setattr(ef_models, "load_model", tiny_model)
    monkeypatch.setattr(ef_models, "load_tokenizer", tiny_tokenizer)
    monkeypatch.setattr(ef_data, "load_dataset_for", _capped(ef_data.load_dataset_for, max_sequences=48))
    monkeypatch.setattr(ef_data, "load_sentences", _capped(ef_data.load_sentences, max_sentences=64))
    monkeypatch.setattr(ef_trainer, "train_routers", _capped(ef_trainer.train_routers, steps=2, target_steps=2))
    monkeypatch.setattr(ef_flextron, "train_flextron", _capped(ef_flextron.train_flextron, steps=2))
    monkeypatch.setattr(ef_route, "build_router", _capped(ef_route.build_router, n_configs=16, router_steps=10,
                                                          joint_steps=2, calibration_sequences=8))
    monkeypatch.setattr(ef_evaluate, "evaluate", _capped(ef_evaluate.evaluate, timing_reps=0))
    monkeypatch.setattr(ef_latency, "measure_latency_table", at_readme_scale(ef_latency.measure_latency_table))
    monkeypatch.setattr(ef_lm_eval, "write_last_word_task", _capped(ef_lm_eval.write_last_word_task, n_docs=2))
    monkeypatch.setattr(ef_images, "load_fashion_mnist", fake_fashion_mnist)
    for package, module in ((ef_loading, ef_models), (ef_data_package, ef_data), (ef_data_package, ef_images)):
        for name in set(package.__all__) & set(vars(module)):  # what the package re-exports: the stand-ins too
            monkeypatch.setattr(package, name, getattr(module, name))
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_every_python_block_runs_as_written(stand_ins):
    assert len(PYTHON_BLOCKS) == 7, "a README Python block was added or removed: run it here too"
    main_api, lm_eval_api, flextron_api, flextron_router, own_model, encoder_api, vit_api = PYTHON_BLOCKS
    ns: dict = {}
    exec(compile(main_api, "README:main", "exec"), ns)  # noqa: S102
    assert ns["out"].logits.shape == ns["ref"].logits.shape and Path("runs/x/routers/elastic_config.json").is_file()
    assert ns["em2"].elastic_config == ns["em"].elastic_config
    exec(compile(lm_eval_api, "README:lm-eval", "exec"), ns)  # continues the first example (em, tok)
    exec(compile(flextron_api, "README:flextron", "exec"), ns)  # continues it too (train, held)
    assert Path("ckpt").is_dir()
    shutil.copytree("ckpt", "runs/flextron/trained/model")  # what `elastiformer flextron train` writes there
    exec(compile(flextron_router, "README:flextron-router", "exec"), ns)
    assert ns["out"].logits.shape[:2] == ns["ids"].shape
    own: dict = {}
    exec(compile(own_model, "README:own-model", "exec"), own)
    assert own["em"].base_model.config.model_type == "qwen3"
    exec(compile(encoder_api, "README:encoder", "exec"), {})
    vit_ns: dict = {}
    exec(compile(vit_api, "README:vit", "exec"), vit_ns)
    assert vit_ns["logits"].shape == (8, 10)


def _commands(group, prefix=()) -> dict[tuple[str, ...], object]:
    out = {}
    for name, cmd in group.commands.items():
        out[prefix + (name,)] = cmd
        if hasattr(cmd, "commands"):  # (a group: typer's groups need not subclass the installed click.Group)
            out |= _commands(cmd, prefix + (name,))
    return out


def test_every_command_line_names_real_commands_and_options():
    commands = _commands(typer.main.get_command(cli.app))
    lines = [line.split("#")[0].strip() for block in BASH_BLOCKS for line in block.replace("\\\n", " ").splitlines()]
    checked = 0
    for line in lines:
        if "elastiformer" not in line or line.startswith("make"):
            continue
        words = line.split()
        words = words[words.index("elastiformer") + 1:]
        if not words:  # `python -m elastiformer` alone
            continue
        path = (words[0], words[1]) if len(words) > 1 and (words[0], words[1]) in commands else tuple(words[:1])
        cmd = commands.get(tuple(path))
        assert cmd is not None, f"README: `elastiformer {' '.join(words)}`: no such command"
        known = {o for p in cmd.params for o in p.opts + p.secondary_opts}
        if path == ("lm-eval",):
            # lm-eval's own options pass through to lm-evaluation-harness (checked in tests/integrations/test_lm_eval.py)
            continue
        for w in words[len(path):]:
            if w.startswith("--"):
                assert w.split("=")[0] in known, f"README: `elastiformer {' '.join(words)}`: {w} is not an option"
        checked += 1
    assert checked >= 15
