"""The import job: a dataset in this project's format from a dataset others published.

Plain Python, run by flows/imports.py (and `direct.run_import_directly`): `lifecycle`
(checks before anything is written, the lease, dataset.json, resume, finalize with
identities.parquet and provenance), `plan` (the source's identities in shards of whole
identities), `analyzers` (face analyzers per detection size, loaded once), `shard` (read,
copy, analyse and judge one shard; commit in shard order). Readers of the formats are
arc2face_engine/imports/. Model libraries load with the first analyzer, not on import.
"""
