"""Built-in testbed: a synthetic fact world and a small GPT-2-style model trained on it on CPU.

Heavy imports happen inside the functions; importing this package is cheap.
"""

from superedit.testbed.build import build_testbed, load_world, read_testbed_meta
from superedit.testbed.registry import SHIPPED_DIR, is_builtin_spec, parse_builtin, resolve_builtin, superedit_home
from superedit.testbed.sizes import DEFAULT_SEED, DEFAULT_SIZE, SIZES, Size, get_size
from superedit.testbed.world import World

__all__ = [
    "build_testbed", "load_world", "read_testbed_meta", "resolve_builtin", "parse_builtin", "is_builtin_spec",
    "superedit_home", "SHIPPED_DIR", "DEFAULT_SIZE", "DEFAULT_SEED", "SIZES", "Size", "get_size", "World",
]
