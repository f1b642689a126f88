"""The points of the GPU benchmark (sweeps/bench/bench_gpu.py), shared with its torchtitan half."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Point:
    key: str  # for --points
    label: str
    overrides: tuple[str, ...]  # launch.py
    compile: bool  # torchtitan: compile model + loss
    float8: str = ""  # float8 recipe; "" = off
    selective_ac: bool = False  # selective per-op activation checkpointing


POINTS = [
    Point("eager", "bf16 eager", (), compile=False),
    Point("compile", "bf16 compile", ("compile.enable=true",), compile=True),
    Point("f8_tensorwise", "compile + float8 tensorwise", ("compile.enable=true", "float8=tensorwise"), True,
          "tensorwise"),
    Point("f8_rowwise", "compile + float8 rowwise", ("compile.enable=true", "float8=rowwise"), True, "rowwise"),
    Point("compile_sac", "compile + selective op AC",
          ("compile.enable=true", "activation_checkpoint.mode=selective",
           "activation_checkpoint.selective_ac_option=op"),
          True, selective_ac=True),
]
TITAN_FLOAT8_RECIPES = ("rowwise", "rowwise_with_gw_hp")  # torchtitan 0.3.0's Float8LinearConverter.Config.recipe_name
