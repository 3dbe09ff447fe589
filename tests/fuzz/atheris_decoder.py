"""Atheris (libFuzzer) target over the decoder, for runs longer than the suite's Hypothesis budget.

    pip install atheris
    python tests/fuzz/atheris_decoder.py tests/shared/fuzz_corpus -max_total_time=3600

The first argument is the corpus folder: libFuzzer reads its files as seeds and writes new
interesting inputs into it; crashes are written as crash-* files in the working directory. Copy
each crasher into tests/shared/fuzz_corpus/ (name it crash-<anything>-frame0.bin): the suite
replays every file there (tests/shared/test_decoder_fuzz.py). Not collected by pytest.
"""

from __future__ import annotations

import sys
import warnings

import atheris

with atheris.instrument_imports():
    from shared.decoding import decode_image
    from shared.errors import InputError

CAPS = {"max_pixels": 4_000_000, "max_frames": 64, "max_decoded_bytes": 16 * 1024 * 1024}


def test_one_input(data: bytes) -> None:
    frame = data[-1] % 4 if data else 0
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            decode_image(data, frame=frame, **CAPS)
    except InputError:
        pass  # a refusal with a code is the expected answer to bad input


if __name__ == "__main__":
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()
