"""``_kill_script_transformers.main(out)``, SIGKILLed while a fork that runs again after a resume
removes the cooled folder that the killed run had already renamed into place.

A folder cannot be renamed over a non-empty folder, so replacing a finished cooled model (a
``save_pretrained`` folder) means removing the old one. This script kills the process in the middle of
that removal (one file deleted, the rest still there), which is what a SIGKILL during the removal
leaves on disk. It must never leave a partial folder under a final name.

For ``_kill_harness.run("_fail_rmtree_transformers", out)`` on a folder where the killed run left a
cooled model under its final name without its record (e.g. killed at ``after_rename``).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _kill_script_transformers as script  # noqa: E402

COOLED, PRELOAD, load_cooled = script.COOLED, [], script.load_cooled


def main(out: str) -> None:
    cooled = Path(out) / COOLED
    rmtree = shutil.rmtree

    def dying_rmtree(path, *args, **kwargs):
        p = Path(path)
        if p.parent == cooled and (p / "model.safetensors").exists():  # a finished cooled model is being removed
            (p / "model.safetensors").unlink()
            # the marker (see _kill_harness.marker_path) proves where the process died
            Path(out).parent.joinpath(f"{Path(out).name}-kill.json").write_text(
                json.dumps({"phase": "rmtree", "path": str(p)}))
            os.kill(os.getpid(), signal.SIGKILL)
        return rmtree(path, *args, **kwargs)

    shutil.rmtree = dying_rmtree
    script.main(out)
