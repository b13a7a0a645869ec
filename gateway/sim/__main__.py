"""``python -m gateway.sim``: run a simulated GPU backend on 127.0.0.1.

Configuration: ``SimConfig`` defaults, then ``--config FILE`` (YAML with SimConfig's fields), then
one ``--field-name VALUE`` flag per SimConfig field (``--kv-blocks 4096 --mode contiguous``).
Prints one line when listening; SIGINT or SIGTERM stops it cleanly.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
import typing
from pathlib import Path

import msgspec
import uvloop

from gateway.sim.config import SimConfig
from gateway.sim.engine import validate_config
from gateway.sim.server import serve


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m gateway.sim", description="Simulated LLM GPU backend (vLLM-like)."
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000, help="0: any free port")
    parser.add_argument("--config", type=Path, help="YAML file of SimConfig fields")
    hints = typing.get_type_hints(SimConfig)
    for field in msgspec.structs.fields(SimConfig):
        flag = "--" + field.name.replace("_", "-")
        hint = hints[field.name]
        choices = typing.get_args(hint) if typing.get_origin(hint) is typing.Literal else None
        kind = str if choices else _flag_bool if hint is bool else hint
        parser.add_argument(
            flag, dest=field.name, type=kind, choices=choices, help=f"default {field.default!r}"
        )
    return parser


def _flag_bool(value: str) -> bool:
    """``--prefix-caching true``: argparse's ``bool`` would read "false" as True."""
    words = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}
    if value.lower() not in words:
        raise argparse.ArgumentTypeError(f"expected true or false, got {value!r}")
    return words[value.lower()]


def load_config(args: argparse.Namespace) -> SimConfig:
    """SimConfig from the YAML file (if any) overridden by the flags that were given."""
    values: dict[str, object] = {}
    if args.config is not None:
        loaded = msgspec.yaml.decode(args.config.read_bytes(), type=dict[str, object])
        values.update(loaded)
    for field in msgspec.structs.fields(SimConfig):
        flag_value = getattr(args, field.name)
        if flag_value is not None:
            values[field.name] = flag_value
    config = msgspec.convert(values, SimConfig)
    validate_config(config)
    return config


LOADING_LINE = "kvgate-sim loading"  # printed when the clock starts and the port stays shut


async def _run(config: SimConfig, host: str, port: int) -> None:
    if config.loading == "refuse" and config.load_time_s > 0:
        wall_s = config.load_time_s / config.time_scale
        print(f"{LOADING_LINE}: port {port} opens in {wall_s:g} s", flush=True)
    runner = await serve(config, host, port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    bound_host, bound_port = runner.addresses[0][:2]
    print(
        f"kvgate-sim listening on http://{bound_host}:{bound_port} "
        f"(model {config.model}, {config.mode}, "
        f"{config.kv_blocks} blocks x {config.block_size} tokens, time_scale {config.time_scale})",
        flush=True,
    )
    try:
        await stop.wait()
    finally:
        await runner.cleanup()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        config = load_config(args)
    except (OSError, msgspec.DecodeError, ValueError) as exc:
        source = f"{args.config}: " if args.config is not None else ""
        print(f"kvgate-sim: {source}{exc}", file=sys.stderr)
        return 2
    uvloop.run(_run(config, args.host, args.port))
    return 0


if __name__ == "__main__":
    sys.exit(main())
