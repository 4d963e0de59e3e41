"""Plain-Python dataset IO over fsspec: layout, shard commit, reader, streaming plan.

Submodules are imported directly (`from arc2face_engine.dataset.writer import
DatasetWriter`) so that reading a dataset never pulls in torch or diffusers.
"""
