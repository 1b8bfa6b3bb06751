"""NeuReasoner's failure labels and MoN selection on hand-made traces (no model)."""
import numpy as np
import pytest

from neurotap.methods.neureasoner import Trace, mixture_of_neurons
from neurotap.scoring.failures import get_labeller, label_arith, register_labeller, token_ends


def pieces_of(text, size=3):
    return [text[i:i + size].encode() for i in range(0, len(text), size)]


def labelled(text, answer, size=3):
    t, ends = token_ends(pieces_of(text, size))
    assert t == text
    return label_arith(text, ends, answer), pieces_of(text, size)


def marked(text, labels, pieces):
    return "".join(p.decode() if labels[k] else "_" * len(p) for k, p in enumerate(pieces))


def test_wrong_calculations_are_intra_step_failures():
    text = "1. 12 + 7 = 19\n2. 19 + 2 = 31\n3. (2 + 3) x 4 = 20\n4. 10 / 4 = 2.5\n"
    lab, pieces = labelled(text, "99")
    m = marked(text, lab["intra"], pieces)
    assert "19 + 2 = 31" in m
    assert "12 + 7" not in m and "(2 + 3)" not in m and "10 / 4" not in m
    assert not lab["inter"].any() and not lab["instance"].any()


def test_repeated_steps_are_inter_step_failures():
    text = "First 12 + 7 = 19\nThen we add the numbers together\n12 + 7 = 19 again\nThen we add the numbers together\n"
    lab, pieces = labelled(text, "0")
    m = marked(text, lab["inter"], pieces)
    assert m.count("12 + 7 = 19") == 1 and "Then we add the numbers together" in m
    assert m.index("12 + 7 = 19") > text.index("again") - 20  # the repeat, not the first


def test_going_on_after_the_right_answer_is_overthinking():
    text = "59 + 63 = 122\nSo Tom has 122 pencils. Let me double check this by counting again and again.\n"
    lab, pieces = labelled(text, "122")
    first = int(np.argmax(lab["instance"]))
    assert lab["instance"][first:].all() and not lab["instance"][:first].any()
    # from the token that ends the answer's line on
    assert sum(len(p) for p in pieces[:first]) <= text.index("\n") < sum(len(p) for p in pieces[:first + 1])
    short, _ = labelled("59 + 63 = 122\nDone.", "122")
    assert not short["instance"].any()  # a few tokens after the answer are not overthinking
    wrong, _ = labelled("59 + 63 = 120\nand then many more words follow here for a while", "122")
    assert not wrong["instance"].any()


def test_token_ends_keep_characters_split_over_tokens_whole():
    text, ends = token_ends([b"a", "é".encode()[:1], "é".encode()[1:], b"b"])
    assert text == "aéb" and ends == [1, 1, 2, 3]


def test_labellers_are_pluggable():
    def lines(text, ends, answer):
        return {lv: np.zeros(len(ends), bool) for lv in ("intra", "inter", "instance")}

    register_labeller("nothing", lines)
    assert get_labeller("nothing") is lines
    with pytest.raises(ValueError, match="unknown labeller"):
        get_labeller("nope")


def test_mixture_of_neurons_is_the_share_of_failing_tokens_a_component_tops():
    rng = np.random.default_rng(0)
    T, C = 200, 50
    traces = []
    for _ in range(4):
        c = rng.normal(size=(T, C)).astype(np.float32)
        y = np.zeros(T, bool)
        y[50:120] = True
        c[y, 7] += 10  # component 7 leads every failing token
        c[y, 9] += 10 * (rng.random(y.sum()) < 0.6)  # component 9 leads 60% of them
        c[:, 3] += 10  # component 3 leads every token: not failure-specific
        traces.append(Trace("t", c, {"intra": y, "inter": np.zeros(T, bool), "instance": np.zeros(T, bool)}, ""))
    comps, stats = mixture_of_neurons(traces, "intra", top_k=3, min_share=0.5)
    assert comps[:2] == [7, 9] and 3 not in comps[:2]
    strict, _ = mixture_of_neurons(traces, "intra", top_k=3, min_share=1.0, min_size=1)
    assert 7 in strict and 9 not in strict[:2]
    none, stats = mixture_of_neurons(traces, "inter")
    assert none == [] and stats["failing_tokens"] == 0
