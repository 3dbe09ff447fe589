"""Every DICOM file we can get, and one-field variants of a real ultrasound header, through
/segment, /diagnose (every output type) and STOW-RS: no answer is a 5xx, and every SEG, SR and
presentation state passes dciodvfy (dicom3tools) without an error.

The corpus is pydicom's own test files and pydicom-data's (the dev extra), every file, DICOM or
not: CT, MR and the rest are refused with a 4xx, ultrasound is analysed. The variants change one
attribute of pydicom's `examples_rgb_color.dcm` (an ultrasound image): missing, empty, invalid for
its VR, multi-valued, or text in another character set. The default suite runs a fixed subset;
the full run is marked slow (scripts/test.sh runs it) and prints its counts.
"""

from __future__ import annotations

import copy
import hashlib
import io
import json
import struct
import warnings
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

import pydicom
import pytest
from dicom_support import (
    CSPS_STORAGE,
    GSPS_STORAGE,
    IOD_OF_CLASS,
    dciodvfy_errors,
    multipart_body,
    pydicom_file,
    read_parts,
)
from fastapi.testclient import TestClient
from fhir.resources.R4B.diagnosticreport import DiagnosticReport
from pydicom import Dataset, dcmread
from pydicom.dataelem import DataElement
from pydicom.tag import Tag

try:
    import data_store  # pydicom-data's package

    PYDICOM_DATA = Path(data_store.__file__).parent / "data"
except ImportError:  # pragma: no cover - the dev extra installs it
    PYDICOM_DATA = None

BASE_FILE = "examples_rgb_color.dcm"
DICOM = "application/dicom"
# (endpoint, Accept) of every output type of /segment and /diagnose.
OUTPUTS = (
    ("/segment", "application/json"),
    ("/segment", "image/png"),
    ("/segment", DICOM),
    ("/diagnose", "application/json"),
    ("/diagnose", f'multipart/related; type="{DICOM}"'),
    ("/diagnose", "application/fhir+json"),
)
STOW_BATCH = 16
STOW_BATCH_BYTES = 8 * 1024 * 1024
# Why a DICOM answer may be refused: not an ultrasound image, or nothing to reference.
EXPECTED_DICOM_REFUSALS = {"not_ultrasound", "non_image_dicom", "dicom_not_referenceable"}


@cache
def corpus_files() -> dict[str, bytes]:
    """Every file of pydicom's and pydicom-data's test data, once each (by content)."""
    roots = [Path(pydicom.__file__).parent / "data"]
    if PYDICOM_DATA is not None:
        roots.append(PYDICOM_DATA)
    files: dict[str, bytes] = {}
    seen = set()
    for root in roots:
        for path in sorted(root.rglob("*")):
            if not path.is_file() or path.suffix in (".py", ".pyc"):
                continue
            data = path.read_bytes()
            digest = hashlib.sha1(data).digest()
            if digest not in seen:
                seen.add(digest)
                files[str(path.relative_to(root.parent))] = data
    return files


# A valid value of each VR that no file here holds: variants write it, then swap in the bytes.
_PLACEHOLDERS = {
    "PN": "Placeholder^Value",
    "LO": "PLACEHOLDER-VALUE",
    "SH": "PLACEHOLDER-VAL",
    "CS": "PLACEHOLDER_CS",
    "DA": "19000101",
    "TM": "235959.123",
    "DS": "7.7777777",
    "UI": "1.2.826.0.1.3680043.10.543.777",
}


@dataclass(frozen=True)
class RawValue:
    """An element's stored bytes, written as they are: pydicom would decode, check or convert a
    value it is given, and a variant means bytes it would not write."""

    keyword: str
    vr: str
    value: bytes


def _swap_raw_values(data: bytes, raws: list[RawValue]) -> bytes:
    """Replace each placeholder element (explicit VR little endian, 2-byte length) by its bytes."""
    for raw in raws:
        tag = Tag(raw.keyword)
        placeholder = _PLACEHOLDERS[raw.vr].encode("ascii")
        placeholder += b"\x00" if raw.vr == "UI" and len(placeholder) % 2 else b""
        placeholder += b" " if len(placeholder) % 2 else b""
        head = struct.pack("<HH", tag.group, tag.element) + raw.vr.encode("ascii")
        old = head + struct.pack("<H", len(placeholder)) + placeholder
        assert data.count(old) == 1, raw.keyword
        value = raw.value + (b" " if len(raw.value) % 2 else b"")
        data = data.replace(old, head + struct.pack("<H", len(value)) + value)
    return data


