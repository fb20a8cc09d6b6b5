"""wpk.errors: one-line messages that name what the reader set (a parameter or a flag) and
what they may have meant."""
from __future__ import annotations

import pytest

from wpk.errors import ParameterError, WpkError, flags_for, refuse_unknown_choice


def test_a_parameter_error_names_the_parameter_or_the_flag_that_set_it():
    error = ParameterError("output 'a{b}' needs {max_latency_ms} 5 and {pins}", "max_latency_ms",
                           "pins")
    assert str(error) == "output 'a{b}' needs max_latency_ms 5 and pins"
    assert str(error.naming_flags({"pins": "--pin"})) == \
        "output 'a{b}' needs --max-latency-ms 5 and --pin"
    with pytest.raises(WpkError) as raised:
        with flags_for():
            raise error
    assert type(raised.value) is WpkError
    assert str(raised.value) == "output 'a{b}' needs --max-latency-ms 5 and --pins"


def test_an_unknown_choice_names_the_choices_and_the_closest_one():
    refuse_unknown_choice("ga", ("random", "ga"), "strategy")
    with pytest.raises(WpkError, match=r"^x: unknown strategy 'gaa' \(did you mean 'ga'\? "
                                       r"choose from random, ga\)$"):
        refuse_unknown_choice("gaa", ("random", "ga"), "strategy", "x")
    with pytest.raises(WpkError, match=r"^unknown strategy 'zzz' \(choose from random, ga\)$"):
        refuse_unknown_choice("zzz", ("random", "ga"), "strategy")
