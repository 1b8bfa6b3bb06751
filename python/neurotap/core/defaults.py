"""The sampling defaults of every door, in one table: each signature and option that has a
default reads it from here. The doors differ on purpose; each says why in one line."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional


@dataclass(frozen=True)
class Sampling:
    """A door's default sampler settings (seed None: a fresh random seed per call)."""

    temperature: float
    top_p: float = 0.95
    top_k: int = 40
    min_p: float = 0.0
    seed: Optional[int] = 0
    why: str = ""


#: Model.generate: one answer, as llama-cpp-python's create_completion samples it (seed random).
GENERATE = Sampling(0.8, seed=None, why="a Python caller's one answer: llama-cpp-python's temperature, top-p, top-k")
#: Model.start_sampling / sample, best_of_n, NadRace, evaluate(), rank_models, the lm-eval backend.
SAMPLE = Sampling(0.6, why="N answers to compare: diverse, yet each on topic; seed 0 so a run repeats")
#: `neurotap generate`: greedy, so a command repeats its answer.
CLI_GENERATE = Sampling(0.0, why="a command line repeats its answer: greedy")
#: `neurotap sample`, `eval`, `nex`, `export-cache`: the Python API's parallel sampling.
CLI_SAMPLE = SAMPLE
#: NeuReasoner calibration (`neurotap neureasoner calibrate`, neureasoner.calibrate): hotter traces.
CALIBRATE = Sampling(0.7, why="calibration traces need failures to learn from: hotter than eval's 0.6")
#: `neurotap serve`: what an OpenAI client gets from llama-cpp-python's server (seed random per request).
SERVER = Sampling(0.8, min_p=0.05, seed=None, why="a drop-in for llama-cpp-python's server: its defaults")
#: The lm-eval backend's plain generate_until without do_sample: lm-eval's own default, greedy.
LMEVAL_GREEDY = Sampling(0.0, why="lm-eval's default for generate_until: greedy unless do_sample")

DOORS = {"generate": GENERATE, "sample": SAMPLE, "cli_generate": CLI_GENERATE, "cli_sample": CLI_SAMPLE,
         "calibrate": CALIBRATE, "server": SERVER, "lmeval_greedy": LMEVAL_GREEDY}
