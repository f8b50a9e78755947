"""Keep what a worker process writes inside the data directory.

Libraries write beside the data we own unless told otherwise: ONNX Runtime writes a device id and a
telemetry database under ``~/.cache/Microsoft/DeveloperTools`` and a ``.ses`` file under ``$TMPDIR``
as soon as it is imported (ORT_DISABLE_TELEMETRY=1 stops both); torch, triton and matplotlib keep
caches under ``$HOME``; ``tempfile`` uses ``$TMPDIR`` or ``/tmp``. The worker points all of them at
``<data_dir>/tmp`` before any of them is imported. On a shared host ``$HOME`` and ``/tmp`` are not
ours to fill, and the deployment's backups and clean-up only know the data directory.
"""

from __future__ import annotations

import os
import tempfile

from service.core.settings import Settings

__all__ = ["TELEMETRY_OFF", "confine_to_data_dir"]

# Read by ONNX Runtime when it is imported (its telemetry writes files, whatever the provider).
TELEMETRY_OFF = {"ORT_DISABLE_TELEMETRY": "1"}


def confine_to_data_dir(settings: Settings) -> None:
    """Point this process's (and its children's) caches and temporary files at ``settings.tmp_dir``.

    Call it first thing in a worker process: libraries read these variables when they are imported.
    """
    scratch = settings.tmp_dir.resolve()
    scratch.mkdir(parents=True, exist_ok=True)
    cache = scratch / "cache"
    os.environ.update(
        {
            **TELEMETRY_OFF,
            "TMPDIR": str(scratch),
            "XDG_CACHE_HOME": str(cache),
            "TORCH_HOME": str(cache / "torch"),
            "TORCHINDUCTOR_CACHE_DIR": str(cache / "torchinductor"),
            "TRITON_CACHE_DIR": str(cache / "triton"),
            "MPLCONFIGDIR": str(cache / "matplotlib"),
        }
    )
    tempfile.tempdir = str(scratch)
