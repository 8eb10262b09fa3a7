"""The benchmark scripts' own logic (their figures come from running them, not from tests)."""

import sys
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import _common  # noqa: E402
import throughput  # noqa: E402


def test_the_share_of_peak_is_given_only_for_a_cpu_whose_peak_is_known():
    epyc = {"cpu_family_model": _common.CPU_PEAK_FAMILY_MODEL, "cpu_cores": 2}
    other = {"cpu_family_model": "6/143", "cpu_cores": 2}  # its peak is not guessed
    assert throughput.peak_for(epyc, None) == _common.CPU_PEAK_GFLOPS
    assert throughput.peak_for({**epyc, "cpu_cores": 4}, None) is None  # a bigger VM
    assert throughput.peak_for(other, None) is None
    assert throughput.peak_for(other, 300.0) == 300.0
    run = {"backend": "cpu", "forward_flops_per_image": 1e6,
           "rounds": [{name: 1000.0 for name in throughput.LOOPS}]}
    assert throughput.summarize(run, None)["digitjax"]["share_of_peak"] is None
    assert throughput.summarize(run, 30.0)["digitjax"]["share_of_peak"] == 0.1  # 3 of 30
    text = throughput._peak_text({"peak_gflops": None, "cpu_mhz": 2600.0},
                                 SimpleNamespace(peak_gflops=None))
    assert "no fp32 peak is known for this CPU" in text
