"""``python -m loadtest``: run one scenario against a URL, compare three targets, or show a trace.

python -m loadtest run SCENARIO.yaml --target http://127.0.0.1:8000 --out DIR [--seed N]
python -m loadtest compare SCENARIO.yaml --out DIR [--seed N] [--targets direct,kvgate]
python -m loadtest plan SCENARIO.yaml [--seed N]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Coroutine, Sequence
from pathlib import Path
from typing import TypeVar, cast

from loadtest.compare import (
    TARGETS,
    TargetName,
    restarter,
    run_targets,
    sampler,
    trace_shape,
    write_results,
)
from loadtest.generator import Extra, TraceTooLarge, check_loopback, plan, run_trace
from loadtest.records import BackendSample, RequestRecord
from loadtest.scenario import Scenario, ScenarioError, load_scenario
from loadtest.targets import TargetError

T = TypeVar("T")


def _run_loop(main: Coroutine[object, None, T]) -> T:
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(main)


def _scenario(args: argparse.Namespace) -> Scenario:
    scenario = load_scenario(Path(args.scenario))
    return scenario if args.seed is None else scenario.with_seed(args.seed)


def _targets(text: str) -> list[TargetName]:
    names = [t.strip() for t in text.split(",") if t.strip()]
    unknown = [t for t in names if t not in TARGETS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"targets are a comma list of {', '.join(TARGETS)}")
    return cast(list[TargetName], names)


async def _run_one(
    scenario: Scenario, target: str, sim_url: str | None
) -> tuple[list[RequestRecord], list[BackendSample]]:
    samples: list[BackendSample] = []
    extras: list[Extra] = []
    if sim_url is not None:
        extras.append(sampler(sim_url, samples))
        if scenario.restart_at_s is not None:
            extras.append(restarter(sim_url, scenario.restart_at_s))
    records = await run_trace(scenario, plan(scenario), target, extras=extras)
    return records, samples


def cmd_run(args: argparse.Namespace) -> int:
    scenario = _scenario(args)
    check_loopback(args.target)
    if args.sim_url is not None:
        check_loopback(args.sim_url)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = _run_loop(_run_one(scenario, args.target, args.sim_url))
    write_results(scenario, plan(scenario), out, {args.name: result}, {})
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    scenario = _scenario(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    planned = plan(scenario)
    results, failed, sweep = _run_loop(run_targets(scenario, planned, out, args.targets))
    write_results(scenario, planned, out, results, failed, sweep)
    return 1 if failed else 0


def cmd_plan(args: argparse.Namespace) -> int:
    scenario = _scenario(args)
    planned = plan(scenario)
    shape = trace_shape(scenario, planned)
    print(f"{scenario.name} (seed {scenario.seed}): {shape.requests} requests")
    print(
        f"mean prompt {shape.mean_prompt_tokens:.0f}, output {shape.mean_output_tokens:.0f}, "
        f"max_tokens {shape.mean_max_tokens:.0f} tokens"
    )
    offered = sum(p.output_tokens for p in planned) / scenario.duration_s
    ceiling = shape.ceiling_tokens_per_s
    print(
        f"offered {offered:.0f} output tok/s vs ceiling {ceiling:.0f} tok/s "
        f"({offered / ceiling:.2f}x)"
    )
    for name in scenario.tenants:
        mine = [p for p in planned if p.tenant == name]
        print(f"  {name}: {len(mine)} requests, {len(mine) / scenario.duration_s:.1f}/s")
    return 0


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="python -m loadtest", description=__doc__.splitlines()[0])
    sub = top.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="fire a scenario's trace at one target")
    compare = sub.add_parser("compare", help="direct vs count-limited vs kvgate")
    show = sub.add_parser("plan", help="draw the trace and show its shape, send nothing")
    for p in (run, compare, show):
        p.add_argument("scenario", help="scenario YAML file")
        p.add_argument("--seed", type=int, default=None, help="override the scenario's seed")
    for p in (run, compare):
        p.add_argument("--out", required=True, help="directory for records, summary and report")
    run.add_argument(
        "--target", required=True, help="base URL on loopback, e.g. http://127.0.0.1:8000"
    )
    run.add_argument("--name", default="run", help="target name in files and tables")
    run.add_argument("--sim-url", default=None, help="the simulator's URL, to sample /sim/stats")
    compare.add_argument("--targets", type=_targets, default=list(TARGETS))
    run.set_defaults(func=cmd_run)
    compare.set_defaults(func=cmd_compare)
    show.set_defaults(func=cmd_plan)
    return top


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        code: int = args.func(args)
    except (ScenarioError, TraceTooLarge, TargetError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return code


if __name__ == "__main__":
    sys.exit(main())
