"""Tier slices load with ORT threads that sleep between runs unless asked to spin."""
import pytest
from wpk.plan import load_plan
from wpk.runtime.slice import load_runner

SPIN = "session.intra_op.allow_spinning"


def test_ort_threads_do_not_spin_unless_asked(plans):
    plan_dir = plans["mlp"]
    tier = load_plan(plan_dir).tiers[0]
    quiet = load_runner(plan_dir, tier, threads=2)
    assert quiet.get_session_options().get_session_config_entry(SPIN) == "0"
    spinning = load_runner(plan_dir, tier, threads=2, spin=True)
    with pytest.raises(RuntimeError, match="does not have configuration"):  # ORT's default
        spinning.get_session_options().get_session_config_entry(SPIN)
