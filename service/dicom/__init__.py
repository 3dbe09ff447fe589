"""DICOM and FHIR results beyond the SEG and SR builders of service/dicom_results.py: the source
header sanitiser (`header`), lesion findings and outlines (`outline`), the presentation state
(`presentation_state`) and the FHIR DiagnosticReport (`fhir`)."""
