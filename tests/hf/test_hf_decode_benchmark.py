"""benchmarks/hf_decode.py on the tests' converted folder, in one process: it prints each
measure, and its checks against the prompts one at a time pass (a smoke test; the figures
themselves are not asserted)."""

import sys

from tests.conftest import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))
import hf_decode  # noqa: E402


def test_the_decoding_benchmark_prints_every_measure_and_its_checks_pass(folder, capsys):
    hf_decode.main(["--model", str(folder), "--batch", "3", "--prompt-length", "12", "--new", "4", "--rounds", "1"])
    out = capsys.readouterr().out
    print(out)
    for measure in ("greedy, cached", "use_cache=False", "beam search", "prompt-lookup", "-token cache", "6 pieces"):
        assert measure in out, measure
    assert out.count("rows = their prompt alone: 3 of 3") == 3 and "= greedy: yes" in out
    difference = float(out.split("forward's| ")[1].split()[0])
    assert difference < 1e-4
