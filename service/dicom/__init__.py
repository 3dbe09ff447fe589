"""DICOM in and out of the service.

Results of an analysis: `results.DicomResults` makes them all for one `Analysis`, from the SEG and
TID 1500 SR builders (`builders`), the presentation state (`presentation_state`) and the FHIR
DiagnosticReport (`fhir`), on the source header as `header` sanitised it and the lesion outlines
of `outline`.

STOW-RS: `multipart` reads and writes multipart/related bodies, `stow` is the ingest behind
POST /dicomweb/studies, `stow_client` sends results to a PACS, and `delivery` is the bounded lane
those sends run on.
"""
