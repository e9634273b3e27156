"""`fedrec privacy plan`: the noise multiplier it prints reaches the budget and no less, the
noise on the mean update follows from it, adaptive clipping's split, and errors that name
the flag. Runs the real command (server.cli.main)."""

import json
import math

import numpy as np
import pytest

from conftest import counted_generators
from server.cli import main
from shared_model.privacy import epsilon, total_noise_multiplier
from shared_model.square_root_noise import SquareRootNoise

PLAN = ["privacy", "plan", "--users", "100000", "--cohort", "1000", "--rounds", "300", "--epsilon", "2",
        "--delta", "1e-6", "--parameters", "17904"]


def plan(capsys, *extra: str) -> tuple[int, str, str]:
    code = main([*PLAN, *extra])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_the_printed_noise_reaches_the_budget_and_slightly_less_does_not(capsys):
    code, out, _ = plan(capsys)
    assert code == 0
    z = float(out.split("noise multiplier z")[1].split()[0])
    assert epsilon([(z, 0.01, 300)], 1e-6) <= 2.0
    assert epsilon([(z * 0.99, 0.01, 300)], 1e-6) > 2.0
    assert "sampling rate q = C / N       0.01" in out
    code, out, _ = plan(capsys, "--json")
    figures = json.loads(out)
    assert figures["noise_multiplier"] == z and figures["sample_rate"] == 0.01
    assert figures["noise_std"] == pytest.approx(z / 1000)
    assert figures["noise_norm"] == pytest.approx(z * math.sqrt(17904) / 1000)
    assert figures["round_epsilon"] == pytest.approx(epsilon([(z, 0.01, 1)], 1e-6))


def test_against_the_server_there_is_no_amplification(capsys):
    """The epsilon against a server that knows whom it sampled: a Gaussian at rate 1 over
    the rounds a user takes part in at most (Binomial(T, q) beyond it: a thousandth of
    delta, charged), far above the amplified one; the same rule as a run's summary."""
    _, out, _ = plan(capsys, "--json")
    figures = json.loads(out)
    rounds = figures["server_rounds"]
    assert 3 < rounds < 3 + 10 * math.sqrt(3)  # q T = 3 rounds on average
    tail = sum(math.comb(300, k) * 0.01**k * 0.99**(300 - k) for k in range(rounds + 1, 301))
    assert tail <= 1e-9
    assert figures["server_epsilon"] == pytest.approx(epsilon([(figures["noise_multiplier"], 1.0, rounds)],
                                                              1e-6 - tail))
    assert figures["server_epsilon"] > 2 * figures["epsilon"]
    _, out, _ = plan(capsys)
    assert f"against the server            epsilon {figures['server_epsilon']:.4g}" in out


def test_dp_ftrl_s_noise_reaches_the_budget_from_its_trees(capsys):
    """100,000 users, 1,000 a round: 3 trees of 100 rounds (depth 7 each), Gaussians at rate 1."""
    _, out, _ = plan(capsys, "--json")
    z = json.loads(out)["ftrl_noise_multiplier"]
    assert epsilon([(z, 1.0, 21)], 1e-6) <= 2.0 < epsilon([(z * 0.99, 1.0, 21)], 1e-6)
    assert f"DP-FTRL instead               noise multiplier {z:.4g}" in plan(capsys)[1]


def test_dp_ftrl_s_release_noise_is_what_the_square_root_noise_puts_on_a_release(capsys):
    """The plan's noise on a DP-FTRL release (per coordinate of the mean, in units of S) is
    the std of the real noise on an epoch's last release (100 rounds here), divided by C."""
    _, out, _ = plan(capsys, "--json")
    figures = json.loads(out)
    z = figures["ftrl_square_root_noise_multiplier"]
    noise = SquareRootNoise({"w": (20_000,)}, z, counted_generators())
    measured = np.std(noise.round_noise(100)["w"]) / 1000
    assert figures["ftrl_release_noise_std"] == pytest.approx(measured, rel=0.02)
    assert figures["ftrl_release_noise_std"] == pytest.approx(z * math.sqrt(4 / math.pi) / 1000, rel=0.01)
    ratio = figures["ftrl_release_noise_std"] / figures["noise_std"]
    assert f"{figures['ftrl_release_noise_std']:.3g} S per coordinate, {ratio:.3g} times DP-FedAvg's" in plan(capsys)[1]