Mutation = Callable[[Dataset], RawValue | None]


def _set(keyword: str, value: object) -> Mutation:
    def mutate(ds: Dataset) -> None:
        setattr(ds, keyword, value)

    return mutate


def _delete(keyword: str) -> Mutation:
    def mutate(ds: Dataset) -> None:
        if keyword in ds:
            delattr(ds, keyword)

    return mutate


def _raw_text(keyword: str, vr: str, value: bytes, charset: str | list[str] | None) -> Mutation:
    def mutate(ds: Dataset) -> RawValue:
        if charset is None:
            if "SpecificCharacterSet" in ds:
                del ds.SpecificCharacterSet
        else:
            ds.SpecificCharacterSet = charset
        ds[Tag(keyword)] = DataElement(Tag(keyword), vr, _PLACEHOLDERS[vr])
        return RawValue(keyword, vr, value)

    return mutate


_TYPE2 = (
    "PatientID",
    "PatientName",
    "PatientBirthDate",
    "PatientSex",
    "AccessionNumber",
    "StudyID",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
)
# Values invalid for the attribute's VR or its defined terms, each a variant of its own.
_INVALID: dict[str, list[tuple[str, bytes]]] = {
    "PatientSex": [("CS", b"U "), ("CS", b"FEMALE"), ("CS", b"m ")],
    "PatientBirthDate": [("DA", b"2026-01-01"), ("DA", b"20261340"), ("DA", b"yesterday ")],
    "StudyDate": [("DA", b"20260231"), ("DA", b"20260101\\20260102")],
    "StudyTime": [("TM", b"25:00:00"), ("TM", b"126000"), ("TM", b"120000\\130000")],
    "PatientName": [("PN", b"Doe^Jane\\Roe^Rick"), ("PN", b"A" * 80), ("PN", b"a=b=c=d")],
    "ReferringPhysicianName": [("PN", b"Dr\\Who ")],
    "PatientID": [("LO", b"X" * 70), ("LO", b"1\\2 "), ("LO", b"tab\there ")],
    "AccessionNumber": [("SH", b"ACC-0123456789-LONG")],
    "StudyID": [("SH", b"STUDY-ID-TOO-LONG")],
    "PixelSpacing": [("DS", b"0.2 "), ("DS", b"abc\\0.2 "), ("DS", b"NaN\\NaN "), ("DS", b"0\\0 ")],
    "Modality": [("CS", b"CT"), ("CS", b"us")],
    "SOPClassUID": [
        ("UI", b"1.2.840.10008.5.1.4.1.1.6\x00"),  # retired Ultrasound Image Storage
        ("UI", b"1.2.840.10008.5.1.4.1.1.3\x00"),  # retired Ultrasound Multi-frame Image
        ("UI", b"1.2.826.0.1.3680043.10.543.99\x00"),  # a private class
    ],
    "StudyInstanceUID": [("UI", b"1.2.3." + b"4" * 70), ("UI", b"1.2.abc ")],
    "SeriesInstanceUID": [("UI", b"01.02\x00")],
    "SOPInstanceUID": [("UI", b"not a uid ")],
    "FrameOfReferenceUID": [("UI", b"1.2.826.0.1.3680043.10.543.7\x00")],
    "PatientOrientation": [("CS", b"A\\F "), ("CS", b"X\\Y "), ("CS", b"A ")],
    "Laterality": [("CS", b"L "), ("CS", b"left")],
    "WindowCenter": [("DS", b"abc ")],
}
# Patient's Name in character sets: (Specific Character Set, stored bytes, text it means).
CHARSET_NAMES: dict[str, tuple[str | list[str] | None, bytes, str | None]] = {
    "japanese-ir87": (
        ["", "ISO 2022 IR 87"],
        b"Yamada^Tarou=\x1b$B;3ED\x1b(B^\x1b$BB@O:\x1b(B=\x1b$B$d$^$@\x1b(B^\x1b$B$?$m$&\x1b(B",
        "Yamada^Tarou=山田^太郎=やまだ^たろう",
    ),
    "korean-ir149": (
        ["", "ISO 2022 IR 149"],
        b"Hong^Gildong=\x1b$)C\xfb\xf3^\x1b$)C\xd1\xce\xd4\xd7=\x1b$)C\xc8\xab^\x1b$)C\xb1\xe6\xb5\xbf",
        "Hong^Gildong=洪^吉洞=홍^길동",
    ),
    "two-single-byte-sets": (
        ["ISO 2022 IR 100", "ISO 2022 IR 126"],
        b"Dup\xe9rey^Ren\xe9=\x1b-F\xc4\xe9\xef\xed\xf5\xf3\xef\xf2",
        "Dupérey^René=Διονυσος",
    ),
    "utf8-declared-latin1-stored": ("ISO_IR 192", b"M\xfcller^Anna", "Müller^Anna"),
    "latin1": ("ISO_IR 100", b"M\xfcller^Anna", "Müller^Anna"),
    "utf8": ("ISO_IR 192", "Öztürk^Ayşe".encode(), "Öztürk^Ayşe"),
    "gb18030": ("GB18030", "王^小明".encode("gb18030"), "王^小明"),
    "unknown-term": ("ISO_IR 999", b"Plain^Name", "Plain^Name"),
    "undeclared-latin1": (None, b"M\xfcller^Anna", "Müller^Anna"),
}


