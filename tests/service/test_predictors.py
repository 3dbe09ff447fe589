"""The service feeds a model exactly the tensor training computes from the same bytes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from service_inputs import dicom, jpeg, png

from service.predictors import ImageRequest
from shared.decoding import decode_image
from shared.labels import TASK_CLASSIFICATION, TASK_SEGMENTATION
from shared.postprocessing import class_probabilities
from shared.preprocessing import Preprocessing


@pytest.mark.parametrize("task", [TASK_CLASSIFICATION, TASK_SEGMENTATION])
@pytest.mark.parametrize("make", [png, jpeg, dicom])
def test_same_bytes_give_the_same_tensor_as_training(client, task, make):
    data = make()
    runtime = client.app.state.runtime
    model = runtime.registry.get(task)
    served, _ = runtime.predictor.input_batch(model, runtime.predictor.decode(ImageRequest(data)))

    # What training does: shared.decoding, then the preprocessing stored in the manifest.
    preprocessing = Preprocessing.from_metadata(model.info.metadata["preprocessing"])
    trained = preprocessing(decode_image(data).pixels)[None]

    assert served.dtype == np.float32
    assert np.array_equal(served, trained)


def test_served_probabilities_equal_the_model_run_directly(client, tiny_model_dir):
    data = png()
    response = client.post("/classify", content=data, headers={"Content-Type": "image/png"})
    assert response.status_code == 200

    module = torch.jit.load(str(tiny_model_dir / TASK_CLASSIFICATION / "v1" / "model.pt"))
    metadata = client.app.state.runtime.registry.get(TASK_CLASSIFICATION).info.metadata
    batch = Preprocessing.from_metadata(metadata["preprocessing"])(decode_image(data).pixels)[None]
    with torch.no_grad():
        logits = module(torch.from_numpy(batch))[0].numpy()
    assert response.json()["probabilities"] == class_probabilities(logits)
