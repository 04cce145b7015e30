"""One declaration of each command's options (elastiformer.options): the command line, --help, YAML files and the
library's defaults dicts all come from the same table."""

import typer
import pytest

from elastiformer.benchmarks.encoder import ENCODER_BENCH_DEFAULTS, ENCODER_BENCH_OPTIONS
from elastiformer.benchmarks.flextron import FLEXTRON_BENCH_DEFAULTS, FLEXTRON_BENCH_OPTIONS
from elastiformer.benchmarks.lm import BENCH_DEFAULTS, BENCH_OPTIONS
from elastiformer.benchmarks.speed import SPEED_DEFAULTS, SPEED_OPTIONS
from elastiformer.benchmarks.vision import VISION_BENCH_DEFAULTS, VISION_BENCH_OPTIONS
from elastiformer.cli import commands as cli_app
from elastiformer.cli import options as cli_options
from elastiformer.flextron import pipeline
from elastiformer.options import Option, defaults

COMMANDS = {
    ("train",): (cli_app.TRAIN_OPTIONS, ()),
    ("eval",): (cli_app.EVAL_OPTIONS, ()),
    ("bench",): (cli_app.bench_options(), ("task", "readme")),
    ("bench-speed",): (SPEED_OPTIONS, ("readme",)),
    ("bench-vision",): (VISION_BENCH_OPTIONS, ("readme",)),
    ("flextron", "sort"): (pipeline.SORT_OPTIONS, ()),
    ("flextron", "train"): (pipeline.TRAIN_OPTIONS, ()),
    ("flextron", "latency"): (pipeline.LATENCY_OPTIONS, ()),
    ("flextron", "route"): (pipeline.ROUTE_OPTIONS, ()),
    ("flextron", "eval"): (pipeline.FLEXTRON_EVAL_OPTIONS, ()),
    ("flextron", "bench"): (FLEXTRON_BENCH_OPTIONS, ("readme",)),
    ("vit-teacher",): (cli_app.vit_teacher_options(), ()),
}


def click_command(path):
    command = typer.main.get_command(cli_app.app)
    for name in path:
        command = command.commands[name]
    return command


@pytest.mark.parametrize("path", list(COMMANDS), ids=lambda p: " ".join(p))
def test_each_command_takes_exactly_its_declared_options_with_their_defaults_shown(path):
    options, extra = COMMANDS[path]
    command = click_command(path)
    params = {p.name: p for p in command.params}
    assert set(params) == set(options) | set(extra) | {"config"}
    for name, opt in options.items():
        p = params[name]
        assert p.help == opt.help
        if opt.switch:
            assert p.is_flag and p.opts == [f"--{name.replace('_', '-')}"]
            if opt.default is not False:  # on by default, or the library's choice: --name / --no-name
                assert p.secondary_opts == [f"--no-{name.replace('_', '-')}"]
        elif opt.default not in (None, ""):
            assert p.show_default == str(opt.default), name  # --help shows the table's default


def test_library_defaults_are_the_tables_defaults():
    assert BENCH_DEFAULTS == defaults(BENCH_OPTIONS) and BENCH_DEFAULTS["steps"] == BENCH_OPTIONS["steps"].default
    for table, values in ((ENCODER_BENCH_OPTIONS, ENCODER_BENCH_DEFAULTS), (SPEED_OPTIONS, SPEED_DEFAULTS),
                          (VISION_BENCH_OPTIONS, VISION_BENCH_DEFAULTS), (FLEXTRON_BENCH_OPTIONS, FLEXTRON_BENCH_DEFAULTS),
                          (pipeline.SORT_OPTIONS, pipeline.SORT_DEFAULTS), (pipeline.ROUTE_OPTIONS, pipeline.ROUTE_DEFAULTS),
                          (cli_app.TRAIN_OPTIONS, cli_app.TRAIN_DEFAULTS)):
        assert values == defaults(table)


def test_yaml_keys_are_the_declared_options(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("eval_seq_len: 64\nprefill_len: '16'\n")
    merged = cli_options.merge_options(cfg, {"steps": 3}, BENCH_OPTIONS)
    assert (merged["eval_seq_len"], merged["prefill_len"], merged["steps"]) == (64, 16, 3)
    cfg.write_text("max_length: 16\n")  # an encoder-bench option: not one of the LM bench's
    with pytest.raises(Exception, match="unknown keys"):
        cli_options.merge_options(cfg, {}, BENCH_OPTIONS)
    assert cli_options.merge_options(cfg, {}, ENCODER_BENCH_OPTIONS)["max_length"] == 16


def test_an_option_of_another_bench_task_is_refused_before_any_work(tmp_path, capsys):
    code = None
    import sys

    argv = sys.argv
    sys.argv = ["elastiformer", "bench", "--task", "encoder", "--lm-eval-docs", "5", "--output",
                str(tmp_path / "x.json")]
    try:
        with pytest.raises(SystemExit) as exit_:
            cli_app.main()
        code = exit_.value.code
    finally:
        sys.argv = argv
    err = capsys.readouterr().err
    assert code == 2 and "--lm-eval-docs: not an option here" in err and err.count("\n") == 1, err
    assert not (tmp_path / "x.json").exists()


def test_an_option_without_a_default_must_say_its_type():
    with pytest.raises(TypeError, match="kind="):
        Option(None, "no type")
    assert Option(None, "a path", kind=str).type is str and Option(False, "a switch").switch