@cache
def variants() -> dict[str, bytes]:
    """One-field header variants of pydicom's ultrasound example, by name."""
    base = dcmread(io.BytesIO(pydicom_file(BASE_FILE)))
    mutations: dict[str, Mutation] = {}
    for keyword in _TYPE2:
        mutations[f"{keyword}-missing"] = _delete(keyword)
        mutations[f"{keyword}-empty"] = _set(keyword, "")
    for keyword, values in _INVALID.items():
        for i, (vr, value) in enumerate(values):
            mutations[f"{keyword}-invalid-{i}"] = _raw_text(keyword, vr, value, "ISO_IR 100")
    mutations["PixelSpacing-valid"] = _set("PixelSpacing", [0.1, 0.12])
    mutations["Modality-missing"] = _delete("Modality")
    mutations["NumberOfFrames-2-single-frame-class"] = _two_frames
    for name, (charset, value, _) in CHARSET_NAMES.items():
        mutations[f"PatientName-{name}"] = _raw_text("PatientName", "PN", value, charset)
    found = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom's, about the invalid values we mean to write
        for name, mutate in mutations.items():
            ds = copy.deepcopy(base)
            raw = mutate(ds)
            buffer = io.BytesIO()
            ds.save_as(buffer, implicit_vr=False, little_endian=True)
            found[name] = _swap_raw_values(buffer.getvalue(), [raw] if raw else [])
    return found


def _two_frames(ds: Dataset) -> None:
    """Two frames in a single-frame class (it happens), as ?frame=1 reads them."""
    frame = ds.PixelData
    ds.PixelData = frame + frame
    ds.NumberOfFrames = 2


@dataclass
class Tally:
    inputs: int = 0
    requests: int = 0
    statuses: Counter = field(default_factory=Counter)
    server_errors: list[str] = field(default_factory=list)
    refusals: Counter = field(default_factory=Counter)  # error codes of refused DICOM answers
    # (input name, result name, result bytes, result SOP class)
    objects: list[tuple[str, str, bytes, str]] = field(default_factory=list)
    sources: dict[str, Dataset] = field(default_factory=dict)  # input name: its header
    fhir_reports: int = 0
    problems: list[str] = field(default_factory=list)

    def answer(self, name: str, response) -> None:
        self.requests += 1
        self.statuses[response.status_code] += 1
        if response.status_code >= 500:
            self.server_errors.append(f"{name}: {response.status_code} {response.text[:200]}")


def _bytes(ds: Dataset) -> bytes:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def analyse(client: TestClient, inputs: dict[str, bytes], frame: int | None = None) -> Tally:
    """Every input through every output of /segment and /diagnose, then STOW-RS in batches."""
    tally = Tally(inputs=len(inputs))
    query = f"?frame={frame}" if frame is not None else ""
    for name, data in inputs.items():
        for endpoint, accept in OUTPUTS:
            response = client.post(
                endpoint + query, content=data, headers={"Content-Type": DICOM, "Accept": accept}
            )
            label = f"{name} {endpoint} {accept}"
            tally.answer(label, response)
            if response.status_code != 200:
                if response.status_code < 500 and accept != "application/json":
                    tally.refusals[response.json()["error"]["code"]] += 1
                continue
            if accept.startswith("multipart") or accept == DICOM:
                objects = (
                    [dcmread(io.BytesIO(response.content))]
                    if endpoint == "/segment"
                    else read_parts(response.headers["content-type"], response.content)
                )
                tally.sources.setdefault(name, dcmread(io.BytesIO(data), stop_before_pixels=True))
                for i, ds in enumerate(objects):
                    result = f"{name}{endpoint}-{i}"
                    tally.objects.append((name, result, _bytes(ds), ds.SOPClassUID))
                    _check_text(tally, label, ds)
            elif accept == "application/fhir+json":
                DiagnosticReport.model_validate(response.json())  # raises when not valid FHIR
                tally.fhir_reports += 1
    for number, batch in enumerate(_batches(list(inputs.values()))):
        body, content_type = multipart_body(batch)
        response = client.post(
            "/dicomweb/studies",
            content=body,
            headers={"Content-Type": content_type, "Accept": "application/dicom+json"},
        )
        tally.answer(f"STOW-RS batch {number}", response)
        if response.status_code < 500 and response.status_code not in (200, 202, 409):
            tally.problems.append(f"STOW-RS batch answered {response.status_code}")
    return tally