def test_signal_to_noise_is_the_given_mean_update_over_the_noise(capsys):
    _, out, _ = plan(capsys, "--signal", "0.2", "--json")
    figures = json.loads(out)
    assert figures["signal_to_noise"] == pytest.approx(0.2 / figures["noise_norm"])
    _, weak, _ = plan(capsys, "--signal", "0.01")  # noise norm ~0.2 S here
    _, strong, _ = plan(capsys, "--signal", "1")
    assert "below 1: the noise outweighs" in weak and "at least 1: a round's mean update outweighs" in strong


def test_another_accountant_reaches_the_budget_too(capsys):
    code, out, _ = plan(capsys, "--accountant", "pld", "--cohort", "10000", "--rounds", "20", "--json")
    z = json.loads(out)["noise_multiplier"]
    assert code == 0 and epsilon([(z, 0.1, 20)], 1e-6, "pld") <= 2.0 < epsilon([(z * 0.99, 0.1, 20)], 1e-6, "pld")


def test_adaptive_clipping_raises_the_updates_noise_to_keep_the_accounted_total(capsys):
    _, out, _ = plan(capsys, "--count-noise", "2", "--json")
    figures = json.loads(out)
    z, z_update = figures["noise_multiplier"], figures["update_noise_multiplier"]
    assert z_update > z and total_noise_multiplier(z_update, 2.0) == pytest.approx(z)
    assert figures["noise_std"] == pytest.approx(z_update / 1000)
    _, text, _ = plan(capsys, "--count-noise", "2")
    assert f"the updates get noise multiplier {z_update:.4g}" in text


def test_the_default_parameters_are_counted_on_the_model(capsys):
    code = main(PLAN[:-2] + ["--json"])
    figures = json.loads(capsys.readouterr().out)
    assert code == 0 and figures["parameters"] > 1000
    assert figures["noise_norm"] == pytest.approx(figures["noise_std"] * math.sqrt(figures["parameters"]))


@pytest.mark.parametrize("change, flag", [
    ({"--cohort": "200000"}, "--cohort"),
    ({"--epsilon": "0"}, "--epsilon"),
    ({"--epsilon": "-1"}, "--epsilon"),
    ({"--delta": "1"}, "--delta"),
    ({"--delta": "0"}, "--delta"),
    ({"--users": "0"}, "--users"),
    ({"--count-noise": "0.1"}, "--count-noise"),  # below z / 2: the updates' noise would be infinite
])
def test_bad_numbers_are_refused_naming_the_flag(capsys, change, flag):
    args = list(PLAN)
    for key, value in change.items():
        if key in args:
            args[args.index(key) + 1] = value
        else:
            args += [key, value]
    try:
        code = main(args)
    except SystemExit as exit:  # argparse's own refusal
        code = exit.code
    assert code == 2 and flag in capsys.readouterr().err


def test_a_delta_not_below_one_over_the_users_is_warned_about(capsys):
    code, _, err = plan(capsys, "--delta", "1e-4", "--users", "10000", "--cohort", "100")
    assert code == 0 and "warning: --delta" in err


def test_help_explains_each_line(capsys):
    with pytest.raises(SystemExit):
        main(["privacy", "plan", "--help"])
    text = capsys.readouterr().out
    for words in ("noise multiplier z", "sampling rate q", "epsilon of one round", "noise on the mean update",
                  "Poisson", "whole population", "z_delta", "signal to noise", "bench_update_norms"):
        assert words in text
