"""wpk-deploy --local follows a plan made for dynamic batching (wpk-partition --max-batch):
each tier the plan batches starts with wpk-serve --max-batch, over the tensor link between
the tiers; --max-batch on wpk-deploy still decides for every tier. Commands only: nothing
starts."""
import onnx
import pytest

from wpk.deploy.cli import batching_arguments, build_parser, plan_batching_arguments
from wpk.deploy.local import LocalDeployment
from wpk.examples import resnet_like
from wpk.partitioner.api import partition
from wpk.plan import load_plan

ONE_MACHINE = "examples/one-machine.yaml"


@pytest.fixture(scope="module")
def plans(tmp_path_factory):
    root = tmp_path_factory.mktemp("batch-plans")
    model = root / "resnet_like.onnx"
    onnx.save(resnet_like(image_size=32, width=8, classes=10), str(model))
    made = {}
    for batch in (1, 4):
        made[batch] = root / f"plan{batch}"
        partition(model, tiers_file=ONE_MACHINE, objective="throughput", max_batch=batch,
                  use_calibration=False, verify=False, out_dir=made[batch])
    return made


def _commands(plan_dir, *flags):
    args = build_parser().parse_args([str(plan_dir), "--local", *flags])
    plan = load_plan(plan_dir)
    deployment = LocalDeployment(plan_dir, serve_args=batching_arguments(args),
                                 tier_args=plan_batching_arguments(args, plan), link=args.link)
    return {t.name: deployment.command(t.name, 0, None) for t in plan.tiers}


def _batch(command):
    return int(command[command.index("--max-batch") + 1]) if "--max-batch" in command else 1


def test_each_tier_the_plan_batches_gets_its_batch(plans):
    plan = load_plan(plans[4])
    assert any(t.batch > 1 for t in plan.tiers[1:])
    commands = _commands(plans[4])
    assert {name: _batch(c) for name, c in commands.items()} == \
        {t.name: t.batch for t in plan.tiers}
    assert all(c[c.index("--max-queue-delay-us") + 1] == "1000"
               for c in commands.values() if "--max-batch" in c)


def test_a_plan_without_batching_starts_as_before(plans):
    commands = _commands(plans[1])
    assert all("--max-batch" not in c for c in commands.values())


def test_the_flag_decides_for_every_tier(plans):
    commands = _commands(plans[4], "--max-batch", "1")
    assert all("--max-batch" not in c for c in commands.values())
    commands = _commands(plans[1], "--max-batch", "2", "--max-queue-delay-us", "300")
    assert all(c[-4:] == ["--max-batch", "2", "--max-queue-delay-us", "300"]
               for c in commands.values())
