"""One table of sampling defaults (neurotap.core.defaults): each door's defaults chosen there, with
its reason, and every signature and command-line option reading them from it."""
import ast
import dataclasses
import inspect
from pathlib import Path

import pytest

from neurotap.core import defaults as D

ROOT = Path(__file__).resolve().parents[1]
SAMPLING = ("temperature", "top_p", "top_k", "min_p")
# NeuReasoner's top_k (and `neureasoner calibrate --top-k`) counts the MoN's top contributors,
# not a sampler's candidates.
KNOWN = {("python/neurotap/methods/neureasoner.py", "top_k"), ("python/neurotap/apps/cli.py", "--top-k")}


def defaults_of(fn):
    return {k: v.default for k, v in inspect.signature(fn).parameters.items()}


def door(d, names=SAMPLING + ("seed",)):
    return tuple(d[n.replace("-", "_")] for n in names)


def table(s, names=SAMPLING + ("seed",)):
    return tuple(getattr(s, n) for n in names)


def test_every_door_is_frozen_and_says_why():
    for name, s in D.DOORS.items():
        assert s.why, name
        with pytest.raises(dataclasses.FrozenInstanceError):
            s.temperature = 1.0


def test_python_signatures_read_the_table():
    from neurotap import Model, nad
    from neurotap.apps.evaluate import evaluate
    from neurotap.apps.rank import rank_models
    from neurotap.methods.race import NadRace

    assert door(defaults_of(Model.generate)) == table(D.GENERATE)
    assert door(defaults_of(Model.start_sampling)) == table(D.SAMPLE)
    assert defaults_of(nad.best_of_n)["seed"] == defaults_of(NadRace)["seed"] == D.SAMPLE.seed
    few = ("temperature", "top_p", "top_k", "seed")
    assert door(defaults_of(evaluate), few) == table(D.SAMPLE, few)
    assert door(defaults_of(rank_models), ("temperature", "seed")) == table(D.SAMPLE, ("temperature", "seed"))
    from neurotap import neureasoner
    for fn in (neureasoner.calibrate, neureasoner.record_traces):
        assert defaults_of(fn)["temperature"] == D.CALIBRATE.temperature


def test_lmeval_reads_the_table():
    pytest.importorskip("lm_eval")
    from neurotap.apps.lmeval import NeurotapLM

    assert door(defaults_of(NeurotapLM.__init__)) == table(D.SAMPLE)


def test_cli_options_read_the_table():
    from neurotap.apps.cli import build_parser

    p = build_parser()

    def opts(*argv):
        return vars(p.parse_args(list(argv)))

    four = ("temperature", "top_p", "top_k", "seed")
    assert door(opts("generate", "hi"), four) == table(D.CLI_GENERATE, four)
    assert door(opts("sample", "hi"), four) == table(D.CLI_SAMPLE, four)
    assert door(opts("eval", "--tasks", "arith"), four) == table(D.CLI_SAMPLE, four)
    two = ("temperature", "seed")
    assert door(opts("nex", "hi"), two) == table(D.CLI_SAMPLE, two)
    assert door(opts("export-cache", "hi", "--out", "x"), two) == table(D.CLI_SAMPLE, two)
    assert door(opts("neureasoner", "calibrate", "--tasks", "arith", "--out", "x"), two) == table(D.CALIBRATE, two)


def literal_defaults(source: str):
    """(line, name) of each sampling parameter or option given a numeric literal default."""
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            a = node.args
            pos = a.posonlyargs + a.args
            pairs = list(zip(pos[len(pos) - len(a.defaults):], a.defaults)) + [
                (k, d) for k, d in zip(a.kwonlyargs, a.kw_defaults) if d is not None]
            for arg, d in pairs:
                if arg.arg in SAMPLING and isinstance(d, ast.Constant) and isinstance(d.value, (int, float)):
                    yield d.lineno, arg.arg
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "add_argument"
              and node.args and isinstance(node.args[0], ast.Constant)
              and node.args[0].value in ("--temperature", "--top-p", "--top-k", "--min-p")):
            for kw in node.keywords:
                if kw.arg == "default" and isinstance(kw.value, ast.Constant):
                    yield node.lineno, node.args[0].value


FILES = sorted((ROOT / "python" / "neurotap").rglob("*.py")) + sorted((ROOT / "benchmarks").glob("*.py"))


@pytest.mark.parametrize("path", FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_sampling_default_outside_the_table(path):
    rel = path.relative_to(ROOT).as_posix()
    if rel == "python/neurotap/core/defaults.py":
        return
    found = [(line, name) for line, name in literal_defaults(path.read_text(encoding="utf-8"))
             if (rel, name) not in KNOWN]
    assert not found, f"{rel}: sampling defaults written here, not read from neurotap.core.defaults: {found}"


def test_the_scan_catches_planted_defaults():
    planted = ("def f(x, *, temperature: float = 0.7, top_p=D.SAMPLE.top_p):\n    pass\n"
               "ap.add_argument('--min-p', type=float, default=0.05)\n"
               "ap.add_argument('--seed', type=int, default=0)\n")
    assert sorted(literal_defaults(planted)) == [(1, "temperature"), (3, "--min-p")]
