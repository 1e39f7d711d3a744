"""The core imports no training framework and no plotting library."""

import subprocess
import sys

FRAMEWORKS = ["lightning", "pytorch_lightning", "transformers", "accelerate", "deepspeed", "matplotlib", "torchmetrics"]


def test_core_imports_no_framework():
    code = (
        "import sys, cooldown_callbacks, cooldown_callbacks.engine, cooldown_callbacks.snapshot, "
        "cooldown_callbacks.data, cooldown_callbacks.records, cooldown_callbacks.plan, cooldown_callbacks.sharding\n"
        "import importlib.util\n"
        "for extra in ('theory', 'cli'):\n"
        "    if importlib.util.find_spec('cooldown_callbacks.' + extra):\n"
        "        __import__('cooldown_callbacks.' + extra)\n"
        f"bad = [m for m in {FRAMEWORKS!r} if m in sys.modules]\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"core imported: {out.stdout.strip()}"


def test_integrations_package_is_importable_as_subpackage():
    import cooldown_callbacks.integrations as integ
    import cooldown_callbacks.integrations.accelerate as acc

    assert hasattr(acc, "CooldownHook")
    assert integ.__name__ == "cooldown_callbacks.integrations"