def _batches(parts: list[bytes]) -> list[list[bytes]]:
    """STOW-RS requests of at most STOW_BATCH parts and STOW_BATCH_BYTES (under MAX_BODY_BYTES)."""
    batches: list[list[bytes]] = [[]]
    for part in parts:
        size = sum(len(p) for p in batches[-1])
        if len(batches[-1]) == STOW_BATCH or size + len(part) > STOW_BATCH_BYTES:
            batches.append([])
        batches[-1].append(part)
    return [batch for batch in batches if batch]


def _check_text(tally: Tally, label: str, ds: Dataset) -> None:
    """No replacement character anywhere in a result's text (a character set misread)."""
    text = json.dumps(ds.to_json_dict(bulk_data_threshold=64, bulk_data_element_handler=str))
    if "\ufffd" in text:
        tally.problems.append(f"{label}: a replacement character in the result")


# dciodvfy's error when a reference names a frame of an instance whose SOP class it does not
# list as multi-frame.
_FRAME_OF_SINGLE_FRAME_CLASS = (
    "Error - Shall not be present for Referenced SOP Class that is not multi-frame - "
    "attribute <ReferencedFrameNumber>"
)
RETIRED_US_MULTIFRAME = "1.2.840.10008.5.1.4.1.1.3"


def inherited(error: str, source: Dataset) -> bool:
    """Whether a dciodvfy error is the source's own, which a result cannot avoid:

    - an illegal UID root (PS3.5 9.1, e.g. `999.999...`) in the source's study, series or
      instance UID, which the result must repeat to be filed in that study and to cite it;
    - a frame number of a source that has several frames although its SOP class is one
      dciodvfy takes for single-frame (the retired US Multi-frame Image class, or two frames in
      Ultrasound Image Storage): PS3.3 C.10.3 wants the frame named for a multi-frame image.
    """
    if error.startswith("Error - Illegal root for UID"):
        uids = {
            str(source.get(k, ""))
            for k in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID")
        }
        return any(f'"{uid}"' in error for uid in uids if uid)
    if error == _FRAME_OF_SINGLE_FRAME_CLASS:
        frames = int(source.get("NumberOfFrames") or 1)
        return frames > 1 or source.get("SOPClassUID") == RETIRED_US_MULTIFRAME
    return False


@dataclass
class Verdicts:
    failures: dict[str, list[str]] = field(default_factory=dict)  # errors of our making
    inherited: Counter = field(default_factory=Counter)  # error kind: count


def dciodvfy_all(tally: Tally, tmp_path: Path) -> Verdicts:
    """dciodvfy's verdict on every object, the processes run a few at a time (each is a
    separate program, so the checks are the same however many run at once)."""

    def errors(numbered: tuple[int, tuple[str, str, bytes, str]]) -> list[str]:
        i, (_, name, data, sop_class) = numbered  # numbered: no two share a file
        safe = f"{i}-{hashlib.sha1(name.encode()).hexdigest()[:16]}"
        return dciodvfy_errors(data, tmp_path, safe, IOD_OF_CLASS[sop_class])

    verdicts = Verdicts()
    with ThreadPoolExecutor(max_workers=4) as pool:
        found = list(pool.map(errors, enumerate(tally.objects)))
    for (source_name, name, _, _), object_errors in zip(tally.objects, found, strict=True):
        source = tally.sources[source_name]
        ours = []
        for error in object_errors:
            if inherited(error, source):
                verdicts.inherited[error.split(" - ")[1]] += 1
            else:
                ours.append(error)
        if ours:
            verdicts.failures[name] = ours
    return verdicts


