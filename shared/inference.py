"""Loading a verified artifact's TorchScript module: the one place that turns `model.pt` into a
module, for the service's registry and for every training-side evaluation of a published model.

`load_module` does not check the module against its manifest or warm it up; the service's
registry does both on top of it before anything serves.
"""

from __future__ import annotations

import torch

from shared.errors import ArtifactIntegrityError
from shared.store import ArtifactInfo


def load_module(info: ArtifactInfo) -> torch.jit.ScriptModule:
    """The TorchScript module of a verified artifact, on the CPU, in eval mode.

    Raises ArtifactIntegrityError when the file is not a loadable TorchScript file.
    """
    try:
        module = torch.jit.load(str(info.model_path), map_location="cpu")
    except Exception as exc:  # torch raises RuntimeError, ValueError, zip errors, ...
        raise ArtifactIntegrityError("the model file is not a loadable TorchScript file") from exc
    return module.eval()
