"""build/entry.py and build/zygote.py, the frozen bundle's own modules, loaded from their source
files (they are not in any package): for tests that hold other code to what they say."""

import importlib.util
import os

from support.paths import ROOT


def load(name: str):
    spec = importlib.util.spec_from_file_location(f"bundle_{name}", os.path.join(ROOT, "build", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