def _report(kind: str, tally: Tally, verdicts: Verdicts) -> str:
    objects = Counter(IOD_OF_CLASS[c] for _, _, _, c in tally.objects)
    return (
        f"{kind}: {tally.inputs} inputs, {tally.requests} requests, "
        f"statuses {dict(sorted(tally.statuses.items()))}, 5xx: {len(tally.server_errors)}, "
        f"objects {dict(objects)}, FHIR reports {tally.fhir_reports}, dciodvfy errors: "
        f"{sum(len(e) for e in verdicts.failures.values())}, inherited from the source: "
        f"{dict(verdicts.inherited)}, refusals {dict(tally.refusals)}"
    )


def _assert_clean(tally: Tally, verdicts: Verdicts) -> None:
    assert tally.server_errors == []
    assert verdicts.failures == {}
    assert tally.problems == []
    assert "dicom_results_failed" not in tally.refusals  # the sanitiser's safety net never fired


# A fixed subset for the default suite: files of every kind that reach the DICOM builders, and
# the variants that once answered 500.
QUICK_FILES = (
    "data/test_files/ExplVR_BigEnd.dcm",  # no Patient ID
    "data/test_files/GDCMJ2K_TextGBR.dcm",  # no Modality
    "data/test_files/README.txt",
)
QUICK_VARIANTS = (
    "PatientSex-invalid-1",
    "StudyTime-invalid-2",
    "PatientName-invalid-0",
    "PixelSpacing-invalid-2",
    "SOPClassUID-invalid-0",
    "FrameOfReferenceUID-invalid-0",
)


def test_a_representative_subset_gives_no_5xx_and_only_valid_results(
    client: TestClient, tmp_path: Path
) -> None:
    files = corpus_files()
    inputs = {name: files[name] for name in QUICK_FILES if name in files}
    all_variants = variants()
    inputs.update({name: all_variants[name] for name in QUICK_VARIANTS})
    tally = analyse(client, inputs)
    verdicts = dciodvfy_all(tally, tmp_path)
    print(_report("subset", tally, verdicts))
    _assert_clean(tally, verdicts)
    assert tally.objects  # the builders were reached


@pytest.mark.slow
def test_the_whole_corpus_and_every_variant_give_no_5xx_and_only_valid_results(
    client: TestClient, tmp_path: Path
) -> None:
    inputs = dict(corpus_files())
    assert PYDICOM_DATA is not None, "pydicom-data (the dev extra) is not installed"
    all_variants = variants()
    inputs.update({f"variant/{name}": data for name, data in all_variants.items()})
    tally = analyse(client, inputs)
    verdicts = dciodvfy_all(tally, tmp_path)
    print(_report("corpus", tally, verdicts))
    _assert_clean(tally, verdicts)


@pytest.mark.slow
def test_every_variant_of_an_ultrasound_header_gets_dicom_results_unless_it_cannot(
    client: TestClient,
) -> None:
    """Only a missing or non-US Modality, or a UID every reference needs, refuses results (a
    Modality `us` is read as US, and the results say US)."""
    refused = {}
    for name, data in variants().items():
        response = client.post(
            "/diagnose", content=data, headers={"Content-Type": DICOM, "Accept": DICOM}
        )
        if response.status_code != 200:
            refused[name] = (response.status_code, response.json()["error"]["code"])
    assert refused == {
        "Modality-missing": (422, "not_ultrasound"),
        "Modality-invalid-0": (422, "not_ultrasound"),  # CT: refused before any analysis
        "StudyInstanceUID-invalid-0": (422, "dicom_not_referenceable"),
        "StudyInstanceUID-invalid-1": (422, "dicom_not_referenceable"),
        "SeriesInstanceUID-invalid-0": (422, "dicom_not_referenceable"),
        "SOPInstanceUID-invalid-0": (422, "dicom_not_referenceable"),
    }


@pytest.mark.parametrize("name", sorted(CHARSET_NAMES))
def test_patient_names_in_other_character_sets_are_carried_as_the_text_they_mean(
    client: TestClient, name: str
) -> None:
    charset, value, meaning = CHARSET_NAMES[name]
    data = variants()[f"PatientName-{name}"]
    response = client.post(
        "/diagnose", content=data, headers={"Content-Type": DICOM, "Accept": DICOM}
    )
    assert response.status_code == 200, response.text
    for ds in read_parts(response.headers["content-type"], response.content):
        assert str(ds.PatientName) == meaning
        expected = None if meaning.isascii() else "ISO_IR 192"
        assert ds.get("SpecificCharacterSet") == expected


