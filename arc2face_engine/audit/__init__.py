"""Independent audit of a dataset: schema, integrity, quality, leakage, re-verification.

The audit trusts nothing the producer says: it validates dataset.json against its
schema, re-reads every Parquet schema, verifies the checksums recorded at commit,
re-hashes every image file, checks that every path stays inside the dataset root,
recounts dataset.json and recomputes the quality numbers from the stored face
embeddings.

Streaming: the manifest is read one part and one record batch at a time with
only the columns a check needs; per-identity state is a few arrays of length
n_identities (plus the n_identities x 512 centre matrix), so memory does not
grow with the number of images. Image files are hashed one by one.

One module per concern: `report` (the models of report.json, imported by the
checks and by `html`, the HTML report), `schema`, `integrity`, `quality`, `leakage`,
`reverify`, and `run` (the orchestration: `audit_dataset`, `load_report`).
"""

from arc2face_engine.audit.report import AuditError, AuditReport
from arc2face_engine.audit.run import audit_dataset, load_report

__all__ = ["AuditError", "AuditReport", "audit_dataset", "load_report"]
