"""``make demo``: the main job end to end on real text (see run.py for the steps)."""

from raytrieve.demo.config import DemoConfig, load_demo_config
from raytrieve.demo.run import DemoResult, run_demo

__all__ = ["DemoConfig", "DemoResult", "load_demo_config", "run_demo"]