def test_invalid_values_are_written_empty_not_copied(client: TestClient) -> None:
    all_variants = variants()
    for name, keyword in (
        ("PatientSex-invalid-0", "PatientSex"),
        ("PatientBirthDate-invalid-0", "PatientBirthDate"),
        ("StudyTime-invalid-0", "StudyTime"),
        ("PatientName-invalid-0", "PatientName"),
        ("PatientID-invalid-0", "PatientID"),
        ("AccessionNumber-invalid-0", "AccessionNumber"),
    ):
        response = client.post(
            "/diagnose",
            content=all_variants[name],
            headers={"Content-Type": DICOM, "Accept": DICOM},
        )
        assert response.status_code == 200, name
        for ds in read_parts(response.headers["content-type"], response.content):
            assert keyword in ds and ds[keyword].value in ("", None), (name, ds.Modality)


def test_a_retired_sop_class_is_referenced_by_its_own_uid(client: TestClient) -> None:
    data = variants()["SOPClassUID-invalid-0"]
    response = client.post(
        "/diagnose", content=data, headers={"Content-Type": DICOM, "Accept": DICOM}
    )
    assert response.status_code == 200, response.text
    retired = "1.2.840.10008.5.1.4.1.1.6"
    for ds in read_parts(response.headers["content-type"], response.content):
        classes = {
            item.ReferencedSOPClassUID
            for item in _items(ds)
            if "ReferencedSOPClassUID" in item and item.ReferencedSOPClassUID.startswith(retired)
        }
        assert classes == {retired}, ds.Modality
        assert "1.2.840.10008.5.1.4.1.1.7" not in {
            item.get("ReferencedSOPClassUID") for item in _items(ds)
        }  # the Secondary Capture class highdicom was shown never leaks


def test_frame_1_of_two_frames_in_a_single_frame_class_names_the_frame(
    client: TestClient,
) -> None:
    data = variants()["NumberOfFrames-2-single-frame-class"]
    response = client.post(
        "/diagnose?frame=1", content=data, headers={"Content-Type": DICOM, "Accept": DICOM}
    )
    assert response.status_code == 200, response.text
    for ds in read_parts(response.headers["content-type"], response.content):
        frames = {
            int(item.ReferencedFrameNumber)
            for item in _items(ds)
            if "ReferencedFrameNumber" in item and "ReferencedSegmentNumber" not in item
        }
        assert frames == {2}, ds.Modality


@pytest.mark.parametrize(
    ("name", "state_class"),
    [
        ("data/JPGLosslessP14SV1_1s_1f_8b.dcm", GSPS_STORAGE),  # MONOCHROME2
        ("data/OBXXXX1A.dcm", CSPS_STORAGE),  # PALETTE COLOR: shown in colour
        ("data/test_files/examples_ybr_color.dcm", CSPS_STORAGE),
    ],
)
def test_grey_ultrasound_gets_a_grayscale_presentation_state_and_colour_a_colour_one(
    client: TestClient, name: str, state_class: str
) -> None:
    data = corpus_files().get(name)
    if data is None:
        pytest.skip(f"{name} is not installed (pydicom-data)")
    response = client.post(
        "/diagnose", content=data, headers={"Content-Type": DICOM, "Accept": DICOM}
    )
    assert response.status_code == 200, response.text
    state = read_parts(response.headers["content-type"], response.content)[-1]
    assert state.SOPClassUID == state_class


def test_a_text_file_declared_dicom_asking_for_dicom_gets_415(client: TestClient) -> None:
    response = client.post(
        "/diagnose", content=b"just some text\n", headers={"Content-Type": DICOM, "Accept": DICOM}
    )
    assert response.status_code == 415
    assert response.json()["error"]["code"] in ("unsupported_format", "format_mismatch")


def _items(ds: Dataset):
    for element in ds:
        if element.VR == "SQ":
            for item in element.value or []:
                yield item
                yield from _items(item)


def test_an_operator_who_allows_other_modalities_gets_their_results(
    serve, tiny_model_dir: Path
) -> None:
    data = variants()["Modality-missing"]
    with serve(tiny_model_dir, ALLOW_NON_ULTRASOUND_DICOM=True) as client:
        response = client.post(
            "/diagnose", content=data, headers={"Content-Type": DICOM, "Accept": DICOM}
        )
    assert response.status_code == 200, response.text
    assert read_parts(response.headers["content-type"], response.content)
